"""Data parallelism across real MPI processes (mpiexec subprocesses with timeouts)."""
from __future__ import annotations

import re

import pytest

from conftest import MPI_SCRIPTS, mpidqn, mpirun, program_lines

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [2, 4])
def test_allreduced_gradient_equals_union_gradient_and_replicas_stay_identical(n):
    p = mpirun(n, [str(MPI_SCRIPTS / "grad_equivalence.py")], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == n


def test_bad_config_fails_on_all_ranks_with_exit_2_and_one_line(tmp_path):
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r"), "train.lr=0"], timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert program_lines(p.stderr) == ["mpidqn: error: train.lr: must be > 0, got 0.0"], p.stderr
    assert not (tmp_path / "r").exists()  # nothing was created before the input was checked


def test_indivisible_pipeline_layout_fails_with_exit_2(tmp_path):
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r"), "parallel.pipeline_stages=3"], timeout=60)
    assert p.returncode == 2
    assert "world size 2 is not divisible by parallel.pipeline_stages=3" in p.stderr


def test_unknown_env_fails_on_all_ranks_with_exit_2(tmp_path, tiny):
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r"), "env.id=NoSuchEnv-v0", *tiny], timeout=60)
    assert p.returncode == 2, p.stderr
    assert program_lines(p.stderr) == [
        "mpidqn: error: env.id: cannot make 'NoSuchEnv-v0': Environment `NoSuchEnv` doesn't exist."]
    assert not (tmp_path / "r").exists()


def test_exception_on_one_rank_ends_all_ranks_quickly(tmp_path, tiny):
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r"), *tiny, "train.total_steps=100000"],
               env={"MPIDQN_FAULT": "raise:1:600"}, timeout=90)  # a job that hangs instead fails here
    assert p.returncode not in (0, 2), p.stderr
    assert "mpidqn: rank 1: RuntimeError: injected fault" in p.stderr
    assert p.stderr.count("Traceback") == 1
    # rank 0 went no further than the next collective: no progress line after the fault's step
    steps = [int(s.replace(",", "")) for s in re.findall(r"^step +([\d,]+)/100,000 ", p.stdout, re.M)]
    assert all(s < 800 for s in steps) and "final evaluation" not in p.stdout, p.stdout


@pytest.mark.parametrize("n,stages", [(3, 1), (2, 2)])
def test_global_replay_over_unequal_shards_equals_one_buffer(n, stages):
    """Weights, reduced gradient (0-row ranks included), TD errors back to their ranks, a uniform round of
    uneven updates, and chi-square frequencies: all against one process holding the union."""
    p = mpirun(n, ["-m", "mpi4py", str(MPI_SCRIPTS / "global_replay.py"), str(stages)], timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == n


@pytest.mark.parametrize("override,message", [
    ("train.priority_alpha=-0.5", "train.priority_alpha: must be >= 0, got -0.5"),
    ("train.priority_beta=1.5", "train.priority_beta: must be in [0, 1], got 1.5"),
    ("train.priority_eps=0", "train.priority_eps: must be > 0, got 0.0"),
])
def test_bad_priority_settings_fail_with_exit_2_before_anything_is_written(tmp_path, override, message):
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r"), "train.prioritized=true", override], timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert program_lines(p.stderr) == [f"mpidqn: error: {message}"], p.stderr
    assert not (tmp_path / "r").exists()


def test_priority_settings_without_prioritized_replay_are_refused(tmp_path):
    p = mpidqn(1, ["--run-dir", str(tmp_path / "r"), "train.priority_alpha=0.7"], timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert program_lines(p.stderr) == [
        "mpidqn: error: train.priority_alpha: is set but train.prioritized is false "
        "(set train.prioritized=true, or remove it)"], p.stderr
    assert not (tmp_path / "r").exists()


def test_a_global_batch_the_world_does_not_divide_gives_the_one_process_gradient():
    """64 rows over 3 ranks (22, 21, 21): every update's reduced gradient is one process's on those rows."""
    p = mpirun(3, [str(MPI_SCRIPTS / "uneven_batch.py")], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == 3
