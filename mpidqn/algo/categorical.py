"""Distributional RL (C51, Bellemare et al. 2017) as pure functions: the support, the categorical
projection of the n-step target, the cross-entropy loss and its gradient.

A C51 network's output is flat, ``(rows, actions * num_atoms)`` logits (so the MLP's last Linear, the
hand-written MLP gradient and a pipeline's last stage need nothing new); :class:`Categorical` views it
as ``(rows, actions, num_atoms)`` and turns it into Q-values, targets and losses. Names follow Dopamine
(``num_atoms``, ``vmin``/``vmax`` as ``v_min``/``v_max``, ``project_distribution``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mpidqn.algo.quantile import Quantile, taken_grad


def project_distribution(rewards: torch.Tensor, discounts: torch.Tensor, probs: torch.Tensor,
                         support: torch.Tensor) -> torch.Tensor:
    """The categorical projection of ``r + discount * Z`` onto ``support`` (Bellemare et al. 2017, Alg. 1).

    ``probs`` (rows, atoms) is the distribution of Z on ``support`` (atoms,), evenly spaced from v_min to
    v_max; ``discounts`` is gamma**m for an m-step transition that did not terminate and 0 for one that
    did (all its mass lands on the projected reward). Each shifted atom ``clamp(r + d z_j, v_min, v_max)``
    splits its mass between the two nearest atoms in proportion to closeness, so every row's mass is
    kept. Returns (rows, atoms)."""
    atoms = support.numel()
    v_min, v_max = float(support[0]), float(support[-1])
    delta = (v_max - v_min) / (atoms - 1)
    tz = (rewards.unsqueeze(1) + discounts.unsqueeze(1) * support.unsqueeze(0)).clamp_(v_min, v_max)
    b = ((tz - v_min) / delta).clamp_(0, atoms - 1)  # rounding must not reach past the last atom
    lower, upper = b.floor(), b.ceil()
    to_upper = b - lower  # 0 when b is an atom: then all of it goes to lower (== upper)
    out = torch.zeros_like(probs)
    out.scatter_add_(1, lower.long(), probs * (1.0 - to_upper))
    out.scatter_add_(1, upper.long(), probs * to_upper)
    return out


def categorical_loss(logits: torch.Tensor, target_probs: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row cross-entropy) of the taken actions' ``logits`` (rows, atoms) against the projected
    targets: the mean over rows, or ``sum(weights * ce)`` (importance weights and the normalisation
    folded in by the caller, as for ``td_loss``). torch's fused log-softmax and cross-entropy."""
    per_row = F.cross_entropy(logits, target_probs, reduction="none")
    if weights is None:
        return per_row.sum() / max(1, len(per_row)), per_row
    return (weights * per_row).sum(), per_row


def categorical_loss_grad(logits: torch.Tensor, target_probs: torch.Tensor,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """``d categorical_loss / d logits`` without autograd: ``(softmax(logits) - target)`` per row, times
    ``1 / rows`` or the row weights (targets sum to 1 per row)."""
    grad = torch.softmax(logits, dim=1).sub_(target_probs)
    w = weights.unsqueeze(1) if weights is not None else 1.0 / max(1, len(logits))
    return grad.mul_(w)


@dataclass(frozen=True)
class Categorical:
    """C51's head: ``num_atoms`` atoms evenly spaced on ``[v_min, v_max]``."""

    num_atoms: int
    v_min: float
    v_max: float
    _supports: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # by device

    def __post_init__(self) -> None:
        if self.num_atoms < 2:
            raise ValueError(f"num_atoms must be >= 2, got {self.num_atoms}")
        if not self.v_min < self.v_max:
            raise ValueError(f"v_min {self.v_min} must be below v_max {self.v_max}")

    def support(self, device: torch.device | None = None) -> torch.Tensor:
        key = str(device)
        if key not in self._supports:
            self._supports[key] = torch.linspace(self.v_min, self.v_max, self.num_atoms, device=device)
        return self._supports[key]

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The network's flat output as (rows, actions, atoms)."""
        return out.view(len(out), -1, self.num_atoms)

    def q_values(self, out: torch.Tensor) -> torch.Tensor:
        """Expected values ``sum_j p_j z_j`` (rows, actions): what acting and double DQN's argmax use."""
        return torch.softmax(self.logits(out), dim=2) @ self.support(out.device)

    def numpy_q_values(self, out: np.ndarray) -> np.ndarray:
        """:meth:`q_values` of flat numpy logits (the numpy actor's)."""
        z = out.reshape(len(out), -1, self.num_atoms)
        e = np.exp(z - z.max(axis=2, keepdims=True))
        support = self.support().numpy()
        return (e @ support) / e.sum(axis=2)

    def taken(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Logits of the taken actions (rows, atoms)."""
        return self.logits(out)[torch.arange(len(out), device=out.device), actions]

    def targets(self, rewards: torch.Tensor, discounts: torch.Tensor, next_target: torch.Tensor,
                next_online: torch.Tensor | None = None) -> torch.Tensor:
        """Projected target distributions (rows, atoms): the target net's distribution at ``s'`` for the
        action of the greatest expected value under the target net (C51) or, given ``next_online``, the
        online net (double DQN, as in Rainbow)."""
        best = self.q_values(next_online if next_online is not None else next_target).argmax(dim=1)
        probs = torch.softmax(self.taken(next_target, best), dim=1)
        return project_distribution(rewards, discounts, probs, self.support(probs.device))

    def loss(self, taken: torch.Tensor, target_probs: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-row cross-entropy): :func:`categorical_loss`. Prioritized replay takes the per-row
        cross-entropy."""
        return categorical_loss(taken, target_probs, weights)

    def loss_and_grad_out(self, out: torch.Tensor, actions: torch.Tensor, target_probs: torch.Tensor,
                          weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-row cross-entropy, ``d loss / d out`` of the flat output) for the hand-written gradient's
        path: the taken actions' atoms get :func:`categorical_loss_grad`."""
        taken = self.taken(out, actions)
        loss, per_row = categorical_loss(taken, target_probs, weights)
        return loss, per_row, taken_grad(out, actions, self.num_atoms, categorical_loss_grad(taken, target_probs, weights))


def distribution_from_config(net: object) -> Categorical | Quantile | None:
    """The head of a NetworkConfig with ``distributional`` on (``distribution``: ``c51`` a
    :class:`Categorical`, ``qr`` a :class:`mpidqn.algo.quantile.Quantile`), else None (scalar Q)."""
    if not getattr(net, "distributional", False):
        return None
    if getattr(net, "distribution", "c51") == "qr":
        return Quantile(int(net.num_atoms), float(net.kappa))
    return Categorical(int(net.num_atoms), float(net.v_min), float(net.v_max))
