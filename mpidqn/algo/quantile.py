"""Quantile regression DQN (QR-DQN, Dabney et al. 2018) as pure functions: the n-step target quantiles,
the quantile Huber loss and its gradient.

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
    (the ``grad_out`` of C51 and QR-DQN heads)."""
    grad = torch.zeros_like(out)
    grad.view(len(out), -1, num_atoms)[torch.arange(len(out), device=out.device), actions] = row_grad
    return grad


def _fractions(n: int, like: torch.Tensor) -> torch.Tensor:
    """The quantile midpoints ``(2 i + 1) / (2 n)``, i = 0 .. n-1."""
    return (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n


def quantile_huber_loss(quantiles: torch.Tensor, targets: torch.Tensor, kappa: float,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row loss) of the taken actions' ``quantiles`` (rows, N) against target quantiles
    (rows, N'), no gradient through the targets (Dabney et al. 2018, eq. 10; Dopamine's quantile agent).

    With ``u_ij = target_j - quantile_i``: ``rho_ij = |tau_i - 1{u_ij < 0}| * huber_kappa(u_ij) / kappa``;
    a row's loss sums over i and averages over j. The loss is the mean over rows, or ``sum(weights *
    row loss)`` (importance weights and the normalisation folded in by the caller, as for ``td_loss``)."""
    u = targets.detach().unsqueeze(1) - quantiles.unsqueeze(2)  # (rows, N, N')
    abs_u = u.abs()
    huber = torch.where(abs_u <= kappa, 0.5 * u * u, kappa * (abs_u - 0.5 * kappa))
    tau = _fractions(quantiles.shape[1], quantiles).view(1, -1, 1)
    per_row = ((tau - (u.detach() < 0).to(u.dtype)).abs() * huber).mean(dim=2).sum(dim=1) / kappa
    if weights is None:
        return per_row.sum() / max(1, len(per_row)), per_row
    return (weights * per_row).sum(), per_row


def quantile_huber_loss_grad(quantiles: torch.Tensor, targets: torch.Tensor, kappa: float,
                             weights: torch.Tensor | None = None) -> torch.Tensor:
    """``d quantile_huber_loss / d quantiles`` without autograd: ``-mean_j |tau_i - 1{u_ij < 0}| *
    clamp(u_ij, -kappa, kappa) / kappa`` per row, times ``1 / rows`` or the row weights."""
    u = targets.unsqueeze(1) - quantiles.unsqueeze(2)
    tau = _fractions(quantiles.shape[1], quantiles).view(1, -1, 1)
    grad = ((tau - (u < 0).to(u.dtype)).abs() * u.clamp(-kappa, kappa)).mean(dim=2).mul_(-1.0 / kappa)
    w = weights.unsqueeze(1) if weights is not None else 1.0 / max(1, len(quantiles))
    return grad.mul_(w)


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

    def grad_out(self, out: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
        """``d loss / d out`` of the flat output: the taken actions' atoms get
        :func:`quantile_huber_loss_grad`."""
        return taken_grad(out, actions, self.num_atoms,
                          quantile_huber_loss_grad(self.taken(out, actions), targets, self.kappa, weights))
