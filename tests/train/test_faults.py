"""Fault tolerance: each fault is injected (test-only MPIDQN_FAULT hook) into a real 2-rank run.

Covered: the collective watchdog (data parallel and pipeline), a rank killed with SIGKILL, NaN/Inf
policies (skip and stop, data parallel and pipeline), replica divergence, a full disk during a
checkpoint, and bad inputs (a checkpoint of another network, a log of a newer format, a run dir of
another run or a file) at 2 ranks.
"""
from __future__ import annotations

import re
import shutil
import threading
import time

import h5py
import pytest
import yaml

from conftest import MPI_SCRIPTS, inspect_json, launcher_saw_sigkill, mpidqn, mpirun, program_lines
from mpidqn.errors import (
    EXIT_BAD_INPUT, EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, EXIT_NONFINITE, EXIT_WATCHDOG,
)
from mpidqn.io.runlog import read_log
from mpidqn.distributed import watchdog as watchdog_module
from mpidqn.distributed.watchdog import Watchdog, abort_job

pytestmark = pytest.mark.mpi


def _lines(p) -> list[str]:
    return [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]


def _events(run_dir) -> list[tuple[int, str, str]]:
    ev = read_log(run_dir / "log.h5").tables["events"]
    return [(int(e["step"]), e["kind"].decode(), e["message"].decode()) for e in ev]


# ----------------------------------------------------------------------------- watchdog


class _NeverDone:
    """A request that completes only when the job is aborted (as MPI_Abort would end the process)."""

    def __init__(self) -> None:
        self.aborted = threading.Event()

    def Test(self) -> bool:
        return self.aborted.is_set()

    def Wait(self) -> None:
        assert self.aborted.wait(10), "the watchdog did not fire"


@pytest.mark.parametrize("threads", [True, False])
def test_watchdog_expires_with_one_line_and_aborts(threads):
    said, aborted = [], []
    request = _NeverDone()

    def abort(code):
        aborted.append(code)
        request.aborted.set()

    wd = Watchdog(0.05, rank=3, abort=abort, say=said.append)
    wd._thread_level_ok = threads  # monitor thread + blocking Wait, or the polling fallback
    wd.step = 12800
    t0 = time.monotonic()
    wd.wait(request, "gradient allreduce")
    assert 0.05 <= time.monotonic() - t0 < 5
    assert said == ["mpidqn: rank 3: watchdog: gradient allreduce did not complete within 0.05 s at step 12,800 "
                    "(a rank is hung or dead)"]
    assert aborted == [EXIT_WATCHDOG]
    with pytest.raises(ValueError, match="must be >= 0"):
        Watchdog(-1, 0, abort=aborted.append)


class _Done:
    def Test(self) -> bool:
        return True

    def Wait(self) -> None:
        pass


class _TwoRanks:
    def Get_size(self) -> int:
        return 2

    def Ibarrier(self) -> _Done:
        return _Done()


def test_guard_watches_the_blocking_collective_after_its_fence():
    """A peer cut off after the fence (its host's link went down) must not leave this rank blocked for good."""
    said, gather = [], _NeverDone()  # stands for a pickled allgather waiting on the lost peer
    wd = Watchdog(0.05, rank=1, abort=lambda code: gather.aborted.set(), say=said.append)
    wd._thread_level_ok = True
    t0 = time.monotonic()
    with wd.guard(_TwoRanks(), "log gather"):
        gather.Wait()
    assert 0.05 <= time.monotonic() - t0 < 5
    assert len(said) == 1 and said[0].startswith("mpidqn: rank 1: watchdog: log gather did not complete"), said
    assert wd._phase is None  # nothing left armed once the body has returned


def test_a_rank_that_outlives_its_abort_exits_with_the_code(monkeypatch):
    calls = []

    class Comm:
        def Abort(self, code):  # MPICH's MPI_Abort may return on a host cut off from mpiexec
            calls.append(("Abort", code))

    monkeypatch.setattr(watchdog_module.os, "_exit", lambda code: calls.append(("_exit", code)))
    abort_job(Comm(), exit_after_s=0.01, grace_s=0.01)(EXIT_WATCHDOG)
    assert calls == [("Abort", EXIT_WATCHDOG), ("_exit", EXIT_WATCHDOG)]


