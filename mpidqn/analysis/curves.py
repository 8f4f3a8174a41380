"""Aggregating seeds: the interquartile mean (IQM) with a percentile bootstrap confidence interval.

The IQM (mean of the middle 50 % of runs) and a bootstrap over runs follow Agarwal et al. 2021
("Deep RL at the edge of the statistical precipice"). The bootstrap is ``scipy.stats.bootstrap``,
vectorised over the points of a curve. Runs of one setting share one task, so the stratified
bootstrap of that paper (resampling runs within each task) is this plain bootstrap over seeds.
(rliable itself was tried: rliable 1.2.0 installs, but its dependency arch 7.2.0 fails to import
with pandas 3.)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats

N_BOOTSTRAP = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


class Band(NamedTuple):
    x: np.ndarray
    center: np.ndarray
    """IQM over the runs at every x."""
    low: np.ndarray
    high: np.ndarray
    n: int


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean: the mean of the values between the 25th and 75th percentiles."""
    return stats.trim_mean(values, 0.25, axis=axis)


def iqm_interval(values: np.ndarray, n_boot: int = N_BOOTSTRAP, confidence: float = CONFIDENCE,
                 seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM over axis 0 (runs) with a percentile bootstrap interval; one run gives a zero-width one.

    Seeded, so a report is reproducible.
    """
    values = np.asarray(values, dtype=float)
    center = iqm(values, axis=0)
    if len(values) < 2 or np.all(values == values[:1]):
        return center, center.copy(), center.copy()
    res = stats.bootstrap((values,), iqm, axis=0, vectorized=True, n_resamples=n_boot,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return center, np.minimum(res.confidence_interval.low, center), np.maximum(res.confidence_interval.high, center)


def common_grid(xs: Sequence[np.ndarray]) -> np.ndarray:
    """Every x of every curve inside the range all curves cover (no extrapolation)."""
    lo = max(float(np.min(x)) for x in xs)
    hi = min(float(np.max(x)) for x in xs)
    grid = np.unique(np.concatenate(xs))
    return grid[(grid >= lo) & (grid <= hi)]


def iqm_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int = N_BOOTSTRAP,
             confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> Band:
    """IQM over curves ``(x, y)`` (x increasing) on their common grid, with a bootstrap band over
    the curves (seeds)."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        empty = np.empty(0)
        return Band(empty, empty, empty, empty, 0)
    grid = common_grid([x for x, _ in curves])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # (curves, points)
    center, low, high = iqm_interval(ys, n_boot, confidence, seed)
    return Band(grid, center, low, high, len(curves))


def smooth(x: np.ndarray, y: np.ndarray, points: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A noisy per-episode series as the mean of ``y`` in ``points`` equal bins of ``x`` (empty bins
    dropped), so seeds with different episode boundaries can share one grid."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return x, y
    edges = np.linspace(x.min(), x.max(), points + 1)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, points - 1)
    counts = np.bincount(which, minlength=points)
    sums = np.bincount(which, weights=y, minlength=points)
    keep = counts > 0
    return (edges[:-1] + edges[1:])[keep] / 2, sums[keep] / counts[keep]
