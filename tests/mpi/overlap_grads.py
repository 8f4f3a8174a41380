"""Run under mpiexec -n N: the overlapped bucketed reduction gives the fused Allreduce's gradients,
and replicas stay bit-identical over several updates (small buckets: several per backward). The
MinAtar CNN is built from its layer list (no environment needed)."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.nn.cnn import minatar_cnn_layers
from mpidqn.learners.data_parallel import Hyper, Learner

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
B, OBS, ACT = 8, (4, 10, 10), 5


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(*minatar_cnn_layers(OBS, ACT, dueling=True))


hyper = Hyper(lr=1e-3, double_dqn=True, max_grad_norm=10.0, sync_check_interval=1)
fused = Learner(net(), hyper, comm)
overlap = Learner(net(), hyper, comm, overlap=True, bucket_bytes=1024)
assert len(overlap.reducer.buckets) >= 3, overlap.reducer.buckets
rng = np.random.default_rng(rank)  # each rank its own minibatch
for it in range(4):
    obs = torch.from_numpy(rng.integers(0, 2, (B, *OBS)).astype(np.float32))
    nobs = torch.from_numpy(rng.integers(0, 2, (B, *OBS)).astype(np.float32))
    act = torch.from_numpy(rng.integers(ACT, size=B))
    rew = torch.from_numpy(rng.normal(size=B).astype(np.float32))
    disc = torch.full((B,), 0.99)
    for learner in (fused, overlap):
        learner.backward(obs, act, learner.targets(rew, nobs, disc))
        learner.reduce_gradients()
    assert torch.equal(fused.flat_grad, overlap.flat_grad), (
        rank, it, (fused.flat_grad - overlap.flat_grad).abs().max().item())
    fused.step()
    overlap.step()  # sync_check_interval=1: raises if replicas differ
    for p, q in zip(fused.params, overlap.params):
        assert torch.equal(p, q)
print(f"rank {rank}: overlap == fused over 4 updates, {len(overlap.reducer.buckets)} buckets")
