"""A plain MLP Q-network's forward and backward without autograd (the CPU update's fast path).

For ``[Flatten,] Linear, ReLU, ..., Linear`` the gradient of a TD loss needs only the matrix products
autograd itself would run: per layer ``dW = dY^T X``, ``db = sum(dY)`` and ``dX = dY W``, through
ReLU's mask. Written out, they go straight into the parameters' ``.grad`` (views of the learner's one
flat gradient buffer) with ``out=``, and the step skips what autograd adds around them on tiny
batches: recording the graph, the engine's scheduling, the accumulation into ``.grad``. The products
are the same ATen calls on the same operands, so the gradients equal autograd's (tests compare them);
on CartPole's 256x256 MLP with 64 rows the update is about 1.2x faster on one CPU thread
(``benchmarks/speed.py``).

Used by :class:`mpidqn.learners.data_parallel.Learner` on the CPU when the network has this shape and the
gradient is reduced after backward (``parallel.overlap_allreduce: false``: the overlapped reducer hooks
autograd); ``train.mlp_kernel: false`` turns it off. Everything else takes autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

_relu_backward = torch.ops.aten.threshold_backward.default  # what autograd runs for ReLU: one pass


class MLPKernel:
    """Forward keeps each layer's input; :meth:`backward` turns ``dL/dQ`` into every parameter's gradient."""

    @staticmethod
    def supports(layers: Sequence[nn.Module]) -> bool:
        """``[Flatten,] (Linear, ReLU)*, Linear`` with biases, and nothing else."""
        body = list(layers[1:] if layers and isinstance(layers[0], nn.Flatten) else layers)
        if not body or len(body) % 2 == 0:
            return False
        linear_at_even = all(isinstance(m, nn.Linear) and m.bias is not None for m in body[::2])
        relu_at_odd = all(type(m) is nn.ReLU for m in body[1::2])
        return linear_at_even and relu_at_odd

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        if not self.supports(layers):
            raise ValueError("MLPKernel needs [Flatten,] Linear, ReLU, ..., Linear")
        self.linears: list[nn.Linear] = [m for m in layers if isinstance(m, nn.Linear)]
        self._inputs: list[torch.Tensor] = []  # each Linear's input in the last forward (post-ReLU)

    def forward(self, obs: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """Q-values of ``obs`` (rows, ...); with ``keep``, remembers what :meth:`backward` needs. Both
        methods run under ``torch.no_grad()`` (the caller's: one context per update, not per call)."""
        x = obs.flatten(1)
        inputs = []
        last = len(self.linears) - 1
        for i, lin in enumerate(self.linears):
            inputs.append(x)
            x = torch.addmm(lin.bias, x, lin.weight.t())
            if i < last:
                x.relu_()
        if keep:
            self._inputs = inputs
        return x

    def backward(self, grad_q: torch.Tensor) -> None:
        """Write ``dL/dW`` and ``dL/db`` of every layer into its ``.grad`` (overwriting), given
        ``grad_q = dL/dQ`` of the last :meth:`forward` (rows, actions)."""
        g = grad_q
        for i in range(len(self.linears) - 1, -1, -1):
            lin, x = self.linears[i], self._inputs[i]
            torch.mm(g.t(), x, out=lin.weight.grad)
            torch.sum(g, 0, out=lin.bias.grad)
            if i:  # the input of layer i is ReLU's output: its gradient is zero where that output is
                g = _relu_backward(torch.mm(g, lin.weight), x, 0)
        self._inputs = []
