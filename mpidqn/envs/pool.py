"""EnvPool backend for Atari (``env.backend: envpool``, ``pip install -e ".[envpool]"``).

:class:`EnvPoolVectorEnv` runs a rank's ``num_envs`` Atari copies in EnvPool's C++ thread pool
(https://github.com/sail-sg/envpool, checked with envpool 1.2.5) behind the part of gymnasium's
``VectorEnv`` surface the trainer uses: ``reset(seed=...)``, ``step`` with SAME-STEP autoreset (a
finished sub-env's row of the returned obs is already the first obs of its next episode,
``info["final_obs"]`` holds the true last one) and the ``single_*`` spaces.

EnvPool options, chosen so that the frames equal the gymnasium preset's (``presets._atari``)::

    noop_max=30 (1..30 no-ops at reset, as AtariPreprocessing)   frame_skip=4 (max over the last 2 frames)
    img_height=img_width=84, gray_scale=True, use_inter_area_resize=True (cv2 INTER_AREA, as gymnasium)
    stack_num=frame_stack (reset padding repeats the reset frame, as FrameStackObservation "reset")
    repeat_action_probability=sticky_actions (None: 0.25, ALE v5's default; EnvPool's own default is 0)
    reward_clip=clip_rewards (sign of the reward: equal to clipping to [-1, 1] for Atari's integer rewards)
    use_fire_reset=False (EnvPool presses FIRE after reset by default; gymnasium's preset does not)
    episodic_life=False (see below), full_action_space=False (the minimal set, as ALE v5)
    max_episode_steps=env.max_episode_steps, None: 27000 agent steps (ALE v5's 108000 frames)

With sticky actions off and one no-op, EnvPool's observations, rewards and ends equal gymnasium's pixel
for pixel (tests/envs/test_envpool.py checks Pong, Breakout and Space Invaders), so evaluation, which
always plays gymnasium's ALE (``evaluation.py``), scores the policy on the frames it was trained on.

Semantic differences from the gymnasium backend:

* Autoreset: EnvPool's own mode is NEXT-STEP (the step after an end ignores the action and returns the
  reset obs). This class resets finished sub-envs at once (``reset(env_id)``) to give the trainer the
  same-step contract; the reset costs one more round trip through the pool, on steps where an
  episode ended only.
* Life loss (``env.terminal_on_life_loss``): EnvPool's ``episodic_life`` ends the episode but goes on
  playing the same game on the next reset (DeepMind's EpisodicLifeEnv), whereas gymnasium's
  AtariPreprocessing ends it and the vector env's autoreset restarts the game (every episode is the
  game's first life). This class keeps gymnasium's meaning: ``episodic_life`` stays off, a drop of
  ``info["lives"]`` sets ``terminated`` and the reset restarts the game. Gymnasium notices the loss
  on the frame it happens and stops the frame skip there; EnvPool finishes the 4 frames (up to 3
  frames more reward and a later terminal frame, on life-loss steps only).
* Time limit: EnvPool counts agent steps after the reset no-ops; ALE's 108000-frame limit counts the
  no-op frames too (an episode may run up to 7 agent steps longer). A game that ends on the last
  allowed step is ``truncated`` only (gymnasium's TimeLimit: terminated and truncated).
* Seeds: EnvPool seeds each copy when the pool is built (``env_seed``, int32), not in ``reset``. A
  ``reset(seed=...)`` therefore builds a new pool (the trainer does that at the start and on a resume);
  a seed ``s`` becomes ``s % 2**31``. The per-rank seeds are those of ``vector.env_reset_seeds`` as
  for gymnasium, but EnvPool's ALE and no-op draws use them differently: the two backends do not play
  the same episodes for one seed.
* Threads: each rank's pool starts ``min(num_envs, cores)`` threads (EnvPool's default); at several
  ranks per node they compete for the same cores.
* Checkpoints: the pool cannot be pickled (like ``env.async_envs: true``): a resume starts new
  episodes (seeded from the seed and the resumed step) and drops pending n-step steps; model,
  optimizer and replay resume exactly.
"""
from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from mpidqn.envs.presets import EnvSpec
from mpidqn.errors import UserError
from mpidqn.extras import missing

ALE_V5_STICKY = 0.25  # repeat_action_probability of gymnasium's ALE/...-v5 ids
ALE_V5_MAX_STEPS = 27_000  # ALE/...-v5's max_num_frames_per_episode=108000 at frame skip 4


def envpool_task(env_id: str) -> str:
    """EnvPool's id of an ALE id: ``ALE/Pong-v5`` -> ``Pong-v5``."""
    return env_id.removeprefix("ALE/")