@pytest.mark.parametrize("stages, phase", [(1, "gradient allreduce"), (2, "pipeline")])
def test_hung_rank_ends_the_job_by_watchdog(tmp_path, tiny, stages, phase):
    t0 = time.monotonic()
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r"), *tiny, "train.total_steps=100000",
                   f"parallel.pipeline_stages={stages}", "parallel.collective_timeout_s=6"],
               env={"MPIDQN_FAULT": "hang:1:600"}, timeout=90)
    assert p.returncode == EXIT_WATCHDOG, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "watchdog:" in ln]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("mpidqn: rank 0: watchdog: " + phase), lines
    assert "did not complete within 6 s at step " in lines[0] and "(a rank is hung or dead)" in lines[0]
    assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------- SIGKILL


def test_rank_killed_with_sigkill_ends_job_and_newest_checkpoint_resumes(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = [*tiny, "train.total_steps=2400", "checkpoint.interval_steps=800", "parallel.collective_timeout_s=20"]
    t0 = time.monotonic()
    p = mpidqn(2, ["--run-dir", str(run_dir), *args], env={"MPIDQN_FAULT": "kill:1:1200"}, timeout=90)
    assert time.monotonic() - t0 < 30 + 15  # the job ends within 30 s of the kill (start-up included here)
    assert p.returncode not in (0, 2), p.stdout + p.stderr
    # the launcher notices the dead rank, kills the survivors and says why
    assert launcher_saw_sigkill(p.stdout + p.stderr), p.stdout + p.stderr
    info = inspect_json(run_dir)  # verifies sizes and CRCs
    assert info["complete"] and info["step"] == 800
    resumed = mpidqn(2, ["--run-dir", str(run_dir), *args], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed (exact)" in resumed.stdout and inspect_json(run_dir)["step"] == 2400


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("stages", [1, 2])
def test_nonfinite_loss_on_one_rank_is_skipped_and_counted(tmp_path, tiny, stages):
    run_dir = tmp_path / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, f"parallel.pipeline_stages={stages}",
                   "parallel.sync_check_interval=4"], env={"MPIDQN_FAULT": "nan:1:800"}, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr  # replicas stayed identical (checked every 4 updates)
    scalars = read_log(run_dir / "log.h5").tables["scalars"]
    skipped = dict(zip(scalars["step"].tolist(), scalars["nonfinite_skipped"].tolist()))
    assert skipped[400] == 0 and skipped[1200] == 20  # rounds of 4 updates at steps 800, 900, ..., 1200
    info = inspect_json(run_dir)
    assert info["complete"] and info["updates"] == 24  # the rounds at steps 200, 300, ..., 700 ran


def test_nonfinite_stop_records_event_keeps_last_checkpoint_and_exits_3(tmp_path, tiny):
    run_dir = tmp_path / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "checkpoint.interval_steps=400", "train.nonfinite=stop"],
               env={"MPIDQN_FAULT": "nan:1:1000"}, timeout=120)
    assert p.returncode == EXIT_NONFINITE, p.stdout + p.stderr
    errors = [ln for ln in _lines(p) if "error" in ln]
    assert len(errors) == 1 and "non-finite loss on rank(s) [1]" in errors[0] and "step 1,000" in errors[0], errors
    assert "Traceback" not in p.stderr
    [(step, kind, message)] = [e for e in _events(run_dir) if e[1] == "nonfinite"]
    assert step == 1000 and "rank(s) [1]" in message
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == ["step_000000000400", "step_000000000800"]
    assert inspect_json(run_dir)["step"] == 800


# ----------------------------------------------------------------------------- divergence


def test_replica_divergence_is_reported_with_the_first_differing_tensor(tmp_path, tiny):
    run_dir = tmp_path / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "parallel.sync_check_interval=4"],
               env={"MPIDQN_FAULT": "perturb:1:600"}, timeout=120)
    assert p.returncode == EXIT_DIVERGED, p.stdout + p.stderr
    errors = [ln for ln in _lines(p) if "error" in ln]
    assert len(errors) == 1 and "parameter '1.weight' differs between ranks" in errors[0], errors
    assert "Traceback" not in p.stderr
    assert [e[1] for e in _events(run_dir)] == ["divergence"]


