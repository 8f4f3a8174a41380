"""TensorBoard output: live events of a run (and of its resume), ``report --tensorboard``, a missing extra.

Events are read back with TensorBoard's own reader, which applies the purge a resumed writer asks for."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, mpidqn, run
from tensorboard.backend.event_processing import event_accumulator

from mpidqn.io.runlog import read_log
from mpidqn.io.tensorboard import scalar_tag, timing_points


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them."""
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same_points(got: list[tuple[int, float]], expected: list[tuple[float, float]]) -> bool:
    """The same steps exactly and the same values up to TensorBoard's float32 (approx does not look
    inside tuples: it would compare the float64 of the log with the float32 of the events exactly)."""
    return ([s for s, _ in got] == [int(s) for s, _ in expected]
            and [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6))


def assert_mirrors_log(scalars: dict[str, list[tuple[int, float]]], run_dir: Path) -> None:
    """Every logged loss and evaluation mean is in the events once, at its step, and nothing else is."""
    log = read_log(run_dir / "log.h5").tables
    rows = log["scalars"][~np.isnan(log["scalars"]["loss"])]
    assert same_points(scalars[scalar_tag("loss")], list(zip(rows["step"].tolist(), rows["loss"].tolist())))
    evals = log["evaluations"]
    assert same_points(scalars["eval/mean"], list(zip(evals["step"].tolist(), evals["mean"].tolist())))
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: steps repeat or go back: {steps}"


def test_live_events_and_resume_appends_without_duplicate_steps(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = ["--run-dir", str(run_dir), *tiny, "eval.interval_steps=400", "checkpoint.interval_steps=600",
            "log.tensorboard=true"]
    p = mpidqn(2, args, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    first = read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in first[scalar_tag("loss")]] == [400, 800, 1200]
    assert [s for s, _ in first["eval/mean"]] == [400, 800, 1200]
    assert {"time/learn", "time_share/env", scalar_tag("episode_return")} <= first.keys()
    assert_mirrors_log(first, run_dir)
    # As if the job had been killed after the checkpoint at 600: steps 800 and 1200 run again, and
    # TensorBoard must show each of them once, with the values of the second segment.
    shutil.rmtree(run_dir / "checkpoints" / "step_000000001200")
    p = mpidqn(2, ["--run-dir", str(run_dir), "--resume"], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    second = read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in second[scalar_tag("loss")]] == [400, 800, 1200]
    assert_mirrors_log(second, run_dir)

    # report --tensorboard rebuilds the same scalars from log.h5 alone
    out = tmp_path / "tb"
    p = run([sys.executable, "-m", "mpidqn", "report", "--tensorboard", str(run_dir), "--out", str(out)])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {out / 'r'}")
    converted = read_scalars(out / "r")
    assert converted.keys() == second.keys()
    for tag in converted:
        assert same_points(converted[tag], second[tag]), tag
    # converting again into the same directory replaces what TensorBoard shows, it does not add to it
    assert run([sys.executable, "-m", "mpidqn", "report", "--tensorboard", str(run_dir), "--out", str(out)]
               ).returncode == 0
    assert read_scalars(out / "r") == converted


@pytest.fixture
def without_tensorboard(tmp_path) -> dict[str, str]:
    """An environment where ``import tensorboard`` fails as it does when the extra is not installed."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "tensorboard.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorboard'\", name='tensorboard')\n")
    return {"PYTHONPATH": f"{ROOT}:{shadow}"}


def test_missing_extra_is_named_and_nothing_is_written(tmp_path, tiny, without_tensorboard):
    run_dir = tmp_path / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "log.tensorboard=true"], env=without_tensorboard)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        'mpidqn: error: TensorBoard output needs the tensorboard package (tensorboard is not installed): '
        'pip install -e ".[tensorboard]" (source checkout)']
    assert not run_dir.exists()
    p = run([sys.executable, "-m", "mpidqn", "report", "--tensorboard", str(run_dir)], env=without_tensorboard)
    assert p.returncode == 2 and 'pip install -e ".[tensorboard]"' in p.stderr, p.stderr


def test_timing_points_average_ranks_and_share_time():
    dtype = np.dtype([("segment", "i4"), ("step", "i8"), ("wall_time", "f8"), ("rank", "i4"),
                      ("env", "f8"), ("learn", "f8")])
    rows = np.array([(0, 10, 1.0, 0, 1.0, 3.0), (0, 10, 1.5, 1, 3.0, 1.0), (0, 20, 2.0, 0, 2.0, 6.0),
                     (0, 20, 2.0, 1, 2.0, 6.0)], dtype)
    points = {(tag, step): (value, wall) for tag, value, step, wall in timing_points(rows)}
    assert points[("time/env", 10)] == (2.0, 1.5)  # mean over the ranks, the later rank's wall time
    assert points[("time_share/env", 10)] == (0.5, 1.5)
    assert points[("time_share/learn", 20)] == (0.75, 2.0)
    assert len(points) == 8
