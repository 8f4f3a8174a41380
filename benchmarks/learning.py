"""Learning benchmark: a config x seeds x world sizes, optionally against SB3's zoo DQN on the same seeds.

    python benchmarks/learning.py --config configs/cartpole.yaml --seeds 100-109 --ranks 1 2 --sb3 \
        [--jobs 2] [--out runs/learning] [KEY=VALUE ...]

Runs alternate (for each seed: every world size, then SB3), so a busy machine slows all sides alike.
Each mpidqn run ends with its own final greedy evaluation (``eval.episodes`` episodes, logged in
log.h5); SB3 is evaluated greedily over the same number of episodes with ``evaluate_policy``. Every
run is shown, failures included. Writes ``results.csv`` and ``results.md`` (one row per seed, one
column per side) under --out, then calls ``mpidqn report`` over the mpidqn runs (IQM over seeds with a
bootstrap interval, curves). Exit 1 when a run fell short of --target.

Time to score: every table also gives, per mpidqn run, the first greedy evaluation at --target (env
steps / wall seconds of the run up to it). ``--stop-at-target`` ends each mpidqn run there
(``eval.stop_at``), so a time-to-score comparison costs only the time to the score; the "final" column
is then that evaluation.

SB3 (``pip install stable-baselines3``) is a benchmark-only dependency; its hyper-parameters are the
rl-baselines3-zoo DQN settings of the env (``ZOO`` below).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

# rl-baselines3-zoo hyperparams/dqn.yml (gradient_steps -1 = as many as env steps collected)
ZOO = {
    "CartPole-v1": dict(n_timesteps=50_000, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                        learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256,
                        gradient_steps=128, exploration_fraction=0.16, exploration_final_eps=0.04,
                        policy_kwargs=dict(net_arch=[256, 256])),
    "Acrobot-v1": dict(n_timesteps=100_000, learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
                       learning_starts=0, gamma=0.99, target_update_interval=250, train_freq=4, gradient_steps=-1,
                       exploration_fraction=0.12, exploration_final_eps=0.1, policy_kwargs=dict(net_arch=[256, 256])),
    "LunarLander-v3": dict(n_timesteps=100_000, learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
                           learning_starts=0, gamma=0.99, target_update_interval=250, train_freq=4,
                           gradient_steps=-1, exploration_fraction=0.12, exploration_final_eps=0.1,
                           policy_kwargs=dict(net_arch=[256, 256])),
}


def seeds_arg(text: str) -> list[int]:
    """``100-109`` or ``1,5,7``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def run_mpidqn(config: str, ranks: int, seed: int, run_dir: Path, overrides: list[str], target: float) -> dict:
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpidqn", "train", "--config", config,
           "--run-dir", str(run_dir), f"seed={seed}", "log.progress=none", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"final": float("nan"), "wall": wall, "error": (proc.stderr or proc.stdout).strip()[-300:]}
    from mpidqn.io.runlog import read_log

    evaluations = read_log(run_dir / "log.h5").tables["evaluations"]
    final = evaluations[-1]
    out = {"final": float(final["mean"]), "wall": wall, "step": int(final["step"])}
    reached = evaluations[evaluations["mean"] >= target]
    if len(reached):  # time to score: the first evaluation at the target (wall time of the run so far)
        out.update(target_step=int(reached[0]["step"]), target_wall=float(reached[0]["wall_time"]))
    return out


