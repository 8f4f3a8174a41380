"""Environment construction: gymnasium ids, vector envs per rank, per-rank seeding."""
from __future__ import annotations

import functools
import pickle
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import EzPickle
from gymnasium.vector import AutoresetMode

from mpidqn.envs.pool import EnvPoolVectorEnv, check_envpool
from mpidqn.envs.presets import EnvSpec, build_env, infer_preset
from mpidqn.errors import UserError
from mpidqn.extras import missing


def _register_optional(env_id: str) -> None:
    """Import the packages that register optional env families (Atari, MinAtar)."""
    if env_id in gym.registry:
        return
    try:
        if env_id.startswith("ALE/"):
            import ale_py

            gym.register_envs(ale_py)
        elif env_id.startswith("MinAtar/"):
            from minatar import gym as minatar_gym

            minatar_gym.register_envs()
    except ImportError as e:
        raise UserError(missing(f"env.id: {env_id}", e.name or str(e))) from None


def env_module(env_id: str) -> str | None:
    """The module gymnasium imports, running its code, to make ``env_id`` ("module:Env-v0"), or None."""
    return env_id.split(":", 1)[0] if ":" in env_id else None


def check_env_module_trusted(env_id: str, source: str, trusted: bool) -> None:
    """An env id read from a run directory (``source``) may name a module to import only when the user
    trusts that run directory; raise UserError otherwise (issue #37)."""
    module = env_module(env_id)
    if module is not None and not trusted:
        raise UserError(f"env.id {env_id!r} in {source} imports the Python module {module!r}, which runs its code; "
                        "pass --trust-run-dir if you trust whoever wrote the run directory")


def _make_kwargs(max_episode_steps: int | None) -> dict[str, Any]:
    return {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}


def as_spec(env: str | EnvSpec, max_episode_steps: int | None = None) -> EnvSpec:
    """An EnvSpec for a bare id (preset inferred from the id, no further options) or the spec itself."""
    if isinstance(env, EnvSpec):
        return env
    return EnvSpec(env, infer_preset(env), max_episode_steps, frame_stack=4 if env.startswith("ALE/") else 1)


def check_env_id(env: str | EnvSpec, backend: str = "gymnasium") -> None:
    """Raise UserError with one line when ``env`` cannot be built or has no discrete actions (with
    ``backend`` envpool: also when EnvPool is missing or lacks the game; evaluation still builds the
    gymnasium env)."""
    if backend == "envpool":
        check_envpool(as_spec(env))
    env_id = as_spec(env).id
    env = make_env(env)
    try:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise UserError(f"env.id: {env_id} has action space {env.action_space}; DQN needs Discrete actions")
    finally:
        env.close()


def make_env(env: str | EnvSpec, max_episode_steps: int | None = None) -> gym.Env:
    """One environment (evaluation, inspection), with a clear error for unknown ids.

    ``env`` is a gymnasium id (``max_episode_steps`` applies) or an EnvSpec (its own settings apply).
    """
    if not isinstance(env, EnvSpec):
        if infer_preset(env) != "none":  # Atari/MinAtar ids get their preset's wrappers
            return make_env(as_spec(env, max_episode_steps))
        _register_optional(env)
        env_id, build = env, functools.partial(gym.make, env, **_make_kwargs(max_episode_steps))
    else:
        _register_optional(env.id)
        env_id, build = env.id, functools.partial(build_env, env)
    try:
        return build()
    except gym.error.DependencyNotInstalled as e:
        if "box2d" in str(e).lower():
            raise UserError(missing(f"env.id: {env_id}", "Box2D")) from None
        raise UserError(f"env.id: {env_id} needs an optional dependency: {str(e).splitlines()[0]}") from None
    except gym.error.Error as e:
        raise UserError(f"env.id: cannot make {env_id!r}: {str(e).splitlines()[0]}") from None


