"""A sweep directory in ``report``: its runs (from ``sweep.yaml``), a table of its configs ranked
by the interquartile mean of the final evaluation over seeds, and what did not finish."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mpidqn.io.sweeprecord import RECORD_NAME

RANK_BY = "final_eval_iqm"


def is_sweep(path: Path) -> bool:
    return (Path(path) / RECORD_NAME).is_file()


def sweep_runs(path: Path) -> tuple[list[Path], list[str]]:
    """The run directories of a sweep that have a log, and one note per run that did not finish."""
    data = yaml.safe_load((Path(path) / RECORD_NAME).read_text())
    dirs, notes = [], []
    for run in data["runs"]:
        run_dir = Path(path) / run["name"]
        if (run_dir / "log.h5").is_file():
            dirs.append(run_dir)
        if run["state"] == "failed":
            notes.append(f"run {run['name']} failed (exit {run['exit_code']}): {run['last_line']}")
        elif run["state"] != "finished":
            notes.append(f"run {run['name']} is {run['state']}: not finished, its numbers are partial")
    return dirs, notes


def ranked(aggregate: pd.DataFrame) -> pd.DataFrame:
    """The aggregate table best config first (by IQM of the final evaluation; none last), numbered."""
    order = aggregate.sort_values(RANK_BY, ascending=False, na_position="last", kind="stable")
    table = order[["setting", "runs", RANK_BY, "final_eval_ci_low", "final_eval_ci_high", "final_eval_min",
                   "wall_time_s"]].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table
