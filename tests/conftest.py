"""Shared helpers: launch the real command (or a test script) under mpiexec with a timeout.

The launcher differences between MPICH (Hydra) and Open MPI live in :func:`mpiexec`."""
from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = Path(__file__).resolve().parent / "mpi"
TINY = [
    "train.total_steps=1200", "train.learning_starts=200", "train.n_step=1", "train.train_freq=100", "train.gradient_steps=4",
    "train.batch_size=12", "train.buffer_size=2000", "network.hidden=[32,32]", "eval.interval_steps=0",
    "eval.episodes=2", "log.interval_steps=400", "log.progress=lines", "env.max_episode_steps=100",
]


# The per-user secret that signs checkpoints' env state (mpidqn.io.trust) of every command the tests
# run: a fresh one of this test process, never the user's own ~/.config/mpidqn/secret.
CONFIG_HOME = tempfile.mkdtemp(prefix="mpidqn-tests-config-")
atexit.register(shutil.rmtree, CONFIG_HOME, True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = CONFIG_HOME
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


@functools.cache
def mpiexec_flavor() -> str:
    """"openmpi" or "hydra" (MPICH): the mpiexec on PATH, the one mpi4py's MPI came with."""
    out = subprocess.run(["mpiexec", "--version"], capture_output=True, text=True, timeout=60)
    return "openmpi" if re.search(r"open mpi|open-rte|openrte", out.stdout + out.stderr, re.I) else "hydra"


def mpiexec(n: int) -> list[str]:
    """`mpiexec -n N` plus what this MPI needs on a test machine: Open MPI refuses root without
    --allow-run-as-root (CI runs as root) and more ranks than cores without --oversubscribe."""
    extra = []
    if mpiexec_flavor() == "openmpi":
        extra = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return ["mpiexec", *extra, "-n", str(n)]


def program_lines(text: str) -> list[str]:
    """The non-empty lines of ``text`` without the launcher's own notices: Open MPI frames each one
    (e.g. "prterun detected that one or more processes exited with non-zero status") between two
    rules of dashes; Hydra adds nothing on a plain non-zero exit."""
    lines, inside = [], False
    for line in text.splitlines():
        if mpiexec_flavor() == "openmpi" and re.fullmatch(r"-{40,}", line.strip()):
            inside = not inside
        elif line.strip() and not inside:
            lines.append(line)
    return lines


def launcher_saw_sigkill(text: str) -> bool:
    """Whether the launcher's output says a rank was killed by signal 9."""
    flat = " ".join(text.split())  # Open MPI wraps its notice
    if mpiexec_flavor() == "openmpi":
        return "exited on signal 9" in flat
    return "BAD TERMINATION" in flat and "signal 9" in flat


def mpirun(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return run([*mpiexec(n), sys.executable, *args], **kw)


def mpidqn(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return mpirun(n, ["-m", "mpidqn", *args], **kw)


def inspect_json(target: Path) -> dict:
    p = run([sys.executable, "-m", "mpidqn", "inspect", str(target), "--json"])
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


# The longest files, longest first (their tests took 259, 227, 115, 103, 101 and 83 s in all on the
# 2-core CI machine, MPICH, one at a time, 2026-12-03). Under `pytest -n N` (files whole per worker,
# pyproject's --dist loadfile) workers take files in collection order, so these go first and the many
# short files fill the gaps; without -n the order does not matter.
LONGEST_FIRST = ["slurm/test_slurm.py", "train/test_checkpoint.py", "train/test_learning_contract.py",
                 "train/test_sweep.py", "train/test_faults.py", "learners/test_pipeline_mpi.py", "distributed/test_multihost.py"]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    missing = [name for name in LONGEST_FIRST if not (here / name).is_file()]
    if missing:  # a renamed file would silently lose its place
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST names no file tests/{', tests/'.join(missing)}")
    rank = {(here / name).resolve(): i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.resolve(), len(rank)))  # stable: file order kept
