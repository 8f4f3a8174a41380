"""RunLog: the HDF5 record of a run (``RUN_DIR/log.h5``), written by rank 0, readable while written.

Schema (``FORMAT_VERSION = 1``). Every table is a one-dimensional, chunked, gzip(1)-compressed,
resizable dataset of a compound type, so one row is one record and a table never has columns of
different lengths. ``step`` is the global env step (all ranks together); ``wall_time`` is seconds
since the run started, summed over the segments of a resumed run (the time between the last row
kept at a resume and the restart is not counted).

==============  ===========================================================================  ======
dataset         fields (dtype)                                                               chunk
==============  ===========================================================================  ======
/scalars        step i8, wall_time f8, one f8 per name of root attr ``scalar_names``           1024
                (NaN where a row did not set it)
/episodes       step i8, wall_time f8, rank i4, return f8, length i8                          4096
/eval_returns   f8: the return of every evaluation episode, evaluations back to back          4096
/evaluations    step i8, wall_time f8, mean f8, std f8, min f8, max f8, episodes i8,           256
                offset i8 (this evaluation's returns are
                ``eval_returns[offset:offset + episodes]``)
/timings        segment i4, step i8, wall_time f8, rank i4, one f8 per name of root attr       1024
                ``timing_names``: cumulative seconds per phase of that rank since its process
                started (segment 0 is the first launch, segment k the k-th resume)
/events         step i8, wall_time f8, kind S32, message S1024 (UTF-8, cut to fit)              64
/resumes        step i8, wall_time f8, world_size i4, unix_time f8: one row per resume           16
==============  ===========================================================================  ======

Root attributes: ``format_version`` (1), ``created_unix`` (float, first creation), ``scalar_names``
and ``timing_names`` (JSON lists), ``json_keys`` (JSON list of the metadata keys whose value is
JSON text), and the metadata given to the constructor: strings and numbers as they are, anything
else (dicts, lists, ``None``) as JSON text, e.g. ``config`` (the resolved YAML), ``versions``,
``world_size``, ``pipeline_stages``, ``hosts``, ``rank_hosts`` (the host of every rank, index = rank,
see ``mpidqn.distributed.hosts``), ``host_cores`` (per host, the CPUs its ranks may run on),
``rank_threads`` (every rank's compute threads, ``parallel.torch_threads`` resolved), ``slurm_*``,
``git_rev``, ``start_time``. On a resume the metadata of the new segment overwrites the keys it names.

Concurrency and crashes. The file is written with ``libver='latest'`` in HDF5 SWMR mode (single
writer, multiple readers): all datasets and attributes exist before ``swmr_mode`` is switched on
(SWMR forbids creating either afterwards, which is why the scalar and timing columns are fixed in
the constructor). Rows are buffered in memory and written in blocks by :meth:`RunLog.flush`
(call :meth:`RunLog.maybe_flush` in the loop; :meth:`RunLog.event` flushes at once). A reader in
another process, e.g. a notebook watching a running job::

    with h5py.File("RUN_DIR/log.h5", "r", swmr=True) as f:
        ds = f["scalars"]
        ...; ds.refresh(); rows = ds[:]     # refresh() to see rows flushed since the last look

sees everything up to the writer's last flush. After a ``kill -9`` (or a node failure) the file
still holds everything up to the last flush, but HDF5 leaves its "open for SWMR write" flag set:
open it with ``swmr=True`` (``read_log`` and ``mpidqn report`` do when a plain open says the file
is open for write), or clear the flag with ``h5clear -s log.h5`` before using other HDF5 tools. A resume never opens a crashed file for
writing: it rebuilds the log (rows up to the resume step) into ``log.h5.tmp`` and renames it over
``log.h5``, so the log on disk is always a complete file. A log that cannot be read at a resume is
renamed ``log.h5.corrupt-<unix time>`` and a fresh one started; a fresh start (no ``resume_step``)
over an existing log renames that one ``log.h5.old-<unix time>``: neither is ever deleted.

File locking. HDF5 locks files with ``flock``. Writer and readers use ``locking='best-effort'``,
which locks where the filesystem can and goes on without a lock where it cannot (some NFS, Lustre
and GPFS mounts; there plain locking fails with "unable to lock file, errno = 38"). Setting
``HDF5_USE_FILE_LOCKING=FALSE`` in the environment of writer and readers turns locking off
altogether and takes precedence; other HDF5 programs reading a live log on such mounts need it.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

import h5py
import numpy as np

FORMAT_VERSION = 1

# The scalar columns a training run writes (rank 0's reporter, one row per log.interval_steps).
SCALAR_NAMES: tuple[str, ...] = (
    "loss", "q_mean", "epsilon", "learning_rate", "episode_return", "env_steps_per_s",
    "updates_per_s", "comm_share", "replay_size", "updates", "episodes", "nonfinite_skipped", "samples",
)
DEFAULT_TIMING_NAMES: tuple[str, ...] = ("env", "sample", "learn", "comm", "checkpoint", "eval", "idle")

KIND_BYTES = 32
MESSAGE_BYTES = 1024
# A table whose buffer reaches this many rows is written at once, whatever the flush cadence, so a
# burst (e.g. thousands of short episodes) cannot grow the buffer without bound.
MAX_PENDING_ROWS = 65536
_LOCKING = "best-effort"
_RESERVED_ATTRS = frozenset({"format_version", "created_unix", "scalar_names", "timing_names", "json_keys"})
_KEY_COLUMNS = ("step", "wall_time")
# Flush order: eval_returns before evaluations, so a crash between the two never leaves an
# evaluation row pointing at returns that are not on disk.
TABLES = ("scalars", "episodes", "eval_returns", "evaluations", "timings", "events", "resumes")

_EPISODES = np.dtype([("step", "i8"), ("wall_time", "f8"), ("rank", "i4"), ("return", "f8"), ("length", "i8")])
_EVAL_RETURNS = np.dtype("f8")
_EVALUATIONS = np.dtype([
    ("step", "i8"), ("wall_time", "f8"), ("mean", "f8"), ("std", "f8"), ("min", "f8"), ("max", "f8"),
    ("episodes", "i8"), ("offset", "i8"),
])
_EVENTS = np.dtype([("step", "i8"), ("wall_time", "f8"), ("kind", f"S{KIND_BYTES}"), ("message", f"S{MESSAGE_BYTES}")])
_RESUMES = np.dtype([("step", "i8"), ("wall_time", "f8"), ("world_size", "i4"), ("unix_time", "f8")])
_CHUNKS = {"scalars": 1024, "episodes": 4096, "eval_returns": 4096, "evaluations": 256,
           "timings": 1024, "events": 64, "resumes": 16}


def table_dtypes(scalar_names: Sequence[str], timing_names: Sequence[str]) -> dict[str, np.dtype]:
    """The compound dtype of every table (in flush order) for these scalar and timing columns."""
    return {
        "scalars": np.dtype([("step", "i8"), ("wall_time", "f8")] + [(n, "f8") for n in scalar_names]),
        "episodes": _EPISODES,
        "eval_returns": _EVAL_RETURNS,
        "evaluations": _EVALUATIONS,
        "timings": np.dtype([("segment", "i4"), ("step", "i8"), ("wall_time", "f8"), ("rank", "i4")]
                            + [(n, "f8") for n in timing_names]),
        "events": _EVENTS,
        "resumes": _RESUMES,
    }


@dataclass
class LogData:
    """Everything a log holds: decoded root attributes and every table as a numpy array."""

    attrs: dict[str, object]
    tables: dict[str, np.ndarray]

    @property
    def scalar_names(self) -> list[str]:
        return list(self.attrs["scalar_names"])  # type: ignore[call-overload]

    @property
    def timing_names(self) -> list[str]:
        return list(self.attrs["timing_names"])  # type: ignore[call-overload]


def read_log(path: str | Path) -> LogData:
    """Read a whole log, also one being written or left behind by a killed writer (SWMR read).

    Raises ``OSError`` when HDF5 cannot open the file and ``ValueError`` when it is not an mpidqn
    log of a version this code reads.
    """
    with _open_for_reading(path) as f:
        version = f.attrs.get("format_version")
        if version is None:
            raise ValueError(f"{path} has no format_version attribute: not an mpidqn log")
        if int(version) != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {int(version)}; this mpidqn reads {FORMAT_VERSION}")
        attrs = _decode_attrs(f.attrs)
        tables = {}
        for name in TABLES:
            ds = f[name]
            ds.refresh()
            tables[name] = ds[()]
    return LogData(attrs, tables)


def check_log_version(path: str | Path) -> None:
    """Raise ValueError when ``path`` is a log of a NEWER format than this code writes.

    Such a log must be neither extended nor moved aside (a newer mpidqn can still use it), so a run
    dir holding one is refused. A missing or unreadable file passes: it is no newer log.
    """
    if not Path(path).exists():
        return
    try:
        with _open_for_reading(path) as f:
            version = f.attrs.get("format_version")
    except OSError:
        return
    if version is not None and int(version) > FORMAT_VERSION:
        raise ValueError(f"{Path(path).name} has format_version {int(version)}, newer than {FORMAT_VERSION} "
                         "(written by a newer mpidqn); use that mpidqn or a new --run-dir")


def _open_for_reading(path: str | Path) -> h5py.File:
    """Open a log read-only: plainly if it was closed cleanly, else as a SWMR reader.

    Why not always SWMR: a SWMR reader skips HDF5's truncated-file check (a live writer may have
    allocated space it has not written yet) and then retries failed metadata reads for minutes,
    so a truncated file would hang it. The plain open fails at once on a truncated file, and
    with "file is already open for write" on a log whose writer is running or was killed.
    """
    try:
        return h5py.File(path, "r", locking=_LOCKING)
    except OSError as err:
        if "truncated file" in str(err):
            raise
    return h5py.File(path, "r", swmr=True, locking=_LOCKING)


def _decode_attrs(raw: h5py.AttributeManager) -> dict[str, object]:
    attrs: dict[str, object] = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[key] = value
    json_keys = json.loads(str(attrs.get("json_keys", "[]"))) + ["scalar_names", "timing_names"]
    for key in json_keys:
        if key in attrs:
            attrs[key] = json.loads(str(attrs[key]))
    attrs.pop("json_keys", None)
    return attrs


def _encode_metadata(metadata: dict[str, object]) -> tuple[dict[str, object], list[str]]:
    """Metadata as HDF5 attribute values: str and numbers unchanged, the rest as JSON text."""
    encoded: dict[str, object] = {}
    json_keys = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
        if key in _RESERVED_ATTRS:
            raise ValueError(f"metadata key {key!r} is reserved by the log format")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, bool, int, float)):
            encoded[key] = value
        else:
            try:
                encoded[key] = json.dumps(value, sort_keys=True)
            except TypeError as err:
                raise ValueError(f"metadata {key!r}: {type(value).__name__} is not JSON-serialisable") from err
            json_keys.append(key)
    return encoded, json_keys


def _check_names(kind: str, names: Sequence[str], taken: Sequence[str]) -> list[str]:
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{kind} name {name!r} is not an identifier")
        if name in taken:
            raise ValueError(f"{kind} name {name!r} clashes with a fixed column ({', '.join(taken)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names repeat: {names}")
    return names


class _Table:
    """An append-only dataset with a row buffer; rows reach the file only in :meth:`write`."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.dtype = dataset.dtype
        self.rows: list[tuple] = []
        self.blocks: list[np.ndarray] = []
        self.pending = 0

    def append(self, row: tuple) -> None:
        self.rows.append(row)
        self.pending += 1

    def extend(self, block: np.ndarray) -> None:
        if self.rows:  # keep rows in call order
            self.blocks.append(np.array(self.rows, dtype=self.dtype))
            self.rows.clear()
        self.blocks.append(block)
        self.pending += len(block)

    def write(self) -> np.ndarray | None:
        """Write the buffered rows; return them (None when there were none)."""
        if not self.pending:
            return None
        if self.rows:
            self.blocks.append(np.array(self.rows, dtype=self.dtype))
        data = self.blocks[0] if len(self.blocks) == 1 else np.concatenate(self.blocks)
        start = self.dataset.shape[0]
        self.dataset.resize((start + len(data),))
        self.dataset[start:] = data
        self.dataset.flush()  # SWMR: makes the new rows and the new size visible to readers
        self.rows.clear()
        self.blocks.clear()
        self.pending = 0
        return data


