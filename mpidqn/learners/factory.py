"""Build the learner for the parallel layout: data parallel (S = 1) or pipeline (S > 1)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from mpidqn.algo.categorical import distribution_from_config
from mpidqn.errors import UserError
from mpidqn.learners.base import QLearner
from mpidqn.learners.device import make_dp_learner
from mpidqn.learners.optim import Hyper
from mpidqn.learners.pipeline import PipelineLearner
from mpidqn.nn.registry import q_network_layers


def layout_error(cfg: Any, e: ValueError) -> UserError:
    key = "parallel.split_points" if cfg.parallel.split_points is not None else "parallel.pipeline_stages"
    return UserError(f"{key}: {e} (network.hidden={list(cfg.network.hidden)})")


def build_learner(cfg: Any, topo: Any, obs_shape: Sequence[int], n_actions: int, lr: float,
                  say: Callable[[str], None] = lambda s: None, plan: Any = None) -> QLearner:
    """The learner of this rank. Call it with the same torch seed on every rank.

    Pipeline: every rank builds the full layer list (so the pipelined model equals the unpartitioned
    one built with the same seed) and keeps only its stage. ``plan``: the run's large-batch plan
    (target refresh, tau and ema_decay rescaled to its batch scale). Errors in the layout are UserErrors raised
    identically on every rank (the partition is a pure function of the config).
    """
    hyper = dataclasses.replace(Hyper.from_config(cfg.train, cfg.parallel.sync_check_interval, lr, plan),
                                distribution=distribution_from_config(cfg.network), noise_seed=int(cfg.seed))
    net = cfg.network
    try:
        layers = q_network_layers(obs_shape, n_actions, net)
    except ValueError as e:
        raise UserError(f"network.kind: {e}") from None
    if topo.pipeline_stages == 1:
        return make_dp_learner(torch.nn.Sequential(*layers), hyper, cfg, topo)
    try:
        learner = PipelineLearner(layers, obs_shape, hyper, topo.pp_comm, topo.dp_comm,
                                  cfg.parallel.micro_batches, cfg.parallel.split_points)
    except ValueError as e:
        raise layout_error(cfg, e) from None
    del layers
    lines = topo.comm.gather(learner.describe(), root=0)
    if lines is not None:
        for line in lines[: topo.pipeline_stages]:  # group 0 holds one copy of every stage
            say(f"mpidqn: {line}")
    return learner

