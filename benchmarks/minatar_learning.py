"""MinAtar learning check: mpidqn against a plain single-file DQN with MinAtar's reference settings,
at equal frames, side by side (the two run at the same time, one process each, per seed).

    pip install -e ".[minatar]"
    python benchmarks/minatar_learning.py [--game breakout] [--frames 1000000] [--seeds 0 1] [--ranks 1]
                                          [--reuse-reference] [KEY=VALUE ...]

The reference settings are those of the MinAtar paper's DQN (Young & Tian 2019): one 3x3 conv layer of
16 filters and 128 hidden units, replay 100k, batch 32, one update per frame from frame 5000 on,
centered RMSProp (lr 2.5e-4, squared-gradient momentum 0.95, min squared gradient 0.01), Huber loss,
plain DQN target, target network every 1000 updates, epsilon 1 until replay start then linearly to 0.1
over 100k frames, sticky actions 0.1, minimal action set. The reference loop below is ~80 lines of
plain torch on ``minatar.Environment``, independent of mpidqn's code; mpidqn runs
``configs/minatar-<game>.yaml`` with the run shortened to ``--frames`` (its epsilon schedule is stretched
to end at the same frame, 105k). With ``--ranks R`` it keeps one update per global env step on every
replica (train_freq R, gradient_steps R) unless KEY=VALUE overrides say otherwise (e.g.
``train.gradient_steps=1``: R times fewer updates, each on R x 32 samples). ``--reuse-reference``
reads the reference curve of an earlier run with the same --out instead of running it again.

Compared: the mean return of the training episodes (epsilon-greedy, as MinAtar's own curves) that end
in each tenth of the run, averaged over seeds. Writes ``<out>/curves-w<ranks>.csv`` and, with
matplotlib, ``<out>/curves-w<ranks>.png`` (runs at other world sizes do not overwrite them); mpidqn's run
dirs stay under ``<out>`` for ``mpidqn report``.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

START, ANNEAL, TARGET_EVERY, BUFFER, BATCH = 5000, 100_000, 1000, 100_000, 32


def reference_run(game: str, frames: int, seed: int, out: Path) -> None:
    """MinAtar's reference DQN settings in plain torch; saves (end frame, return) per training episode."""
    import minatar
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = minatar.Environment(game, sticky_action_prob=0.1)
    env.seed(seed)
    actions = env.minimal_action_set()
    h, w, c = env.state_shape()
    net = nn.Sequential(nn.Conv2d(c, 16, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * (h - 2) * (w - 2), 128),
                        nn.ReLU(), nn.Linear(128, len(actions)))
    target = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.RMSprop(net.parameters(), lr=2.5e-4, alpha=0.95, eps=0.01, centered=True)
    obs = np.zeros((BUFFER, c, h, w), np.uint8)
    next_obs = np.zeros_like(obs)
    act = np.zeros(BUFFER, np.int64)
    rew = np.zeros(BUFFER, np.float32)
    term = np.zeros(BUFFER, np.float32)

    def state() -> np.ndarray:
        return np.moveaxis(env.state(), -1, 0).astype(np.uint8)

    env.reset()
    s, ret, episodes, updates = state(), 0.0, [], 0
    for t in range(frames):
        eps = 1.0 if t < START else max(0.1, 1.0 - 0.9 * (t - START) / ANNEAL)
        if rng.random() < eps:
            a = int(rng.integers(len(actions)))
        else:
            with torch.no_grad():
                a = int(net(torch.from_numpy(s[None]).float()).argmax())
        r, done = env.act(actions[a])
        ret += r
        s2 = state()
        i = t % BUFFER
        obs[i], act[i], rew[i], next_obs[i], term[i] = s, a, r, s2, float(done)
        if done:
            episodes.append((t + 1, ret))
            env.reset()
            s2, ret = state(), 0.0
        s = s2
        if t >= START:
            idx = rng.integers(min(t + 1, BUFFER), size=BATCH)
            o, o2 = torch.from_numpy(obs[idx]).float(), torch.from_numpy(next_obs[idx]).float()
            with torch.no_grad():
                y = torch.from_numpy(rew[idx]) + 0.99 * (1 - torch.from_numpy(term[idx])) * target(o2).max(1).values
            q = net(o).gather(1, torch.from_numpy(act[idx])[:, None]).squeeze(1)
            loss = nn.functional.smooth_l1_loss(q, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            updates += 1
            if updates % TARGET_EVERY == 0:
                target.load_state_dict(net.state_dict())
    np.save(out, np.asarray(episodes, dtype=np.float64).reshape(-1, 2))


def mpidqn_episodes(run_dir: Path) -> np.ndarray:
    from mpidqn.io.runlog import read_log

    ep = read_log(run_dir / "log.h5").tables["episodes"]
    return np.stack([ep["step"].astype(np.float64), ep["return"]], axis=1)


def binned(episodes: np.ndarray, frames: int, bins: int) -> np.ndarray:
    """Mean return of the episodes ending in each of ``bins`` equal frame ranges (NaN if none)."""
    edges = np.linspace(0, frames, bins + 1)
    which = np.clip(np.searchsorted(edges, episodes[:, 0], side="left") - 1, 0, bins - 1)
    return np.array([episodes[which == b, 1].mean() if np.any(which == b) else np.nan for b in range(bins)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--game", default="breakout")
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ranks", type=int, default=1, help="MPI ranks of the mpidqn run")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("runs/minatar-learning"))
    p.add_argument("--reuse-reference", action="store_true",
                   help="use reference-s<seed>.npy from an earlier run in --out instead of running it")
    p.add_argument("--reference-run", type=int, metavar="SEED", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the mpidqn run")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reference_run is not None:
        reference_run(args.game, args.frames, args.reference_run, args.out / f"reference-s{args.reference_run}.npy")
        return 0

    config = f"configs/minatar-{args.game.replace('_', '-')}.yaml"
    curves: dict[str, list[np.ndarray]] = {"reference": [], "mpidqn": []}
    for seed in args.seeds:
        run_dir = args.out / f"mpidqn-w{args.ranks}-s{seed}"
        ours = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "mpidqn", "train", "--config", config,
                "--run-dir", str(run_dir), f"seed={seed}", "log.progress=none", f"train.total_steps={args.frames}",
                f"train.gradient_steps={args.ranks}", f"train.train_freq={args.ranks}",  # 1 update per step
                f"train.exploration.eps_fraction={min(1.0, (START + ANNEAL) / args.frames)}", "eval.interval_steps=0",
                f"checkpoint.interval_steps={args.frames}", *args.overrides]
        ref = [sys.executable, __file__, "--game", args.game, "--frames", str(args.frames), "--out", str(args.out),
               "--reference-run", str(seed)]
        t0 = time.perf_counter()
        reuse = args.reuse_reference and (args.out / f"reference-s{seed}.npy").exists()
        procs = {"mpidqn": subprocess.Popen(ours), **({} if reuse else {"reference": subprocess.Popen(ref)})}
        codes = {name: proc.wait() for name, proc in procs.items()}
        if any(codes.values()):
            print(f"seed {seed}: a run failed: {codes}", file=sys.stderr)
            return 1
        print(f"seed {seed}: {' and '.join(procs)} ({args.frames:,} frames) done in {time.perf_counter() - t0:.0f} s",
              flush=True)
        curves["reference"].append(binned(np.load(args.out / f"reference-s{seed}.npy"), args.frames, args.bins))
        curves["mpidqn"].append(binned(mpidqn_episodes(run_dir), args.frames, args.bins))

    ends = np.linspace(0, args.frames, args.bins + 1)[1:].astype(int)
    mean = {k: np.nanmean(np.stack(v), axis=0) for k, v in curves.items()}
    stem = args.out / f"curves-w{args.ranks}"
    with open(stem.with_suffix(".csv"), "w") as f:
        f.write("frames,reference,mpidqn\n")
        for e, r, m in zip(ends, mean["reference"], mean["mpidqn"]):
            f.write(f"{e},{r:.4f},{m:.4f}\n")
    print(f"MinAtar {args.game}: mean training-episode return per frame range, {len(args.seeds)} seed(s), "
          f"mpidqn on {args.ranks} rank(s)")
    print(f"{'frames up to':>14}{'reference':>12}{'mpidqn':>10}")
    for e, r, m in zip(ends, mean["reference"], mean["mpidqn"]):
        print(f"{e:>14,}{r:>12.2f}{m:>10.2f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        color = "C0" if name == "mpidqn" else "C1"
        for c in runs:
            ax.plot(ends, c, alpha=0.35, color=color)
        ax.plot(ends, mean[name], lw=2, color=color, label=name)
    ax.set(xlabel="frames", ylabel="training episode return", title=f"MinAtar {args.game}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
