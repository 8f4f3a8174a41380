"""Frame-deduplicated replay for image observations: every frame is stored once.

A stacked observation ``(k, *frame)`` (gymnasium ``FrameStackObservation``, oldest frame first) shares
``k - 1`` frames with the previous step's, and a transition's ``next_obs`` is a later step's obs. So
the shard keeps

- ``FrameRing``: one ring of frames for all envs of the rank (interleaved), each frame with ``prev``,
  the absolute index of the frame before it *in the same episode* (itself for an episode's first
  frame). A stack is rebuilt by following ``prev`` ``k - 1`` times from its newest frame; at an
  episode start the chain stops and the first frame repeats, exactly the padding of
  ``FrameStackObservation(padding_type="reset")``. No frame of an earlier episode can leak in.
- a transition table (a ring like ``TransitionRing``) of ``obs_idx`` and ``next_idx`` (the absolute
  indices of the newest frames of obs and next_obs), actions, n-step returns, discounts, and
  ``need`` (the oldest frame the row's stacks read; after ``extend``, the oldest any later moved row reads,
  so rows leave oldest first before a frame they read is overwritten);
- ``NStepAccumulator`` of :mod:`mpidqn.replay.shard`, fed with frame indices instead of observations, so the
  n-step semantics are those of ``ReplayShard`` exactly; ``UniformSampler`` draws the rows.

Bytes per transition: one frame (84*84 = 7,056 B for Atari) plus 8 B of ``prev``, 40 B of row
fields, and about 1 % spare frames (episode starts, stacks in flight): ~7.2 KB, against 56.4 KB for
rows with obs and next_obs (``ReplayShard``) and 28.2 KB for SB3's ``optimize_memory_usage``.

The frame ring holds ``capacity * 1.01 + D`` frames (``D`` covers the frames of the pending n-step
steps and stacks of all envs). Should frames be overwritten that the oldest rows still read (very
short episodes), those rows are dropped first: ``len()`` may then stay a little below capacity.

Checkpoints: ``state_dict`` holds the frame ring and the table (``ring/...`` with the attributes
``capacity``/``pos``/``size`` that ``replay_lengths`` reads, ``frames/...``, ``nstep/...``). An elastic
resume moves rows between shards as :class:`FrameRows`, which carry only the frames their stacks read
(no materialised stacks); ``interleave_frame_rows`` merges the rows of several old shards by age, with
their frames in the order the rows first read them; ``frame_rows_from_spans`` builds them from the parts of a saved shard that
hold those rows and their frames, so a loader need not read the whole shard. ``transitions()``
materialises the stacked rows (2 k frames per row: 56 KB per Atari row, 56 GB for 1M rows: for tests
and small shards only); ``extend`` accepts such materialised rows too and deduplicates their frames
again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpidqn.replay.priority import Priorities
from mpidqn.replay.shard import (
    FIELDS,
    Batch,
    NStepAccumulator,
    SlotSampling,
    Transitions,
    UniformSampler,
)

ROW_FIELDS = ("obs_idx", "next_idx", "actions", "rewards", "discounts", "need")


def chase(prev: np.ndarray, newest: np.ndarray, k: int, modulo: int | None = None) -> np.ndarray:
    """(B, k) indices of the stacks ending at ``newest``, oldest first, following ``prev`` pointers.

    ``prev`` is indexed by ``index % modulo`` (a ring) or directly (``modulo`` None).
    """
    out = np.empty((len(newest), k), np.int64)
    out[:, k - 1] = newest
    cur = np.asarray(newest, np.int64)
    for j in range(k - 2, -1, -1):
        cur = prev[cur % modulo] if modulo is not None else prev[cur]
        out[:, j] = cur
    return out


@dataclass
class FrameRows:
    """Transitions in compact form: a pool of frames with local ``prev`` pointers and rows that index it.

    Used to move rows between shards (elastic resume) without materialising stacks.
    """

    frames: np.ndarray
    """(M, *frame_shape) uint8, oldest first."""
    prev: np.ndarray
    """(M,) int64 local index of the previous frame of the stack (itself at an episode start)."""
    obs_idx: np.ndarray
    next_idx: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    discounts: np.ndarray
    priority: np.ndarray | None = None
    """(B,) float64 priorities of the rows of a prioritized shard, else None."""

    def __len__(self) -> int:
        return len(self.actions)

    def take(self, order: np.ndarray) -> "FrameRows":
        """The rows in ``order`` (the frame pool is shared)."""
        return FrameRows(self.frames, self.prev, self.obs_idx[order], self.next_idx[order],
                         self.actions[order], self.rewards[order], self.discounts[order],
                         None if self.priority is None else self.priority[order])

    @staticmethod
    def concat(parts: list["FrameRows"]) -> "FrameRows":
        """Rows of several pools, in order; frame pools are appended with shifted indices."""
        offsets = np.cumsum([0] + [len(p.frames) for p in parts[:-1]])
        cat = np.concatenate
        return FrameRows(
            cat([p.frames for p in parts]), cat([p.prev + o for p, o in zip(parts, offsets)]),
            cat([p.obs_idx + o for p, o in zip(parts, offsets)]), cat([p.next_idx + o for p, o in zip(parts, offsets)]),
            cat([p.actions for p in parts]), cat([p.rewards for p in parts]), cat([p.discounts for p in parts]),
            None if any(p.priority is None for p in parts) else cat([p.priority for p in parts]))


def _sub_pool(prev: np.ndarray, obs: np.ndarray, nxt: np.ndarray, k: int,
              modulo: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The frames the stacks ending at ``obs`` and ``nxt`` read, as a pool of their own.

    Returns the frames' indices (ascending, into ``prev``'s numbering), their ``prev`` pointers as pool
    indices (itself where the predecessor is outside the pool: never followed within ``k``), and
    ``obs``/``nxt`` as pool indices. ``modulo``: as for :func:`chase`.
    """
    needed = np.unique(np.concatenate([chase(prev, obs, k, modulo).ravel(), chase(prev, nxt, k, modulo).ravel()]))
    prev_abs = prev[needed % modulo] if modulo is not None else prev[needed]
    where = np.searchsorted(needed, prev_abs).clip(max=max(len(needed) - 1, 0))
    local = np.where(needed[where] == prev_abs, where, np.arange(len(needed)))
    return needed, local, np.searchsorted(needed, obs), np.searchsorted(needed, nxt)


