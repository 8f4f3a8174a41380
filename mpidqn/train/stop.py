"""Stop requests: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 only set a flag; the ranks agree on it at a
step boundary, checkpoint and exit 75. A second SIGINT ends the process at once (exit 130), without
a checkpoint: the way out of a stop that takes too long.

Installed first thing in the CLI (before torch is imported) so that a preemption signal arriving
while a job is still starting is not lost and does not kill the process.

Launchers: MPICH's Hydra mpiexec forwards SIGINT, SIGTERM and SIGUSR1 to every rank (its ranks run
in their own sessions, so a Ctrl-C in the terminal reaches mpiexec only, which forwards it; a second
Ctrl-C makes Hydra kill the job). Open MPI 5's mpiexec (PRRTE) forwards SIGUSR1 but answers SIGINT
and SIGTERM by ending the job itself (SIGCONT, SIGTERM, SIGKILL within a second): with Open MPI,
stop a run with SIGUSR1. See docs/training.md ("Stopping and resuming").
"""
from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
_received: int | None = None


def _first_rank() -> bool:
    """Whether this process is rank 0 as the launcher announced it (no MPI call in a handler)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return os.environ[var] == "0"
    return True


def _handler(signum: int, frame: Any) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        if _first_rank():  # os.write: print() is not safe inside a signal handler
            os.write(2, b"mpidqn: interrupted again: stopped at once, without a checkpoint\n")
        os._exit(EXIT_INTERRUPTED)
    _received = signum


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def request(signum: int = signal.SIGUSR1) -> None:
    """Behave as if ``signum`` had arrived (test hook, fault injection)."""
    _handler(signum, None)


def received() -> int | None:
    return _received


def name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal"
