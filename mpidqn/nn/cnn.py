"""Convolutional Q-networks for image observations, as ordered layer lists (a pipeline can cut them).

Inputs are uint8 images (C, H, W) (or the same values as floats); the first layer, :class:`Scale`,
casts to float and divides Atari pixels by 255, so replay keeps uint8 and no preprocessing happens
outside the network.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mpidqn.nn.mlp import DuelingHead


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


def _head(width: int, n_actions: int, dueling: bool) -> nn.Module:
    return DuelingHead(width, n_actions) if dueling else nn.Linear(width, n_actions)


def nature_cnn_layers(obs_shape: Sequence[int], n_actions: int, dueling: bool = False) -> list[nn.Module]:
    """Mnih et al. 2015: conv 32 8x8/4, conv 64 4x4/2, conv 64 3x3/1, FC 512, head (input (C, 84, 84))."""
    c = int(obs_shape[0])
    convs: list[nn.Module] = [nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                              nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten()]
    flat = _conv_out(obs_shape, convs)
    return [Scale(1 / 255), *convs, nn.Linear(flat, 512), nn.ReLU(), _head(512, n_actions, dueling)]


def minatar_cnn_layers(obs_shape: Sequence[int], n_actions: int, dueling: bool = False) -> list[nn.Module]:
    """Young & Tian 2019 (MinAtar): conv 16 3x3/1, FC 128, head (input (C, 10, 10) of 0/1)."""
    c = int(obs_shape[0])
    convs: list[nn.Module] = [nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten()]
    flat = _conv_out(obs_shape, convs)
    # MinAtar observations are 0/1 already: Scale(1) only casts the uint8 input to float.
    return [Scale(1.0), *convs, nn.Linear(flat, 128), nn.ReLU(), _head(128, n_actions, dueling)]
