"""Slurm batch scripts against a real one-node Slurm cluster.

The session fixture starts the cluster with `slurm/testing/cluster.sh start` (root only; it installs
the Debian packages if missing). The tests are skipped only when that script says it cannot run here
(exit code 3: not root, or Slurm cannot be installed); any other failure to start is an error.

Run them with:  pytest -m slurm tests/slurm/test_slurm.py

What the tests rely on from the trainer (`python -m mpidqn`, see docs/training.md and mpidqn/errors.py):
  [train]    `train --config FILE --run-dir DIR KEY=VALUE ...` trains to `train.total_steps` and exits
             0, leaving DIR/log.h5 and a complete checkpoint at step == train.total_steps exactly
             (the totals used here are multiples of world size x env.num_envs=1).
  [inspect]  `inspect DIR --json` prints one JSON object for the newest complete checkpoint of DIR,
             with at least `step` (int), `complete` (true) and `world_size` (int); non-zero exit if none.
  [overrides] `seed=N`, `env.num_envs=N`, `parallel.torch_threads=N`, `checkpoint.interval_steps=N`
             are accepted overrides (the batch scripts add `parallel.torch_threads` and `seed`).
  [signal]   SIGUSR1 or SIGTERM to the launcher (mpiexec forwards it to every rank) or to any rank:
             the trainer checkpoints (a complete checkpoint with 0 < step < total) and exits 75.
             log.h5 exists once training has started (the preemption tests wait for it before
             signalling, so that the signal handlers are installed).
  [resume]   `train` on a run dir holding a complete checkpoint resumes from the newest one.
  [guard]    when SLURM_NTASKS is set and differs from the MPI world size the trainer exits 2 and
             prints one line that names SLURM_NTASKS.

Environment knobs: MPIDQN_TEST_CONFIG (config to train, default configs/cartpole.yaml), MPIDQN_PYTHON (interpreter for jobs and `inspect`, default this one),
MPIDQN_TEST_SLURM_TIMEOUT (seconds per job wait, default 300), MPIDQN_TEST_PREEMPT_STEPS (total steps
of the preemption runs, long enough to be still running when signalled; default 20000),
MPIDQN_TEST_SRUN_ARGS (launcher args for the srun test, default --mpi=pmi2), MPIDQN_TEST_OMPI_PYTHON (a
Python whose mpi4py uses Open MPI, with Open MPI's mpiexec beside it: the Open MPI preemption test runs
it with the default launcher, which is srun --mpi=pmix for Open MPI and needs Slurm's PMIx plugin to load (Debian: libpmix-dev, then restart the cluster); skipped
when unset).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
CLUSTER = SLURM_DIR / "testing" / "cluster.sh"
CONFIG = Path(os.environ.get("MPIDQN_TEST_CONFIG", REPO / "configs" / "cartpole.yaml"))
PYTHON = os.environ.get("MPIDQN_PYTHON", sys.executable)
JOB_TIMEOUT = float(os.environ.get("MPIDQN_TEST_SLURM_TIMEOUT", "300"))
PREEMPT_STEPS = int(os.environ.get("MPIDQN_TEST_PREEMPT_STEPS", "20000"))
SRUN_ARGS = os.environ.get("MPIDQN_TEST_SRUN_ARGS", "--mpi=pmi2")
OMPI_PYTHON = os.environ.get("MPIDQN_TEST_OMPI_PYTHON", "")
JOBCOMP_LOG = Path(os.environ.get("MPIDQN_SLURM_STATE", "/var/spool/mpidqn-slurm")) / "log" / "jobcomp.log"
CANNOT_RUN_HERE = 3  # cluster.sh: not root / cannot install Slurm

TOTAL = 2000
# A tiny run: few env steps, one env per rank (so the step count divides evenly), a mid-run checkpoint.
TINY = [f"train.total_steps={TOTAL}", "env.num_envs=1", "checkpoint.interval_steps=1000"]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}


# --- cluster + job helpers ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster():
    """A running one-node Slurm; stopped again at the end if this session started it."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    r = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if r.returncode == CANNOT_RUN_HERE:
        pytest.skip(f"Slurm cannot run here: {r.stderr.strip()}")
    if r.returncode != 0:
        pytest.fail(f"slurm/testing/cluster.sh start failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    yield
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Jobs run `python -m mpidqn` from tmp_path: make the package of this checkout importable
    # (after anything already on PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    env["MPIDQN_PYTHON"] = PYTHON
    env["MPIDQN_RUNS"] = str(tmp_path / "runs")
    env.update(extra)
    return env


@pytest.fixture
def submit(cluster, tmp_path):
    """submit(args, **env) -> job id: `sbatch --parsable --chdir=tmp_path ARGS`; cancelled at teardown."""
    jobs: list[str] = []

    def _submit(args: list[str], **env: str) -> str:
        cmd = ["sbatch", "--parsable", f"--chdir={tmp_path}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=job_env(tmp_path, **env), timeout=60)
        assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}"
        job = r.stdout.strip().split(";")[0]
        jobs.append(job)
        return job

    yield _submit
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)


