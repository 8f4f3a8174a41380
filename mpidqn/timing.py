"""Per-rank cumulative wall time per phase of the loop (cheap enough for the hot path)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np


class PhaseTimer:
    """``with timer("env"): ...`` adds the elapsed seconds to phase "env"; totals in a fixed order."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._totals = np.zeros(len(self.names), dtype=np.float64)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._totals[self._index[name]] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self._totals[self._index[name]] += seconds

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-attribute time measured inside ``src`` (e.g. the Allreduce inside an update) to ``dst``."""
        self._totals[self._index[src]] -= seconds
        self._totals[self._index[dst]] += seconds

    def totals(self) -> np.ndarray:
        return self._totals.copy()

    def load(self, totals: np.ndarray) -> None:
        self._totals[:] = totals
