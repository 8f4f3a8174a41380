"""Offline analysis of run logs: load runs into pandas, tidy and summary tables, plots, ``report``.

pandas and matplotlib live behind the ``report`` extra (``pip install 'mpidqn[report]'``): importing
this package does not import them, so the command line can always import :func:`report_main`.

    runs.py    Run, load_run: one run directory -> metadata, config and DataFrames
    tables.py  tidy, summary, per-rank time breakdown, grouping of runs that differ only by seed
    curves.py  seed aggregation: interquartile mean and bootstrap interval (scipy.stats.bootstrap)
    plots.py   the PNG plots (matplotlib Figure objects, no pyplot state)
    export.py  ``report --tensorboard``: log.h5 -> TensorBoard event files (the tensorboard extra only)
    report.py  ``python -m mpidqn report RUN_DIR [RUN_DIR ...] [--out DIR]``
"""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from mpidqn.errors import EXIT_FAILURE

if TYPE_CHECKING:
    from mpidqn.analysis.runs import Run, RunLoadError, load_run
    from mpidqn.analysis.tables import summary, tidy

__all__ = ["Run", "RunLoadError", "load_run", "report_main", "summary", "tidy"]
_LAZY = {"Run": "runs", "RunLoadError": "runs", "load_run": "runs", "summary": "tables", "tidy": "tables"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def report_main(argv: list[str]) -> int:
    """``mpidqn report`` (arguments after ``report``); returns the exit code."""
    if "--tensorboard" in argv:  # a conversion, without the report extra's pandas and matplotlib
        from mpidqn.analysis.export import tensorboard_main

        return tensorboard_main(argv)
    try:
        from mpidqn.analysis.report import main
    except ImportError as err:
        if (err.name or "").split(".")[0] not in ("pandas", "matplotlib", "scipy"):
            raise
        print(f"mpidqn report: needs {err.name}: pip install 'mpidqn[report]'", file=sys.stderr)
        return EXIT_FAILURE
    return main(argv)
