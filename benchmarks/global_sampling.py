"""Cost of global against local replay sampling, uniform and prioritized, at 2 ranks.

    mpiexec -n 2 python benchmarks/global_sampling.py [--capacity 500000] [--batch 64 256] [--rounds 11] [--per-round 300] [--no-barrier]

Every rank holds a full shard of ``--capacity`` CartPole-like rows (obs 4 float32), one uniform and
one prioritized (alpha 0.6, random initial |TD|). For each global batch B (``B / 2`` rows per rank)
and each of local/global x uniform/prioritized, a ``RoundSampler`` times ``draw(1, rng, 0.4,
td_errors=False)``: one update's batch, with, in global mode, the mass Allgather and the shared
split of B over the shards. Prioritized draws write random |TD| back after each draw, outside the
timing, so the trees change as in training. An untimed Barrier precedes every draw, standing in
for the gradient Allreduce that brings the ranks together between two draws in training
(``--no-barrier``: back to back, so a global draw also waits out the other rank's priority
write-back and any scheduling skew). The four modes alternate in rounds (the order reversed
every other round); figures are medians over rounds of the mean per draw, averaged over the two
ranks, in microseconds. ``Allgather share``: the part of a global draw spent in the mass exchange
(``RoundSampler.exchange_seconds``), which includes waiting for the other rank. ``|count - B/2|``:
how far a rank's share of a global batch strays from the even split (mean and max over draws and
ranks); local mode always draws exactly B/2. In training, uniform global sampling exchanges once
per round of updates (``draw(updates, ...)``), so its per-draw figure here is the worst case;
prioritized global sampling exchanges once per update, as here.

The 2 ranks share the machine's 2 cores (with whatever else runs there), so a rank that is
descheduled makes the other wait in the Allgather. No timing is asserted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI
from replay_priority import (
    cpu_model,  # the sibling script (python benchmarks/global_sampling.py)
)

from mpidqn.distributed.topology import Topology
from mpidqn.envs.vector import shared_seed
from mpidqn.replay.shard import ReplayShard
from mpidqn.train.sampling import RoundSampler

OBS, ALPHA, EPS, BETA = 4, 0.6, 1e-6, 0.4
CHUNK = 100_000


def full_shard(capacity: int, prioritized: bool, rank: int) -> ReplayShard:
    rng = np.random.default_rng(100 + rank)
    shard = ReplayShard(capacity, (OBS,), np.float32, 1, priority=(ALPHA, EPS) if prioritized else None)
    for start in range(0, capacity, CHUNK):
        n = min(CHUNK, capacity - start)
        shard.extend({"obs": rng.normal(size=(n, OBS)).astype(np.float32), "actions": rng.integers(2, size=n),
                      "rewards": rng.normal(size=n).astype(np.float32),
                      "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
                      "discounts": np.full(n, 0.99, np.float32)})
        if prioritized:
            shard.update_priorities(np.arange(start, start + n), rng.exponential(size=n))
    return shard


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--capacity", type=int, default=500_000, help="rows per rank's shard")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="global batch sizes")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--per-round", type=int, default=300, help="draws per round and mode")
    p.add_argument("--no-barrier", dest="barrier", action="store_false",
                   help="draw back to back (default: a Barrier, untimed, before every draw)")
    a = p.parse_args()
    load0 = os.getloadavg()[0]
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    topo = Topology.build(comm)
    shards = {False: full_shard(a.capacity, False, rank), True: full_shard(a.capacity, True, rank)}
    modes = [(m, pr) for m in ("local", "global") for pr in (False, True)]
    rng = np.random.default_rng([7, rank])
    td_rng = np.random.default_rng([8, rank])
    rows = []
    for batch in a.batch:
        samplers = {(m, pr): RoundSampler(SimpleNamespace(replay_sampling=m, prioritized=pr), topo, shards[pr],
                                          batch // world, shared_seed(7)) for m, pr in modes}
        draw_s = {k: [] for k in modes}
        share = {k: [] for k in modes}
        dev = {k: [] for k in modes}
        for r in range(a.rounds):
            for key in (modes if r % 2 == 0 else modes[::-1]):
                sampler, shard = samplers[key], shards[key[1]]
                comm.Barrier()
                ex0, spent = sampler.exchange_seconds, 0.0
                for _ in range(a.per_round):
                    if a.barrier:
                        comm.Barrier()
                    t0 = time.perf_counter()
                    _, slots, _ = sampler.draw(1, rng, BETA, td_errors=False)
                    spent += time.perf_counter() - t0
                    dev[key].append(abs(len(slots) - batch // world))
                    if key[1]:
                        shard.update_priorities(slots, td_rng.exponential(size=len(slots)))
                draw_s[key].append(spent / a.per_round)
                share[key].append((sampler.exchange_seconds - ex0) / spent)
        for key in modes:
            mine = (np.median(draw_s[key]), np.median(share[key]), np.mean(dev[key]), np.max(dev[key]))
            both = comm.gather(mine, root=0)
            if rank == 0:
                rows.append((batch, key, float(np.mean([b[0] for b in both])), float(np.mean([b[1] for b in both])),
                             float(np.mean([b[2] for b in both])), int(max(b[3] for b in both))))
    if rank == 0:
        print(f"{datetime.date.today()}; {platform.platform()}; {cpu_model()}; {os.cpu_count()} cores; "
              f"{world} ranks; numpy {np.__version__}; {' '.join(MPI.Get_library_version().split()[:3])}; "
              f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
        print(f"{a.capacity:,} rows per shard (full), obs {OBS} float32; median over {a.rounds} rounds of "
              f"{a.per_round} draws, {'a Barrier before each' if a.barrier else 'back to back'}; "
              "microseconds per draw (one update's batch)\n")
        print("| global batch | sampling | replay | µs per draw | Allgather share | mean / max |count - B/2| |")
        print("|---|---|---|---|---|---|")
        for batch, (m, pr), us, sh, dmean, dmax in rows:
            kind = "prioritized" if pr else "uniform"
            extra = (f"{sh * 100:.0f} %", f"{dmean:.1f} / {dmax}") if m == "global" else ("", "0 / 0")
            print(f"| {batch} | {m} | {kind} | {us * 1e6:.1f} | {extra[0]} | {extra[1]} |")


if __name__ == "__main__":
    main()
