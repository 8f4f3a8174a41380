"""Time to score against world size, measured as a user would: the run's own clock at its first greedy
evaluation >= --target, median over the same seeds, every side alternating.

    python benchmarks/time_to_score.py --seeds 100-104 --target 475 parallel.torch_threads=auto \
        --side 1-rank 1 --side K2-2-ranks 2 train.batch_scope=per_rank \
        [--config configs/cartpole.yaml] [--out runs/time_to_score] [KEY=VALUE ...]

A side is ``NAME RANKS [KEY=VALUE ...]``: a world size and its overrides on top of the shared ones. For
each seed every side runs once, one run at a time, sides in turn (so a slow spell of a shared machine hits
them alike). Each run stops at its first evaluation >= --target (``eval.stop_at``), so it costs the time
to the score. The table gives, per side, the median env steps and wall seconds to the score, how many
seeds got there, and that median as a fraction of the best median of any 1-rank side: the share of the
1-rank time a job at that world size needs, and the seconds per 1k env steps up to the score with the
same fraction (the speed alone: where a side first reaches the score moves with the seed, and a few seeds
do not average that out), and the learning alone: the env steps each side needed beyond the best 1-rank
side, seed by seed, as a mean and its standard error (seed noise where the mean is within about two
standard errors of 0). Writes results.csv and results.md under --out.

Compare world sizes on the CPUs they are given: ``parallel.torch_threads=auto`` among the shared overrides
gives each rank its share of the host (one rank alone: every CPU, as threads). The column "threads /
CPUs" says what each side used on its host, and a note follows the table where the best 1-rank side left
CPUs idle: a fraction against such a side flatters the ranks.

``--steps N`` measures speed instead: every side runs N env steps without evaluations or checkpoints, and
the table gives each side's run clock (the log's wall time at the last step) per seed, its median, env
steps per second, and that median as a fraction of the best 1-rank median. For sides that learn alike per
env step (e.g. the same ``train.batch_scale``: the same algorithm at any world size), this fraction is the
expected fraction of the time to score, without the seed noise of when a run first reaches the score:

    python benchmarks/time_to_score.py --config configs/minatar-breakout.yaml --steps 40000 --seeds 100,101 \
        --side K4-1rank 1 train.batch_scale=4 env.num_envs=4 --side K4-2ranks 2 train.batch_scale=4 env.num_envs=2
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import run_mpidqn, seeds_arg  # noqa: E402  (a sibling script)

from mpidqn.analysis.paired import paired_step_difference  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cartpole.yaml")
    p.add_argument("--seeds", type=seeds_arg, default=seeds_arg("100-104"))
    p.add_argument("--target", type=float, default=475.0)
    p.add_argument("--side", nargs="+", action="append", required=True, metavar="NAME RANKS [KEY=VALUE]")
    p.add_argument("--out", type=Path, default=Path("runs/time_to_score"))
    p.add_argument("--steps", type=int, help="speed mode: whole runs of this many env steps, no evaluations")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    sides = {s[0]: (int(s[1]), s[2:]) for s in args.side}
    if args.steps:
        return speed(args, sides)
    shared = [*args.overrides, f"eval.stop_at={args.target}", "checkpoint.replay=false"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for seed in args.seeds:
        for name, (ranks, extra) in sides.items():
            r = run_mpidqn(args.config, ranks, seed, fresh(args.out / f"{name}-s{seed}"), [*shared, *extra], args.target)
            r["seed"] = seed
            results[name].append(r)
            got = f"{r['target_step']:,} steps / {r['target_wall']:.1f} s" if "target_wall" in r else "not reached"
            print(f"{name} ({ranks} ranks) seed {seed}: {got}" + (f"  error: {r['error']}" if "error" in r else ""),
                  flush=True)
    medians = {}
    for name, rs in results.items():
        hits = [r for r in rs if "target_wall" in r]
        medians[name] = (float(np.median([r["target_step"] for r in hits])) if hits else np.nan,
                         float(np.median([r["target_wall"] for r in hits])) if hits else np.nan, len(hits),
                         # seconds per 1k env steps up to the score: the speed, without when the score came
                         float(np.median([1000 * r["target_wall"] / r["target_step"] for r in hits])) if hits else np.nan)
    best = best_one_rank(sides, {n: m[1] for n, m in medians.items()})
    best_rate = best_one_rank(sides, {n: m[3] for n, m in medians.items()})
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["side", "ranks", "seed", "target_step", "target_wall_s", "final"])
        for name, rs in results.items():
            for r in rs:
                w.writerow([name, sides[name][0], r["seed"], r.get("target_step", ""),
                            round(r["target_wall"], 2) if "target_wall" in r else "", r["final"]])
    # the learning alone: env steps beyond the fastest 1-rank side's, seed by seed (seed noise if near 0)
    first = {name: {r["seed"]: r["target_step"] for r in rs if "target_wall" in r} for name, rs in results.items()}
    fastest = fastest_one_rank(sides, {n: m[1] for n, m in medians.items()})
    reference = first[fastest] if fastest is not None else {}
    lines = [f"time to the first evaluation >= {args.target:g}; seeds {', '.join(map(str, args.seeds))}", "",
             "| side | ranks | overrides | threads / CPUs | per seed (env steps / s) | median steps | median s | "
             "reached | fraction of the best 1-rank time | s per 1k steps | its fraction of the best 1-rank side's | "
             "extra env steps against the best 1-rank side, seed by seed (mean ± standard error) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    used = {name: cores_used(args.out / f"{name}-s{args.seeds[0]}") for name in sides}
    for name, (ranks, extra) in sides.items():
        steps, wall, n, rate = medians[name]
        cells = ", ".join(f"{r['target_step'] / 1000:g}k / {r['target_wall']:.0f}" if "target_wall" in r else "-"
                          for r in results[name])
        pairs, mean, stderr = paired_step_difference(first[name], reference)
        lines.append(f"| {name} | {ranks} | {' '.join(extra) or '-'} | {used[name][0]} / {used[name][1]} | {cells} | "
                     f"{steps:,.0f} | {wall:.1f} | {n}/{len(args.seeds)} | {wall / best:.2f} | {rate:.2f} | "
                     f"{rate / best_rate:.2f} | {mean:+,.0f} ± {stderr:,.0f} over {pairs} seeds |")
    lines += idle_cores_note(sides, {n: m[1] for n, m in medians.items()}, used)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def fastest_one_rank(sides: dict[str, tuple[int, list[str]]], values: dict[str, float]) -> str | None:
    """The 1-rank side with the smallest value (NaN: not reached), or None when there is none."""
    ones = [n for n, (ranks, _) in sides.items() if ranks == 1 and not np.isnan(values[n])]
    return min(ones, key=values.__getitem__) if ones else None


def best_one_rank(sides: dict[str, tuple[int, list[str]]], values: dict[str, float]) -> float:
    """The smallest value of any 1-rank side (NaN: not reached), or NaN when there is none."""
    fastest = fastest_one_rank(sides, values)
    return values[fastest] if fastest is not None else np.nan


def cores_used(run_dir: Path) -> tuple[int, int]:
    """(compute threads of all ranks on rank 0's host, that host's CPUs) from a run's log; (0, 0) where the
    log does not record them."""
    from mpidqn.distributed.hosts import host_threads
    from mpidqn.io.runlog import read_log

    if not (run_dir / "log.h5").is_file():  # a run that failed before it started
        return 0, 0
    attrs = read_log(run_dir / "log.h5").attrs
    hosts, cores, threads = attrs.get("rank_hosts"), attrs.get("host_cores"), attrs.get("rank_threads")
    if not (isinstance(hosts, list) and isinstance(cores, dict) and isinstance(threads, list)) or not hosts:
        return 0, 0
    return host_threads(hosts, threads)[hosts[0]], int(cores[hosts[0]])


def idle_cores_note(sides: dict[str, tuple[int, list[str]]], values: dict[str, float],
                    used: dict[str, tuple[int, int]]) -> list[str]:
    """A note where the best 1-rank side left CPUs of its host idle: then the fraction flatters the ranks,
    which use CPUs that a 1-rank run with ``parallel.torch_threads=auto`` would use as threads."""
    fastest = fastest_one_rank(sides, values)
    if fastest is None or not used[fastest][1] or used[fastest][0] >= used[fastest][1]:
        return []
    threads, cpus = used[fastest]
    return ["", f"note: the best 1-rank side ({fastest}) ran {threads} compute thread(s) on a host of {cpus} "
                f"CPUs; the fractions are against a run that leaves CPUs idle. Give the sides "
                f"parallel.torch_threads=auto (before --side) to compare against one rank using them all."]


def fresh(run_dir: Path) -> Path:
    """``run_dir`` emptied: a run dir left by an earlier call would otherwise resume from its checkpoint."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def speed(args: argparse.Namespace, sides: dict[str, tuple[int, list[str]]]) -> int:
    """--steps: the run clock of whole runs per side, alternating, and its fraction of the best 1-rank side."""
    from mpidqn.io.runlog import read_log

    shared = [*args.overrides, f"train.total_steps={args.steps}", "eval.interval_steps=0", "eval.episodes=1",
              "checkpoint.interval_steps=0", "checkpoint.replay=false"]
    args.out.mkdir(parents=True, exist_ok=True)
    clocks: dict[str, list[float]] = {name: [] for name in sides}
    for seed in args.seeds:
        for name, (ranks, extra) in sides.items():
            run_dir = fresh(args.out / f"{name}-s{seed}")
            r = run_mpidqn(args.config, ranks, seed, run_dir, [*shared, *extra], np.inf)
            if "error" in r:
                print(f"{name} ({ranks} ranks) seed {seed}: error: {r['error']}", file=sys.stderr)
                return 1
            clocks[name].append(float(read_log(run_dir / "log.h5").tables["scalars"]["wall_time"][-1]))
            print(f"{name} ({ranks} ranks) seed {seed}: {clocks[name][-1]:.1f} s", flush=True)
    medians = {name: float(np.median(c)) for name, c in clocks.items()}
    best = best_one_rank(sides, medians)
    used = {name: cores_used(args.out / f"{name}-s{args.seeds[0]}") for name in sides}
    lines = [f"run clock of {args.steps:,} env steps (no evaluations); seeds {', '.join(map(str, args.seeds))}", "",
             "| side | ranks | overrides | threads / CPUs | per seed (s) | median s | env steps/s | "
             "fraction of the best 1-rank time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (ranks, extra) in sides.items():
        lines.append(f"| {name} | {ranks} | {' '.join(extra) or '-'} | {used[name][0]} / {used[name][1]} | "
                     f"{', '.join(f'{c:.1f}' for c in clocks[name])} | "
                     f"{medians[name]:.1f} | {args.steps / medians[name]:,.0f} | {medians[name] / best:.2f} |")
    lines += idle_cores_note(sides, medians, used)
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
