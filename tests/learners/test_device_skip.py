"""Skip-or-take decided on the device (``device_skip``, the default of a GPU learner): the updates, the
counts, the moving average, the targets and the metrics are those of the learner that reads the loss
and the gradient norm back every update. Forced on the CPU here, so CI checks it without a GPU
(tests/learners/test_cuda.py checks it on one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpidqn.learners.base import RoundPlan
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.cnn import minatar_cnn_layers
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import Batch


def _pair(net: str, **hyper) -> tuple[Learner, Learner]:
    """The host-decided learner and the device-skip learner, from the same initial weights."""
    def make(device_skip: bool) -> Learner:
        torch.manual_seed(0)
        layers = mlp_layers(6, 3, [32, 32]) if net == "mlp" else minatar_cnn_layers((10, 10, 4), 3)
        h = Hyper(**{"lr": 1e-2, "max_grad_norm": 0.5, "target_update_interval": 4, "sync_check_interval": 0,
                     **hyper})
        return Learner(torch.nn.Sequential(*layers), h, MPI.COMM_SELF, device_skip=device_skip)
    return make(False), make(True)


def _batch(rng: np.random.Generator, rows: int, net: str) -> Batch:
    def obs():
        return (rng.normal(size=(rows, 6)).astype(np.float32) if net == "mlp"
                else rng.integers(0, 2, size=(rows, 10, 10, 4), dtype=np.uint8))
    return Batch(obs(), rng.integers(3, size=rows), rng.normal(size=rows).astype(np.float32), obs(),
                 np.where(rng.random(rows) < 0.1, 0.0, 0.97).astype(np.float32))


def _same(a: Learner, b: Learner) -> None:
    for name, x, y in zip(a.param_names, a.params, b.params):
        assert torch.equal(x, y), name
    for x, y in zip(a.target.parameters(), b.target.parameters()):
        assert torch.equal(x, y)
    for x, y in zip(a.ema or [], b.ema or []):
        assert torch.equal(x, y)
    assert (a.updates, a.nonfinite_skipped) == (b.updates, b.nonfinite_skipped)


@pytest.mark.parametrize("net,hyper", [
    ("mlp", {}),  # the MLP kernel's gradient, hard targets batched per refresh
    ("mlp", {"double_dqn": False, "ema_decay": 0.9}),
    ("minatar_cnn", {"tau": 0.05, "ema_decay": 0.5}),  # autograd, Polyak targets
])
def test_rounds_of_updates_are_those_of_the_host_decided_learner_bit_for_bit(net, hyper):
    host, device = _pair(net, **hyper)
    assert device._device_skip and not host._device_skip
    rng = np.random.default_rng(0)
    for it in range(4):
        batch = _batch(rng, 6 * 16, net)
        if it < 3:
            for learner in (host, device):
                learner.update_many(batch, 6)
        else:  # prioritized: loss weights and TD errors
            plan = RoundPlan(np.full((6, 1), 16), (rng.random(96) / 16).astype(np.float32), td_errors=True)
            np.testing.assert_array_equal(host.update_many(batch, 6, plan), device.update_many(batch, 6, plan))
    _same(host, device)
    assert device.updates == 24
    assert host.pop_metrics() == device.pop_metrics()


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_a_nonfinite_update_is_skipped_and_counted_as_the_host_decided_learner_does(fault):
    """NaN in the forward, or an infinite target (a Huber loss with a finite gradient): the update is
    skipped (parameters, Adam's moments and step count, the average unchanged), counted, left out of
    the loss and Q metrics, and the next update is taken again."""
    host, device = _pair("mlp", ema_decay=0.5, target_update_interval=4)  # a refresh after the skip
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(5, 16, 6)).astype(np.float32))
    for i in range(5):
        for learner in (host, device):
            targets = learner.targets(torch.ones(16), x[i], torch.full((16,), 0.9))
            if i == 2:
                targets[0] = float("nan") if fault == "nan" else float("inf")
            loss = learner.backward(x[i], torch.zeros(16, dtype=torch.long), targets)
            learner.reduce_gradients()
            learner.step()
            learner._losses.append(loss)  # what _learn does (a non-finite loss is left out at the fold)
        _same(host, device)
        assert device._pending == []  # _same read the counts
    assert (device.updates, device.nonfinite_skipped) == (4, 1)
    steps = {float(device.optimizer.state[p]["step"]) for p in device.params}
    assert steps == {4.0}
    assert host.pop_metrics() == pytest.approx(device.pop_metrics(), rel=1e-6)


def test_counts_are_read_back_at_the_next_round_and_a_skipped_round_update_is_not_taken():
    """Inside a round nothing is read back; the next round (or a read of the counts) reads the skip flags."""
    _, device = _pair("mlp")
    rng = np.random.default_rng(2)
    device.update_many(_batch(rng, 4 * 16, "mlp"), 4)
    assert len(device._pending) == 4
    bad = _batch(rng, 4 * 16, "mlp")
    bad.rewards[16] = np.inf  # the second update of this round: an infinite target
    before = [p.clone() for p in device.params]
    device.update_many(bad, 4)
    assert len(device._pending) == 4  # the first round's flags were read when this one started
    assert device._updates == 4
    assert (device.updates, device.nonfinite_skipped) == (7, 1)
    assert all(torch.isfinite(p).all() for p in device.params)
    assert not all(torch.equal(a, b) for a, b in zip(before, device.params))  # the other three were taken
    # the documented difference: the round counted its 4 steps as taken, so the target (every 4) was
    # refreshed at its last step, after 7 updates taken instead of 8
    assert all(torch.equal(t, p) for t, p in zip(device.target.parameters(), device.params))
    metrics = device.pop_metrics()
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["q_mean"]) and metrics["nonfinite_skipped"] == 1


def test_device_skip_is_refused_where_it_cannot_decide_alone():
    net = torch.nn.Sequential(*mlp_layers(6, 3, [8]))
    for hyper, overlap in ((Hyper(nonfinite="stop"), False), (Hyper(optimizer="rmsprop"), False), (Hyper(), True)):
        with pytest.raises(ValueError, match="device_skip"):
            Learner(net, hyper, MPI.COMM_SELF, overlap=overlap, device_skip=True)
        assert not Learner(net, hyper, MPI.COMM_SELF, overlap=overlap)._device_skip  # the CPU default: off
