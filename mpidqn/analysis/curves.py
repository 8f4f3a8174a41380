"""Aggregating one curve per seed into a mean and a bootstrap confidence band (numpy only)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

N_BOOTSTRAP = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


class Band(NamedTuple):
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int


def common_grid(xs: Sequence[np.ndarray]) -> np.ndarray:
    """Every x of every curve inside the range all curves cover (no extrapolation)."""
    lo = max(float(np.min(x)) for x in xs)
    hi = min(float(np.max(x)) for x in xs)
    grid = np.unique(np.concatenate(xs))
    return grid[(grid >= lo) & (grid <= hi)]


def bootstrap_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int = N_BOOTSTRAP,
                   confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> Band:
    """Mean over curves ``(x, y)`` (x increasing) on their common grid, with a percentile bootstrap
    band: resample the curves (seeds) with replacement ``n_boot`` times, average each resample.

    One curve gives a band of zero width. Seeded, so a report is reproducible.
    """
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        empty = np.empty(0)
        return Band(empty, empty, empty, empty, 0)
    grid = common_grid([x for x, _ in curves])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # (curves, points)
    n = len(curves)
    mean = ys.mean(axis=0)
    if n == 1:
        return Band(grid, mean, mean.copy(), mean.copy(), 1)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # (boot, curves)
    means = counts @ ys / n  # the mean of each resample, (boot, points)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return Band(grid, mean, low, high, n)
