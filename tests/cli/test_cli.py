"""The real command, tiny step counts, at 1 and 2 ranks; evaluate and inspect on what it leaves."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest
import yaml

from conftest import ROOT, inspect_json, mpidqn, run


@pytest.mark.parametrize("n", [1, 2])
def test_train_smoke_then_evaluate_and_inspect(tmp_path, tiny, n):
    run_dir = tmp_path / f"w{n}"
    p = mpidqn(n, ["train", "--run-dir", str(run_dir), *tiny, "eval.interval_steps=600"], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert f"world {n} (dp {n} x pipeline 1)" in out
    assert "env-steps/s" in out and "upd/s" in out and "allreduce" in out and "eps" in out
    assert "evaluation @ 600 steps" in out and "final evaluation @ 1,200 steps" in out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["total_steps"] == 1200 and saved["network"]["hidden"] == [32, 32]
    info = inspect_json(run_dir)
    assert (info["step"], info["world_size"], info["pipeline_stages"], info["complete"]) == (1200, n, 1, True)
    assert info["replay_transitions"] == 1200
    ev = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "3", "--json"])
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["episodes"] == 3 and result["step"] == 1200
    assert result["min"] <= result["mean"] <= result["max"] <= 100  # env.max_episode_steps=100 is kept
    text = run([sys.executable, "-m", "mpidqn", "inspect", str(run_dir)])
    best = [ln.strip() for ln in text.stdout.splitlines() if ln.strip().startswith("best:")]
    assert text.returncode == 0 and len(best) == 1, text.stdout + text.stderr
    assert re.fullmatch(r"best: mean \d+\.\d\d over 2 episodes at step (600|1,200) \(checkpoints/step_\d{12}\)",
                        best[0]), best  # issue #34: not a Python dict


def test_default_config_runs_without_arguments(tmp_path):
    # `python -m mpidqn` with no arguments trains the embedded CartPole config (shortened here).
    p = mpidqn(1, ["train.total_steps=300", "train.learning_starts=100", "log.progress=none"], timeout=120,
               cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("CartPole-v1-s0-")


def test_offline_tools_reject_bad_paths(tmp_path):
    for cmd in ("evaluate", "inspect"):
        p = run([sys.executable, "-m", "mpidqn", cmd, str(tmp_path / "nothing")])
        assert p.returncode == 2 and p.stderr.strip().endswith("no such run directory or checkpoint"), p.stderr


def test_run_dir_of_another_run_is_refused(tmp_path, tiny):
    run_dir = tmp_path / "r"
    assert mpidqn(1, ["--run-dir", str(run_dir), *tiny]).returncode == 0
    before = (run_dir / "config.yaml").read_text()
    p = mpidqn(1, ["--run-dir", str(run_dir), *tiny, "train.lr=0.01"])  # the saved config + overrides
    assert p.returncode == 2
    assert "train.lr cannot change when the run in" in p.stderr
    cartpole = str(ROOT / "configs" / "cartpole.yaml")  # another config file
    p = mpidqn(1, ["--run-dir", str(run_dir), "--config", cartpole])
    assert p.returncode == 2
    assert "belongs to another run: " in p.stderr and f"continue it with `train --run-dir {run_dir}`" in p.stderr
    assert (run_dir / "config.yaml").read_text() == before
    f = tmp_path / "file"
    f.write_text("x")
    p = mpidqn(1, ["--run-dir", str(f), *tiny])
    assert p.returncode == 2 and "is not a directory" in p.stderr


def test_slurm_ntasks_guard():
    from mpidqn.cli.main import slurm_tasks_problem

    assert slurm_tasks_problem(1, {}) is None  # not under Slurm
    assert slurm_tasks_problem(4, {"SLURM_NTASKS": "4"}) is None
    problem = slurm_tasks_problem(1, {"SLURM_NTASKS": "4", "SLURM_PROCID": "2"})  # srun without PMI
    assert problem is not None and problem.startswith("SLURM_NTASKS=4 but the MPI world has 1 rank(s)")
    assert "`srun --mpi=pmix`" in problem and "`mpiexec -n 4`" in problem
    assert slurm_tasks_problem(2, {"SLURM_NTASKS": "4"}) is not None  # srun -n 4 but two 2-rank worlds
    # mpiexec -n 2 inside an allocation: Hydra's proxies see SLURM_NTASKS=1, the ranks PMI_SIZE=2
    assert slurm_tasks_problem(2, {"SLURM_NTASKS": "1", "PMI_SIZE": "2"}) is None
    assert slurm_tasks_problem(2, {"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "2"}) is None


def test_slurm_ntasks_guard_end_to_end(tmp_path, tiny):
    # a singleton MPI process (what srun without PMI starts, SLURM_NTASKS times) inside a 3-task allocation
    run_dir = tmp_path / "r"
    p = run([sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), *tiny], env={"SLURM_NTASKS": "3"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [
        "mpidqn: error: SLURM_NTASKS=3 but the MPI world has 1 rank(s), so this is not one 3-rank job (srun "
        "without a PMI this MPI understands starts every task as a job of its own); launch with "
        "`srun --mpi=pmix` (Open MPI, or any MPI built with PMIx; `srun --mpi=list` shows what Slurm offers) "
        "or `mpiexec -n 3` (see slurm/README.md)"]
    assert not run_dir.exists()


@pytest.mark.parametrize("key, extra", [("train.compile_optimizer", ["train.optimizer=rmsprop"]),
                                        ("train.compile_network", [])])
def test_compiling_without_a_compiler_is_refused_before_training(tmp_path, tiny, key, extra):
    run_dir = tmp_path / "r"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, *extra, f"{key}=true"], env={"CXX": "no-such-c++"})
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [
        f"mpidqn: error: {key}: torch.compile needs a C++ compiler and 'no-such-c++' was not found "
        f"(install one, point $CXX at it, or set {key}=false)"]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def _cli(args: list[str], **kw):
    return run([sys.executable, "-m", "mpidqn", *args], **kw)


def test_help_lists_the_commands_and_version_prints_once():
    p = _cli(["--help"])
    assert p.returncode == 0
    for command in ("train", "sweep", "evaluate", "report", "inspect", "config", "--version", "--best", "--online"):
        assert command in p.stdout
    from mpidqn import __version__

    v = _cli(["--version"])
    assert (v.returncode, v.stdout.strip()) == (0, f"mpidqn {__version__}")


def test_mistyped_command_is_named_with_a_suggestion(tmp_path):
    p = _cli(["evalute", str(tmp_path)])
    assert p.returncode == 2
    assert p.stderr.strip() == "mpidqn: error: unknown command 'evalute' (did you mean evaluate?)"
    p = mpidqn(2, ["frobnicate"])
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [  # once, not once per rank
        "mpidqn: error: unknown command 'frobnicate' (commands: train, sweep, evaluate, report, inspect, config; "
        "overrides are KEY=VALUE)"]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntrain:\n  lr: [1\n  total_steps: 2\n")
    p = _cli(["--config", str(bad), "--run-dir", str(tmp_path / "r")])
    assert p.returncode == 2
    assert p.stderr.startswith(f"mpidqn: error: --config {bad}:4:14: not valid YAML (")
    assert not (tmp_path / "r").exists()


SHADOWING_FINDER = '''
import sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location
from pathlib import Path
PKG = Path({pkg!r})
class Finder:  # what setuptools' editable install adds: a hook consulted after the path search
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "mpidqn":
            return spec_from_file_location(fullname, PKG / "__init__.py", submodule_search_locations=[str(PKG)])
        if fullname.rpartition(".")[0] == "mpidqn":
            return PathFinder.find_spec(fullname, path=[str(PKG)])
sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, Finder)
'''


def test_a_checkout_folder_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    # the parent of a checkout after the quick start: ./mpidqn/runs/ hid the module mpidqn.train.rundir
    (tmp_path / "mpidqn" / "runs" / "CartPole-v1-s0").mkdir(parents=True)
    hook = tmp_path / "hook"
    hook.mkdir()
    from conftest import ROOT

    (hook / "sitecustomize.py").write_text(SHADOWING_FINDER.format(pkg=str(ROOT / "mpidqn")))
    env = {"PYTHONPATH": str(hook)}
    p = run([sys.executable, "-m", "mpidqn", "--run-dir", str(tmp_path / "r"), "train.total_steps=200",
             "train.learning_starts=100", "log.progress=none"], env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert _cli(["--version"], env=env, cwd=tmp_path).returncode == 0


def _read_pty(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every process holding the terminal side has exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_under_mpiexec_on_a_terminal(tmp_path, tiny):
    # mpiexec's stdout is a terminal; the ranks' stdout is a pipe to mpiexec: the bar still shows
    import subprocess

    from conftest import _env

    master, slave = os.openpty()
    # tqdm draws at most every 0.1 s, and this run can end in less: draw on every update instead
    # (tqdm reads TQDM_* variables as its defaults), so what is checked does not hang on the machine's speed
    p = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, "-m", "mpidqn", "--run-dir", str(tmp_path / "r"),
                          *tiny, "log.progress=auto", "log.interval_steps=5000"],
                         stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=subprocess.PIPE, env={**_env(), "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"})
    os.close(slave)
    out = _read_pty(master)
    assert p.wait(timeout=180) == 0, p.stderr.read()
    assert "1200/1200" in out and "step/s" in out and "\r" in out, out
    assert "env-steps/s |" not in out  # no plain progress lines next to the bar
    # issue #34: the bar moves between log intervals (here there is none before the end)
    counts = {int(n) for n in re.findall(r"\b(\d+)/1200\b", out)}
    assert any(0 < n < 1200 for n in counts), out
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r2"), *tiny, "log.progress=auto"])  # stdout a pipe: lines
    assert p.returncode == 0 and "env-steps/s |" in p.stdout and "step/s]" not in p.stdout


def test_overrides_on_both_sides_of_an_option(tmp_path):
    # issue #34: `train KEY=VALUE --run-dir X KEY=VALUE` used to say "unrecognized arguments"
    run_dir = tmp_path / "r"
    p = mpidqn(1, ["train", "train.total_steps=300", "--run-dir", str(run_dir), "seed=3", "train.learning_starts=100",
                   "log.progress=none"], timeout=120)
    assert p.returncode == 0, p.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["seed"], saved["train"]["total_steps"]) == (3, 300)


@pytest.mark.parametrize("args, expected", [
    (["train.lr", "1e-3"], "mpidqn: error: 'train.lr' is not a command: config overrides are KEY=VALUE, "
                           "e.g. train.lr=1e-3"),
    (["seed"], "mpidqn: error: 'seed' is not a command: config overrides are KEY=VALUE, e.g. seed=VALUE"),
    (["train.lrr=1e-3"], "mpidqn: error: train.lrr: unknown config key (did you mean train.lr?)"),
    (["lr=1e-3"], "mpidqn: error: lr: unknown config key (did you mean train.lr?)"),
    (["evaluate", "RUN", "--episodes", "0"], "mpidqn evaluate: error: --episodes must be >= 1, got 0"),
    (["inspect", "RUN", "--bogus"], "mpidqn inspect: error: unrecognized arguments: --bogus"),
])
def test_command_line_mistakes_get_one_line_with_the_fix(tmp_path, args, expected):
    run_dir = tmp_path / "r"
    if args[0] in ("evaluate", "inspect"):
        args = [str(tmp_path) if a == "RUN" else a for a in args]
    else:
        args = [*args, "--run-dir", str(run_dir)]
    p = _cli(args)
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [expected]
    assert not run_dir.exists()
