"""Run under mpiexec -n N: the gradient averaged over N replicas equals the gradient of one process
on the union of the N minibatches; after the same steps all replicas hold bit-identical parameters."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.errors import ReplicaDivergenceError
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
B, OBS, ACT = 16, 6, 3


def make(comm_, seed):
    torch.manual_seed(seed)  # deliberately different per rank: the broadcast must fix it
    return Learner(torch.nn.Sequential(*mlp_layers(OBS, ACT, [32, 32], dueling=True)),
                   Hyper(lr=1e-2, double_dqn=True, max_grad_norm=None, sync_check_interval=1), comm_)


rng = np.random.default_rng(123)  # the same global batch on every rank
obs = torch.from_numpy(rng.normal(size=(world * B, OBS)).astype(np.float32))
nobs = torch.from_numpy(rng.normal(size=(world * B, OBS)).astype(np.float32))
act = torch.from_numpy(rng.integers(ACT, size=world * B))
rew = torch.from_numpy(rng.normal(size=world * B).astype(np.float32))
disc = torch.from_numpy((rng.random(world * B) > 0.2).astype(np.float32) * 0.99)

learner = make(comm, seed=rank)
reference = make(MPI.COMM_SELF, seed=0)  # rank 0's initial parameters = what was broadcast
mine = slice(rank * B, (rank + 1) * B)
for it in range(3):
    learner.backward(obs[mine], act[mine], learner.targets(rew[mine], nobs[mine], disc[mine]))
    learner.reduce_gradients()
    reference.backward(obs, act, reference.targets(rew, nobs, disc))
    assert torch.allclose(learner.flat_grad, reference.flat_grad, rtol=1e-5, atol=1e-6), (
        rank, it, (learner.flat_grad - reference.flat_grad).abs().max().item())
    learner.step()  # sync_check_interval=1: raises if replicas are not bit-identical
    reference.step()
    obs, nobs = obs.roll(1, 0), nobs.roll(1, 0)

# The periodic check must notice a replica that differs, and name the tensor.
if rank == world - 1:
    with torch.no_grad():
        learner.params[2].add_(1e-7)
try:
    learner.check_replicas()
    raise SystemExit("divergence not detected")
except ReplicaDivergenceError as e:
    assert f"parameter {learner.param_names[2]!r} differs" in str(e), str(e)
print(f"rank {rank}: OK")
