"""RunLog and PhaseTimer: schema, round trips, live (SWMR) reading, crash safety, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpidqn.io.runlog import (SCALAR_NAMES, DEFAULT_TIMING_NAMES, FORMAT_VERSION, MESSAGE_BYTES, TABLES,
                         RunLog, read_log)
from mpidqn.train.timing import PhaseTimer

REPO = Path(__file__).resolve().parents[2]
META = {"config": "seed: 3\nenv:\n  id: CartPole-v1\n", "world_size": 2, "pipeline_stages": 1,
        "hosts": ["n1", "n2"], "versions": {"torch": "2.13"}, "git_rev": "abc123", "slurm_job_id": None}


def python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


def test_schema_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    RunLog(path, META).close()
    with h5py.File(path, "r", swmr=True) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        for name in TABLES:
            ds = f[name]
            assert ds.shape == (0,) and ds.maxshape == (None,) and ds.chunks is not None
            assert ds.compression == "gzip"
        assert f["scalars"].dtype.names == ("step", "wall_time", *SCALAR_NAMES)
        assert f["timings"].dtype.names == ("segment", "step", "wall_time", "rank", *DEFAULT_TIMING_NAMES)
    attrs = read_log(path).attrs
    assert attrs["config"] == META["config"] and attrs["world_size"] == 2 and attrs["git_rev"] == "abc123"
    assert attrs["hosts"] == ["n1", "n2"] and attrs["versions"] == {"torch": "2.13"}
    assert attrs["slurm_job_id"] is None and attrs["scalar_names"] == list(SCALAR_NAMES)


def test_blocks_round_trip_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "log.h5"
    eps = [(rng.integers(0, 4, n), rng.integers(0, 10**6, n), rng.normal(size=n), rng.integers(1, 500, n))
           for n in (3, 0, 7000)]  # 7000 > one chunk
    evals = [rng.normal(size=n) for n in (5, 1, 8)]
    with RunLog(path, META, scalar_names=["loss", "epsilon"], timing_names=["env", "comm"]) as log:
        for step in range(2500):
            log.scalars(step, loss=step / 7, **({"epsilon": 0.5} if step % 2 else {}))
            if step % 1000 == 999:
                log.flush()
        for i, block in enumerate(eps):
            log.episodes(*block)
            log.evaluation(100 * i, evals[i])
        log.timings(10, ["comm", "env"], np.array([[1.0, 2.0], [3.0, 4.0]]))
        log.event(7, "signal", "SIGTERM caught")
    data = read_log(path).tables
    s = data["scalars"]
    assert np.array_equal(s["step"], np.arange(2500)) and np.array_equal(s["loss"], np.arange(2500) / 7)
    assert np.isnan(s["epsilon"][0::2]).all() and (s["epsilon"][1::2] == 0.5).all()
    assert np.all(np.diff(s["wall_time"]) >= 0)
    e = data["episodes"]
    for field, i in (("rank", 0), ("step", 1), ("return", 2), ("length", 3)):
        assert np.array_equal(e[field], np.concatenate([b[i] for b in eps]))
    ev = data["evaluations"]
    for row, returns in zip(ev, evals):
        assert np.array_equal(data["eval_returns"][row["offset"]:row["offset"] + row["episodes"]], returns)
        assert row["mean"] == returns.mean() and row["std"] == returns.std() and row["max"] == returns.max()
    t = data["timings"]
    assert np.array_equal(t["rank"], [0, 1]) and np.array_equal(t["env"], [2.0, 4.0])
    assert np.array_equal(t["comm"], [1.0, 3.0]) and (t["segment"] == 0).all()
    assert data["events"]["kind"][0] == b"signal" and data["events"]["message"][0] == b"SIGTERM caught"


def test_rejects_bad_input(tmp_path: Path) -> None:
    with RunLog(tmp_path / "log.h5", {}, scalar_names=["loss"], timing_names=["env"]) as log:
        with pytest.raises(ValueError, match="unknown scalar 'lss'"):
            log.scalars(1, lss=1.0)
        with pytest.raises(ValueError, match="unknown timing names"):
            log.timings(1, ["gpu"], np.zeros((1, 1)))
        with pytest.raises(ValueError, match="shape"):
            log.timings(1, ["env"], np.zeros((2, 2)))
        with pytest.raises(ValueError, match="equal-length"):
            log.episodes(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))
        log.event(1, "nan", "é" * MESSAGE_BYTES)  # cut on a character boundary
    assert read_log(tmp_path / "log.h5").tables["events"]["message"][0].decode() == "é" * (MESSAGE_BYTES // 2)
    with pytest.raises(ValueError, match="reserved"):
        RunLog(tmp_path / "b.h5", {"format_version": 2})
    with pytest.raises(ValueError, match="clashes"):
        RunLog(tmp_path / "c.h5", {}, scalar_names=["step"])


def test_flush_cadence(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    with RunLog(path, {}, flush_interval_s=3600) as log:
        log.scalars(1, loss=1.0)
        log.maybe_flush()
        assert len(read_log(path).tables["scalars"]) == 0  # buffered, not yet written
        log.flush_interval_s = 0.0
        log.maybe_flush()
        assert len(read_log(path).tables["scalars"]) == 1


WRITER = """
    import sys
    from mpidqn.io.runlog import RunLog
    log = RunLog(sys.argv[1], {"world_size": 1}, flush_interval_s=1e9)
    for block in range(3):
        for i in range(10):
            log.scalars(10 * block + i, loss=float(10 * block + i))
        log.flush()
        print(block, flush=True)
        sys.stdin.readline()
    log.close()
