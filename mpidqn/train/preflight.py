"""Refuse, before anything is written to the run dir, what building the run would refuse later."""
from __future__ import annotations

from typing import Any

from mpidqn.config import samples_per_rank
from mpidqn.distributed.pipeline import layer_costs, partition_layers
from mpidqn.envs.presets import spec_from_config
from mpidqn.envs.vector import make_env
from mpidqn.errors import UserError
from mpidqn.learners.factory import layout_error
from mpidqn.nn.registry import q_network_layers
from mpidqn.replay.shard import ReplayShard


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
            raise layout_error(cfg, e) from None
    t = cfg.train
    if t.buffer_size < topo.world:
        raise UserError(f"train.buffer_size={t.buffer_size} is smaller than the world size {topo.world} "
                        "(every rank needs a replay shard)")
    per_rank = samples_per_rank(t, topo.world)  # the most of any rank; ConfigError below one row a rank
    shard = ReplayShard.shard_capacity(t.buffer_size, topo.world, topo.world - 1)  # the smallest shard
    if per_rank > shard:
        raise UserError(f"train.batch_size={t.batch_size} ({per_rank} per rank) is larger than a rank's replay "
                        f"shard ({shard} transitions: train.buffer_size={t.buffer_size} over {topo.world} ranks); "
                        f"lower train.batch_size or raise train.buffer_size")
