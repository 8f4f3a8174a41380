"""Single-rank training speed of mpidqn vs stable-baselines3 DQN, side by side in one run.

    pip install stable-baselines3   # only for this benchmark
    python benchmarks/speed.py [--workload cartpole|pong] [--steps N] [--threads 1] [--repeats 2]

Both sides get identical hyper-parameters (plain DQN target, Huber loss, grad-norm clip 10, Adam):
- cartpole: the rl-baselines3-zoo DQN CartPole settings: net [256, 256], batch 64, buffer 1e5,
  learning_starts 1000, train_freq 256, gradient_steps 128, lr 2.3e-3, exploration 0.16 -> 0.04,
  target refreshed once per round of updates (SB3 counts target_update_interval=10 in env steps, i.e.
  once per train call here; mpidqn counts in updates: 128).
- pong: ALE/Pong-v5 with the usual DQN settings of configs/pong.yaml: Nature CNN, 4 stacked 84x84
  frames, batch 32, train_freq 4, one update per round, lr 1e-4, target every 1000 env steps (SB3) =
  250 updates (mpidqn), exploration 1 -> 0.01 over 10% of the run; replay shortened for the benchmark
  (buffer 100k, learning_starts 5000). SB3 uses its Atari wrappers (noop reset, max-and-skip 4, 84x84
  gray, reward clip, fire reset) and its memory-optimised buffer, mpidqn gymnasium's
  AtariPreprocessing and its frame replay; both step the same ALE ROM with no sticky actions.

Columns: env-steps/s over a whole run (acting, env, replay, updates); updates/s of the update alone
(sample a batch from the filled buffer, forward, backward, optimizer), measured on each side's own
filled buffer after its run; and a bare torch loop doing the same forward/backward/Adam on a fixed
batch (no sampling), which is the least an update can cost. Runs alternate (mpidqn, SB3, mpidqn, ...)
so machine noise hits both alike; the figures are medians over the repeats.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI
from torch import nn


@dataclass(frozen=True)
class Workload:
    env_id: str
    config: str | None  # mpidqn config file (None: the embedded CartPole defaults)
    overrides: tuple[str, ...]
    steps: int
    batch: int
    gradient_steps: int
    update_rounds: int  # rounds of gradient_steps updates timed for updates/s


WORKLOADS = {
    "cartpole": Workload(
        "CartPole-v1", None,
        ("train.double_dqn=false", "train.target_update_interval=128", "train.lr_final_fraction=1.0",
         "train.max_grad_norm=10"),
        steps=20_000, batch=64, gradient_steps=128, update_rounds=8),
    "pong": Workload(
        "ALE/Pong-v5", "configs/pong.yaml",
        ("train.double_dqn=false", "train.target_update_interval=250", "train.buffer_size=100000",
         "train.learning_starts=5000", "train.device=cpu"),
        steps=20_000, batch=32, gradient_steps=1, update_rounds=300),
}


def run_mpidqn(w: Workload, steps: int) -> tuple[float, float]:
    """(env-steps/s of a whole run, updates/s of sample + update on the filled buffer)."""
    from mpidqn.config import load_config
    from mpidqn.train.reporting import SilentReporter
    from mpidqn.distributed.topology import Topology
    from mpidqn.train.loop import Trainer

    cfg = load_config(w.config, [
        *w.overrides, f"train.total_steps={steps}", "eval.interval_steps=0", "eval.episodes=1",
        f"parallel.torch_threads={torch.get_num_threads()}", "parallel.sync_check_interval=0"])
    trainer = Trainer(cfg, Topology.build(MPI.COMM_SELF), SilentReporter())
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0 - trainer.timer.totals()[trainer.timer.names.index("eval")]
    rng = np.random.default_rng(0)
    g, b = w.gradient_steps, w.batch

    def round_() -> None:
        trainer.learner.update_many(trainer.replay.sample_many(g, b, rng), g)

    return steps / wall, g / _median_seconds(round_, w.update_rounds)


def _sb3_model(w: Workload):
    from stable_baselines3 import DQN

    if w.env_id == "CartPole-v1":
        return DQN("MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                   learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256,
                   gradient_steps=128, exploration_fraction=0.16, exploration_final_eps=0.04,
                   policy_kwargs={"net_arch": [256, 256]}, seed=0, verbose=0, device="cpu")
    import ale_py
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    env = VecFrameStack(make_atari_env(w.env_id, n_envs=1, seed=0,
                                       env_kwargs={"frameskip": 1, "repeat_action_probability": 0.0}), 4)
    return DQN("CnnPolicy", env, learning_rate=1e-4, batch_size=32, buffer_size=100_000, learning_starts=5000,
               gamma=0.99, target_update_interval=1000, train_freq=4, gradient_steps=1,
               exploration_fraction=0.1, exploration_final_eps=0.01, max_grad_norm=10,
               optimize_memory_usage=True, replay_buffer_kwargs={"handle_timeout_termination": False},
               seed=0, verbose=0, device="cpu")


def run_sb3(w: Workload, steps: int) -> tuple[float, float]:
    model = _sb3_model(w)
    t0 = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - t0
    g, b = w.gradient_steps, w.batch
    return steps / wall, g / _median_seconds(lambda: model.train(gradient_steps=g, batch_size=b), w.update_rounds)


def _median_seconds(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bare_updates_per_s(w: Workload, n: int = 300) -> float:
    """Forward, TD target, Huber loss, backward, clip, Adam on a fixed batch: the least an update does."""
    if w.env_id == "CartPole-v1":
        net = nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
        obs, nobs, actions = torch.randn(w.batch, 4), torch.randn(w.batch, 4), 2
    else:
        net = nn.Sequential(nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
                            nn.Linear(512, 6))
        obs = torch.randint(0, 256, (w.batch, 4, 84, 84), dtype=torch.uint8)
        nobs, actions = obs.clone(), 6
    tgt = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    a, r, d = torch.randint(0, actions, (w.batch,)), torch.randn(w.batch), torch.full((w.batch,), 0.99)

    def update() -> None:
        x, nx = (obs.float() / 255, nobs.float() / 255) if obs.dtype == torch.uint8 else (obs, nobs)
        q = net(x).gather(1, a[:, None]).squeeze(1)
        with torch.no_grad():
            y = r + d * tgt(nx).max(1).values
        loss = nn.functional.smooth_l1_loss(q, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()

    return 1.0 / _median_seconds(update, n, warmup=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="cartpole")
    p.add_argument("--steps", type=int, default=None, help="env steps per run (default: the workload's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    w = WORKLOADS[args.workload]
    steps = args.steps or w.steps
    torch.set_num_threads(args.threads)
    ours, sb3 = [], []
    for _ in range(args.repeats):
        ours.append(run_mpidqn(w, steps))
        sb3.append(run_sb3(w, steps))
    bare = bare_updates_per_s(w)
    (o_env, o_upd), (s_env, s_upd) = np.median(ours, axis=0), np.median(sb3, axis=0)
    print(f"{w.env_id}, {steps} env steps per run, torch threads {args.threads}, {args.repeats} alternating "
          f"repeats, batch {w.batch}")
    print(f"{'':24}{'env-steps/s':>14}{'updates/s':>12}")
    print(f"{'mpidqn (1 rank)':24}{o_env:>14,.0f}{o_upd:>12,.0f}")
    print(f"{'stable-baselines3 DQN':24}{s_env:>14,.0f}{s_upd:>12,.0f}")
    print(f"{'bare torch update':24}{'':>14}{bare:>12,.0f}")
    print(f"ratio mpidqn / SB3: env-steps/s {o_env / s_env:.2f}x, updates/s {o_upd / s_upd:.2f}x; "
          f"mpidqn update / bare loop {o_upd / bare:.2f}x")


if __name__ == "__main__":
    main()
