"""Run under mpiexec -n 2: every gradient reduction strategy gives the fused Allreduce's gradient
(bit for bit) and keeps replicas identical; and when ONE rank's loss is non-finite (NaN, or Inf with
a finite gradient), every strategy makes every rank agree to skip the update (or to stop). "device_skip"
is the fused Allreduce with skip-or-take decided on the device (a GPU learner's default, forced here)."""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.errors import NonFiniteError
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.reducers import BucketReducer, HostStagedReducer, PipelineStageReducer
from mpidqn.nn.mlp import mlp_layers
from mpidqn.train.faults import poison_loss

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
B, OBS, ACT = 8, 6, 3


def make(strategy: str, nonfinite: str = "skip") -> Learner:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*mlp_layers(OBS, ACT, [32, 32], dueling=True))
    hyper = Hyper(lr=1e-3, max_grad_norm=10.0, sync_check_interval=1, nonfinite=nonfinite)
    # autograd's gradient on every path (the overlapped reducer needs autograd's hooks): bit for bit
    learner = Learner(net, hyper, comm, overlap=strategy == "bucket", bucket_bytes=512,
                      device_skip=strategy == "device_skip", mlp_kernel=False)
    if strategy == "bucket_staged":
        learner.reducer = BucketReducer(learner.flat_grad, learner.params, comm, 512, staged=True)
    elif strategy == "host_staged":
        learner.reducer = HostStagedReducer(learner.flat_grad, comm)
    elif strategy == "pipeline_stage":  # one stage: the group is this rank alone
        learner.reducer = PipelineStageReducer(learner.flat_grad, comm, MPI.COMM_SELF)
    return learner


STRATEGIES = ["bucket", "bucket_staged", "host_staged", "pipeline_stage", "device_skip"]
rng = np.random.default_rng(rank)  # each rank its own minibatch


def minibatch():
    return (torch.from_numpy(rng.normal(size=(B, OBS)).astype(np.float32)), torch.from_numpy(rng.integers(ACT, size=B)),
            torch.from_numpy(rng.normal(size=B).astype(np.float32)),
            torch.from_numpy(rng.normal(size=(B, OBS)).astype(np.float32)), torch.full((B,), 0.99))


def update(learner, obs, act, rew, nobs, disc, inf_target=False):
    targets = learner.targets(rew, nobs, disc)
    if inf_target:
        targets[0] = float("inf")  # Huber: infinite loss, finite gradient
    learner.backward(obs, act, targets)
    learner.reduce_gradients()


fused = make("fused")
others = {s: make(s) for s in STRATEGIES}
assert len(others["bucket"].reducer.buckets) >= 3, others["bucket"].reducer.buckets
for it in range(3):
    mb = minibatch()
    for learner in (fused, *others.values()):
        update(learner, *mb)
    for name, learner in others.items():
        assert torch.equal(fused.flat_grad, learner.flat_grad), (rank, it, name)
    for learner in (fused, *others.values()):
        learner.step()  # sync_check_interval=1: raises if replicas differ
    for name, learner in others.items():
        assert all(torch.equal(p, q) for p, q in zip(fused.params, learner.params)), (rank, it, name)
print(f"rank {rank}: every strategy == fused")

for fault in ("nan", "inf"):
    for name, learner in {"fused": fused, **others}.items():
        before = [p.clone() for p in learner.params]
        skipped, updates = learner.nonfinite_skipped, learner.updates
        hook = poison_loss(learner) if fault == "nan" and rank == 1 else None
        update(learner, *minibatch(), inf_target=fault == "inf" and rank == 1)
        if hook is not None:
            hook.remove()
        assert not np.isfinite(learner.reducer.grad_norm()), (rank, name, fault)
        learner.step()
        assert (learner.nonfinite_skipped, learner.updates) == (skipped + 1, updates), (rank, name, fault)
        assert all(torch.equal(p, q) for p, q in zip(before, learner.params)), (rank, name, fault)
        update(learner, *minibatch())  # the next update is taken again, replicas identical
        learner.step()
        learner.check_replicas()
        assert learner.updates == updates + 1, (rank, name, fault)
print(f"rank {rank}: every strategy agrees to skip")

for name in ["fused", *STRATEGIES]:
    if name == "device_skip":  # train.nonfinite=stop decides on the host (device_skip refuses it)
        continue
    learner = make(name, nonfinite="stop")
    hook = poison_loss(learner) if rank == 1 else None
    update(learner, *minibatch())
    if hook is not None:
        hook.remove()
    try:
        learner.step()
        raise SystemExit(f"{name}: no NonFiniteError")
    except NonFiniteError as e:
        assert "non-finite loss on rank(s) [1]" in str(e), (name, str(e))
print(f"rank {rank}: every strategy agrees to stop")
