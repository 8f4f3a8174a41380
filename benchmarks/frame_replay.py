"""Frame-deduplicated replay vs SB3's ReplayBuffer on Atari-shaped data (4x84x84 uint8): sampling
throughput at the same batch size, and bytes per transition.

    python benchmarks/frame_replay.py [--fill 20000] [--batch 32] [--repeats 2000]

SB3 (stable-baselines3, only needed here) returns torch tensors; the frame shard returns numpy arrays
that torch.from_numpy wraps without a copy, so both timings include getting a torch batch.
Memory of a 1M-transition shard is reported from the preallocated sizes (np.zeros is lazy).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mpidqn.replay.frames import FrameReplayShard
from mpidqn.replay.shard import ReplayShard

SHAPE = (4, 84, 84)


def episodes(steps: int, rng: np.random.Generator, length: int = 800):
    """Stacked observations of synthetic episodes (random frames), as FrameStackObservation gives them."""
    stack = None
    for t in range(steps + 1):
        start = t % length == 0
        frame = rng.integers(0, 256, SHAPE[1:], dtype=np.uint8)
        stack = np.stack([frame] * 4) if start else np.concatenate([stack[1:], frame[None]])
        yield stack, start


def fill_frames(n: int, rng: np.random.Generator) -> FrameReplayShard:
    shard = FrameReplayShard(n, SHAPE, np.uint8, 1, 1, 0.99, 4)
    prev = None
    for obs, start in episodes(n + n // 800 + 2, rng):
        if prev is not None and not start:
            shard.add(prev[None], [0], [1.0], obs[None], [False], [False])
        prev = obs
    return shard


def fill_sb3(n: int, rng: np.random.Generator, optimize: bool):
    from gymnasium import spaces
    from stable_baselines3.common.buffers import ReplayBuffer

    buf = ReplayBuffer(n, spaces.Box(0, 255, SHAPE, np.uint8), spaces.Discrete(6), "cpu",
                       optimize_memory_usage=optimize, handle_timeout_termination=False)
    prev = None
    for obs, start in episodes(n, rng):
        if prev is not None:
            buf.add(prev[None], obs[None], np.array([0]), np.array([1.0]), np.array([start]), [{}])
        prev = obs
    return buf


def timeit(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fill", type=int, default=20000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2000)
    a = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    shard = fill_frames(a.fill, rng)
    srng = np.random.default_rng(1)
    out = shard.empty_batch(a.batch)

    def frames_sample():
        b = shard.sample(a.batch, srng, out)
        return torch.from_numpy(b.obs), torch.from_numpy(b.next_obs)

    rows = {"mpidqn FrameReplayShard": (timeit(frames_sample, a.repeats), shard.nbytes() / a.fill)}
    naive = ReplayShard(1, SHAPE, np.uint8, 1)
    naive_bytes = sum(v.nbytes for v in naive._ring.arrays.values())
    for optimize in (False, True):
        buf = fill_sb3(a.fill, np.random.default_rng(0), optimize)
        per = (buf.observations.nbytes + (0 if optimize else buf.next_observations.nbytes)
               + buf.actions.nbytes + buf.rewards.nbytes + buf.dones.nbytes + buf.timeouts.nbytes) / a.fill
        rows[f"SB3 ReplayBuffer optimize_memory_usage={optimize}"] = (timeit(lambda: buf.sample(a.batch), a.repeats), per)
        buf = None  # freed before the next fill
    print(f"fill {a.fill:,} transitions of {SHAPE} uint8, batch {a.batch}, {a.repeats} samples each, 1 thread")
    print(f"{'buffer':<46} {'us/batch':>9} {'batches/s':>10} {'B/transition':>13} {'1M transitions':>15}")
    for name, (sec, per) in rows.items():
        print(f"{name:<46} {sec * 1e6:9.1f} {1 / sec:10.0f} {per:13,.0f} {per * 1e6 / 1e9:12.2f} GB")
    big = FrameReplayShard(1_000_000, SHAPE, np.uint8, 1, 1, 0.99, 4)  # lazily allocated, not touched
    print(f"{'mpidqn ReplayShard (obs + next_obs)':<46} {'':>9} {'':>10} {naive_bytes:13,.0f} "
          f"{naive_bytes * 1e6 / 1e9:12.2f} GB")
    print(f"1M-transition FrameReplayShard (1 env, n=1): {big.nbytes() / 1e9:.2f} GB "
          f"({big.frame_capacity:,} frames of 7,056 B + pointers + row fields)")


if __name__ == "__main__":
    main()
