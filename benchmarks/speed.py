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
batch (no sampling), which is the least an update can cost. All three update rates are timed in the
same unit, rounds of ``gradient_steps`` updates. Runs alternate (mpidqn, SB3, mpidqn, ...) so machine
noise hits both alike; the figures are medians over the repeats.

Every rate is given twice: per wall-clock second, and per CPU second of this process
(``time.process_time``). On a machine shared with other jobs, wall time includes the time the
scheduler gave to others (a round of updates that spans a time slice looks several times slower than
it is), while CPU time counts only this process's work; both sides run single-process with the same
torch threads, so the CPU ratios compare the work each side does.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI
from replay_priority import cpu_model  # the sibling script (python benchmarks/speed.py)
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
        ("train.double_dqn=false", "train.n_step=1", "train.target_update_interval=128",
         "train.lr_final_fraction=1.0", "train.max_grad_norm=10"),
        steps=20_000, batch=64, gradient_steps=128, update_rounds=8),
    "pong": Workload(
        "ALE/Pong-v5", "configs/pong.yaml",
        ("train.double_dqn=false", "train.target_update_interval=250", "train.buffer_size=100000",
         "train.learning_starts=5000", "train.device=cpu"),
        steps=20_000, batch=32, gradient_steps=1, update_rounds=300),
}


def run_mpidqn(w: Workload, steps: int) -> np.ndarray:
    """Wall and CPU rates: (env-steps/s of a whole run, updates/s of sample + update on the filled
    buffer) per wall second, then the same per CPU second."""
    from mpidqn.config import load_config
    from mpidqn.distributed.topology import Topology
    from mpidqn.train.loop import Trainer
    from mpidqn.train.reporting import SilentReporter

    cfg = load_config(w.config, [
        *w.overrides, f"train.total_steps={steps}", "eval.interval_steps=0", "eval.episodes=1",
        f"parallel.torch_threads={torch.get_num_threads()}", "parallel.sync_check_interval=0"])
    trainer = Trainer(cfg, Topology.build(MPI.COMM_SELF), SilentReporter())
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    evaluation = trainer.timer.totals()[trainer.timer.names.index("eval")]
    rng = np.random.default_rng(0)
    g, b = w.gradient_steps, w.batch

    def round_() -> None:
        trainer.learner.update_many(trainer.replay.sample_many(g, b, rng), g)

    round_wall, round_cpu = _median_seconds(round_, w.update_rounds)
    # the (1-episode) evaluations are excluded from the wall time; their CPU time is too small to matter
    return np.array([steps / (wall - evaluation), g / round_wall, steps / cpu, g / round_cpu])


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


def run_sb3(w: Workload, steps: int) -> np.ndarray:
    model = _sb3_model(w)
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    g, b = w.gradient_steps, w.batch
    round_wall, round_cpu = _median_seconds(lambda: model.train(gradient_steps=g, batch_size=b), w.update_rounds)
    return np.array([steps / wall, g / round_wall, steps / cpu, g / round_cpu])


def _median_seconds(fn, n: int, warmup: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``n`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def bare_update(w: Workload, device: str = "cpu", reduce=None):
    """One update of the bare loop on ``device``: forward, TD target, Huber loss, backward, clip, Adam on
    a fixed batch already there, the least an update does. ``reduce(params)``, if given, runs between
    backward and clip (bare_dp.py's gradient Allreduce)."""
    dev = torch.device(device)
    if w.env_id == "CartPole-v1":
        net = nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
        obs, nobs, actions = torch.randn(w.batch, 4), torch.randn(w.batch, 4), 2
    else:
        net = nn.Sequential(nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
                            nn.Linear(512, 6))
        obs = torch.randint(0, 256, (w.batch, 4, 84, 84), dtype=torch.uint8)
        nobs, actions = obs.clone(), 6
    net, obs, nobs = net.to(dev), obs.to(dev), nobs.to(dev)
    tgt = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    a = torch.randint(0, actions, (w.batch,), device=dev)
    r, d = torch.randn(w.batch, device=dev), torch.full((w.batch,), 0.99, device=dev)

    def update() -> None:
        x, nx = (obs.float() / 255, nobs.float() / 255) if obs.dtype == torch.uint8 else (obs, nobs)
        q = net(x).gather(1, a[:, None]).squeeze(1)
        with torch.no_grad():
            y = r + d * tgt(nx).max(1).values
        loss = nn.functional.smooth_l1_loss(q, y)
        opt.zero_grad()
        loss.backward()
        if reduce is not None:
            reduce(list(net.parameters()))
        nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()

    return update


def bare_updates_per_s(w: Workload) -> tuple[float, float]:
    """(per wall second, per CPU second) updates of the bare loop (:func:`bare_update`), timed in rounds
    of ``gradient_steps`` updates like the two trainers (at least 8 updates a round)."""
    update = bare_update(w)
    per_round = max(w.gradient_steps, 8)

    def round_() -> None:
        for _ in range(per_round):
            update()

    round_wall, round_cpu = _median_seconds(round_, max(w.update_rounds, 300 // per_round))
    return per_round / round_wall, per_round / round_cpu


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
    o, s = np.median(ours, axis=0), np.median(sb3, axis=0)
    print(f"{w.env_id}, {steps} env steps per run, torch threads {args.threads}, {args.repeats} alternating "
          f"repeats, batch {w.batch}, CPU: {cpu_model()}")
    print(f"{'':24}{'env-steps/s':>14}{'updates/s':>12}{'env-steps/CPU-s':>18}{'updates/CPU-s':>15}")
    print(f"{'mpidqn (1 rank)':24}{o[0]:>14,.0f}{o[1]:>12,.0f}{o[2]:>18,.0f}{o[3]:>15,.0f}")
    print(f"{'stable-baselines3 DQN':24}{s[0]:>14,.0f}{s[1]:>12,.0f}{s[2]:>18,.0f}{s[3]:>15,.0f}")
    print(f"{'bare torch update':24}{'':>14}{bare[0]:>12,.0f}{'':>18}{bare[1]:>15,.0f}")
    for label, k in (("per wall second", 0), ("per CPU second ", 2)):
        print(f"ratios {label}: mpidqn / SB3 env-steps {o[k] / s[k]:.2f}x, updates {o[k + 1] / s[k + 1]:.2f}x; "
              f"mpidqn update / bare loop {o[k + 1] / bare[k // 2]:.2f}x")


if __name__ == "__main__":
    main()
