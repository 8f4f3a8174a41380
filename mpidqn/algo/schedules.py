"""The run's epsilon and learning-rate schedules in global env steps, and how they survive a resume.

Both are linear decays defined by the config as fractions of ``train.total_steps``. A resume may
change ``total_steps`` (to extend a run); the schedules are then re-anchored at the resume step so
epsilon and the learning rate continue from where they were instead of jumping (issue: extending a
run made epsilon rise again and the learning rate jump up).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpidqn.algo.dqn import LinearSchedule


@dataclass(frozen=True)
class Schedules:
    epsilon: LinearSchedule
    """Exploration epsilon (before the Ape-X per-rank spread)."""
    lr_factor: LinearSchedule
    """Multiplier of the base learning rate."""
    beta: LinearSchedule
    """Importance-weight exponent of prioritized replay, annealed to 1 at the end of the run."""

    @classmethod
    def from_config(cls, train: Any) -> "Schedules":
        x = train.exploration
        beta = train.priority_beta if train.priority_beta is not None else 0.4
        return cls(LinearSchedule(0, x.eps_start, x.eps_fraction * train.total_steps, x.eps_end),
                   LinearSchedule(0, 1.0, train.total_steps, train.lr_final_fraction),
                   LinearSchedule(0, beta, train.total_steps, 1.0))

    def resumed(self, step: int, train: Any) -> "Schedules":
        """These (checkpointed) schedules continued under ``train`` from ``step``: unchanged when the
        horizon is the same, else re-anchored at ``step`` towards the new horizon."""
        fresh = Schedules.from_config(train)
        eps = self.epsilon if fresh.epsilon.end_step == self.epsilon.end_step else \
            self.epsilon.extended(step, fresh.epsilon.end_step)
        lr = self.lr_factor if fresh.lr_factor.end_step == self.lr_factor.end_step else \
            self.lr_factor.extended(step, fresh.lr_factor.end_step)
        beta = self.beta if fresh.beta.end_step == self.beta.end_step else self.beta.extended(step, fresh.beta.end_step)
        return Schedules(eps, lr, beta)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"epsilon": np.array(self.epsilon.as_array()), "lr_factor": np.array(self.lr_factor.as_array()),
                "beta": np.array(self.beta.as_array())}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], train: Any) -> "Schedules":
        """Saved schedules; a checkpoint written before beta existed takes it from ``train``."""
        beta = LinearSchedule.from_array(state["beta"]) if "beta" in state else cls.from_config(train).beta
        return cls(LinearSchedule.from_array(state["epsilon"]), LinearSchedule.from_array(state["lr_factor"]), beta)
