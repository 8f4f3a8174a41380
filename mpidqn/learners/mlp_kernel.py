"""An MLP Q-network's forward and backward without autograd (the CPU update's fast path).

For ``[Flatten,] Linear, ReLU, ..., head`` the gradient of a loss needs only the matrix products autograd
itself would run: per layer ``dW = dY^T X``, ``db = sum(dY)`` and ``dX = dY W``, through ReLU's mask.
Written out, they go straight into the parameters' ``.grad`` (views of the learner's one flat gradient
buffer) with ``out=``, and the step skips what autograd adds around them on tiny batches: recording the
graph, the engine's scheduling, the accumulation into ``.grad``. The products are the same ATen calls on
the same operands, so the gradients equal autograd's up to the order of sums (tests compare them); on
CartPole's 256x256 MLP with 64 rows the update is about 1.2x faster on one CPU thread
(``benchmarks/speed.py``).

Rainbow's layers are covered too:

- a noisy layer (:class:`~mpidqn.nn.noisy.NoisyLinear`) computes with ``W = W_mu + W_sigma * outer(f(eps_out),
  f(eps_in))`` as its own forward does; its gradients are ``dW_mu = dW`` and ``dW_sigma = dW * outer`` (and
  alike for the bias), or zero for the sigmas while its noise is off;
- a dueling head (:class:`~mpidqn.nn.mlp.DuelingHead`, per atom with C51 or QR-DQN) combines
  ``V + A - mean_a A``; backward gives the value stream ``sum_a dQ`` and the advantage stream
  ``dQ - mean_a dQ``, and the feature gradient is the sum of both streams' ``dX``.

Used by :class:`mpidqn.learners.data_parallel.Learner` on the CPU when the network has this shape and the
gradient is reduced after backward (``parallel.overlap_allreduce: false``: the overlapped reducer hooks
autograd); ``train.mlp_kernel: false`` turns it off. Everything else takes autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mpidqn.nn.mlp import DuelingHead
from mpidqn.nn.noisy import NoisyLinear

_relu_backward = torch.ops.aten.threshold_backward.default  # what autograd runs for ReLU: one pass


def _affine(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and m.bias is not None) or isinstance(m, NoisyLinear)


class _Affine:
    """One Linear or NoisyLinear: its weights as the module's forward computes them, and its gradients."""

    __slots__ = ("m", "noisy")

    def __init__(self, m: nn.Module) -> None:
        self.m, self.noisy = m, isinstance(m, NoisyLinear)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W, b, the noise's outer product or None): the operands of this forward."""
        m = self.m
        if not self.noisy:
            return m.weight, m.bias, None
        if not m.noise_on:
            return m.weight_mu, m.bias_mu, None
        outer = torch.outer(m.eps_out, m.eps_in)
        return m.weight_mu + m.weight_sigma * outer, m.bias_mu + m.bias_sigma * m.eps_out, outer

    def write_grads(self, g: torch.Tensor, x: torch.Tensor, outer: torch.Tensor | None) -> None:
        """``dW`` and ``db`` of output gradient ``g`` and input ``x`` into the parameters' ``.grad``."""
        m = self.m
        if not self.noisy:
            torch.mm(g.t(), x, out=m.weight.grad)
            torch.sum(g, 0, out=m.bias.grad)
            return
        torch.mm(g.t(), x, out=m.weight_mu.grad)
        torch.sum(g, 0, out=m.bias_mu.grad)
        if outer is None:  # noise off: the sigmas took no part
            m.weight_sigma.grad.zero_()
            m.bias_sigma.grad.zero_()
        else:
            torch.mul(m.weight_mu.grad, outer, out=m.weight_sigma.grad)
            torch.mul(m.bias_mu.grad, m.eps_out, out=m.bias_sigma.grad)


