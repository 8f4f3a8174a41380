"""The learner interface (:class:`QLearner`) and what every learner shares (:class:`LearnerBase`).

The trainer, evaluation and checkpointing use a learner only through :class:`QLearner`, whatever its
layout (data parallel on the CPU or a device, or one pipeline stage): no code outside
``mpidqn.learners`` needs to know which class it holds.

:class:`LearnerBase` holds the online and target networks of this rank (the whole network or one
pipeline stage), the flat gradient buffer the parameters' ``.grad`` are views of, the optimizer (None
for a stage of parameter-free layers), the gradient reducer (see :mod:`mpidqn.learners.reducers`),
and the parts of an update that do not depend on the layout: the rounds of updates between target
updates, skip-or-stop on a non-finite loss or gradient, clipping, the optimizer and target steps, the
moving average of the parameters that evaluations use (``train.ema_decay``), the noise of noisy layers
(``network.noisy``: drawn per update from streams every replica shares, per acting step from the rank's
own stream, off in evaluations), the replica check, and the model state.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from mpidqn.algo.dqn import polyak_update_
from mpidqn.distributed import collectives as C
from mpidqn.distributed import watchdog
from mpidqn.errors import NonFiniteError, ReplicaDivergenceError
from mpidqn.io.h5tree import Json
from mpidqn.learners.optim import (
    Hyper,
    load_optimizer_state,
    make_optimizer,
    optimizer_hparams,
    set_optimizer_lr,
)
from mpidqn.learners.reducers import GradientReducer
from mpidqn.nn.noisy import learning_streams, noisy_modules, set_noise

# Model-state keys of the optimizer state (Adam or RMSprop) and its hyper-parameters. Model files
# written before RMSprop existed call them "adam" and "adam_hparams"; those are still read.
OPTIMIZER_KEY, HPARAMS_KEY = "optimizer", "optimizer_hparams"
LEGACY_OPTIMIZER_KEY, LEGACY_HPARAMS_KEY = "adam", "adam_hparams"


def optimizer_entries(state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(optimizer state by parameter name, hyper-parameters) of a model state, new or legacy keys."""
    opt = state.get(OPTIMIZER_KEY, state.get(LEGACY_OPTIMIZER_KEY, {}))
    hparams = state[HPARAMS_KEY] if HPARAMS_KEY in state else state[LEGACY_HPARAMS_KEY]
    return opt, hparams.value if isinstance(hparams, Json) else hparams


@dataclass(frozen=True)
class RoundPlan:
    """How a round's rows divide into updates and weigh in the loss (global or prioritized replay).

    Without a plan every rank brings ``num_updates`` equal slices and the loss of an update is the mean
    over its rows. With one, rank ``s`` of this rank's pipeline group (``s = 0`` alone in pure data
    parallelism) brings ``counts[u, s]`` rows to update ``u`` (0 allowed), its rows of the round in
    update order, and the loss of an update is ``sum_i weights[i] * loss_i`` over the group's rows:
    ``weights`` already holds the importance weight and the normalisation (``dp / global batch``, so that
    the average over the data-parallel replicas is the weighted mean over the global batch).
    """

    counts: np.ndarray
    """(U, S) int64 rows per update of each rank of the pipeline group (S = 1: this rank's alone)."""
    weights: np.ndarray
    """(rows of this rank,) float32 loss weight of every row this rank brings."""
    td_errors: bool = False
    """Return ``|target - Q(s, a)|`` of this rank's rows (for priority write-back)."""

    def bounds(self) -> np.ndarray:
        """(U + 1,) offsets of the updates in the group's update-major rows."""
        return np.concatenate([[0], np.cumsum(self.counts.sum(axis=1))]).astype(np.int64)


def equal_bounds(rows: int, num_updates: int) -> np.ndarray:
    """(U + 1,) offsets of ``num_updates`` equal slices of ``rows``."""
    n = rows // num_updates
    return np.arange(num_updates + 1, dtype=np.int64) * n


