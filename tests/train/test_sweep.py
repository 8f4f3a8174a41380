"""``python -m mpidqn sweep``: many runs packed into one MPI job, under mpiexec."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mpidqn.analysis import load_run

from conftest import TINY, _env, mpidqn, mpiexec, program_lines

pytestmark = pytest.mark.mpi
QUIET = [*TINY, "log.progress=none"]


def sweep_args(out: Path, *args: str) -> list[str]:
    return ["sweep", "--out", str(out), *args, *QUIET]


def states(out: Path) -> dict[str, str]:
    return {run["name"]: run["state"] for run in yaml.safe_load((out / "sweep.yaml").read_text())["runs"]}


def losses(run_dir: Path) -> np.ndarray:
    from mpidqn.io.runlog import read_log

    return read_log(run_dir / "log.h5").tables["scalars"]["loss"]


def newest_checkpoint(run_dir: Path):
    """The newest complete checkpoint of a run (read here: a subprocess per run costs seconds)."""
    from mpidqn.train.checkpoints import resolve

    return resolve(run_dir)


def final_model(run_dir: Path) -> dict[str, np.ndarray]:
    from mpidqn.train.checkpoints import read_model, resolve

    return {k: np.asarray(v) for k, v in read_model(resolve(run_dir))["online"].items()}


def digests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """4 ranks in 2 groups of 2 work through 3 configs x 2 seeds."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    p = mpidqn(4, sweep_args(out, "--ranks-per-run", "2", "--seeds", "0-1", "--grid", "train.lr=1e-3,2e-3,3e-3"),
               timeout=900)
    return out, p


def test_four_ranks_work_through_six_runs_in_two_groups(packed) -> None:
    out, p = packed
    assert p.returncode == 0, p.stdout + p.stderr
    names = [f"train.lr-{lr}_seed{s}" for s in (0, 1) for lr in ("1e-3", "2e-3", "3e-3")]
    assert states(out) == {name: "finished" for name in names}
    for name in names:
        ckpt = newest_checkpoint(out / name)
        assert ckpt.step == 1200 and ckpt.world == 2
    started = [ln for ln in p.stderr.splitlines() if ln.startswith("mpidqn sweep: group ") and ln.endswith("finished")]
    assert len(started) == 6 and {ln.split()[3] for ln in started} == {"0:", "1:"}  # both groups took runs
    assert "mpidqn sweep: 6 finished of 6 run(s)" in p.stderr


def test_a_packed_run_learns_what_the_same_run_learns_alone(packed, tmp_path: Path) -> None:
    out, _ = packed
    alone = tmp_path / "alone"
    p = mpidqn(2, ["--run-dir", str(alone), *QUIET, "train.lr=3e-3", "seed=1"], timeout=300)
    assert p.returncode == 0, p.stderr
    packed_losses = losses(out / "train.lr-3e-3_seed1")
    assert len(packed_losses) >= 2 and np.isfinite(packed_losses).all()
    assert np.array_equal(losses(alone), packed_losses)