def test_pipeline_replica_check_names_the_tensor_on_every_rank():
    p = mpirun(2, [str(MPI_SCRIPTS / "pipeline_divergence.py")], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    # the two ranks' lines can interleave in the shared stdout pipe: find them anywhere
    ok = re.findall(r"OK rank \d: .*?differs between ranks", p.stdout)
    assert len(ok) == 2 and all("pipeline stage 0" in ln and "'3.weight' differs" in ln for ln in ok), p.stdout


# ----------------------------------------------------------------------------- disk full


def test_disk_full_during_checkpoint_keeps_previous_and_stops_cleanly(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = [*tiny, "checkpoint.interval_steps=400"]
    p = mpidqn(2, ["--run-dir", str(run_dir), *args], env={"MPIDQN_FAULT": "enospc:1:800"}, timeout=120)
    assert p.returncode == EXIT_CHECKPOINT_FAILED, p.stdout + p.stderr
    errors = [ln for ln in _lines(p) if "error" in ln]
    assert len(errors) == 1, errors
    assert "No space left on device" in errors[0] and "step_000000000800/rank_00001.h5" in errors[0]
    assert "Traceback" not in p.stderr
    assert [e[1] for e in _events(run_dir)] == ["checkpoint_failed"]
    # no partial checkpoint is left that could count as complete; the previous one is the newest
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == ["step_000000000400"]
    assert inspect_json(run_dir)["step"] == 400
    resumed = mpidqn(2, ["--run-dir", str(run_dir), *args], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed (exact)" in resumed.stdout and "step_000000000400" in resumed.stdout
    assert inspect_json(run_dir)["step"] == 1200


# ----------------------------------------------------------------------------- bad inputs


def _snapshot(run_dir) -> dict[str, bytes]:
    """Every file of a run dir but its lock file (which names the last job that held the dir)."""
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in sorted(run_dir.rglob("*"))
            if f.is_file() and f.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-rank run (checkpoint at 600 and 1200) that bad-input tests copy."""
    from conftest import TINY

    run_dir = tmp_path_factory.mktemp("finished") / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *TINY, "checkpoint.interval_steps=600"], timeout=180)
    assert p.returncode == 0, p.stderr
    return run_dir


def _bad_input(p, expected: str) -> None:
    assert p.returncode == EXIT_BAD_INPUT, p.stdout + p.stderr
    lines = program_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("mpidqn: error: ") and expected in lines[0], p.stderr


def test_checkpoint_of_an_incompatible_network_is_refused(tmp_path, tiny, finished_run):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())
    cfg["network"]["hidden"] = [16]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.copytree(finished_run / "checkpoints", run_dir / "checkpoints")
    before = _snapshot(run_dir)
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "network.hidden=[16]", "checkpoint.interval_steps=600"],
               timeout=90)
    _bad_input(p, "is incompatible: network.hidden is [32, 32] there and [16] here")
    assert _snapshot(run_dir) == before  # nothing written: no log, config untouched


def test_log_of_a_newer_format_is_refused_and_left_alone(tmp_path, tiny, finished_run):
    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    with h5py.File(run_dir / "log.h5", "r+") as f:
        f.attrs["format_version"] = 99
    before = _snapshot(run_dir)
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "checkpoint.interval_steps=600", "train.total_steps=1800"],
               timeout=90)
    _bad_input(p, "log.h5 has format_version 99, newer than 1")
    assert _snapshot(run_dir) == before
    assert sorted(f.name for f in run_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "log.h5"]


def test_run_dir_of_another_run_or_a_file_is_refused_at_2_ranks(tmp_path, tiny, finished_run):
    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    before = _snapshot(run_dir)
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "train.lr=0.01"], timeout=90)
    _bad_input(p, "train.lr cannot change when the run in")  # no --config: the saved one plus overrides
    assert _snapshot(run_dir) == before
    f = tmp_path / "file"
    f.write_text("x")
    p = mpidqn(2, ["--run-dir", str(f), *tiny], timeout=90)
    _bad_input(p, "exists and is not a directory")
    assert f.read_text() == "x"
