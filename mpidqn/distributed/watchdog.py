"""Collective watchdog: every collective of the training loop completes within a deadline or the job aborts.

A rank that hangs (deadlock, stuck filesystem, a peer that died without the process manager noticing)
would otherwise keep every other rank waiting in its next collective forever, burning the allocation.
The loop's collectives are therefore started non-blocking (``Iallreduce``, ``Ibarrier``, ``Isend`` /
``Irecv``, ...) and their requests are polled here against ``parallel.collective_timeout_s``. On a
timeout this rank prints ONE line naming itself, the phase and the step, and aborts the MPI job::

    mpidqn: rank 0: watchdog: allreduce did not complete within 600 s at step 12,800 (a rank is hung or dead)

The waiting itself is a plain blocking ``Wait`` (MPI's own progress loop, which behaves well when
ranks outnumber cores); a daemon thread checks every fraction of the timeout whether this rank has
been inside one wait for longer than the timeout, and if so prints the line and calls ``Abort`` (MPI
is initialised with MPI_THREAD_MULTIPLE by mpi4py, so the thread may). An earlier design polled the
requests with ``Test`` from the main thread, spinning 0.1 s before sleeping: with 4 ranks on 2 cores
the spinning ranks starved the ones they waited for and throughput fell 4.8x (459 against 2,209
env-steps/s, ``benchmarks/scaling.py``). If MPI has a lower thread level, polling is the fallback.
Small pickled collectives (log and
checkpoint gathers) run inside :meth:`Watchdog.guard`: a watched ``Ibarrier`` first (so the polling
fallback sees a rank that never arrives), then the blocking collective itself under the same deadline
(a rank cut off after the barrier, e.g. its host's link went down, must not hang the others).

One watchdog per process (:func:`current`), installed by the trainer; until then (and with a
timeout of 0) :func:`wait` is a plain blocking ``Wait``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from mpidqn.errors import EXIT_WATCHDOG

SPIN_S = 0.1  # fallback polling (no MPI_THREAD_MULTIPLE): busy-poll this long before the first sleep
ABORT_GRACE_S = 1.0  # pause between a rank's last line and MPI_Abort (see abort_job)
MAX_SLEEP_S = 1e-3  # the pause between polls grows to this
ABORT_EXIT_S = 10.0  # how long a rank waits to be ended after MPI_Abort returned (see abort_job)


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
        self._phase: str | None = None  # the collective this rank is blocked in, if any
        self._since = 0.0
        self._monitor: threading.Thread | None = None
        self._thread_level_ok: bool | None = None

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
        self._watched(request.Wait, request.Test, phase)

    def wait_all(self, requests: Sequence[Any], phase: str) -> None:
        """Complete several requests (e.g. pipeline Isends) or abort the job."""
        from mpi4py import MPI

        if not requests:
            return
        reqs = list(requests)
        if not self.enabled:
            MPI.Request.Waitall(reqs)
            return
        if MPI.Request.Testall(reqs):
            return
        self._watched(lambda: MPI.Request.Waitall(reqs), lambda: MPI.Request.Testall(reqs), phase)

    def _watched(self, block: Callable[[], Any], test: Callable[[], bool], phase: str) -> None:
        """Block in MPI while the monitor thread holds the deadline (polling without threads)."""
        if not self._threads_ok():
            self._poll(test, phase)
            return
        with self._deadline(phase):
            block()

    @contextlib.contextmanager
    def _deadline(self, phase: str) -> Iterator[None]:
        """The monitor thread aborts the job should the body (blocked in MPI) outlast the timeout."""
        self._ensure_monitor()
        outer = self._phase, self._since
        self._phase, self._since = phase, time.monotonic()
        try:
            yield
        finally:
            self._phase, self._since = outer

    def _threads_ok(self) -> bool:
        if self._thread_level_ok is None:
            try:
                from mpi4py import MPI

                self._thread_level_ok = MPI.Is_initialized() and MPI.Query_thread() >= MPI.THREAD_MULTIPLE
            except ImportError:
                self._thread_level_ok = False
        return self._thread_level_ok

    def _ensure_monitor(self) -> None:
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="mpidqn-watchdog", daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while True:
            time.sleep(period)
            phase, since = self._phase, self._since
            if phase is not None and time.monotonic() - since >= self.timeout_s:
                self.expire(phase)
                return

    @contextlib.contextmanager
    def guard(self, comm: Any, phase: str) -> Iterator[None]:
        """Watch blocking (pickled) collectives on ``comm``: a watched barrier, then the body under the
        deadline.

        The barrier alone does not suffice: a rank cut off between it and the collective (a host
        whose link went down) would leave the others blocked in it for good.
        """
        if comm.Get_size() == 1 or not self.enabled:
            yield
            return
        self.wait(comm.Ibarrier(), phase)
        if not self._threads_ok():  # polling fallback: the barrier is all it can watch
            yield
            return
        with self._deadline(phase):
            yield

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


def abort_job(comm: Any, exit_after_s: float = ABORT_EXIT_S,
              grace_s: float = ABORT_GRACE_S) -> Callable[[int], None]:
    """How a rank ends the job after printing why (the watchdog's timeout, an error on one rank):
    ``grace_s`` of pause, ``comm.Abort(code)``, and ``os._exit(code)`` should this rank outlive it.

    The pause: ``MPI_Abort`` can tear the job down before the launcher forwards the line just printed
    (seen in CI, from the watchdog's thread and from a rank's error under load); the other ranks wait in
    their next collective meanwhile. Only ever paid on the way out.

    MPICH's ``MPI_Abort`` only asks the process manager to end the job and may return; a rank on a
    host cut off from ``mpiexec`` (its link went down) is then never killed and would spin on in its
    collective. Seen with 2 hosts x 2 ranks over TCP (tests/distributed/test_multihost.py).
    """
    def abort(code: int) -> None:
        time.sleep(grace_s)
        comm.Abort(code)
        time.sleep(exit_after_s)  # normally the launcher ends this process meanwhile
        os._exit(code)

    return abort


_current = Watchdog(0.0, 0, abort=lambda code: None)


def install(watchdog: Watchdog) -> Watchdog:
    """Make ``watchdog`` the one :func:`wait`, :func:`wait_all` and :func:`guard` use in this process."""
    global _current
    _current = watchdog
    return watchdog


def current() -> Watchdog:
    return _current


def wait(request: Any, phase: str) -> None:
    _current.wait(request, phase)


def wait_all(requests: Sequence[Any], phase: str) -> None:
    _current.wait_all(requests, phase)


def guard(comm: Any, phase: str) -> contextlib.AbstractContextManager[None]:
    return _current.guard(comm, phase)
