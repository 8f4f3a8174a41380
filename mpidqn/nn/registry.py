"""Every Q-network by ``network.kind`` (mlp, nature_cnn, minatar_cnn), as an ordered layer list."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from mpidqn.nn.cnn import minatar_cnn_layers, nature_cnn_layers
from mpidqn.nn.mlp import linear_factory, mlp_layers


def q_network_layers(obs_shape: Sequence[int], n_actions: int, cfg: "object") -> list[nn.Module]:
    """The ordered layers for a NetworkConfig (``kind``: mlp, nature_cnn, minatar_cnn).

    Raises ValueError naming the kind when the observation shape does not fit a CNN.
    """
    kind = getattr(cfg, "kind", "mlp")
    atoms = int(cfg.num_atoms) if getattr(cfg, "distributional", False) else 1
    linear = linear_factory(getattr(cfg, "noisy", False), getattr(cfg, "noisy_sigma0", 0.5))
    if kind == "mlp":
        n = 1
        for d in obs_shape:
            n *= int(d)
        return mlp_layers(n, n_actions, cfg.hidden, cfg.activation, cfg.dueling, getattr(cfg, "layer_norm", False),
                          atoms, linear)
    build = {"nature_cnn": nature_cnn_layers, "minatar_cnn": minatar_cnn_layers}[kind]
    if len(obs_shape) != 3:
        raise ValueError(f"{kind} needs (C, H, W) observations, got shape {tuple(obs_shape)}")
    try:
        return build(obs_shape, n_actions, cfg.dueling, atoms, linear)
    except RuntimeError:
        raise ValueError(f"{kind} cannot take observations of shape {tuple(obs_shape)} "
                         f"(too small for its convolutions)") from None


def build_network(obs_shape: Sequence[int], n_actions: int, cfg: "object") -> nn.Sequential:
    """The Q-network of a NetworkConfig as one Sequential of :func:`q_network_layers`."""
    return nn.Sequential(*q_network_layers(obs_shape, n_actions, cfg))
