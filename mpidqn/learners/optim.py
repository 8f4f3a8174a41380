"""The learners' optimizer share: the hyper-parameters (:class:`Hyper`), Adam or RMSprop, and their state."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from mpidqn.errors import UserError


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
    """Load per-parameter state keyed by global parameter name (``state["optimizer"]`` of a model file)
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
