"""Share of update time spent in the gradient Allreduce, data parallel, [256, 256] MLP, batch 64.

    mpiexec -n 2 python benchmarks/allreduce_share.py [--rounds 10]

Each rank runs rounds of 128 updates (sample, forward, backward, ONE Allreduce of the flat
gradient, Adam); rank 0 prints update time, Allreduce time and the share, as the max over ranks.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.learner import Hyper, Learner
from mpidqn.networks import mlp_layers
from mpidqn.replay import ReplayShard


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    rng = np.random.default_rng(comm.Get_rank())
    rs = ReplayShard(10_000, (4,), np.float32, 1)
    x = rng.normal(size=(4000, 4)).astype(np.float32)
    for i in range(4000):
        rs.add(x[i : i + 1], rng.integers(2, size=1), np.ones(1, np.float32), x[i : i + 1], np.zeros(1, bool), np.zeros(1, bool))
    learner = Learner(torch.nn.Sequential(*mlp_layers(4, 2, args.hidden)),
                      Hyper(lr=1e-3, target_update_interval=128, sync_check_interval=0), comm)
    learner.update_many(rs.sample_many(128, 64, rng), 128)
    comm.Barrier()
    learner.comm_seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        learner.update_many(rs.sample_many(128, 64, rng), 128)
    total = time.perf_counter() - t0
    stats = comm.gather((total, learner.comm_seconds), root=0)
    if comm.Get_rank() == 0:
        n = 128 * args.rounds
        tot = max(s[0] for s in stats)
        ar = max(s[1] for s in stats)
        grad_kib = learner.flat_grad.numel() * 4 / 1024
        print(f"world {comm.Get_size()}, hidden {args.hidden}, {grad_kib:.0f} KiB gradient, {n} updates: "
              f"{tot / n * 1e3:.3f} ms/update, Allreduce {ar / n * 1e3:.3f} ms/update = {100 * ar / tot:.1f}% of update time")


if __name__ == "__main__":
    main()
