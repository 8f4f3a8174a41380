"""Single-rank training speed of mpidqn vs stable-baselines3 DQN, side by side in one run.

    pip install stable-baselines3   # only for this benchmark
    python benchmarks/speed.py [--steps 20000] [--threads 1] [--repeats 2]

Both use the rl-baselines3-zoo DQN CartPole hyper-parameters: net [256, 256], batch 64, buffer 1e5,
learning_starts 1000, train_freq 256, gradient_steps 128, lr 2.3e-3, exploration 0.16 -> 0.04,
Huber loss, grad-norm clip 10, plain (not double) DQN, target refreshed once per round of updates
(SB3 counts target_update_interval=10 in env steps, i.e. once per train call here; mpidqn counts in
updates: 128). Runs alternate (mpidqn, SB3, mpidqn, SB3, ...) so machine noise hits both alike.
Also prints the time of one update next to a bare torch loop doing the same forward/backward/Adam.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from mpi4py import MPI


def run_mpidqn(steps: int) -> float:
    from mpidqn.config import load_config
    from mpidqn.console import SilentReporter
    from mpidqn.topology import Topology
    from mpidqn.trainer import Trainer

    cfg = load_config(None, [
        f"train.total_steps={steps}", "train.double_dqn=false", "train.target_update_interval=128",
        "train.lr_final_fraction=1.0", "eval.interval_steps=0", "eval.episodes=1", "train.max_grad_norm=10",
        f"parallel.torch_threads={torch.get_num_threads()}", "parallel.sync_check_interval=0"])
    trainer = Trainer(cfg, Topology.build(MPI.COMM_SELF), SilentReporter())
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0 - trainer.timer.totals()[trainer.timer.names.index("eval")]
    return steps / wall


def run_sb3(steps: int) -> float:
    from stable_baselines3 import DQN

    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                exploration_fraction=0.16, exploration_final_eps=0.04, policy_kwargs={"net_arch": [256, 256]},
                seed=0, verbose=0, device="cpu")
    t0 = time.perf_counter()
    model.learn(steps)
    return steps / (time.perf_counter() - t0)


def bare_update_ms(n: int = 1000) -> float:
    """Forward, TD target, Huber loss, backward, Adam: the least a DQN update has to do."""
    from torch import nn

    net = nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    tgt = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    obs, nobs = torch.randn(64, 4), torch.randn(64, 4)
    a, r, d = torch.randint(0, 2, (64,)), torch.randn(64), torch.full((64,), 0.99)
    for i in range(n + 100):
        if i == 100:
            t0 = time.perf_counter()
        q = net(obs).gather(1, a[:, None]).squeeze(1)
        with torch.no_grad():
            y = r + d * tgt(nobs).max(1).values
        loss = nn.functional.smooth_l1_loss(q, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n * 1e3


def mpidqn_update_ms(n_rounds: int = 8) -> float:
    from mpidqn.learner import Hyper, Learner
    from mpidqn.networks import mlp_layers
    from mpidqn.replay import ReplayShard

    rs = ReplayShard(100_000, (4,), np.float32, 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 4)).astype(np.float32)
    for i in range(5000):
        rs.add(x[i : i + 1], rng.integers(2, size=1), np.ones(1, np.float32), x[i : i + 1], np.zeros(1, bool), np.zeros(1, bool))
    learner = Learner(torch.nn.Sequential(*mlp_layers(4, 2, [256, 256])),
                      Hyper(lr=1e-3, double_dqn=False, target_update_interval=128, sync_check_interval=0), MPI.COMM_SELF)
    learner.update_many(rs.sample_many(128, 64, rng), 128)
    t0 = time.perf_counter()
    for _ in range(n_rounds):
        learner.update_many(rs.sample_many(128, 64, rng), 128)
    return (time.perf_counter() - t0) / (128 * n_rounds) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours, sb3 = [], []
    for _ in range(args.repeats):
        ours.append(run_mpidqn(args.steps))
        sb3.append(run_sb3(args.steps))
    bare, upd = bare_update_ms(), mpidqn_update_ms()
    print(f"CartPole-v1, {args.steps} env steps, torch threads {args.threads}, {args.repeats} alternating repeats")
    print(f"{'':24}{'env-steps/s (median)':>22}")
    print(f"{'mpidqn (1 rank)':24}{np.median(ours):>22,.0f}")
    print(f"{'stable-baselines3 DQN':24}{np.median(sb3):>22,.0f}")
    print(f"ratio mpidqn / SB3: {np.median(ours) / np.median(sb3):.2f}x")
    print(f"one update: mpidqn {upd:.3f} ms vs bare torch loop {bare:.3f} ms ({upd / bare:.2f}x)")


if __name__ == "__main__":
    main()
