"""Data-parallel learner: online/target nets, Adam or RMSprop, ONE flat gradient buffer averaged by Allreduce."""
from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mpidqn.algo.dqn import polyak_update_, td_loss, td_targets
from mpidqn.distributed import collectives as C
from mpidqn.errors import NonFiniteError, ReplicaDivergenceError, UserError
from mpidqn.io.h5tree import Json
from mpidqn.nn.actor import NumpyActor


@dataclass
class Hyper:
    """The learner's share of the config (decoupled from the config dataclasses for unit tests)."""

    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "rmsprop" (see make_optimizer)
    adam_eps: float = 1e-8
    rmsprop_alpha: float = 0.95
    rmsprop_eps: float = 0.01
    rmsprop_centered: bool = True
    compile_optimizer: bool = False  # torch.compile the RMSprop step (see make_optimizer)
    max_grad_norm: float | None = 10.0
    loss: str = "huber"
    double_dqn: bool = True
    target_update_interval: int = 10
    tau: float = 1.0
    sync_check_interval: int = 500
    nonfinite: str = "skip"  # "skip" the update (and count it) or "stop" on a NaN/Inf loss or gradient

    @classmethod
    def from_config(cls, train: Any, sync_check_interval: int, lr: float) -> "Hyper":
        return cls(
            lr=lr, optimizer=train.optimizer, adam_eps=train.adam_eps, rmsprop_alpha=train.rmsprop_alpha,
            rmsprop_eps=train.rmsprop_eps, rmsprop_centered=train.rmsprop_centered,
            compile_optimizer=train.compile_optimizer, max_grad_norm=train.max_grad_norm, loss=train.loss,
            double_dqn=train.double_dqn, target_update_interval=train.target_update_interval,
            tau=train.tau, sync_check_interval=sync_check_interval, nonfinite=train.nonfinite,
        )


def make_optimizer(params: list[torch.Tensor], hyper: Hyper, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``hyper.optimizer`` names over ``params`` (learning rate ``lr``, default ``hyper.lr``).

    Adam uses the fused kernel: one kernel over all tensors (about 2.5x faster than foreach on CPU at
    this size). torch has no fused RMSprop; its multi-tensor (foreach) kernels are a little faster than
    the per-tensor loop on CPU (and the usual choice on CUDA), so RMSprop uses those, unless
    ``hyper.compile_optimizer``: then its step is compiled by ``torch.compile`` into one fused loop (the
    instance's ``step`` is replaced; the optimizer's state and checkpoints are unchanged). The learning
    rate is then a tensor, so changing it (``set_optimizer_lr``) reuses the compiled step.
    """
    lr = hyper.lr if lr is None else lr
    if hyper.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, eps=hyper.adam_eps, fused=True)
    if hyper.optimizer != "rmsprop":
        raise ValueError(f"unknown optimizer {hyper.optimizer!r} (adam or rmsprop)")
    compiled = hyper.compile_optimizer
    device = params[0].device if params else None
    optimizer = torch.optim.RMSprop(params, lr=torch.tensor(lr, device=device) if compiled else lr,
                                    alpha=hyper.rmsprop_alpha, eps=hyper.rmsprop_eps,
                                    centered=hyper.rmsprop_centered, foreach=not compiled)
    if compiled:
        # The class's step without torch's profiling wrapper (whose record_function torch.compile
        # cannot trace); an instance attribute, so every caller of optimizer.step() gets it.
        plain_step = type(optimizer).step.__wrapped__
        optimizer.step = torch.compile(lambda: plain_step(optimizer))  # type: ignore[method-assign]
    return optimizer


def check_compile_optimizer(train: Any) -> None:
    """Raise UserError (one line) when ``train.compile_optimizer`` cannot work on this machine:
    torch.compile builds CPU kernels with the C++ compiler ``$CXX`` (default g++). Checked before
    training starts, instead of failing at the first update."""
    if not (train.optimizer == "rmsprop" and train.compile_optimizer):
        return
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise UserError(f"train.compile_optimizer: torch.compile needs a C++ compiler and {cxx!r} was not found "
                        "(install one, point $CXX at it, or set train.compile_optimizer=false)")


def set_optimizer_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate in place (a tensor lr stays the same tensor: no recompilation)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyper-parameters of the (single) parameter group, as stored in checkpoints."""
    group = optimizer.state_dict()["param_groups"][0]
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}


def load_optimizer_state(optimizer: torch.optim.Optimizer, hyper: Hyper, param_names: list[str],
                         state: dict[str, Any], hparams: dict[str, Any]) -> None:
    """Load per-parameter state keyed by global parameter name (``state["adam"]`` of a model file)
    and the stored hyper-parameters. Refuses the state of the other optimizer kind: Adam moments
    are no RMSprop averages (resume checks refuse it earlier, naming train.optimizer)."""
    stored = "rmsprop" if "alpha" in hparams else "adam"
    if stored != hyper.optimizer:
        raise ValueError(f"the model state holds {stored} optimizer state, but train.optimizer is "
                         f"{hyper.optimizer}")
    lr = optimizer.param_groups[0]["lr"]
    tensor_lr = isinstance(lr, torch.Tensor)
    optimizer.load_state_dict({
        "state": {i: state[n] for i, n in enumerate(param_names) if n in state},
        "param_groups": [{**hparams, "params": list(range(len(param_names)))}],
    })
    if tensor_lr:  # checkpoints store a float; a compiled step wants its tensor back
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=lr.device)


