"""train.target_regularization: kappa * sum_a (Q(s, a) - Q_target(s, a))^2, averaged over the batch like
the TD loss, is added to the loss in every learner path (hand-written MLP gradient and autograd; the
pipeline's is checked against the unpartitioned learner in tests/mpi/pipeline_grads.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpidqn.algo.dqn import target_regularization, target_regularization_grad, td_loss
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import Batch


@pytest.mark.parametrize("weighted", [False, True])
def test_value_and_hand_written_gradient_match_autograd(weighted):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 3, generator=g, requires_grad=True)
    qt = torch.randn(6, 3, generator=g)
    w = torch.rand(6, generator=g) if weighted else None
    value = target_regularization(q, qt, 0.4, w)
    per_row = ((q - qt) ** 2).sum(dim=1)
    assert torch.allclose(value, 0.4 * (per_row.mean() if w is None else (w * per_row).sum()))
    value.backward()
    assert torch.allclose(target_regularization_grad(q.detach(), qt, 0.4, w), q.grad, atol=1e-6)
    empty = torch.zeros(0, 3, requires_grad=True)
    assert target_regularization(empty, torch.zeros(0, 3), 0.4).item() == 0.0  # a rank with no rows


def _learner(kappa: float, kernel: bool) -> Learner:
    torch.manual_seed(0)
    hyper = Hyper(lr=0.01, target_regularization=kappa, double_dqn=True, target_update_interval=2)
    return Learner(torch.nn.Sequential(*mlp_layers(4, 3, [16])), hyper, MPI.COMM_SELF, mlp_kernel=kernel)


def _batch(rows: int, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch(rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(3, size=rows),
                 rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, 4)).astype(np.float32),
                 np.full(rows, 0.99, np.float32))


@pytest.mark.parametrize("kernel", [True, False])
def test_gradient_is_the_td_loss_plus_the_pull_towards_the_target_network(kernel):
    """The learner's gradient equals autograd's of the TD loss plus the regulariser, computed by hand,
    once the target network differs from the online one (after a refresh interval of updates)."""
    kappa = 0.5
    learner = _learner(kappa, kernel)
    learner.update_many(_batch(48, 3), 3)  # 3 updates: the target was refreshed after the second
    with torch.no_grad():
        assert any(not torch.equal(p, t) for p, t in zip(learner.params, learner.target.parameters()))
    b = _batch(16, 4)
    obs, act, rew, nobs, disc = (torch.from_numpy(np.asarray(a)) for a in b)
    y = learner.targets(rew, nobs, disc)
    learner.backward(obs, act, y)
    got = learner.flat_grad.clone()
    ref = torch.nn.Sequential(*mlp_layers(4, 3, [16]))
    ref.load_state_dict(learner.online.state_dict())
    q = ref(obs)
    with torch.no_grad():
        qt = learner.target(obs)
    loss = td_loss(q.gather(1, act.unsqueeze(1)).squeeze(1), y) + kappa * ((q - qt) ** 2).sum(dim=1).mean()
    loss.backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert torch.allclose(got, want, atol=1e-6)
    plain = torch.autograd.grad(td_loss(ref(obs).gather(1, act.unsqueeze(1)).squeeze(1), y), list(ref.parameters()))
    assert not torch.allclose(got, torch.cat([g.reshape(-1) for g in plain]), atol=1e-4)  # the pull matters


def test_kernel_and_autograd_learners_take_the_same_steps():
    a, b = _learner(0.3, True), _learner(0.3, False)
    for seed in range(3):
        batch = _batch(40, seed)
        a.update_many(batch, 4)
        b.update_many(batch, 4)
    for p, q in zip(a.params, b.params):
        assert torch.allclose(p, q, atol=1e-5)