class RunLog:
    """Rank 0's writer of ``log.h5``. See the module docstring for the schema.

    Create it once per process on rank 0 (with ``resume_step`` = the step of the checkpoint
    restored, when resuming), call the row methods as the run goes, :meth:`maybe_flush` once per
    loop iteration, and :meth:`close` (or use ``with``) at the end. Row methods only buffer; a
    row reaches the file at the next flush.

    ``mirror`` (e.g. :class:`mpidqn.io.tensorboard.TensorBoardMirror`) gets every block of rows as it
    is written (``mirror.write(table, rows)``, then ``mirror.flush()``), its ``start_unix`` set to the
    log's creation time, and, when its ``wants_history`` is true, the rows a resumed log kept; it is
    closed with the log.
    """

    def __init__(
        self,
        path: str | Path,
        metadata: dict[str, object],
        resume_step: int | None = None,
        flush_interval_s: float = 10.0,
        scalar_names: Sequence[str] = SCALAR_NAMES,
        timing_names: Sequence[str] = DEFAULT_TIMING_NAMES,
        mirror: Any | None = None,
    ) -> None:
        if not flush_interval_s >= 0:
            raise ValueError(f"flush_interval_s must be >= 0, got {flush_interval_s}")
        self.path = Path(path)
        self.moved_aside: list[tuple[Path, str]] = []  # (new name, why): the caller announces each move
        self.flush_interval_s = float(flush_interval_s)
        scalar_names = _check_names("scalar", scalar_names, _KEY_COLUMNS)
        timing_names = _check_names("timing", timing_names, ("segment", "step", "wall_time", "rank"))
        encoded, json_keys = _encode_metadata(metadata)
        old = None
        if resume_step is not None:
            old = self._previous_log()
        elif self.path.exists():  # a fresh start must not mix with (nor silently destroy) an old log
            self._move_aside("old")
        if old is not None:  # keep columns of earlier segments so no logged value is lost
            scalar_names += [n for n in old.scalar_names if n not in scalar_names]
            timing_names += [n for n in old.timing_names if n not in timing_names]
        self.scalar_names = tuple(scalar_names)
        self.timing_names = tuple(timing_names)
        kept = self._build(old, resume_step, encoded, json_keys)
        self._file = h5py.File(self.path, "r+", libver="latest", locking=_LOCKING)
        self._mirror = mirror
        if mirror is not None:
            mirror.start_unix = float(self._file.attrs["created_unix"])
            if mirror.wants_history:
                mirror.write_tables(kept)
        self._tables = {name: _Table(self._file[name]) for name in TABLES}
        self._file.swmr_mode = True
        self._scalar_index = {name: i for i, name in enumerate(self.scalar_names)}
        self._timing_index = {name: i for i, name in enumerate(self.timing_names)}
        self._nan_row = [math.nan] * len(self.scalar_names)
        self._eval_offset = int(self._file["eval_returns"].shape[0])
        self._t0 = time.monotonic()
        self._last_flush = self._t0
        if resume_step is not None:
            self._record_resume(resume_step, metadata.get("world_size", -1), old)

    # -- construction -------------------------------------------------------------------------

    def _previous_log(self) -> LogData | None:
        """The log being resumed; a log that cannot be read is moved aside, not overwritten."""
        if not self.path.exists():
            return None
        check_log_version(self.path)  # a newer log is refused, never moved aside
        try:
            return read_log(self.path)
        except (OSError, ValueError, KeyError):
            self._move_aside("corrupt")
            return None

    def _move_aside(self, why: str) -> None:
        stamp = int(time.time())
        while (aside := self.path.with_name(f"{self.path.name}.{why}-{stamp}")).exists():
            stamp += 1  # never replace an earlier one moved aside in the same second
        os.replace(self.path, aside)
        self.moved_aside.append((aside, why))

    def _build(self, old: LogData | None, resume_step: int | None,
               encoded: dict[str, object], json_keys: list[str]) -> dict[str, np.ndarray]:
        """Write the complete file (schema, attributes, kept rows) to a temp file, then rename it;
        return the rows kept from ``old``."""
        dtypes = table_dtypes(self.scalar_names, self.timing_names)
        kept = _truncate(old, resume_step, dtypes) if old is not None else {}
        self._segment = 0 if old is None else len(kept["resumes"]) + 1
        self._dropped = 0 if old is None else sum(len(old.tables[n]) - len(kept[n]) for n in TABLES)
        self._offset = max((float(t["wall_time"].max()) for n, t in kept.items()
                            if n != "eval_returns" and len(t)), default=0.0)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        attrs, json_keys = self._merged_attrs(old, encoded, json_keys)
        with h5py.File(tmp, "w", libver="latest", locking=_LOCKING) as f:
            f.attrs.update(attrs)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["created_unix"] = float(old.attrs["created_unix"]) if old is not None else time.time()
            f.attrs["scalar_names"] = json.dumps(list(self.scalar_names))
            f.attrs["timing_names"] = json.dumps(list(self.timing_names))
            f.attrs["json_keys"] = json.dumps(json_keys)
            for name, dtype in dtypes.items():
                rows = kept.get(name, np.empty(0, dtype))
                f.create_dataset(name, data=rows, maxshape=(None,), chunks=(_CHUNKS[name],),
                                 dtype=dtype, compression="gzip", compression_opts=1)
        os.replace(tmp, self.path)
        return kept

    @staticmethod
    def _merged_attrs(old: LogData | None, encoded: dict[str, object],
                      json_keys: list[str]) -> tuple[dict[str, object], list[str]]:
        """The previous segment's metadata overwritten by this one's, and the keys stored as JSON."""
        if old is None:
            return encoded, sorted(json_keys)
        previous, previous_json = _encode_metadata(
            {k: v for k, v in old.attrs.items() if k not in _RESERVED_ATTRS})
        return {**previous, **encoded}, sorted(set(json_keys) | (set(previous_json) - set(encoded)))

    def _record_resume(self, step: int, world_size: object, old: LogData | None) -> None:
        world = int(world_size) if isinstance(world_size, (int, np.integer)) else -1
        self._tables["resumes"].append((step, self._now(), world, time.time()))
        how = "no readable log to continue" if old is None else f"dropped {self._dropped} rows past it"
        self.event(step, "resume", f"resumed from step {step} with world size {world}; {how}")

    # -- rows ---------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._offset + (time.monotonic() - self._t0)

    def scalars(self, step: int, **values: float) -> None:
        """Buffer one row of training scalars; names not given are NaN, unknown names raise."""
        row = self._nan_row.copy()
        index = self._scalar_index
        for name, value in values.items():
            i = index.get(name)
            if i is None:
                raise ValueError(f"unknown scalar {name!r}; the log's columns are {list(self.scalar_names)}")
            row[i] = float(value)
        table = self._tables["scalars"]
        table.append((step, self._now(), *row))
        if table.pending >= MAX_PENDING_ROWS:
            self.flush()

    def episodes(self, rank: np.ndarray, step: np.ndarray, ret: np.ndarray, length: np.ndarray) -> None:
        """Buffer many finished episodes at once (equal-length 1-D arrays, one entry per episode)."""
        arrays = [np.asarray(a) for a in (rank, step, ret, length)]
        n = arrays[0].shape
        if any(a.ndim != 1 or a.shape != n for a in arrays):
            raise ValueError(f"episodes wants equal-length 1-D arrays, got shapes {[a.shape for a in arrays]}")
        block = np.empty(n[0], _EPISODES)
        block["rank"], block["step"], block["return"], block["length"] = arrays
        block["wall_time"] = self._now()
        self._extend("episodes", block)

    def evaluation(self, step: int, returns: np.ndarray) -> None:
        """Buffer one evaluation: every episode's return, and their mean, std, min and max."""
        returns = np.asarray(returns, dtype=np.float64).ravel()
        n = len(returns)
        stats = (returns.mean(), returns.std(), returns.min(), returns.max()) if n else (math.nan,) * 4
        self._extend("eval_returns", returns.copy())
        self._tables["evaluations"].append((step, self._now(), *stats, n, self._eval_offset))
        self._eval_offset += n

    def timings(self, step: int, names: list[str], per_rank_seconds: np.ndarray) -> None:
        """Buffer cumulative seconds per phase (columns, in the order of ``names``) of every rank (rows)."""
        seconds = np.asarray(per_rank_seconds, dtype=np.float64)
        if seconds.ndim != 2 or seconds.shape[1] != len(names):
            raise ValueError(f"per_rank_seconds must have shape (world, {len(names)}), got {seconds.shape}")
        unknown = [n for n in names if n not in self._timing_index]
        if unknown:
            raise ValueError(f"unknown timing names {unknown}; the log's phases are {list(self.timing_names)}")
        block = np.empty(seconds.shape[0], self._tables["timings"].dtype)
        for name in self.timing_names:
            block[name] = math.nan
        for j, name in enumerate(names):
            block[name] = seconds[:, j]
        block["segment"], block["step"], block["wall_time"] = self._segment, step, self._now()
        block["rank"] = np.arange(seconds.shape[0])
        self._extend("timings", block)

    def event(self, step: int, kind: str, message: str) -> None:
        """Record a diagnostic (``nan``, ``resume``, ``signal``, ...) and flush at once."""
        kind_b = kind.encode("utf-8")[:KIND_BYTES].decode("utf-8", "ignore").encode("utf-8")
        msg_b = message.encode("utf-8")[:MESSAGE_BYTES].decode("utf-8", "ignore").encode("utf-8")
        self._tables["events"].append((step, self._now(), kind_b, msg_b))
        self.flush()

    def _extend(self, name: str, block: np.ndarray) -> None:
        table = self._tables[name]
        table.extend(block)
        if table.pending >= MAX_PENDING_ROWS:
            self.flush()

    # -- flushing -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered row; readers see them after their next ``refresh()``."""
        if self._file is None:
            raise ValueError(f"RunLog {self.path} is closed")
        for name, table in self._tables.items():
            rows = table.write()
            if rows is not None and self._mirror is not None:
                self._mirror.write(name, rows)
        if self._mirror is not None:
            self._mirror.flush()
        self._last_flush = time.monotonic()

    def maybe_flush(self) -> None:
        """Flush if ``flush_interval_s`` passed since the last flush (cheap enough to call per step)."""
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def close(self) -> None:
        """Flush and close; closing twice is harmless."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            self._file = None
            if self._mirror is not None:
                self._mirror.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _truncate(old: LogData, resume_step: int | None, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """The rows of ``old`` at or before ``resume_step``, cast to the (possibly wider) new dtypes."""
    kept: dict[str, np.ndarray] = {}
    limit = np.inf if resume_step is None else resume_step
    for name in TABLES:
        if name == "eval_returns":
            continue
        rows = old.tables[name]
        kept[name] = _cast(rows[rows["step"] <= limit], dtypes[name])
    evals = kept["evaluations"]
    returns = old.tables["eval_returns"]
    kept["eval_returns"] = np.concatenate(
        [returns[o:o + n] for o, n in zip(evals["offset"], evals["episodes"])] or [np.empty(0)])
    evals["offset"] = np.concatenate([[0], np.cumsum(evals["episodes"])[:-1]]) if len(evals) else evals["offset"]
    return kept


def _cast(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.empty(len(rows), dtype)
    for field in dtype.names:
        out[field] = rows[field] if field in rows.dtype.names else math.nan
    return out
