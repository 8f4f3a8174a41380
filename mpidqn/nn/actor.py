"""A numpy mirror of an MLP Q-network for acting on the CPU.

Choosing actions for a handful of observations is dominated by torch's per-operator overhead
(~100 us for a [256, 256] MLP at batch 1, against ~25 us for the same matmuls in numpy). The
mirror is refreshed lazily: only when the learner's update counter moved since the last copy.
Networks with layers it does not know (CNNs, GELU, noisy layers) return None and act through torch.
A C51 network (``support`` given) acts on the expected value of each action's distribution.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch import nn

from mpidqn.nn.mlp import DuelingHead

_ACTIVATIONS: dict[type, Callable[[np.ndarray], np.ndarray]] = {
    nn.ReLU: lambda x: np.maximum(x, 0.0, out=x),
    nn.Tanh: lambda x: np.tanh(x, out=x),
}


class NumpyActor:
    """Greedy actions of an MLP ([Flatten], Linear, [LayerNorm], activation, ..., Linear | DuelingHead)."""

    def __init__(self, layers: Sequence[nn.Module], support: np.ndarray | None = None) -> None:
        self.layers = list(layers)
        self.support = None if support is None else np.asarray(support, dtype=np.float32)
        self.version: object = None
        self.ops: list[Callable[[np.ndarray], np.ndarray]] = []

    @classmethod
    def supports(cls, layers: Sequence[nn.Module]) -> bool:
        body, head = list(layers)[:-1], list(layers)[-1]
        known = (nn.Flatten, nn.Linear, nn.LayerNorm, *_ACTIVATIONS)
        plain_head = isinstance(head, nn.Linear) or (
            isinstance(head, DuelingHead) and all(isinstance(m, nn.Linear) for m in head.children()))
        return all(isinstance(m, known) for m in body) and plain_head

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
        if isinstance(m, nn.Linear):
            return self._linear(m)
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(m)
        if isinstance(m, DuelingHead):
            value, advantage = self._linear(m.value), self._linear(m.advantage)
            atoms = m.num_atoms

            def dueling(x: np.ndarray) -> np.ndarray:
                a = advantage(x)
                return value(x) + a - a.mean(axis=1, keepdims=True)

            def dueling_atoms(x: np.ndarray) -> np.ndarray:  # C51: the streams combine per atom
                a = advantage(x).reshape(len(x), -1, atoms)
                q = value(x).reshape(len(x), 1, atoms) + a - a.mean(axis=1, keepdims=True)
                return q.reshape(len(x), -1)

            return dueling if atoms == 1 else dueling_atoms
        return _ACTIVATIONS[type(m)]

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        for op in self.ops:
            x = op(x)
        if self.support is not None:
            x = expected_values(x, self.support)
        return x.argmax(axis=1)


def expected_values(logits: np.ndarray, support: np.ndarray) -> np.ndarray:
    """``sum_j softmax(logits)_j z_j`` per action of flat C51 logits (rows, actions * atoms)."""
    z = logits.reshape(len(logits), -1, len(support))
    e = np.exp(z - z.max(axis=2, keepdims=True))
    return (e @ support) / e.sum(axis=2)
