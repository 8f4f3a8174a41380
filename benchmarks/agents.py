"""Agents side by side: two or more configs on the same seeds at the same number of env steps, with the
greedy evaluation curve of every run, their means over the seeds, and each run's updates and env steps/s.

    python benchmarks/agents.py --seeds 100-102 --jobs 2 --out runs/agents/breakout \\
        train.total_steps=200000 eval.interval_steps=25000 checkpoint.interval_steps=0 checkpoint.replay=false \\
        --side DQN configs/minatar-breakout.yaml train.exploration.eps_fraction=0.5 \\
        --side Rainbow configs/minatar-breakout-rainbow.yaml

A side is ``NAME CONFIG [KEY=VALUE ...]``; the KEY=VALUE overrides before the first ``--side`` apply to every
side (after a ``--side`` they belong to it). Runs
alternate (for each seed every side, then the next seed), ``--jobs`` at a time, one rank each (``--ranks``
for more); a run dir that already holds a finished run of the same command is kept and read, so an
interrupted call picks up where it stopped. Prints a markdown table (per side and seed: the greedy mean at
each evaluation, the updates and the env steps per second of the whole run; per side: the mean over the
seeds at each evaluation) and writes it to ``<out>/results.md``, then calls ``mpidqn report`` over all the
runs (curves with IQM bands per side in ``<out>/report``). With ``--jobs 2`` two runs share the machine, so
env steps/s compare only between runs that ran at the same time.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import run_mpidqn, seeds_arg  # noqa: E402  (a sibling script)


def finished(run_dir: Path, total_steps: int | None) -> bool:
    """True when ``run_dir`` holds a run whose log reached its last step (``total_steps``)."""
    from mpidqn.io.runlog import read_log

    try:
        scalars = read_log(run_dir / "log.h5").tables["scalars"]
    except (OSError, KeyError, ValueError):
        return False
    return total_steps is not None and len(scalars) > 0 and int(scalars["step"][-1]) >= total_steps


def curve(run_dir: Path) -> dict:
    """A run's greedy evaluations {step: mean}, updates and env steps per second of the whole run."""
    from mpidqn.io.runlog import read_log

    tables = read_log(run_dir / "log.h5").tables
    ev, sc = tables["evaluations"], tables["scalars"]
    return {"evals": {int(s): float(m) for s, m in zip(ev["step"], ev["mean"])},
            "updates": int(sc["updates"][-1]), "rate": float(sc["step"][-1] / sc["wall_time"][-1])}


def table(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    steps = sorted({s for side in results.values() for r in side.values() for s in r.get("evals", {})})
    lines = ["| side | seed | " + " | ".join(f"{s / 1000:g}k" for s in steps) + " | updates | env steps/s |",
             "|---|---|" + "---|" * (len(steps) + 2)]
    for name, runs in results.items():
        for seed in seeds:
            r = runs[seed]
            if "evals" not in r:
                lines.append(f"| {name} | {seed} | error: {r.get('error', '?')} |")
                continue
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{r['evals'][s]:.1f}" if s in r["evals"] else ""
                                                              for s in steps) + f" | {r['updates']:,} | {r['rate']:.0f} |")
        done = [runs[seed]["evals"] for seed in seeds if "evals" in runs[seed]]
        lines.append(f"| {name} | mean | " + " | ".join(
            f"{np.mean([e[s] for e in done]):.2f}" if done and all(s in e for e in done) else "" for s in steps)
            + " | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", nargs="+", action="append", required=True, metavar="NAME CONFIG [KEY=VALUE]")
    p.add_argument("--seeds", type=seeds_arg, default=seeds_arg("100-102"))
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (mind the cores)")
    p.add_argument("--out", type=Path, default=Path("runs/agents"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    if any(len(s) < 2 for s in args.side):
        p.error("--side needs NAME CONFIG [KEY=VALUE ...]")
    sides = {s[0]: (s[1], s[2:]) for s in args.side}
    steps = next((int(o.split("=", 1)[1]) for o in reversed(args.overrides) if o.startswith("train.total_steps=")),
                 None)
    args.out.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[str, int]) -> tuple[str, int, dict]:
        name, seed = job
        config, extra = sides[name]
        run_dir = args.out / f"{name}-s{seed}"
        if finished(run_dir, steps):
            print(f"{name} seed {seed}: kept the finished run in {run_dir}", flush=True)
        else:
            r = run_mpidqn(config, args.ranks, seed, run_dir, [*extra, *args.overrides], np.inf)
            if "error" in r:
                print(f"{name} seed {seed}: error: {r['error']}", flush=True)
                return name, seed, r
        r = curve(run_dir)
        print(f"{name} seed {seed}: final {r['evals'][max(r['evals'])]:.2f}, {r['rate']:.0f} env steps/s", flush=True)
        return name, seed, r

    jobs = [(name, seed) for seed in args.seeds for name in sides]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(one, jobs))
    results: dict[str, dict[int, dict]] = {name: {} for name in sides}
    for name, seed, r in done:
        results[name][seed] = r
    text = table(results, args.seeds)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    run_dirs = [str(args.out / f"{name}-s{seed}") for name, seed in jobs if "evals" in results[name][seed]]
    subprocess.run([sys.executable, "-m", "mpidqn", "report", *run_dirs, "--out", str(args.out / "report")])
    return 0 if all("evals" in r for runs in results.values() for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
