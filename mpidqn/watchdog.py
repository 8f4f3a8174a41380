"""Collective watchdog: every collective of the training loop completes within a deadline or the job aborts.

A rank that hangs (deadlock, stuck filesystem, a peer that died without the process manager noticing)
would otherwise keep every other rank waiting in its next collective forever, burning the allocation.
The loop's collectives are therefore started non-blocking (``Iallreduce``, ``Ibarrier``, ``Isend`` /
``Irecv``, ...) and their requests are polled here against ``parallel.collective_timeout_s``. On a
timeout this rank prints ONE line naming itself, the phase and the step, and aborts the MPI job::

    mpidqn: rank 0: watchdog: allreduce did not complete within 600 s at step 12,800 (a rank is hung or dead)

Polling spins on ``Test`` for 0.1 s before it sleeps (with a growing pause, capped at 1 ms), so a
collective that completes quickly pays no sleep latency. The spin is long on purpose: MPICH advances a
non-blocking collective only while its ranks call into MPI, so a rank asleep after a millisecond of
jitter delays its partners, which then sleep too (measured: 3 ms per 18 kB Allreduce instead of
30 us on a loaded 2-core node). A blocking ``Wait`` spins just the same; after 0.1 s the other rank
is busy with something long (evaluation, checkpoint, a hang) and sleeping frees the core. Small pickled collectives (log and
checkpoint gathers) are preceded by :meth:`Watchdog.fence`, a watched ``Ibarrier``: once every rank
has passed it, the blocking collective that follows cannot wait on an absent rank.

One watchdog per process (:func:`current`), installed by the trainer; until then (and with a
timeout of 0) :func:`wait` is a plain blocking ``Wait``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

from mpidqn.errors import EXIT_WATCHDOG

SPIN_S = 0.1  # busy-poll this long before the first sleep (see the module docstring)
MAX_SLEEP_S = 1e-3  # the pause between polls grows to this


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Watchdog:
    """Polls MPI requests against a deadline; aborts the job with one line when one is missed."""

    def __init__(self, timeout_s: float, rank: int, abort: Callable[[int], Any],
                 say: Callable[[str], None] = _say) -> None:
        if timeout_s < 0:
            raise ValueError(f"collective timeout must be >= 0 (0 disables), got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.abort = abort
        self.say = say
        self.step = 0  # the trainer keeps it current: the global env step named in the message

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def wait(self, request: Any, phase: str) -> None:
        """Complete one request (e.g. from ``Iallreduce``) or abort the job."""
        if not self.enabled:
            request.Wait()
            return
        if request.Test():  # the common case: already done
            return
        self._poll(request.Test, phase)

    def wait_all(self, requests: Sequence[Any], phase: str) -> None:
        """Complete several requests (e.g. pipeline Isends) or abort the job."""
        from mpi4py import MPI

        if not requests:
            return
        if not self.enabled:
            MPI.Request.Waitall(list(requests))
            return
        reqs = list(requests)
        if MPI.Request.Testall(reqs):
            return
        self._poll(lambda: MPI.Request.Testall(reqs), phase)

    def fence(self, comm: Any, phase: str) -> None:
        """A watched barrier before a blocking (pickled) collective on ``comm``."""
        if comm.Get_size() == 1 or not self.enabled:
            return
        self.wait(comm.Ibarrier(), phase)

    def _poll(self, test: Callable[[], bool], phase: str) -> None:
        start = time.monotonic()
        deadline = start + self.timeout_s
        spin_until = start + SPIN_S
        pause = 5e-5
        while not test():
            now = time.monotonic()
            if now >= deadline:
                self.expire(phase)
                return
            if now >= spin_until:
                time.sleep(min(pause, max(deadline - now, 0.0)))
                pause = min(pause * 2, MAX_SLEEP_S)

    def expire(self, phase: str) -> None:
        self.say(f"mpidqn: rank {self.rank}: watchdog: {phase} did not complete within {self.timeout_s:g} s "
                 f"at step {self.step:,} (a rank is hung or dead)")
        self.abort(EXIT_WATCHDOG)


_current = Watchdog(0.0, 0, abort=lambda code: None)


def install(watchdog: Watchdog) -> Watchdog:
    """Make ``watchdog`` the one :func:`wait` and :func:`fence` use in this process."""
    global _current
    _current = watchdog
    return watchdog


def current() -> Watchdog:
    return _current


def wait(request: Any, phase: str) -> None:
    _current.wait(request, phase)


def wait_all(requests: Sequence[Any], phase: str) -> None:
    _current.wait_all(requests, phase)


def fence(comm: Any, phase: str) -> None:
    _current.fence(comm, phase)
