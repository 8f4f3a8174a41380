"""Data-parallel learner: online/target nets, Adam or RMSprop, ONE flat gradient buffer averaged by a reducer.

On the CPU by default; with a device (``cuda:<n>``) the networks and the gradient buffer live there
(replay stays in host memory). How the buffer is reduced is the reducer's business (see
:mod:`mpidqn.learners.reducers`): one fused Allreduce, buckets overlapped with backward, or host-staged
for a device buffer. On a device the update reads nothing back (``device_skip``) and the batch travels
through pinned memory (:class:`PinnedStaging`). The CUDA path is tested by ``tests/learners/test_cuda.py``
where a GPU is visible (last run on an H200, 2026-11-26, before those two were added; skip-or-take on
the device runs forced on the CPU in ``tests/learners/test_device_skip.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from mpidqn.algo.dqn import (action_gap_penalty, target_regularization, target_regularization_grad, td_loss,
                             td_loss_grad, td_targets)
from mpidqn.learners.base import LearnerBase, RoundPlan, equal_bounds, replica_metrics
from mpidqn.learners.mlp_kernel import MLPKernel
from mpidqn.learners.optim import Hyper
from mpidqn.learners.reducers import make_reducer
from mpidqn.nn.actor import NUMPY_ROWS, NumpyActor

__all__ = ["Hyper", "Learner"]  # Hyper: the learner's constructor argument, importable beside it


def _as_tensors(batch: Any) -> tuple[torch.Tensor, ...]:
    """numpy Batch -> CPU tensors sharing memory (no copies; obs cast to float32 if stored as uint8)."""
    obs = torch.from_numpy(batch.obs)
    next_obs = torch.from_numpy(batch.next_obs)
    if obs.dtype != torch.float32:
        obs, next_obs = obs.float(), next_obs.float()
    return (obs, torch.from_numpy(batch.actions).long(), torch.from_numpy(batch.rewards),
            next_obs, torch.from_numpy(batch.discounts))


class PinnedStaging:
    """A round's host arrays copied to a device asynchronously, through page-locked host buffers.

    A copy from pageable memory makes the host wait for it; from pinned memory it is queued on the
    stream and the host goes on to queue the update's kernels. Two sets of buffers alternate (a round
    writes one while the previous round's copy may still read the other); before a set is written
    again, the host waits for the event recorded after its last copy. Buffers grow to the largest
    round seen (a prioritized or global plan brings a varying number of rows)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: list[list[torch.Tensor]] = [[], []]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        i, self.turn = self.turn, self.turn ^ 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        bufs, out = self.buffers[i], []
        for k, a in enumerate(arrays):
            a = np.ascontiguousarray(a)
            if k == len(bufs) or bufs[k].shape[1:] != a.shape[1:] or bufs[k].shape[0] < len(a) \
                    or bufs[k].numpy().dtype != a.dtype:
                buf = torch.from_numpy(np.empty(a.shape, a.dtype)).pin_memory()
                bufs[k:k + 1] = [buf]
            view = bufs[k][:len(a)]
            view.numpy()[...] = a
            out.append(view.to(self.device, non_blocking=True))
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        return out


_FOLD = 256  # updates between two folds of the loss and Q metrics into their sums


@dataclass
class _Round:
    """A round of updates on this replica: the batch as tensors, the plan's loss weights, the TD errors."""

    tensors: tuple[torch.Tensor, ...]  # obs, actions, rewards, next_obs, discounts
    weights: torch.Tensor | None  # per-row loss weights (RoundPlan), None: mean loss
    td: torch.Tensor | None  # |TD error| per row, filled by the updates when the plan asks for it


