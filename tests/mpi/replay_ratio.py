"""mpiexec -n N python replay_ratio.py OUT.json [KEY=VALUE ...]: train with the real Trainer loop while
counting what every rank samples and how many updates the learner does; rank 0 writes the totals
(updates, transitions sampled over all ranks, per-rank sample sizes) for the test to compare across N."""
from __future__ import annotations

import json
import sys

from mpi4py import MPI

from mpidqn.config import load_config
from mpidqn.train.reporting import SilentReporter
from mpidqn.distributed.topology import Topology
from mpidqn.train.loop import Trainer

comm = MPI.COMM_WORLD
cfg = load_config(None, sys.argv[2:])
trainer = Trainer(cfg, Topology.build(comm, cfg.parallel.pipeline_stages), SilentReporter())
sampled: list[tuple[int, int]] = []  # (updates, rows per update) of every sample_many call
first_update_step: list[int] = []
sample_many = trainer.replay.sample_many


def counting_sample_many(num_batches, batch_size, rng, out=None):
    sampled.append((num_batches, batch_size))
    if not first_update_step:
        first_update_step.append(trainer.counters.env_steps)
    return sample_many(num_batches, batch_size, rng, out)


trainer.replay.sample_many = counting_sample_many
drawn: list[int] = []  # this rank's rows of every update of the global / prioritized path (uneven)
draw = trainer.sampler.draw


def counting_draw(updates, rng, beta, td_errors):
    batch, slots, plan = draw(updates, rng, beta, td_errors)
    drawn.extend(int(c) for c in plan.counts[:, trainer.topo.stage])
    if not first_update_step:
        first_update_step.append(trainer.counters.env_steps)
    return batch, slots, plan


trainer.sampler.draw = counting_draw
assert trainer.run() == "done"
rows = sum(u * b for u, b in sampled) + sum(drawn)
total_rows = comm.allreduce(rows)
all_drawn = comm.allgather(drawn)
if comm.Get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"updates": int(trainer.learner.updates), "rows_all_ranks": total_rows,
                   "per_rank_batch": sorted({b for _, b in sampled}), "env_steps": trainer.counters.env_steps,
                   "draw_sizes": sorted(set(sum(all_drawn, []))),
                   "first_update_step": first_update_step[0] if first_update_step else None}, f)
