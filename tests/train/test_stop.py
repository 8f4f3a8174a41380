"""Stopping a run from outside: Ctrl-C / SIGINT, SIGTERM, SIGUSR1 to the launcher, with MPICH's
mpiexec and, when MPIDQN_TEST_OMPI_PYTHON names a Python whose mpi4py uses Open MPI (its mpiexec is
taken from the same bin/), with Open MPI's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env, inspect_json

LONG = ["train.total_steps=10000000", "train.learning_starts=200", "train.batch_size=16", "train.buffer_size=5000",
        "network.hidden=[32,32]", "eval.interval_steps=0", "eval.episodes=1", "log.interval_steps=400",
        "log.progress=lines", "checkpoint.interval_steps=0"]
OMPI_PYTHON = os.environ.get("MPIDQN_TEST_OMPI_PYTHON", "")


def _start(launcher: list[str], python: str, run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*launcher, python, "-m", "mpidqn", "--run-dir", str(run_dir), *LONG],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), **(env or {})}, start_new_session=True)


def _wait_started(p: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / "log.h5").exists():  # the loop runs: the handlers are installed
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.3)
    time.sleep(2)


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"the run did not stop:\n{out}\n{err}")
    return p.returncode, out, err


def _stopped_cleanly(rc: int, out: str, err: str, run_dir: Path, world: int, sig: str) -> None:
    assert rc == 75, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    stopped = [ln for ln in (out + err).splitlines() if "mpidqn: stopped on" in ln]
    assert len(stopped) == 1 and stopped[0].startswith(f"mpidqn: stopped on {sig} at step ") and "exit 75" in stopped[0]
    info = inspect_json(run_dir)
    assert info["complete"] and info["step"] > 0 and info["world_size"] == world


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_to_mpiexec_checkpoints_every_rank_and_exits_75(tmp_path, sig):
    run_dir = tmp_path / "r"
    p = _start(["mpiexec", "-n", "2"], sys.executable, run_dir)
    _wait_started(p, run_dir)
    os.kill(p.pid, sig)
    _stopped_cleanly(*_finish(p), run_dir, 2, sig.name)


def test_second_interrupt_stops_at_once(tmp_path):
    # the rank hangs in the loop (test-only fault), so the first Ctrl-C can never be acted upon
    run_dir = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), *LONG],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**_env(), "MPIDQN_FAULT": "hang:0:1"})
    _wait_started(p, run_dir)
    p.send_signal(signal.SIGINT)
    time.sleep(1)
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    rc, out, err = _finish(p, timeout=60)
    assert rc == 130, out + err
    assert "Traceback" not in err and "mpidqn: interrupted again: stopped at once, without a checkpoint" in err


@pytest.mark.skipif(not OMPI_PYTHON, reason="MPIDQN_TEST_OMPI_PYTHON (a Python with Open MPI's mpi4py) is not set")
def test_sigusr1_to_open_mpi_mpiexec_checkpoints_and_exits_75(tmp_path):
    mpiexec = str(Path(OMPI_PYTHON).parent / "mpiexec")
    run_dir = tmp_path / "r"
    p = _start([mpiexec, "--allow-run-as-root", "-n", "2"], OMPI_PYTHON, run_dir)
    _wait_started(p, run_dir)
    os.kill(p.pid, signal.SIGUSR1)
    _stopped_cleanly(*_finish(p), run_dir, 2, "SIGUSR1")


def _rank_pids(launcher: int, world: int) -> list[int]:
    """The pids of the ranks under ``launcher`` (mpiexec -> Hydra's proxy -> ranks), from /proc."""
    deadline = time.monotonic() + 30
    while True:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (ValueError, OSError):
                continue
        tree, changed = {launcher}, True
        while changed:
            grown = tree | {pid for pid, ppid in parents.items() if ppid in tree}
            changed, tree = grown != tree, grown
        ranks = [pid for pid in tree - {launcher} if b"mpidqn" in _cmdline(pid) and b"hydra" not in _cmdline(pid)]
        if len(ranks) == world:
            return ranks
        assert time.monotonic() < deadline, f"found rank pids {ranks}"
        time.sleep(0.2)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_for(predicate, what: str, p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_interrupt_during_the_stop_checkpoint_is_ignored_under_mpiexec(tmp_path):
    # issue #34: a second Ctrl-C used to cut the stop short (rc 0 or 255). Once the ranks agreed to
    # stop, a SIGINT reaching them (a launcher that forwards every one, `kill` on the ranks) must not
    # keep the checkpoint from completing: exit 75 through mpiexec. Rank 0 pauses 5 s in the
    # checkpoint (a slow disk) so that the second SIGINT lands inside it.
    run_dir = tmp_path / "r"
    p = _start(["mpiexec", "-n", "2"], sys.executable, run_dir, env={"MPIDQN_FAULT": "pause_in_checkpoint:0:0"})
    _wait_started(p, run_dir)
    ranks = _rank_pids(p.pid, 2)
    os.kill(p.pid, signal.SIGINT)  # mpiexec forwards its first SIGINT to every rank
    _wait_for(lambda: any((run_dir / "checkpoints").glob("step_*")), "no stop checkpoint was begun", p)
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    rc, out, err = _finish(p)
    _stopped_cleanly(rc, out, err, run_dir, 2, "SIGINT")
    assert "mpidqn: SIGINT received: checkpointing at the next step boundary, then exit 75" in err
    assert "interrupted again while writing the stop checkpoint: ignored" in err
    assert "stopped at once" not in err


def test_second_interrupt_before_the_stop_exits_130_under_mpiexec(tmp_path):
    # rank 0 hangs (test-only fault), so the ranks never agree to stop: the second SIGINT ends the
    # job at once, and mpiexec reports the ranks' 130, not 0
    run_dir = tmp_path / "r"
    p = _start(["mpiexec", "-n", "2"], sys.executable, run_dir, env={"MPIDQN_FAULT": "hang:0:1"})
    _wait_started(p, run_dir)
    ranks = _rank_pids(p.pid, 2)
    os.kill(p.pid, signal.SIGINT)
    time.sleep(1)
    assert p.poll() is None
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    rc, out, err = _finish(p, timeout=60)
    assert rc == 130, out + err
    assert "Traceback" not in err
    assert err.count("mpidqn: interrupted again: stopped at once, without a checkpoint") == 1, err
    assert not any((run_dir / "checkpoints").glob("step_*/COMPLETE"))


def test_a_rank_killed_during_the_stop_checkpoint_ends_the_job_non_zero(tmp_path):
    # the stop's checkpoint is cut short by a SIGKILL of rank 1 (OOM killer, a forced abort): the job
    # must not look stopped (75) or finished (0), and the half-written checkpoint must not count
    run_dir = tmp_path / "r"
    p = _start(["mpiexec", "-n", "2"], sys.executable, run_dir, env={"MPIDQN_FAULT": "kill_in_checkpoint:1:0"})
    _wait_started(p, run_dir)
    os.kill(p.pid, signal.SIGINT)
    rc, out, err = _finish(p)
    assert rc not in (0, 75), out + err
    assert "mpidqn: stopped on" not in out + err
    assert any((run_dir / "checkpoints").glob("step_*")) and not any((run_dir / "checkpoints").glob("step_*/COMPLETE"))