def _as_tensors(batch: Any, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """numpy Batch -> tensors sharing memory (no copies; obs cast to float32 if stored as uint8).

    With a ``device`` the arrays are copied there first (uint8 obs travel as uint8, cast there)."""
    obs = torch.from_numpy(batch.obs)
    next_obs = torch.from_numpy(batch.next_obs)
    if device is not None and device.type != "cpu":
        obs, next_obs = obs.to(device, non_blocking=True), next_obs.to(device, non_blocking=True)
        return (obs.float(), torch.from_numpy(batch.actions).to(device).long(),
                torch.from_numpy(batch.rewards).to(device), next_obs.float(),
                torch.from_numpy(batch.discounts).to(device))
    if obs.dtype != torch.float32:
        obs, next_obs = obs.float(), next_obs.float()
    return (obs, torch.from_numpy(batch.actions).long(), torch.from_numpy(batch.rewards),
            next_obs, torch.from_numpy(batch.discounts))


def apply_update(learner: Any, norm: float) -> None:
    """The step every learner shares once its reduced gradient is known to be finite: clip to the
    global ``norm``, optimizer step, count, target update, periodic replica check."""
    h = learner.hyper
    if h.max_grad_norm is not None:
        learner.flat_grad.mul_(min(1.0, h.max_grad_norm / (norm + 1e-6)))
    learner.updates += 1
    if learner.optimizer is not None:  # None: a pipeline stage of parameter-free layers
        learner.optimizer.step()
        if h.tau < 1.0:
            polyak_update_(learner.target.parameters(), learner.params, h.tau)
        elif learner.updates % h.target_update_interval == 0:
            polyak_update_(learner.target.parameters(), learner.params, 1.0)
    if h.sync_check_interval and learner.updates % h.sync_check_interval == 0:
        learner.check_replicas()


class Learner:
    """Owns the networks and the optimizer; every replica of ``comm`` takes the identical step."""

    collective_acting = False  # greedy_actions is local (a pipeline's is a collective over its group)
    device: torch.device | None = None  # None: CPU, uint8 obs cast to float here (see learner_ext)

    def __init__(self, online: nn.Module, hyper: Hyper, comm: Any) -> None:
        self.online = online
        self.hyper = hyper
        self.comm = comm
        self.params = [p for p in online.parameters()]
        self.param_names = [n for n, _ in online.named_parameters()]
        C.broadcast_tensors_(self.params, comm)  # replicas start identical (fixed parameter order)
        self.target = copy.deepcopy(online).requires_grad_(False)
        # Gradients live in one contiguous buffer: backward accumulates into views of it, so the
        # Allreduce needs no packing (the same trick as DDP's gradient_as_bucket_view).
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params))
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.optimizer = make_optimizer(self.params, hyper)
        self.updates = 0
        self.comm_seconds = 0.0
        self._loss_sum = torch.zeros(())
        self._q_sum = torch.zeros(())
        self._metric_count = 0
        layers = list(online.children()) if isinstance(online, nn.Sequential) else []
        self._actor = NumpyActor(layers) if layers and NumpyActor.supports(layers) else None
        self._loads = 0
        self.nonfinite_skipped = 0  # updates skipped for a NaN/Inf loss or gradient (train.nonfinite=skip)
        self._local_nonfinite = False

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        if self._actor is not None and len(obs) <= 64:  # small batches: numpy beats torch's overhead
            self._actor.refresh(self.weights_version)
            return self._actor.greedy(obs)
        x = torch.from_numpy(np.asarray(obs, dtype=np.float32))
        return self.online(x).argmax(dim=1).numpy()

    @property
    def weights_version(self) -> tuple[int, int]:
        """Changes whenever the online parameters may have changed (updates or a loaded state)."""
        return (self._loads, self.updates)

    # ------------------------------------------------------------------ learning
    def targets(self, rewards, next_obs, discounts) -> torch.Tensor:
        """TD targets with the current networks (no gradient)."""
        with torch.no_grad():
            next_online = self.online(next_obs) if self.hyper.double_dqn else None
            return td_targets(rewards, discounts, self.target(next_obs), next_online)

    def backward(self, obs, actions, targets) -> torch.Tensor:
        """Local loss and gradient into ``flat_grad`` (overwritten). Returns the detached loss."""
        q = self.online(obs)
        q_taken = q.gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = td_loss(q_taken, targets, self.hyper.loss)
        self.flat_grad.zero_()
        loss.backward()
        loss = loss.detach()
        self._local_nonfinite = not bool(torch.isfinite(loss))
        if self._local_nonfinite:  # poison the sum: every replica then sees it after the Allreduce
            self.flat_grad.fill_(float("nan"))
        else:
            self._q_sum += q_taken.detach().mean()
        return loss

    def reduce_gradients(self) -> None:
        """Average ``flat_grad`` over the data-parallel replicas (one buffer, one Allreduce)."""
        t0 = time.perf_counter()
        C.allreduce_mean_(self.flat_grad, self.comm)
        self.comm_seconds += time.perf_counter() - t0

    def step(self) -> None:
        """Clip the averaged gradient, take the optimizer step, update the target network.

        A NaN/Inf in any replica's gradient (or loss, see ``backward``) is in every replica's sum, so
        the norm of the reduced buffer is non-finite on all of them: skip-or-stop is agreed for free.
        """
        norm = float(torch.linalg.vector_norm(self.flat_grad))
        if not math.isfinite(norm):
            self._nonfinite_update()
            return
        apply_update(self, norm)

    def update_many(self, batch: Any, num_updates: int) -> None:
        """``num_updates`` updates on consecutive equal slices of a batch from ``sample_many``.

        Without double DQN and with hard target updates, the target network is constant between
        two target updates, so the targets of all minibatches up to the next target update are
        computed in one batched forward pass (same values, far fewer small matmuls).
        """
        obs, actions, rewards, next_obs, discounts = _as_tensors(batch, self.device)
        size = obs.shape[0] // num_updates
        h = self.hyper
        batch_targets = not h.double_dqn and h.tau >= 1.0
        i = 0
        while i < num_updates:
            span = (h.target_update_interval - self.updates % h.target_update_interval) if batch_targets else 1
            span = min(span, num_updates - i)
            rows = slice(i * size, (i + span) * size)
            targets = self.targets(rewards[rows], next_obs[rows], discounts[rows])
            for j in range(span):
                sl = slice((i + j) * size, (i + j + 1) * size)
                loss = self.backward(obs[sl], actions[sl], targets[j * size : (j + 1) * size])
                self.reduce_gradients()
                self.step()
                if not self._local_nonfinite:
                    self._loss_sum += loss
                    self._metric_count += 1
            i += span

    def _nonfinite_update(self) -> None:
        """Skip this update (count it) or, with train.nonfinite=stop, raise on every replica in lockstep."""
        if self.hyper.nonfinite == "stop":
            from mpidqn.distributed import watchdog

            watchdog.fence(self.comm, "non-finite diagnosis")
            flags = self.comm.allgather(self._local_nonfinite) if self.comm.Get_size() > 1 else [self._local_nonfinite]
            ranks = [r for r, bad in enumerate(flags) if bad]
            where = f"non-finite loss on rank(s) {ranks}" if ranks else "finite losses, non-finite gradient"
            raise NonFiniteError(f"NaN/Inf in the loss or gradients at update {self.updates + 1} ({where}); "
                                 "train.nonfinite=stop")
        self.flat_grad.zero_()
        self.nonfinite_skipped += 1

    def set_lr(self, lr: float) -> None:
        set_optimizer_lr(self.optimizer, lr)

    def pop_metrics(self) -> dict[str, float]:
        """Mean loss and mean Q(s, a) of this replica since the last call (NaN when no update ran)."""
        n = self._metric_count
        out = {
            "loss": float(self._loss_sum) / n if n else float("nan"),
            "q_mean": float(self._q_sum) / n if n else float("nan"),
            "nonfinite_skipped": float(self.nonfinite_skipped),
        }
        self._loss_sum.zero_()
        self._q_sum.zero_()
        self._metric_count = 0
        return out

    def check_replicas(self) -> None:
        """Raise ReplicaDivergenceError naming the first tensor that differs between replicas."""
        bad = C.first_divergent(C.tensor_fingerprints(self.params), self.comm)
        if bad is not None:
            raise ReplicaDivergenceError(
                f"data-parallel replicas diverged after {self.updates} updates: "
                f"parameter {self.param_names[bad]!r} differs between ranks"
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Parameters and optimizer state keyed by parameter name (so a pipeline can re-partition them).

        The optimizer state (Adam or RMSprop) is stored under the keys "adam" and "adam_hparams",
        the names of the model-file format from before RMSprop existed."""
        opt = self.optimizer.state_dict()
        return {
            "online": dict(self.online.state_dict()),
            "target": dict(self.target.state_dict()),
            "adam": {self.param_names[i]: dict(st) for i, st in opt["state"].items()},
            "adam_hparams": Json(optimizer_hparams(self.optimizer)),
            "updates": self.updates,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hparams = state["adam_hparams"]
        hparams = hparams.value if isinstance(hparams, Json) else hparams
        load_optimizer_state(self.optimizer, self.hyper, self.param_names, state["adam"], hparams)
        self.online.load_state_dict(state["online"])
        self._loads += 1
        self.target.load_state_dict(state["target"])
        self.updates = int(state["updates"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
