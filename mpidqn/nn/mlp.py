"""The MLP Q-network and the dueling head, as ordered layer lists (a pipeline can cut them). No communication."""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from mpidqn.nn.noisy import NoisyLinear

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class DuelingHead(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) on top of a feature vector.

    With ``num_atoms`` > 1 (C51) the streams are per atom and combine the logits the same way
    (Rainbow's dueling distributional head); the output stays flat, (rows, actions * num_atoms).
    ``linear`` builds the streams' layers (nn.Linear, or a NoisyLinear factory)."""

    def __init__(self, in_features: int, n_actions: int, num_atoms: int = 1,
                 linear: Callable[[int, int], nn.Module] = nn.Linear) -> None:
        super().__init__()
        self.num_atoms = int(num_atoms)
        self.value = linear(in_features, self.num_atoms)
        self.advantage = linear(in_features, n_actions * self.num_atoms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.advantage(x)
        if self.num_atoms == 1:
            return self.value(x) + a - a.mean(dim=1, keepdim=True)
        a = a.view(len(x), -1, self.num_atoms)
        v = self.value(x).view(len(x), 1, self.num_atoms)
        return (v + a - a.mean(dim=1, keepdim=True)).flatten(1)


def head_layer(in_features: int, n_actions: int, dueling: bool, num_atoms: int = 1,
               linear: Callable[[int, int], nn.Module] = nn.Linear) -> nn.Module:
    """The output layer: (rows, actions * num_atoms) values or logits, plain or dueling."""
    if dueling:
        return DuelingHead(in_features, n_actions, num_atoms, linear)
    return linear(in_features, n_actions * num_atoms)


def linear_factory(noisy: bool = False, sigma0: float = 0.5) -> Callable[[int, int], nn.Module]:
    """nn.Linear, or NoisyLinear with ``sigma0`` (network.noisy)."""
    return partial(NoisyLinear, sigma0=sigma0) if noisy else nn.Linear


def mlp_layers(
    in_features: int, n_actions: int, hidden: Sequence[int], activation: str = "relu", dueling: bool = False,
    layer_norm: bool = False, num_atoms: int = 1, linear: Callable[[int, int], nn.Module] = nn.Linear,
) -> list[nn.Module]:
    """The ordered layers of an MLP Q-network: [Flatten, Linear, (LayerNorm,) act, ..., head]; ``linear``
    builds every Linear (NoisyLinear for noisy nets), ``num_atoms`` > 1 gives C51's flat logits."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [linear(width, h), *([nn.LayerNorm(h)] if layer_norm else []), act()]
        width = h
    layers.append(head_layer(width, n_actions, dueling, num_atoms, linear))
    return layers


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
