"""Command line: ``python -m mpidqn [train|sweep|evaluate|report|inspect] ...``.

The only module that reads ``MPI.COMM_WORLD``. Errors follow one rule: bad input (UserError) is
agreed on by all ranks and printed once by rank 0 (exit 2); any other exception on any rank prints
that rank's traceback once and aborts the whole MPI job, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence, TypeVar

from mpidqn import errors
from mpidqn.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REQUEUE, UserError

T = TypeVar("T")
COMMANDS = ("train", "sweep", "evaluate", "report", "inspect", "config")
USAGE = """usage: python -m mpidqn [train] [--config FILE] [--run-dir DIR] [--resume | --fresh-start] [--trust-run-dir]
                       [KEY=VALUE ...]
       python -m mpidqn sweep --out DIR [--config FILE] [--seeds A-B] [--grid KEY=V1,V2 ...] [--ranks-per-run R] [KEY=VALUE ...]
       python -m mpidqn evaluate RUN_DIR_OR_CHECKPOINT [--episodes N] [--seed S] [--best] [--online]
                       [--video DIR] [--json]
                       [--trust-run-dir]
       python -m mpidqn report RUN_DIR|SWEEP_DIR [...] [--out DIR] [--target RETURN]
       python -m mpidqn report --tensorboard RUN_DIR [RUN_DIR ...] [--out DIR]
       python -m mpidqn inspect RUN_DIR_OR_CHECKPOINT [--json]
       python -m mpidqn config [--list [--format text]] [--config FILE] [KEY=VALUE ...]
       python -m mpidqn --version

MPI-based batch trainer for Deep Q-Learning; launch training with mpiexec -n N python -m mpidqn ...

commands:
  train      train (the default command); resumes when --run-dir holds a checkpoint
  sweep      many runs (grid x seeds) in one MPI job, groups of ranks taking runs in turn; resumable
  evaluate   greedy evaluation of a run's newest checkpoint (--best: of its best evaluation;
             --online: the online parameters, not their moving average; --video DIR: MP4 of each episode)
  report     summary tables (CSV) and plots (PNG) of one or more runs or a sweep (--tensorboard: TensorBoard events)
  inspect    describe a run's newest checkpoint
  config     print the resolved config; --list: every config key with its type, default and meaning

`python -m mpidqn COMMAND --help` shows the options of a command."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage on every rank and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)  # the caller prefixes the command's name once


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpidqn train", description="Train DQN with MPI (mpiexec -n N python -m mpidqn ...).")
    p.add_argument("--config", help="YAML config (default: the config.yaml of an existing --run-dir, else the "
                                    "embedded CartPole-v1 config)")
    p.add_argument("--run-dir", help="run directory (default: runs/<env>-s<seed>-<time>); resumes if it holds a checkpoint")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --run-dir to resume from")
    p.add_argument("--fresh-start", action="store_true",
                   help="start again from step 0 in an existing --run-dir (e.g. when no checkpoint there verifies); "
                        "its checkpoints and log are kept, renamed *.old-<time>")
    p.add_argument("--trust-run-dir", action="store_true",
                   help="load the environment state of --run-dir's checkpoints even if you did not write them "
                        "(unpickling runs code; see docs/checkpoints.md, Trust model)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-3")
    return p


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def collective(comm: Any, fn: Callable[[], T]) -> T:
    """Run a setup step on every rank; if it raised UserError anywhere, raise it everywhere."""
    from mpidqn.distributed.collectives import gather_errors

    result, message = None, None
    try:
        result = fn()
    except UserError as e:
        message = str(e)
    failures = gather_errors(message, comm)
    if failures:
        rank, msg = failures[0]
        raise UserError(msg if comm.Get_size() == 1 else f"{msg} (rank {rank})" if rank else msg)
    return result  # type: ignore[return-value]


LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def slurm_tasks_problem(world: int, environ: Mapping[str, str]) -> str | None:
    """Inside Slurm, a world size other than SLURM_NTASKS: srun without a PMI the MPI understands
    starts SLURM_NTASKS copies of "rank 0 of 1", each training alone (Open MPI's silent failure,
    ompi#13523). ``environ``: the environment as the launcher left it, read before MPI starts (a
    singleton MPI may set size variables of its own).

    A world that a process manager deliberately started (mpiexec -n K inside an allocation, whose
    Hydra proxies are themselves started by srun and see SLURM_NTASKS=1) announces its size in
    PMI_SIZE / OMPI_COMM_WORLD_SIZE; then a differing SLURM_NTASKS is no error.
    """
    ntasks = environ.get("SLURM_NTASKS", "")
    launched = {environ.get(v) for v in LAUNCHER_SIZE_VARS} - {None}
    if not ntasks.isdigit() or int(ntasks) == world or str(world) in launched:
        return None
    return (f"SLURM_NTASKS={ntasks} but the MPI world has {world} rank(s), so this is not one {ntasks}-rank job "
            "(srun without a PMI this MPI understands starts every task as a job of its own); launch with "
            "`srun --mpi=pmix` (Open MPI, or any MPI built with PMIx; `srun --mpi=list` shows what Slurm offers) "
            f"or `mpiexec -n {ntasks}` (see slurm/README.md)")


