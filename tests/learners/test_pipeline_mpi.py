"""Pipeline parallelism across real MPI processes: gradient equivalence, then the real command.

Worlds 2, 3 and 4 (S=2 and S=3 with dp=1, S=2 with dp=2). World 6 (S=3, dp=2) passes too but is
left out: the test machines have 2 cores.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mpidqn.io.runlog import read_log

from conftest import MPI_SCRIPTS, inspect_json, mpidqn, mpirun, program_lines, run

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("world, stages, optimizer, alpha, kappa, head", [
    (2, 2, "adam", 0, 0, "q"), (3, 3, "adam", 0, 0, "q"), (4, 2, "adam", 0, 0, "q"), (2, 2, "rmsprop", 0, 0, "q"),
    (3, 3, "adam", 0.9, 0.3, "q"), (2, 2, "adam", 0, 0, "rainbow"), (2, 2, "adam", 0, 0, "qr")])
def test_pipelined_gradients_equal_the_unpartitioned_model(world, stages, optimizer, alpha, kappa, head):
    """"rainbow": C51 in the last stage, noisy layers in both (docs/rainbow.md); "qr": QR-DQN's quantiles."""
    p = mpirun(world, [str(MPI_SCRIPTS / "pipeline_grads.py"), str(stages), "3", optimizer, str(alpha), str(kappa),
                       head], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == world


def test_more_stages_than_layers_fails_with_exit_2_and_one_line(tmp_path, tiny):
    # network.hidden=[8] has 4 layers: Flatten, Linear, ReLU, head
    p = mpidqn(5, ["--run-dir", str(tmp_path / "r"), *tiny, "network.hidden=[8]", "parallel.pipeline_stages=5"],
               timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert program_lines(p.stderr) == ["mpidqn: error: parallel.pipeline_stages: 5 pipeline stages but the network has only "
                                       "4 layers (network.hidden=[8])"], p.stderr


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_training_checkpoints_evaluates_and_resumes_with_other_stages(tmp_path, tiny, world):
    run_dir = tmp_path / "run"
    tiny = [*tiny, "eval.interval_steps=400", "network.dueling=true"]
    p = mpidqn(world, ["--run-dir", str(run_dir), *tiny, "parallel.pipeline_stages=2", "train.total_steps=800"],
               timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "stage 1: layers" in p.stdout and "MiB" in p.stdout
    info = inspect_json(run_dir)
    assert (info["pipeline_stages"], info["world_size"], info["complete"]) == (2, world, True)
    assert info["parameters"] > 0
    ev = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "2", "--json"])
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["episodes"] == 2
    if world == 2:
        return  # the resume below runs once, from the 4-rank run (other world AND other S)
    # continue the same run as pure data parallelism: the stage files re-partition
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "parallel.pipeline_stages=1", "train.total_steps=1200"],
               timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed (elastic)" in p.stdout
    info = inspect_json(run_dir)
    assert (info["pipeline_stages"], info["step"]) == (1, 1200)


def test_a_stage_without_parameters_trains_skips_saves_and_resumes(tmp_path):
    """Stage 0 is Flatten alone (no optimizer): lr, updates, a NaN skip, stage files (new and legacy
    optimizer keys) and a resume all work; uint8 observations reach stage 0 as uint8."""
    p = mpirun(2, [str(MPI_SCRIPTS / "pipeline_free_stage.py"), str(tmp_path)], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == 2


def test_the_real_command_with_a_parameter_free_first_stage_logs_and_resumes(tmp_path, tiny):
    """`train parallel.pipeline_stages=4` on the default MLP puts Flatten alone on stage 0 (no
    optimizer): every log row, evaluation and checkpoint works, and the run resumes."""
    run_dir = tmp_path / "run"
    tiny = [*tiny, "parallel.pipeline_stages=4", "log.interval_steps=200", "eval.interval_steps=400"]
    p = mpidqn(4, ["--run-dir", str(run_dir), *tiny, "train.total_steps=800"], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Flatten" in p.stdout.split("stage 1:")[0], p.stdout  # stage 0 holds Flatten alone
    p = mpidqn(4, ["--run-dir", str(run_dir), *tiny, "train.total_steps=1200"], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    info = inspect_json(run_dir)
    assert (info["pipeline_stages"], info["step"], info["complete"]) == (4, 1200, True)
    lr = np.asarray(read_log(run_dir / "log.h5").tables["scalars"]["learning_rate"])
    assert len(lr) >= 4 and np.all(lr > 0), lr  # the schedule's lr, logged by rank 0 (stage 0)
