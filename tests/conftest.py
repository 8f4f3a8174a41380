"""Shared helpers: launch the real command (or a test script) under mpiexec with a timeout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = Path(__file__).resolve().parent / "mpi"
TINY = [
    "train.total_steps=1200", "train.learning_starts=200", "train.n_step=1", "train.train_freq=100", "train.gradient_steps=4",
    "train.batch_size=12", "train.buffer_size=2000", "network.hidden=[32,32]", "eval.interval_steps=0",
    "eval.episodes=2", "log.interval_steps=400", "log.progress=lines", "env.max_episode_steps=100",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.pop("SLURM_NTASKS", None)
    env.pop("PMI_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command; a hang fails the test (TimeoutExpired) instead of freezing the suite."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env or {})},
                          cwd=cwd)


def mpirun(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return run(["mpiexec", "-n", str(n), sys.executable, *args], **kw)


def mpidqn(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return mpirun(n, ["-m", "mpidqn", *args], **kw)


def inspect_json(target: Path) -> dict:
    p = run([sys.executable, "-m", "mpidqn", "inspect", str(target), "--json"])
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
