"""The pure parts of a sweep: seeds, grid, run names, the record's queue and the exit code."""
from __future__ import annotations

from pathlib import Path

import pytest

from mpidqn.errors import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, UserError
from mpidqn.io import sweeprecord as record
from mpidqn.train.sweep import outcome
from mpidqn.train.sweepplan import expand, parse_grid, parse_seeds, split_values


def test_seeds() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5") == [5]
    assert parse_seeds("0-1,7,9-10") == [0, 1, 7, 9, 10]
    for bad, why in [("3-1", "empty"), ("a", "not a seed"), ("0-2,2", "twice"), ("", "not a seed")]:
        with pytest.raises(UserError, match=why):
            parse_seeds(bad)


def test_grid_values_split_outside_brackets_and_single_values_are_overrides() -> None:
    assert split_values("[32,32],[64,64]") == ["[32,32]", "[64,64]"]
    axes, fixed = parse_grid(["train.lr=1e-3,3e-3", "network.hidden=[32,32]", "train.n_step=3,8"])
    assert axes == [("train.lr", ["1e-3", "3e-3"]), ("train.n_step", ["3", "8"])]
    assert fixed == ["network.hidden=[32,32]"]
    assert parse_grid(["train.lr=1e-3", "train.lr=1e-3,3e-3"]) == ([("train.lr", ["1e-3", "3e-3"])], [])
    for bad, why in [(["train.lr"], "expected KEY=V1,V2"), (["seed=1,2"], "--seeds"), (["a=1,,2"], "empty"),
                     (["a=1,2", "a=3,4"], "twice"), (["a=1,1"], "twice")]:
        with pytest.raises(UserError, match=why):
            parse_grid(bad)


def test_expand_is_seed_major_and_names_runs_from_values_and_seed() -> None:
    runs = expand([("train.lr", ["1e-3", "3e-3"]), ("network.hidden", ["[32,32]", "[64]"])], [0, 1])
    assert len(runs) == 8 and [r.seed for r in runs] == [0] * 4 + [1] * 4
    assert runs[0].name == "train.lr-1e-3_network.hidden-32-32_seed0"
    assert runs[0].overrides == ("train.lr=1e-3", "network.hidden=[32,32]", "seed=0")
    assert [r.point for r in runs] == [0, 1, 2, 3] * 2
    assert [r.name for r in expand([], [3])] == ["seed3"]
    assert expand([("train.gamma", ["-1", "1"])], [0])[0].name == "train.gamma--1_seed0"
    with pytest.raises(UserError, match="share the directory name"):
        expand([("env.id", ["a b", "a/b"])], [0])


def test_record_queue_hands_each_run_out_once_and_resumes_the_ones_a_dead_job_left(tmp_path: Path) -> None:
    runs = [{"name": f"seed{i}", "overrides": [f"seed={i}"]} for i in range(3)]
    spec, comparable = {"grid": {}, "seeds": [0, 1, 2]}, {"grid": {}, "seeds": [0, 1, 2]}
    assert record.open_sweep(tmp_path, spec, runs, comparable) == []
    assert [record.claim(tmp_path, g, "job1") for g in (0, 1)] == [0, 1]
    record.settle(tmp_path, 0, "finished")
    record.settle(tmp_path, 1, "failed", 3, "mpidqn: error: NaN")
    assert record.claim(tmp_path, 0, "job1") == 2  # run 2 is left running: job1 is killed
    assert record.claim(tmp_path, 1, "job1") is None
    assert outcome(record.read(tmp_path)) == EXIT_REQUEUE
    assert record.open_sweep(tmp_path, spec, runs, comparable) == ["seed2"]
    data = record.read(tmp_path)
    assert [r["state"] for r in data["runs"]] == ["finished", "failed", "stopped"]
    assert data["runs"][1]["exit_code"] == 3 and data["runs"][1]["last_line"] == "mpidqn: error: NaN"
    assert record.claim(tmp_path, 0, "job2") == 2  # neither the finished nor the failed run again
    record.settle(tmp_path, 2, "finished")
    assert outcome(record.read(tmp_path)) == EXIT_FAILURE
    with pytest.raises(UserError, match=r"holds another sweep: seeds is \[0, 1, 2\] there and \[0, 1\] here"):
        record.open_sweep(tmp_path, spec, runs, {"grid": {}, "seeds": [0, 1]})


def test_outcome() -> None:
    assert outcome({"runs": [{"state": "finished"}] * 2}) == EXIT_OK
    assert outcome({"runs": [{"state": "finished"}, {"state": "pending"}]}) == EXIT_REQUEUE
