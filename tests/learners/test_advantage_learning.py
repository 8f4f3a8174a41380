"""train.advantage_learning: the TD target of (s, a) loses alpha times the target network's action gap
at s (Bellemare et al. 2016), in every learner path that computes targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpidqn.algo.dqn import action_gap_penalty, td_targets
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import Batch


def test_penalty_leaves_the_greedy_action_and_lowers_the_others():
    q = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.5]])
    pen = action_gap_penalty(q, torch.tensor([1, 1]), 0.9)
    assert torch.allclose(pen, torch.tensor([0.0, 0.9 * 1.5]))
    assert torch.allclose(action_gap_penalty(q, torch.tensor([2, 0]), 0.5), torch.tensor([0.5, 0.0]))


def _learner(alpha: float, kernel: bool) -> Learner:
    torch.manual_seed(0)
    return Learner(torch.nn.Sequential(*mlp_layers(4, 3, [16])), Hyper(lr=0.01, advantage_learning=alpha,
                                                                       double_dqn=True),
                   MPI.COMM_SELF, mlp_kernel=kernel)


def _batch(rows: int = 24) -> Batch:
    rng = np.random.default_rng(5)
    return Batch(rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(3, size=rows),
                 rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, 4)).astype(np.float32),
                 np.full(rows, 0.99, np.float32))


@pytest.mark.parametrize("kernel", [True, False])
def test_update_uses_targets_lowered_by_the_target_networks_gap(kernel):
    """One round through update_many equals a plain learner stepping on the hand-made targets."""
    b = _batch()
    obs, act, rew, nobs, disc = (torch.from_numpy(np.asarray(a)) for a in b)
    learner, plain = _learner(0.7, kernel), _learner(0.0, kernel)
    with torch.no_grad():
        assert torch.equal(learner.target(obs), plain.target(obs))
        want = (td_targets(rew, disc, plain.target(nobs), plain.online(nobs))
                - action_gap_penalty(plain.target(obs), act, 0.7))
    assert torch.allclose(learner.targets(rew, nobs, disc, obs, act), want, atol=1e-6)
    assert not torch.allclose(plain.targets(rew, nobs, disc), want, atol=1e-3)  # the penalty matters here
    learner.update_many(b, 1)
    plain.backward(obs, act, want)
    plain.reduce_gradients()
    plain.step()
    for p, q in zip(learner.params, plain.params):
        assert torch.allclose(p, q, atol=1e-6)

