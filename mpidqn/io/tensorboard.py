"""TensorBoard event files from the rows of a run log (``log.tensorboard: true``, ``report --tensorboard``).

:class:`TensorBoardMirror` turns the rows of ``log.h5`` tables into TensorBoard scalars. During
training the :class:`~mpidqn.io.runlog.RunLog` hands it every block of rows it writes, so the events
hold exactly what the log holds, as the log is flushed; ``report --tensorboard`` hands it a whole
log read back (:func:`export_log`). Tags:

==================  ==========================================================================
train/<name>        every scalar column of ``/scalars`` (loss, q_mean, epsilon, learning_rate, ...)
rollout/...         episode_return (mean of the last 100 training episodes), episodes
speed/...           env_steps_per_s, updates_per_s, comm_share
eval/...            mean, std, min, max of each evaluation (``/evaluations``)
time/<phase>        cumulative seconds in each phase, averaged over the ranks (``/timings``)
time_share/<phase>  that phase's share of the time of all phases (same rows)
events (text)       diagnostics of ``/events``: resume, signal, nan, ...
==================  ==========================================================================

The x axis is the global env step; the wall time of an event is the log's creation time plus the
row's ``wall_time`` (so a resumed run's time axis leaves out the time it was not running).

A resumed run appends: the writer starts with ``purge_step = resume step + 1``, so TensorBoard
drops what an earlier segment wrote past the checkpoint it resumed from (those rows are also
dropped from ``log.h5``) and no step appears twice. A run dir without event files (TensorBoard
switched on at a resume) first gets the rows the log kept.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mpidqn.errors import UserError

INSTALL_HINT = 'pip install -e ".[tensorboard]"'
_GROUPS = {"episode_return": "rollout", "episodes": "rollout", "env_steps_per_s": "speed",
           "updates_per_s": "speed", "comm_share": "speed"}
_EVAL_FIELDS = ("mean", "std", "min", "max")
_TIMING_KEYS = ("segment", "step", "wall_time", "rank")


def summary_writer_class() -> type:
    """torch's SummaryWriter, or UserError naming the extra when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(f"TensorBoard output needs the tensorboard package ({e.name} is not installed): "
                        f"{INSTALL_HINT} (source checkout)") from None
    return SummaryWriter


def check_tensorboard(enabled: bool) -> None:
    """Refuse ``log.tensorboard: true`` when the extra is missing (before anything is written)."""
    if enabled:
        summary_writer_class()


def scalar_tag(name: str) -> str:
    """The TensorBoard tag of a ``/scalars`` column."""
    return f"{_GROUPS.get(name, 'train')}/{name}"


def scalar_points(rows: np.ndarray) -> list[tuple[str, float, int, float]]:
    """(tag, value, step, wall_time) of every set (non-NaN) value of ``/scalars`` rows."""
    names = [n for n in rows.dtype.names if n not in ("step", "wall_time")]
    return [(scalar_tag(n), float(r[n]), int(r["step"]), float(r["wall_time"]))
            for r in rows for n in names if not math.isnan(r[n])]


def evaluation_points(rows: np.ndarray) -> list[tuple[str, float, int, float]]:
    """(tag, value, step, wall_time) of the statistics of ``/evaluations`` rows (empty ones left out)."""
    return [(f"eval/{f}", float(r[f]), int(r["step"]), float(r["wall_time"]))
            for r in rows if r["episodes"] > 0 for f in _EVAL_FIELDS]


def timing_points(rows: np.ndarray) -> list[tuple[str, float, int, float]]:
    """Per step of ``/timings`` rows (one row per rank): each phase's cumulative seconds averaged over
    the ranks (``time/<phase>``) and its share of all phases (``time_share/<phase>``)."""
    phases = [n for n in rows.dtype.names if n not in _TIMING_KEYS]
    points = []
    for step in np.unique(rows["step"]):
        at = rows[rows["step"] == step]
        seconds = {p: float(np.nanmean(at[p])) if np.isfinite(at[p]).any() else math.nan for p in phases}
        total = sum(v for v in seconds.values() if not math.isnan(v))
        wall = float(at["wall_time"].max())
        for phase, value in seconds.items():
            if math.isnan(value):
                continue
            points.append((f"time/{phase}", value, int(step), wall))
            if total > 0:
                points.append((f"time_share/{phase}", value / total, int(step), wall))
    return points


def event_texts(rows: np.ndarray) -> list[tuple[str, str, int, float]]:
    """(tag, text, step, wall_time) of ``/events`` rows."""
    return [(f"events/{r['kind'].decode('utf-8', 'replace')}", r["message"].decode("utf-8", "replace"),
             int(r["step"]), float(r["wall_time"])) for r in rows]


_POINTS = {"scalars": scalar_points, "evaluations": evaluation_points, "timings": timing_points}


def has_events(log_dir: Path) -> bool:
    return log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))


class TensorBoardMirror:
    """Writes log rows to TensorBoard event files in ``log_dir`` (rank 0 only).

    ``resume_step``: the step of the checkpoint a run resumed from (None for a run from step 0).
    Events an earlier writer put in ``log_dir`` past that step are purged (a run from step 0 purges
    them all); see the module docstring.
    """

    def __init__(self, log_dir: str | Path, resume_step: int | None = None) -> None:
        writer_class = summary_writer_class()
        self.log_dir = Path(log_dir)
        earlier = has_events(self.log_dir)
        #: whether the rows a resumed log kept still have to be written (no earlier event files)
        self.wants_history = resume_step is not None and not earlier
        purge = None if not earlier else (0 if resume_step is None else resume_step + 1)
        self._writer = writer_class(log_dir=str(self.log_dir), purge_step=purge, flush_secs=3600)
        self.start_unix = 0.0  # the log's creation time: wall times are start_unix + the rows' wall_time

    def write(self, table: str, rows: np.ndarray) -> None:
        """Write the rows of one log table (tables without TensorBoard output are ignored)."""
        if not len(rows):
            return
        if table == "events":
            for tag, text, step, wall in event_texts(rows):
                self._writer.add_text(tag, text, step, walltime=self.start_unix + wall)
            return
        points = _POINTS.get(table)
        if points is None:
            return
        for tag, value, step, wall in points(rows):
            self._writer.add_scalar(tag, value, step, walltime=self.start_unix + wall)

    def write_tables(self, tables: Mapping[str, np.ndarray]) -> None:
        for name, rows in tables.items():
            self.write(name, rows)

    def flush(self) -> None:
        """Make what was written durable (called with every flush of the run log)."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def export_log(log_path: str | Path, out_dir: str | Path) -> Path:
    """Write the TensorBoard events of an existing ``log.h5`` into ``out_dir`` and return it; earlier
    event files there are purged from TensorBoard's view (kept on disk)."""
    from mpidqn.io.runlog import read_log

    data = read_log(log_path)
    mirror = TensorBoardMirror(out_dir)
    try:
        mirror.start_unix = float(data.attrs.get("created_unix", 0.0))  # type: ignore[arg-type]
        mirror.write_tables(data.tables)
    finally:
        mirror.close()
    return Path(out_dir)


def open_mirror(enabled: bool, run_dir: Path, resume_step: int | None) -> Any:
    """The mirror of a run with ``log.tensorboard`` (``RUN_DIR/tensorboard``), else None."""
    return TensorBoardMirror(run_dir / "tensorboard", resume_step) if enabled else None
