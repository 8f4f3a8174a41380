"""Run directories: create or resume, refuse foreign ones, wire the trainer to its side effects.

``RUN_DIR/config.yaml`` is the resolved config of the run. Pointing a different config at an
existing run dir is refused (exit 2) unless only keys that may change on resume differ
(:data:`RESUMABLE_PREFIXES`): run length, checkpoint/eval/log cadence, threads, the parallel layout
and the learner's device (a run from a GPU node continues on a CPU node).

Nothing in a run dir is lost: one job at a time holds it (:mod:`mpidqn.io.runlock`); checkpoints that
fail verification are refused (exit 2) or, when an older one resumes, renamed ``step_*.corrupt-<time>``
(never pruned); ``--fresh-start`` renames ``checkpoints/`` and ``log.h5`` ``*.old-<time>``; every
such move is printed and recorded as an event in the log.
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
from mpidqn.config import Config, config_from_yaml_text, to_dict, to_yaml
from mpidqn.distributed.hosts import (crowded_hosts, cpu_shares, host_cores, rank_hosts, resolve_threads,
                                      usable_cpus)
from mpidqn.errors import EXIT_OK, EXIT_REQUEUE, AgreedFailure, UserError
from mpidqn.io.h5tree import flatten
from mpidqn.io.runlock import RunLock
from mpidqn.io.runlog import check_log_version
from mpidqn.io.trust import Trust, load_trust
from mpidqn.train import stop as signals
from mpidqn.train.checkpoints import (
    FORMAT_VERSION,
    MARKER,
    CheckpointManager,
    find_latest,
    list_step_dirs,
    verify,
    write_text_atomic,
)
from mpidqn.train.reporting import ConsoleReporter, SilentReporter

RESUMABLE_PREFIXES = ("train.total_steps", "train.nonfinite", "train.device", "train.mlp_kernel",
                      "train.compile_network", "checkpoint.", "eval.", "log.", "parallel.")
RESUMABLE_HELP = ", ".join(p + "*" if p.endswith(".") else p for p in RESUMABLE_PREFIXES)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return flatten(d, sep=".")


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ and may NOT change when a run is resumed."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return [k for k in a if a[k] != b.get(k) and not k.startswith(RESUMABLE_PREFIXES)]


def check_resume_overrides(saved: Config, new: Config, run_dir: str) -> None:
    """Overrides of a continued run (its saved config) may only change keys that can change on resume."""
    diff = config_differences(saved, new)
    if diff:
        a, b = _flat(to_dict(saved)), _flat(to_dict(new))
        k = diff[0]
        raise UserError(f"{k} cannot change when the run in {run_dir} continues ({a[k]!r} there, {b[k]!r} here; "
                        f"keys that can: {RESUMABLE_HELP}); use a new --run-dir for a run with other settings")


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
        "mpi": MPI.Get_library_version().replace("\0", "").splitlines()[0].strip(),  # Open MPI ends it in a NUL
    }


def check_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Rank 0's checks of the run dir; raises UserError with one line."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a directory")
    if resume and not (run_dir / "checkpoints").is_dir():  # before the lock creates anything (issue #34)
        what = "does not exist" if not run_dir.exists() else "holds no checkpoints/ directory"
        raise UserError(f"--resume: --run-dir {run_dir} {what}, so there is no run to continue "
                        "(leave out --resume to start one there)")
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
                f"({len(diff)} key(s) differ; on resume only {RESUMABLE_HELP} may change); continue it with "
                f"`train --run-dir {run_dir}` and no --config (its saved config), or use a new --run-dir"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--run-dir {run_dir}: not empty and holds no config.yaml (not an mpidqn run directory)")
    try:
        check_log_version(run_dir / "log.h5")
    except ValueError as e:
        raise UserError(f"--run-dir {run_dir}: {e}") from None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--run-dir {run_dir}: not writable ({e.strerror})") from None


def run_metadata(cfg: Config, topo: Any, cpu_share: int | None = None) -> dict[str, Any]:
    """The run's attributes for its log (collective), ``rank_threads`` included: every rank's compute
    threads, ``parallel.torch_threads`` resolved with ``cpu_share`` (see :func:`prepare_run`) or else each
    rank's share among the ranks of ``topo.comm``, from the hosts and affinities gathered here once."""
    hosts = rank_hosts(topo.comm)
    cpus = topo.comm.allgather(usable_cpus())
    share = cpu_share if cpu_share is not None else cpu_shares(hosts, cpus)[topo.rank]
    meta: dict[str, Any] = {
        "config": to_yaml(cfg), **topo.describe(),
        "hosts": sorted(set(hosts)), "rank_hosts": hosts, "host_cores": host_cores(topo.comm, hosts, cpus),
        "rank_threads": topo.comm.allgather(resolve_threads(cfg.parallel.torch_threads, topo.comm, share)),
        "versions": versions(), "start_time": time.time(),
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

    lock: RunLock | None = None

    def train(self) -> int:
        try:
            try:
                outcome = self.trainer.run()
                code = EXIT_REQUEUE if outcome == "signal" else EXIT_OK
                if outcome == "target":
                    step, result = self.trainer.counters.env_steps, self.trainer.last_eval
                    self.reporter.event(step, "target", f"mpidqn: evaluation mean {result['mean']:.1f} >= "
                                        f"eval.stop_at={self.trainer.cfg.eval.stop_at:g} at step {step:,}: "
                                        f"run ended early (checkpointed; exit {EXIT_OK})")
                elif outcome == "signal":
                    step = self.trainer.counters.env_steps
                    self.reporter.event(step, "signal", f"mpidqn: stopped on {signals.name(signals.received())} "
                                        f"at step {step:,} after checkpointing; exit {EXIT_REQUEUE} = resubmit me "
                                        f"(`train --run-dir {self.run_dir}` continues it)")
            except AgreedFailure as e:  # raised on every rank together: stop cleanly, no abort, no checkpoint
                code = self._failed(e)
        finally:
            self.reporter.close()
            if self.lock is not None:
                self.lock.release()
        # Leave together, once rank 0 has closed the log: a launcher that ends the whole job when one
        # rank exits non-zero (srun --kill-on-bad-exit) then cannot cut rank 0 short.
        self.trainer.topo.comm.Barrier()
        return code

    def _failed(self, e: AgreedFailure) -> int:
        step = self.trainer.counters.env_steps
        ckpt = find_latest(self.run_dir / "checkpoints") if self.trainer.topo.is_root else None
        kept = f"newest complete checkpoint: {ckpt.path}" if ckpt else "no complete checkpoint"
        self.reporter.event(step, e.kind, f"mpidqn: error: stopped at step {step:,}: {e}; {kept}; exit {e.exit_code}")
        return e.exit_code


def prepare_run(cfg: Config, topo: Any, run_dir_arg: str | None, resume: bool,
                collective: Callable[[Any, Callable[[], Any]], Any], fresh_start: bool = False,
                trust_run_dir: bool = False, cpu_share: int | None = None) -> Run:
    """Agree on the run dir, lock and check it, build the trainer, resume if a checkpoint exists.
    ``trust_run_dir``: load the env state of its checkpoints even when this user did not sign it.
    ``cpu_share``: this rank's share of its host's CPUs among every process of the job
    (:func:`mpidqn.distributed.hosts.cpu_share`; default: among the ranks of ``topo.comm``), which
    ``parallel.torch_threads: auto`` gives each rank."""
    from mpidqn.train.loop import Trainer

    comm, root = topo.comm, topo.is_root
    run_dir = Path(comm.bcast(run_dir_arg or str(default_run_dir(cfg)) if root else None, root=0))
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if root else (lambda s: None)
    lock = RunLock(run_dir) if root else None

    def claim() -> None:
        check_run_dir(run_dir, cfg, resume)
        lock.acquire(warn=say)  # type: ignore[union-attr]  # held until Run.train returns or the process ends

    collective(comm, lambda: claim() if root else None)
    notes: list[tuple[str, str]] = []  # (event kind, line): recorded once the log is open
    ckpt_path = collective(comm, lambda: choose_checkpoint(run_dir, resume, fresh_start, notes) if root else None)
    ckpt_path = comm.bcast(ckpt_path, root=0)
    # rank 0 verified the checksums; the others only read the manifest
    ckpt = verify(Path(ckpt_path), check_crc=False) if ckpt_path is not None else None
    if ckpt is not None:  # before anything in the run dir is written or rebuilt
        collective(comm, lambda: check_compatible(ckpt, cfg) if root else None)
    meta = run_metadata(cfg, topo, cpu_share)
    threads = meta["rank_threads"][topo.rank]
    notes += [("threads", line) for line in crowded_hosts(meta["rank_hosts"], meta["host_cores"], meta["rank_threads"])]
    if root:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    reporter = SilentReporter()
    if root:
        from mpidqn.io.runlog import SCALAR_NAMES, RunLog
        from mpidqn.io.tensorboard import open_mirror
        from mpidqn.train.loop import TIMING_NAMES

        resume_step = _checkpoint_step(ckpt_path)
        runlog = RunLog(run_dir / "log.h5", meta, resume_step=resume_step, scalar_names=SCALAR_NAMES,
                        timing_names=TIMING_NAMES, mirror=open_mirror(cfg.log.tensorboard, run_dir, resume_step))
        reporter = ConsoleReporter(cfg.log.progress, runlog=runlog)
        step = ckpt.step if ckpt is not None else 0
        for aside, why in runlog.moved_aside:
            reason = "it could not be read" if why == "corrupt" else "a run from step 0 starts a new log"
            notes.append(("log_moved", f"mpidqn: {run_dir / 'log.h5'} moved aside to {aside.name} ({reason})"))
        for kind, text in notes:
            reporter.event(step, kind, text)
    manager = CheckpointManager(
        run_dir, comm, cfg.checkpoint.keep,
        attrs={"format_version": FORMAT_VERSION, "config": meta["config"], "world_size": topo.world,
               "pipeline_stages": topo.pipeline_stages, "mpidqn_version": __version__,
               "versions": json.dumps(meta["versions"])},
        say=reporter.message,
    )
    # rank 0's secret for every rank: one key signs the whole checkpoint, and all ranks verify alike
    trust: Trust = comm.bcast(load_trust(trust_run_dir) if root else None, root=0)
    if trust.key is None:
        reporter.message(f"mpidqn: warning: checkpoints will not be signed, {trust.problem}; "
                         "a resume will start new episodes (everything else resumes exactly)")
    trainer = collective(comm, lambda: Trainer(cfg, topo, reporter, manager, trust, threads))
    if ckpt is not None:
        mode = trainer.load_checkpoint(ckpt)
        manager.last_step = ckpt.step
        reporter.message(f"mpidqn: resumed ({mode}) from {ckpt.path} at step {ckpt.step:,} "
                         f"(written by {ckpt.world} rank(s), now {topo.world})")
    if root:
        reporter.message(f"mpidqn: run directory {run_dir}")
    return Run(trainer=trainer, reporter=reporter, run_dir=run_dir, lock=lock)


def _aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<path>.<why>-<unix time>`` (never over an earlier one) and return the new path."""
    stamp = int(time.time())
    while (new := path.with_name(f"{path.name}.{why}-{stamp}")).exists():
        stamp += 1
    os.replace(path, new)
    return new


def choose_checkpoint(run_dir: Path, resume: bool, fresh_start: bool, notes: list[tuple[str, str]]) -> str | None:
    """Rank 0 (holding the lock): the checkpoint to resume from, or None to start at step 0.

    Checkpoints that fail verification are evidence: when none verifies the run is refused (unless
    ``fresh_start``); when an older one resumes, each newer damaged one is renamed out of the way of
    the checkpoints to come, so neither a new checkpoint of the same step nor pruning touches it.
    """
    root = run_dir / "checkpoints"
    if fresh_start:
        if root.is_dir() and any(root.iterdir()):
            aside = _aside(root, "old")
            notes.append(("checkpoints_moved", f"mpidqn: --fresh-start: {root} moved aside to {aside.name}"))
        return None
    defects: list[tuple[Path, str]] = []
    ckpt = None
    for _, path in list_step_dirs(root):
        if not (path / MARKER).exists():
            continue  # an incomplete directory is the normal leftover of a kill, no checkpoint
        try:
            ckpt = verify(path)
            break
        except ValueError as e:
            defects.append((path, str(e)))
    if ckpt is None and defects:
        listed = "; ".join(f"{p.name}: {e}" for p, e in defects)
        raise UserError(f"--run-dir {run_dir}: no checkpoint verifies ({listed}); nothing was changed. "
                        f"--fresh-start starts again from step 0 and keeps them (renamed {root.name}.old-<time>)")
    if ckpt is None and resume:
        raise UserError(f"--resume: no complete checkpoint in {root}")
    for path, problem in defects:
        aside = _aside(path, "corrupt")
        notes.append(("checkpoint_corrupt", f"mpidqn: checkpoint {path} is unusable: {problem}; kept as {aside.name}, "
                                            f"resuming from the older {ckpt.path.name}"))  # type: ignore[union-attr]
    return str(ckpt.path) if ckpt is not None else None


def _checkpoint_step(path: str | None) -> int | None:
    return int(Path(path).name.split("_")[1]) if path else None


def check_compatible(ckpt: Any, cfg: Config) -> None:
    """A checkpoint resumes only into the same environment, network (every ``network.*`` key) and
    optimizer (Adam moments are no RMSprop averages)."""
    a, b = _flat(to_dict(ckpt.config())), _flat(to_dict(cfg))
    for key in ["env.id", *(k for k in a if k.startswith("network.")), "train.optimizer"]:
        if a[key] != b[key]:
            raise UserError(f"checkpoint {ckpt.path} is incompatible: {key} is {a[key]!r} there and {b[key]!r} here")
