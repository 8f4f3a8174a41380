"""The real command, tiny step counts, at 1 and 2 ranks; evaluate and inspect on what it leaves."""
from __future__ import annotations

import json
import os
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


def test_slurm_ntasks_guard(monkeypatch):
    from mpidqn.cli.main import LAUNCHER_SIZE_VARS, check_slurm_tasks
    from mpidqn.errors import UserError

    for var in ("SLURM_NTASKS", *LAUNCHER_SIZE_VARS):
        monkeypatch.delenv(var, raising=False)
    check_slurm_tasks(1)  # not under Slurm
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(UserError, match="SLURM_NTASKS=4 but the MPI world has 1 rank"):
        check_slurm_tasks(1)  # srun without PMI: 4 copies of "rank 0 of 1"
    check_slurm_tasks(4)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    check_slurm_tasks(2)  # mpiexec -n 2 inside an allocation: Hydra's proxies see SLURM_NTASKS=1


def test_slurm_ntasks_guard_end_to_end(tmp_path, tiny):
    # a singleton MPI process (what srun without PMI starts) inside a 3-task allocation
    p = run([sys.executable, "-m", "mpidqn", "--run-dir", str(tmp_path / "r"), *tiny], env={"SLURM_NTASKS": "3"})
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [
        "mpidqn: error: SLURM_NTASKS=3 but the MPI world has 1 rank(s): the launcher did not start one MPI job "
        "(use mpiexec, or srun with --mpi=pmi2/pmix for an MPI built with Slurm support; see slurm/README.md)"]


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
    for command in ("train", "evaluate", "report", "inspect", "config", "--version"):
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
        "mpidqn: error: unknown command 'frobnicate' (commands: train, evaluate, report, inspect, config; "
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
    p = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, "-m", "mpidqn", "--run-dir", str(tmp_path / "r"),
                          *tiny, "log.progress=auto"], stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=subprocess.PIPE, env=_env())
    os.close(slave)
    out = _read_pty(master)
    assert p.wait(timeout=180) == 0, p.stderr.read()
    assert "1200/1200" in out and "step/s" in out and "\r" in out, out
    assert "env-steps/s |" not in out  # no plain progress lines next to the bar
    p = mpidqn(2, ["--run-dir", str(tmp_path / "r2"), *tiny, "log.progress=auto"])  # stdout a pipe: lines
    assert p.returncode == 0 and "env-steps/s |" in p.stdout and "step/s]" not in p.stdout
