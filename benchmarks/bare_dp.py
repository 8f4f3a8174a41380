"""A bare data-parallel torch loop: what lockstep costs an update on this machine.

    mpiexec -n W python benchmarks/bare_dp.py [--updates 1536]

Every rank runs speed.py's bare CartPole update (forward, TD target, Huber loss, backward, clip, Adam
on a fixed batch of 64 rows, [256, 256] MLP) with one addition: between backward and clip the
gradients are averaged over the ranks by one blocking ``MPI.Allreduce`` of their concatenation, the
least a data-parallel update can do. No env, no replay, no logging: every rank does the same work at
every world size, so updates/s at W ranks over updates/s at 1 rank is the weak-scaling efficiency of
the update alone in any trainer that takes the same step on every replica (scaling.py --bare runs it
beside mpidqn). 128 warm-up updates and a barrier come before the timed part.

Prints one line: world, updates, updates/s (the slowest rank's wall time), the share of that time
spent in the Allreduce (mean over the ranks), which is mostly the wait for the other ranks, and the
median and 90th percentile of an update's time without the Allreduce (the jitter the wait comes from).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mpi4py import MPI
from speed import WORKLOADS, bare_update  # the sibling script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=1536)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank, as a data-parallel trainer's
    in_allreduce = 0.0

    def reduce(params: list[torch.Tensor]) -> None:
        nonlocal in_allreduce
        flat = torch.cat([q.grad.reshape(-1) for q in params])
        if n > 1:  # 1 rank pays the rest too: the worlds differ by the Allreduce alone
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
            in_allreduce += time.perf_counter() - t0
        flat /= n
        offset = 0
        for q in params:
            q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
            offset += q.numel()

    update = bare_update(WORKLOADS["cartpole"], "cpu", reduce)
    for _ in range(128):  # warm-up
        update()
    comm.Barrier()
    in_allreduce = 0.0
    work = np.empty(args.updates)  # seconds per update outside the Allreduce
    t0 = time.perf_counter()
    for i in range(args.updates):
        t, a = time.perf_counter(), in_allreduce
        update()
        work[i] = time.perf_counter() - t - (in_allreduce - a)
    wall = time.perf_counter() - t0
    walls = comm.gather((wall, in_allreduce, np.median(work), np.percentile(work, 90)), root=0)
    if comm.Get_rank() == 0:
        slowest = max(w[0] for w in walls)
        share = float(np.mean([w[1] / w[0] for w in walls]))
        print(f"world {n}: {args.updates} updates, {args.updates / slowest:,.1f} updates/s, "
              f"{share:.1%} of the time in the Allreduce; an update without it: median "
              f"{np.mean([w[2] for w in walls]) * 1e3:.2f} ms, 90th percentile {np.mean([w[3] for w in walls]) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
