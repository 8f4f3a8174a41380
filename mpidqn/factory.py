"""Choose the learner for the parallel layout: data parallel (S = 1) or pipeline (S > 1).

The trainer calls these instead of constructing a learner or evaluating directly, so the loop does
not care which kind of parallelism holds the network.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mpidqn.cnn_networks import q_network_layers
from mpidqn.envs import make_env
from mpidqn.config import samples_per_rank
from mpidqn.errors import UserError
from mpidqn.evaluation import evaluate_group_policy, evaluate_policy
from mpidqn.learner import Hyper, Learner
from mpidqn.learner_ext import make_dp_learner
from mpidqn.networks import parameter_count
from mpidqn.env_presets import spec_from_config
from mpidqn.pipeline import layer_costs, partition_layers
from mpidqn.pipeline_learner import PipelineLearner
from mpidqn.replay import ReplayShard


def _layout_error(cfg: Any, e: ValueError) -> UserError:
    key = "parallel.split_points" if cfg.parallel.split_points is not None else "parallel.pipeline_stages"
    return UserError(f"{key}: {e} (network.hidden={list(cfg.network.hidden)})")


def check_layout(cfg: Any, topo: Any) -> None:
    """Refuse (UserError) what the learner and the replay shards would refuse while being built: a
    network the observations do not fit, a pipeline partition the layers do not allow, a per-replica
    batch larger than a rank's replay shard. Called before anything is written to the run dir."""
    env = make_env(spec_from_config(cfg.env))
    obs_shape, n_actions = env.observation_space.shape, int(env.action_space.n)
    env.close()
    try:
        layers = q_network_layers(obs_shape, n_actions, cfg.network)
    except ValueError as e:
        raise UserError(f"network.kind: {e}") from None
    if topo.pipeline_stages > 1:
        try:
            partition_layers(layer_costs(layers), topo.pipeline_stages, cfg.parallel.split_points)
        except ValueError as e:
            raise _layout_error(cfg, e) from None
    t = cfg.train
    if t.buffer_size < topo.world:
        raise UserError(f"train.buffer_size={t.buffer_size} is smaller than the world size {topo.world} "
                        "(every rank needs a replay shard)")
    per_rank = samples_per_rank(t, topo.world)  # ConfigError when the global batch does not divide
    shard = ReplayShard.shard_capacity(t.buffer_size, topo.world, topo.world - 1)  # the smallest shard
    if per_rank > shard:
        raise UserError(f"train.batch_size={t.batch_size} ({per_rank} per rank) is larger than a rank's replay "
                        f"shard ({shard} transitions: train.buffer_size={t.buffer_size} over {topo.world} ranks); "
                        f"lower train.batch_size or raise train.buffer_size")


def build_learner(cfg: Any, topo: Any, obs_shape: Sequence[int], n_actions: int, lr: float,
                  say: Callable[[str], None] = lambda s: None) -> Learner | PipelineLearner:
    """The learner of this rank. Call it with the same torch seed on every rank.

    Pipeline: every rank builds the full layer list (so the pipelined model equals the unpartitioned
    one built with the same seed) and keeps only its stage. Errors in the layout are UserErrors raised
    identically on every rank (the partition is a pure function of the config).
    """
    hyper = Hyper.from_config(cfg.train, cfg.parallel.sync_check_interval, lr)
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
        raise _layout_error(cfg, e) from None
    del layers
    lines = topo.comm.gather(learner.describe(), root=0)
    if lines is not None:
        for line in lines[: topo.pipeline_stages]:  # group 0 holds one copy of every stage
            say(f"mpidqn: {line}")
    return learner


def total_parameters(learner: Any) -> int:
    """Parameters of the whole Q-network (all stages)."""
    if isinstance(learner, PipelineLearner):
        return learner.total_parameters
    return parameter_count(learner.online)


def evaluate_learner(learner: Any, cfg: Any, topo: Any, step: int) -> dict[str, Any]:
    """Greedy evaluation on all ranks; pipelines run episodes through their group's stages."""
    e = cfg.eval
    if isinstance(learner, PipelineLearner):
        with torch.no_grad():
            return evaluate_group_policy(learner.group_greedy, spec_from_config(cfg.env, evaluation=True), e.episodes, cfg.seed, topo.comm,
                                         cfg.env.max_episode_steps, step=step)
    return evaluate_policy(learner.greedy_actions, spec_from_config(cfg.env, evaluation=True), e.episodes, cfg.seed, topo.dp_comm,
                           cfg.env.max_episode_steps, step=step)
