"""Environment presets: what an ``env`` config section builds (plain gymnasium, Atari, MinAtar).

An :class:`EnvSpec` is a small frozen, picklable description of one environment copy; ``build_env``
turns it into a wrapped ``gym.Env``. Vector envs are built from ``functools.partial(build_env, spec)``
so the synchronous vector env stays picklable for exact checkpoints.

Atari (``ALE/...`` ids, ``pip install -e ".[atari]"``), the standard DQN preprocessing with
gymnasium's own wrappers, in this order::

    gym.make(id, frameskip=1, repeat_action_probability=sticky)   # raw frames, no ALE frame skip
    AtariPreprocessing(noop_max=30, frame_skip=4, screen_size=84, grayscale, terminal_on_life_loss)
    TimeLimit(max_episode_steps)      # agent steps (4 frames each), only when configured
    TransformReward(clip_reward)      # [-1, 1]; training only: evaluation reports unclipped scores
    FrameStackObservation(frame_stack)  # (frame_stack, 84, 84) uint8, padded with the reset frame

MinAtar (``MinAtar/...`` ids, ``pip install -e ".[minatar]"``): the 10x10xC bool observation becomes
(C, 10, 10) uint8 (channel first, for the CNN); frame stacking is off by default (MinAtar's
reference DQN uses none).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np

PRESETS = ("none", "atari", "minatar")


def infer_preset(env_id: str, preset: str = "auto") -> str:
    """``preset`` unless "auto": then "atari" for ``ALE/...``, "minatar" for ``MinAtar/...``, else "none"."""
    if preset != "auto":
        return preset
    if env_id.startswith("ALE/"):
        return "atari"
    if env_id.startswith("MinAtar/"):
        return "minatar"
    return "none"


@dataclass(frozen=True)
class EnvSpec:
    """Everything needed to build one environment copy (picklable, hashable)."""

    id: str
    preset: str = "none"
    max_episode_steps: int | None = None
    frame_stack: int = 1
    terminal_on_life_loss: bool = False
    clip_rewards: bool = False
    sticky_actions: float | None = None
    noop_max: int = 30
    render_mode: str | None = None  # "rgb_array" to record videos; None: no rendering (training)

    def for_evaluation(self) -> "EnvSpec":
        """The same env without the training-only reward clipping and life-loss episode ends."""
        return replace(self, clip_rewards=False, terminal_on_life_loss=False)


def spec_from_config(env_cfg: Any, evaluation: bool = False) -> EnvSpec:
    """The EnvSpec of an ``EnvConfig`` (``frame_stack`` None: 4 for Atari, else 1)."""
    preset = infer_preset(env_cfg.id, env_cfg.preset)
    stack = env_cfg.frame_stack if env_cfg.frame_stack is not None else (4 if preset == "atari" else 1)
    spec = EnvSpec(
        id=env_cfg.id, preset=preset, max_episode_steps=env_cfg.max_episode_steps, frame_stack=stack,
        terminal_on_life_loss=env_cfg.terminal_on_life_loss,
        clip_rewards=env_cfg.clip_rewards if env_cfg.clip_rewards is not None else preset == "atari",
        sticky_actions=env_cfg.sticky_actions,
    )
    return spec.for_evaluation() if evaluation else spec


def chw_uint8(obs: np.ndarray) -> np.ndarray:
    """(H, W, C) bool -> (C, H, W) uint8 (module level so wrapped envs stay picklable)."""
    return np.ascontiguousarray(np.moveaxis(obs, -1, 0), dtype=np.uint8)


def clip_reward(reward: float) -> float:
    """Reward clipped to [-1, 1] (gymnasium's ClipReward holds a lambda, which cannot be pickled)."""
    return float(np.clip(reward, -1.0, 1.0))


def _render(spec: EnvSpec) -> dict[str, Any]:
    return {} if spec.render_mode is None else {"render_mode": spec.render_mode}


def _time_limit(env: gym.Env, max_episode_steps: int | None) -> gym.Env:
    return env if max_episode_steps is None else gym.wrappers.TimeLimit(env, max_episode_steps)


def _atari(spec: EnvSpec) -> gym.Env:
    if spec.id not in gym.registry:  # async workers and unpickled envs build in fresh processes
        import ale_py

        gym.register_envs(ale_py)
    kwargs: dict[str, Any] = {"frameskip": 1, **_render(spec)}  # AtariPreprocessing skips frames (and max-pools)
    if spec.sticky_actions is not None:
        kwargs["repeat_action_probability"] = spec.sticky_actions
    env = gym.make(spec.id, **kwargs)
    env = gym.wrappers.AtariPreprocessing(
        env, noop_max=spec.noop_max, frame_skip=4, screen_size=84, grayscale_obs=True,
        terminal_on_life_loss=spec.terminal_on_life_loss, scale_obs=False)
    return _time_limit(env, spec.max_episode_steps)


def _minatar(spec: EnvSpec) -> gym.Env:
    if spec.id not in gym.registry:
        from minatar import gym as minatar_gym

        minatar_gym.register_envs()
    kwargs: dict[str, Any] = _render(spec)
    if spec.sticky_actions is not None:
        kwargs["sticky_action_prob"] = spec.sticky_actions
    env = _time_limit(gym.make(spec.id, **kwargs), spec.max_episode_steps)
    h, w, c = env.observation_space.shape
    space = gym.spaces.Box(0, 1, (c, h, w), np.uint8)
    return gym.wrappers.TransformObservation(env, chw_uint8, space)


def _plain(spec: EnvSpec) -> gym.Env:
    kwargs = {} if spec.max_episode_steps is None else {"max_episode_steps": spec.max_episode_steps}
    return gym.make(spec.id, **kwargs, **_render(spec))


def build_env(spec: EnvSpec) -> gym.Env:
    """One environment copy with the preset's wrappers (errors are gymnasium's own)."""
    env = {"atari": _atari, "minatar": _minatar, "none": _plain}[spec.preset](spec)
    if spec.clip_rewards:
        env = gym.wrappers.TransformReward(env, clip_reward)
    if spec.frame_stack > 1:
        env = gym.wrappers.FrameStackObservation(env, spec.frame_stack, padding_type="reset")
    return env
