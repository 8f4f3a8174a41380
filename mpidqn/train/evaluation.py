"""Greedy evaluation episodes, spread over the ranks of a communicator, seeded per episode."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.distributed import watchdog
from mpidqn.envs.presets import spec_from_config
from mpidqn.envs.vector import make_env
from mpidqn.learners.base import QLearner

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
    wrap_env: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` greedy episodes; episode i runs on rank i % size. Same result on every rank.

    ``wrap_env`` wraps this rank's env (e.g. a video recorder; see mpidqn.envs.video)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    seeds = episode_seeds(seed, episodes)
    env = make_env(env_id, max_episode_steps)
    env = wrap_env(env) if wrap_env is not None else env
    try:
        mine = [(i, *run_episode(policy, env, seeds[i])) for i in range(rank, episodes, size)]
    finally:
        env.close()
    return summarize(mine, comm, step)


def evaluate_group_policy(
    group_policy: Callable[[np.ndarray], tuple[np.ndarray, int]],
    env_id: str,
    episodes: int,
    seed: int,
    comm: Any,
    max_episode_steps: int | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Like :func:`evaluate_policy` for a policy that is a collective over a group of ranks (a pipeline).

    ``group_policy(obs)`` takes this rank's rows (0 or 1 here) and returns this rank's actions and the
    group's total rows; every rank keeps calling it, with no rows once its own episodes are over,
    until the total is 0. Episode i runs on rank i % size of ``comm``: the same seeds, hence the same
    returns for the same network, as :func:`evaluate_policy`.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    seeds = episode_seeds(seed, episodes)
    todo = list(range(rank, episodes, size))
    env = make_env(env_id, max_episode_steps)
    mine: list[tuple[int, float, int]] = []
    try:
        obs = None
        while True:
            if obs is None and todo:
                current, (obs, _) = todo[0], env.reset(seed=seeds[todo[0]])
                todo.pop(0)
                total, length = 0.0, 0
            rows = obs[None] if obs is not None else np.zeros((0, *env.observation_space.shape), np.float32)
            actions, group_rows = group_policy(rows)
            if group_rows == 0:
                break
            if obs is not None:
                obs, reward, terminated, truncated, _ = env.step(int(actions[0]))
                total += float(reward)
                length += 1
                if terminated or truncated:
                    mine.append((current, total, length))
                    obs = None
    finally:
        env.close()
    return summarize(mine, comm, step)


def summarize(mine: list[tuple[int, float, int]], comm: Any, step: int) -> dict[str, Any]:
    """Every rank's (episode, return, length) rows -> the evaluation result, the same on every rank."""
    size = comm.Get_size()
    with watchdog.guard(comm, "evaluation gather"):
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


def evaluate_learner(learner: QLearner, cfg: Any, topo: Any, step: int) -> dict[str, Any]:
    """Greedy evaluation on all ranks, with the learner's evaluation weights (the moving average of the
    parameters with train.ema_decay); a collective policy (a pipeline) runs episodes through its group's
    stages."""
    policy = learner.greedy_policy()
    spec = spec_from_config(cfg.env, evaluation=True)
    args = (cfg.eval.episodes, cfg.seed)
    with learner.evaluation_weights():
        if policy.collective:
            with torch.no_grad():
                return evaluate_group_policy(policy.act, spec, *args, topo.comm, cfg.env.max_episode_steps, step=step)
        return evaluate_policy(policy.act, spec, *args, topo.dp_comm, cfg.env.max_episode_steps, step=step)
