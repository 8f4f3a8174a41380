"""Learning check: train a config for several seeds at several world sizes, then evaluate greedily.

    python benchmarks/learning.py --config configs/cartpole.yaml --seeds 0 1 2 --ranks 1 4 [KEY=VALUE ...]

Prints one row per run (final greedy evaluation of the final model over --episodes episodes, wall
time) and whether every run reached --target. Run dirs go under --out (kept for `mpidqn report`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/cartpole.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--target", type=float, default=475.0)
    p.add_argument("--out", default="runs/learning")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = []
    for ranks in args.ranks:
        for seed in args.seeds:
            run_dir = Path(args.out) / f"w{ranks}-s{seed}"
            cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpidqn", "train", "--config", args.config,
                   "--run-dir", str(run_dir), f"seed={seed}", "log.progress=none", *args.overrides]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                return proc.returncode
            ev = subprocess.run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes",
                                 str(args.episodes), "--json"], capture_output=True, text=True, check=True)
            result = json.loads(ev.stdout)
            rows.append((ranks, seed, result["mean"], result["min"], wall))
            print(f"ranks {ranks} seed {seed}: greedy mean {result['mean']:.1f} (min {result['min']:.0f}) "
                  f"over {args.episodes} episodes, wall {wall:.0f} s", flush=True)
    ok = all(r[2] >= args.target for r in rows)
    print(f"{'all' if ok else 'NOT all'} runs reached mean >= {args.target}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
