"""Share of update time spent in the gradient Allreduce, data parallel, [256, 256] MLP, batch 64.

    mpiexec -n 2 python benchmarks/allreduce_share.py [--rounds 10] [--bucket-mb 0.1]

Each rank runs rounds of 128 updates (sample, forward, backward, gradient reduction, Adam), first
with ONE fused Allreduce of the flat gradient after backward, then with bucketed Iallreduce
overlapped with backward (parallel.overlap_allreduce), alternating. Rank 0 prints update time,
time spent in the reduction (for overlap: the wait after backward) and the share, max over ranks.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import ReplayShard


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--bucket-mb", type=float, default=0.1, help="bucket size of the overlapped reduction")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    rng = np.random.default_rng(comm.Get_rank())
    rs = ReplayShard(10_000, (4,), np.float32, 1)
    x = rng.normal(size=(4000, 4)).astype(np.float32)
    for i in range(4000):
        rs.add(x[i : i + 1], rng.integers(2, size=1), np.ones(1, np.float32), x[i : i + 1], np.zeros(1, bool), np.zeros(1, bool))
    results: dict[str, list[tuple[float, float]]] = {"fused": [], "overlap": []}
    for _ in range(2):
        for mode in results:
            torch.manual_seed(0)
            learner = Learner(torch.nn.Sequential(*mlp_layers(4, 2, args.hidden)),
                              Hyper(lr=1e-3, target_update_interval=128, sync_check_interval=0), comm,
                              overlap=mode == "overlap", bucket_bytes=int(args.bucket_mb * 2**20))
            learner.update_many(rs.sample_many(128, 64, rng), 128)
            comm.Barrier()
            comm0 = learner.comm_seconds
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                learner.update_many(rs.sample_many(128, 64, rng), 128)
            total = time.perf_counter() - t0
            stats = comm.gather((total, learner.comm_seconds - comm0), root=0)
            if comm.Get_rank() == 0:
                results[mode].append((max(s[0] for s in stats), max(s[1] for s in stats)))
    if comm.Get_rank() == 0:
        n = 128 * args.rounds
        grad_kib = sum(p.numel() for p in learner.params) * 4 / 1024
        print(f"world {comm.Get_size()}, hidden {args.hidden}, {grad_kib:.0f} KiB gradient, {n} updates x 2 repeats")
        for mode, rows in results.items():
            tot, ar = np.median([r[0] for r in rows]), np.median([r[1] for r in rows])
            print(f"{mode:>8}: {tot / n * 1e3:.3f} ms/update, reduction {ar / n * 1e3:.3f} ms/update "
                  f"= {100 * ar / tot:.1f}% of update time")


if __name__ == "__main__":
    main()
