"""Stop requests: SIGUSR1 / SIGTERM only set a flag; the ranks agree on it at a step boundary.

Installed first thing in the CLI (before torch is imported) so that a preemption signal arriving
while a job is still starting is not lost and does not kill the process.
"""
from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: int | None = None


def _handler(signum: int, frame: Any) -> None:
    global _received
    _received = signum


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def request(signum: int = signal.SIGUSR1) -> None:
    """Behave as if ``signum`` had arrived (test hook, fault injection)."""
    _handler(signum, None)


def received() -> int | None:
    return _received
