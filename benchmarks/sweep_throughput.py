"""Throughput of a packed sweep: N one-rank CartPole runs three ways, in runs per hour.

    python benchmarks/sweep_throughput.py [--runs 2] [--steps 20000] [--repeats 2] [--config FILE]

- ``sweep``: one MPI job, ``mpiexec -n N python -m mpidqn sweep --seeds 0-(N-1)`` (N groups of 1 rank);
- ``one after the other``: the same N runs as N single-rank jobs in a row;
- ``N jobs at once``: the same N runs as N separate ``mpiexec -n 1`` jobs started together.

The modes alternate (sweep, in a row, at once, sweep, ...) so that a change in the load of the
machine hits every mode alike; each line gives the median over the repeats. "linear" is N times the
throughput of one run alone (the one-after-the-other mode), the most N cores can give; the target of
a packed sweep is at least 0.9 of it. The runs of the sweep are checked to learn bit for bit what the
same runs learn alone (the same losses in log.h5), so the comparison is between equal work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.learning_starts=1000", "log.progress=none", "eval.interval_steps=0", "eval.episodes=5",
          "checkpoint.interval_steps=0"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p)
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def mpidqn(n: int, args: list[str]) -> list[str]:
    return ["mpiexec", "-n", str(n), sys.executable, "-m", "mpidqn", *args]


def run_all(commands: list[list[str]], at_once: bool) -> float:
    """Wall seconds to run ``commands`` together or one after the other; any failure stops the benchmark."""
    start = time.perf_counter()
    if at_once:
        procs = [subprocess.Popen(c, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for c in commands]
        results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    else:
        results = []
        for c in commands:
            p = subprocess.run(c, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            results.append((p.returncode, p.stderr))
    wall = time.perf_counter() - start
    for code, err in results:
        if code != 0:
            sys.exit(f"sweep_throughput: a run failed (exit {code}):\n{err}")
    return wall


def losses(run_dir: Path) -> np.ndarray:
    from mpidqn.io.runlog import read_log

    return read_log(run_dir / "log.h5").tables["scalars"]["loss"]


def modes(args: argparse.Namespace, work: Path) -> dict[str, Callable[[int], float]]:
    base = [*(["--config", args.config] if args.config else []), f"train.total_steps={args.steps}", *COMMON]
    seeds = range(args.runs)

    def alone(rep: int, name: str, at_once: bool) -> float:
        return run_all([mpidqn(1, ["--run-dir", str(work / f"{name}{rep}" / f"seed{s}"), *base, f"seed={s}"])
                        for s in seeds], at_once)

    def packed(rep: int) -> float:
        out = work / f"sweep{rep}"
        return run_all([mpidqn(args.runs, ["sweep", "--out", str(out), "--seeds", f"0-{args.runs - 1}", *base])],
                       at_once=False)

    return {"sweep (one job)": packed,
            "one after the other": lambda rep: alone(rep, "row", False),
            f"{args.runs} jobs at once": lambda rep: alone(rep, "once", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="runs, and ranks of the sweep (default 2)")
    p.add_argument("--steps", type=int, default=20000, help="env steps of each run (default 20000)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three modes (default 2)")
    p.add_argument("--config", help="config of every run (default: the embedded CartPole-v1 config)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep-throughput-") as tmp:
        work = Path(tmp)
        timed = modes(args, work)
        walls: dict[str, list[float]] = {name: [] for name in timed}
        for rep in range(args.repeats):
            for name, mode in timed.items():
                walls[name].append(mode(rep))
                print(f"round {rep + 1}: {name}: {walls[name][-1]:.1f} s", flush=True)
        same = all(np.array_equal(losses(work / "sweep0" / f"seed{s}"), losses(work / "row0" / f"seed{s}"))
                   for s in range(args.runs))
    row = statistics.median(walls["one after the other"])
    linear = args.runs * 3600 * args.runs / row  # N cores, each as fast as one run alone
    print(f"\n{args.runs} one-rank runs of {args.steps:,} env steps, median of {args.repeats} round(s), "
          f"{os.cpu_count()} CPU(s):")
    print(f"{'mode':<22} {'wall s':>8} {'runs/hour':>10} {'of linear':>10}")
    for name, values in walls.items():
        wall = statistics.median(values)
        rate = args.runs * 3600 / wall
        print(f"{name:<22} {wall:>8.1f} {rate:>10.1f} {rate / linear:>10.0%}")
    print(f"{'linear':<22} {'':>8} {linear:>10.1f} {1:>10.0%}")
    print(f"packed runs learn what the same runs learn alone (log.h5 losses equal): {same}")


if __name__ == "__main__":
    main()
