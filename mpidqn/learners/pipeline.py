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
is the GLOBAL one: squared stage norms summed over ``pp_comm``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpidqn.algo.dqn import td_loss, td_targets
from mpidqn.distributed import collectives as C
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
from mpidqn.errors import NonFiniteError, ReplicaDivergenceError
from mpidqn.io.h5tree import Json
from mpidqn.learners.data_parallel import (
    Hyper,
    apply_update,
    load_optimizer_state,
    make_optimizer,
    optimizer_hparams,
    set_optimizer_lr,
)

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

    obs: torch.Tensor | None  # stage 0: (U * N, *obs_shape)
    next_obs: torch.Tensor | None  # stage 0
    actions: torch.Tensor | None  # last stage: (U * N,)
    rewards: torch.Tensor | None  # last stage
    discounts: torch.Tensor | None  # last stage
    rows_per_update: int  # N = S * B


class PipelineLearner:
    """One pipeline stage of the online and target networks, its optimizer, dp + pp gradient reduction."""

    collective_acting = True  # greedy_actions is a collective over the pipeline group

    def __init__(self, layers: Sequence[nn.Module], obs_shape: Sequence[int], hyper: Hyper, pp_comm: Any,
                 dp_comm: Any, micro_batches: int = 4, split_points: Sequence[int] | None = None) -> None:
        self.hyper, self.pp_comm, self.comm = hyper, pp_comm, dp_comm
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.micro_batches = int(micro_batches)
        self.link = StageLink(pp_comm)
        self.stage, self.stages = self.link.stage, self.link.stages
        self.ranges = partition_layers(layer_costs(layers), self.stages, split_points)
        self.shapes = boundary_shapes(layers, self.obs_shape, self.ranges)
        self.total_parameters = int(sum(p.numel() for layer in layers for p in layer.parameters()))
        start, end = self.ranges[self.stage]
        self.layer_span = (start, end)
        self.layer_names = [type(layer).__name__ for layer in layers[start:end]]
        self.online = stage_module(layers, start, end)  # the other stages' layers are dropped here
        self.params = list(self.online.parameters())
        self.param_names = [n for n, _ in self.online.named_parameters()]
        C.broadcast_tensors_(self.params, dp_comm)  # every replica of this stage starts identical
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params))
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        # A stage of parameter-free layers has nothing to optimise (torch refuses an empty optimizer).
        self.optimizer = make_optimizer(self.params, hyper) if self.params else None
        self._lr = hyper.lr
        self.updates = 0
        self._collective_seconds = 0.0  # gathers, Allreduce, norm; the stage link counts its own waits
        self._metrics = torch.zeros(3, dtype=torch.float64)  # loss sum, q sum, count (last stage)
        self.nonfinite_skipped = 0  # updates skipped for a NaN/Inf loss or gradient (train.nonfinite=skip)
        self._local_nonfinite = False

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
        """All communication time: collectives plus waits on activations and their gradients."""
        return self._collective_seconds + self.link.wait_seconds

    @property
    def wait_seconds(self) -> float:
        """Seconds this stage spent blocked on activations / activation gradients (bubble + transfer)."""
        return self.link.wait_seconds

    # ------------------------------------------------------------------ acting
    def group_greedy(self, obs: np.ndarray) -> tuple[np.ndarray, int]:
        """Collective over the group: every rank's rows go through the pipeline, actions come back.

        Ranks may pass different numbers of rows (0 included). Returns this rank's actions and the
        group's total number of rows (0 tells every rank that the whole group is idle).
        """
        obs = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1, *self.obs_shape)
        counts = np.zeros(self.stages, dtype=np.int64)
        watchdog.wait(self.pp_comm.Iallgather(np.array([len(obs)], dtype=np.int64), counts), "pipeline gather")
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64), 0
        width = int(np.prod(self.obs_shape))
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        x = None
        if self.link.first:
            x = torch.empty((total, *self.obs_shape), dtype=torch.float32)
            watchdog.wait(self.pp_comm.Igatherv(obs, [x.numpy(), (counts * width, displs * width), MPI.FLOAT],
                                                root=0), "pipeline gather")
        else:
            watchdog.wait(self.pp_comm.Igatherv(obs, None, root=0), "pipeline gather")
        q = pipelined_forward([self.online], self.link, x, [total], self.shapes[self.stage])
        mine = np.empty(len(obs), dtype=np.int64)
        best = q[0].argmax(dim=1).numpy().astype(np.int64) if q is not None else None
        watchdog.wait(self.pp_comm.Iscatterv(None if best is None else [best, (counts, displs), MPI.INT64_T], mine,
                                             root=self.stages - 1), "pipeline scatter")
        return mine, total

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.group_greedy(obs)[0]

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

    def gather_batch(self, batch: Any, num_updates: int) -> GroupBatch:
        t0 = time.perf_counter()
        last = self.stages - 1
        obs = self._gather(np.asarray(batch.obs, dtype=np.float32), 0, num_updates)
        next_obs = self._gather(np.asarray(batch.next_obs, dtype=np.float32), 0, num_updates)
        actions = self._gather(np.asarray(batch.actions, dtype=np.int64), last, num_updates)
        rewards = self._gather(np.asarray(batch.rewards, dtype=np.float32), last, num_updates)
        discounts = self._gather(np.asarray(batch.discounts, dtype=np.float32), last, num_updates)
        self._collective_seconds += time.perf_counter() - t0
        rows = self.stages * (len(batch.actions) // num_updates)
        return GroupBatch(obs, next_obs, actions, rewards, discounts, rows)

    def _sizes(self, rows: int) -> list[int]:
        return split_sizes(rows, self.micro_batches)

    def targets(self, gb: GroupBatch, rows: slice) -> torch.Tensor | None:
        """TD targets of ``rows`` on the last stage (None elsewhere); no-grad passes through the pipe."""
        n = rows.stop - rows.start
        x = gb.next_obs[rows] if self.link.first else None
        in_shape = self.shapes[self.stage]
        modules = [self.target, self.online] if self.hyper.double_dqn else [self.target]
        q = pipelined_forward(modules, self.link, x, self._sizes(n), in_shape)  # one pass for both nets
        if q is None:
            return None
        return td_targets(gb.rewards[rows], gb.discounts[rows], q[0], q[1] if len(q) > 1 else None)

    def backward(self, gb: GroupBatch, rows: slice, targets: torch.Tensor | None) -> None:
        """GPipe forward/backward of ``rows``; the stage's gradient lands in ``flat_grad`` (overwritten)."""
        total = rows.stop - rows.start
        x = gb.obs[rows] if self.link.first else None
        actions = gb.actions[rows] if self.link.last else None

        def loss_of(offset: int, n: int, q: torch.Tensor) -> torch.Tensor:
            q_taken = q.gather(1, actions[offset : offset + n].unsqueeze(1)).squeeze(1)
            loss = td_loss(q_taken, targets[offset : offset + n], self.hyper.loss) * (n / total)
            value = float(loss.detach())
            if math.isfinite(value):
                self._metrics[0] += value
                self._metrics[1] += float(q_taken.detach().sum()) / total
            else:
                self._local_nonfinite = True
            return loss

        self._local_nonfinite = False
        self.flat_grad.zero_()
        gpipe_backward(self.online, self.link, x, self._sizes(total), self.shapes[self.stage], loss_of)
        if self._local_nonfinite:  # poison the sum so every replica and stage agrees to skip or stop
            self.flat_grad.fill_(float("nan"))
        else:
            self._metrics[2] += 1

    def reduce_gradients(self) -> None:
        """Average ``flat_grad`` over the replicas of this stage (one buffer, one Allreduce)."""
        t0 = time.perf_counter()
        C.allreduce_mean_(self.flat_grad, self.comm)
        self._collective_seconds += time.perf_counter() - t0

    def global_grad_norm(self) -> float:
        """Norm of the whole network's gradient: squared stage norms summed over the group."""
        sq = np.array([float(torch.sum(self.flat_grad.double() ** 2))])
        return float(np.sqrt(C.allreduce_array(sq, self.pp_comm, phase="gradient norm")[0]))

    def step(self) -> None:
        """Clip by the global norm and step. The norm is a sum over the group of the stages' norms of
        their dp-reduced gradients, so a NaN/Inf anywhere (a poisoned loss included) makes it non-finite
        on every rank of every group: the skip-or-stop decision is agreed without another collective."""
        t0 = time.perf_counter()
        norm = self.global_grad_norm()
        self._collective_seconds += time.perf_counter() - t0
        if not math.isfinite(norm):
            self._nonfinite_update()
            return
        apply_update(self, norm)

    def update_many(self, batch: Any, num_updates: int) -> None:
        """``num_updates`` pipelined updates; like Learner.update_many, targets are batched between
        hard target updates when double DQN is off."""
        gb = self.gather_batch(batch, num_updates)
        n, h = gb.rows_per_update, self.hyper
        batch_targets = not h.double_dqn and h.tau >= 1.0
        i = 0
        while i < num_updates:
            span = (h.target_update_interval - self.updates % h.target_update_interval) if batch_targets else 1
            span = min(span, num_updates - i)
            targets = self.targets(gb, slice(i * n, (i + span) * n))
            for j in range(span):
                t = targets[j * n : (j + 1) * n] if targets is not None else None
                self.backward(gb, slice((i + j) * n, (i + j + 1) * n), t)
                self.reduce_gradients()
                self.step()
            i += span

    def set_lr(self, lr: float) -> None:
        self._lr = lr
        if self.optimizer is not None:
            set_optimizer_lr(self.optimizer, lr)

    def pop_metrics(self) -> dict[str, float]:
        """Mean loss and Q(s, a) since the last call, computed on the last stage, known by the group."""
        m = self._metrics.numpy().copy()
        if self.stages > 1:
            watchdog.wait(self.pp_comm.Ibcast(m, root=self.stages - 1), "pipeline metrics")
        self._metrics.zero_()
        n = m[2]
        return {"loss": m[0] / n if n else float("nan"), "q_mean": m[1] / n if n else float("nan"),
                "nonfinite_skipped": float(self.nonfinite_skipped)}

    def _nonfinite_update(self) -> None:
        """Skip this update (count it) or, with train.nonfinite=stop, raise on every rank in lockstep."""
        if self.hyper.nonfinite == "stop":
            watchdog.fence(self.comm, "non-finite diagnosis")
            flags = self.comm.allgather(self._local_nonfinite) if self.comm.Get_size() > 1 else [self._local_nonfinite]
            watchdog.fence(self.pp_comm, "non-finite diagnosis")
            per_stage = self.pp_comm.allgather(flags) if self.stages > 1 else [flags]
            groups = [g for g, bad in enumerate(per_stage[-1]) if bad]  # the last stage computes the loss
            where = (f"non-finite loss on the last stage of pipeline group(s) {groups}" if groups
                     else "finite losses, non-finite gradient")
            raise NonFiniteError(f"NaN/Inf in the loss or gradients at update {self.updates + 1} ({where}); "
                                 "train.nonfinite=stop")
        self.flat_grad.zero_()
        self.nonfinite_skipped += 1

    def check_replicas(self) -> None:
        """Collective over the stage's replicas, then agreed over the group: every rank raises together."""
        bad = C.first_divergent(C.tensor_fingerprints(self.params), self.comm)
        msg = None if bad is None else (
            f"data-parallel replicas of pipeline stage {self.stage} diverged after {self.updates} updates: "
            f"parameter {self.param_names[bad]!r} differs between ranks")
        if self.stages > 1:
            watchdog.fence(self.pp_comm, "replica check")
            found = [m for m in self.pp_comm.allgather(msg) if m is not None]
            msg = found[0] if found else None
        if msg is not None:
            raise ReplicaDivergenceError(msg)

    # ------------------------------------------------------------------ state
    def _adam_hparams(self) -> dict[str, Any]:
        """The optimizer's hyper-parameters (stored as "adam_hparams" whichever optimizer it is)."""
        if self.optimizer is not None:
            return optimizer_hparams(self.optimizer)
        # a parameter-free stage: ask torch for the chosen optimizer's hparams on a throw-away tensor
        return optimizer_hparams(make_optimizer([torch.zeros(1, requires_grad=True)], self.hyper, lr=self._lr))

    def state_dict(self) -> dict[str, Any]:
        """This stage's parameters and optimizer state under GLOBAL parameter names (re-partitionable),
        under the keys "adam" and "adam_hparams" whichever optimizer it is (see Learner.state_dict)."""
        adam = {}
        if self.optimizer is not None:
            adam = {self.param_names[i]: dict(st) for i, st in self.optimizer.state_dict()["state"].items()}
        return {
            "online": dict(self.online.state_dict()),
            "target": dict(self.target.state_dict()),
            "adam": adam,
            "adam_hparams": Json(self._adam_hparams()),
            "updates": self.updates,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load this stage's share of a (merged, any-S) model state."""
        mine = list(self.online.state_dict())
        missing = [k for k in mine if k not in state["online"]]
        if missing:
            raise KeyError(f"model state lacks parameters {missing} of pipeline stage {self.stage}")
        hparams = state["adam_hparams"]
        hparams = hparams.value if isinstance(hparams, Json) else hparams
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, self.hyper, self.param_names, state["adam"], hparams)
        self.online.load_state_dict({k: state["online"][k] for k in mine})
        self.target.load_state_dict({k: state["target"][k] for k in mine})
        self._lr = float(hparams.get("lr", self._lr))
        self.updates = int(state["updates"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
