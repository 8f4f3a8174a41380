"""The Python API for notebooks and scripts: ``mpidqn.train``, ``mpidqn.load_policy``, ``mpidqn.load_run``.

Importing this module (or ``mpidqn``) imports neither torch nor MPI; each function imports what it
needs when called. See docs/python-api.md.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    from mpidqn.analysis.runs import Run
    from mpidqn.config import Config
    from mpidqn.train.policy import Policy


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns: the run directory and the exit code the command line would give
    (0 finished; 75 stopped on a signal after a checkpoint; see mpidqn.errors for the others)."""

    run_dir: Path
    exit_code: int

    @property
    def finished(self) -> bool:
        return self.exit_code == 0


def flat_overrides(overrides: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of overrides given as dotted keys, nested dicts, or both:
    ``{"train.lr": 1e-3}`` and ``{"train": {"lr": 1e-3}}`` both give ``("train.lr", 0.001)``."""
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            yield from flat_overrides(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _base_data(config_or_path: Any, saved: Path | None) -> dict[str, Any]:
    """Nested config data to apply overrides to: a Config, a dict, a YAML file, or (None) the saved
    config of an existing run dir, else the embedded defaults."""
    from mpidqn.config import Config, load_config, to_dict

    if isinstance(config_or_path, Config):
        return to_dict(config_or_path)
    if isinstance(config_or_path, Mapping):
        return copy.deepcopy(dict(config_or_path))
    if isinstance(config_or_path, (str, os.PathLike)):
        return to_dict(load_config(config_or_path))
    if config_or_path is None:
        return to_dict(load_config(saved)) if saved is not None else {}
    raise TypeError(f"config_or_path: a YAML path, a dict or a mpidqn.config.Config, got {type(config_or_path).__name__}")


def build_config(config_or_path: Any, run_dir: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """The validated config :func:`train` would run (ConfigError, a UserError, naming a bad key).

    With ``config_or_path`` None and a ``run_dir`` that holds a run, that run's saved config is the
    base and the overrides may only change what a resume may change (as ``train --run-dir``)."""
    from mpidqn.config import config_from_dict, load_config, set_dotted
    from mpidqn.train.rundir import check_resume_overrides

    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    saved = saved if saved is not None and saved.is_file() else None
    data = _base_data(config_or_path, saved)
    for key, value in flat_overrides(overrides):
        set_dotted(data, key, value)
    cfg = config_from_dict(data)
    if config_or_path is None and saved is not None:
        check_resume_overrides(load_config(saved), cfg, str(run_dir))
    return cfg


def train(config_or_path: Any = None, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          fresh_start: bool = False, comm: Any = None, **overrides: Any) -> TrainResult:
    """Train in this process, alone or as one rank of an MPI job, as ``python -m mpidqn train`` does.

    ``config_or_path``: a YAML file, a dict of sections, a :class:`mpidqn.config.Config`, or None
    (the embedded CartPole-v1 config; or, when ``run_dir`` holds a run, that run's config, which then
    continues). ``overrides`` are config keys, dotted (``**{"train.lr": 1e-3}``), top-level
    (``seed=3``) or as sections (``train={"lr": 1e-3}``). ``run_dir`` defaults to
    ``runs/<env>-s<seed>-<time>``; one that holds a checkpoint resumes (``resume=True`` requires one,
    ``fresh_start=True`` starts again from step 0 and keeps the old files renamed). ``comm``: the
    communicator to train on (default ``MPI.COMM_WORLD``; under ``mpiexec -n N python script.py``
    every rank calls ``train`` with the same arguments).

    Bad input raises ``mpidqn.errors.UserError`` (on every rank, before anything is written). Under
    MPI any other error on one rank ends the whole job, as with the command line. Signals are left
    alone: Ctrl-C raises KeyboardInterrupt (the command line's checkpoint-on-signal is for batch jobs).

    >>> import mpidqn
    >>> result = mpidqn.train("configs/cartpole.yaml", run_dir="runs/nb", seed=1,
    ...                       **{"train.total_steps": 20_000, "log.progress": "none"})  # doctest: +SKIP
    >>> result.finished, result.run_dir  # doctest: +SKIP
    (True, PosixPath('runs/nb'))
    """
    from mpi4py import MPI

    from mpidqn.cli.main import _abort, collective, run_training
    from mpidqn.errors import UserError
    from mpidqn.train.rundir import default_run_dir

    comm = MPI.COMM_WORLD if comm is None else comm
    cfg = collective(comm, lambda: build_config(config_or_path, run_dir, **overrides))
    root = comm.Get_rank() == 0
    agreed = comm.bcast(str(run_dir if run_dir is not None else default_run_dir(cfg)) if root else None, root=0)
    try:
        code = run_training(cfg, comm, agreed, resume, fresh_start)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - under MPI a failure on one rank must end every rank
        if comm.Get_size() > 1:
            _abort(comm, e)
        raise
    return TrainResult(Path(agreed), code)


def load_policy(run_dir: str | os.PathLike, best: bool = True, online: bool = False) -> Policy:
    """The greedy policy of a run: ``policy.predict(obs)`` gives actions (numpy in and out).

    ``best``: the checkpoint of the run's best evaluation where the run recorded one, else the
    newest (``policy.step`` and ``policy.checkpoint`` say which); ``best=False``: the newest.
    ``run_dir`` may also be a checkpoint directory. ``online``: the online parameters instead of
    their moving average (runs with ``train.ema_decay``). Needs no MPI.

    >>> import mpidqn
    >>> policy = mpidqn.load_policy("runs/nb")  # doctest: +SKIP
    >>> env = policy.make_env()  # doctest: +SKIP
    >>> obs, _ = env.reset(seed=0)  # doctest: +SKIP
    >>> action = policy.predict(obs)           # one observation -> an int64 scalar  # doctest: +SKIP
    >>> actions = policy.predict(obs[None])    # a batch (N, ...) -> an (N,) array   # doctest: +SKIP
    """
    from mpidqn.train.checkpoints import read_best, resolve
    from mpidqn.train.policy import Policy

    path = Path(run_dir)
    use_best = best and read_best(path / "checkpoints") is not None
    return Policy.from_checkpoint(resolve(path, best=use_best), online=online)


def load_run(run_dir: str | os.PathLike) -> Run:
    """A run's ``log.h5`` as pandas DataFrames (needs the ``report`` extra), also while it is written.

    >>> import mpidqn
    >>> run = mpidqn.load_run("runs/nb")  # doctest: +SKIP
    >>> run.evaluations[["step", "mean"]].tail()  # doctest: +SKIP
    """
    from mpidqn.analysis.runs import load_run as _load_run

    return _load_run(run_dir)