def frame_rows_from_state(state: dict[str, Any], rows: np.ndarray) -> FrameRows:
    """The oldest-first ``rows`` of a saved frame shard (``state_dict`` as a nested tree) as FrameRows."""
    ring, fr = state["ring"], state["frames"]
    cap, pos, size = int(ring["capacity"]), int(ring["pos"]), int(ring["size"])
    fcap, k = int(fr["capacity"]), int(fr["stack"])
    slots = ((pos - size) % cap + np.asarray(rows, np.int64)) % cap
    needed, prev, obs_idx, next_idx = _sub_pool(np.asarray(fr["prev"]), np.asarray(ring["obs_idx"])[slots],
                                                np.asarray(ring["next_idx"])[slots], k, fcap)
    frames = np.asarray(fr["frames"])[needed % fcap]
    return FrameRows(frames, prev, obs_idx, next_idx, np.asarray(ring["actions"])[slots],
                     np.asarray(ring["rewards"])[slots], np.asarray(ring["discounts"])[slots])


def interleave_frame_rows(parts: list[FrameRows], source: np.ndarray, stack: int) -> FrameRows:
    """Rows of several pools in one order, their frames laid out in the order the rows first read them.

    Row ``i`` of the result is the next row not yet taken of ``parts[source[i]]`` (each part's rows keep
    their order; an elastic resume gives its old shards' rows interleaved by age). A frame's place in
    the new pool is the first row whose stacks read it, so the oldest frame a row reads rises with the
    row's place (up to a few rows) as in a shard filled by ``add``: a ring that overwrites its oldest
    frames then loses the oldest rows of every part alike, never the rows of one part whatever their
    age (issue #35). Frames no row reads are left out; each frame is copied once.
    """
    if not parts:
        raise ValueError("no parts to interleave")
    source = np.asarray(source, np.int64)
    counts = np.bincount(source, minlength=len(parts))[:len(parts)]
    if len(source) and (source.min() < 0 or any(int(c) != len(p) for c, p in zip(counts, parts))):
        raise ValueError(f"source takes {counts.tolist()} rows of parts of {[len(p) for p in parts]} rows")
    sizes = np.array([len(p.frames) for p in parts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cat = np.concatenate
    prev_all = cat([p.prev + o for p, o in zip(parts, offsets)])
    order = np.empty(len(source), np.int64)  # result row -> row of the parts, one after the other
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for i in range(len(parts)):
        order[source == i] = firsts[i] + np.arange(counts[i])
    obs = cat([p.obs_idx + o for p, o in zip(parts, offsets)])[order]
    nxt = cat([p.next_idx + o for p, o in zip(parts, offsets)])[order]
    first_use = np.full(len(prev_all), len(order), np.int64)
    for newest in (obs, nxt):
        np.minimum.at(first_use, chase(prev_all, newest, stack).ravel(), np.repeat(np.arange(len(order)), stack))
    layout = np.argsort(first_use, kind="stable")  # by first reader; a part's frames keep their age order
    layout = layout[first_use[layout] < len(order)]
    back = np.full(len(prev_all), -1, np.int64)
    back[layout] = np.arange(len(layout))
    prev = back[prev_all[layout]]
    prev = np.where(prev >= 0, prev, np.arange(len(layout)))  # a predecessor no stack reads: never followed
    frames = np.empty((len(layout), *parts[0].frames.shape[1:]), parts[0].frames.dtype)
    owner = np.searchsorted(offsets, layout, side="right") - 1
    for i, part in enumerate(parts):
        mine = np.flatnonzero(owner == i)
        frames[mine] = part.frames[layout[mine] - offsets[i]]
    field = lambda name: cat([getattr(p, name) for p in parts])[order]  # noqa: E731
    priority = None if any(p.priority is None for p in parts) else field("priority")
    return FrameRows(frames, prev, back[obs], back[nxt], field("actions"), field("rewards"), field("discounts"),
                     priority)


def frame_rows_from_spans(cols: dict[str, np.ndarray], spans: list[tuple[int, np.ndarray, np.ndarray]],
                          stack: int) -> FrameRows:
    """FrameRows of rows of a saved frame shard read in part: what ``frame_rows_from_state`` gives for them.

    ``cols``: the rows' table columns (``obs_idx``, ``next_idx`` absolute frame indices, ``actions``,
    ``rewards``, ``discounts``), in the order wanted. ``spans``: ``(first, frames, prev)`` pieces of the
    frame ring, each the frames and ``prev`` pointers of the absolute indices ``first, first + 1, ...``,
    ascending and disjoint; together they hold every frame the rows' stacks read (a chronological block
    of rows reads the frames from its oldest ``need`` to its newest ``next_idx``). Raises ValueError if a
    stack reads a frame outside the spans.
    """
    if not spans:
        raise ValueError("no frame spans given")
    starts = np.array([first for first, _, _ in spans], np.int64)
    lengths = np.array([len(f) for _, f, _ in spans], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    prev_all = np.concatenate([np.asarray(p, np.int64) for _, _, p in spans])

    def local(absolute: np.ndarray) -> np.ndarray:
        """Absolute frame indices -> indices into the concatenated spans."""
        i = np.searchsorted(starts, absolute, side="right") - 1
        inside = (i >= 0) & (absolute - starts[i.clip(0)] < lengths[i.clip(0)])
        if not inside.all():
            raise ValueError(f"frame {int(absolute[~inside][0])} is outside the frame spans read")
        return offsets[i] + absolute - starts[i]

    def stacks(newest: np.ndarray) -> np.ndarray:
        out = np.empty((len(newest), stack), np.int64)
        out[:, stack - 1] = cur = np.asarray(newest, np.int64)
        for j in range(stack - 2, -1, -1):
            cur = prev_all[local(cur)]
            out[:, j] = cur
        return out

    obs_abs, next_abs = np.asarray(cols["obs_idx"], np.int64), np.asarray(cols["next_idx"], np.int64)
    needed = np.unique(np.concatenate([stacks(obs_abs).ravel(), stacks(next_abs).ravel()]))
    at = local(needed)  # ascending, as ``needed``
    prev_abs = prev_all[at]
    where = np.searchsorted(needed, prev_abs).clip(max=max(len(needed) - 1, 0))
    prev = np.where(needed[where] == prev_abs, where, np.arange(len(needed)))  # as frame_rows_from_state
    cuts = np.searchsorted(at, offsets[1:])
    frames = np.concatenate([np.asarray(f)[part - o] for (_, f, _), part, o in zip(spans, np.split(at, cuts), offsets)])
    return FrameRows(frames, prev, np.searchsorted(needed, obs_abs), np.searchsorted(needed, next_abs),
                     np.asarray(cols["actions"]), np.asarray(cols["rewards"]), np.asarray(cols["discounts"]),
                     np.asarray(cols["priority"], np.float64) if "priority" in cols else None)


def frame_rows_from_transitions(t: Transitions, stack: int, frame_shape: tuple[int, ...]) -> FrameRows:
    """Materialised stacked transitions -> FrameRows, storing each distinct stack's newest frame once.

    A stack whose first ``k - 1`` frames are the last ``k - 1`` of a stack seen before is linked to it;
    otherwise its frames are written as a new chain (leading repeats collapsed, which reproduces the
    same values: padding repeats the first frame).
    """
    k = stack
    n = len(t["actions"])
    obs = np.asarray(t["obs"]).reshape(n, k, *frame_shape)
    nxt = np.asarray(t["next_obs"]).reshape(n, k, *frame_shape)
    frames: list[np.ndarray] = []
    prev: list[int] = []
    by_stack: dict[bytes, int] = {}  # bytes of a whole stack -> its newest frame
    by_tail: dict[bytes, int] = {}  # bytes of the last k - 1 frames of a stack -> its newest frame

    def add(frame: np.ndarray, parent: int | None) -> int:
        frames.append(frame)
        prev.append(len(frames) - 1 if parent is None else parent)
        return len(frames) - 1

    def intern(s: np.ndarray) -> int:
        key = s.tobytes()
        if key in by_stack:
            return by_stack[key]
        parent = by_tail.get(s[:-1].tobytes()) if k > 1 else None
        if parent is not None:
            q = add(s[-1], parent)
        else:
            first = 0
            while first + 1 < k and np.array_equal(s[first + 1], s[0]):
                first += 1
            q = add(s[first], None)
            for j in range(first + 1, k):
                q = add(s[j], q)
        by_stack[key] = q
        if k > 1:
            by_tail[s[1:].tobytes()] = q
        return q

    obs_idx = np.array([intern(obs[i]) for i in range(n)], np.int64)
    next_idx = np.array([intern(nxt[i]) for i in range(n)], np.int64)
    pool = np.stack(frames) if frames else np.zeros((0, *frame_shape), np.uint8)
    return FrameRows(pool.astype(np.uint8, copy=False), np.array(prev, np.int64), obs_idx, next_idx,
                     np.asarray(t["actions"], np.int64), np.asarray(t["rewards"], np.float32),
                     np.asarray(t["discounts"], np.float32))


class FrameRing:
    """Ring of frames with absolute indices; ``prev[i % capacity]`` links a frame to its predecessor."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...]) -> None:
        if capacity <= 0:
            raise ValueError(f"frame capacity={capacity} must be > 0")
        self.capacity = int(capacity)
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.frames = np.zeros((self.capacity, *self.frame_shape), np.uint8)
        self.prev = np.zeros(self.capacity, np.int64)
        self.written = 0

    def write(self, frames: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """Append frames (``prev``: absolute indices, may point into this call); return their indices."""
        m = len(frames)
        idx = self.written + np.arange(m, dtype=np.int64)
        slots = idx % self.capacity
        self.frames[slots] = frames
        self.prev[slots] = prev
        self.written += m
        return idx

    @property
    def oldest_alive(self) -> int:
        """Smallest absolute index not yet overwritten."""
        return max(0, self.written - self.capacity)

    def state_dict(self) -> dict[str, np.ndarray | int]:
        filled = min(self.written, self.capacity)
        return {"frames/frames": self.frames[:filled], "frames/prev": self.prev[:filled],
                "frames/capacity": self.capacity, "frames/written": self.written}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if int(d["frames/capacity"]) != self.capacity:
            raise ValueError(f"frames/capacity={int(d['frames/capacity'])} differs from this shard's "
                             f"{self.capacity}; re-shard with FrameRows instead")
        frames = np.asarray(d["frames/frames"])
        self.frames[:len(frames)] = frames
        self.prev[:len(frames)] = np.asarray(d["frames/prev"])
        self.written = int(d["frames/written"])


class FrameReplayShard(SlotSampling):
    """This rank's replay shard for image observations; the interface of ``ReplayShard``."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, num_envs: int,
                 n_step: int = 1, gamma: float = 0.99, stack: int = 1,
                 frame_capacity: int | None = None, priority: tuple[float, float] | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} must be > 0")
        if np.dtype(obs_dtype) != np.uint8:
            raise ValueError(f"frame replay stores uint8 frames, got obs dtype {np.dtype(obs_dtype)}")
        obs_shape = tuple(int(d) for d in obs_shape)
        if stack < 1 or (stack > 1 and (len(obs_shape) < 2 or obs_shape[0] != stack)):
            raise ValueError(f"stack={stack} does not match obs shape {obs_shape} (stack axis first)")
        self.obs_shape, self.obs_dtype, self.stack = obs_shape, np.dtype(np.uint8), int(stack)
        self.frame_shape = obs_shape[1:] if stack > 1 else obs_shape
        self._nstep = NStepAccumulator(num_envs, n_step, gamma, (), np.int64)
        self.num_envs, self.n_step, self.gamma = self._nstep.num_envs, self._nstep.n_step, self._nstep.gamma
        # frames written per step <= num_envs * (stack + 1); a row's oldest frame is at most
        # n_step + stack steps older than the row: rows that old or older are in flight.
        self.in_flight = self.num_envs * (self.stack + 1) * (self.n_step + self.stack + 1)
        if frame_capacity is None:
            frame_capacity = capacity + capacity // 100 + self.in_flight
        if frame_capacity <= self.in_flight:
            raise ValueError(f"frame_capacity={frame_capacity} must exceed the {self.in_flight} frames in flight")
        self._frames = FrameRing(frame_capacity, self.frame_shape)
        self.capacity = int(capacity)
        self._rows = {"obs_idx": np.zeros(capacity, np.int64), "next_idx": np.zeros(capacity, np.int64),
                      "actions": np.zeros(capacity, np.int64), "rewards": np.zeros(capacity, np.float32),
                      "discounts": np.zeros(capacity, np.float32), "need": np.zeros(capacity, np.int64)}
        self.pos = self.size = self.filled = self.num_added = 0
        self._sampler = UniformSampler()
        self.priorities = Priorities(capacity, *priority) if priority is not None else None
        self._cur = np.zeros(self.num_envs, np.int64)  # newest frame of each env's current obs
        self._fresh = np.ones(self.num_envs, bool)  # the next obs of this env starts a new chain

    def __len__(self) -> int:
        return self.size

    @property
    def frame_capacity(self) -> int:
        return self._frames.capacity

    def nbytes(self) -> int:
        """Bytes of the preallocated storage (frames, pointers, rows; the n-step queues are tiny)."""
        return int(self._frames.frames.nbytes + self._frames.prev.nbytes + sum(a.nbytes for a in self._rows.values()))

    # ------------------------------------------------------------------ adding
    def _as_stacks(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs).reshape(len(obs), self.stack, *self.frame_shape)

    def _write_chain(self, s: np.ndarray) -> int:
        """A stack of a new chain (episode start or first sight): leading repeats stored once."""
        first = 0
        while first + 1 < self.stack and np.array_equal(s[first + 1], s[0]):
            first += 1
        base = self._frames.written
        m = self.stack - first
        prev = base + np.arange(m) - 1
        prev[0] = base
        return int(self._frames.write(s[first:], prev)[-1])

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray, truncated: np.ndarray) -> int:
        """Add one vector-env step (as ``ReplayShard.add``: ``next_obs`` the TRUE next observation)."""
        obs_s, next_s = self._as_stacks(obs), self._as_stacks(next_obs)
        expected = (self.num_envs, self.stack, *self.frame_shape)
        if obs_s.shape != expected or next_s.shape != expected:
            raise ValueError(f"obs/next_obs have shapes {np.shape(obs)}/{np.shape(next_obs)}, "
                             f"expected {(self.num_envs, *self.obs_shape)}")
        for e in np.flatnonzero(self._fresh):
            self._cur[e] = self._write_chain(obs_s[e])
        new = self._frames.write(next_s[:, -1], self._cur)
        done = np.asarray(terminated, bool) | np.asarray(truncated, bool)
        rows = self._nstep.push(self._cur.copy(), actions, rewards, new, terminated, truncated)
        self._cur[:] = new
        self._fresh[:] = done  # the autoreset obs of the next call starts a new chain
        return self._write_rows(rows["obs"], rows["next_obs"], rows["actions"], rows["rewards"], rows["discounts"])

    def drop_pending(self) -> None:
        """Forget pending n-step steps and start new frame chains (envs restarted, see ReplayShard)."""
        super().drop_pending()
        self._fresh[:] = True

    def _write_rows(self, obs_idx: np.ndarray, next_idx: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                    discounts: np.ndarray, need: np.ndarray | None = None, priority: np.ndarray | None = None) -> int:
        k = len(actions)
        if need is None:
            need = chase(self._frames.prev, obs_idx, self.stack, self._frames.capacity)[:, 0]
        cols = {"obs_idx": obs_idx, "next_idx": next_idx, "actions": actions, "rewards": rewards,
                "discounts": discounts, "need": need}
        skip = max(0, k - self.capacity)
        slots = (self.pos + np.arange(k - skip)) % self.capacity
        for name, arr in self._rows.items():
            arr[slots] = np.asarray(cols[name])[skip:]
        if self.priorities is not None:
            self.priorities.written(slots, None if priority is None else np.asarray(priority)[skip:])
        self.pos = (self.pos + k - skip) % self.capacity
        self.size = min(self.size + k - skip, self.capacity)
        self.filled = max(self.filled, min(self.capacity, self.filled + k - skip))
        self.num_added += k
        self._evict()
        return k

    def _evict(self) -> None:
        """Drop the oldest rows whose frames are (nearly) overwritten; see the module docstring."""
        limit = self._frames.oldest_alive + self.in_flight
        need = self._rows["need"]
        while self.size and self._frames.oldest_alive > 0 and need[(self.pos - self.size) % self.capacity] < limit:
            if self.priorities is not None:
                self.priorities.dropped(np.array([(self.pos - self.size) % self.capacity]))
            self.size -= 1

    # ------------------------------------------------------------------ sampling
    def _slots(self, idx: np.ndarray) -> np.ndarray:
        """Sampler offsets -> physical slots (identity while no row was dropped before a wrap)."""
        if self.size == self.capacity or self.pos == self.size:
            return idx
        return (self.pos - self.size + idx) % self.capacity

    def empty_batch(self, batch_size: int) -> Batch:
        b = batch_size
        return Batch(np.empty((b, *self.obs_shape), np.uint8), np.empty(b, np.int64), np.empty(b, np.float32),
                     np.empty((b, *self.obs_shape), np.uint8), np.empty(b, np.float32))

    def _stack_into(self, newest: np.ndarray, dst: np.ndarray) -> None:
        ring = self._frames
        idx = chase(ring.prev, newest, self.stack, ring.capacity) % ring.capacity
        np.take(ring.frames, idx.ravel(), axis=0, out=dst.reshape(-1, *self.frame_shape), mode="clip")

    def _gather(self, slots: np.ndarray, out: Batch | None) -> Batch:
        out = out if out is not None else self.empty_batch(len(slots))
        r = self._rows
        self._stack_into(r["obs_idx"][slots], out.obs)
        self._stack_into(r["next_idx"][slots], out.next_obs)
        np.take(r["actions"], slots, out=out.actions, mode="clip")
        np.take(r["rewards"], slots, out=out.rewards, mode="clip")
        np.take(r["discounts"], slots, out=out.discounts, mode="clip")
        return out

    # ------------------------------------------------------------------ re-sharding
    def oldest_first(self) -> np.ndarray:
        return ((self.pos - self.size) % self.capacity + np.arange(self.size)) % self.capacity

    def transitions(self) -> Transitions:
        """Stored rows oldest first, MATERIALISED (2 stacks per row: for tests and small shards)."""
        idx = self.oldest_first()
        out = dict(zip(FIELDS, self._gather(idx, None)))
        if self.priorities is not None:
            out["priority"] = self.priorities.p[idx]
        return out

    def extend(self, rows: Transitions | FrameRows) -> int:
        """Append rows oldest first (FrameRows, or materialised transitions whose frames are
        deduplicated again); beyond capacity the newest are kept. Bypasses the n-step accumulator.

        A row's ``need`` becomes the oldest frame that it or any later row of ``rows`` reads, so the rows
        leave oldest first (``_evict``) before a frame any of them reads is overwritten, whatever the
        pool's order (issue #35: the pools of an elastic resume). Where the pool exceeds the frame ring,
        the oldest rows whose frames do not fit are left out. Returns the rows given."""
        if not isinstance(rows, FrameRows):
            priority = rows.get("priority")
            rows = frame_rows_from_transitions(rows, self.stack, self.frame_shape)
            rows.priority = None if priority is None else np.asarray(priority, np.float64)
        if len(rows) == 0:
            return 0
        reads = np.minimum(chase(rows.prev, rows.obs_idx, self.stack).min(axis=1),
                           chase(rows.prev, rows.next_idx, self.stack).min(axis=1))
        need = np.minimum.accumulate(reads[::-1])[::-1]
        lo = max(0, len(rows.frames) - self._frames.capacity)  # frames below lo would be overwritten at once
        keep = need >= lo
        base = self._frames.written - lo  # pool frame i gets the absolute index base + i
        prev = np.where(rows.prev >= lo, rows.prev, np.arange(len(rows.prev)))[lo:]  # below lo: never followed
        self._frames.write(rows.frames[lo:], base + prev)
        kept = rows.take(np.flatnonzero(keep))
        if len(kept):
            self._write_rows(base + kept.obs_idx, base + kept.next_idx, kept.actions, kept.rewards,
                             kept.discounts, base + need[keep], kept.priority)
        self._compact()
        return len(rows)

    def _compact(self) -> None:
        """Keep only rows whose frames are all alive (re-laid oldest first from slot 0)."""
        idx = self.oldest_first()
        keep = idx[self._rows["need"][idx] >= self._frames.oldest_alive]
        if len(keep) == self.size:
            return
        for arr in self._rows.values():
            arr[:len(keep)] = arr[keep]
        if self.priorities is not None:
            self.priorities.reload(self.priorities.p[keep], self.priorities.max_p)
        self.size = self.filled = len(keep)
        self.pos = self.size % self.capacity

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Flat ``ring/...``, ``frames/...``, ``nstep/...`` entries (views: save before the next add)."""
        d: dict[str, np.ndarray | int] = {f"ring/{k}": v[:self.filled] for k, v in self._rows.items()}
        d.update({"ring/capacity": self.capacity, "ring/pos": self.pos, "ring/size": self.size,
                  "ring/filled": self.filled, "ring/num_added": self.num_added})
        d.update(self._frames.state_dict())
        d.update({"frames/stack": self.stack, "frames/cur": self._cur.copy(),
                  "frames/fresh": self._fresh.astype(np.uint8)})
        d.update(self._nstep.state_dict())
        if self.priorities is not None:
            d["ring/priority"] = self.priorities.p[:self.filled].copy()
            d["ring/max_priority"] = float(self.priorities.max_p)
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of a shard with equal settings; behaviour continues exactly."""
        if int(d["ring/capacity"]) != self.capacity:
            raise ValueError(f"ring/capacity={int(d['ring/capacity'])} differs from this shard's capacity "
                             f"{self.capacity}; re-shard with frame_rows_from_state()/extend() instead")
        if int(d["frames/stack"]) != self.stack:
            raise ValueError(f"frames/stack={int(d['frames/stack'])} differs from this shard's {self.stack}")
        self.filled = int(d["ring/filled"])
        for k, arr in self._rows.items():
            arr[:self.filled] = np.asarray(d[f"ring/{k}"])
        self.pos, self.size, self.num_added = int(d["ring/pos"]), int(d["ring/size"]), int(d["ring/num_added"])
        self._frames.load_state_dict(d)
        self._cur[:] = np.asarray(d["frames/cur"])
        self._fresh[:] = np.asarray(d["frames/fresh"]).astype(bool)
        self._nstep.load_state_dict(d)
        if self.priorities is not None:
            if "ring/priority" in d:
                self.priorities.reload(np.asarray(d["ring/priority"]), float(d["ring/max_priority"]))
            else:
                self.priorities.reload(np.ones(self.filled), 1.0)
                self.priorities.dropped(np.setdiff1d(np.arange(self.filled), self.oldest_first()))


def make_replay_shard(storage: str, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, num_envs: int,
                      n_step: int, gamma: float, stack: int, priority: tuple[float, float] | None = None) -> Any:
    """``ReplayShard`` or ``FrameReplayShard`` for ``train.replay_storage`` (auto: frames for uint8
    observations with 2 or more dimensions)."""
    from mpidqn.replay.shard import ReplayShard

    if storage == "auto":
        storage = "frames" if np.dtype(obs_dtype) == np.uint8 and len(obs_shape) >= 2 else "transitions"
    if storage == "frames":
        return FrameReplayShard(capacity, obs_shape, obs_dtype, num_envs, n_step, gamma, stack, priority=priority)
    return ReplayShard(capacity, obs_shape, obs_dtype, num_envs, n_step, gamma, priority)