def check_slurm_tasks(world: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise UserError with :func:`slurm_tasks_problem`'s line, if any."""
    problem = slurm_tasks_problem(world, os.environ if environ is None else environ)
    if problem is not None:
        raise UserError(problem)


def train_config(args: argparse.Namespace) -> Any:
    """The run's config: ``--config`` + overrides, or an existing run dir's saved config + overrides
    (so that ``train --resume --run-dir X`` continues a run without retyping its settings)."""
    from mpidqn.config import load_config
    from mpidqn.envs.vector import check_env_module_trusted
    from mpidqn.train.rundir import check_resume_overrides

    if args.resume and args.fresh_start:
        raise UserError("--resume and --fresh-start contradict each other; choose one")
    if args.resume and not args.run_dir:
        raise UserError("--resume needs --run-dir (the run to continue)")
    saved = os.path.join(args.run_dir, "config.yaml") if args.run_dir else None
    if args.config is None and saved is not None and os.path.isfile(saved):
        cfg = load_config(saved, args.overrides)
        check_resume_overrides(load_config(saved), cfg, args.run_dir)
        check_env_module_trusted(cfg.env.id, saved, args.trust_run_dir)
        return cfg
    return load_config(args.config, args.overrides)


def cmd_train(argv: Sequence[str], comm: Any, launch_env: Mapping[str, str] | None = None) -> int:
    """``launch_env``: the environment before MPI started (for the Slurm guard)."""
    # intermixed: overrides may stand on both sides of an option (`seed=3 --run-dir X train.lr=1e-3`)
    args = collective(comm, lambda: _train_parser().parse_intermixed_args(list(argv)))
    cfg = collective(comm, lambda: train_config(args))
    return run_training(cfg, comm, args.run_dir, args.resume, args.fresh_start, args.trust_run_dir, launch_env)


def run_training(cfg: Any, comm: Any, run_dir: str | None, resume: bool = False, fresh_start: bool = False,
                 trust_run_dir: bool = False, launch_env: Mapping[str, str] | None = None) -> int:
    """Check everything about a validated config on every rank of ``comm``, then train; the exit code.

    Shared by the train command and :func:`mpidqn.train`; raises UserError (agreed by all ranks) on
    bad input before anything is written to the run dir. ``launch_env``: the environment before MPI
    started, for the Slurm guard (default: the current one)."""
    from mpidqn.io.tensorboard import check_tensorboard
    from mpidqn.train.rundir import prepare_run

    collective(comm, lambda: check_slurm_tasks(comm.Get_size(), launch_env))
    from mpidqn.distributed.topology import Topology

    def build_topology() -> Topology:
        try:
            return Topology.build(comm, cfg.parallel.pipeline_stages)
        except ValueError as e:
            raise UserError(str(e)) from None

    topo = collective(comm, build_topology)
    from mpidqn.envs.presets import spec_from_config
    from mpidqn.envs.vector import check_env_id
    from mpidqn.learners.optim import check_compile_optimizer
    from mpidqn.train.preflight import check_layout

    # every check of the input before anything is written to the run dir
    collective(comm, lambda: check_env_id(spec_from_config(cfg.env), cfg.env.backend))
    collective(comm, lambda: check_layout(cfg, topo))
    collective(comm, lambda: check_compile_optimizer(cfg.train))
    collective(comm, lambda: check_tensorboard(cfg.log.tensorboard))
    run = prepare_run(cfg, topo, run_dir, resume, collective, fresh_start=fresh_start,
                      trust_run_dir=trust_run_dir)
    return run.train()


def cmd_sweep(argv: Sequence[str], comm: Any, launch_env: Mapping[str, str] | None = None) -> int:
    from mpidqn.cli.sweep import sweep_main

    collective(comm, lambda: check_slurm_tasks(comm.Get_size(), launch_env))
    return sweep_main(argv, comm, _Parser, collective, _abort)


def cmd_evaluate(argv: Sequence[str]) -> int:
    from mpidqn.cli.tools import evaluate_main

    return evaluate_main(list(argv), _Parser)


def cmd_inspect(argv: Sequence[str]) -> int:
    from mpidqn.cli.tools import inspect_main

    return inspect_main(list(argv), _Parser)


def cmd_config(argv: Sequence[str]) -> int:
    from mpidqn.cli.configdoc import config_main

    return config_main(list(argv), _Parser)


def cmd_report(argv: Sequence[str]) -> int:
    from mpidqn.analysis import report_main

    return report_main(list(argv))


def _abort(comm: Any, exc: BaseException) -> int:
    """Print this rank's error once and end every rank of the job."""
    rank = comm.Get_rank()
    tb = "".join(traceback.format_exception(exc))
    _say(f"mpidqn: rank {rank}: {type(exc).__name__}: {exc}\n{tb}".rstrip())
    if comm.Get_size() > 1:
        from mpidqn.distributed.watchdog import abort_job

        abort_job(comm)(errors.EXIT_FAILURE)
    return errors.EXIT_FAILURE


def _launcher_rank() -> int:
    """This process's rank as the launcher announced it (0 when not launched by one), read before
    MPI starts so that top-level messages are printed once, not once per rank."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def unknown_command(word: str, value: str | None = None) -> str | None:
    """The error for a first argument that is neither a command, an option nor KEY=VALUE (``value``:
    the argument after it, shown in the KEY=VALUE the user probably meant)."""
    if word.startswith("-") or "=" in word or word in COMMANDS:
        return None
    from mpidqn.config import iter_fields

    if "." in word or word in {name for name, _ in iter_fields()}:  # `mpidqn train.lr 1e-3`: the = forgotten
        plain = value is not None and "=" not in value and not value.startswith("--")
        example = f"{word}={value if plain else 'VALUE'}"
        return f"'{word}' is not a command: config overrides are KEY=VALUE, e.g. {example}"
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"did you mean {close[0]}?" if close else f"commands: {', '.join(COMMANDS)}; overrides are KEY=VALUE"
    return f"unknown command '{word}' ({hint})"


def _top_level(argv: list[str]) -> int | None:
    """``--help``, ``--version`` and mistyped commands; None when a command should run."""
    first = argv[0] if argv else ""
    if first in ("-h", "--help"):
        if _launcher_rank() == 0:
            print(USAGE)
        return EXIT_OK
    if first == "--version":
        from mpidqn import __version__

        if _launcher_rank() == 0:
            print(f"mpidqn {__version__}")
        return EXIT_OK
    problem = unknown_command(first, argv[1] if len(argv) > 1 else None) if first else None
    if problem is not None:
        if _launcher_rank() == 0:
            _say(f"mpidqn: error: {problem}")
        return EXIT_BAD_INPUT
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    done = _top_level(argv)
    if done is not None:
        return done
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command in ("train", "sweep"):
        from mpidqn.train import stop as signals

        signals.install()
    if command not in ("train", "sweep"):  # offline tools: single process, no MPI collectives
        try:
            return {"evaluate": cmd_evaluate, "inspect": cmd_inspect, "report": cmd_report,
                    "config": cmd_config}[command](argv)
        except UserError as e:
            _say(f"mpidqn {command}: error: {e}")
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            _say(f"mpidqn {command}: interrupted")
            return 130
    launch_env = dict(os.environ)  # before MPI starts: what the launcher announced, not a singleton's own
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        return (cmd_sweep if command == "sweep" else cmd_train)(argv, comm, launch_env)
    except UserError as e:
        if comm.Get_rank() == 0:
            _say(f"mpidqn: error: {e}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        return _abort(comm, e)
    except Exception as e:  # noqa: BLE001 - any failure on any rank must end the whole job
        return _abort(comm, e)


__all__ = ["main", "EXIT_OK", "EXIT_BAD_INPUT", "EXIT_REQUEUE"]
