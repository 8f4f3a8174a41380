"""Environment construction: gymnasium ids, vector envs per rank, per-rank seeding."""
from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from mpidqn.errors import UserError


def _register_optional(env_id: str) -> None:
    """Import the packages that register optional env families (Atari, MinAtar)."""
    try:
        if env_id.startswith("ALE/"):
            import ale_py

            gym.register_envs(ale_py)
        elif env_id.startswith("MinAtar/"):
            from minatar import gym as minatar_gym

            minatar_gym.register_envs()
    except ImportError as e:
        raise UserError(f"env.id: {env_id} needs an optional package that is not installed ({e.name})") from None


def _make_kwargs(max_episode_steps: int | None) -> dict[str, Any]:
    return {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}


def check_env_id(env_id: str) -> None:
    """Raise UserError with one line when ``env_id`` cannot be built or has no discrete actions."""
    env = make_env(env_id)
    try:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise UserError(f"env.id: {env_id} has action space {env.action_space}; DQN needs Discrete actions")
    finally:
        env.close()


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """One environment (evaluation, inspection), with a clear error for unknown ids."""
    _register_optional(env_id)
    try:
        return gym.make(env_id, **_make_kwargs(max_episode_steps))
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"env.id: {env_id} needs an optional dependency: {str(e).splitlines()[0]}") from None
    except gym.error.Error as e:
        raise UserError(f"env.id: cannot make {env_id!r}: {str(e).splitlines()[0]}") from None


def make_vector_env(env_id: str, num_envs: int, max_episode_steps: int | None = None) -> gym.vector.VectorEnv:
    """``num_envs`` synchronous copies with same-step autoreset: when a sub-env ends, ``step`` returns
    the first observation of the next episode and ``info["final_obs"]`` holds the true last one."""
    make_env(env_id, max_episode_steps).close()  # one clear error for bad ids before spawning copies
    # functools.partial (not a closure) keeps the vector env picklable for exact checkpoints.
    fns = [functools.partial(gym.make, env_id, **_make_kwargs(max_episode_steps)) for _ in range(num_envs)]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)


def true_next_obs(next_obs: np.ndarray, done: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The observation each transition really ended in (final obs for finished sub-envs)."""
    if not done.any():
        return next_obs
    out = next_obs.copy()
    for i in np.flatnonzero(done):
        out[i] = info["final_obs"][i]
    return out


def spawn_seeds(root_seed: int, world: int, rank: int, epoch: int = 0) -> dict[str, np.random.SeedSequence]:
    """Independent seed sequences for this rank, all derived from one root seed.

    ``SeedSequence([root_seed, epoch]).spawn(world)[rank]`` is this rank's sequence; ``epoch`` is 0 for
    a fresh run and the resumed global step after an elastic resume (a different world size), so the
    streams are re-derived deterministically. Children: env, explore, replay, eval.
    """
    entropy = [root_seed] if epoch == 0 else [root_seed, epoch]
    rank_seq = np.random.SeedSequence(entropy).spawn(world)[rank]
    env, explore, replay, evaluate = rank_seq.spawn(4)
    return {"env": env, "explore": explore, "replay": replay, "eval": evaluate}


def env_reset_seeds(seq: np.random.SeedSequence, num_envs: int) -> list[int]:
    """Integer seeds for the first reset of each sub-env."""
    return [int(s) for s in seq.generate_state(num_envs, dtype=np.uint32)]
