"""Exit codes and the exceptions that map onto them (the contract Slurm scripts rely on)."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# train.nonfinite=stop: a NaN/Inf loss or gradient; the last good checkpoint is kept, none is written.
EXIT_NONFINITE = 3
# The periodic replica check found different parameters on different data-parallel replicas.
EXIT_DIVERGED = 4
# parallel.collective_timeout_s: a collective did not complete in time (a rank is hung or dead);
# the rank that noticed aborts the MPI job with this code.
EXIT_WATCHDOG = 5
# sysexits.h EX_IOERR: writing a checkpoint failed (disk full, unwritable run dir); the previous
# complete checkpoint is the newest one, and resuming from it works once the disk has room.
EXIT_CHECKPOINT_FAILED = 74
# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". The trainer returns it
# after a signal-triggered checkpoint; slurm/train.sbatch requeues the job on it.
EXIT_REQUEUE = 75


class UserError(Exception):
    """Bad input from the user (config, command line, run directory). Exit code 2, one line."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an impossible value."""


class AgreedFailure(RuntimeError):
    """A failure every rank raises in lockstep (it was agreed by a collective), so the job can stop
    cleanly: rank 0 prints one line and records an event ``kind`` in the run log, and every rank
    exits with ``exit_code`` instead of aborting the MPI job."""

    kind = "failure"
    exit_code = EXIT_FAILURE


class NonFiniteError(AgreedFailure):
    """A loss or gradient was NaN/Inf on some rank and ``train.nonfinite`` is ``stop``."""

    kind = "nonfinite"
    exit_code = EXIT_NONFINITE


class ReplicaDivergenceError(AgreedFailure):
    """Data-parallel replicas no longer hold bit-identical parameters."""

    kind = "divergence"
    exit_code = EXIT_DIVERGED


class CheckpointWriteError(AgreedFailure):
    """Some rank could not write its part of a checkpoint; the checkpoint was discarded."""

    kind = "checkpoint_failed"
    exit_code = EXIT_CHECKPOINT_FAILED
