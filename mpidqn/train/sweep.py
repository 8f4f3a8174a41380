"""Many runs in one MPI job: the world is split into groups of ``ranks_per_run`` ranks (Comm.Split),
and each group trains one run after another on its own communicator, taking the next run from the
sweep record (:mod:`mpidqn.io.sweeprecord`) whenever it is free.

Every run is an ordinary run directory built by :func:`mpidqn.train.rundir.prepare_run` on a
Topology of the group's communicator: nothing below this module knows it is inside a sweep, and a
run's seeds come from its own ``seed`` and its group (not world) rank, so a packed run learns what
the same run learns alone.

Failures: an agreed failure (``train.nonfinite: stop``, replica divergence, a checkpoint that cannot
be written) ends the run on every rank of its group together: the run is recorded failed and the
group takes the next one. An exception that is not agreed (a bug, a lost file) is recorded failed
too; in a one-rank group that is the end of it, in a larger group the other ranks may be waiting in
a collective for the failed one, so the group is aborted (``MPI_Abort`` on the group's
communicator, which MPICH and Open MPI answer by ending the whole job: the next job resumes the
rest). The watchdog aborts the group's communicator likewise.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mpidqn.errors import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, UserError
from mpidqn.io import sweeprecord as record
from mpidqn.train import stop as signals

IDLE_POLL_S = (0.01, 0.5)  # a finished group polls its barrier this often (first, at most): no spinning


@dataclass(frozen=True)
class Group:
    """This rank's group: its communicator and its number among the groups."""

    comm: Any
    index: int
    count: int

    @property
    def is_root(self) -> bool:
        return self.comm.Get_rank() == 0


def split_groups(world: Any, ranks_per_run: int) -> Group:
    """Consecutive world ranks [g*R, (g+1)*R) form group g (so a group stays on one host when the
    launcher fills hosts in order)."""
    rank, size = world.Get_rank(), world.Get_size()
    if size % ranks_per_run:
        raise UserError(f"--ranks-per-run {ranks_per_run} does not divide the world size {size}")
    index = rank // ranks_per_run
    return Group(world.Split(color=index, key=rank), index, size // ranks_per_run)


def job_name() -> str:
    """Who runs the sweep now, as recorded beside each run it takes."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm {job}" if job else f"{socket.gethostname()} pid {os.getpid()}"


def wait_quietly(comm: Any, poll: tuple[float, float] = IDLE_POLL_S) -> None:
    """A barrier that sleeps between tests: a blocking MPICH barrier spins a core, which a group
    that has finished must leave to the groups still training."""
    request = comm.Ibarrier()
    pause = poll[0]
    while not request.Test():
        time.sleep(pause)
        pause = min(2 * pause, poll[1])


def last_event(run_dir: Path) -> str | None:
    """The last event line a run logged (its failure or stop message), if its log can be read."""
    from mpidqn.io.runlog import read_log

    try:
        events = read_log(run_dir / "log.h5").tables["events"]
    except (OSError, ValueError, KeyError):
        return None
    return events["message"][-1].decode("utf-8", "replace") if len(events) else None


def state_of(code: int) -> str:
    return "finished" if code == EXIT_OK else "stopped" if code == EXIT_REQUEUE else "failed"


@dataclass
class Sweep:
    """What a group needs to work through the sweep.

    ``train_run(index, comm)`` trains run ``index`` on ``comm`` and returns its exit code;
    ``abort(comm, exc)`` ends the job after an exception a group cannot survive.
    """

    out: Path
    run_dirs: list[Path]
    train_run: Callable[[int, Any], int]
    abort: Callable[[Any, BaseException], int]
    say: Callable[[str], None]

    def work(self, group: Group) -> None:
        """Take runs until none is left or a stop signal arrived (the group's root decides)."""
        job = job_name()
        while True:
            index = None
            if group.is_root and signals.received() is None:
                index = record.claim(self.out, group.index, job)
            index = group.comm.bcast(index, root=0)
            if index is None:
                return
            if group.is_root:
                self.say(f"mpidqn sweep: group {group.index}: run {self.run_dirs[index].name}")
            self._one(group, index)

    def _one(self, group: Group, index: int) -> None:
        run_dir = self.run_dirs[index]
        try:
            code = self.train_run(index, group.comm)
            line = None if code == EXIT_OK else last_event(run_dir) if group.is_root else None
        except UserError as e:  # agreed by the group (mpidqn.cli.main.collective): the run is refused
            code, line = 2, str(e)
        except Exception as e:  # noqa: BLE001 - one run's error must not end the other groups' runs
            text = f"{type(e).__name__}: {e}"
            self.say(f"mpidqn sweep: run {run_dir.name} failed: {text}")
            record.settle(self.out, index, "failed", EXIT_FAILURE, text)
            if group.comm.Get_size() > 1:  # its peers may wait in a collective for this rank
                self.abort(group.comm, e)
            traceback.print_exception(e, file=sys.stderr)
            return
        if group.is_root:
            record.settle(self.out, index, state_of(code), None if code == EXIT_OK else code, line)
            self.say(f"mpidqn sweep: group {group.index}: run {run_dir.name} {state_of(code)}"
                     + ("" if code == EXIT_OK else f" (exit {code})"))


def outcome(data: dict[str, Any]) -> int:
    """The sweep's exit code: 75 while runs are left to do (resubmit me), 1 when all ended but some
    failed, 0 when all finished."""
    states = record.counts(data)
    if any(states.get(s) for s in (*record.TO_DO, "running")):
        return EXIT_REQUEUE
    return EXIT_FAILURE if states.get("failed") else EXIT_OK