class Learner(LearnerBase):
    """Owns the networks and the optimizer; every replica of ``comm`` takes the identical step.

    ``device``: "cpu" or "cuda:<n>" (parameters are broadcast on the CPU first). ``overlap``: reduce the
    gradient in buckets during backward (``bucket_bytes`` each) instead of one Allreduce after it.
    ``mlp_kernel``: a plain MLP on the CPU without overlap computes its gradient with
    :class:`~mpidqn.learners.mlp_kernel.MLPKernel` instead of autograd (same gradient, less overhead).
    ``hyper.compile_network``: the update's forward and backward run ``torch.compile(online)`` (no kernel).
    """

    def __init__(self, online: nn.Module, hyper: Hyper, comm: Any, device: str = "cpu", overlap: bool = False,
                 bucket_bytes: int = 2 << 20, mlp_kernel: bool = True, device_skip: bool | None = None) -> None:
        self._init_nets(online, hyper, comm, device)
        self.reducer = make_reducer(self.flat_grad, self.params, comm, overlap, bucket_bytes)
        # Skip-or-take decided on the device (LearnerBase._step_on_device): by default on a GPU, where
        # each read-back stalls the queue of kernels; it needs fused Adam (found_inf), train.nonfinite=skip
        # (stop names the ranks at once) and a reduction that is not overlapped (whose buckets are poisoned
        # from the host before backward). device_skip=True forces it (tests run it on the CPU).
        able = hyper.optimizer == "adam" and hyper.nonfinite == "skip" and not overlap
        if device_skip and not able:
            raise ValueError("device_skip needs optimizer adam, nonfinite skip and no overlapped reduction")
        self._device_skip = able and (self.device is not None if device_skip is None else device_skip)
        self._staging = PinnedStaging(self.device) if self.device is not None and self.device.type == "cuda" else None
        layers = list(online.children()) if isinstance(online, nn.Sequential) and self.device is None else []
        use_kernel = mlp_kernel and not overlap and not hyper.compile_network and MLPKernel.supports(layers)
        self._kernel = MLPKernel(layers) if use_kernel else None
        # the update's forward: compiled (train.compile_network; backward compiled with it) or eager
        self._forward = torch.compile(self.online) if hyper.compile_network else self.online
        # the networks' no-grad forwards for the TD targets: the kernel's where it applies, else the modules
        self._online_q, self._target_q = (
            (partial(self._kernel.forward, keep=False), partial(MLPKernel(list(self.target.children())).forward,
                                                                 keep=False))
            if use_kernel else (self.online, self.target))
        self._loss_sum = torch.zeros((), device=self.device)
        self._q_sum = torch.zeros((), device=self.device)  # Q(s, a) summed over the rows
        self._metric_count = torch.zeros((), dtype=torch.int64, device=self.device)  # updates with a finite loss
        self._q_count = torch.zeros((), dtype=torch.int64, device=self.device)  # their rows
        # Per update, folded into the sums every _FOLD updates (one op, not one each); a non-finite loss
        # is left out at the fold, on the device, so no update reads its loss back for the metrics.
        self._losses: list[torch.Tensor] = []  # the loss of each update
        self._q_rows: list[torch.Tensor] = []  # Q(s, a) of the rows of each update with rows
        self._q_losses: list[torch.Tensor] = []  # the loss of each _q_rows entry's update
        cat = hyper.distribution  # C51 / QR-DQN: the network's output is flat atoms, Q computed from them
        self._actor = NumpyActor.mirror(online, cat) if self.device is None else None
        self._q_values = (lambda out: out) if cat is None else cat.q_values

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        # one acting-noise draw per call on either path (the numpy actor reads the layers' buffers)
        self._resample_acting_noise()
        if self._actor is not None and len(obs) <= NUMPY_ROWS:  # small batches: numpy beats torch's overhead
            self._actor.refresh(self.weights_version)
            return self._actor.greedy(obs)
        x = torch.from_numpy(np.asarray(obs, dtype=np.float32))
        if self.device is not None:
            return self._q_values(self.online(x.to(self.device))).argmax(dim=1).cpu().numpy()
        return self._q_values(self.online(x)).argmax(dim=1).numpy()

    @property
    def weights_version(self) -> tuple[int, int]:
        """Changes whenever the online parameters may have changed (updates or a loaded state)."""
        return (self._loads, self._steps)

    # ------------------------------------------------------------------ learning
    def targets(self, rewards, next_obs, discounts, obs=None, actions=None) -> torch.Tensor:
        """TD targets with the current networks (no gradient); ``obs`` and ``actions`` are needed with
        ``advantage_learning``."""
        with torch.no_grad():
            next_online = self._online_q(next_obs) if self.hyper.double_dqn else None
            if self.hyper.distribution is not None:  # target distributions (rows, atoms)
                return self.hyper.distribution.targets(rewards, discounts, self._target_q(next_obs), next_online)
            y = td_targets(rewards, discounts, self._target_q(next_obs), next_online)
            if self.hyper.advantage_learning > 0:
                y -= action_gap_penalty(self._target_q(obs), actions, self.hyper.advantage_learning)
            return y

    def backward(self, obs, actions, targets, weights: torch.Tensor | None = None,
                 td_out: torch.Tensor | None = None) -> torch.Tensor:
        """Local loss and gradient into ``flat_grad`` (overwritten). Returns the detached loss.

        ``weights``: per-row loss weights (the loss is their weighted sum, see RoundPlan); ``td_out``
        receives ``|target - Q(s, a)|`` of the rows. No rows (a rank with no share of a global batch)
        give a zero loss and gradient, and the replica still joins the reduction.

        The loss's finiteness is known before backward and handed to the reducer, which carries it to
        every replica (an overlapped reducer starts reducing during backward). With device_skip it is
        never read back: a non-finite loss fills this rank's gradient with NaN on the device, and the
        reduction carries that."""
        kernel = self._kernel
        with torch.set_grad_enabled(kernel is None):  # the kernel writes the gradient itself
            if kernel is not None:
                q = kernel.forward(obs)
            else:  # a rank with no rows of a global batch stays eager (no compilation for 0 rows)
                q = (self._forward if len(obs) else self.online)(obs)
            cat = self.hyper.distribution
            if cat is None:
                q_taken = q.gather(1, actions.unsqueeze(1)).squeeze(1)
                loss = td_loss(q_taken, targets, self.hyper.loss, weights)
            else:  # C51's cross-entropy or QR-DQN's quantile Huber loss; priorities are its per-row values
                if kernel is not None:  # the kernel's path takes the head's gradient from the same pass
                    loss, row_loss, grad_out = cat.loss_and_grad_out(q, actions, targets, weights)
                else:
                    loss, row_loss = cat.loss(cat.taken(q, actions), targets, weights)
                q_taken = cat.q_values(q.detach()).gather(1, actions.unsqueeze(1)).squeeze(1)
            kappa = self.hyper.target_regularization
            if kappa > 0:
                with torch.no_grad():
                    q_target_s = self._target_q(obs)
                loss = loss + target_regularization(q, q_target_s, kappa, weights)
            if td_out is not None:
                td_out.copy_((targets - q_taken.detach()).abs() if cat is None else row_loss.detach())
            if not self._device_skip:
                self._local_nonfinite = not math.isfinite(loss.detach().item())
            self.reducer.start(self._local_nonfinite)
            if kernel is None:
                self.flat_grad.zero_()
                loss.backward()
            elif len(q_taken) and cat is not None:
                kernel.backward(grad_out)
            elif len(q_taken):
                grad_q = torch.zeros_like(q).scatter_(1, actions.unsqueeze(1), td_loss_grad(
                    q_taken, targets, self.hyper.loss, weights).unsqueeze(1))
                if kappa > 0:
                    grad_q += target_regularization_grad(q, q_target_s, kappa, weights)
                kernel.backward(grad_q)  # overwrites every parameter's gradient
            else:
                self.flat_grad.zero_()
        if self._device_skip:
            self.flat_grad.masked_fill_(~torch.isfinite(loss.detach()), float("nan"))
        if len(q_taken):
            self._q_rows.append(q_taken.detach())
            self._q_losses.append(loss.detach())
        return loss.detach()

    def _prepare_round(self, batch: Any, num_updates: int, plan: RoundPlan | None) -> tuple[_Round, np.ndarray]:
        if self.device is None:
            tensors = _as_tensors(batch)
        else:  # uint8 observations travel as uint8 and are cast on the device
            arrays = [batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.discounts]
            obs, actions, rewards, next_obs, discounts = (
                self._staging.to_device(arrays) if self._staging is not None
                else [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays])
            tensors = (obs.float(), actions.long(), rewards.float(), next_obs.float(), discounts.float())
        if plan is None:
            return _Round(tensors, None, None), equal_bounds(tensors[0].shape[0], num_updates)
        weights = torch.from_numpy(np.asarray(plan.weights, dtype=np.float32)).to(tensors[2].device)
        td = torch.zeros(len(weights), device=tensors[2].device) if plan.td_errors else None
        return _Round(tensors, weights, td), plan.bounds()

    def _round_targets(self, data: _Round, rows: slice) -> torch.Tensor:
        obs, actions, rewards, next_obs, discounts = data.tensors
        return self.targets(rewards[rows], next_obs[rows], discounts[rows], obs[rows], actions[rows])

    def _learn(self, data: _Round, rows: slice, targets: torch.Tensor | None) -> None:
        obs, actions = data.tensors[0], data.tensors[1]
        loss = self.backward(obs[rows], actions[rows], targets,
                             None if data.weights is None else data.weights[rows],
                             None if data.td is None else data.td[rows])
        self.reduce_gradients()
        self.step()
        self._losses.append(loss)
        if len(self._losses) >= _FOLD:
            self._fold_metrics()

    def _fold_metrics(self) -> None:
        """Add the losses and mean Q(s, a) of the updates since the last fold whose loss on this rank
        was finite to the running sums (chosen on the device: nothing is read back)."""
        if self._losses:
            losses = torch.stack(self._losses)
            finite = torch.isfinite(losses)
            self._loss_sum += torch.where(finite, losses, 0.0).sum()
            self._metric_count += finite.sum()
            self._losses.clear()
        q = self._q_rows
        if q:
            same = all(len(rows) == len(q[0]) for rows in q)
            sums = torch.stack(q).sum(dim=1) if same else torch.stack([rows.sum() for rows in q])
            finite = torch.isfinite(torch.stack(self._q_losses))
            self._q_sum += torch.where(finite, sums, 0.0).sum()
            rows = torch.tensor([len(r) for r in q], device=finite.device)
            self._q_count += torch.where(finite, rows, 0).sum()
            q.clear()
            self._q_losses.clear()

    def _td_errors(self, data: _Round) -> np.ndarray:
        return data.td.cpu().numpy()

    def pop_metrics(self) -> dict[str, float]:
        """Mean loss and mean Q(s, a) of the global batch since the last call, over the replicas (a
        collective: see replica_metrics; NaN when no update ran)."""
        self._fold_metrics()
        sums = torch.stack([self._loss_sum.double(), self._metric_count.double(), self._q_sum.double(),
                            self._q_count.double()]).cpu().numpy()
        for t in (self._loss_sum, self._q_sum, self._metric_count, self._q_count):
            t.zero_()
        return replica_metrics(sums, self.comm, self.nonfinite_skipped)
