"""Replay shard: n-step accumulation, a preallocated numpy ring, uniform sampling, re-sharding.

Composition (Dopamine ``replay_buffer.py`` + ``samplers.py``, SB3 ``buffers.py``):

- ``NStepAccumulator`` turns per-env steps into n-step transitions (pure bookkeeping, no storage),
- ``TransitionRing`` stores transitions in preallocated arrays (a ring, oldest overwritten first),
- ``UniformSampler`` draws slot indices (or, with ``priority``, :class:`~mpidqn.replay.priority.Priorities`
  draws them by priority),
- ``ReplayShard`` wires them together; it is this rank's part of the global buffer, which is
  the union of the shards.
- ``partition_plan`` assigns the stored rows of old shards to a new world size (elastic resume) in
  contiguous blocks; ``partition_transitions`` applies it to materialised transitions (its
  reference, for tests).

A transition is ``(obs, action, n-step return, next_obs, discount)`` and the TD target is simply
``rewards + discounts * max_a Q(next_obs)``: ``discounts`` is ``gamma**m`` (``m`` the steps actually
taken, ``m < n`` only when the episode ended early), and 0 only when the episode *terminated*.
A truncated episode (time limit) still bootstraps from its true final observation.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import numpy as np

from mpidqn.replay.priority import Priorities, ShardMass

Transitions = dict[str, np.ndarray]
"""Column dict of transitions: the keys of ``Batch._fields``, equal leading dims."""


class Batch(NamedTuple):
    """A batch of n-step transitions (arrays with leading dim B)."""

    obs: np.ndarray
    """(B, *obs_shape), the shard's obs dtype."""
    actions: np.ndarray
    """(B,) int64."""
    rewards: np.ndarray
    """(B,) float32, the n-step return ``sum_{k<m} gamma**k * r_k``."""
    next_obs: np.ndarray
    """(B, *obs_shape), the observation ``m`` steps later (the final one if the episode ended)."""
    discounts: np.ndarray
    """(B,) float32, ``gamma**m``, or 0.0 if the episode terminated within those m steps."""


FIELDS: tuple[str, ...] = Batch._fields


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must lie in [0, 1]")


