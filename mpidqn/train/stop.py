"""Stop requests: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 only set a flag; the ranks agree on it at a
step boundary, checkpoint and exit 75. A second SIGINT before the ranks have agreed to stop ends the
process at once (exit 130), without a checkpoint: the way out of a stop that never starts (a hung
rank). Once the ranks have agreed (:func:`begin_stop`), further SIGINTs are ignored, so the stop's
checkpoint is completed and the exit code is 75, never a half-written stop (issue #34).

Installed first thing in the CLI (before torch is imported) so that a preemption signal arriving
while a job is still starting is not lost and does not kill the process.

Launchers: MPICH's Hydra mpiexec forwards the first SIGINT, and every SIGTERM and SIGUSR1, to every
rank (its ranks run in their own sessions, so a Ctrl-C in the terminal reaches mpiexec only). A
second SIGINT to mpiexec is Hydra's "force abort": it never reaches the ranks, Hydra SIGKILLs them
and mpiexec then exits with a status of its own (0, 1 or 255 were seen), which no rank can change;
see docs/cli.md. Open MPI 5's mpiexec (PRRTE) forwards SIGUSR1 but answers SIGINT and SIGTERM by
ending the job itself (SIGCONT, SIGTERM, SIGKILL within a second): with Open MPI, stop a run with
SIGUSR1.
"""
from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
_received: int | None = None
_stopping = False  # the ranks agreed to stop: the stop's checkpoint is being written


def _first_rank() -> bool:
    """Whether this process is rank 0 as the launcher announced it (no MPI call in a handler)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return os.environ[var] == "0"
    return True


def _say(text: str) -> None:
    """One line on stderr from rank 0; os.write because print() is not safe inside a signal handler."""
    if _first_rank():
        os.write(2, text.encode() + b"\n")


def _handler(signum: int, frame: Any) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        if _stopping:
            _say("mpidqn: interrupted again while writing the stop checkpoint: ignored, exiting once it is "
                 "complete")
            return
        _say("mpidqn: interrupted again: stopped at once, without a checkpoint")
        os._exit(EXIT_INTERRUPTED)
    if signum == signal.SIGINT and _received is None:
        _say("mpidqn: SIGINT received: checkpointing at the next step boundary, then exit 75")
    _received = signum


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def request(signum: int = signal.SIGUSR1) -> None:
    """Behave as if ``signum`` had arrived (test hook, fault injection)."""
    global _received
    _received = signum


def begin_stop() -> None:
    """The ranks agreed to stop: from now on a further SIGINT cannot cut the stop's checkpoint short."""
    global _stopping
    _stopping = True


def received() -> int | None:
    return _received


def name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal"
