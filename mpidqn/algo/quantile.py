"""Quantile regression DQN (QR-DQN, Dabney et al. 2018) as pure functions: the n-step target quantiles,
the quantile Huber loss and its gradient (computed together, in one pass).

A QR-DQN network's output is flat, ``(rows, actions * num_atoms)`` quantile values (the same layout as
C51's logits, so the MLP's last Linear, the hand-written MLP gradient, the numpy actor and a pipeline's
last stage need nothing new); :class:`Quantile` views it as ``(rows, actions, num_atoms)``: atom ``i``
estimates the return's quantile at the fraction ``tau_i = (2 i + 1) / (2 num_atoms)``, and Q is their
mean. Names follow Dopamine's ``JaxQuantileAgent`` (``num_atoms``, ``kappa``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def taken_grad(out: torch.Tensor, actions: torch.Tensor, num_atoms: int, row_grad: torch.Tensor) -> torch.Tensor:
    """A flat output's gradient that is ``row_grad`` (rows, atoms) on the taken actions' atoms, 0 elsewhere
    (the gradient of C51 and QR-DQN heads' ``loss_and_grad_out``)."""
    grad = torch.zeros_like(out)
    grad.view(len(out), -1, num_atoms)[torch.arange(len(out), device=out.device), actions] = row_grad
    return grad


def _fractions(n: int, like: torch.Tensor) -> torch.Tensor:
    """The quantile midpoints ``(2 i + 1) / (2 n)``, i = 0 .. n-1."""
    return (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n


def quantile_huber_loss_and_grad(quantiles: torch.Tensor, targets: torch.Tensor, kappa: float,
                                 weights: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-row loss, ``d loss / d quantiles``) of the taken actions' ``quantiles`` (rows, N) against
    target quantiles (rows, N'), in one pass over the pairwise (rows, N, N') differences, no autograd
    (Dabney et al. 2018, eq. 10; Dopamine's quantile agent).

    With ``u_ij = target_j - quantile_i`` and ``c_ij = clamp(u_ij, -kappa, kappa)``: ``rho_ij = |tau_i -
    1{u_ij < 0}| * huber_kappa(u_ij) / kappa`` with ``huber_kappa(u) = c (u - c / 2)``; a row's loss sums over
    i and averages over j, and its gradient is ``-mean_j |tau_i - 1{u_ij < 0}| c_ij / kappa``. The loss is
    the mean over rows, or ``sum(weights * row loss)`` (importance weights and the normalisation folded in
    by the caller, as for ``td_loss``); the gradient is scaled alike."""
    with torch.no_grad():
        u = targets.unsqueeze(1) - quantiles.unsqueeze(2)  # (rows, N, N')
        clipped = u.clamp(-kappa, kappa)
        tau = _fractions(quantiles.shape[1], quantiles).view(1, -1, 1)
        slope = (tau - (u < 0).to(u.dtype)).abs_().mul_(clipped)  # |tau - 1{u < 0}| * c: the pairwise slope
        per_row = (slope * u.sub_(clipped, alpha=0.5)).mean(dim=2).sum(dim=1).div_(kappa)  # u - c/2 in place
        grad = slope.mean(dim=2).mul_(-1.0 / kappa)
        if weights is None:
            scale: torch.Tensor | float = 1.0 / max(1, len(per_row))
            loss = per_row.sum() * scale
        else:
            scale = weights.unsqueeze(1)
            loss = (weights * per_row).sum()
        return loss, per_row, grad.mul_(scale)


class _QuantileHuberLoss(torch.autograd.Function):
    """The quantile Huber loss for autograd, with the gradient of :func:`quantile_huber_loss_and_grad`:
    autograd would keep several (rows, N, N') tensors for its backward, this keeps the (rows, N) gradient."""

    @staticmethod
    def forward(ctx, quantiles, targets, kappa, weights):  # type: ignore[override]
        loss, per_row, grad = quantile_huber_loss_and_grad(quantiles, targets, kappa, weights)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_row)
        return loss, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def quantile_huber_loss(quantiles: torch.Tensor, targets: torch.Tensor, kappa: float,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row loss) of :func:`quantile_huber_loss_and_grad`, differentiable in ``quantiles`` (not
    through the targets, the weights or the per-row loss, which prioritized replay reads)."""
    if torch.is_grad_enabled() and quantiles.requires_grad:
        return _QuantileHuberLoss.apply(quantiles, targets.detach(), kappa, weights)
    return quantile_huber_loss_and_grad(quantiles, targets, kappa, weights)[:2]


@dataclass(frozen=True)
class Quantile:
    """QR-DQN's head: ``num_atoms`` quantile values per action, learnt with the quantile Huber loss of
    threshold ``kappa``. The same methods as :class:`mpidqn.algo.categorical.Categorical`, so the learners
    treat both alike."""

    num_atoms: int
    kappa: float = 1.0

    def __post_init__(self) -> None:
        if self.num_atoms < 2:
            raise ValueError(f"num_atoms must be >= 2, got {self.num_atoms}")
        if not self.kappa > 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")

    def atoms(self, out: torch.Tensor) -> torch.Tensor:
        """The network's flat output as (rows, actions, atoms)."""
        return out.view(len(out), -1, self.num_atoms)

    def q_values(self, out: torch.Tensor) -> torch.Tensor:
        """The mean of each action's quantiles (rows, actions): what acting and double DQN's argmax use."""
        return self.atoms(out).mean(dim=2)

    def numpy_q_values(self, out: np.ndarray) -> np.ndarray:
        """:meth:`q_values` of a flat numpy output (the numpy actor's)."""
        return out.reshape(len(out), -1, self.num_atoms).mean(axis=2)

    def taken(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Quantiles of the taken actions (rows, atoms)."""
        return self.atoms(out)[torch.arange(len(out), device=out.device), actions]

    def targets(self, rewards: torch.Tensor, discounts: torch.Tensor, next_target: torch.Tensor,
                next_online: torch.Tensor | None = None) -> torch.Tensor:
        """Target quantiles ``r + discount * theta'_j`` (rows, atoms): the target net's quantiles at ``s'``
        for the action of the greatest mean under the target net or, given ``next_online``, the online net
        (double DQN). ``discounts`` is gamma**m, or 0 where the episode terminated (the target is r)."""
        best = self.q_values(next_online if next_online is not None else next_target).argmax(dim=1)
        return rewards.unsqueeze(1) + discounts.unsqueeze(1) * self.taken(next_target, best)

    def loss(self, taken: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-row loss): :func:`quantile_huber_loss`. Prioritized replay takes the per-row loss."""
        return quantile_huber_loss(taken, targets, self.kappa, weights)

    def loss_and_grad_out(self, out: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor,
                          weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-row loss, ``d loss / d out`` of the flat output) in one pass (the hand-written
        gradient's path): the taken actions' atoms get the gradient of :func:`quantile_huber_loss_and_grad`."""
        loss, per_row, grad = quantile_huber_loss_and_grad(self.taken(out, actions), targets, self.kappa, weights)
        return loss, per_row, taken_grad(out, actions, self.num_atoms, grad)
