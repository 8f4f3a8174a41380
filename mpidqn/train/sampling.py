"""How the trainer draws a round of batches from the replay: from this rank's shard alone, or exactly
as one buffer holding every shard would (``train.replay_sampling``), uniformly or by priority.

* ``local`` + uniform (the fast path): every rank draws ``batch / world`` rows of its own shard per
  update, all updates of a round in one draw; the loss of an update is the mean over its rows. Where
  the world does not divide the batch, the first ``batch % world`` ranks draw one row more and a plan
  weights every row by ``dp / global batch`` (as in global sampling).
* ``global``: per exchange, every rank publishes its shard's mass (size; or sum and minimum of
  ``p ** alpha``, and the running maximum priority) in ONE small Allgather; all ranks draw the same
  split of the global batch over the shards from a shared stream (:func:`~mpidqn.replay.priority.split_batch`);
  each rank draws its count (0 included) from its own shard, and a :class:`~mpidqn.learners.base.RoundPlan`
  weights each row by ``dp / global batch`` (times its importance weight, computed with the global size
  and the global minimum probability), so the averaged gradient is that of one batch drawn from the
  union. Uniform replay exchanges once per round (no shard changes between its updates); prioritized
  replay once per update (the priorities written back after an update change the next draw).
* ``local`` + prioritized: per shard, as Ape-X does (each shard's own sum, minimum and maximum).

Priorities are written back after every update (``|TD error| + eps``). In global mode the running
maximum priority, which new transitions receive, is the maximum over all shards: it travels with
every exchange, and once more after the last update of a round.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from mpi4py import MPI

from mpidqn.distributed import collectives as C
from mpidqn.distributed import watchdog
from mpidqn.learners.base import RoundPlan
from mpidqn.replay.priority import ShardMass, importance_weights, split_batch


def resolved_mode(train: Any) -> str:
    """``train.replay_sampling`` with ``auto`` resolved: global for prioritized replay, else local."""
    if train.replay_sampling == "auto":
        return "global" if train.prioritized else "local"
    return train.replay_sampling


class RoundSampler:
    """Draws a round's batches, runs the learner on them and writes priorities back."""

    def __init__(self, train: Any, topo: Any, replay: Any, rows: int | tuple[int, ...],
                 seed: np.random.SeedSequence) -> None:
        """``rows``: rows of every world rank per update in local sampling (one number: the same for all);
        their sum is the global batch."""
        self.mode = resolved_mode(train)
        self.prioritized = bool(train.prioritized)
        self.topo, self.replay = topo, replay
        self.rows = np.broadcast_to(np.asarray(rows, np.int64), (topo.world,))
        self.batch_per_rank = int(self.rows[topo.rank])
        self.global_batch = int(self.rows.sum())
        self.scale = topo.dp / self.global_batch  # loss weight of a row: its share of the dp-averaged mean
        s = topo.pipeline_stages
        self.members = np.arange(topo.group * s, (topo.group + 1) * s)  # world ranks of my pipeline group
        self.shared_rng = np.random.default_rng(seed)
        self.exchange_seconds = 0.0

    @property
    def plain(self) -> bool:
        """Local uniform sampling with equal rows on every rank: the trainer's fast path (no plan, no
        collective). Unequal rows need the plan's row weights."""
        return self.mode == "local" and not self.prioritized and bool((self.rows == self.rows[0]).all())

    # ------------------------------------------------------------------ masses
    def masses(self) -> list[ShardMass]:
        """Every shard's mass (global: one Allgather; local: this shard's alone)."""
        mine = self.replay.mass()
        if self.mode == "local" or self.topo.world == 1:
            return [mine]
        comm = self.topo.comm
        out = np.empty((comm.Get_size(), 4), dtype=np.float64)
        t0 = time.perf_counter()
        watchdog.wait(comm.Iallgather(np.array([mine.total, mine.min, mine.size, mine.max_p]), out),
                      "replay mass allgather")
        self.exchange_seconds += time.perf_counter() - t0
        shards = [ShardMass(float(t), float(m), int(n), float(p)) for t, m, n, p in out]
        if self.prioritized:
            self.replay.priorities.raise_max(max(m.max_p for m in shards))
        return shards

    def sync_max_priority(self) -> None:
        """After a round (global prioritized): every shard's running maximum becomes the global one."""
        if self.mode == "global" and self.prioritized and self.topo.world > 1:
            t0 = time.perf_counter()
            top = C.allreduce_array(np.array([self.replay.priorities.max_p]), self.topo.comm, MPI.MAX,
                                    "max priority allreduce")
            self.exchange_seconds += time.perf_counter() - t0
            self.replay.priorities.raise_max(float(top[0]))

    # ------------------------------------------------------------------ rounds
    def draw(self, updates: int, rng: np.random.Generator, beta: float, td_errors: bool) -> tuple[Any, np.ndarray, RoundPlan]:
        """``updates`` batches (one exchange): this rank's batch, its slots and the plan."""
        shards = self.masses()
        if self.mode == "global":
            counts = split_batch(shards, self.global_batch, self.shared_rng, updates).reshape(updates, -1)
            mine = counts[:, self.topo.rank]
            group = counts[:, self.members]
        else:
            mine = np.full(updates, self.batch_per_rank, dtype=np.int64)
            group = np.tile(self.rows[self.members], (updates, 1))
        slots = self.replay.sample_slots(int(mine.sum()), rng)
        batch = self.replay.gather(slots)
        weights = np.full(len(slots), self.scale, dtype=np.float32)
        if self.prioritized:
            weights *= importance_weights(self.replay.slot_masses(slots), shards, beta)
        return batch, slots, RoundPlan(group.astype(np.int64), weights, td_errors)

    def learn(self, learner: Any, num_updates: int, rng: np.random.Generator, beta: float, timer: Any) -> None:
        """``num_updates`` updates (the caller sets the lr and accounts learner communication)."""
        if not self.prioritized:  # uniform: the shards do not change within a round, one exchange
            with timer("replay"):
                batch, _, plan = self.draw(num_updates, rng, beta, td_errors=False)
            with timer("learn"):
                learner.update_many(batch, num_updates, plan)
            return
        for _ in range(num_updates):
            with timer("replay"):
                batch, slots, plan = self.draw(1, rng, beta, td_errors=True)
            with timer("learn"):
                td = learner.update_many(batch, 1, plan)
            with timer("replay"):
                ok = np.isfinite(td)  # a skipped non-finite update keeps the old priorities
                self.replay.update_priorities(slots[ok], td[ok])
        with timer("replay"):
            self.sync_max_priority()