class MLPKernel:
    """Forward keeps each layer's input; :meth:`backward` turns ``dL/dQ`` into every parameter's gradient."""

    @staticmethod
    def supports(layers: Sequence[nn.Module]) -> bool:
        """``[Flatten,] (Linear, ReLU)*, head`` with biases, the head a Linear or a dueling head of two,
        any Linear possibly noisy, and nothing else."""
        body = list(layers[1:] if layers and isinstance(layers[0], nn.Flatten) else layers)
        if not body or len(body) % 2 == 0:
            return False
        head = body[-1]
        head_ok = _affine(head) or (type(head) is DuelingHead and _affine(head.value) and _affine(head.advantage))
        linear_at_even = all(_affine(m) for m in body[:-1:2])
        relu_at_odd = all(type(m) is nn.ReLU for m in body[1::2])
        return head_ok and linear_at_even and relu_at_odd

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        if not self.supports(layers):
            raise ValueError("MLPKernel needs [Flatten,] Linear, ReLU, ..., Linear or dueling head")
        body = [m for m in layers if not isinstance(m, (nn.Flatten, nn.ReLU))]
        head = body.pop()
        self.hidden = [_Affine(m) for m in body]
        self.dueling: DuelingHead | None = head if isinstance(head, DuelingHead) else None
        # the head's layers: [value, advantage] for a dueling head, else [the last Linear]
        self.head = [_Affine(head.value), _Affine(head.advantage)] if self.dueling is not None else [_Affine(head)]
        self._saved: tuple = ()  # what backward needs from the last forward that kept it

    def forward(self, obs: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """Q-values (or flat atoms) of ``obs`` (rows, ...); with ``keep``, remembers what :meth:`backward`
        needs. Both methods run under ``torch.no_grad()`` (the caller's: one context per update, not per
        call)."""
        x = obs.flatten(1)
        inputs, used = [], []
        for layer in self.hidden:
            w, b, outer = layer.weights()
            inputs.append(x)
            used.append((w, outer))
            x = torch.addmm(b, x, w.t()).relu_()
        heads = [layer.weights() for layer in self.head]
        outs = [torch.addmm(b, x, w.t()) for w, b, _ in heads]
        if self.dueling is None:
            q = outs[0]
        else:  # DuelingHead.forward's arithmetic, in its order
            v, a = outs
            atoms = self.dueling.num_atoms
            if atoms == 1:
                q = v + a - a.mean(dim=1, keepdim=True)
            else:
                a = a.view(len(x), -1, atoms)
                q = (v.view(len(x), 1, atoms) + a - a.mean(dim=1, keepdim=True)).flatten(1)
        if keep:
            self._saved = (inputs, used, x, [(w, outer) for w, _, outer in heads])
        return q

    def backward(self, grad_q: torch.Tensor) -> None:
        """Write ``dL/dW`` and ``dL/db`` of every layer into its ``.grad`` (overwriting), given
        ``grad_q = dL/dQ`` of the last :meth:`forward` (rows, outputs)."""
        inputs, used, features, heads = self._saved
        if self.dueling is None:
            grads = [grad_q]
        else:  # Q = V + A - mean_a A: dV sums dQ over the actions, dA is dQ less its mean over them
            g = grad_q.view(len(grad_q), -1, self.dueling.num_atoms)
            grads = [g.sum(dim=1), (g - g.mean(dim=1, keepdim=True)).flatten(1)]
        dx = None
        for layer, g, (w, outer) in zip(self.head, grads, heads):
            layer.write_grads(g, features, outer)
            if self.hidden:
                dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)
        for i in range(len(self.hidden) - 1, -1, -1):
            # layer i's output went through ReLU: its gradient is zero where that output is
            g = _relu_backward(dx, inputs[i + 1] if i + 1 < len(self.hidden) else features, 0)
            w, outer = used[i]
            self.hidden[i].write_grads(g, inputs[i], outer)
            if i:
                dx = torch.mm(g, w)
        self._saved = ()
