"""Several hosts: real runs across network namespaces on a bridge, MPICH over TCP (tests/netns.py).

Each "host" is a network namespace with its own interface and address; the machine's hostname and
file system are shared, so the run dir plays the part of a cluster's shared storage. Skipped (with
the reason) where namespaces cannot be made (not root, no iproute2) or mpiexec is not MPICH's Hydra.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MPI_SCRIPTS, ROOT, TINY, _env, inspect_json, mpidqn
from mpidqn.train.checkpoints import find_latest
from mpidqn.errors import EXIT_WATCHDOG
from mpidqn.io.runlog import read_log
from netns import NetnsHosts, hydra_mpiexec, netns_unavailable

pytestmark = [pytest.mark.mpi, pytest.mark.multihost]

_WHY_NOT = netns_unavailable() or hydra_mpiexec()
if _WHY_NOT:
    pytestmark.append(pytest.mark.skip(reason=_WHY_NOT))

TIMEOUT_S = 6  # parallel.collective_timeout_s of the fault tests


def launch(hosts: NetnsHosts, ranks_per_host: list[int], args: list[str], timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = hosts.mpiexec_argv(ranks_per_host, [sys.executable, *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**_env(), **hosts.env(), **(env or {})})


def train(hosts: NetnsHosts, ranks_per_host: list[int], run_dir: Path, *overrides: str, **kw
          ) -> subprocess.CompletedProcess:
    return launch(hosts, ranks_per_host, ["-m", "mpidqn", "--run-dir", str(run_dir), *TINY, *overrides], **kw)


def labels(hosts: NetnsHosts, ranks_per_host: list[int]) -> list[str]:
    """The rank_hosts a run should log: one hostname for all, told apart by address."""
    return [f"{socket.gethostname()}/{a}" for a, k in zip(hosts.addrs, ranks_per_host) for _ in range(k)]


@pytest.fixture(scope="module")
def two_hosts():
    with NetnsHosts(2) as hosts:
        yield hosts


# ----------------------------------------------------------------------------- data parallel


def test_allreduced_gradient_and_bit_identical_replicas_across_hosts(two_hosts):
    p = launch(two_hosts, [2, 2], [str(MPI_SCRIPTS / "grad_equivalence.py")], timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK") == 4


@pytest.fixture(scope="module")
def dp_run(two_hosts, tmp_path_factory):
    """Data parallel, 2 hosts x 2 ranks, replicas compared every 4 updates, checkpoints on the run dir."""
    run_dir = tmp_path_factory.mktemp("multihost") / "dp"
    p = train(two_hosts, [2, 2], run_dir, "checkpoint.interval_steps=600", "parallel.sync_check_interval=4")
    assert p.returncode == 0, p.stdout + p.stderr  # a replica that drifted would exit 4
    return run_dir


def test_data_parallel_2_hosts_x_2_ranks_checkpoints_and_logs_the_hosts(two_hosts, dp_run):
    info = inspect_json(dp_run)  # verifies sizes and CRCs of every file
    assert info["complete"] and info["step"] == 1200 and info["world_size"] == 4
    attrs = read_log(dp_run / "log.h5").attrs
    assert attrs["rank_hosts"] == labels(two_hosts, [2, 2])
    assert attrs["hosts"] == sorted(set(labels(two_hosts, [2, 2])))


def test_report_groups_the_time_breakdown_by_host(dp_run, tmp_path):
    p = subprocess.run([sys.executable, "-m", "mpidqn", "report", str(dp_run), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stderr
    assert (tmp_path / f"time_breakdown_{dp_run.name}.png").stat().st_size > 0


def test_checkpoint_of_two_hosts_resumes_elastically_on_one_host(tmp_path, dp_run):
    run_dir = tmp_path / "dp"
    subprocess.run(["cp", "-a", str(dp_run), str(run_dir)], check=True)
    p = mpidqn(2, ["--run-dir", str(run_dir), *TINY, "train.total_steps=1600", "checkpoint.interval_steps=600"],
               timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed" in p.stdout
    info = inspect_json(run_dir)
    assert info["complete"] and info["step"] == 1600 and info["world_size"] == 2
    attrs = read_log(run_dir / "log.h5").attrs
    assert attrs["rank_hosts"] == [socket.gethostname()] * 2
    assert attrs["host_cores"] == {socket.gethostname(): len(os.sched_getaffinity(0))}


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_with_one_stage_per_host(tmp_path):
    run_dir = tmp_path / "pp"
    with NetnsHosts(3) as hosts:
        p = train(hosts, [1, 1, 1], run_dir, "parallel.pipeline_stages=3", "train.total_steps=600",
                  "parallel.sync_check_interval=4")
        assert p.returncode == 0, p.stdout + p.stderr
        info = inspect_json(run_dir)
        assert info["complete"] and info["pipeline_stages"] == 3 and info["world_size"] == 3
        assert read_log(run_dir / "log.h5").attrs["rank_hosts"] == labels(hosts, [1, 1, 1])


# ----------------------------------------------------------------------------- host faults


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, deadline_s: float) -> None:
    t0 = time.monotonic()
    while find_latest(run_dir / "checkpoints") is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < deadline_s, "no checkpoint written"
        time.sleep(0.5)


def test_host_whose_link_goes_down_ends_every_rank_by_watchdog(tmp_path):
    run_dir = tmp_path / "r"
    with NetnsHosts(2) as hosts:
        argv = hosts.mpiexec_argv([2, 2], [sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), *TINY,
                                           "train.total_steps=10000000", "checkpoint.interval_steps=400",
                                           f"parallel.collective_timeout_s={TIMEOUT_S}"])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**_env(), **hosts.env()})
        try:
            _wait_for_checkpoint(run_dir, proc, 90)
            hosts.link_down(1)
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=TIMEOUT_S + 30)
            # every rank ends, those cut off too (Hydra's proxy there cannot tell and stays)
            left = hosts.wait_ended(TIMEOUT_S + 30 - (time.monotonic() - t0), match="-m mpidqn")
        finally:
            proc.kill()
        assert proc.returncode == EXIT_WATCHDOG, out + err
        assert "watchdog:" in err and "(a rank is hung or dead)" in err, err
        assert left == [[], []], f"ranks still running {time.monotonic() - t0:.0f} s after the link went down"
    info = inspect_json(run_dir)  # the newest complete checkpoint verifies
    assert info["complete"] and info["step"] > 0 and info["world_size"] == 4


def test_rank_killed_on_the_remote_host_ends_the_job(tmp_path):
    run_dir = tmp_path / "r"
    with NetnsHosts(2) as hosts:
        p = train(hosts, [2, 2], run_dir, "train.total_steps=10000000", "checkpoint.interval_steps=400",
                  f"parallel.collective_timeout_s={TIMEOUT_S}", env={"MPIDQN_FAULT": "kill:3:1000"},
                  timeout=90)
        assert p.returncode not in (0, 2), p.stdout + p.stderr
        assert hosts.wait_ended(10) == [[], []]  # every rank (and proxy) ended
    info = inspect_json(run_dir)
    assert info["complete"] and info["step"] == 800
