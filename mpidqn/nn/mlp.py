"""The MLP Q-network and the dueling head, as ordered layer lists (a pipeline can cut them). No communication."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class DuelingHead(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) on top of a feature vector."""

    def __init__(self, in_features: int, n_actions: int) -> None:
        super().__init__()
        self.value = nn.Linear(in_features, 1)
        self.advantage = nn.Linear(in_features, n_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.advantage(x)
        return self.value(x) + a - a.mean(dim=1, keepdim=True)


def mlp_layers(
    in_features: int, n_actions: int, hidden: Sequence[int], activation: str = "relu", dueling: bool = False,
    layer_norm: bool = False,
) -> list[nn.Module]:
    """The ordered layers of an MLP Q-network: [Flatten, Linear, (LayerNorm,) act, ..., head]."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), *([nn.LayerNorm(h)] if layer_norm else []), act()]
        width = h
    layers.append(DuelingHead(width, n_actions) if dueling else nn.Linear(width, n_actions))
    return layers


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