def test_report_of_a_sweep_ranks_its_configs(packed, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mpidqn.analysis import report_main

    out, _ = packed
    assert report_main([str(out), "--out", str(tmp_path / "r")]) == 0
    ranked = pd.read_csv(tmp_path / "r" / "ranked.csv")
    assert list(ranked["rank"]) == [1, 2, 3] and list(ranked["runs"]) == [2, 2, 2]
    assert sorted(ranked["setting"]) == ["train.lr=0.001", "train.lr=0.002", "train.lr=0.003"]
    iqm = ranked["final_eval_iqm"].to_numpy()
    assert np.isfinite(iqm).all() and (np.diff(iqm) <= 0).all()
    assert (ranked["final_eval_ci_low"] <= iqm).all() and (iqm <= ranked["final_eval_ci_high"]).all()
    assert (ranked["wall_time_s"] > 0).all()
    assert (tmp_path / "r" / "eval_return_vs_steps.png").is_file()
    printed = capsys.readouterr().out
    assert "configs ranked by the IQM of the final evaluation over seeds:" in printed


def test_auto_threads_share_each_host_among_all_the_sweeps_runs(tmp_path: Path) -> None:
    # 2 runs of 1 rank side by side on this host: "auto" counts both, not each run's own group
    out = tmp_path / "s"
    p = mpidqn(2, sweep_args(out, "--ranks-per-run", "1", "--seeds", "0-1", "parallel.torch_threads=auto",
                             "train.total_steps=400"), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [load_run(out / f"seed{s}").metadata["rank_threads"] for s in (0, 1)] == [[share], [share]]


@pytest.mark.parametrize("grid, problem", [
    ("train.lr=1e-3,-1", "run train.lr--1_seed0: train.lr"),
    ("train.batch_size=12,1", "run train.batch_size-1_seed0: train.batch_size: the global batch 1 (batch_scale 1 x "
                              "batch_size 1) is smaller than the world size 2"),
])
def test_a_bad_grid_point_is_refused_before_anything_is_written(tmp_path: Path, grid: str, problem: str) -> None:
    out = tmp_path / "s"
    p = mpidqn(2, sweep_args(out, "--ranks-per-run", "2", "--grid", grid), timeout=120)
    assert p.returncode == 2, p.stderr
    lines = program_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"mpidqn: error: {problem}"), p.stderr
    assert not out.exists()


@pytest.mark.parametrize("fault, code, ranks, seeds, grid", [
    ("nan", 3, 2, "0-1", "train.total_steps=1200,2400"),  # 2 groups, 4 runs
    ("raise", 1, 1, "0", "train.total_steps=2400,1200"),  # 1 group: the run after the failed one
])
def test_a_run_failing_while_running_is_marked_failed_and_the_others_finish(
        tmp_path: Path, fault: str, code: int, ranks: int, seeds: str, grid: str) -> None:
    # the fault fires at step 1600, which only the runs of 2400 steps reach
    out = tmp_path / "s"
    p = mpidqn(ranks, [*sweep_args(out, "--seeds", seeds, "--grid", grid), "train.nonfinite=stop"], timeout=600,
               env={"MPIDQN_FAULT": f"{fault}:0:1600"})
    assert p.returncode == 1, p.stdout + p.stderr
    runs = yaml.safe_load((out / "sweep.yaml").read_text())["runs"]
    failed = [run for run in runs if run["name"].startswith("train.total_steps-2400")]
    for run in runs:
        if run in failed:
            assert run["state"] == "failed" and run["exit_code"] == code
            expected = "NaN/Inf in the loss" if fault == "nan" else "RuntimeError: injected fault"
            assert expected in run["last_line"]
        else:
            assert run["state"] == "finished" and newest_checkpoint(out / run["name"]).step == 1200
    n = len(failed)
    assert f"mpidqn sweep: {n} finished, {n} failed of {2 * n} run(s)" in p.stderr


def _wait_for(out: Path, ready, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep did not get there"
        try:
            if ready(states(out)):
                return
        except (OSError, TypeError, yaml.YAMLError):
            pass  # not written yet
        time.sleep(0.1)


def test_sigint_then_the_same_command_resumes(tmp_path: Path) -> None:
    # the long run's 4,800 steps after the short one's end leave time for the signal to land in it
    out = tmp_path / "s"
    args = sweep_args(out, "--seeds", "0-1", "--grid", "train.total_steps=1200,6000")
    cmd = [*mpiexec(2), sys.executable, "-m", "mpidqn", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    short, long = "train.total_steps-1200_seed0", "train.total_steps-6000_seed0"
    _wait_for(out, lambda s: s[short] == "finished" and s[long] == "running", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    first = states(out)
    assert first[short] == "finished" and first[long] == "stopped"
    assert "Traceback" not in err
    finished = {name: digests(out / name) for name, state in first.items() if state == "finished"}
    stopped_at = newest_checkpoint(out / long).step
    assert 0 < stopped_at < 6000

    p = mpidqn(2, args, timeout=600)
    assert p.returncode == 0, p.stderr
    assert set(states(out).values()) == {"finished"}
    for name, files in finished.items():  # finished runs are left alone
        assert digests(out / name) == files
    from mpidqn.io.runlog import read_log

    resumes = read_log(out / long / "log.h5").tables["resumes"]
    assert stopped_at in resumes["step"]  # resumed from its checkpoint, not restarted
    # resumed exactly: the same parameters as the same run trained in one go
    alone = tmp_path / "alone"
    q = mpidqn(1, ["--run-dir", str(alone), *QUIET, "train.total_steps=6000", "seed=0"], timeout=600)
    assert q.returncode == 0, q.stderr
    resumed, whole = final_model(out / long), final_model(alone)
    assert resumed.keys() == whole.keys() and all(np.array_equal(resumed[k], whole[k]) for k in whole)


def test_a_changed_grid_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "s"
    from mpidqn.io import sweeprecord

    runs = [{"name": "seed0", "overrides": ["seed=0"], "seed": 0}]
    spec = {"grid": {"train.lr": ["1e-3", "2e-3"]}, "seeds": [0]}
    sweeprecord.open_sweep(out, spec, runs, spec)
    p = mpidqn(1, sweep_args(out, "--grid", "train.lr=1e-3,3e-3"), timeout=120)
    assert p.returncode == 2
    lines = program_lines(p.stderr)
    assert lines == [f"mpidqn: error: --out {out} holds another sweep: grid.train.lr is ['1e-3', '2e-3'] there and "
                     "['1e-3', '3e-3'] here; use a new --out for a changed sweep"], p.stderr
