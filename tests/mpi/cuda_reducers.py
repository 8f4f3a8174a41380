"""Run under mpiexec -n 2 on a machine with a GPU: learners on cuda:0 (both ranks share it) with the
host-staged reduction and with overlapped buckets stay bit-identical across ranks, follow the CPU fused
learner within float tolerance, and a non-finite loss on one rank makes both skip the update."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.reducers import HostStagedReducer
from mpidqn.nn.mlp import mlp_layers

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
torch.set_num_threads(1)
B, OBS, ACT = 16, 6, 3


def make(device: str, overlap: bool = False) -> Learner:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*mlp_layers(OBS, ACT, [64, 64], dueling=True))
    hyper = Hyper(lr=1e-3, max_grad_norm=10.0, sync_check_interval=1)
    return Learner(net, hyper, comm, device, overlap=overlap, bucket_bytes=4096)


cpu, staged, bucket = make("cpu"), make("cuda:0"), make("cuda:0", overlap=True)
assert isinstance(staged.reducer, HostStagedReducer), type(staged.reducer)
assert len(bucket.reducer.buckets) >= 2, bucket.reducer.buckets
rng = np.random.default_rng(rank)  # each rank its own minibatch
for it in range(6):
    mb = [torch.from_numpy(rng.normal(size=(B, OBS)).astype(np.float32)), torch.from_numpy(rng.integers(ACT, size=B)),
          torch.from_numpy(rng.normal(size=B).astype(np.float32)),
          torch.from_numpy(rng.normal(size=(B, OBS)).astype(np.float32)), torch.full((B,), 0.99)]
    for learner in (cpu, staged, bucket):
        obs, act, rew, nobs, disc = (t.to(learner.device) if learner.device is not None else t for t in mb)
        targets = learner.targets(rew, nobs, disc)
        if it == 4 and rank == 1:
            targets[0] = float("nan")  # one rank's loss is NaN: every replica skips this update
        learner.backward(obs, act, targets)
        learner.reduce_gradients()
        learner.step()  # sync_check_interval=1: raises if the replicas differ
for learner in (cpu, staged, bucket):
    assert (learner.updates, learner.nonfinite_skipped) == (5, 1), (learner.updates, learner.nonfinite_skipped)
for gpu in (staged, bucket):
    for a, b in zip(cpu.params, gpu.params):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5)
    flat = torch.cat([p.detach().cpu().reshape(-1) for p in gpu.params]).numpy()
    other = comm.bcast(flat if rank == 0 else None)
    assert np.array_equal(flat, other), "replicas differ"
print(f"rank {rank}: cuda replicas identical", flush=True)
