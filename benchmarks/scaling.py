"""Weak or strong scaling at 1, 2, 4, ... ranks: throughput, efficiency and where the time went.

    python benchmarks/scaling.py [--ranks 1 2 4] [--steps-per-rank 10000] [--config configs/cartpole.yaml] [KEY=VALUE ...]
    python benchmarks/scaling.py --strong --steps 20000 [--ranks 1 2] [--config ...] [KEY=VALUE ...]
    [--repeats 3]: every world size 3 times, alternating (1, 2, 1, 2, ...), medians shown
    [--bare]: weak scaling only; after each mpidqn run, bare_dp.py (a bare torch loop with one Allreduce
              per update) at the same world size and update count, and its efficiency beside mpidqn's

On a shared machine one run per world size is at the mercy of whatever else ran meanwhile; with
--repeats the world sizes alternate, so slow spells hit all of them, and the table gives medians
(the phase shares are over all repeats) with the range of the throughputs.

Weak scaling (the default): each world size W trains `--steps-per-rank * W` global env steps (one env per rank, each rank
sampling the config's batch_size: `train.batch_scope=per_rank`, the large-batch mode at K = W, whose
updates per env step fall by W), so every rank does the same work (env steps, updates, rows per update)
at every W.
Prints global env-steps/s (from the run log: env steps over the training wall time), weak-scaling
efficiency = throughput(W) / (W * throughput(1)), and where the time went: the share of the wall
time in each phase of the loop (the run log's per-rank timers, averaged over the ranks). `comm` is
the gradient Allreduce (and any replay exchange); `learn` is the update without it; `idle` is time
outside every phase. Run dirs stay under --out (default runs/scaling-weak or runs/scaling-strong) for
`python -m mpidqn report` (which draws the scaling plot); a run dir left there by an earlier call is
replaced. On a machine with fewer cores than ranks the efficiency is bounded by cores / W.

Strong scaling (``--strong``): the config's own run, unchanged, at every W: ``--steps`` global env
steps, the global batch split over the ranks (``train.batch_scope: global``, the default), so every W
does the same updates on the same global batch size and learns the same per env step; only the wall
time may change. Prints global env-steps/s, updates/s, speedup = time(1) / time(W), efficiency =
speedup / W and the same per-phase shares. This is the speed-up a user of the default mode gets.

The bare reference (``--bare``, weak scaling): every update of every replica waits in the Allreduce for
the slowest replica, so jitter in the time of an update (the OS, the VM's vCPU scheduling) costs
efficiency that no trainer removes while it takes the same step on every replica. The bare loop pays
that and nothing else: what it loses is what lockstep costs an update on the machine, measured in the
same alternation as mpidqn's. (A trainer with work between its rounds, as mpidqn's env steps, loses a
smaller share of its whole time.) The bare loop is the CartPole update, so --bare takes CartPole
configs only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mpidqn.analysis import load_run
from mpidqn.analysis.tables import time_breakdown
from mpidqn.config import load_config


def run_world(args: argparse.Namespace, base, w: int, run_dir: Path) -> tuple[float, float, pd.Series]:
    """One run at world size ``w``: (global env-steps/s, updates/s, seconds per phase averaged over ranks)."""
    if run_dir.exists():  # an earlier call's run would be resumed (or refused), not measured
        shutil.rmtree(run_dir)
    cmd = ["mpiexec", "-n", str(w), sys.executable, "-m", "mpidqn", "train", "--config", args.config,
           "--run-dir", str(run_dir), "log.progress=none", "eval.interval_steps=0", "eval.episodes=1",
           "checkpoint.interval_steps=0", "env.num_envs=1"]
    if args.strong:
        steps = args.steps
        cmd += [f"train.total_steps={steps}", f"log.interval_steps={min(base.log.interval_steps, steps)}"]
    else:
        steps = args.steps_per_rank * w
        cmd += ["train.batch_scope=per_rank", f"train.total_steps={steps}",
                f"train.learning_starts={base.train.learning_starts * w}",
                f"log.interval_steps={base.log.interval_steps * w}"]
    cmd += args.overrides
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    run = load_run(run_dir)
    s = run.scalars
    wall = float(s["wall_time"].iloc[-1])
    return steps / wall, float(s["updates"].iloc[-1]) / wall, time_breakdown(run).mean(axis=0)


def run_bare(w: int, updates: int) -> float:
    """bare_dp.py at world size ``w`` for ``updates`` updates: its updates/s (its line is printed)."""
    script = Path(__file__).with_name("bare_dp.py")
    proc = subprocess.run(["mpiexec", "-n", str(w), sys.executable, str(script), "--updates", str(updates)],
                          check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    line = proc.stdout.strip()
    print(f"  bare loop, {line}", flush=True)
    return float(line.split(" updates, ")[1].split(" updates/s")[0].replace(",", ""))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/cartpole.yaml")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps-per-rank", type=int, default=10_000, help="weak scaling: env steps per rank")
    p.add_argument("--strong", action="store_true", help="strong scaling: the same global run at every W")
    p.add_argument("--steps", type=int, default=20_000, help="strong scaling: global env steps")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per world size, the world sizes alternating (1, 2, 1, 2, ...); medians are shown")
    p.add_argument("--bare", action="store_true",
                   help="weak scaling: also the bare data-parallel loop (bare_dp.py), what lockstep costs")
    p.add_argument("--out", help="run dirs (default runs/scaling-weak or runs/scaling-strong)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.bare and args.strong:
        p.error("--bare applies to weak scaling only")
    base = load_config(args.config, args.overrides)
    if args.bare and base.env.id != "CartPole-v1":
        p.error(f"--bare runs the CartPole update; {args.config} trains {base.env.id}")
    out = Path(args.out or f"runs/scaling-{'strong' if args.strong else 'weak'}")
    results: dict[int, list[tuple[float, float, pd.Series]]] = {w: [] for w in args.ranks}
    bare: dict[int, list[float]] = {w: [] for w in args.ranks}
    for r in range(args.repeats):
        for w in args.ranks:
            results[w].append(run_world(args, base, w, out / (f"world{w}" if r == 0 else f"world{w}-r{r}")))
            thr, ups, _ = results[w][-1]
            print(f"world {w}{f' (repeat {r + 1})' if args.repeats > 1 else ''}: {thr:,.0f} global env-steps/s, "
                  f"{ups:,.0f} updates/s", flush=True)
            if args.bare:  # the same updates per rank as this world's mpidqn run
                updates = round(ups / thr * args.steps_per_rank * w)
                bare[w].append(run_bare(w, updates))
    rows = []
    for w in args.ranks:
        thr = [t for t, _, _ in results[w]]
        phases = sum(ph for _, _, ph in results[w])  # seconds per phase, summed over the repeats
        rows.append((w, float(np.median(thr)), float(np.median([u for _, u, _ in results[w]])), phases / phases.sum(),
                     min(thr), max(thr)))
    # weak: efficiency = thr(W) / (W thr(1)); strong (same steps): speedup = thr(W) / thr(1)
    thr1 = rows[0][1] / rows[0][0]
    names = [n for n in rows[0][3].index if any(r[3].get(n, 0.0) >= 0.001 for r in rows)]
    print(f"{'strong' if args.strong else 'weak'} scaling, {args.config}"
          + (f", medians of {args.repeats} alternating runs" if args.repeats > 1 else ""))
    print(f"{'ranks':>6} {'env-steps/s':>12} {'updates/s':>10} {'speedup':>8} {'efficiency':>10}  "
          + " ".join(f"{n:>7}" for n in names) + "   (share of wall time per phase)"
          + ("   env-steps/s min-max" if args.repeats > 1 else ""))
    for w, thr, ups, share, lo, hi in rows:
        print(f"{w:>6} {thr:>12,.0f} {ups:>10,.0f} {thr / rows[0][1]:>8.2f} {thr / (w * thr1):>10.0%}  "
              + " ".join(f"{share.get(n, 0.0):>7.1%}" for n in names)
              + (f"   {lo:,.0f}-{hi:,.0f}" if args.repeats > 1 else ""))
    if args.bare:
        b0 = float(np.median(bare[args.ranks[0]]))
        print("bare data-parallel loop (bare_dp.py), the same updates per rank, medians; efficiency ="
              f" updates/s(W) / updates/s({args.ranks[0]})")
        for w, thr, *_ in rows:
            b = float(np.median(bare[w]))
            print(f"{w:>6} {b:>10,.0f} updates/s   efficiency {b / b0:>5.0%}   "
                  f"mpidqn's {thr / (w * thr1):.0%}   range {min(bare[w]):,.0f}-{max(bare[w]):,.0f}")
    print(f"cores on this machine: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
