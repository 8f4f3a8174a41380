"""Exit codes and the exceptions that map onto them (the contract Slurm scripts rely on)."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". The trainer returns it
# after a signal-triggered checkpoint; slurm/train.sbatch requeues the job on it.
EXIT_REQUEUE = 75


class UserError(Exception):
    """Bad input from the user (config, command line, run directory). Exit code 2, one line."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an impossible value."""
