"""Pipeline parallelism: parameter memory per rank vs S, bubble share vs micro-batches, S=2 vs pure dp.

    mpiexec -n 4 python benchmarks/pipeline.py --hidden 512 512 512 --batch 64 --updates 30

Run under mpiexec with W ranks (W even for the S=2 rows). Synthetic batches (no envs): every rank
samples ``--batch`` rows per update, as in training, so the global batch is W * batch everywhere.
  * memory: largest stage's parameters (and MiB incl. gradient, Adam moments and target) for S = 1, 2, 4, 8
    on the balanced partition (pure arithmetic, no MPI).
  * bubble: share of wall time the stages of a W-stage pipeline spend blocked waiting for activations
    or their gradients, for 1, 2, 4, 8 micro-batches (GPipe theory: (S-1)/(M+S-1), plus transfers).
  * throughput: updates/s of pure data parallelism (S=1) and of S=2 pipelines at the same world size.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.distributed.pipeline import layer_costs, partition_layers
from mpidqn.learners.pipeline import BYTES_PER_PARAM, PipelineLearner
from mpidqn.replay.shard import Batch
from mpidqn.distributed.topology import Topology

OBS, ACT = 8, 4


def layers(hidden: list[int]) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return mlp_layers(OBS, ACT, hidden, dueling=True)


def batch(rows: int, rng: np.random.Generator) -> Batch:
    return Batch(rng.normal(size=(rows, OBS)).astype(np.float32), rng.integers(ACT, size=rows),
                 rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, OBS)).astype(np.float32),
                 np.full(rows, 0.99, np.float32))


def _link_wait(learner) -> float:
    """Seconds a pipeline stage spent blocked on its neighbours (0 for a data-parallel learner)."""
    link = getattr(learner, "link", None)
    return link.wait_seconds if link is not None else 0.0


def timed_updates(learner, b: Batch, updates: int, comm) -> tuple[float, float]:
    """(wall seconds of `updates` updates, this rank's seconds blocked on the pipeline)."""
    learner.update_many(b, 2)  # warm-up
    wait0 = _link_wait(learner)
    comm.Barrier()
    t0 = time.perf_counter()
    learner.update_many(b, updates)
    comm.Barrier()
    return time.perf_counter() - t0, _link_wait(learner) - wait0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512, 512])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--updates", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    world, root = comm.Get_size(), comm.Get_rank() == 0
    say = print if root else (lambda *a, **k: None)
    hyper = Hyper(lr=1e-4, double_dqn=True, target_update_interval=100, sync_check_interval=0)
    rng = np.random.default_rng(comm.Get_rank())
    b = batch(args.updates * args.batch, rng)
    costs = layer_costs(layers(args.hidden))
    total = int(sum(c for c in costs if c >= 1))
    say(f"# world {world}, MLP {OBS}-{'-'.join(map(str, args.hidden))}-{ACT} (dueling), {total:,} parameters, "
        f"batch {args.batch}/rank, {args.updates} updates, double DQN")
    say("\n## parameter memory of the largest stage (per rank)")
    say("| S | layers per stage | max stage parameters | MiB incl. grad+Adam+target | share of full |")
    say("|---|---|---|---|---|")
    for s in (1, 2, 4, 8):
        if s > len(costs):
            continue
        ranges = partition_layers(costs, s)
        sizes = [int(sum(c for c in costs[a:b] if c >= 1)) for a, b in ranges]
        say(f"| {s} | {' '.join(f'{a}..{b - 1}' for a, b in ranges)} | {max(sizes):,} | "
            f"{max(sizes) * BYTES_PER_PARAM / 2**20:.1f} | {max(sizes) / total:.0%} |")

    say(f"\n## pipeline bubble, S={world} (one group)")
    say("| micro-batches | updates/s | blocked share per stage (measured) | GPipe bubble theory |")
    say("|---|---|---|---|")
    topo = Topology.build(comm, world)
    for m in (1, 2, 4, 8):
        learner = PipelineLearner(layers(args.hidden), (OBS,), hyper, topo.pp_comm, topo.dp_comm, micro_batches=m)
        wall, wait = timed_updates(learner, b, args.updates, comm)
        shares = comm.gather(wait / wall, root=0)
        if root:
            say(f"| {m} | {args.updates / wall:.1f} | {' '.join(f'{x:.0%}' for x in shares)} | "
                f"{(world - 1) / (m + world - 1):.0%} |")

    say(f"\n## throughput at world {world}: pure dp vs S=2 pipelines (global batch {world * args.batch})")
    say("| layout | updates/s | samples/s |")
    say("|---|---|---|")
    for s in (1, 2):
        if world % s:
            continue
        topo = Topology.build(comm, s)
        if s == 1:
            torch.manual_seed(0)
            learner = Learner(torch.nn.Sequential(*layers(args.hidden)), hyper, topo.dp_comm)
        else:
            learner = PipelineLearner(layers(args.hidden), (OBS,), hyper, topo.pp_comm, topo.dp_comm, micro_batches=4)
        wall, _ = timed_updates(learner, b, args.updates, comm)
        say(f"| dp {topo.dp} x pipeline {s} | {args.updates / wall:.1f} | {args.updates * world * args.batch / wall:,.0f} |")


if __name__ == "__main__":
    main()