def run_sb3(env_id: str, seed: int, episodes: int, max_steps: int | None) -> dict:
    """SB3's zoo DQN in a subprocess (one torch thread and the CPU, like an mpidqn rank run with train.device=cpu)."""
    params = dict(ZOO[env_id])
    steps = max_steps or params.pop("n_timesteps")
    params.pop("n_timesteps", None)
    code = f"""
import json, time, torch, gymnasium as gym
torch.set_num_threads(1)
from stable_baselines3 import DQN
from stable_baselines3.common.evaluation import evaluate_policy
t = time.perf_counter()
model = DQN("MlpPolicy", {env_id!r}, seed={seed}, verbose=0, device="cpu", **{params!r})
model.learn({steps})
env = gym.make({env_id!r}); env.reset(seed={seed})
mean, std = evaluate_policy(model, env, n_eval_episodes={episodes}, deterministic=True)
print(json.dumps({{"final": float(mean), "wall": time.perf_counter() - t}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"final": float("nan"), "wall": float("nan"), "error": proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_to_target_table(table: dict, seeds: list[int], sides: list[str], target: float) -> str:
    """Markdown: per seed and side, the first evaluation at ``target`` as (env steps, wall seconds of
    the run up to it, evaluations included), and the medians over the seeds that reached it."""
    def cell(r: dict) -> str:
        return f"{r['target_step']:,} / {r['target_wall']:.0f} s" if "target_wall" in r else "not reached"

    lines = [f"time to the first evaluation >= {target:g} (env steps / wall seconds)", "",
             f"| seed | {' | '.join(sides)} |", "|---|" + "---|" * len(sides)]
    lines += [f"| {seed} | " + " | ".join(cell(table[seed][s]) for s in sides) + " |" for seed in seeds]
    medians = []
    for s in sides:
        hits = [table[seed][s] for seed in seeds if "target_wall" in table[seed][s]]
        medians.append(f"{np.median([r['target_step'] for r in hits]):,.0f} / "
                       f"{np.median([r['target_wall'] for r in hits]):.0f} s ({len(hits)} seeds)" if hits else "-")
    lines.append("| median | " + " | ".join(medians) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cartpole.yaml")
    p.add_argument("--seeds", type=seeds_arg, default=seeds_arg("100-109"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sb3", action="store_true", help="also run SB3's zoo DQN on the same seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (mind the cores: ranks add up)")
    p.add_argument("--target", type=float, default=475.0)
    p.add_argument("--stop-at-target", action="store_true",
                   help="end every mpidqn run at its first evaluation >= --target (eval.stop_at)")
    p.add_argument("--out", type=Path, default=Path("runs/learning"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    from mpidqn.config import load_config

    if args.stop_at_target:
        args.overrides = [*args.overrides, f"eval.stop_at={args.target}"]
    cfg = load_config(args.config, args.overrides)
    env_id, episodes = cfg.env.id, cfg.eval.episodes
    if args.sb3 and env_id not in ZOO:
        p.error(f"no zoo settings for {env_id} (known: {', '.join(ZOO)})")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, int, object]] = []
    for seed in args.seeds:  # alternate: every side of one seed before the next seed
        for ranks in args.ranks:
            run_dir = args.out / f"w{ranks}-s{seed}"
            jobs.append((f"mpidqn w{ranks}", seed,
                         lambda r=ranks, s=seed, d=run_dir: run_mpidqn(args.config, r, s, d, args.overrides,
                                                                       args.target)))
        if args.sb3:
            jobs.append(("sb3", seed, lambda s=seed: run_sb3(env_id, s, episodes, None)))

    def one(job: tuple[str, int, object]) -> tuple[str, int, dict]:
        side, seed, fn = job
        result = fn()  # type: ignore[operator]
        mark = "" if result["final"] >= args.target else "  <-- below target"
        err = f"  error: {result['error']}" if "error" in result else ""
        print(f"{side:>10} seed {seed}: final greedy mean {result['final']:.1f} over {episodes} episodes, "
              f"wall {result['wall']:.0f} s{mark}{err}", flush=True)
        return side, seed, result

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, jobs))
    sides = list(dict.fromkeys(side for side, _, _ in results))
    table = {seed: {} for seed in args.seeds}
    for side, seed, result in results:
        table[seed][side] = result
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", *[f"{s} final" for s in sides], *[f"{s} wall_s" for s in sides]])
        for seed in args.seeds:
            w.writerow([seed, *[table[seed][s]["final"] for s in sides], *[round(table[seed][s]["wall"], 1) for s in sides]])
    lines = [f"| seed | {' | '.join(sides)} |", "|---|" + "---|" * len(sides)]
    for seed in args.seeds:
        lines.append(f"| {seed} | " + " | ".join(f"{table[seed][s]['final']:.1f}" for s in sides) + " |")
    reached = {s: sum(table[seed][s]["final"] >= args.target for seed in args.seeds) for s in sides}
    lines.append(f"| reached {args.target:g} | " + " | ".join(f"{reached[s]}/{len(args.seeds)}" for s in sides) + " |")
    lines += ["", time_to_target_table(table, args.seeds, [s for s in sides if s.startswith("mpidqn")], args.target)]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(yaml.safe_dump({"config": args.config, "overrides": args.overrides}, sort_keys=False).strip())
    run_dirs = [str(args.out / f"w{r}-s{s}") for s in args.seeds for r in args.ranks]
    subprocess.run([sys.executable, "-m", "mpidqn", "report", *run_dirs, "--out", str(args.out / "report")])
    return 0 if all(v == len(args.seeds) for k, v in reached.items() if k.startswith("mpidqn")) else 1


if __name__ == "__main__":
    sys.exit(main())
