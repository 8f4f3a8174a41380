"""The CUDA path of the data-parallel learner: its updates follow the CPU learner's, every reduction
strategy keeps replicas on one GPU identical, and a real run on the GPU checkpoints and resumes on the
CPU. These need a GPU that torch can see; on a CPU-only machine (CI) they are skipped, and docs/gpu.md
says where they last ran."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MPI_SCRIPTS, TINY, mpirun
from mpi4py import MPI

from mpidqn.learners.base import RoundPlan
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.cnn import minatar_cnn_layers
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import Batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch can see")


def _batch(rng: np.random.Generator, rows: int, obs_shape: tuple[int, ...], n_actions: int, uint8: bool) -> Batch:
    def obs():
        return (rng.integers(0, 2, size=(rows, *obs_shape), dtype=np.uint8) if uint8
                else rng.normal(size=(rows, *obs_shape)).astype(np.float32))
    return Batch(obs(), rng.integers(n_actions, size=rows), rng.normal(size=rows).astype(np.float32), obs(),
                 np.where(rng.random(rows) < 0.1, 0.0, 0.97).astype(np.float32))


@pytest.mark.parametrize("net", ["mlp", "minatar_cnn"])
def test_cuda_learner_follows_the_cpu_learner(net):
    """Same initial weights and batches: 24 updates (double DQN, Adam, clipping, hard target every 4, a
    prioritized plan with loss weights and TD errors) on cuda:0 end where the CPU learner ends."""
    obs_shape, n_actions, uint8 = ((6,), 3, False) if net == "mlp" else ((10, 10, 4), 6, True)

    def make(device: str) -> Learner:
        torch.manual_seed(0)
        layers = mlp_layers(6, 3, [64, 64]) if net == "mlp" else minatar_cnn_layers(obs_shape, n_actions)
        hyper = Hyper(lr=1e-3, max_grad_norm=1.0, target_update_interval=4, sync_check_interval=0)
        return Learner(torch.nn.Sequential(*layers), hyper, MPI.COMM_SELF, device)

    cpu, gpu = make("cpu"), make("cuda:0")
    assert gpu.device == torch.device("cuda:0") and all(p.is_cuda for p in gpu.online.parameters())
    assert gpu._device_skip and gpu._staging is not None  # the GPU defaults: nothing read back per update
    rng = np.random.default_rng(0)
    for it in range(3):
        batch = _batch(rng, 8 * 32, obs_shape, n_actions, uint8)
        if it < 2:
            for learner in (cpu, gpu):
                assert learner.update_many(batch, 8) is None
        else:  # prioritized: 8 updates of 32 rows with importance weights, TD errors back on the host
            plan = RoundPlan(np.full((8, 1), 32), (rng.random(256) / 32).astype(np.float32), td_errors=True)
            td_cpu, td_gpu = cpu.update_many(batch, 8, plan), gpu.update_many(batch, 8, plan)
            assert isinstance(td_gpu, np.ndarray) and td_gpu.shape == (256,)
            np.testing.assert_allclose(td_gpu, td_cpu, rtol=1e-3, atol=1e-4)
    assert cpu.updates == gpu.updates == 24
    for name, a, b in zip(cpu.param_names, cpu.params, gpu.params):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-3, atol=1e-4, msg=name)
    obs = _batch(rng, 16, obs_shape, n_actions, uint8).obs
    agree = (cpu.greedy_actions(obs) == gpu.greedy_actions(obs)).mean()
    assert agree >= 0.9, agree
    state = gpu.state_dict()  # checkpoints hold CPU tensors, whatever the device
    assert all(not t.is_cuda for t in [*state["online"].values(), *state["target"].values()])
    cpu2 = make("cpu")
    cpu2.load_state_dict(state)
    for a, b in zip(cpu2.params, gpu.params):
        assert torch.equal(a.detach(), b.detach().cpu())


def test_a_skipped_update_inside_a_round_on_the_gpu_matches_the_cpu_device_skip_learner():
    """An infinite target in the middle of a round: the GPU learner skips that update on the device
    and takes the others, like the CPU learner with device_skip forced (tests/learners/test_device_skip.py
    checks that one against the host-decided learner)."""
    def make(device: str) -> Learner:
        torch.manual_seed(0)
        hyper = Hyper(lr=1e-3, max_grad_norm=1.0, target_update_interval=4, sync_check_interval=0, ema_decay=0.9)
        return Learner(torch.nn.Sequential(*mlp_layers(6, 3, [64, 64])), hyper, MPI.COMM_SELF, device,
                       device_skip=True)

    cpu, gpu = make("cpu"), make("cuda:0")
    rng = np.random.default_rng(3)
    for it in range(3):
        batch = _batch(rng, 8 * 32, (6,), 3, False)
        if it == 1:
            batch.rewards[3 * 32] = np.inf  # the fourth update of the round
        for learner in (cpu, gpu):
            learner.update_many(batch, 8)
    assert (gpu.updates, gpu.nonfinite_skipped) == (cpu.updates, cpu.nonfinite_skipped) == (23, 1)
    for name, a, b in zip(cpu.param_names, cpu.params, gpu.params):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-3, atol=1e-4, msg=name)
    for a, b in zip(cpu.ema, gpu.ema):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4)
    assert np.isfinite(gpu.pop_metrics()["loss"])


def test_pinned_staging_delivers_every_round_while_copies_are_in_flight():
    """Rounds queued back to back (no synchronisation between them) with varying rows and dtypes arrive
    intact: a set of pinned buffers is not rewritten while its copy may still read it."""
    from mpidqn.learners.data_parallel import PinnedStaging

    staging = PinnedStaging(torch.device("cuda:0"))
    rng = np.random.default_rng(4)
    sent, got = [], []
    for rows in (256, 256, 64, 512, 512, 0, 128):
        arrays = [rng.integers(0, 255, size=(rows, 4, 84, 84), dtype=np.uint8), rng.integers(6, size=rows),
                  rng.normal(size=rows).astype(np.float32)]
        sent.append([a.copy() for a in arrays])
        got.append(staging.to_device(arrays))
        for a in arrays:
            a[...] = 0  # the caller may reuse its arrays at once
    torch.cuda.synchronize()
    for s, g in zip(sent, got):
        for a, t in zip(s, g):
            assert t.is_cuda and np.array_equal(t.cpu().numpy(), a)


@pytest.mark.mpi
def test_every_reduction_keeps_replicas_on_the_gpu_identical_at_two_ranks():
    p = mpirun(2, [str(MPI_SCRIPTS / "cuda_reducers.py")], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("cuda replicas identical") == 2, p.stdout


@pytest.mark.mpi
def test_a_run_on_the_gpu_checkpoints_and_resumes_on_the_cpu(tmp_path):
    run_dir = tmp_path / "run"
    p = mpirun(2, ["-m", "mpidqn", "train", "--run-dir", str(run_dir), "train.device=cuda", *TINY], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cuda:0" in p.stdout + p.stderr, p.stdout + p.stderr
    p = mpirun(1, ["-m", "mpidqn", "train", "--run-dir", str(run_dir), "--resume", "train.device=cpu",
                   *TINY, "train.total_steps=1600"], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    p = mpirun(1, ["-m", "mpidqn", "evaluate", str(run_dir)], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
