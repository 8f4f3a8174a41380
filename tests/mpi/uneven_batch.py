"""Run under mpiexec -n 3 [pipeline_stages]: a global batch the world does not divide (64 over 3 ranks:
22, 21, 21 rows, local uniform sampling through the trainer's RoundSampler) gives, update after update,
the reduced gradient and the parameters of one process doing the same updates on the same 64 rows with
the plain mean loss (issue #35)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpidqn.config import load_config, rows_per_rank
from mpidqn.distributed.topology import Topology
from mpidqn.envs.vector import shared_seed
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import ReplayShard
from mpidqn.train.sampling import RoundSampler

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
OBS, ACT, U = 5, 3, 3
HYPER = Hyper(lr=1e-2, double_dqn=True, max_grad_norm=None, sync_check_interval=1)
rows = rows_per_rank(load_config(None, ["train.batch_size=64"]).train, world)
assert sum(rows) == 64 and len(set(rows)) > 1, rows


def layers(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return mlp_layers(OBS, ACT, [16, 16], dueling=False)


rng = np.random.default_rng(100 + rank)
n = 30 + 7 * rank
shard = ReplayShard(64, (OBS,), np.float32, 1)
shard.extend({"obs": rng.normal(size=(n, OBS)).astype(np.float32), "actions": rng.integers(ACT, size=n),
              "rewards": rng.normal(size=n).astype(np.float32), "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
              "discounts": np.full(n, 0.9, np.float32)})
topo = Topology.build(comm, 1)
sampler = RoundSampler(SimpleNamespace(replay_sampling="local", prioritized=False), topo, shard, rows, shared_seed(7))
assert not sampler.plain and sampler.global_batch == 64
learner = Learner(nn.Sequential(*layers(rank)), HYPER, comm)  # rank 0's parameters are broadcast
ref = Learner(nn.Sequential(*layers(0)), Hyper(**{**HYPER.__dict__, "sync_check_interval": 0}), MPI.COMM_SELF)
seen: list[torch.Tensor] = []
step = learner.step
learner.step = lambda: (seen.append(learner.flat_grad.clone()), step())[1]
ref_seen: list[torch.Tensor] = []
ref_step = ref.step
ref.step = lambda: (ref_seen.append(ref.flat_grad.clone()), ref_step())[1]

batch, _, plan = sampler.draw(U, np.random.default_rng(rank), beta=0.0, td_errors=False)
assert len(batch.actions) == U * rows[rank] and plan.counts.shape == (U, 1)
learner.update_many(batch, U, plan)
parts = comm.allgather(batch)  # one process: update u takes every rank's u-th slice, in rank order
union = [np.concatenate([np.asarray(p[k]).reshape(U, rows[r], *np.shape(p[k])[1:])[u] for u in range(U)
                         for r, p in enumerate(parts)]) for k in range(5)]
ref.update_many(type(batch)(*union), U)  # equal slices of 64, the plain mean loss
for u in range(U):
    assert torch.allclose(seen[u], ref_seen[u], rtol=1e-4, atol=1e-6), (rank, u, (seen[u] - ref_seen[u]).abs().max())
for p, q in zip(learner.params, ref.params):
    assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (rank, (p - q).abs().max())
print(f"rank {rank}: OK")
