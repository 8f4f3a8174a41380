"""The mathematics of DQN as pure functions: TD targets, losses, schedules, target updates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F


def td_targets(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r + discount * Q_target(s', a*)``.

    ``discounts`` is gamma**m for transitions that did not *terminate* within their m steps and 0 for
    terminated ones, so time-limit truncation still bootstraps. ``a*`` is argmax of the target net
    (DQN) or, when ``next_q_online`` is given, of the online net (double DQN).
    """
    if next_q_online is None:
        next_v = next_q_target.max(dim=1).values
    else:
        best = next_q_online.argmax(dim=1, keepdim=True)
        next_v = next_q_target.gather(1, best).squeeze(1)
    return rewards + discounts * next_v


def action_gap_penalty(q_target_s: torch.Tensor, actions: torch.Tensor, alpha: float) -> torch.Tensor:
    """Advantage learning (Bellemare et al. 2016): ``alpha * (max_b Q_target(s, b) - Q_target(s, a))``,
    subtracted from the TD target of ``(s, a)``. It leaves the greedy action's target unchanged and
    lowers the others', widening the action gap so that small errors in Q cannot flip the greedy
    action (the fixed point's gaps are 1 / (1 - alpha) times those of Q*)."""
    taken = q_target_s.gather(1, actions.unsqueeze(1)).squeeze(1)
    return alpha * (q_target_s.max(dim=1).values - taken)


def target_regularization(q: torch.Tensor, q_target_s: torch.Tensor, kappa: float,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """``kappa * sum_a (Q(s, a) - Q_target(s, a))^2`` per row, averaged over the rows like ``td_loss``
    (the mean, or ``sum(weights * .)``): the functional regulariser of Piché et al. 2021, which holds
    every action's value near the target network's between refreshes."""
    per_row = (q - q_target_s).square().sum(dim=1)
    return kappa * (per_row.sum() / max(1, len(q)) if weights is None else (weights * per_row).sum())


def target_regularization_grad(q: torch.Tensor, q_target_s: torch.Tensor, kappa: float,
                               weights: torch.Tensor | None = None) -> torch.Tensor:
    """``d target_regularization / d q`` without autograd: ``2 kappa (q - q_target) / rows`` (or times
    the row weights)."""
    w = weights.unsqueeze(1) if weights is not None else 1.0 / max(1, len(q))
    return (q - q_target_s).mul_(2.0 * kappa).mul_(w)


def td_loss(q_taken: torch.Tensor, targets: torch.Tensor, kind: str = "huber",
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Huber (smooth L1, delta 1) or squared TD error; with ``weights``, ``sum(weights * loss_i)``
    (importance weights and the batch normalisation folded in by the caller)."""
    if kind not in ("huber", "mse"):
        raise ValueError(f"unknown loss {kind!r} (expected 'huber' or 'mse')")
    fn = F.smooth_l1_loss if kind == "huber" else F.mse_loss
    if weights is None:
        return fn(q_taken, targets)
    return (weights * fn(q_taken, targets, reduction="none")).sum()


def td_loss_grad(q_taken: torch.Tensor, targets: torch.Tensor, kind: str = "huber",
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``d td_loss / d q_taken`` without autograd: Huber's ``clamp(q - y, -1, 1)``, or ``2 (q - y)``, times
    ``1 / rows`` (mean) or ``weights``."""
    diff = q_taken - targets
    grad = diff.clamp_(-1.0, 1.0) if kind == "huber" else diff.mul_(2.0)
    if weights is None:
        return grad.mul_(1.0 / max(1, grad.numel()))
    return grad.mul_(weights)


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """Linear interpolation from ``start`` (t=0) to ``end`` (t>=duration)."""
    if duration <= 0:
        return end
    frac = min(max(t / duration, 0.0), 1.0)
    return start + frac * (end - start)


@dataclass(frozen=True)
class LinearSchedule:
    """``start_value`` at ``start_step``, linear to ``end_value`` at ``end_step``, constant after.

    Schedules are anchored in global env steps, so a resume that changes ``train.total_steps`` can
    re-anchor them (:meth:`extended`) without a jump.
    """

    start_step: float
    start_value: float
    end_step: float
    end_value: float

    def __call__(self, step: float) -> float:
        return linear_schedule(self.start_value, self.end_value, self.end_step - self.start_step,
                               step - self.start_step)

    def extended(self, step: float, end_step: float) -> "LinearSchedule":
        """The schedule continued from ``step`` (at its current value) to ``end_value`` at ``end_step``.

        When ``end_step`` is not after ``step`` the new horizon would force a jump, so the schedule
        is kept as it is (a shortened run finishes on the old slope)."""
        if end_step <= step:
            return self
        return LinearSchedule(step, self(step), end_step, self.end_value)

    def as_array(self) -> list[float]:
        return [self.start_step, self.start_value, self.end_step, self.end_value]

    @classmethod
    def from_array(cls, values: Iterable[float]) -> "LinearSchedule":
        a, b, c, d = (float(v) for v in values)
        return cls(a, b, c, d)


def update_rounds(prev: int, cur: int, train_freq: int, start: int) -> int:
    """Rounds of updates due when the global step advances from ``prev`` to ``cur``: one for every
    multiple of ``train_freq`` in ``(prev, cur]`` that is at least ``start``.

    A loop iteration advances the step by ``world * num_envs``, which may cross several multiples;
    each gets its round, so the number of updates per env step does not depend on the world size.
    """
    if cur < start:
        return 0
    lo = max(prev, start - 1)
    return max(0, cur // train_freq - lo // train_freq)


def resumed_updates_start(step: int, restored: int, learning_starts: int, capacity: int, slack: int,
                          min_fill: int) -> int:
    """The global step before which a run resumed at ``step`` with ``restored`` stored transitions (all
    ranks; 0: the checkpoint held no replay) must not update, beyond ``learning_starts``; 0: no wait.

    A run past ``learning_starts`` whose replay came back goes on updating at once, as if never stopped
    (issue #35: comparing stored transitions with the env-step threshold paused every requeue for
    thousands of steps when ``learning_starts`` exceeds the buffer, or equals it with frame storage,
    which stays a little under capacity). Before it, the replay must hold ``min(learning_starts,
    capacity) - slack`` transitions, ``slack`` being what a replay of that many steps may lack (pending
    n-step rows, frame-ring evictions). An empty replay collects ``min(learning_starts, capacity)``
    steps again, at least ``min_fill``.
    """
    target = min(learning_starts, capacity)
    if restored == 0:
        return step + max(target, min_fill)
    if step >= learning_starts:
        return 0
    missing = target - slack - restored
    return step + max(missing, min_fill) if missing > 0 else 0


def per_rank_epsilon(eps: float, rank: int, world: int, alpha: float) -> float:
    """Ape-X exploration spread: rank r explores with eps ** (1 + alpha * r / (world - 1))."""
    if world == 1:
        return eps
    return float(eps ** (1.0 + alpha * rank / (world - 1)))


@torch.no_grad()
def polyak_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], tau: float | torch.Tensor) -> None:
    """target <- (1 - tau) * target + tau * online, in place (tau = 1 copies). ``tau`` may be a 0-dim
    tensor on the parameters' device, which is never read back (e.g. 0 for a skipped update)."""
    target, online = list(target), list(online)
    with torch.no_grad():
        if isinstance(tau, torch.Tensor):
            torch._foreach_lerp_(target, online, [tau] * len(target))
        elif tau >= 1.0:
            torch._foreach_copy_(target, online)
        else:
            torch._foreach_lerp_(target, online, tau)
