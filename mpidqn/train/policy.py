"""A checkpoint's greedy policy, outside training: numpy observations in, actions out, no MPI."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from mpidqn.algo.categorical import distribution_from_config
from mpidqn.envs.presets import EnvSpec, spec_from_config
from mpidqn.envs.vector import make_env
from mpidqn.nn.actor import NUMPY_ROWS, NumpyActor
from mpidqn.nn.registry import build_network
from mpidqn.train.checkpoints import Checkpoint, read_model


def env_shapes(cfg: Any) -> tuple[tuple[int, ...], int]:
    """(observation shape, number of actions) of a run's evaluation environment."""
    env = make_env(spec_from_config(cfg.env, evaluation=True))
    try:
        return tuple(int(d) for d in env.observation_space.shape), int(env.action_space.n)
    finally:
        env.close()


def load_network(ckpt: Checkpoint, online: bool = False) -> tuple[Any, torch.nn.Module, str]:
    """The config and the full Q-network of a checkpoint (all pipeline stages merged) with the weights
    its evaluations used: the moving average of the parameters where the run kept one
    (train.ema_decay), else (or with ``online``) the online parameters; and which of the two it is."""
    policy = Policy.from_checkpoint(ckpt, online)
    return policy.config, policy.net, policy.weights


@dataclass
class Policy:
    """The greedy policy of one checkpoint. ``predict`` takes one observation or a batch (numpy)."""

    net: torch.nn.Module
    config: Any  # the run's mpidqn.config.Config
    observation_shape: tuple[int, ...]
    n_actions: int
    step: int  # global env steps of the checkpoint
    checkpoint: Path
    weights: str  # "moving average" or "online"
    distribution: Any = None  # network.distributional: the head's Categorical or Quantile (Q from the atoms)
    # (net, its numpy mirror or None where the mirror lacks a layer): small batches act through numpy
    _mirror: tuple[torch.nn.Module, NumpyActor | None] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, online: bool = False) -> Policy:
        """The policy of ``ckpt``, with the weights its evaluations used (see :func:`load_network`)."""
        cfg = ckpt.config()
        shape, n_actions = env_shapes(cfg)
        net = build_network(shape, n_actions, cfg.network)
        model = read_model(ckpt)
        average = bool(model["ema"]) and not online
        net.load_state_dict({**model["online"], **model["ema"]} if average else model["online"])
        return cls(net.eval(), cfg, shape, n_actions, ckpt.step, ckpt.path, "moving average" if average else "online",
                   distribution_from_config(cfg.network))

    @property
    def env_spec(self) -> EnvSpec:
        """The run's evaluation environment (no reward clipping, no life-loss episode ends)."""
        return spec_from_config(self.config.env, evaluation=True)

    def make_env(self, render_mode: str | None = None) -> gym.Env:
        """A new copy of the environment the policy was trained on, as evaluations play it."""
        return make_env(replace(self.env_spec, render_mode=render_mode))

    def _batch(self, obs: Any) -> tuple[np.ndarray, bool]:
        obs = np.asarray(obs)
        single = obs.shape == self.observation_shape
        batch = obs[None] if single else obs
        if batch.shape[1:] != self.observation_shape:
            raise ValueError(f"observations of shape {obs.shape}: the policy wants {self.observation_shape} "
                             f"or a batch (N, {', '.join(map(str, self.observation_shape))})")
        return batch, single

    def _numpy_actor(self) -> NumpyActor | None:
        """The numpy mirror of ``net`` (as the learner acts in training), rebuilt for another net and
        refreshed when a weight changed in place (a parameter's version counter moved)."""
        if self._mirror is None or self._mirror[0] is not self.net:
            self._mirror = (self.net, NumpyActor.mirror(self.net, self.distribution))
        actor = self._mirror[1]
        if actor is not None:
            actor.refresh(tuple(p._version for p in self.net.parameters()))
        return actor

    @torch.no_grad()
    def q_values(self, obs: Any) -> np.ndarray:
        """Q-values, shape (n_actions,) for one observation or (N, n_actions) for a batch (with
        ``network.distributional``: C51's expected values or QR-DQN's quantile means; noisy layers act on their mean weights)."""
        batch, single = self._batch(obs)
        actor = self._numpy_actor() if len(batch) <= NUMPY_ROWS else None
        if actor is not None:
            q = actor.q_values(batch)
        else:
            out = self.net(torch.from_numpy(np.asarray(batch, dtype=np.float32)))
            q = (out if self.distribution is None else self.distribution.q_values(out)).numpy()
        return q[0] if single else q

    def predict(self, obs: Any) -> Any:
        """Greedy actions: an int64 scalar for one observation, an (N,) int64 array for a batch."""
        return np.argmax(self.q_values(obs), axis=-1).astype(np.int64)
