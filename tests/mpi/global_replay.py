"""Run under mpiexec -n N [pipeline_stages]: exact global replay over unequal shards.

Every rank holds a shard of a different size with different priorities. Through the trainer's
RoundSampler (global mode) this checks, against ONE process holding the union of the shards:

1. the importance weights of the drawn rows equal the single buffer's (global size and minimum);
2. the gradient reduced over the replicas (data parallel, or a pipeline gathering uneven counts) equals
   the single-process gradient of the same global batch with the same weights, also when a rank drew
   no row at all, and the |TD errors| each rank gets back are those of its own rows;
3. a round of several uniform updates with uneven per-update counts ends in the parameters of a single
   process doing the same updates on the same global batches, and logs its loss and mean Q(s, a);
4. the global sampling frequencies match p^alpha / sum over ALL shards (chi-square, fixed seeds).
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import torch
from mpi4py import MPI
from scipy import stats
from torch import nn

from mpidqn.distributed.topology import Topology
from mpidqn.envs.vector import shared_seed
from mpidqn.learners.base import RoundPlan
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.pipeline import PipelineLearner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.priority import Priorities, importance_weights
from mpidqn.replay.shard import ReplayShard
from mpidqn.train.sampling import RoundSampler

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
S = int(sys.argv[1]) if len(sys.argv) > 1 else 1
topo = Topology.build(comm, S)
torch.set_num_threads(1)
OBS, ACT, ALPHA, EPS, BETA = 5, 3, 0.7, 1e-3, 0.5
B = 4  # per rank: the global batch is world * B
SIZES = [3, 40, 17, 25][:world]  # deliberately unequal shards
HYPER = Hyper(lr=1e-2, double_dqn=True, max_grad_norm=None, sync_check_interval=1)


def layers(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return mlp_layers(OBS, ACT, [16, 16], dueling=False)


def make_learner() -> Learner | PipelineLearner:
    if S == 1:
        return Learner(nn.Sequential(*layers(rank)), HYPER, comm)  # rank 0's parameters are broadcast
    # a pipeline stage's parameters are not broadcast across stages: every stage builds rank 0's net
    return PipelineLearner(layers(0), (OBS,), HYPER, topo.pp_comm, topo.dp_comm, micro_batches=2)


def make_shard(prioritized: bool) -> ReplayShard:
    rng = np.random.default_rng(100 + rank)
    n = SIZES[rank]
    shard = ReplayShard(64, (OBS,), np.float32, 1, priority=(ALPHA, EPS) if prioritized else None)
    shard.extend({"obs": rng.normal(size=(n, OBS)).astype(np.float32), "actions": rng.integers(ACT, size=n),
                  "rewards": rng.normal(size=n).astype(np.float32),
                  "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
                  "discounts": np.full(n, 0.9, np.float32)})
    if prioritized:  # rank 0's rows get tiny priorities, so its count is often 0
        scale = 1e-3 if rank == 0 else 1.0
        shard.update_priorities(np.arange(n), rng.exponential(scale, size=n))
    return shard


def sampler_for(shard: ReplayShard, prioritized: bool) -> RoundSampler:
    train = SimpleNamespace(replay_sampling="global", prioritized=prioritized)
    return RoundSampler(train, topo, shard, B, shared_seed(7))


def union_batch(batch, weights: np.ndarray):
    """Every rank's rows and weights in world-rank order (what one process would hold)."""
    parts = comm.allgather((batch, weights))
    cat = [np.concatenate([np.asarray(p[0][k]) for p in parts]) for k in range(5)]
    return cat, np.concatenate([p[1] for p in parts]), [len(p[1]) for p in parts]


def capture_reduced(learner) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    step = learner.step

    def record() -> None:
        seen.append(learner.flat_grad.clone())
        step()
    learner.step = record
    return seen


def reference_learner() -> Learner:
    return Learner(nn.Sequential(*layers(0)), Hyper(**{**HYPER.__dict__, "sync_check_interval": 0}), MPI.COMM_SELF)


def stage_slice(ref: Learner, names: list[str]) -> torch.Tensor:
    grads = dict(zip(ref.param_names, (p.grad for p in ref.params)))
    return torch.cat([grads[n].reshape(-1) for n in names]) if names else torch.zeros(0)


