"""A numpy mirror of an MLP Q-network for acting on the CPU.

Choosing actions for a handful of observations is dominated by torch's per-operator overhead
(~100 us for a [256, 256] MLP at batch 1, against ~25 us for the same matmuls in numpy). The
mirror is refreshed lazily: only when the learner's update counter moved since the last copy.
Networks with layers it does not know (CNNs, GELU) return None and act through torch.
A distributional network (``q_of`` given: C51 or QR-DQN) acts on the Q-values its head's ``numpy_q_values``
computes from the flat output (C51's expected values, QR-DQN's quantile means).
Noisy layers (network.noisy) read their noise at call time from the layer itself (``noise_on`` and the
``eps_in``/``eps_out`` buffers the learner resamples in place), so a new draw needs no refresh; with the
noise on they compute the factorised form without forming the noisy weight matrix (issue #33).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from torch import nn

from mpidqn.nn.mlp import DuelingHead
from mpidqn.nn.noisy import NoisyLinear

_ACTIVATIONS: dict[type, Callable[[np.ndarray], np.ndarray]] = {
    nn.ReLU: lambda x: np.maximum(x, 0.0, out=x),
    nn.Tanh: lambda x: np.tanh(x, out=x),
}
_DENSE = (nn.Linear, NoisyLinear)
NUMPY_ROWS = 64  # batches up to this many observations act faster in numpy than through torch


class NumpyActor:
    """Greedy actions of an MLP ([Flatten], Linear, [LayerNorm], activation, ..., Linear | DuelingHead);
    every Linear may be a NoisyLinear."""

    def __init__(self, layers: Sequence[nn.Module],
                 q_of: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.layers = list(layers)
        self.q_of = q_of  # flat output -> (rows, actions) Q-values of a distributional head
        self.version: object = None
        self.ops: list[Callable[[np.ndarray], np.ndarray]] = []

    @classmethod
    def mirror(cls, net: nn.Module, distribution: Any = None) -> NumpyActor | None:
        """The numpy mirror of ``net`` (an ``nn.Sequential`` of layers it knows), acting on the Q-values of
        ``distribution`` (a C51 or QR-DQN head) when given; None where it cannot act for ``net``."""
        layers = list(net.children()) if isinstance(net, nn.Sequential) else []
        if not layers or not cls.supports(layers):
            return None
        return cls(layers, None if distribution is None else distribution.numpy_q_values)

    @classmethod
    def supports(cls, layers: Sequence[nn.Module]) -> bool:
        body, head = list(layers)[:-1], list(layers)[-1]
        known = (nn.Flatten, *_DENSE, nn.LayerNorm, *_ACTIVATIONS)
        dense_head = isinstance(head, _DENSE) or (
            isinstance(head, DuelingHead) and all(isinstance(m, _DENSE) for m in head.children()))
        return all(isinstance(m, known) for m in body) and dense_head

    def refresh(self, version: object) -> None:
        """Copy the weights if the network changed since the last copy (``version`` changes with it)."""
        if version == self.version:
            return
        self.ops = [self._op(m) for m in self.layers if not isinstance(m, nn.Flatten)]
        self.version = version

    @staticmethod
    def _linear(m: nn.Linear) -> Callable[[np.ndarray], np.ndarray]:
        w = m.weight.detach().numpy().T.copy()
        b = m.bias.detach().numpy().copy()
        return lambda x: x @ w + b

    @staticmethod
    def _noisy_linear(m: NoisyLinear) -> Callable[[np.ndarray], np.ndarray]:
        """``x W^T + b`` of the layer's current noise: ``x mu^T + ((x * eps_in) sigma^T) * eps_out + b_mu +
        b_sigma * eps_out`` (the noisy weight factorises), or the means while ``m.noise_on`` is False. The
        eps views share the buffers' storage, which ``NoisyLinear.resample`` overwrites in place."""
        w_mu, w_sigma = (t.detach().numpy().T.copy() for t in (m.weight_mu, m.weight_sigma))
        b_mu, b_sigma = (t.detach().numpy().copy() for t in (m.bias_mu, m.bias_sigma))
        eps_in, eps_out = m.eps_in.numpy(), m.eps_out.numpy()

        def noisy_linear(x: np.ndarray) -> np.ndarray:
            if not m.noise_on:
                return x @ w_mu + b_mu
            return x @ w_mu + ((x * eps_in) @ w_sigma) * eps_out + (b_mu + b_sigma * eps_out)

        return noisy_linear

    def _dense(self, m: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        return self._noisy_linear(m) if isinstance(m, NoisyLinear) else self._linear(m)

    @staticmethod
    def _layer_norm(m: nn.LayerNorm) -> Callable[[np.ndarray], np.ndarray]:
        w = m.weight.detach().numpy().copy()
        b = m.bias.detach().numpy().copy()
        eps = m.eps

        def layer_norm(x: np.ndarray) -> np.ndarray:
            mean = x.mean(axis=1, keepdims=True)
            var = x.var(axis=1, keepdims=True)
            return (x - mean) / np.sqrt(var + eps) * w + b

        return layer_norm

    def _op(self, m: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        if isinstance(m, _DENSE):
            return self._dense(m)
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(m)
        if isinstance(m, DuelingHead):
            value, advantage = self._dense(m.value), self._dense(m.advantage)
            atoms = m.num_atoms

            def dueling(x: np.ndarray) -> np.ndarray:
                a = advantage(x)
                return value(x) + a - a.mean(axis=1, keepdims=True)

            def dueling_atoms(x: np.ndarray) -> np.ndarray:  # C51 / QR-DQN: the streams combine per atom
                a = advantage(x).reshape(len(x), -1, atoms)
                q = value(x).reshape(len(x), 1, atoms) + a - a.mean(axis=1, keepdims=True)
                return q.reshape(len(x), -1)

            return dueling if atoms == 1 else dueling_atoms
        return _ACTIVATIONS[type(m)]

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """(rows, actions) Q-values of a batch of observations (C51: the expected values, QR-DQN: the
        quantile means)."""
        x = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        for op in self.ops:
            x = op(x)
        return x if self.q_of is None else self.q_of(x)

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        return self.q_values(obs).argmax(axis=1)