def make_vector_env(env: str | EnvSpec, num_envs: int, max_episode_steps: int | None = None,
                    asynchronous: bool = False, backend: str = "gymnasium") -> gym.vector.VectorEnv:
    """``num_envs`` copies with same-step autoreset: when a sub-env ends, ``step`` returns
    the first observation of the next episode and ``info["final_obs"]`` holds the true last one.

    Synchronous by default (picklable: checkpoints resume episodes exactly). ``asynchronous``: one
    subprocess per copy (gymnasium AsyncVectorEnv), for expensive envs; such a vector env cannot be
    pickled, so checkpoints do not hold it and a resume starts new episodes (see ``pickle_envs``).
    ``backend`` envpool (Atari only): one EnvPool of ``num_envs`` copies in C++ threads
    (:class:`mpidqn.envs.pool.EnvPoolVectorEnv`, not picklable either).
    """
    if backend == "envpool":
        return EnvPoolVectorEnv(as_spec(env, max_episode_steps), num_envs)
    make_env(env, max_episode_steps).close()  # one clear error for bad ids before spawning copies
    # functools.partial (not a closure) keeps the vector env picklable for exact checkpoints.
    if isinstance(env, EnvSpec) or infer_preset(env) != "none":
        fns = [functools.partial(build_env, as_spec(env, max_episode_steps)) for _ in range(num_envs)]
    else:
        fns = [functools.partial(gym.make, env, **_make_kwargs(max_episode_steps)) for _ in range(num_envs)]
    if asynchronous:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)


def pickle_envs(envs: gym.vector.VectorEnv) -> bytes:
    """The pickled vector env for an exact checkpoint; empty when the envs' state cannot be pickled, and
    a resume then starts new episodes:

    * async envs live in subprocesses, an EnvPool in C++ threads;
    * envs that pickle through ``EzPickle`` (Box2D's LunarLander, ALE's Atari) pickle their
      constructor arguments, not their state: unpickled, they are un-reset (LunarLander's first step
      fails with ``assert self.lander is not None``).
    """
    if isinstance(envs, (gym.vector.AsyncVectorEnv, EnvPoolVectorEnv)):
        return b""
    if any(isinstance(env.unwrapped, EzPickle) for env in getattr(envs, "envs", ())):
        return b""
    return pickle.dumps(envs)


def true_next_obs(next_obs: np.ndarray, done: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The observation each transition really ended in (final obs for finished sub-envs)."""
    if not done.any():
        return next_obs
    out = next_obs.copy()
    for i in np.flatnonzero(done):
        out[i] = info["final_obs"][i]
    return out


SHARED_STREAM_KEY = 2**32 - 1  # spawn key of the shared stream; rank streams use keys 0..world-1


def _entropy(root_seed: int, epoch: int) -> list[int]:
    return [root_seed] if epoch == 0 else [root_seed, epoch]


def shared_seed(root_seed: int, epoch: int = 0) -> np.random.SeedSequence:
    """The seed of the stream every rank draws the same values from (e.g. the split of a global batch
    over the replay shards); ``epoch`` as in :func:`spawn_seeds`."""
    return np.random.SeedSequence(_entropy(root_seed, epoch), spawn_key=(SHARED_STREAM_KEY,))


ACTING_NOISE_KEY = 2**32 - 2  # spawn key of the ranks' acting-noise streams (noisy nets)


def acting_noise_seed(root_seed: int, rank: int, epoch: int = 0) -> np.random.SeedSequence:
    """The seed of this rank's acting-noise stream (network.noisy); ``epoch`` as in :func:`spawn_seeds`.
    Apart from the rank streams of :func:`spawn_seeds`, so a run without noisy nets draws as before."""
    return np.random.SeedSequence(_entropy(root_seed, epoch), spawn_key=(ACTING_NOISE_KEY, rank))


def spawn_seeds(root_seed: int, world: int, rank: int, epoch: int = 0) -> dict[str, np.random.SeedSequence]:
    """Independent seed sequences for this rank, all derived from one root seed.

    ``SeedSequence([root_seed, epoch]).spawn(world)[rank]`` is this rank's sequence; ``epoch`` is 0 for
    a fresh run and the resumed global step after an elastic resume (a different world size), so the
    streams are re-derived deterministically. Children: env, explore, replay (evaluation episodes are
    seeded apart from these, by ``train.evaluation.episode_seeds``).
    """
    rank_seq = np.random.SeedSequence(_entropy(root_seed, epoch)).spawn(world)[rank]
    env, explore, replay = rank_seq.spawn(3)  # the first children of spawn(n) do not depend on n
    return {"env": env, "explore": explore, "replay": replay}


def env_reset_seeds(seq: np.random.SeedSequence, num_envs: int) -> list[int]:
    """Integer seeds for the first reset of each sub-env."""
    return [int(s) for s in seq.generate_state(num_envs, dtype=np.uint32)]
