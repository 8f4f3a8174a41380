"""One live job per run directory: rank 0 holds an exclusive lock on ``RUN_DIR/.lock`` for the run.

The lock is ``flock(2)`` on a file that also names its holder (host, pid, Slurm job id, start time).
The kernel releases it when the holding process ends, however it ends (SIGKILL, node reboot on a
local disk), so the lock of a dead job is recovered by simply taking it again; the stale holder
text is then overwritten. A second job on the same run dir is refused with the holder's name.

Shared file systems: Linux NFS (v4, or v3 with lockd) maps flock onto POSIX byte-range locks that
all clients see. Lustre needs the ``flock`` mount option (``localflock`` only locks within one node;
without either, flock fails with ENOSYS). When the file system cannot lock at all, the run goes on
with a warning and no protection; see docs/checkpoints.md ("Run directory").
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from mpidqn.errors import UserError

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def holder_info() -> dict[str, object]:
    """Who holds the lock: written into the lock file for the next job's refusal message."""
    info: dict[str, object] = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        info["slurm_job_id"] = job
    return info


def describe_holder(text: str) -> str:
    """``host h, pid p, Slurm job j, since 2026-11-25 18:00:00 UTC`` from a lock file's content."""
    try:
        info = json.loads(text)
        parts = [f"host {info['host']}", f"pid {info['pid']}"]
    except (ValueError, KeyError, TypeError):
        return "a job that left no description"
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if isinstance(info.get("since"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"])))
    return ", ".join(parts)


class RunLock:
    """The exclusive lock of a run dir, held from :meth:`acquire` until :meth:`release` or exit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, warn: Callable[[str], None] = lambda s: None) -> None:
        """Take the lock or raise UserError naming the job that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                raise UserError(f"--run-dir {self.path.parent} is in use by another job ({holder}); "
                                "wait for it to end, or use another --run-dir") from None
            if e.errno in _UNSUPPORTED:
                warn(f"mpidqn: warning: cannot lock {self.path} ({e.strerror}): this file system does not "
                     "support flock, so nothing stops a second job on this run dir (see docs/checkpoints.md, Run directory)")
            else:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