def job_records(job: str) -> list[dict[str, str]]:
    """`scontrol show job -o JOB` as dicts (one per array task); [] once Slurm forgot the job."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return []
    recs = []
    for line in r.stdout.splitlines():
        if line.strip():
            recs.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
    return recs


def jobcomp_records(job: str) -> list[dict[str, str]]:
    """Last jobcomp/filetxt record per job id for JOB (or the tasks of array JOB), if Slurm forgot it."""
    if not JOBCOMP_LOG.exists():
        return []
    last: dict[str, dict[str, str]] = {}
    for line in JOBCOMP_LOG.read_text().splitlines():
        rec = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if rec.get("JobId") == job or rec.get("ArrayJobId") == job:
            last[rec["JobId"]] = rec
    return list(last.values())


def wait_job(job: str, timeout: float = JOB_TIMEOUT, until=None) -> list[dict[str, str]]:
    """Poll until every record of JOB is in a terminal state (or `until(records)` is true)."""
    deadline = time.monotonic() + timeout
    recs: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        recs = job_records(job)
        if not recs:  # purged after MinJobAge: fall back on the completion log
            recs = jobcomp_records(job)
            if recs:
                return recs
        elif until is not None:
            if until(recs):
                return recs
        elif all(r.get("JobState") in TERMINAL for r in recs):
            return recs
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True)
    pytest.fail(f"job {job} not done after {timeout:.0f}s; last seen: {recs}")


def output_of(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.out")))


def assert_completed(recs: list[dict[str, str]], tmp_path: Path) -> None:
    for r in recs:
        assert (r.get("JobState"), r.get("ExitCode")) == ("COMPLETED", "0:0"), (
            f"job {r.get('JobId')}: {r.get('JobState')} {r.get('ExitCode')}\n{output_of(tmp_path)}")


def inspect(run_dir: Path, tmp_path: Path) -> dict:
    r = subprocess.run([PYTHON, "-m", "mpidqn", "inspect", str(run_dir), "--json"], capture_output=True,
                       text=True, env=job_env(tmp_path), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, f"inspect {run_dir} failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_finished_run(run_dir: Path, tmp_path: Path, total: int = TOTAL, world: int | None = None) -> dict:
    assert (run_dir / "log.h5").is_file(), f"no log.h5 in {run_dir}\n{output_of(tmp_path)}"
    info = inspect(run_dir, tmp_path)
    assert info["complete"] is True, info
    assert info["step"] == total, info
    if world is not None:
        assert info["world_size"] == world, info
    return info


def wait_for_file(path: Path, job: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        recs = job_records(job)
        if recs and all(r.get("JobState") in TERMINAL for r in recs):
            pytest.fail(f"job {job} ended before {path} appeared: {recs}")
        time.sleep(0.5)
    pytest.fail(f"{path} did not appear within {timeout:.0f}s")


@pytest.fixture(autouse=True)
def _need_config():
    if not CONFIG.is_file():
        pytest.fail(f"{CONFIG} is missing (the Slurm tests train it)")


# --- tests ----------------------------------------------------------------------------------------

def test_train_completes(submit, tmp_path):
    """train.sbatch with mpiexec (default launcher): a tiny run ends with a final complete checkpoint."""
    job = submit(["--ntasks=2", "--cpus-per-task=1", str(SLURM_DIR / "train.sbatch"), str(CONFIG), *TINY])
    assert_completed(wait_job(job), tmp_path)
    assert_finished_run(tmp_path / "runs" / job, tmp_path, world=2)
    out = output_of(tmp_path)
    assert f"mpidqn-{job}.out" in out  # --output=%x-%j.out in the submit dir
    assert "parallel.torch_threads=1" in out


def test_train_with_srun_launcher(submit, tmp_path):
    """MPIDQN_LAUNCHER=srun: the job step is started by srun (PMI2 for the pip MPICH wheel)."""
    job = submit(["--ntasks=2", str(SLURM_DIR / "train.sbatch"), str(CONFIG), *TINY],
                 MPIDQN_LAUNCHER="srun", MPIDQN_LAUNCHER_ARGS=SRUN_ARGS)
    assert_completed(wait_job(job), tmp_path)
    assert_finished_run(tmp_path / "runs" / job, tmp_path, world=2)
    assert "launch: srun" in output_of(tmp_path)


def _preempt(submit, tmp_path, how: str, total: int = PREEMPT_STEPS, **env: str):
    overrides = [f"train.total_steps={total}", "env.num_envs=1", "checkpoint.interval_steps=1000000"]
    job = submit(["--ntasks=2", str(SLURM_DIR / "train.sbatch"), str(CONFIG), *overrides], **env)
    run_dir = tmp_path / "runs" / job
    wait_for_file(run_dir / "log.h5", job)  # training has started: the signal handlers are in place
    time.sleep(2)
    if how == "usr1":
        r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True)
    else:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # The job comes back PENDING (requeued, Restarts=1) before it runs again: look at the checkpoint
    # the signal left behind.
    recs = wait_job(job, until=lambda rs: rs[0].get("Restarts", "0") != "0" and rs[0]["JobState"] == "PENDING")
    if recs[0].get("JobState") in TERMINAL:
        pytest.fail(f"job {job} ended instead of being requeued (raise MPIDQN_TEST_PREEMPT_STEPS?): "
                    f"{recs}\n{output_of(tmp_path)}")
    mid = inspect(run_dir, tmp_path)  # (inspect runs with this Python: checkpoints do not depend on the MPI)
    assert mid["complete"] is True and 0 < mid["step"] < total, mid
    recs = wait_job(job)
    assert_completed(recs, tmp_path)
    assert int(recs[0].get("Restarts", 0)) >= 1, recs
    assert_finished_run(run_dir, tmp_path, total=total, world=2)
    out = output_of(tmp_path)
    assert "step exited with 75" in out, out
    assert "restart 1 " in out, out
    return out


def test_usr1_checkpoints_requeues_and_resumes(submit, tmp_path):
    """`--signal=B:USR1@T` path: USR1 to the batch shell -> exit 75 -> self-requeue -> resume -> done."""
    out = _preempt(submit, tmp_path, "usr1")
    assert "got SIGUSR1" in out
    assert "requeueing job" in out


def test_external_requeue_checkpoints_and_resumes(submit, tmp_path):
    """`scontrol requeue` (as a preemption does): SIGTERM -> exit 75 -> the job comes back and resumes."""
    out = _preempt(submit, tmp_path, "requeue")
    assert "got SIGTERM" in out


@pytest.mark.skipif(not OMPI_PYTHON, reason="MPIDQN_TEST_OMPI_PYTHON (a Python with Open MPI's mpi4py) is not set")
def test_open_mpi_checkpoints_on_requeue_and_resumes(submit, tmp_path):
    """Open MPI with no launcher set: train.sbatch picks the mpiexec beside MPIDQN_PYTHON, sees Open
    MPI and launches with srun --mpi=pmix, so Slurm's SIGTERM reaches the ranks directly -> checkpoint
    -> 75 -> requeue -> resume (Open MPI's own mpiexec would kill the ranks within a second)."""
    # total: Open MPI's busy-polling ranks are slow on an oversubscribed test machine
    out = _preempt(submit, tmp_path, "requeue", total=4000, MPIDQN_PYTHON=OMPI_PYTHON)
    assert "launching with srun --mpi=pmix" in out, out
    assert "launch: srun" in out and "got SIGTERM" in out


def test_srun_ends_the_step_when_a_rank_dies(submit, tmp_path):
    """srun --kill-on-bad-exit=1: a rank killed mid-run ends the job at once, not after the watchdog's
    parallel.collective_timeout_s (600 s by default, longer than this test waits)."""
    overrides = [f"train.total_steps={PREEMPT_STEPS}", "env.num_envs=1"]
    job = submit(["--ntasks=2", str(SLURM_DIR / "train.sbatch"), str(CONFIG), *overrides],
                 MPIDQN_LAUNCHER="srun", MPIDQN_LAUNCHER_ARGS=SRUN_ARGS, MPIDQN_FAULT="kill:1:1000")
    recs = wait_job(job, timeout=min(JOB_TIMEOUT, 300))
    assert recs[0]["JobState"] == "FAILED" and recs[0].get("Restarts", "0") == "0", recs


def test_sweep_array_two_seeds(submit, tmp_path):
    """sweep.sbatch --array=0-1: two sibling runs, seeds 0 and 1, under runs/sweep-<array job id>/."""
    job = submit(["--array=0-1", "--ntasks=1", str(SLURM_DIR / "sweep.sbatch"), str(CONFIG), *TINY])
    recs = wait_job(job)
    assert len(recs) == 2, recs
    assert_completed(recs, tmp_path)
    sweep_dir = tmp_path / "runs" / f"sweep-{job}"
    assert sorted(p.name for p in sweep_dir.iterdir()) == [f"{CONFIG.stem}-seed0", f"{CONFIG.stem}-seed1"]
    for seed in (0, 1):
        assert_finished_run(sweep_dir / f"{CONFIG.stem}-seed{seed}", tmp_path, world=1)
    out = output_of(tmp_path)
    assert "seed=0" in out and "seed=1" in out


def test_scaling_one_and_two_ranks(submit, tmp_path):
    """scaling.sbatch --ntasks=2: world1 and world2 runs, one after the other, in runs/<job>/."""
    job = submit(["--ntasks=2", str(SLURM_DIR / "scaling.sbatch"), str(CONFIG), *TINY])
    assert_completed(wait_job(job), tmp_path)
    job_dir = tmp_path / "runs" / job
    assert sorted(p.name for p in job_dir.iterdir() if not p.name.startswith(".")) == ["world1", "world2"]
    for w in (1, 2):
        assert_finished_run(job_dir / f"world{w}", tmp_path, world=w)
    assert "mpidqn report" in output_of(tmp_path)


def test_ntasks_guard(submit, tmp_path):
    """--ntasks=2 but one process launched by hand: the trainer refuses with exit 2 and one line."""
    cmd = (f"exec {PYTHON} -m mpidqn train --config {CONFIG} --run-dir {tmp_path / 'runs' / 'guard'} "
           + " ".join(TINY))
    job = submit(["--ntasks=2", "--job-name=guard", "--output=guard-%j.out", f"--wrap={cmd}"])
    recs = wait_job(job)
    assert (recs[0]["JobState"], recs[0]["ExitCode"]) == ("FAILED", "2:0"), recs
    out = (tmp_path / f"guard-{job}.out").read_text()
    lines = [ln for ln in out.splitlines() if "SLURM_NTASKS" in ln]
    assert len(lines) == 1, out
    assert "Traceback" not in out, out


def test_bad_input_is_not_requeued(submit, tmp_path):
    """A config error (exit 2) fails the job at once: no requeue."""
    job = submit(["--ntasks=1", str(SLURM_DIR / "train.sbatch"), str(CONFIG), "no.such.key=1"])
    recs = wait_job(job)
    assert (recs[0]["JobState"], recs[0]["ExitCode"], recs[0].get("Restarts")) == ("FAILED", "2:0", "0"), recs
