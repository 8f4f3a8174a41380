"""Would a sharded optimizer step (ZeRO stage 1) pay at this world size? The learner's update with its
Allreduce and full optimizer step, against the same update with the step sharded over the ranks.

    mpiexec -n 2 python benchmarks/sharded_step.py [--net cartpole|minatar] [--rows 256] [--rounds 5]

Every update runs the learner's own forward and backward on ``--rows`` rows (``cartpole``: the [256, 256]
MLP with Adam; ``minatar``: MinAtar's CNN with centered RMSprop, ``--compile`` for the compiled step the
shipped config uses), so the optimizer's state is as cold in the caches as in training. Then either

* **allreduce**: what the learner does: one Allreduce of the whole gradient, its norm, the clip, the step
  over every parameter, on every rank;
* **sharded**: one Reduce_scatter (each rank gets the summed gradient of 1/N of the parameters), the norm
  from the slices (one scalar Allreduce), the clip and the step over this rank's slice only, and one
  Allgatherv of the parameter slices. The same bytes travel; the step costs 1/N; there is one more
  collective per update.

The two alternate in blocks of ``--updates`` updates, ``--rounds`` times. Rank 0 prints ms per update of
each (median over rounds, slowest rank) and the ratio. The sharded side is a model of the step, not the
learner (its parameters are a separate flat buffer of the same size); it tells whether building it is
worth it before it is built.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.config import NetworkConfig
from mpidqn.distributed.hosts import reuse_freed_memory
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.optim import make_optimizer
from mpidqn.nn.registry import q_network_layers


def batch(net: str, rows: int, rng: np.random.Generator) -> SimpleNamespace:
    shape, n_actions = ((4,), 2) if net == "cartpole" else ((4, 10, 10), 6)
    obs = (rng.normal(size=(rows, *shape)).astype(np.float32) if net == "cartpole"
           else (rng.random((rows, *shape)) < 0.1).astype(np.uint8))
    return SimpleNamespace(obs=obs, next_obs=obs[::-1].copy(), actions=rng.integers(n_actions, size=rows),
                           rewards=rng.normal(size=rows).astype(np.float32), discounts=np.full(rows, 0.99, np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["cartpole", "minatar"], default="cartpole")
    p.add_argument("--rows", type=int, default=256, help="rows per rank and update")
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="RMSprop's compiled step (minatar)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    reuse_freed_memory()
    torch.manual_seed(0)
    if args.net == "cartpole":
        layers = q_network_layers((4,), 2, NetworkConfig(hidden=[256, 256]))
        hyper = Hyper(lr=1e-3, target_update_interval=10**9, sync_check_interval=0)
    else:
        layers = q_network_layers((4, 10, 10), 6, NetworkConfig(kind="minatar_cnn"))
        hyper = Hyper(lr=1e-4, optimizer="rmsprop", compile_optimizer=args.compile,
                      target_update_interval=10**9, sync_check_interval=0)
    learner = Learner(torch.nn.Sequential(*layers), hyper, comm)
    data = batch(args.net, args.rows, np.random.default_rng(rank))
    update = learner._prepare_round(data, 1, None)[0]  # the batch as the learner's tensors
    n = learner.flat_grad.numel()
    counts = [n // size + (r < n % size) for r in range(size)]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    lo, hi = int(displs[rank]), int(displs[rank] + counts[rank])
    flat_params = torch.cat([q.detach().reshape(-1) for q in learner.params])
    mine = flat_params[lo:hi]
    mine.grad = learner.flat_grad[lo:hi]
    shard_optimizer = make_optimizer([mine], hyper)
    received = torch.zeros(hi - lo)

    def backward() -> None:
        targets = learner._round_targets(update, slice(0, args.rows))
        learner.backward(update.tensors[0], update.tensors[1], targets)

    def allreduce() -> None:
        backward()
        learner.reduce_gradients()
        learner.step()

    def sharded() -> None:
        backward()
        comm.Reduce_scatter(learner.flat_grad.numpy(), received.numpy(), counts, op=MPI.SUM)
        mine.grad.copy_(received).mul_(1.0 / size)
        sq = np.array([float(torch.sum(mine.grad.double() ** 2))])
        comm.Allreduce(MPI.IN_PLACE, sq)
        norm = float(np.sqrt(sq[0]))
        if norm + 1e-6 > hyper.max_grad_norm:
            mine.grad.mul_(hyper.max_grad_norm / (norm + 1e-6))
        shard_optimizer.step()
        comm.Allgatherv(MPI.IN_PLACE, [flat_params.numpy(), counts, displs, MPI.FLOAT])

    times: dict[str, list[float]] = {"allreduce": [], "sharded": []}
    for f in (allreduce, sharded):  # warm-up (a compiled step compiles here)
        for _ in range(10):
            f()
    for _ in range(args.rounds):
        for name, f in (("allreduce", allreduce), ("sharded", sharded)):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.updates):
                f()
            slowest = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            times[name].append(slowest / args.updates * 1e3)
    if rank == 0:
        a, s = np.median(times["allreduce"]), np.median(times["sharded"])
        step = f"{hyper.optimizer}{' compiled' if args.compile and hyper.optimizer == 'rmsprop' else ''}"
        print(f"world {size}, {args.net} ({n:,} parameters, {step}), {args.rows} rows per rank: "
              f"allreduce + full step {a:.3f} ms/update, sharded step {s:.3f} ms/update, ratio {s / a:.3f}")
        print("  per round (ms/update): allreduce " + ", ".join(f"{t:.3f}" for t in times["allreduce"])
              + "; sharded " + ", ".join(f"{t:.3f}" for t in times["sharded"]))


if __name__ == "__main__":
    main()
