"""Per-rank cumulative wall time per phase of the loop (cheap enough for the hot path)."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np


class PhaseTimer:
    """Cumulative wall-clock seconds per phase of this rank: ``with timer("env"): ...``.

    The context managers are made once and reused, so a phase costs two ``perf_counter`` calls.
    A phase must not be entered while it is already running (its inner time would be lost); time
    spent in a phase nested inside another counts in both. Totals cover this process only: they
    restart at zero after a resume (the log's ``segment`` column tells the segments apart).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate phase names in {list(self.names)}")
        self._totals = [0.0] * len(self.names)
        self._phases = {name: _Phase(self._totals, i) for i, name in enumerate(self.names)}

    def __call__(self, name: str) -> _Phase:
        try:
            return self._phases[name]
        except KeyError:
            raise ValueError(f"unknown phase {name!r}; phases are {list(self.names)}") from None

    def add(self, name: str, seconds: float) -> None:
        """Count time measured elsewhere (e.g. an MPI wait reported by the comm layer)."""
        phase = self(name)
        phase.total[phase.index] += seconds

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-attribute time measured inside ``src`` (e.g. the Allreduce inside an update) to ``dst``."""
        self.add(src, -seconds)
        self.add(dst, seconds)

    def totals(self) -> np.ndarray:
        """Seconds per phase, in the order of ``names`` (a fresh float64 array)."""
        return np.array(self._totals, dtype=np.float64)


class _Phase:
    __slots__ = ("total", "index", "_start")

    def __init__(self, total: list[float], index: int) -> None:
        self.total = total
        self.index = index
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.total[self.index] += time.perf_counter() - self._start
