"""Greedy evaluation episodes, spread over the ranks of a communicator, seeded per episode."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from mpidqn.envs import make_env

_EVAL_STREAM = 0xE7A1  # keeps evaluation seeds apart from the training streams of the same root seed


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """Seeds of evaluation episodes 0..episodes-1: independent of the world size."""
    return [int(s) for s in np.random.SeedSequence([seed, _EVAL_STREAM]).generate_state(episodes, dtype=np.uint32)]


def run_episode(policy: Callable[[np.ndarray], np.ndarray], env: Any, seed: int) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    total, length, done = 0.0, 0, False
    while not done:
        action = int(policy(obs[None])[0])
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        length += 1
        done = terminated or truncated
    return total, length


def evaluate_policy(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    episodes: int,
    seed: int,
    comm: Any = MPI.COMM_SELF,
    max_episode_steps: int | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Run ``episodes`` greedy episodes; episode i runs on rank i % size. Same result on every rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    seeds = episode_seeds(seed, episodes)
    env = make_env(env_id, max_episode_steps)
    try:
        mine = [(i, *run_episode(policy, env, seeds[i])) for i in range(rank, episodes, size)]
    finally:
        env.close()
    rows = sorted(r for part in (comm.allgather(mine) if size > 1 else [mine]) for r in part)
    returns = np.array([r[1] for r in rows], dtype=np.float64)
    return {
        "step": int(step),
        "episodes": len(rows),
        "mean": float(returns.mean()),
        "std": float(returns.std()),
        "min": float(returns.min()),
        "max": float(returns.max()),
        "returns": returns.tolist(),
        "lengths": [int(r[2]) for r in rows],
    }
