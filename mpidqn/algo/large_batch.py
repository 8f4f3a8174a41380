"""The large-batch contract: a global batch of K x ``batch_size`` rows at the replay ratio of K = 1.

Wall time of a run is mostly ``updates x update time``. With a fixed global batch, more ranks only
split each update's rows, and an update of 16 rows costs almost what one of 64 costs, so ranks buy
little. The large-batch mode (``train.batch_scale`` = K, or ``train.batch_scope: per_rank`` with
K = world) multiplies the global batch by K and divides the updates per env step by K, so the
transitions sampled per env step (the replay ratio) stay the config's: K ranks each sample
``batch_size`` rows and do 1/K of the updates (Stooke & Abbeel 2018, arXiv 1803.02811).

What is counted in updates is rescaled so that it stays the same in env steps, and the step size
follows the batch. Every rule is a pure function of the K = 1 value and K; each is the identity at
K = 1, so the default config does not change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LrRule = Literal["none", "linear", "sqrt"]
MomentRule = Literal["none", "compound"]
ADAM_BETAS = (0.9, 0.999)  # Adam's betas at K = 1: torch's defaults (the config has no key for them)


def scaled_round(train_freq: int, gradient_steps: int, k: int) -> tuple[int, int]:
    """(env steps between rounds, updates per round) that keep ``gradient_steps / train_freq`` x K = 1's
    rows per env step with K times larger batches.

    K dividing ``gradient_steps`` keeps the round's spacing and does gradient_steps / K updates in it;
    otherwise the round is stretched by K / gcd: K = 3 with 128 updates every 256 steps gives 128
    updates every 768 steps. Either way ``updates x K / train_freq`` equals ``gradient_steps / train_freq``
    exactly, so no fraction of an update is lost or carried.
    """
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    g = math.gcd(k, gradient_steps)
    return train_freq * (k // g), gradient_steps // g


def scaled_target_interval(updates: int, k: int) -> int:
    """Hard target refresh every ``updates`` K = 1 updates, counted in env steps: every updates / K
    large-batch updates (rounded, at least 1)."""
    return max(1, round(updates / k))


def compounded(rate: float, k: int) -> float:
    """A per-update Polyak rate (``tau``) applied once per large-batch update so that it moves as far as
    K updates at ``rate`` would: 1 - (1 - rate) ** K (1 stays 1: hard updates)."""
    return 1.0 - (1.0 - rate) ** k


def compounded_decay(decay: float, k: int) -> float:
    """A per-update moving-average decay (``ema_decay``) over K times fewer updates: decay ** K
    (0, off, stays 0)."""
    return decay ** k if decay > 0.0 else 0.0


def moment_decays(rule: MomentRule, decays: tuple[float, ...], k: int) -> tuple[float, ...]:
    """The optimizer's moving-average decays (Adam's betas, RMSprop's alpha) for ``train.moment_scaling``:
    none keeps them per update; compound raises each to the power K, so that an average spans the env
    steps (and transitions) it spans at K = 1 over K times fewer updates (the rule of ``ema_decay``)."""
    if rule == "none":
        return tuple(decays)
    return tuple(d ** k for d in decays)


def lr_factor(rule: LrRule, k: int) -> float:
    """The learning-rate multiplier of ``train.lr_scaling`` for a batch K times larger: none 1,
    linear K (the SGD rule of Goyal et al. 2017), sqrt sqrt(K) (the Adam rule, Malladi et al. 2022)."""
    return {"none": 1.0, "linear": float(k), "sqrt": math.sqrt(k)}[rule]


def warmup_factor(step: int, start: int, warmup_steps: int) -> float:
    """Linear learning-rate warm-up over ``warmup_steps`` global env steps from ``start`` (the first
    update): 1 without warm-up or once it is over."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(step - start, 0) / warmup_steps)


@dataclass(frozen=True)
class BatchPlan:
    """What one run at batch scale K does: rows, rounds and the rescaled update-counted settings."""

    k: int
    global_batch: int
    train_freq: int
    gradient_steps: int
    target_update_interval: int
    tau: float
    ema_decay: float
    lr_factor: float
    adam_betas: tuple[float, float] = ADAM_BETAS
    rmsprop_alpha: float = 0.95

    @property
    def samples_per_env_step(self) -> float:
        """The replay ratio: transitions sampled per global env step (once learning has started)."""
        return self.gradient_steps * self.global_batch / self.train_freq

    @classmethod
    def build(cls, batch_size: int, k: int, train_freq: int, gradient_steps: int, target_update_interval: int,
              tau: float, ema_decay: float, lr_rule: LrRule, moment_rule: MomentRule,
              adam_betas: tuple[float, float], rmsprop_alpha: float) -> "BatchPlan":
        freq, updates = scaled_round(train_freq, gradient_steps, k)
        beta1, beta2, alpha = moment_decays(moment_rule, (*adam_betas, rmsprop_alpha), k)
        return cls(k=k, global_batch=k * batch_size, train_freq=freq, gradient_steps=updates,
                   target_update_interval=scaled_target_interval(target_update_interval, k),
                   tau=compounded(tau, k), ema_decay=compounded_decay(ema_decay, k), lr_factor=lr_factor(lr_rule, k),
                   adam_betas=(beta1, beta2), rmsprop_alpha=alpha)
