"""``python -m mpidqn sweep``: parse the grid, validate every run before anything is written, then
hand the world's groups to :mod:`mpidqn.train.sweep`. See docs/sweeps.md."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mpidqn.errors import UserError
from mpidqn.train.sweepplan import RunSpec, expand, parse_grid, parse_seeds

Collective = Callable[[Any, Callable[[], Any]], Any]


def parser(base: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = base(prog="mpidqn sweep", description="Many runs (grid x seeds) in one MPI job: the world is split into "
             "groups of --ranks-per-run ranks; each group trains one run after another (docs/sweeps.md).")
    p.add_argument("--config", help="YAML config of every run (default: the embedded CartPole-v1 config)")
    p.add_argument("--seeds", default="0", help="seeds of each grid point: A-B, A,B,C or a mix (default: 0)")
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                   help="values to sweep; every combination is a config (a KEY=VALUE with one value is the "
                        "same in every run)")
    p.add_argument("--ranks-per-run", type=int, default=1, metavar="R", help="ranks of each run (default: 1)")
    p.add_argument("--out", required=True, help="sweep directory: sweep.yaml and one run directory per run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every run, e.g. train.total_steps=1e5")
    return p


@dataclass
class Plan:
    """The validated sweep, the same on every rank."""

    config: str | None
    overrides: list[str]
    runs: list[RunSpec]
    out: Path
    ranks_per_run: int
    spec: dict[str, Any]
    comparable: dict[str, Any]

    def run_config(self, index: int) -> Any:
        from mpidqn.config import load_config

        return load_config(self.config, [*self.overrides, *self.runs[index].overrides])

    def run_dir(self, index: int) -> Path:
        return self.out / self.runs[index].name


def settings(cfg: Any) -> dict[str, Any]:
    """The keys of a config that may not change when a sweep continues (as YAML-safe values)."""
    from mpidqn.config import to_dict
    from mpidqn.io.h5tree import flatten
    from mpidqn.train.rundir import RESUMABLE_PREFIXES

    flat = flatten(to_dict(cfg), sep=".")
    kept = {k: v for k, v in flat.items() if k != "seed" and not k.startswith(RESUMABLE_PREFIXES)}
    return json.loads(json.dumps(kept, default=str))


def check_run(cfg: Any, ranks_per_run: int) -> None:
    """What ``train`` checks before it writes anything, for a run on ``ranks_per_run`` ranks."""
    from mpidqn.distributed.topology import Layout
    from mpidqn.envs.presets import spec_from_config
    from mpidqn.envs.vector import check_env_id
    from mpidqn.learners.optim import check_compile_optimizer
    from mpidqn.train.preflight import check_layout

    try:
        layout = Layout(ranks_per_run, cfg.parallel.pipeline_stages)
    except ValueError as e:
        raise UserError(f"--ranks-per-run {ranks_per_run}: {e}") from None
    check_env_id(spec_from_config(cfg.env), cfg.env.backend)
    check_layout(cfg, layout)
    check_compile_optimizer(cfg.train)


def check_existing(plan: Plan) -> None:
    """Refuse, reading only, an --out that is no sweep directory or holds another sweep, and run
    directories whose saved config belongs to another run."""
    from mpidqn.config import config_from_yaml_text
    from mpidqn.io import sweeprecord
    from mpidqn.train.rundir import check_resume_overrides

    out = plan.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not sweeprecord.record_path(out).exists():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):  # .lock: a job that died early
            raise UserError(f"--out {out}: not empty and holds no {sweeprecord.RECORD_NAME} (not a sweep directory)")
        return
    try:
        old = sweeprecord.read(out)["spec"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"--out {out}: its {sweeprecord.RECORD_NAME} cannot be read ({e})") from None
    diff = sweeprecord.spec_difference({k: old.get(k) for k in plan.comparable}, plan.comparable)
    if diff is not None:
        raise UserError(f"--out {out} holds another sweep: {diff}; use a new --out for a changed sweep")
    for i in range(len(plan.runs)):
        saved = plan.run_dir(i) / "config.yaml"
        if saved.is_file():
            check_resume_overrides(config_from_yaml_text(saved.read_text()), plan.run_config(i), str(saved.parent))


def make_plan(args: argparse.Namespace, world: int) -> Plan:
    """Parse and validate the whole sweep (rank 0); raises UserError with one line, writes nothing."""
    from mpidqn.config import load_config

    rpr = args.ranks_per_run
    if rpr < 1:
        raise UserError(f"--ranks-per-run must be >= 1, got {rpr}")
    if world % rpr:
        raise UserError(f"--ranks-per-run {rpr} does not divide the world size {world} (mpiexec -n)")
    axes, fixed = parse_grid(args.grid)
    seeds = parse_seeds(args.seeds)
    overrides = [*args.overrides, *fixed]
    base = load_config(args.config, overrides)
    runs = expand(axes, seeds)
    spec = {"config": args.config, "overrides": overrides, "grid": {k: v for k, v in axes}, "seeds": seeds,
            "ranks_per_run": rpr}
    comparable = {"grid": spec["grid"], "seeds": seeds, "settings": settings(base)}
    plan = Plan(args.config, overrides, runs, Path(args.out), rpr, {**spec, "settings": comparable["settings"]},
                comparable)
    checked: set[int] = set()
    for i, run in enumerate(runs):
        try:
            cfg = plan.run_config(i)
            if run.point not in checked:  # the seed changes none of the checks
                check_run(cfg, rpr)
                checked.add(run.point)
        except UserError as e:
            raise UserError(f"run {run.name}: {e}") from None
    check_existing(plan)
    return plan


def claim_out(plan: Plan) -> Any:
    """Rank 0: lock --out for this job and create or continue its record; returns the lock."""
    from mpidqn.io import sweeprecord
    from mpidqn.io.runlock import RunLock

    plan.out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(plan.out)
    lock.acquire(warn=lambda s: print(s, file=sys.stderr, flush=True))
    runs = [{"name": r.name, "overrides": list(r.overrides), "seed": r.seed} for r in plan.runs]
    resumed = sweeprecord.open_sweep(plan.out, plan.spec, runs, plan.comparable)
    if resumed:
        print(f"mpidqn sweep: {len(resumed)} run(s) left running by an earlier job will resume: "
              f"{', '.join(resumed)}", file=sys.stderr, flush=True)
    return lock


def sweep_main(argv: Sequence[str], comm: Any, base_parser: type[argparse.ArgumentParser],
               collective: Collective, abort: Callable[[Any, BaseException], int]) -> int:
    from mpidqn.distributed.hosts import cpu_share
    from mpidqn.io import sweeprecord
    from mpidqn.train import sweep as packed
    from mpidqn.train.rundir import prepare_run

    root = comm.Get_rank() == 0
    args = collective(comm, lambda: parser(base_parser).parse_intermixed_args(list(argv)))
    plan = comm.bcast(collective(comm, lambda: make_plan(args, comm.Get_size()) if root else None), root=0)
    lock = collective(comm, lambda: claim_out(plan) if root else None)
    # parallel.torch_threads: auto shares each host among all the sweep's ranks there, not one run's
    share = cpu_share(comm)
    group = packed.split_groups(comm, plan.ranks_per_run)

    def train_run(index: int, group_comm: Any) -> int:
        from mpidqn.distributed.topology import Topology

        cfg = plan.run_config(index)
        topo = Topology.build(group_comm, cfg.parallel.pipeline_stages)
        return prepare_run(cfg, topo, str(plan.run_dir(index)), False, collective, cpu_share=share).train()

    say = (lambda s: print(s, file=sys.stderr, flush=True))
    sweep = packed.Sweep(plan.out, [plan.run_dir(i) for i in range(len(plan.runs))], train_run, abort, say)
    sweep.work(group)
    packed.wait_quietly(comm)
    code = None
    if root:
        data = sweeprecord.read(plan.out)
        code = packed.outcome(data)
        states = ", ".join(f"{n} {s}" for s, n in sweeprecord.counts(data).items())
        say(f"mpidqn sweep: {states} of {len(plan.runs)} run(s); record {sweeprecord.record_path(plan.out)}; exit {code}")
        lock.release()
    return comm.bcast(code, root=0)
