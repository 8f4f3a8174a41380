"""The hand-written MLP gradient (MLPKernel) gives autograd's gradient, loss and TD errors, and the
learner takes it only where it applies."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import TINY, mpidqn

from mpidqn.algo.dqn import td_loss, td_loss_grad
from mpidqn.io.runlog import read_log
from mpidqn.learners.base import RoundPlan
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.mlp_kernel import MLPKernel
from mpidqn.nn.mlp import linear_factory, mlp_layers
from mpidqn.replay.shard import Batch


def _pair(hidden=(32, 32), obs=5, actions=3, dueling=False, noisy=False, **hyper) -> tuple[Learner, Learner]:
    out = []
    for kernel in (True, False):
        torch.manual_seed(0)
        net = torch.nn.Sequential(*mlp_layers(obs, actions, list(hidden), dueling=dueling,
                                              linear=linear_factory(noisy)))
        out.append(Learner(net, Hyper(lr=1e-3, sync_check_interval=0, **hyper), MPI.COMM_SELF, mlp_kernel=kernel))
    assert out[0]._kernel is not None and out[1]._kernel is None
    return out[0], out[1]


def test_supports_relu_mlps_with_plain_or_dueling_heads_and_noisy_layers():
    assert MLPKernel.supports(mlp_layers(4, 2, [8, 8]))
    assert MLPKernel.supports(mlp_layers(4, 2, []))  # a linear Q-function
    assert MLPKernel.supports(mlp_layers(4, 2, [8], dueling=True))
    assert MLPKernel.supports(mlp_layers(4, 2, [8], dueling=True, num_atoms=5, linear=linear_factory(True)))
    assert not MLPKernel.supports(mlp_layers(4, 2, [8], layer_norm=True))
    assert not MLPKernel.supports(mlp_layers(4, 2, [8], activation="tanh"))
    assert not MLPKernel.supports(mlp_layers(4, 2, [8])[:-1])  # ends in ReLU
    assert not MLPKernel.supports([torch.nn.Linear(4, 2, bias=False)])


@pytest.mark.parametrize("loss", ["huber", "mse"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rows", [64, 7, 0])
def test_gradient_loss_and_td_errors_equal_autograd(loss, weighted, rows):
    fast, ref = _pair(loss=loss)
    g = torch.Generator().manual_seed(rows)
    obs = torch.randn(rows, 5, generator=g) * 3
    actions = torch.randint(0, 3, (rows,), generator=g)
    targets = torch.randn(rows, generator=g) * 4  # |TD error| both below and above Huber's 1
    weights = torch.rand(rows, generator=g) / max(rows, 1) if weighted else None
    out = []
    for learner in (fast, ref):
        learner.flat_grad.fill_(7.0)  # stale values must be overwritten
        td = torch.zeros(rows)
        loss_value = learner.backward(obs, actions, targets, weights, td)
        out.append((learner.flat_grad.clone(), loss_value, td))
    (g_fast, l_fast, td_fast), (g_ref, l_ref, td_ref) = out
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(l_fast, l_ref, equal_nan=True)  # the mean over no rows is NaN in both
    torch.testing.assert_close(td_fast, td_ref)
    if rows:
        assert g_fast.abs().sum() > 0
    else:
        assert not g_fast.any()


def test_loss_grad_is_the_derivative_of_the_loss():
    q = torch.tensor([0.0, 0.5, 3.0, -2.0], requires_grad=True)
    y = torch.tensor([0.2, 0.0, 0.0, 0.0])
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for kind in ("huber", "mse"):
        for weights in (None, w):
            (auto,) = torch.autograd.grad(td_loss(q, y, kind, weights), q)
            torch.testing.assert_close(td_loss_grad(q.detach(), y, kind, weights), auto)


@pytest.mark.parametrize("dueling,noisy", [(False, False), (True, False), (True, True), (False, True)],
                         ids=["plain", "dueling", "noisy-dueling", "noisy"])
def test_rounds_of_updates_follow_autograd(dueling, noisy):
    """50 updates in rounds (double DQN, clipping, a hard target every 8, a prioritized round with TD
    errors): parameters, target network and metrics end where autograd's learner ends, for plain and
    dueling heads, noisy layers or not (new noise every update, from the same streams on both sides)."""
    fast, ref = _pair(hidden=(64, 64), dueling=dueling, noisy=noisy, max_grad_norm=1.0, target_update_interval=8,
                      double_dqn=True, noise_seed=3)
    rng = np.random.default_rng(0)

    def batch(rows):
        return Batch(rng.normal(size=(rows, 5)).astype(np.float32), rng.integers(3, size=rows),
                     rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32),
                     np.where(rng.random(rows) < 0.1, 0.0, 0.99).astype(np.float32))
    for _ in range(2):
        b = batch(20 * 16)
        assert fast.update_many(b, 20) is None and ref.update_many(b, 20) is None
    b = batch(10 * 16)
    plan = RoundPlan(np.full((10, 1), 16), (rng.random(160) / 16).astype(np.float32), td_errors=True)
    np.testing.assert_allclose(fast.update_many(b, 10, plan), ref.update_many(b, 10, plan), rtol=1e-5, atol=1e-6)
    assert fast.updates == ref.updates == 50
    for a, b in zip([*fast.online.parameters(), *fast.target.parameters()],
                    [*ref.online.parameters(), *ref.target.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    m_fast, m_ref = fast.pop_metrics(), ref.pop_metrics()
    assert m_fast.keys() == m_ref.keys()
    for k in m_fast:
        assert m_fast[k] == pytest.approx(m_ref[k], rel=1e-5)


def test_the_learner_takes_autograd_where_the_kernel_does_not_apply():
    def learner(layers, **kw):
        return Learner(torch.nn.Sequential(*layers), Hyper(sync_check_interval=0), MPI.COMM_SELF, **kw)
    assert learner(mlp_layers(4, 2, [8]))._kernel is not None
    assert learner(mlp_layers(4, 2, [8]), overlap=True)._kernel is None  # buckets hook autograd
    assert learner(mlp_layers(4, 2, [8], layer_norm=True))._kernel is None
    assert learner(mlp_layers(4, 2, [8]), mlp_kernel=False)._kernel is None


def test_a_training_run_is_the_same_with_and_without_the_kernel(tmp_path):
    """The real command at 1 rank: episodes, losses and evaluations equal with train.mlp_kernel on and off."""
    logs = []
    for on in ("true", "false"):
        run_dir = tmp_path / on
        p = mpidqn(1, ["train", "--run-dir", str(run_dir), *TINY, "eval.interval_steps=600",
                       f"train.mlp_kernel={on}"], timeout=300)
        assert p.returncode == 0, p.stderr
        logs.append(read_log(run_dir / "log.h5").tables)
    on, off = logs
    assert len(on["evaluations"]) == 2 and on["scalars"]["updates"][-1] > 0
    for table, column in (("evaluations", "mean"), ("scalars", "loss"), ("scalars", "q_mean"), ("episodes", "return"),
                          ("episodes", "step")):
        assert np.array_equal(on[table][column], off[table][column], equal_nan=True), (table, column)
