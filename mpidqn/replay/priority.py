"""Prioritized replay maths: a vectorised sum/min tree, and exact sampling over sharded buffers.

Schaul et al. (2016): a transition with priority ``p_i`` is drawn with probability
``P(i) = p_i^alpha / sum_k p_k^alpha`` and its loss is weighted by ``w_i = (N P(i))^-beta / max_j w_j``.
The tree stores ``p_i^alpha`` (call it the *mass* of slot i); :class:`SumTree` keeps the sums and
minima of the masses so that drawing a batch and writing a batch of new priorities cost
``O(batch x log capacity)`` numpy work with no per-item Python loop.

Several shards (one per rank) form one buffer without moving a transition: every rank publishes its
shard's total mass and minimum mass (:class:`ShardMass`), all ranks draw the same split of the global
batch over the shards from a shared random stream (:func:`split_batch`, a multinomial: exactly the
shard choices of ``batch`` independent draws from the union), and each rank draws its own count inside
its shard. :func:`importance_weights` then uses the GLOBAL size and the GLOBAL minimum probability, so
the weights equal those of one process holding the union. With uniform replay the mass of a shard is
its size.

Pure numpy; no MPI here (the collective that exchanges :class:`ShardMass` lives with the learner).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SumTree:
    """Masses of ``capacity`` slots in a complete binary tree: sums and minima of every subtree.

    Node 1 is the root; node ``n`` has children ``2n`` and ``2n + 1``; slot ``i`` is leaf
    ``size + i`` where ``size`` is ``capacity`` rounded up to a power of two. Empty slots have mass 0
    in the sum tree and +inf in the min tree, so they are never drawn and never the minimum.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity} must be >= 1")
        self.capacity = int(capacity)
        self._size = 1 << max(0, (self.capacity - 1).bit_length())
        self._depth = self._size.bit_length() - 1
        self._sum = np.zeros(2 * self._size, dtype=np.float64)
        self._min = np.full(2 * self._size, np.inf, dtype=np.float64)

    @property
    def total(self) -> float:
        """Sum of all masses."""
        return float(self._sum[1])

    @property
    def min(self) -> float:
        """Smallest mass of a filled slot (+inf when no slot is filled)."""
        return float(self._min[1])

    def get(self, slots: np.ndarray) -> np.ndarray:
        """Masses of ``slots``."""
        return self._sum[self._size + np.asarray(slots, dtype=np.int64)]

    def set(self, slots: np.ndarray, masses: np.ndarray) -> None:
        """Write ``masses`` (>= 0, finite) at ``slots``; the last write wins for repeated slots."""
        slots = np.asarray(slots, dtype=np.int64).ravel()
        masses = np.broadcast_to(np.asarray(masses, dtype=np.float64), slots.shape)
        if slots.size == 0:
            return
        if slots.min() < 0 or slots.max() >= self.capacity:
            raise IndexError(f"slot out of range [0, {self.capacity})")
        if not np.all(np.isfinite(masses)) or np.any(masses < 0):
            raise ValueError("masses must be finite and >= 0")
        nodes = self._size + slots
        self._sum[nodes] = masses  # numpy fancy assignment: the last of repeated indices wins
        self._min[nodes] = np.where(masses > 0, masses, np.inf)
        if nodes.size == 1:  # one new transition per env step: a scalar walk up beats numpy calls
            self._set_path(int(nodes[0]) >> 1)
            return
        # Repeated parents need no dedupe: every copy writes the same value, computed from children
        # that are already final.
        nodes = nodes >> 1
        for _ in range(self._depth):
            left = nodes << 1
            self._sum[nodes] = self._sum[left] + self._sum[left + 1]
            self._min[nodes] = np.minimum(self._min[left], self._min[left + 1])
            nodes >>= 1

    def _set_path(self, node: int) -> None:
        """Recompute the ancestors from ``node`` up to the root (same sums as the vector path)."""
        total, low = self._sum, self._min
        while node:
            left = node << 1
            total[node] = total[left] + total[left + 1]
            low[node] = min(low[left], low[left + 1])
            node >>= 1

    def find(self, values: np.ndarray) -> np.ndarray:
        """Slots whose cumulative mass interval ``[c_i, c_i + m_i)`` holds each value in ``[0, total)``.

        Values at or beyond the total (rounding) land on the last slot with mass.
        """
        v = np.array(values, dtype=np.float64)
        node = np.ones(v.shape, dtype=np.int64)
        total = self._sum
        for _ in range(self._depth):
            node <<= 1  # the left child
            lmass = total[node]
            right = v >= lmass
            right &= total[node + 1] > 0  # rounding must not walk into an empty subtree
            v -= lmass * right
            node += right
        slots = node - self._size
        return np.minimum(slots, self.capacity - 1)

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` independent slots, slot i with probability mass_i / total."""
        if self.total <= 0:
            raise ValueError("cannot sample: no slot has a positive priority")
        return self.find(rng.random(count) * self.total)

    def state(self) -> dict[str, np.ndarray]:
        """The leaves (masses of the slots), enough to rebuild the tree."""
        return {"masses": self._sum[self._size:self._size + self.capacity].copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "SumTree":
        masses = np.asarray(state["masses"], dtype=np.float64)
        tree = cls(len(masses))
        tree.set(np.arange(len(masses)), masses)
        return tree


@dataclass(frozen=True)
class ShardMass:
    """What one shard tells the others before a global draw."""

    total: float  # sum of the masses (the size, for uniform replay)
    min: float  # smallest positive mass (+inf for an empty shard; 1 for uniform replay)
    size: int  # filled slots
    max_p: float = 1.0  # running maximum priority (1 for uniform replay)


def split_batch(masses: list[ShardMass], batch: int, rng: np.random.Generator,
                updates: int | None = None) -> np.ndarray:
    """How many of ``batch`` draws from the union fall in each shard (the same on every rank when
    ``rng`` is a shared stream). A multinomial over the shard masses: the shard choices of ``batch``
    independent draws from one buffer holding every shard, so counts differ between shards and
    between updates (a count of 0 included). ``updates``: that many independent splits, (updates, shards)."""
    totals = np.array([m.total for m in masses], dtype=np.float64)
    grand = totals.sum()
    if grand <= 0:
        raise ValueError("cannot sample: every replay shard is empty")
    return rng.multinomial(batch, totals / grand, size=updates)


def importance_weights(masses_drawn: np.ndarray, shards: list[ShardMass], beta: float) -> np.ndarray:
    """``w_i = (N P(i))^-beta / max_j w_j`` over the union of ``shards``, for drawn slot masses.

    ``N`` is the global number of filled slots, ``P(i) = mass_i / global total``, and the maximum
    weight belongs to the globally smallest mass, so every rank normalises the same way as a single
    process holding all shards would.
    """
    n = sum(m.size for m in shards)
    grand = sum(m.total for m in shards)
    smallest = min(m.min for m in shards)
    p = np.asarray(masses_drawn, dtype=np.float64) / grand
    max_w = (n * smallest / grand) ** (-beta)
    return ((n * p) ** (-beta) / max_w).astype(np.float32)


class Priorities:
    """The priorities of one shard's slots and their sum/min tree (:class:`SumTree` of ``p ** alpha``).

    ``p`` (``|delta| + eps`` after an update, the running maximum for a new transition) is kept per
    slot in float64, so a checkpoint stores ``p`` and the tree is rebuilt from it exactly (every inner
    node is the sum/min of its children, a function of the leaves), also under another ``alpha``.
    ``max_p`` is the running maximum priority; in global sampling the trainer raises it to the
    maximum over all shards (:meth:`raise_max`) before new transitions are written.
    """

    def __init__(self, capacity: int, alpha: float, eps: float) -> None:
        if alpha < 0:
            raise ValueError(f"priority alpha {alpha} must be >= 0")
        if eps <= 0:
            raise ValueError(f"priority eps {eps} must be > 0")
        self.alpha, self.eps = float(alpha), float(eps)
        self.tree = SumTree(capacity)
        self.p = np.zeros(capacity, dtype=np.float64)
        self.max_p = 1.0

    def _mass(self, p: np.ndarray) -> np.ndarray:
        return np.power(p, self.alpha)

    def written(self, slots: np.ndarray, p: np.ndarray | None = None) -> None:
        """New rows at ``slots``: the running maximum priority (or the given ``p``, e.g. carried by an
        elastic resume)."""
        slots = np.asarray(slots, dtype=np.int64)
        p = np.full(slots.shape, self.max_p) if p is None else np.asarray(p, dtype=np.float64)
        self.p[slots] = p
        self.tree.set(slots, self._mass(p))

    def dropped(self, slots: np.ndarray) -> None:
        """Rows gone from ``slots`` (never drawn again until written)."""
        slots = np.asarray(slots, dtype=np.int64)
        self.p[slots] = 0.0
        self.tree.set(slots, 0.0)

    def update(self, slots: np.ndarray, td_abs: np.ndarray) -> None:
        """After an update: ``p = |delta| + eps`` of the drawn slots (the last of repeated slots wins)."""
        p = np.asarray(td_abs, dtype=np.float64) + self.eps
        if p.size == 0:
            return
        if not np.all(np.isfinite(p)):
            raise ValueError("non-finite TD error given as a priority")
        self.p[np.asarray(slots, dtype=np.int64)] = p
        self.tree.set(slots, self._mass(p))
        self.max_p = max(self.max_p, float(p.max()))

    def raise_max(self, value: float) -> None:
        self.max_p = max(self.max_p, float(value))

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return self.tree.sample(count, rng)

    def masses(self, slots: np.ndarray) -> np.ndarray:
        return self.tree.get(slots)

    def shard_mass(self, size: int) -> ShardMass:
        return ShardMass(self.tree.total, self.tree.min, int(size), self.max_p)

    def reload(self, p: np.ndarray, max_p: float) -> None:
        """Restore every slot's priority (0 = empty) and the running maximum."""
        p = np.asarray(p, dtype=np.float64)
        self.p[:] = 0.0
        self.p[:len(p)] = p
        self.tree = SumTree(self.tree.capacity)
        filled = np.flatnonzero(self.p > 0)
        self.tree.set(filled, self._mass(self.p[filled]))
        self.max_p = float(max_p)