"""


def test_reader_in_another_process_sees_the_log_grow(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    writer = python(WRITER, str(path))
    try:
        assert writer.stdout.readline().strip() == "0"
        with h5py.File(path, "r", swmr=True) as f:  # this process is the reader
            ds = f["scalars"]
            for block in range(3):
                if block:
                    writer.stdin.write("\n")
                    writer.stdin.flush()
                    assert writer.stdout.readline().strip() == str(block)
                ds.refresh()
                assert ds.shape == (10 * (block + 1),)
                assert np.array_equal(ds["loss"], np.arange(10 * (block + 1)))
                assert len(read_log(path).tables["scalars"]) == 10 * (block + 1)  # as report reads it
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=20) == 0
    finally:
        writer.kill()


KILLED = """
    import sys, time
    import numpy as np
    from mpidqn.io.runlog import RunLog
    log = RunLog(sys.argv[1], {"world_size": 2}, flush_interval_s=1e9)
    for step in range(25):
        log.scalars(step, loss=float(step))
    log.evaluation(20, np.array([1.0, 2.0]))
    log.event(24, "checkpoint", "saved")   # events flush everything buffered so far
    for step in range(25, 30):
        log.scalars(step, loss=float(step))  # buffered only: lost with the process
    print("ready", flush=True)
    time.sleep(60)
"""


def test_sigkill_keeps_everything_up_to_last_flush_and_resume_works(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    writer = python(KILLED, str(path))
    try:
        assert writer.stdout.readline().strip() == "ready"
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=20) == -signal.SIGKILL
    finally:
        writer.kill()
    data = read_log(path).tables
    assert np.array_equal(data["scalars"]["step"], np.arange(25))
    assert np.array_equal(data["eval_returns"], [1.0, 2.0]) and len(data["events"]) == 1
    with RunLog(path, {"world_size": 4}, resume_step=20) as log:  # a crashed log can be resumed
        log.scalars(21, loss=-1.0)
    data = read_log(path).tables
    assert np.array_equal(data["scalars"]["step"], [*range(21), 21])
    assert list(data["resumes"]["world_size"]) == [4]
    with h5py.File(path, "r") as f:  # the rebuilt file is a clean one, no SWMR flag left behind
        assert f["scalars"].shape == (22,)


def test_resume_truncates_past_resume_step_and_records_it(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    with RunLog(path, META, scalar_names=["loss"], timing_names=["env"]) as log:
        for step in range(0, 100, 10):
            log.scalars(step, loss=float(step))
            log.episodes(np.array([0]), np.array([step]), np.array([1.0]), np.array([5]))
            log.evaluation(step, np.full(step // 10 + 1, float(step)))
            log.timings(step, ["env"], np.full((2, 1), float(step)))
        log.event(95, "nan", "loss is nan")
    wall_before = read_log(path).tables["scalars"]["wall_time"]
    with RunLog(path, {"world_size": 4}, resume_step=50, scalar_names=["loss", "q_mean"],
                timing_names=["env"]) as log:
        log.scalars(60, loss=6.0, q_mean=1.0)
        log.timings(60, ["env"], np.zeros((4, 1)))
    d = read_log(path)
    t = d.tables
    assert list(t["scalars"]["step"]) == [0, 10, 20, 30, 40, 50, 60]
    assert np.isnan(t["scalars"]["q_mean"][:-1]).all() and t["scalars"]["q_mean"][-1] == 1.0
    assert t["scalars"]["wall_time"][-1] >= wall_before[5]
    assert list(t["episodes"]["step"]) == [0, 10, 20, 30, 40, 50]
    ev = t["evaluations"]
    assert list(ev["step"]) == [0, 10, 20, 30, 40, 50] and len(t["eval_returns"]) == sum(range(1, 7))
    assert np.array_equal(t["eval_returns"][ev["offset"][-1]:], np.full(6, 50.0))
    assert list(t["timings"]["segment"]) == [0] * 12 + [1] * 4
    assert [(r["step"], r["world_size"]) for r in t["resumes"]] == [(50, 4)]
    assert [k.decode() for k in t["events"]["kind"]] == ["resume"]  # the nan at 95 was past the checkpoint
    assert d.attrs["world_size"] == 4 and d.scalar_names == ["loss", "q_mean"]  # the new segment's values
    assert d.attrs["hosts"] == ["n1", "n2"] and d.attrs["versions"] == {"torch": "2.13"}  # kept from before
    assert d.attrs["config"] == META["config"] and d.attrs["slurm_job_id"] is None
    assert not (tmp_path / "log.h5.tmp").exists()


def test_old_and_corrupt_logs_are_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    for _ in range(3):  # fresh starts over an old log, twice in the same second
        RunLog(path, {}).close()
    path.write_bytes(b"not hdf5")
    with RunLog(path, {"world_size": 2}, resume_step=7):  # resume over an unreadable log
        pass
    names = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert names == ["log.h5", "log.h5.corrupt", "log.h5.old", "log.h5.old"]
    assert list(read_log(path).tables["resumes"]["step"]) == [7]


def test_phase_timer() -> None:
    timer = PhaseTimer(["env", "comm"])
    with timer("comm"):
        pass
    timer.add("env", 2.5)
    totals = timer.totals()
    assert totals.shape == (2,) and totals[0] == 2.5 and totals[1] >= 0.0
    with pytest.raises(ValueError, match="unknown phase"):
        timer("gpu")
