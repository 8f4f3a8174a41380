"""``SWEEP_DIR/sweep.yaml``: the grid of a sweep, its runs and their states, and the queue the
groups of ranks take their runs from.

Every read-modify-write of the record happens under an exclusive ``flock(2)`` on
``SWEEP_DIR/.sweep.lock``: a group's first rank takes the lock, picks the next run that is neither
finished nor failed nor running, marks it running, writes the record atomically (rename) and lets
the lock go. So the record is at every moment the sweep's state on disk (a killed job leaves
nothing that the next one cannot read), no rank spends a core waiting for requests, and groups on
several hosts share it through any file system with flock (NFS; Lustre mounted with ``flock``).

States: ``pending`` (never started), ``running`` (a group trains it now), ``stopped`` (checkpointed
on a signal, or left ``running`` by a job that was killed: the next job resumes it), ``finished``,
``failed`` (with the run's exit code and last line; a later job leaves it alone).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml

from mpidqn.errors import UserError

RECORD_NAME = "sweep.yaml"
LOCK_NAME = ".sweep.lock"
FORMAT_VERSION = 1
STATES = ("finished", "failed", "stopped", "running", "pending")
TO_DO = ("pending", "stopped")
T = TypeVar("T")


def record_path(out: Path) -> Path:
    return Path(out) / RECORD_NAME


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the record's lock (blocking: another group holds it for milliseconds only)."""
    fd = os.open(Path(out) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise UserError(f"--out {out}: this file system does not support flock ({e.strerror}), which "
                                "the groups of a sweep share their queue with; use a directory on one that "
                                "does (see docs/sweeps.md)") from None
            raise
        yield
    finally:
        os.close(fd)


def read(out: Path) -> dict[str, Any]:
    return yaml.safe_load(record_path(out).read_text())


def _write(out: Path, data: dict[str, Any]) -> None:
    path = record_path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(yaml.safe_dump(data, sort_keys=False, width=120))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def update(out: Path, change: Callable[[dict[str, Any]], T]) -> T:
    """Read, ``change`` in place, write; under the lock. Returns what ``change`` returned."""
    with locked(out):
        data = read(out)
        result = change(data)
        _write(out, data)
    return result


def new_record(spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A record with every run pending; ``runs`` hold at least ``name`` and ``overrides``."""
    return {"format_version": FORMAT_VERSION, "spec": spec,
            "runs": [{**run, "state": "pending", "exit_code": None, "last_line": None, "group": None,
                      "job": None, "started": None, "ended": None} for run in runs]}


def spec_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key of the sweep's spec that differs, as "KEY: OLD there, NEW here", else None."""
    for key in new:
        a, b = old.get(key), new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            inner = spec_difference(a, b)
            if inner is not None:
                return f"{key}.{inner}" if key != "settings" else inner
        elif a != b:
            return f"{key} is {a!r} there and {b!r} here"
    return None


def open_sweep(out: Path, spec: dict[str, Any], runs: list[dict[str, Any]], comparable: dict[str, Any]) -> list[str]:
    """Create the record, or check that the existing one is the same sweep (``comparable``: the spec
    entries that may not change) and turn runs left ``running`` by an ended job into ``stopped``.
    Returns the names of those runs. Called by one rank, holding the sweep's job lock."""
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        if not record_path(out).exists():
            _write(out, new_record(spec, runs))
            return []
    data = read(out)
    old = {k: data.get("spec", {}).get(k) for k in comparable}
    diff = spec_difference(old, comparable)
    if diff is not None:
        raise UserError(f"--out {out} holds another sweep: {diff}; use a new --out for a changed sweep")

    def reclaim(data: dict[str, Any]) -> list[str]:
        left = [run for run in data["runs"] if run["state"] == "running"]
        for run in left:
            run["state"] = "stopped"
        data["spec"] = spec  # the overrides that may change (run length, cadence, layout) are the new ones
        return [run["name"] for run in left]

    return update(out, reclaim)


def claim(out: Path, group: int, job: str) -> int | None:
    """The index of the next run to do (marked running by ``group`` of ``job``), or None."""
    def take(data: dict[str, Any]) -> int | None:
        for i, run in enumerate(data["runs"]):
            if run["state"] in TO_DO:
                run.update(state="running", group=group, job=job, started=time.time(), ended=None)
                return i
        return None

    return update(out, take)


def settle(out: Path, index: int, state: str, exit_code: int | None = None, last_line: str | None = None) -> None:
    """Record the end of run ``index``: finished, stopped (resumable) or failed with its code and line."""
    def end(data: dict[str, Any]) -> None:
        data["runs"][index].update(state=state, exit_code=exit_code, last_line=last_line, ended=time.time())

    update(out, end)


def counts(data: dict[str, Any]) -> dict[str, int]:
    """How many runs are in each state that some run is in, in the order of :data:`STATES`."""
    states = [run["state"] for run in data["runs"]]
    return {state: states.count(state) for state in STATES if state in states}