def replica_metrics(sums: np.ndarray, comm: Any, nonfinite_skipped: float) -> dict[str, float]:
    """The logged metrics of the global batch from this replica's ``[loss sum, updates with a finite loss,
    Q(s, a) sum, rows of those updates]``, summed over the data-parallel replicas ``comm`` (a collective):
    the mean loss of an update and the mean Q(s, a) of a row, what one process holding every replica's
    rows would log. Q is averaged over rows, not over updates, so a replica that drew no row of an
    update (global sampling) does not pull it towards 0 (issue #35). NaN where nothing ran."""
    loss, updates, q, rows = C.allreduce_array(np.asarray(sums, np.float64), comm, phase="metrics allreduce")
    return {"loss": loss / updates if updates else float("nan"), "q_mean": q / rows if rows else float("nan"),
            "nonfinite_skipped": float(nonfinite_skipped)}


@dataclass(frozen=True)
class GreedyPolicy:
    """How a learner acts greedily. ``collective=False``: ``act(obs) -> actions``, local to this rank.
    ``collective=True``: ``act(obs) -> (actions, group rows)`` is a collective over the pipeline group;
    every rank keeps calling it (with no rows once it is idle) until the group's rows are 0."""

    act: Callable[[np.ndarray], Any]
    collective: bool


