"""Run directories that cannot be corrupted: one job at a time, damaged checkpoints kept and
reported, resume with the saved config, every input error refused before the run dir is touched."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env, mpidqn

TOTAL = 1200


def _lines(p) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.strip()]


def _refused(p, expected: str) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = _lines(p)
    assert len(lines) == 1 and lines[0].startswith("mpidqn: error: ") and expected in lines[0], p.stderr
    return lines[0]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in sorted(run_dir.rglob("*"))
            if f.is_file() and f.name != ".lock"}


# ----------------------------------------------------------------------------- the lock

def test_lock_names_its_holder_and_is_recovered_from_a_dead_one(tmp_path, monkeypatch):
    from mpidqn.errors import UserError
    from mpidqn.io.runlock import RunLock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(UserError, match=rf"is in use by another job \(host \S+, pid {os.getpid()}, Slurm job 77, since"):
        RunLock(tmp_path).acquire()
    first.release()
    monkeypatch.delenv("SLURM_JOB_ID")
    # a holder killed with SIGKILL leaves its lock file behind; the kernel dropped the lock itself
    code = f"from mpidqn.io.runlock import RunLock; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); " \
           "import time; time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # stale text stays
    again = RunLock(tmp_path)
    again.acquire()  # and is taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    again.release()


def test_second_job_on_a_run_dir_is_refused_while_the_first_runs(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = ["mpiexec", "-n", "1", sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), *tiny,
            "train.total_steps=10000000", "log.progress=none"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "log.h5").exists():
            assert first.poll() is None and time.monotonic() < deadline, "first job did not start"
            time.sleep(0.5)
        before = (run_dir / "log.h5").stat().st_ino
        p = mpidqn(1, ["--run-dir", str(run_dir), *tiny, "train.total_steps=10000000"], timeout=120)
        line = _refused(p, f"--run-dir {run_dir} is in use by another job (host ")
        assert "wait for it to end, or use another --run-dir" in line
        assert (run_dir / "log.h5").stat().st_ino == before  # the first job's log was not moved
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def finished(tmp_path, tiny):
    run_dir = tmp_path / "r"
    p = mpidqn(1, ["--run-dir", str(run_dir), *tiny, "seed=3", "checkpoint.interval_steps=400", "checkpoint.keep=5"],
               timeout=180)
    assert p.returncode == 0, p.stderr
    return run_dir


def _damage(ckpt: Path) -> None:
    with open(ckpt / "rank_00000.h5", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_no_verifying_checkpoint_is_refused_and_fresh_start_keeps_everything(finished):
    steps = sorted(d for d in (finished / "checkpoints").iterdir() if d.name.startswith("step_"))
    assert [p.name for p in steps] == ["step_000000000400", "step_000000000800", "step_000000001200"]
    for p in steps:
        _damage(p)
    before = _files(finished)
    p = mpidqn(1, ["--run-dir", str(finished), "train.total_steps=1600"], timeout=120)
    line = _refused(p, f"--run-dir {finished}: no checkpoint verifies (step_000000001200: rank_00000.h5 is corrupted")
    assert "step_000000000400: rank_00000.h5 is corrupted (CRC32 mismatch)" in line and "--fresh-start" in line
    assert _files(finished) == before
    p = mpidqn(1, ["--run-dir", str(finished), "--fresh-start", "train.total_steps=400", "log.progress=lines"],
               timeout=180)
    assert p.returncode == 0, p.stderr
    old = [d for d in finished.iterdir() if d.name.startswith("checkpoints.old-")]
    logs = [f for f in finished.iterdir() if f.name.startswith("log.h5.old-")]
    assert len(old) == 1 and len(logs) == 1
    assert sorted(d.name for d in old[0].iterdir()) == ["BEST", *(d.name for d in steps)]  # nothing pruned
    assert f"moved aside to {old[0].name}" in p.stderr + p.stdout
    assert f"log.h5 moved aside to {logs[0].name}" in p.stderr + p.stdout
    from mpidqn.io.runlog import read_log

    kinds = [k.decode() for k in read_log(finished / "log.h5").tables["events"]["kind"]]
    assert "checkpoints_moved" in kinds and "log_moved" in kinds


def test_damaged_newest_checkpoint_is_kept_aside_and_an_older_one_resumes(finished):
    _damage(finished / "checkpoints" / "step_000000001200")
    p = mpidqn(1, ["--run-dir", str(finished), "--resume", "train.total_steps=1600", "log.progress=lines"],
               timeout=180)
    assert p.returncode == 0, p.stderr
    assert "resumed (exact) from" in p.stdout and "at step 800" in p.stdout
    kept = [d.name for d in (finished / "checkpoints").iterdir() if ".corrupt-" in d.name]
    assert len(kept) == 1 and kept[0].startswith("step_000000001200.corrupt-")
    assert f"kept as {kept[0]}" in p.stdout


# ----------------------------------------------------------------------------- resume without retyping

def test_resume_with_the_saved_config_and_only_resumable_overrides(finished):
    p = mpidqn(1, ["train", "--resume", "--run-dir", str(finished), "train.total_steps=1600", "log.progress=lines"],
               timeout=180)
    assert p.returncode == 0, p.stderr
    assert "at step 1,200" in p.stdout and "final evaluation @ 1,600 steps" in p.stdout
    p = mpidqn(1, ["--resume", "--run-dir", str(finished), "train.lr=0.5"], timeout=60)
    _refused(p, f"train.lr cannot change when the run in {finished} continues (0.0023 there, 0.5 here; "
                "keys that can: train.total_steps")
    p = mpidqn(1, ["--run-dir", str(finished), "seed=4", "log.progress=none"], timeout=60)  # a config that differs
    _refused(p, "seed cannot change")


# ----------------------------------------------------------------------------- validated before writing

@pytest.mark.parametrize("overrides, expected", [
    (["parallel.pipeline_stages=2", "parallel.split_points=[9]"],
     "parallel.split_points: split points [9] must be strictly increasing layer indices in [1, 5]"),
    (["train.buffer_size=40", "train.batch_size=32", "train.batch_scope=per_rank"],
     "train.batch_size=32 (32 per rank) is larger than a rank's replay shard (20 transitions: train.buffer_size=40 "
     "over 2 ranks)"),
    (["train.batch_size=1"], "train.batch_size: the global batch 1 (batch_scale 1 x batch_size 1) is smaller than the "
                             "world size 2"),
])
def test_layout_and_batch_errors_are_refused_before_the_run_dir_exists(tmp_path, tiny, overrides, expected):
    run_dir = tmp_path / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, *overrides], timeout=90)
    _refused(p, expected)
    assert not run_dir.exists()


@pytest.mark.parametrize("existing", [False, True])
def test_resume_without_a_run_is_refused_and_leaves_nothing(tmp_path, tiny, existing):
    # issue #34: the refusal used to leave RUN_DIR/.lock (and the directory itself) behind
    run_dir = tmp_path / "fresh"
    if existing:
        run_dir.mkdir()
    p = mpidqn(1, ["--resume", "--run-dir", str(run_dir), *tiny], timeout=60)
    what = "holds no checkpoints/ directory" if existing else "does not exist"
    _refused(p, f"--resume: --run-dir {run_dir} {what}, so there is no run to continue")
    assert run_dir.exists() == existing and (not existing or not any(run_dir.iterdir()))