class NStepAccumulator:
    """Per-env pending queues that emit n-step transitions.

    Each env has a queue of at most ``n_step - 1`` pending (obs, action, reward) steps between
    pushes. After a push, an env whose queue holds ``n_step`` steps emits its oldest one; an env
    whose episode ended (terminated or truncated) emits all its pending steps, each with its own
    shorter horizon, and its queue is cleared. Emitted rows are ordered by env, then oldest first.
    """

    def __init__(
        self,
        num_envs: int,
        n_step: int,
        gamma: float,
        obs_shape: tuple[int, ...],
        obs_dtype: Any,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1")
        if n_step < 1:
            raise ValueError(f"n_step={n_step} must be >= 1")
        _check_gamma(gamma)
        self.num_envs = int(num_envs)
        self.n_step = int(n_step)
        self.gamma = float(gamma)
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self._powers = self.gamma ** np.arange(self.n_step + 1, dtype=np.float64)
        # _tail[i, j] = gamma**(i - j) for i >= j: (rewards @ _tail)[j] is the return from slot j.
        diff = np.arange(self.n_step)[:, None] - np.arange(self.n_step)[None, :]
        self._tail = np.where(diff >= 0, self.gamma ** np.maximum(diff, 0), 0.0)
        self._obs = np.zeros((self.num_envs, self.n_step, *self.obs_shape), self.obs_dtype)
        self._actions = np.zeros((self.num_envs, self.n_step), np.int64)
        self._rewards = np.zeros((self.num_envs, self.n_step), np.float64)
        self._count = np.zeros(self.num_envs, np.int64)

    def push(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> Transitions:
        """Add one vector-env step (leading dim num_envs); return the completed transitions.

        ``next_obs`` must be the TRUE next observation (the final one for envs whose episode just
        ended), not gymnasium's autoreset observation. With n_step=1 the returned arrays may be
        the inputs themselves (no copy); with n_step>1 they are fresh.
        """
        obs = np.asarray(obs, self.obs_dtype)
        next_obs = np.asarray(next_obs, self.obs_dtype)
        actions = np.asarray(actions, np.int64)
        terminated = np.asarray(terminated, bool)
        done = terminated | np.asarray(truncated, bool)
        self._check_step(obs, actions, rewards, next_obs, done)
        if self.n_step == 1:
            return self._pass_through(obs, actions, rewards, next_obs, terminated)
        envs = np.arange(self.num_envs)
        self._obs[envs, self._count] = obs
        self._actions[envs, self._count] = actions
        self._rewards[envs, self._count] = rewards
        self._count += 1
        # the common step (no episode ended): only full queues emit their oldest step
        out = self._emit(next_obs, terminated, done) if done.any() else self._emit_full(next_obs)
        self._advance(done)
        return out

    def _check_step(self, obs: np.ndarray, actions: np.ndarray, rewards: Any,
                    next_obs: np.ndarray, done: np.ndarray) -> None:
        expected = (self.num_envs, *self.obs_shape)
        for name, arr in (("obs", obs), ("next_obs", next_obs)):
            if arr.shape != expected:
                raise ValueError(f"{name} has shape {arr.shape}, expected {expected}")
        for name, arr in (("actions", actions), ("rewards", np.asarray(rewards)), ("done", done)):
            if arr.shape != (self.num_envs,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({self.num_envs},)")

    def _pass_through(self, obs: np.ndarray, actions: np.ndarray, rewards: Any,
                      next_obs: np.ndarray, terminated: np.ndarray) -> Transitions:
        """n=1: the raw step is the transition."""
        return {
            "obs": obs,
            "actions": actions,
            "rewards": np.asarray(rewards, np.float32),
            "next_obs": next_obs,
            "discounts": np.where(terminated, 0.0, self.gamma).astype(np.float32),
        }

    def _emit(self, next_obs: np.ndarray, terminated: np.ndarray, done: np.ndarray) -> Transitions:
        """Gather the rows due after this step (queues not yet advanced)."""
        slots = np.arange(self.n_step)[None, :]
        count = self._count[:, None]
        flush = done[:, None] & (slots < count)
        full = (~done)[:, None] & (count == self.n_step) & (slots == 0)
        env_idx, slot_idx = np.nonzero(flush | full)
        horizon = self._count[env_idx] - slot_idx
        valid = self._rewards[env_idx] * (slots < count[env_idx])
        returns = np.einsum("bi,bi->b", valid, self._tail[:, slot_idx].T)
        discounts = np.where(terminated[env_idx], 0.0, self._powers[horizon])
        return {
            "obs": self._obs[env_idx, slot_idx],
            "actions": self._actions[env_idx, slot_idx],
            "rewards": returns.astype(np.float32),
            "next_obs": next_obs[env_idx],
            "discounts": discounts.astype(np.float32),
        }

    def _emit_full(self, next_obs: np.ndarray) -> Transitions:
        """``_emit`` for a step on which no episode ended: every full queue emits its oldest step with
        the whole horizon (same values as the general path, fewer array operations)."""
        full = np.flatnonzero(self._count == self.n_step)
        return {
            "obs": self._obs[full, 0],
            "actions": self._actions[full, 0],
            "rewards": (self._rewards[full] @ self._powers[:-1]).astype(np.float32),
            "next_obs": next_obs[full],
            "discounts": np.full(full.size, self._powers[-1], np.float32),
        }

    def _advance(self, done: np.ndarray) -> None:
        """Clear ended episodes; drop the emitted oldest step of full queues."""
        self._count[done] = 0
        full = np.flatnonzero(self._count == self.n_step)
        if full.size:
            for arr in (self._obs, self._actions, self._rewards):
                arr[full, :-1] = arr[full, 1:]
            self._count[full] = self.n_step - 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """Pending queues as arrays (copies), keys ``nstep/...``."""
        return {
            "nstep/obs": self._obs.copy(),
            "nstep/actions": self._actions.copy(),
            "nstep/rewards": self._rewards.copy(),
            "nstep/count": self._count.copy(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore pending queues saved by ``state_dict`` (same num_envs, n_step, obs shape)."""
        for name, arr in (("obs", self._obs), ("actions", self._actions),
                          ("rewards", self._rewards), ("count", self._count)):
            value = np.asarray(d[f"nstep/{name}"])
            if value.shape != arr.shape:
                raise ValueError(f"nstep/{name} has shape {value.shape}, expected {arr.shape} "
                                 f"(num_envs={self.num_envs}, n_step={self.n_step})")
            arr[...] = value


class TransitionRing:
    """Preallocated ring of transitions; once full, each write overwrites the oldest rows."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} must be > 0")
        self.capacity = int(capacity)
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.arrays: Transitions = {
            "obs": np.zeros((self.capacity, *self.obs_shape), self.obs_dtype),
            "actions": np.zeros(self.capacity, np.int64),
            "rewards": np.zeros(self.capacity, np.float32),
            "next_obs": np.zeros((self.capacity, *self.obs_shape), self.obs_dtype),
            "discounts": np.zeros(self.capacity, np.float32),
        }
        self.pos = 0
        self.size = 0
        self.num_added = 0

    def __len__(self) -> int:
        return self.size

    def write(self, rows: Transitions) -> int:
        """Append rows (oldest first); if more than capacity, only the newest are kept."""
        k = self._check_rows(rows)
        if k == 0:
            return 0
        skip = max(0, k - self.capacity)
        first = min(k - skip, self.capacity - self.pos)
        for name, arr in self.arrays.items():
            src = rows[name]
            arr[self.pos:self.pos + first] = src[skip:skip + first]
            arr[:k - skip - first] = src[skip + first:]
        self.pos = (self.pos + k - skip) % self.capacity
        self.size = min(self.size + k, self.capacity)
        self.num_added += k
        return k

    def _check_rows(self, rows: Transitions) -> int:
        missing = [name for name in FIELDS if name not in rows]
        if missing:
            raise ValueError(f"transitions lack the keys {missing}")
        k = len(rows["actions"])
        for name in FIELDS:
            shape = np.shape(rows[name])
            expected = (k, *self.obs_shape) if name in ("obs", "next_obs") else (k,)
            if shape != expected:
                raise ValueError(f"transitions[{name!r}] has shape {shape}, expected {expected}")
        return k

    def oldest_first(self) -> np.ndarray:
        """Slot indices of the stored rows, oldest first."""
        start = (self.pos - self.size) % self.capacity
        return (start + np.arange(self.size)) % self.capacity

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Filled part of the arrays in slot order (views: save before the next write)."""
        d: dict[str, np.ndarray | int] = {
            f"ring/{k}": v[:self.size] for k, v in self.arrays.items()}
        d.update({"ring/capacity": self.capacity, "ring/pos": self.pos,
                  "ring/size": self.size, "ring/num_added": self.num_added})
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore the exact slot layout saved by ``state_dict`` (same capacity)."""
        capacity, size = int(d["ring/capacity"]), int(d["ring/size"])
        if capacity != self.capacity:
            raise ValueError(f"ring/capacity={capacity} differs from this shard's capacity "
                             f"{self.capacity}; re-shard with transitions()/extend() instead")
        for name, arr in self.arrays.items():
            value = np.asarray(d[f"ring/{name}"])
            if value.shape != (size, *arr.shape[1:]):
                raise ValueError(f"ring/{name} has shape {value.shape}, "
                                 f"expected {(size, *arr.shape[1:])}")
            arr[:size] = value
        self.pos, self.size = int(d["ring/pos"]), size
        self.num_added = int(d["ring/num_added"])


class UniformSampler:
    """Uniform sampling with replacement over ``size`` stored slots."""

    def indices(self, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` slot indices drawn independently and uniformly from ``[0, size)``."""
        if size == 0:
            raise ValueError("cannot sample from an empty replay shard")
        if count < 1:
            raise ValueError(f"batch size {count} must be >= 1")
        return rng.integers(0, size, count)


PARTITION_BLOCK = 4096
"""Merged rows per block of :func:`partition_plan` (at most): an elastic resume reads each old shard in
runs of about ``PARTITION_BLOCK / old_world`` contiguous rows."""


def partition_plan(lengths: list[int], new_world: int,
                   block: int = PARTITION_BLOCK) -> list[tuple[np.ndarray, np.ndarray]]:
    """Where each new shard's rows come from: per new shard, (old rank, oldest-first row) arrays.

    Order: the old shards are aligned at their NEWEST row (shards fill at the same pace, so row
    ``-1`` of every shard is equally recent) and merged oldest first, ties by old rank. The merged
    sequence is dealt in contiguous blocks of at most ``block`` rows, round-robin: it is cut into
    ``R = ceil(total / (block * new_world))`` rounds, and round ``j`` is the blocks of new shards
    ``0, 1, ..., new_world - 1`` in turn. New shard ``s`` gets ``total // new_world`` rows, one more if
    ``s < total % new_world`` (the split of ``ReplayShard.shard_capacity``, so a new shard's share never
    exceeds its capacity when the old shards fit theirs), spread over the rounds as evenly as integers
    allow. Within a block the old shards are interleaved by age, so a block holds one contiguous run of
    rows of each old shard: a loader reads few, long hyperslabs. Every new shard spans all ages (at
    block granularity) and stays oldest first (ready for ``extend``, which keeps the newest if a new
    shard is smaller than its share). Deterministic; nothing lost or doubled. Only the lengths are
    needed, so a checkpoint loader can read just the rows a new rank gets.
    """
    if new_world < 1:
        raise ValueError(f"new_world={new_world} must be >= 1")
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    if not lengths:
        raise ValueError("no old shards to partition")
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    old_rank = np.repeat(np.arange(len(lengths_arr)), lengths_arr)
    row = np.concatenate([np.arange(n) for n in lengths_arr])
    age = np.concatenate([np.arange(n)[::-1] for n in lengths_arr])  # 0 = newest row of its shard
    order = np.lexsort((old_rank, -age))  # primary key: oldest first
    old_rank, row = old_rank[order], row[order]
    total = len(row)
    share = total // new_world + (np.arange(new_world) < total % new_world)
    rounds = max(1, -(-total // (block * new_world)))
    cuts = (np.arange(rounds + 1)[:, None] * share[None, :]) // rounds  # (rounds + 1, new_world)
    sizes = np.diff(cuts, axis=0).ravel()  # round-major: block of (round j, shard s); each <= block
    owner = np.repeat(np.tile(np.arange(new_world), rounds), sizes)  # new shard of each merged row
    mine = np.argsort(owner, kind="stable")  # merged order kept within each new shard
    bounds = np.concatenate([[0], np.cumsum(share)])
    return [(old_rank[mine[a:b]], row[mine[a:b]]) for a, b in itertools.pairwise(bounds)]


def partition_transitions(per_rank: list[Transitions], new_world: int,
                          block: int = PARTITION_BLOCK) -> list[Transitions]:
    """Redistribute old shards' transitions over ``new_world`` new shards; nothing lost or doubled
    (the order of :func:`partition_plan`)."""
    if not per_rank:
        raise ValueError("per_rank is empty: no old shards to partition")
    plan = partition_plan([len(t["actions"]) for t in per_rank], new_world, block)
    offsets = np.concatenate([[0], np.cumsum([len(t["actions"]) for t in per_rank])])
    merged = {k: np.concatenate([np.asarray(t[k]) for t in per_rank]) for k in FIELDS}
    return [{k: np.ascontiguousarray(v[offsets[ranks] + rows]) for k, v in merged.items()}
            for ranks, rows in plan]


class SlotSampling(ABC):
    """What both shard kinds (``ReplayShard``, ``FrameReplayShard``) do the same way on top of their
    storage: draw slots uniformly or by priority, tell their mass to a global draw, take priorities back,
    forget pending n-step steps.

    A shard provides ``__len__``, ``priorities`` (:class:`Priorities`, None for uniform replay),
    ``_sampler`` (:class:`UniformSampler`), ``_nstep`` (:class:`NStepAccumulator`), ``_gather(slots, out)``
    and, where its stored rows do not start at slot 0, ``_slots`` (sampler offsets -> physical slots).
    """

    priorities: Priorities | None
    _sampler: UniformSampler
    _nstep: NStepAccumulator

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _gather(self, slots: np.ndarray, out: Batch | None) -> Batch: ...

    def _slots(self, idx: np.ndarray) -> np.ndarray:
        """Sampler offsets ``[0, len)`` -> physical slots (the identity: rows fill the slots from 0)."""
        return idx

    def sample(self, batch_size: int, rng: np.random.Generator, out: Batch | None = None) -> Batch:
        """Uniform batch with replacement: one ``rng.integers`` draw, then ``np.take``.

        ``out``: a Batch of preallocated arrays (e.g. from ``empty_batch``) to fill and return,
        avoiding allocation. Without it the arrays are fresh.
        """
        return self._gather(self._slots(self._sampler.indices(len(self), batch_size, rng)), out)

    def sample_many(self, num_batches: int, batch_size: int, rng: np.random.Generator,
                    out: Batch | None = None) -> Batch:
        """``num_batches`` minibatches at once, leading dim ``num_batches * batch_size``.

        One index draw; rows are i.i.d. uniform with replacement, so the slices
        ``[i*batch_size:(i+1)*batch_size]`` have the same distribution as ``num_batches``
        separate ``sample`` calls (not the same numbers for the same rng state).
        """
        if num_batches < 1:
            raise ValueError(f"num_batches={num_batches} must be >= 1")
        return self.sample(num_batches * batch_size, rng, out)

    def sample_slots(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` physical slots drawn with replacement: by priority, or uniformly (``count`` may be 0)."""
        if count == 0:
            return np.zeros(0, np.int64)
        if self.priorities is not None:
            return self.priorities.sample(count, rng)
        return self._slots(self._sampler.indices(len(self), count, rng))

    def gather(self, slots: np.ndarray, out: Batch | None = None) -> Batch:
        """The transitions at ``slots`` (from ``sample_slots``)."""
        return self._gather(slots, out)

    def mass(self) -> ShardMass:
        """What a global draw needs to know of this shard (its size, for uniform replay)."""
        if self.priorities is not None:
            return self.priorities.shard_mass(len(self))
        return ShardMass(float(len(self)), 1.0 if len(self) else np.inf, len(self))

    def slot_masses(self, slots: np.ndarray) -> np.ndarray:
        """``p ** alpha`` of ``slots`` (1 for uniform replay)."""
        return np.ones(len(slots)) if self.priorities is None else self.priorities.masses(slots)

    def update_priorities(self, slots: np.ndarray, td_abs: np.ndarray) -> None:
        """New priorities ``|delta| + eps`` for the drawn ``slots`` (prioritized replay only)."""
        if self.priorities is not None:
            self.priorities.update(slots, td_abs)

    def drop_pending(self) -> None:
        """Forget the pending n-step steps (their episodes will not continue, e.g. envs restarted)."""
        self._nstep.load_state_dict({**self._nstep.state_dict(), "nstep/count": np.zeros(self._nstep.num_envs, np.int64)})


class ReplayShard(SlotSampling):
    """This rank's replay shard: n-step accumulator -> ring storage -> uniform or prioritized sampler.

    ``priority``: ``(alpha, eps)`` for prioritized replay (:class:`Priorities`), None for uniform.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: Any,
        num_envs: int,
        n_step: int = 1,
        gamma: float = 0.99,
        priority: tuple[float, float] | None = None,
    ) -> None:
        self._ring = TransitionRing(capacity, obs_shape, obs_dtype)
        self._nstep = NStepAccumulator(num_envs, n_step, gamma, obs_shape, obs_dtype)
        self._sampler = UniformSampler()
        self.priorities = Priorities(capacity, *priority) if priority is not None else None
        self.obs_shape = self._ring.obs_shape
        self.obs_dtype = self._ring.obs_dtype
        self.num_envs = self._nstep.num_envs
        self.n_step = self._nstep.n_step
        self.gamma = self._nstep.gamma

    @property
    def capacity(self) -> int:
        """Maximum number of stored transitions."""
        return self._ring.capacity

    @property
    def num_added(self) -> int:
        """Transitions ever written (by ``add`` and ``extend``), overwritten ones included."""
        return self._ring.num_added

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray, truncated: np.ndarray) -> int:
        """Add one vector-env step (see ``NStepAccumulator.push``); return transitions written."""
        rows = self._nstep.push(obs, actions, rewards, next_obs, terminated, truncated)
        return self._write(rows)

    def _write(self, rows: Transitions, priority: np.ndarray | None = None) -> int:
        """Write rows; new rows get the running maximum priority (or ``priority``, the newest kept)."""
        pos = self._ring.pos
        k = self._ring.write(rows)
        if self.priorities is not None and k:
            kept = min(k, self.capacity)
            slots = (pos + np.arange(kept)) % self.capacity
            self.priorities.written(slots, None if priority is None else np.asarray(priority)[k - kept:])
        return k

    def empty_batch(self, batch_size: int) -> Batch:
        """Preallocated arrays of the right shapes and dtypes, for ``sample(..., out=)``."""
        arrays = self._ring.arrays
        return Batch(*(np.empty((batch_size, *arrays[k].shape[1:]), arrays[k].dtype)
                       for k in FIELDS))

    def _gather(self, idx: np.ndarray, out: Batch | None) -> Batch:
        # Indices are in range by construction; mode="clip" spares np.take the buffered copy
        # that mode="raise" makes when out= is given.
        arrays = self._ring.arrays
        if out is None:
            return Batch(*(np.take(arrays[k], idx, axis=0, mode="clip") for k in FIELDS))
        for k, dst in zip(FIELDS, out):
            np.take(arrays[k], idx, axis=0, out=dst, mode="clip")
        return out

    def transitions(self) -> Transitions:
        """Stored transitions, oldest first (copies); with priorities, their ``priority`` too."""
        idx = self._ring.oldest_first()
        out = {k: v[idx] for k, v in self._ring.arrays.items()}
        if self.priorities is not None:
            out["priority"] = self.priorities.p[idx]
        return out

    def extend(self, transitions: Transitions) -> int:
        """Append transitions (oldest first); beyond capacity the newest are kept.

        Bypasses the n-step accumulator: rows are complete transitions. A ``priority`` column (an
        elastic resume of a prioritized shard) is kept; without it rows get the running maximum.
        Returns rows given.
        """
        rows = {k: np.asarray(v) for k, v in transitions.items()}
        return self._write(rows, rows.get("priority"))

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Flat ``ring/...`` and ``nstep/...`` entries (HDF5-ready names); with priorities also
        ``ring/priority`` (per slot) and ``ring/max_priority``.

        Ring arrays are views of the filled part: write them out before the next ``add``.
        """
        d = {**self._ring.state_dict(), **self._nstep.state_dict()}
        if self.priorities is not None:
            d["ring/priority"] = self.priorities.p[:len(self)].copy()
            d["ring/max_priority"] = float(self.priorities.max_p)
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of a shard with equal settings; behaviour continues exactly.

        A prioritized shard loading a uniform one's state gives every row priority 1."""
        self._ring.load_state_dict(d)
        self._nstep.load_state_dict(d)
        if self.priorities is not None:
            if "ring/priority" in d:
                self.priorities.reload(np.asarray(d["ring/priority"]), float(d["ring/max_priority"]))
            else:
                self.priorities.reload(np.ones(len(self)), 1.0)

    @staticmethod
    def shard_capacity(global_capacity: int, world: int, rank: int) -> int:
        """This rank's share of ``global_capacity``; the remainder goes to the lowest ranks."""
        if world < 1:
            raise ValueError(f"world={world} must be >= 1")
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} is outside [0, {world})")
        if global_capacity < world:
            raise ValueError(f"global replay capacity {global_capacity} is smaller than "
                             f"world size {world}")
        base, rest = divmod(global_capacity, world)
        return base + (1 if rank < rest else 0)