@runtime_checkable
class QLearner(Protocol):
    """What the trainer, evaluation and checkpointing use of a learner."""

    hyper: Hyper
    updates: int  # optimizer updates taken (the same on every rank)
    nonfinite_skipped: int  # updates skipped for a NaN/Inf loss or gradient (train.nonfinite=skip)
    params: list[torch.Tensor]  # this rank's parameters (possibly none: a stage of parameter-free layers)
    collective_acting: bool  # greedy_actions is a collective over the pipeline group

    @property
    def lr(self) -> float:
        """The current learning rate (also on a rank whose stage has no parameters)."""

    @property
    def total_parameters(self) -> int:
        """Parameters of the whole Q-network (all stages)."""

    @property
    def comm_seconds(self) -> float:
        """Seconds spent communicating in updates so far (reductions, and a pipeline's transfers)."""

    def set_lr(self, lr: float) -> None: ...

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray: ...

    def greedy_policy(self) -> GreedyPolicy: ...

    def update_many(self, batch: Any, num_updates: int, plan: RoundPlan | None = None) -> np.ndarray | None: ...

    def pop_metrics(self) -> dict[str, float]: ...

    def check_replicas(self) -> None: ...

    def evaluation_weights(self) -> Any:
        """Context manager: inside it the greedy policy uses the weights evaluations judge (the moving
        average of the parameters with ``train.ema_decay``, else the online ones). Collective-free."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def bind_flat_grad(params: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """One contiguous gradient buffer; every parameter's ``.grad`` becomes a view of it, so backward
    accumulates into it and a reduction needs no packing (DDP's gradient_as_bucket_view trick)."""
    flat = torch.zeros(sum(p.numel() for p in params), device=device)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def to_cpu(tree: Any) -> Any:
    """Tensors of a nested dict on the CPU (CPU tensors are returned as they are, no copy)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    return tree


class LearnerBase(ABC):
    """Shared by the data-parallel and the pipeline learner (see the module docstring).

    Subclasses call :meth:`_init_nets`, set ``self.reducer`` and implement ``_prepare_round``,
    ``_round_targets``, ``_learn``, ``greedy_actions`` and ``pop_metrics``.
    """

    collective_acting = False
    device: torch.device | None = None  # None: the CPU
    reducer: GradientReducer

    def _init_nets(self, online: nn.Module, hyper: Hyper, comm: Any, device: str | torch.device = "cpu") -> None:
        self.online, self.hyper, self.comm = online, hyper, comm
        self.params = list(online.parameters())
        self.param_names = [n for n, _ in online.named_parameters()]
        C.broadcast_tensors_(self.params, comm)  # replicas start identical (fixed parameter order)
        self.target = copy.deepcopy(online).requires_grad_(False)
        dev = torch.device(device)
        if dev.type != "cpu":  # module.to keeps the Parameter objects (the optimizer's and the buffer's)
            self.device = dev
            self.online.to(dev)
            self.target.to(dev)
        self.flat_grad = bind_flat_grad(self.params, dev)
        self._init_noise(hyper.noise_seed)
        # A stage of parameter-free layers has nothing to optimise (torch refuses an empty optimizer).
        self.optimizer = make_optimizer(self.params, hyper) if self.params else None
        self._lr = float(hyper.lr)
        self._total_parameters = int(self.flat_grad.numel())
        self._updates = 0
        self._nonfinite_skipped = 0
        self._local_nonfinite = False  # this rank's loss of the current update was NaN/Inf
        # Device-side skip (see step): a learner that sets it decides skip-or-take on the device, and
        # _pending holds the "skipped" flags (0-dim bool tensors) of the updates the host has not read yet.
        self._device_skip = False
        self._pending: list[torch.Tensor] = []
        self._steps = 0  # step() calls, never reset: the weights may have changed when it changes
        self._loads = 0
        # the moving average of this rank's parameters (train.ema_decay > 0), None until the first update
        self.ema: list[torch.Tensor] | None = None

    def _init_noise(self, seed: int) -> None:
        """Noisy layers (network.noisy): one learning-noise stream per layer of each net, named
        ``online.<layer>`` / ``target.<layer>`` by global layer name; the acting stream (``act_noise``,
        this rank's own) is handed in by :meth:`use_acting_noise`."""
        self._noisy = noisy_modules(self.online, "online.") + noisy_modules(self.target, "target.")
        self.noise_streams = learning_streams(seed, [n for n, _ in self._noisy])
        self.act_noise: np.random.Generator | None = None
        self._acting_noise = True  # False inside evaluation_weights: the mean weights act

    def use_acting_noise(self, rng: np.random.Generator) -> None:
        """Act with noise drawn from ``rng`` (this rank's stream; the caller keeps and checkpoints it)."""
        self.act_noise = rng

    def _resample_learning_noise(self) -> None:
        """New noise for every noisy layer of both nets, from the streams every replica shares."""
        for name, m in self._noisy:
            m.resample(self.noise_streams[name])

    def _resample_acting_noise(self) -> None:
        """New noise for the online net's noisy layers from this rank's acting stream (none while evaluating)."""
        if self.act_noise is not None and self._acting_noise:
            for name, m in self._noisy:
                if name.startswith("online."):
                    m.resample(self.act_noise)

    # ------------------------------------------------------------------ interface
    @property
    def updates(self) -> int:
        """Optimizer updates taken (skipped ones not counted; the same on every rank)."""
        self._resolve()
        return self._updates

    @property
    def nonfinite_skipped(self) -> int:
        """Updates skipped for a NaN/Inf loss or gradient."""
        self._resolve()
        return self._nonfinite_skipped

    @property
    def lr(self) -> float:
        return self._lr

    def set_lr(self, lr: float) -> None:
        self._lr = float(lr)
        if self.optimizer is not None:
            set_optimizer_lr(self.optimizer, lr)

    @property
    def total_parameters(self) -> int:
        return self._total_parameters

    @property
    def comm_seconds(self) -> float:
        return self.reducer.seconds

    def greedy_policy(self) -> GreedyPolicy:
        return GreedyPolicy(self.greedy_actions, collective=False)

    # ------------------------------------------------------------------ learning
    def update_many(self, batch: Any, num_updates: int, plan: RoundPlan | None = None) -> np.ndarray | None:
        """``num_updates`` updates on consecutive slices of a batch: equal slices of ``sample_many``, or
        the slices and loss weights of ``plan``. Returns ``|TD error|`` of this rank's rows when the plan
        asks for them (priority write-back), else None.

        Without double DQN and with hard target updates, the target network is constant between
        two target updates, so the targets of all minibatches up to the next target update are
        computed in one batched pass (same values, far fewer small matmuls).
        """
        self._resolve()  # the previous round's skips (a device learner): the schedule below counts them
        data, b = self._prepare_round(batch, num_updates, plan)
        h = self.hyper
        # noisy layers draw new noise per update, so each update's targets need their own pass
        batch_targets = not h.double_dqn and h.tau >= 1.0 and not self._noisy
        i = 0
        while i < num_updates:
            span = (h.target_update_interval - self._scheduled % h.target_update_interval) if batch_targets else 1
            span = min(span, num_updates - i)
            if self._noisy:
                self._resample_learning_noise()
            targets = self._round_targets(data, slice(int(b[i]), int(b[i + span])))
            for j in range(span):
                lo, hi = int(b[i + j]), int(b[i + j + 1])
                t = targets[lo - b[i]:hi - b[i]] if targets is not None else None
                self._learn(data, slice(lo, hi), t)
            i += span
        return self._td_errors(data) if plan is not None and plan.td_errors else None

    @abstractmethod
    def _prepare_round(self, batch: Any, num_updates: int, plan: RoundPlan | None) -> tuple[Any, np.ndarray]:
        """The round's data as this learner needs it, and the (U + 1,) row offsets of the updates."""

    @abstractmethod
    def _td_errors(self, data: Any) -> np.ndarray:
        """``|TD error|`` of this rank's rows of the round (in the order it brought them)."""

    @abstractmethod
    def _round_targets(self, data: Any, rows: slice) -> torch.Tensor | None:
        """TD targets of ``rows`` (None on a rank that does not compute them)."""

    @abstractmethod
    def _learn(self, data: Any, rows: slice, targets: torch.Tensor | None) -> None:
        """One update on ``rows``: backward, reduce, step."""

    @abstractmethod
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions of this rank's observations."""

    @abstractmethod
    def pop_metrics(self) -> dict[str, float]:
        """Mean loss and Q(s, a) since the last call, and the skipped-update count."""

    def reduce_gradients(self) -> None:
        """Average ``flat_grad`` over the replicas (the reducer strategy; carries a non-finite loss)."""
        self.reducer.reduce(self._local_nonfinite)

    @property
    def _scheduled(self) -> int:
        """The update count the target refresh and the replica checks follow: the updates taken, plus
        the steps of this round whose skip flags are still on the device (counted as taken)."""
        return self._updates + len(self._pending)

    def _resolve(self) -> None:
        """Read the pending skip flags (one device synchronisation) into the host's counts."""
        if self._pending:
            skipped = int(torch.stack(self._pending).sum())
            n = len(self._pending)
            self._pending.clear()
            self._updates += n - skipped
            self._nonfinite_skipped += skipped

    def step(self) -> None:
        """Clip the reduced gradient by the global norm, step, update the target network.

        The reducer guarantees that a NaN/Inf loss or gradient on any rank makes the norm non-finite
        on every rank that must agree, so skip-or-stop is decided in lockstep.
        """
        self._steps += 1
        if self._device_skip:
            self._step_on_device()
            return
        norm = self.reducer.grad_norm()
        if not math.isfinite(norm):
            self._nonfinite_update()
            return
        h = self.hyper
        if h.max_grad_norm is not None and norm + 1e-6 > h.max_grad_norm:
            self.flat_grad.mul_(h.max_grad_norm / (norm + 1e-6))
        self._updates += 1
        if self.optimizer is not None:  # None: a pipeline stage of parameter-free layers
            self.optimizer.step()
        self._after_step()

    def _step_on_device(self) -> None:
        """:meth:`step` without reading anything back from the device (train.nonfinite=skip, fused Adam).

        The norm, the clip factor and "skip" stay device tensors: fused Adam skips its step when
        ``found_inf`` is 1 (torch's AMP mechanism, also resetting its step count), and the moving
        average and a Polyak target move with a weight that is 0 on a skipped update. The flag joins
        ``_pending``, which the host reads at the next round (``update_many``) or when it asks for the
        counts. Within a round every step counts as taken for the hard target refresh and the replica
        checks (``_scheduled``), so a round with a skipped update may refresh the target one update
        early; apart from that the updates are those of :meth:`step`, bit for bit where nothing is
        skipped (the clip factor is computed in float64 as there).
        """
        h = self.hyper
        norm = self.reducer.grad_norm_tensor()
        skip = ~torch.isfinite(norm)
        if h.max_grad_norm is not None:
            self.flat_grad.mul_(torch.clamp(h.max_grad_norm / (norm.double() + 1e-6), max=1.0))
        self.optimizer.found_inf = skip.float()
        self.optimizer.step()
        self._pending.append(skip)
        self._after_step(taken=(~skip).float())

    def _after_step(self, taken: torch.Tensor | None = None) -> None:
        """After the optimizer step: the moving average, the target network, the replica check.

        ``taken`` is None on the host path (the step was taken); on the device path it is a 0-dim
        device flag, 0 for a skipped step, by which the average and a Polyak target move. The hard
        refresh and the replica check follow ``_scheduled`` (on the host path: the updates taken)."""
        h = self.hyper
        if self.optimizer is not None:
            if h.ema_decay > 0.0:
                self._ema_step(h.ema_decay, taken)
            if h.tau < 1.0:
                polyak_update_(self.target.parameters(), self.params, h.tau if taken is None else taken * h.tau)
            elif self._scheduled % h.target_update_interval == 0:
                polyak_update_(self.target.parameters(), self.params, 1.0)
        if h.sync_check_interval and self._scheduled % h.sync_check_interval == 0:
            self.check_replicas()

    def _ema_step(self, decay: float, taken: torch.Tensor | None = None) -> None:
        """``avg += (1 - decay) * (online - avg)``; the first update taken starts the average at the
        parameters. ``taken``: see :meth:`_after_step` (read back only until the average exists)."""
        if self.ema is None:
            if taken is None or bool(taken):
                self.ema = [p.detach().clone() for p in self.params]
        else:
            polyak_update_(self.ema, self.params, (1.0 - decay) if taken is None else taken * (1.0 - decay))

    @contextmanager
    def evaluation_weights(self):
        """Evaluate with the mean weights of noisy layers (noise off, the acting stream untouched) and
        the moving average of the parameters where one is kept; both come back as they were."""
        online = [m for name, m in self._noisy if name.startswith("online.")]
        before = set_noise(online, False)
        self._acting_noise = False
        try:
            with self._average_weights():
                yield
        finally:
            self._acting_noise = True
            for m, on in zip(online, before):
                m.noise_on = on

    @contextmanager
    def _average_weights(self):
        """Swap the moving average into the online parameters for the duration (a no-op without one or
        before the first update), so every greedy path (torch, the numpy actor, a pipeline stage) acts
        with it; the online parameters come back exactly, also on an exception."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.ema)
        self._loads += 1  # a new weights version: greedy paths that cache the weights refresh
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)
            self._loads += 1

    def _nonfinite_update(self) -> None:
        """Skip this update (count it) or, with train.nonfinite=stop, raise on every rank in lockstep."""
        if self.hyper.nonfinite == "stop":
            raise NonFiniteError(f"NaN/Inf in the loss or gradients at update {self.updates + 1} "
                                 f"({self._nonfinite_where()}); train.nonfinite=stop")
        self.flat_grad.zero_()
        self._nonfinite_skipped += 1

    def _nonfinite_flags(self) -> list[bool]:
        """Every replica's "my loss was non-finite" flag (a collective over the replicas)."""
        if self.comm.Get_size() == 1:
            return [self._local_nonfinite]
        with watchdog.guard(self.comm, "non-finite diagnosis"):
            return self.comm.allgather(self._local_nonfinite)

    def _nonfinite_where(self) -> str:
        """Which ranks had a non-finite loss (a collective over the replicas)."""
        flags = self._nonfinite_flags()
        ranks = [r for r, bad in enumerate(flags) if bad]
        return f"non-finite loss on rank(s) {ranks}" if ranks else "finite losses, non-finite gradient"

    # ------------------------------------------------------------------ replicas
    def check_replicas(self) -> None:
        """Raise ReplicaDivergenceError naming the first tensor that differs between replicas."""
        bad = C.first_divergent(C.tensor_fingerprints([p.detach().cpu() for p in self.params]), self.comm)
        msg = None if bad is None else (
            f"{self._replicas_label()} diverged after {self.updates} updates: "
            f"parameter {self.param_names[bad]!r} differs between ranks")
        msg = self._agree_message(msg)
        if msg is not None:
            raise ReplicaDivergenceError(msg)

    def _replicas_label(self) -> str:
        return "data-parallel replicas"

    def _layers_label(self) -> str:
        return ""

    def _agree_message(self, msg: str | None) -> str | None:
        """The divergence message every rank that must stop together raises (a pipeline's whole group)."""
        return msg

    # ------------------------------------------------------------------ state
    def _optimizer_hparams(self) -> dict[str, Any]:
        if self.optimizer is not None:
            return optimizer_hparams(self.optimizer)
        # a parameter-free stage: ask torch for the chosen optimizer's hparams on a throw-away tensor
        return optimizer_hparams(make_optimizer([torch.zeros(1, requires_grad=True)], self.hyper, lr=self._lr))

    def state_dict(self) -> dict[str, Any]:
        """Parameters, their moving average (when kept) and optimizer state (Adam or RMSprop) keyed by
        GLOBAL parameter name, on the CPU, so any layout (another S) can re-partition them."""
        opt = {}
        if self.optimizer is not None:
            opt = {self.param_names[i]: dict(st) for i, st in self.optimizer.state_dict()["state"].items()}
        extra = {} if self.ema is None else {"ema": dict(zip(self.param_names, self.ema))}
        if self.noise_streams:  # exact resume draws the same noise (global layer names: any layout)
            extra["noise"] = {n: Json(g.bit_generator.state) for n, g in self.noise_streams.items()}
        return to_cpu({
            **extra,
            "online": dict(self.online.state_dict()),
            "target": dict(self.target.state_dict()),
            OPTIMIZER_KEY: opt,
            HPARAMS_KEY: Json(self._optimizer_hparams()),
            "updates": self.updates,
            "nonfinite_skipped": self.nonfinite_skipped,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's share of a (merged, any-layout) model state; legacy "adam" keys are read."""
        mine = list(self.online.state_dict())
        missing = [k for k in mine if k not in state["online"]]
        if missing:
            raise KeyError(f"model state lacks parameters {missing}{self._layers_label()}")
        opt, hparams = optimizer_entries(state)
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, self.hyper, self.param_names, opt, hparams)
        self.online.load_state_dict({k: state["online"][k] for k in mine})
        self.target.load_state_dict({k: state["target"][k] for k in mine})
        # the average (absent before the first update or without train.ema_decay) restarts when missing
        ema = state.get("ema") or {}
        self.ema = None
        if self.hyper.ema_decay > 0.0 and all(n in ema for n in self.param_names) and self.param_names:
            self.ema = [ema[n].to(p.device, p.dtype).clone() for n, p in zip(self.param_names, self.params)]
        noise = state.get("noise") or {}
        for name, stream in self.noise_streams.items():
            if name in noise:  # absent: a checkpoint of a run without noisy layers keeps the fresh streams
                stream.bit_generator.state = noise[name].value if isinstance(noise[name], Json) else noise[name]
        self._lr = float(hparams.get("lr", self._lr))
        self._loads += 1
        self._pending.clear()  # flags of updates before the load
        self._updates = int(state["updates"])
        self._nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
