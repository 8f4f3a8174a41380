"""Factorised Gaussian noisy linear layers (Fortunato et al. 2018) and the streams their noise comes from.

``w = w_mu + w_sigma * f(eps_out) f(eps_in)^T``, ``b = b_mu + b_sigma * f(eps_out)``, ``f(x) = sign(x)
sqrt(|x|)``. The noise is not drawn inside ``forward``: the learner sets it (:meth:`NoisyLinear.resample`)
from numpy streams it owns, so data-parallel replicas draw the same noise per update and stay
bit-identical, acting draws from a stream of its own rank, and checkpoints can keep the streams. A layer
whose noise is off (freshly built, or inside ``evaluation_weights``) computes with the mean weights.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NOISE_STREAM_KEY = 0x4E015E  # spawn key of the learning-noise streams (apart from every other stream)


class NoisyLinear(nn.Module):
    """A Linear layer with factorised Gaussian noise; ``sigma0`` is Fortunato's sigma_0 (0.5)."""

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5) -> None:
        super().__init__()
        self.in_features, self.out_features, self.sigma0 = in_features, out_features, float(sigma0)
        bound = 1.0 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), self.sigma0 * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), self.sigma0 * bound))
        # f(eps) of the current draw; not part of the model state (the streams are checkpointed instead)
        self.register_buffer("eps_in", torch.zeros(in_features), persistent=False)
        self.register_buffer("eps_out", torch.zeros(out_features), persistent=False)
        self.noise_on = False

    @staticmethod
    def _f(x: np.ndarray) -> np.ndarray:
        return np.sign(x) * np.sqrt(np.abs(x))

    def resample(self, rng: np.random.Generator) -> None:
        """Draw new noise (in_features + out_features standard normals from ``rng``) and turn it on.

        The buffers are overwritten in place (the numpy actor reads them through views of their storage);
        on the CPU through numpy, and ``noise_on`` is set only when it changes: both skip torch overheads
        that cost more than the draw itself once per acting step (issue #33)."""
        eps = self._f(rng.standard_normal(self.in_features + self.out_features)).astype(np.float32)
        if self.eps_in.device.type == "cpu":
            self.eps_in.numpy()[:] = eps[: self.in_features]
            self.eps_out.numpy()[:] = eps[self.in_features:]
        else:
            with torch.no_grad():
                self.eps_in.copy_(torch.from_numpy(eps[: self.in_features]))
                self.eps_out.copy_(torch.from_numpy(eps[self.in_features:]))
        if not self.noise_on:  # nn.Module.__setattr__ is slow
            self.noise_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.noise_on:
            return F.linear(x, self.weight_mu, self.bias_mu)
        weight = self.weight_mu + self.weight_sigma * torch.outer(self.eps_out, self.eps_in)
        return F.linear(x, weight, self.bias_mu + self.bias_sigma * self.eps_out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sigma0={self.sigma0:g}"


def noisy_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, NoisyLinear]]:
    """``(prefix + name, layer)`` of every NoisyLinear in ``module`` (names are global in a pipeline stage)."""
    return [(prefix + name, m) for name, m in module.named_modules() if isinstance(m, NoisyLinear)]


def learning_streams(seed: int, names: list[str]) -> dict[str, np.random.Generator]:
    """One stream per noisy layer, a function of (seed, layer name) only: every data-parallel replica and
    every pipeline layout draws the same noise for the same layer at the same update."""
    return {n: np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(NOISE_STREAM_KEY, zlib.crc32(n.encode()))))
            for n in names}


def set_noise(layers: Iterator[NoisyLinear] | list[NoisyLinear], on: bool) -> list[bool]:
    """Turn the noise of ``layers`` on or off; returns the previous flags."""
    before = []
    for m in layers:
        before.append(m.noise_on)
        m.noise_on = on
    return before
