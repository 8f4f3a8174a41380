"""Run under mpiexec -n N: C51 and QR-DQN (dueling, double DQN) with noisy layers and prioritized-style loss weights,
data parallel with the fused and the overlapped (bucket) reducer, takes the same updates as ONE process on
the union of the N minibatches: the same parameters after every round (hence the same averaged, clipped
gradient), the same per-row losses (priorities), and replicas bit-identical after every update
(sync_check_interval=1 raises otherwise): the noise of an update is the same on every replica."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.algo.categorical import Categorical
from mpidqn.algo.quantile import Quantile
from mpidqn.learners.base import RoundPlan
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import linear_factory, mlp_layers
from mpidqn.replay.shard import Batch

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
B, OBS, ACT, U = 6, 5, 3, 2


def make(comm_, seed, overlap, head):
    torch.manual_seed(seed)  # different per rank: the broadcast must fix it
    net = torch.nn.Sequential(*mlp_layers(OBS, ACT, [16, 16], dueling=True, num_atoms=21, linear=linear_factory(True)))
    hyper = Hyper(lr=1e-2, double_dqn=True, max_grad_norm=0.5, target_update_interval=3, sync_check_interval=1,
                  distribution=head, noise_seed=11)
    return Learner(net, hyper, comm_, overlap=overlap, bucket_bytes=2048)


for head, overlap in [(h, o) for h in (Categorical(21, -4.0, 4.0), Quantile(21, 0.7)) for o in (False, True)]:
    learner, reference = make(comm, rank, overlap, head), make(MPI.COMM_SELF, 0, overlap, head)
    rng = np.random.default_rng(123)  # the same global rounds on every rank
    for it in range(3):
        rows = U * world * B
        full = Batch(rng.normal(size=(rows, OBS)).astype(np.float32), rng.integers(ACT, size=rows),
                     rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, OBS)).astype(np.float32),
                     np.where(rng.random(rows) < 0.2, 0.0, 0.99 ** 3).astype(np.float32))
        weights = (rng.random(rows) / (world * B)).astype(np.float32)
        # rank r brings rows r*B..(r+1)*B of every update u; its weights carry the dp factor (see RoundPlan)
        mine = np.concatenate([np.arange(u * world * B + rank * B, u * world * B + (rank + 1) * B) for u in range(U)])
        part = Batch(*(a[mine] for a in full))
        ce = learner.update_many(part, U, RoundPlan(np.full((U, 1), B), weights[mine] * world, td_errors=True))
        ce_ref = reference.update_many(full, U, RoundPlan(np.full((U, 1), world * B), weights, td_errors=True))
        np.testing.assert_allclose(ce, ce_ref[mine], rtol=1e-5, atol=1e-6)
        for name, p, q in zip(learner.param_names, learner.params, reference.params):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), (rank, head, overlap, it, name, (p - q).abs().max().item())
    assert learner.updates == 3 * U
print(f"rank {rank}: OK")
