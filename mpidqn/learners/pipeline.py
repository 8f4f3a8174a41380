"""Pipeline-parallel learner: this rank holds one stage (online + target) of the Q-network.

Same interface as :class:`mpidqn.learners.data_parallel.Learner` as far as the trainer is concerned.

Where the batch goes. Every rank of a group samples ``B`` transitions per update from its own
replay shard; the group's batch for one update is the concatenation of its S minibatches (in
group-rank order), ``S * B`` rows. Once per round of updates (``update_many``) the observations and
next observations of all S ranks are gathered to stage 0 (the only stage that consumes them), and
actions, rewards and discounts to the last stage (which computes TD targets and the loss). Nothing
else of the batch moves. The global batch is thus ``world * B`` transitions per update, as in pure
data parallelism.

Schedule (GPipe). Per update: one no-grad pass computes Q_target(s') and, for double DQN,
Q_online(s') (both nets' activations travel stacked in one message per micro-batch), then the
training step runs all micro-batch forwards followed by all backwards. Each stage then averages its flat gradient over the
stage's data-parallel replicas (one Allreduce over ``dp_comm``), and the gradient norm for clipping
is the GLOBAL one: squared stage norms summed over ``pp_comm`` (both in
:class:`~mpidqn.learners.reducers.PipelineStageReducer`).

Image observations (uint8) travel to stage 0 as uint8 and become float32 there.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpidqn.algo.dqn import action_gap_penalty, target_regularization, td_loss, td_targets
from mpidqn.distributed import watchdog
from mpidqn.distributed.pipeline import (
    StageLink,
    boundary_shapes,
    gpipe_backward,
    layer_costs,
    partition_layers,
    pipelined_forward,
    split_sizes,
)
from mpidqn.learners.base import GreedyPolicy, LearnerBase, RoundPlan, equal_bounds, replica_metrics
from mpidqn.learners.optim import Hyper
from mpidqn.learners.reducers import PipelineStageReducer

BYTES_PER_PARAM = 4 * 5  # float32: online, gradient, two optimizer moments (Adam, centered RMSprop), target


def stage_module(layers: Sequence[nn.Module], start: int, end: int) -> nn.Sequential:
    """The layers [start, end) under their GLOBAL indices, so parameter names match the full network."""
    module = nn.Sequential()
    for i in range(start, end):
        module.add_module(str(i), layers[i])
    return module


@dataclass
class GroupBatch:
    """A round of updates as the stages of one group see it (None where a stage does not need it)."""

    obs: torch.Tensor | None  # stage 0: (U * N, *obs_shape), uint8 or float32 as stored
    next_obs: torch.Tensor | None  # stage 0
    actions: torch.Tensor | None  # last stage: (U * N,)
    rewards: torch.Tensor | None  # last stage
    discounts: torch.Tensor | None  # last stage
    bounds: np.ndarray  # (U + 1,) offsets of the updates in the group's update-major rows
    weights: torch.Tensor | None = None  # last stage: per-row loss weights of a RoundPlan (None: mean loss)
    td: torch.Tensor | None = None  # last stage: |TD error| per row when the plan asks for it
    plan: RoundPlan | None = None


def _obs_dtype(obs: np.ndarray) -> np.dtype:
    """The dtype observations travel in: uint8 images stay uint8 (4x fewer bytes), the rest float32."""
    return np.dtype(np.uint8) if np.asarray(obs).dtype == np.uint8 else np.dtype(np.float32)


def _as_float(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.dtype == torch.float32 else x.float()


class PipelineLearner(LearnerBase):
    """One pipeline stage of the online and target networks, its optimizer, dp + pp gradient reduction."""

    collective_acting = True  # greedy_actions is a collective over the pipeline group

    def __init__(self, layers: Sequence[nn.Module], obs_shape: Sequence[int], hyper: Hyper, pp_comm: Any,
                 dp_comm: Any, micro_batches: int = 4, split_points: Sequence[int] | None = None) -> None:
        self.pp_comm = pp_comm
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.micro_batches = int(micro_batches)
        self.link = StageLink(pp_comm)
        self.stage, self.stages = self.link.stage, self.link.stages
        self.ranges = partition_layers(layer_costs(layers), self.stages, split_points)
        self.shapes = boundary_shapes(layers, self.obs_shape, self.ranges)
        start, end = self.ranges[self.stage]
        self.layer_span = (start, end)
        self.layer_names = [type(layer).__name__ for layer in layers[start:end]]
        # the other stages' layers are dropped here; a stage may hold no parameters (optimizer None)
        self._init_nets(stage_module(layers, start, end), hyper, dp_comm)
        self._total_parameters = int(sum(p.numel() for layer in layers for p in layer.parameters()))
        self.reducer = PipelineStageReducer(self.flat_grad, dp_comm, pp_comm)
        self._collective_seconds = 0.0  # batch gathers; the reducer and the stage link count their own
        # loss sum, updates with a finite loss, Q(s, a) sum over rows, their rows (last stage)
        self._metrics = torch.zeros(4, dtype=torch.float64)

    # ------------------------------------------------------------------ description
    @property
    def stage_parameters(self) -> int:
        return int(self.flat_grad.numel())

    def describe(self) -> str:
        start, end = self.layer_span
        n = self.stage_parameters
        return (f"stage {self.stage}: layers {start}..{end - 1} ({', '.join(self.layer_names)}), "
                f"{n:,} parameters ({n * BYTES_PER_PARAM / 2**20:.3g} MiB incl. gradient, optimizer state and target)")

    @property
    def comm_seconds(self) -> float:
        """All communication time: gathers, reduction and norm, waits on activations and their gradients."""
        return self._collective_seconds + self.reducer.seconds + self.link.wait_seconds

    def greedy_policy(self) -> GreedyPolicy:
        return GreedyPolicy(self.group_greedy, collective=True)

    # ------------------------------------------------------------------ acting
    def group_greedy(self, obs: np.ndarray) -> tuple[np.ndarray, int]:
        """Collective over the group: every rank's rows go through the pipeline, actions come back.

        Ranks may pass different numbers of rows (0 included). Returns this rank's actions and the
        group's total number of rows (0 tells every rank that the whole group is idle).
        """
        obs = np.asarray(obs)
        # rows and whether they are uint8 (a rank without rows does not vote): uint8 travels as uint8
        mine_info = np.array([len(obs), len(obs) == 0 or obs.dtype == np.uint8], dtype=np.int64)
        info = np.zeros((self.stages, 2), dtype=np.int64)
        watchdog.wait(self.pp_comm.Iallgather(mine_info, info), "pipeline gather")
        counts = np.ascontiguousarray(info[:, 0])
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64), 0
        dtype, mpi_type = (np.uint8, MPI.UINT8_T) if info[:, 1].all() else (np.float32, MPI.FLOAT)
        obs = np.ascontiguousarray(obs, dtype=dtype).reshape(-1, *self.obs_shape)
        width = int(np.prod(self.obs_shape))
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        x = None
        if self.link.first:
            buf = np.empty((total, *self.obs_shape), dtype=dtype)
            watchdog.wait(self.pp_comm.Igatherv(obs, [buf, (counts * width, displs * width), mpi_type],
                                                root=0), "pipeline gather")
            x = _as_float(torch.from_numpy(buf))
        else:
            watchdog.wait(self.pp_comm.Igatherv(obs, None, root=0), "pipeline gather")
        self._resample_acting_noise()  # each stage's layers from its own rank's stream
        q = pipelined_forward([self.online], self.link, x, [total], self.shapes[self.stage])
        mine = np.empty(len(obs), dtype=np.int64)
        best = self._q_values(q[0]).argmax(dim=1).numpy().astype(np.int64) if q is not None else None
        watchdog.wait(self.pp_comm.Iscatterv(None if best is None else [best, (counts, displs), MPI.INT64_T], mine,
                                             root=self.stages - 1), "pipeline scatter")
        return mine, total

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.group_greedy(obs)[0]

    def _q_values(self, out: torch.Tensor) -> torch.Tensor:
        """Q-values of the last stage's output (C51's expected values, QR-DQN's quantile means)."""
        cat = self.hyper.distribution
        return out if cat is None else cat.q_values(out)

    # ------------------------------------------------------------------ learning
    def _gather(self, arr: np.ndarray, root: int, num_updates: int) -> torch.Tensor | None:
        """Gather every group rank's (U * B, ...) rows to ``root`` and order them update-major."""
        arr = np.ascontiguousarray(arr)
        if self.stages == 1:
            return torch.from_numpy(arr)
        out = np.empty((self.stages, *arr.shape), dtype=arr.dtype) if self.stage == root else None
        watchdog.wait(self.pp_comm.Igather(arr, out, root=root), "pipeline gather")
        if out is None:
            return None
        rows = arr.shape[0] // num_updates
        # (S, U, B, ...) -> (U, S, B, ...): update u's group batch is the S ranks' u-th minibatches
        out = out.reshape(self.stages, num_updates, rows, *arr.shape[1:]).swapaxes(0, 1)
        return torch.from_numpy(np.ascontiguousarray(out).reshape(-1, *arr.shape[1:]))

    @staticmethod
    def _update_major(counts: np.ndarray) -> np.ndarray:
        """Positions, in the group's stage-major rows (stage 0's rows of the round, then stage 1's, ...),
        of its update-major rows (update 0's rows of stage 0, of stage 1, ..., then update 1's)."""
        labels = np.concatenate([np.repeat(np.arange(len(counts)), counts[:, s]) for s in range(counts.shape[1])])
        return np.argsort(labels, kind="stable")

    def _gatherv(self, arr: np.ndarray, root: int, plan: RoundPlan) -> torch.Tensor | None:
        """Gather every group rank's rows of the round (uneven counts, 0 included) to ``root``, update-major."""
        arr = np.ascontiguousarray(arr)
        totals = plan.counts.sum(axis=0)
        if self.stages == 1:
            return torch.from_numpy(arr)
        width = int(np.prod(arr.shape[1:], dtype=np.int64))
        displs = np.concatenate([[0], np.cumsum(totals)[:-1]])
        if self.stage != root:
            watchdog.wait(self.pp_comm.Igatherv(arr.reshape(-1), None, root=root), "pipeline gather")
            return None
        out = np.empty((int(totals.sum()), *arr.shape[1:]), dtype=arr.dtype)
        watchdog.wait(self.pp_comm.Igatherv(arr.reshape(-1), [out.reshape(-1), (totals * width, displs * width)],
                                            root=root), "pipeline gather")
        return torch.from_numpy(np.ascontiguousarray(out[self._update_major(plan.counts)]))

    def gather_batch(self, batch: Any, num_updates: int, plan: RoundPlan | None = None) -> GroupBatch:
        t0 = time.perf_counter()
        last = self.stages - 1
        def gather(a: np.ndarray, root: int) -> torch.Tensor | None:
            return self._gather(a, root, num_updates) if plan is None else self._gatherv(a, root, plan)
        obs = gather(np.asarray(batch.obs, dtype=_obs_dtype(batch.obs)), 0)
        next_obs = gather(np.asarray(batch.next_obs, dtype=_obs_dtype(batch.next_obs)), 0)
        actions = gather(np.asarray(batch.actions, dtype=np.int64), last)
        rewards = gather(np.asarray(batch.rewards, dtype=np.float32), last)
        discounts = gather(np.asarray(batch.discounts, dtype=np.float32), last)
        if plan is None:
            gb = GroupBatch(obs, next_obs, actions, rewards, discounts,
                            equal_bounds(self.stages * len(batch.actions), num_updates))
        else:
            weights = gather(np.asarray(plan.weights, dtype=np.float32), last)
            td = torch.zeros(len(weights)) if plan.td_errors and weights is not None else None
            gb = GroupBatch(obs, next_obs, actions, rewards, discounts, plan.bounds(), weights, td, plan)
        self._collective_seconds += time.perf_counter() - t0
        return gb

    def _sizes(self, rows: int) -> list[int]:
        return split_sizes(rows, self.micro_batches)

    def targets(self, gb: GroupBatch, rows: slice) -> torch.Tensor | None:
        """TD targets of ``rows`` on the last stage (None elsewhere); no-grad passes through the pipe."""
        n = rows.stop - rows.start
        x = _as_float(gb.next_obs[rows]) if self.link.first else None
        in_shape = self.shapes[self.stage]
        modules = [self.target, self.online] if self.hyper.double_dqn else [self.target]
        q = pipelined_forward(modules, self.link, x, self._sizes(n), in_shape)  # one pass for both nets
        alpha = self.hyper.advantage_learning
        if alpha > 0:  # the target net at s too: a second pass
            q_s = pipelined_forward([self.target], self.link, _as_float(gb.obs[rows]) if self.link.first else None,
                                    self._sizes(n), in_shape)
        if q is None:
            return None
        if self.hyper.distribution is not None:  # target distributions (rows, atoms)
            return self.hyper.distribution.targets(gb.rewards[rows], gb.discounts[rows], q[0], q[1] if len(q) > 1 else None)
        y = td_targets(gb.rewards[rows], gb.discounts[rows], q[0], q[1] if len(q) > 1 else None)
        if alpha > 0:
            y -= action_gap_penalty(q_s[0], gb.actions[rows], alpha)
        return y

    def backward(self, gb: GroupBatch, rows: slice, targets: torch.Tensor | None) -> None:
        """GPipe forward/backward of ``rows``; the stage's gradient lands in ``flat_grad`` (overwritten)."""
        total = rows.stop - rows.start
        x = _as_float(gb.obs[rows]) if self.link.first else None
        actions = gb.actions[rows] if self.link.last else None

        weights = gb.weights[rows] if gb.weights is not None and self.link.last else None
        td = gb.td[rows] if gb.td is not None and self.link.last else None
        kappa = self.hyper.target_regularization
        if kappa > 0:  # the target net at s for the regulariser: a no-grad pass through the pipe first
            q_target_s = pipelined_forward([self.target], self.link, x, self._sizes(total), self.shapes[self.stage])

        def loss_of(offset: int, n: int, q: torch.Tensor) -> torch.Tensor:
            if self.hyper.distribution is not None:
                return distribution_loss_of(offset, n, q)
            q_taken = q.gather(1, actions[offset : offset + n].unsqueeze(1)).squeeze(1)
            if weights is None:
                loss = td_loss(q_taken, targets[offset : offset + n], self.hyper.loss) * (n / total)
            else:  # a RoundPlan's weights hold the normalisation
                loss = td_loss(q_taken, targets[offset : offset + n], self.hyper.loss, weights[offset : offset + n])
            if kappa > 0:
                qt = q_target_s[0][offset : offset + n]
                loss = loss + (target_regularization(q, qt, kappa) * (n / total) if weights is None
                               else target_regularization(q, qt, kappa, weights[offset : offset + n]))
            if td is not None:
                td[offset : offset + n] = (targets[offset : offset + n] - q_taken.detach()).abs()
            return account(loss, q_taken)

        def distribution_loss_of(offset: int, n: int, out: torch.Tensor) -> torch.Tensor:
            cat, a, y = self.hyper.distribution, actions[offset : offset + n], targets[offset : offset + n]
            w = None if weights is None else weights[offset : offset + n]
            loss, row_loss = cat.loss(cat.taken(out, a), y, w)
            if w is None:
                loss = loss * (n / total)
            if td is not None:  # prioritized replay: the per-row loss
                td[offset : offset + n] = row_loss.detach()
            return account(loss, cat.q_values(out.detach()).gather(1, a.unsqueeze(1)).squeeze(1))

        def account(loss: torch.Tensor, q_taken: torch.Tensor) -> torch.Tensor:
            value = float(loss.detach())
            if math.isfinite(value):
                self._metrics[0] += value
                self._metrics[2] += float(q_taken.detach().sum())
                self._metrics[3] += q_taken.numel()  # the micro-batch's rows
            else:
                self._local_nonfinite = True
            return loss

        self._local_nonfinite = False
        self.flat_grad.zero_()
        gpipe_backward(self.online, self.link, x, self._sizes(total), self.shapes[self.stage], loss_of)
        if not self._local_nonfinite:  # a non-finite loss is carried to every rank by the reducer
            self._metrics[1] += 1

    def _prepare_round(self, batch: Any, num_updates: int, plan: RoundPlan | None) -> tuple[GroupBatch, np.ndarray]:
        gb = self.gather_batch(batch, num_updates, plan)
        return gb, gb.bounds

    def _td_errors(self, gb: GroupBatch) -> np.ndarray:
        """The last stage's |TD errors| of the group's rows, scattered back to the ranks that drew them."""
        if self.stages == 1:
            return gb.td.numpy()
        plan = gb.plan
        totals = plan.counts.sum(axis=0)
        mine = np.empty(int(totals[self.stage]), dtype=np.float32)
        t0 = time.perf_counter()
        send = None
        if self.link.last:
            stage_major = np.empty(int(totals.sum()), dtype=np.float32)
            stage_major[self._update_major(plan.counts)] = gb.td.numpy()
            displs = np.concatenate([[0], np.cumsum(totals)[:-1]])
            send = [stage_major, (totals, displs), MPI.FLOAT]
        watchdog.wait(self.pp_comm.Iscatterv(send, mine, root=self.stages - 1), "pipeline scatter")
        self._collective_seconds += time.perf_counter() - t0
        return mine

    def _round_targets(self, data: Any, rows: slice) -> torch.Tensor | None:
        return self.targets(data, rows)

    def _learn(self, data: Any, rows: slice, targets: torch.Tensor | None) -> None:
        self.backward(data, rows, targets)
        self.reduce_gradients()
        self.step()

    def pop_metrics(self) -> dict[str, float]:
        """Mean loss and Q(s, a) of the global batch since the last call (replica_metrics over the last
        stages), computed on the last stage, known by the group."""
        m = self._metrics.numpy().copy()
        self._metrics.zero_()
        out = replica_metrics(m, self.comm, self.nonfinite_skipped)  # every stage reduces over its replicas
        if self.stages > 1:
            m = np.array([out["loss"], out["q_mean"]])
            watchdog.wait(self.pp_comm.Ibcast(m, root=self.stages - 1), "pipeline metrics")
            out["loss"], out["q_mean"] = float(m[0]), float(m[1])
        return out

    def _nonfinite_where(self) -> str:
        flags = self._nonfinite_flags()
        with watchdog.guard(self.pp_comm, "non-finite diagnosis"):
            per_stage = self.pp_comm.allgather(flags) if self.stages > 1 else [flags]
        groups = [g for g, bad in enumerate(per_stage[-1]) if bad]  # the last stage computes the loss
        return (f"non-finite loss on the last stage of pipeline group(s) {groups}" if groups
                else "finite losses, non-finite gradient")

    def _replicas_label(self) -> str:
        return f"data-parallel replicas of pipeline stage {self.stage}"

    def _layers_label(self) -> str:
        return f" of pipeline stage {self.stage}"

    def _agree_message(self, msg: str | None) -> str | None:
        """Agreed over the group: every rank of every stage raises together."""
        if self.stages > 1:
            with watchdog.guard(self.pp_comm, "replica check"):
                found = [m for m in self.pp_comm.allgather(msg) if m is not None]
            msg = found[0] if found else None
        return msg
