"""Run directories: create or resume, refuse foreign ones, wire the trainer to its side effects.

``RUN_DIR/config.yaml`` is the resolved config of the run. Pointing a different config at an
existing run dir is refused (exit 2) unless only keys that may change on resume differ
(:data:`RESUMABLE_KEYS`): run length, checkpoint/eval/log cadence, threads and the parallel layout.
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from mpidqn import __version__
from mpidqn.checkpoint import FORMAT_VERSION, CheckpointManager, find_latest, verify, write_text_atomic
from mpidqn.config import Config, config_from_yaml_text, to_dict, to_yaml
from mpidqn.console import ConsoleReporter, SilentReporter
from mpidqn.h5tree import flatten
from mpidqn.hosts import rank_hosts
from mpidqn.logs import check_log_version
from mpidqn.errors import EXIT_OK, EXIT_REQUEUE, AgreedFailure, UserError

RESUMABLE_PREFIXES = ("train.total_steps", "train.nonfinite", "checkpoint.", "eval.", "log.", "parallel.")


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return flatten(d, sep=".")


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ and may NOT change when a run is resumed."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return [k for k in a if a[k] != b.get(k) and not k.startswith(RESUMABLE_PREFIXES)]


def default_run_dir(cfg: Config) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.env.id).strip("-")
    return Path("runs") / f"{name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def versions() -> dict[str, str]:
    import gymnasium
    import h5py
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    return {
        "mpidqn": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "gymnasium": gymnasium.__version__, "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version, "mpi4py": mpi4py.__version__,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
    }


def check_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Rank 0's checks of the run dir; raises UserError with one line."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a directory")
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists():
        try:
            old = config_from_yaml_text(cfg_file.read_text())
        except (UserError, yaml.YAMLError) as e:
            raise UserError(f"--run-dir {run_dir}: its config.yaml is not a valid mpidqn config ({e})") from None
        diff = config_differences(old, cfg)
        if diff:
            a, b = _flat(to_dict(old)), _flat(to_dict(cfg))
            k = diff[0]
            raise UserError(
                f"--run-dir {run_dir} belongs to another run: {k} is {a[k]!r} there and {b[k]!r} here "
                f"({len(diff)} key(s) differ); use a new --run-dir"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--run-dir {run_dir}: not empty and holds no config.yaml (not an mpidqn run directory)")
    try:
        check_log_version(run_dir / "log.h5")
    except ValueError as e:
        raise UserError(f"--run-dir {run_dir}: {e}") from None
    if resume and find_latest(run_dir / "checkpoints") is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--run-dir {run_dir}: not writable ({e.strerror})") from None


def run_metadata(cfg: Config, topo: Any) -> dict[str, Any]:
    hosts = rank_hosts(topo.comm)
    meta: dict[str, Any] = {
        "config": to_yaml(cfg), **topo.describe(),
        "hosts": sorted(set(hosts)), "rank_hosts": hosts, "versions": versions(), "start_time": time.time(),
        "argv": " ".join(sys.argv),
    }
    meta["slurm"] = {k: v for k, v in os.environ.items() if k.startswith("SLURM_") and k in {
        "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "SLURM_NNODES",
        "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SLURM_CPUS_PER_TASK", "SLURM_JOB_PARTITION"}}
    return meta


@dataclass
class Run:
    """A prepared run on this rank: trainer plus its reporter and checkpoint manager."""

    trainer: Any
    reporter: Any
    run_dir: Path

    def train(self) -> int:
        try:
            outcome = self.trainer.run()
            if outcome == "signal":
                step = self.trainer.counters.env_steps
                self.reporter.event(step, "signal", f"mpidqn: stopped on a signal at step {step:,} after "
                                    f"checkpointing; exit {EXIT_REQUEUE} = resubmit me (resumes from {self.run_dir})")
        except AgreedFailure as e:  # raised on every rank together: stop cleanly, no abort, no checkpoint
            return self._failed(e)
        finally:
            self.reporter.close()
        return EXIT_REQUEUE if outcome == "signal" else EXIT_OK

    def _failed(self, e: AgreedFailure) -> int:
        step = self.trainer.counters.env_steps
        ckpt = find_latest(self.run_dir / "checkpoints") if self.trainer.topo.is_root else None
        kept = f"newest complete checkpoint: {ckpt.path}" if ckpt else "no complete checkpoint"
        self.reporter.event(step, e.kind, f"mpidqn: error: stopped at step {step:,}: {e}; {kept}; exit {e.exit_code}")
        return e.exit_code


def prepare_run(cfg: Config, topo: Any, run_dir_arg: str | None, resume: bool,
                collective: Callable[[Any, Callable[[], Any]], Any]) -> Run:
    """Agree on the run dir, check it, build the trainer, resume if a checkpoint exists."""
    from mpidqn.trainer import Trainer

    comm, root = topo.comm, topo.is_root
    run_dir = Path(comm.bcast(run_dir_arg or str(default_run_dir(cfg)) if root else None, root=0))
    collective(comm, lambda: check_run_dir(run_dir, cfg, resume) if root else None)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if root else (lambda s: None)
    ckpt_path = comm.bcast(_latest_path(run_dir, say) if root else None, root=0)
    # rank 0 verified the checksums; the others only read the manifest
    ckpt = verify(Path(ckpt_path), check_crc=False) if ckpt_path is not None else None
    if ckpt is not None:  # before anything in the run dir is written or rebuilt
        collective(comm, lambda: check_compatible(ckpt, cfg) if root else None)
    meta = run_metadata(cfg, topo)
    if root:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    reporter = SilentReporter()
    if root:
        from mpidqn.logs import RunLog
        from mpidqn.trainer import SCALAR_NAMES, TIMING_NAMES

        runlog = RunLog(run_dir / "log.h5", meta, resume_step=_checkpoint_step(ckpt_path),
                        scalar_names=SCALAR_NAMES, timing_names=TIMING_NAMES)
        reporter = ConsoleReporter(cfg.log.progress, runlog=runlog)
    manager = CheckpointManager(
        run_dir, comm, cfg.checkpoint.keep,
        attrs={"format_version": FORMAT_VERSION, "config": meta["config"], "world_size": topo.world,
               "pipeline_stages": topo.pipeline_stages, "mpidqn_version": __version__,
               "versions": json.dumps(meta["versions"])},
        say=reporter.message,
    )
    trainer = collective(comm, lambda: Trainer(cfg, topo, reporter, manager))
    if ckpt is not None:
        mode = trainer.load_checkpoint(ckpt)
        manager.last_step = ckpt.step
        reporter.message(f"mpidqn: resumed ({mode}) from {ckpt.path} at step {ckpt.step:,} "
                         f"(written by {ckpt.world} rank(s), now {topo.world})")
    if root:
        reporter.message(f"mpidqn: run directory {run_dir}")
    return Run(trainer=trainer, reporter=reporter, run_dir=run_dir)


def _checkpoint_step(path: str | None) -> int | None:
    return int(Path(path).name.split("_")[1]) if path else None


def _latest_path(run_dir: Path, say: Callable[[str], None]) -> str | None:
    ckpt = find_latest(run_dir / "checkpoints", warn=say)
    return str(ckpt.path) if ckpt else None


def check_compatible(ckpt: Any, cfg: Config) -> None:
    """A checkpoint resumes only into the same environment, network (every ``network.*`` key) and
    optimizer (Adam moments are no RMSprop averages)."""
    a, b = _flat(to_dict(ckpt.config())), _flat(to_dict(cfg))
    for key in ["env.id", *(k for k in a if k.startswith("network.")), "train.optimizer"]:
        if a[key] != b[key]:
            raise UserError(f"checkpoint {ckpt.path} is incompatible: {key} is {a[key]!r} there and {b[key]!r} here")
