"""Seed-by-seed comparisons of two settings (numpy alone: the benchmarks use it without the report extra)."""
from __future__ import annotations

from typing import Any

import numpy as np


def paired_step_difference(steps: dict[Any, float], reference: dict[Any, float]) -> tuple[int, float, float]:
    """(seeds in both, mean, standard error) of ``steps[seed] - reference[seed]`` over the seeds both
    reached the score on: how many more env steps one setting needed than another on the same seeds. A
    mean within about two standard errors of 0 is seed noise, not a difference in learning. NaN where
    fewer than one (mean) or two (standard error) seeds pair."""
    diffs = np.array([steps[s] - reference[s] for s in steps if s in reference], dtype=np.float64)
    if not len(diffs):
        return 0, np.nan, np.nan
    stderr = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else np.nan
    return len(diffs), float(diffs.mean()), stderr
