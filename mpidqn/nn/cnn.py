"""Convolutional Q-networks for image observations, as ordered layer lists (a pipeline can cut them).

Inputs are uint8 images (C, H, W) (or the same values as floats); the first layer, :class:`Scale`,
casts to float and divides Atari pixels by 255, so replay keeps uint8 and no preprocessing happens
outside the network.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from mpidqn.nn.mlp import head_layer

Linear = Callable[[int, int], nn.Module]


class Scale(nn.Module):
    """Multiply by a constant (1/255 for uint8 pixels); no parameters."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # no copy when the learner already cast the batch
        return x if self.factor == 1.0 else x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def _conv_out(obs_shape: Sequence[int], convs: list[nn.Module]) -> int:
    with torch.no_grad():
        return int(nn.Sequential(*convs)(torch.zeros(1, *obs_shape)).numel())


def nature_cnn_layers(obs_shape: Sequence[int], n_actions: int, dueling: bool = False, num_atoms: int = 1,
                      linear: Linear = nn.Linear) -> list[nn.Module]:
    """Mnih et al. 2015: conv 32 8x8/4, conv 64 4x4/2, conv 64 3x3/1, FC 512, head (input (C, 84, 84)).
    ``linear`` builds the FC layers (noisy nets), ``num_atoms`` > 1 gives C51's flat logits."""
    c = int(obs_shape[0])
    convs: list[nn.Module] = [nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                              nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten()]
    flat = _conv_out(obs_shape, convs)
    return [Scale(1 / 255), *convs, linear(flat, 512), nn.ReLU(), head_layer(512, n_actions, dueling, num_atoms, linear)]


def minatar_cnn_layers(obs_shape: Sequence[int], n_actions: int, dueling: bool = False, num_atoms: int = 1,
                       linear: Linear = nn.Linear) -> list[nn.Module]:
    """Young & Tian 2019 (MinAtar): conv 16 3x3/1, FC 128, head (input (C, 10, 10) of 0/1); ``num_atoms``
    and ``linear`` as for :func:`nature_cnn_layers`."""
    c = int(obs_shape[0])
    convs: list[nn.Module] = [nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten()]
    flat = _conv_out(obs_shape, convs)
    # MinAtar observations are 0/1 already: Scale(1) only casts the uint8 input to float.
    return [Scale(1.0), *convs, linear(flat, 128), nn.ReLU(), head_layer(128, n_actions, dueling, num_atoms, linear)]