def _import_envpool() -> Any:
    try:
        import envpool
    except ImportError as e:
        raise UserError(missing("env.backend: envpool", e.name or "envpool")) from None
    return envpool


def check_envpool(spec: EnvSpec) -> None:
    """Raise UserError with one line when EnvPool cannot build ``spec``'s game."""
    envpool = _import_envpool()
    if spec.preset != "atari" or not spec.id.startswith("ALE/"):
        raise UserError(f"env.backend: envpool serves Atari ids (ALE/...) with preset atari, got {spec.id!r}")
    task = envpool_task(spec.id)
    if task not in envpool.list_all_envs():
        raise UserError(f"env.backend: EnvPool {envpool.__version__} has no {task!r} for env.id={spec.id} "
                        "(it serves ALE/<Game>-v5 ids; envpool.list_all_envs() lists them)")


def envpool_options(spec: EnvSpec) -> dict[str, Any]:
    """The ``envpool.make`` options that reproduce the gymnasium Atari preset (module docstring)."""
    return {
        "noop_max": spec.noop_max, "frame_skip": 4, "img_height": 84, "img_width": 84, "gray_scale": True,
        "use_inter_area_resize": True, "stack_num": spec.frame_stack, "reward_clip": spec.clip_rewards,
        "repeat_action_probability": ALE_V5_STICKY if spec.sticky_actions is None else spec.sticky_actions,
        "use_fire_reset": False, "episodic_life": False, "zero_discount_on_life_loss": False,
        "full_action_space": False,
        "max_episode_steps": ALE_V5_MAX_STEPS if spec.max_episode_steps is None else spec.max_episode_steps,
    }


class EnvPoolVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` copies of an Atari game in one EnvPool, with same-step autoreset (module docstring)."""

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, spec: EnvSpec, num_envs: int) -> None:
        check_envpool(spec)
        self._envpool = _import_envpool()
        self.env_spec, self.num_envs = spec, num_envs
        self._task, self._options = envpool_task(spec.id), envpool_options(spec)
        pool_spec = self._envpool.make_spec(self._task, num_envs=num_envs, **self._options)
        space = pool_spec.gymnasium_observation_space
        self._squeeze = spec.frame_stack == 1  # gymnasium's preset has no stack axis without stacking
        if self._squeeze:
            space = gym.spaces.Box(0, 255, space.shape[1:], np.uint8)
        self.single_observation_space = space
        self.single_action_space = pool_spec.gymnasium_action_space
        self.observation_space = batch_space(space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._pool: Any = None  # built by the first reset, with its seeds
        self._lives = np.zeros(num_envs, np.int64)

    def _build(self, seeds: list[int] | None) -> None:
        if self._pool is not None:
            self._pool.close()
        kwargs = {} if seeds is None else {"env_seed": [int(s) % 2**31 for s in seeds]}
        self._pool = self._envpool.make(self._task, env_type="gymnasium", num_envs=self.num_envs,
                                        **self._options, **kwargs)

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        return obs[:, 0] if self._squeeze else obs

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every copy; ``seed`` (one int: ``seed + i`` for copy i, or one per copy) builds a new pool."""
        if options:
            raise ValueError(f"EnvPoolVectorEnv.reset takes no options, got {sorted(options)}")
        if isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        if seed is not None and len(seed) != self.num_envs:
            raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seed)}")
        if seed is not None or self._pool is None:
            self._build(seed)
        obs, info = self._pool.reset()
        self._lives[:] = info["lives"]
        return self._obs(obs), {}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._pool is None:
            raise RuntimeError("EnvPoolVectorEnv.step before reset")
        obs, rewards, terminated, truncated, info = self._pool.step(np.asarray(actions, dtype=np.int32))
        lives = info["lives"]
        if self.env_spec.terminal_on_life_loss:
            terminated = terminated | (lives < self._lives)  # gymnasium's AtariPreprocessing semantics
        self._lives[:] = lives
        done = terminated | truncated
        out: dict[str, Any] = {}
        if done.any():
            out = {"final_obs": self._obs(obs).copy(), "_final_obs": done.copy()}
            new, reset_info = self._pool.reset(np.flatnonzero(done).astype(np.int32))
            ids = reset_info["env_id"]
            obs[ids] = new
            self._lives[ids] = reset_info["lives"]
        return self._obs(obs), rewards.astype(np.float64), terminated, truncated, out

    def close_extras(self, **kwargs: Any) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __getstate__(self) -> Any:
        raise TypeError("an EnvPool cannot be pickled (checkpoints do not hold it: a resume starts new episodes)")
