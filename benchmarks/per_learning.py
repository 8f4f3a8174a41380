"""Prioritized vs uniform replay at equal frames, every seed shown.

    pip install -e ".[minatar]"
    python benchmarks/per_learning.py [--config configs/minatar-breakout.yaml] [--frames 200000]
                                      [--seeds 100 101 102] [--ranks 1] [--out runs/per-learning]
                                      [--table-only] [KEY=VALUE ...]

For every seed, two runs of the same config differ only in ``train.prioritized`` (alpha 0.6, beta 0.4
annealed to 1, eps 1e-6: the defaults). The epsilon schedule is stretched to end at frame 105k as in
``benchmarks/minatar_learning.py``. The uniform and the prioritized run of a seed run one after the
other (``--parallel 2`` runs both at once), so machine load hits both alike.

Table: per variant and seed, the mean return of the training episodes ending in each quarter of the
run, and the greedy evaluations (``eval.episodes`` 20) at the quarter marks and at the end.
``--table-only`` rebuilds the table from the run directories under ``--out``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {"uniform": [], "prioritized": ["train.prioritized=true"]}


def command(args: argparse.Namespace, variant: str, seed: int) -> list[str]:
    run = args.out / f"{variant}-{seed}"
    launch = ["mpiexec", "-n", str(args.ranks)] if args.ranks > 1 else []
    return [*launch, sys.executable, "-m", "mpidqn", "train", "--config", str(args.config), "--run-dir", str(run),
            f"seed={seed}", f"train.total_steps={args.frames}",
            f"train.exploration.eps_fraction={min(1.0, 105_000 / args.frames)}",
            f"eval.interval_steps={args.frames // 4}", "eval.episodes=20", f"log.interval_steps={args.frames // 20}",
            f"checkpoint.interval_steps={args.frames // 2}", "checkpoint.replay=false", *VARIANTS[variant],
            *args.overrides]


def table(args: argparse.Namespace) -> str:
    from mpidqn.analysis.runs import load_run

    quarter = args.frames // 4
    head = [f"train ≤{(i + 1) * quarter // 1000}k" for i in range(4)]
    evals = [f"eval @{(i + 1) * quarter // 1000}k" for i in range(4)]
    lines = ["| variant | seed | " + " | ".join(head + evals) + " | wall s |", "|---" * (11) + "|"]
    for variant in VARIANTS:
        finals = []
        for seed in args.seeds:
            path = args.out / f"{variant}-{seed}"
            if not (path / "log.h5").exists():
                lines.append(f"| {variant} | {seed} | " + " | ".join(["–"] * 8) + " | not run |")
                continue
            run = load_run(path)
            ep = run.episodes
            cells = []
            for i in range(4):
                sel = ep[(ep["step"] > i * quarter) & (ep["step"] <= (i + 1) * quarter)]
                cells.append(f"{sel['return'].mean():.2f}" if len(sel) else "–")
            ev = run.evaluations.set_index("step")["mean"] if len(run.evaluations) else {}
            for i in range(4):
                step = (i + 1) * quarter
                cells.append(f"{ev[step]:.2f}" if step in ev else "–")
            if args.frames in ev:
                finals.append(float(ev[args.frames]))
            wall = (path / "wall.txt").read_text().strip() if (path / "wall.txt").exists() else "–"
            lines.append(f"| {variant} | {seed} | " + " | ".join(cells) + f" | {wall} |")
        if finals:
            lines.append(f"| {variant} | mean of {len(finals)} | " + " | ".join([""] * 7)
                         + f" | {np.mean(finals):.2f} | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("configs/minatar-breakout.yaml"))
    p.add_argument("--frames", type=int, default=200_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--parallel", type=int, choices=(1, 2), default=1, help="run a seed's two variants at once")
    p.add_argument("--out", type=Path, default=Path("runs/per-learning"))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if not args.table_only:
        args.out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            jobs = [(v, command(args, v, seed)) for v in VARIANTS]
            batches = [jobs] if args.parallel == 2 else [[j] for j in jobs]
            for batch in batches:
                started = [(v, time.perf_counter(), subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
                           for v, cmd in batch]
                for v, t0, proc in started:
                    if proc.wait() != 0:
                        raise SystemExit(f"{v} seed {seed} failed with exit code {proc.returncode}")
                    (args.out / f"{v}-{seed}" / "wall.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    print(table(args))


if __name__ == "__main__":
    main()