# ---------------------------------------------------------------- 1 + 2: prioritized, one update at a time
shard = make_shard(prioritized=True)
sampler = sampler_for(shard, prioritized=True)
learner = make_learner()
ref = reference_learner()
reduced = capture_reduced(learner)
union_p = np.concatenate(comm.allgather(shard.priorities.p[:SIZES[rank]]))
offsets = np.concatenate([[0], np.cumsum(SIZES)])
one = Priorities(len(union_p), ALPHA, EPS)
one.written(np.arange(len(union_p)), union_p)
zero_seen = False
rng = np.random.default_rng(rank)
for it in range(12):
    batch, slots, plan = sampler.draw(1, rng, BETA, td_errors=True)
    # 1. importance weights of one buffer over the union
    drawn = offsets[rank] + slots
    expected = importance_weights(one.masses(drawn), [one.shard_mass(len(union_p))], BETA)
    np.testing.assert_allclose(plan.weights / sampler.scale, expected, rtol=1e-5)
    counts = comm.allgather(len(slots))
    zero_seen |= min(counts) == 0
    # 2. the reduced gradient equals one process's on the same global batch
    cat, w, sizes = union_batch(batch, plan.weights)
    td = learner.update_many(batch, 1, plan)
    t = [torch.from_numpy(a) for a in cat]
    targets = ref.targets(t[2], t[3], t[4])
    ref_td = torch.zeros(len(w))
    ref.backward(t[0], t[1], targets, torch.from_numpy(w / topo.dp), ref_td)  # 1 / global batch each
    want = ref.flat_grad if S == 1 else stage_slice(ref, learner.param_names)
    assert torch.allclose(reduced[-1], want, rtol=1e-4, atol=1e-6), (rank, it, (reduced[-1] - want).abs().max())
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    np.testing.assert_allclose(td, ref_td.numpy()[mine], rtol=1e-5, atol=1e-6)
    ref.step()
    shard.update_priorities(slots, td)
    union_p = np.concatenate(comm.allgather(shard.priorities.p[:SIZES[rank]]))
    one.written(np.arange(len(union_p)), union_p)
assert comm.allreduce(zero_seen, MPI.LOR), "no rank ever drew 0 rows: the uneven case was not exercised"

# ---------------------------------------------------------------- 3: a uniform round of 3 updates
shard = make_shard(prioritized=False)
sampler = sampler_for(shard, prioritized=False)
learner, ref = make_learner(), reference_learner()
U = 3
batch, slots, plan = sampler.draw(U, np.random.default_rng(50 + rank), 0.0, td_errors=False)
all_counts = np.stack(comm.allgather(plan.counts[:, topo.stage]), axis=1)  # (U, world)
cat, w, sizes = union_batch(batch, plan.weights)
learner.update_many(batch, U, plan)
# one process takes update u's rows of every rank, update-major
starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
order = np.concatenate([starts[r] + np.arange(all_counts[:u, r].sum(), all_counts[:u + 1, r].sum())
                        for u in range(U) for r in range(world)])
rows = [a[order] for a in cat]
ref.update_many(type(batch)(*rows), U, RoundPlan(all_counts.sum(axis=1, keepdims=True), w[order] / topo.dp))
ref_params = dict(zip(ref.param_names, ref.params))
for name, p in zip(learner.param_names, learner.params):
    assert torch.allclose(p, ref_params[name], rtol=1e-4, atol=1e-6), (rank, name, (p - ref_params[name]).abs().max())
# the logged loss and Q(s, a) are the single buffer's, although a rank drew no row of some update (issue #35)
assert (all_counts == 0).any(), all_counts
got, want = learner.pop_metrics(), ref.pop_metrics()
assert np.isclose(got["q_mean"], want["q_mean"], rtol=1e-5, atol=1e-7), (rank, got, want)
assert np.isclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-7), (rank, got, want)

# ---------------------------------------------------------------- 4: frequencies over all shards
shard = make_shard(prioritized=True)
sampler = sampler_for(shard, prioritized=True)
freq = np.zeros(SIZES[rank])
rng = np.random.default_rng(900 + rank)
for _ in range(3000):
    _, slots, _ = sampler.draw(1, rng, BETA, td_errors=False)
    np.add.at(freq, slots, 1)
freq = np.concatenate(comm.allgather(freq))
p = np.concatenate(comm.allgather(shard.priorities.p[:SIZES[rank]])) ** ALPHA
pvalue = stats.chisquare(freq, p / p.sum() * freq.sum()).pvalue
assert pvalue > 1e-3, pvalue
print(f"rank {rank}: OK")
