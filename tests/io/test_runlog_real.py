"""The run log of real (tiny) training runs: schema, metadata, live reading, kill -9, resume, report."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import _env, mpidqn, mpiexec, run
from mpidqn.io.runlog import read_log


@pytest.mark.parametrize("n", [1, 2])
def test_log_schema_and_metadata_after_a_real_run(tmp_path, tiny, n):
    run_dir = tmp_path / "r"
    assert mpidqn(n, ["--run-dir", str(run_dir), *tiny, "eval.interval_steps=600"], timeout=180).returncode == 0
    log = read_log(run_dir / "log.h5")
    a, t = log.attrs, log.tables
    assert a["world_size"] == n and a["pipeline_stages"] == 1 and "CartPole-v1" in a["config"]
    assert {"torch", "numpy", "gymnasium", "mpi4py", "h5py", "mpi"} <= set(a["versions"])
    assert a["hosts"] and a["start_time"] > 0
    assert list(t["scalars"]["step"]) == [400, 800, 1200]
    assert np.all(np.isfinite(t["scalars"]["env_steps_per_s"])) and np.all(t["scalars"]["env_steps_per_s"] > 0)
    assert set(t["episodes"]["rank"]) == set(range(n)) and np.all(t["episodes"]["length"] > 0)
    assert list(t["evaluations"]["step"]) == [600, 1200] and np.all(t["evaluations"]["episodes"] == 2)
    timings = t["timings"]
    assert len(timings) == 3 * n and set(timings["rank"]) == set(range(n))
    assert np.all(timings["env"] > 0) and (n == 1 or np.all(timings[timings["step"] == 1200]["comm"] > 0))


def test_reader_sees_the_log_grow_and_kill_9_leaves_it_readable(tmp_path, tiny):
    run_dir = tmp_path / "live"
    cmd = [*mpiexec(2), sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), *tiny,
           "train.total_steps=10000000", "log.interval_steps=200", "train.gradient_steps=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        seen = []
        deadline = time.monotonic() + 90
        while len(set(seen)) < 3 and time.monotonic() < deadline:
            time.sleep(1.0)
            if (run_dir / "log.h5").exists():
                seen.append(len(read_log(run_dir / "log.h5").tables["episodes"]))  # a separate reader
        assert len(set(seen)) >= 3 and seen == sorted(seen), seen
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the whole job
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = read_log(run_dir / "log.h5")
    assert len(log.tables["episodes"]) >= seen[-1] > 0  # everything up to the last flush survived


def test_resume_continues_the_log_without_duplicate_steps(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = [*tiny, "train.total_steps=2400", "checkpoint.interval_steps=800"]
    p = mpidqn(2, ["--run-dir", str(run_dir), *args], env={"MPIDQN_FAULT": "kill_in_checkpoint:1:1600"}, timeout=120)
    assert p.returncode != 0
    assert mpidqn(2, ["--run-dir", str(run_dir), *args], timeout=180).returncode == 0
    t = read_log(run_dir / "log.h5").tables
    steps = list(t["scalars"]["step"])
    assert steps == sorted(set(steps)) and steps[-1] == 2400 and 800 in steps
    assert list(t["resumes"]["step"]) == [800]
    assert t["episodes"]["step"].max() <= 2400
    assert np.all(np.diff(t["scalars"]["wall_time"]) >= 0)


def test_report_over_several_real_runs(tmp_path, tiny):
    runs = []
    for n, seed in [(1, 0), (1, 1), (2, 0)]:
        d = tmp_path / f"w{n}-s{seed}"
        assert mpidqn(n, ["--run-dir", str(d), *tiny, f"seed={seed}", "eval.interval_steps=600"], timeout=180).returncode == 0
        runs.append(str(d))
    out = tmp_path / "report"
    p = run([sys.executable, "-m", "mpidqn", "report", *runs, str(tmp_path / "not-a-run"), "--out", str(out)], timeout=180)
    assert p.returncode == 0, p.stderr
    assert "skipping" in p.stderr and "not-a-run" in p.stderr
    for png in ("eval_return_vs_steps.png", "eval_return_vs_wall_time.png", "throughput.png", "scaling.png"):
        assert (out / png).stat().st_size > 5000, png
    tidy = pd.read_csv(out / "tidy.csv")
    assert list(tidy.columns) == ["run", "seed", "world", "step", "metric", "value"]
    assert set(tidy["world"]) == {1, 2} and (tidy["metric"] == "eval_return").sum() == 6
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3 and set(summary["env_steps"]) == {1200}
