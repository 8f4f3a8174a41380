"""Learning per env step at batch scale K: one rank with K x batch_size rows and K envs per update.

    python benchmarks/large_batch.py --config configs/cartpole.yaml --k 1 2 4 8 --seeds 0-9 \
        [--jobs 2] [--variant NAME KEY=VALUE ...] [--out runs/large_batch] [KEY=VALUE ...]

A 1-rank run with ``train.batch_scale=K env.num_envs=K`` is the same algorithm as K ranks of one env
and ``batch_size`` rows each (train.batch_scope: per_rank), so the large-batch contract can be tuned on
a small machine and checked at K ranks later. Runs alternate (for each seed: every K and variant), so a
busy machine slows all alike. Every run is shown. Per run: the final greedy evaluation, the env steps
of the first evaluation >= --target, and how many evaluations from --late-from on reached it.
Writes results.csv and results.md under --out. ``--variant NAME KEY=VALUE ...`` (repeatable) adds a
column of runs with extra overrides on top of the shared ones, at every K.
"""
from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import run_mpidqn, seeds_arg  # noqa: E402  (a sibling script)


def late_hits(run_dir: Path, target: float, late_from: int) -> tuple[int, int]:
    """(evaluations at or after ``late_from`` env steps that reached ``target``, evaluations there)."""
    from mpidqn.io.runlog import read_log

    ev = read_log(run_dir / "log.h5").tables["evaluations"]
    late = ev[ev["step"] >= late_from]
    return int((late["mean"] >= target).sum()), len(late)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cartpole.yaml")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seeds", type=seeds_arg, default=seeds_arg("0-9"))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--target", type=float, default=475.0)
    p.add_argument("--late-from", type=int, default=30_000, help="env steps from which evaluations count as late")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="a named set of extra overrides (repeatable); without any, one variant 'base'")
    p.add_argument("--out", type=Path, default=Path("runs/large_batch"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    variants = {v[0]: v[1:] for v in args.variant} or {"base": []}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, k, seed) for seed in args.seeds for name in variants for k in args.k]

    def one(job: tuple[str, int, int]) -> dict:
        name, k, seed = job
        run_dir = args.out / f"{name}-k{k}-s{seed}"
        extra = [f"train.batch_scale={k}", f"env.num_envs={k}", *args.overrides, *variants[name]]
        try:  # one failed run must not cancel the others queued in the pool
            r = run_mpidqn(args.config, 1, seed, run_dir, extra, args.target)
            if "error" not in r:
                r["late"], r["late_n"] = late_hits(run_dir, args.target, args.late_from)
        except Exception as err:  # noqa: BLE001  (reported in the run's line and table row)
            r = {"final": float("nan"), "wall": float("nan"), "error": f"{type(err).__name__}: {err}"}
        r.update(variant=name, k=k, seed=seed)
        first = f"{r['target_step']:,}" if "target_step" in r else "never"
        print(f"{name} K={k} seed {seed}: final {r['final']:.1f}, first >= {args.target:g} at {first}, "
              f"late {r.get('late', '-')}/{r.get('late_n', '-')}, wall {r['wall']:.0f} s"
              + (f"  error: {r['error']}" if "error" in r else ""), flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, jobs))
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "k", "seed", "final", "target_step", "late_hits", "late_evals", "wall_s"])
        for r in results:
            w.writerow([r["variant"], r["k"], r["seed"], r["final"], r.get("target_step", ""), r.get("late", ""),
                        r.get("late_n", ""), round(r["wall"], 1)])
    lines = ["| variant | K | finals (seeds " + ", ".join(map(str, args.seeds)) + ") | final >= target | "
             "median steps to first >= target | late evaluations >= target |", "|---|---|---|---|---|---|"]
    for name in variants:
        for k in args.k:
            rs = [r for r in results if r["variant"] == name and r["k"] == k]
            hits = [r["target_step"] for r in rs if "target_step" in r]
            med = f"{np.median(hits):,.0f} ({len(hits)}/{len(rs)} reached)" if hits else "never"
            lines.append(f"| {name} | {k} | " + ", ".join(f"{r['final']:.0f}" for r in rs)
                         + f" | {sum(r['final'] >= args.target for r in rs)}/{len(rs)} | {med} | "
                         f"{sum(r.get('late', 0) for r in rs)}/{sum(r.get('late_n', 0) for r in rs)} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
