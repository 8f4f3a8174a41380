"""The learners' optimizer share: the hyper-parameters (:class:`Hyper`), Adam or RMSprop, and their state."""
from __future__ import annotations

import inspect
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

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
    compile_network: bool = False  # torch.compile the online network's forward in updates (data parallel)
    max_grad_norm: float | None = 10.0
    loss: str = "huber"
    double_dqn: bool = True
    advantage_learning: float = 0.0  # > 0: subtract alpha * the target net's action gap at s (algo.dqn)
    target_regularization: float = 0.0  # > 0: kappa of the pull of Q(s, .) towards Q_target(s, .) (algo.dqn)
    target_update_interval: int = 10
    tau: float = 1.0
    ema_decay: float = 0.0  # > 0: keep an average of the online parameters for evaluation (see LearnerBase)
    sync_check_interval: int = 500
    nonfinite: str = "skip"  # "skip" the update (and count it) or "stop" on a NaN/Inf loss or gradient
    # network.distributional: the head (algo.categorical.Categorical for C51, algo.quantile.Quantile for
    # QR-DQN) that turns the flat output into Q-values, targets and losses; None: scalar Q
    distribution: Any = None
    noise_seed: int = 0  # root of the per-layer learning-noise streams of noisy layers (the run's seed)

    @classmethod
    def from_config(cls, train: Any, sync_check_interval: int, lr: float, plan: Any = None) -> "Hyper":
        """The learner's settings; ``plan`` (a large_batch.BatchPlan) supplies the update-counted ones
        rescaled to its batch scale (the config's own without it)."""
        plan = plan or train
        return cls(
            lr=lr, optimizer=train.optimizer, adam_eps=train.adam_eps, rmsprop_alpha=train.rmsprop_alpha,
            rmsprop_eps=train.rmsprop_eps, rmsprop_centered=train.rmsprop_centered,
            compile_optimizer=train.compile_optimizer, compile_network=train.compile_network,
            max_grad_norm=train.max_grad_norm, loss=train.loss,
            double_dqn=train.double_dqn, advantage_learning=train.advantage_learning,
            target_regularization=train.target_regularization,
            target_update_interval=plan.target_update_interval,
            tau=plan.tau, ema_decay=plan.ema_decay, sync_check_interval=sync_check_interval,
            nonfinite=train.nonfinite,
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
        adam = torch.optim.Adam(params, lr=lr, eps=hyper.adam_eps, fused=True)
        adam.step = _lean_adam_step(adam)  # type: ignore[method-assign]
        return adam
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


_ADAM_GROUP_KEYS = ("amsgrad", "weight_decay", "eps", "maximize", "foreach", "capturable", "differentiable", "fused",
                    "decoupled_weight_decay")


def _lean_adam_step(optimizer: torch.optim.Adam) -> Callable[..., Any]:
    """``optimizer.step`` for a one-group Adam: torch's functional :func:`torch.optim.adam.adam` (what
    ``Adam.step`` itself calls, so the step is bit-identical) on state lists gathered once, instead of
    gathering them again on every step (``_init_group`` and the profiling wrapper: about 25 of the
    90 us of a fused step over CartPole's 67k parameters on one CPU thread). The lists are gathered
    again, by a step of torch's own, whenever the state dict or a gradient tensor was replaced (a
    loaded checkpoint); the first step, which creates the state, is torch's own too. Like torch's step it
    honours ``optimizer.found_inf`` (a device flag: 1 skips the step, see LearnerBase._step_on_device)."""
    from torch.optim.adam import adam

    accepted = inspect.signature(adam).parameters
    class_step = type(optimizer).step
    cache: dict[str, Any] = {}

    def gather() -> None:
        group = optimizer.param_groups[0]
        params = group["params"]
        cache.clear()
        if len(optimizer.param_groups) != 1 or any(p.grad is None or p not in optimizer.state for p in params):
            return
        st = [optimizer.state[p] for p in params]
        extra = {k: group[k] for k in _ADAM_GROUP_KEYS if k in group and k in accepted}
        if "has_complex" in accepted:
            extra["has_complex"] = False
        cache.update(state=optimizer.state, betas=group["betas"], extra=extra, lists=(
            list(params), [p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
            [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [], [s["step"] for s in st]))

    def step(closure: Any = None) -> Any:
        lists = cache.get("lists")
        if (closure is not None or lists is None or cache["state"] is not optimizer.state
                or any(g is not p.grad for g, p in zip(lists[1], lists[0]))):
            loss = class_step(optimizer, closure)
            gather()
            return loss
        beta1, beta2 = cache["betas"]  # fixed with the state: only the lr changes between loads
        with torch.no_grad():
            adam(*lists, beta1=beta1, beta2=beta2, lr=optimizer.param_groups[0]["lr"], grad_scale=None,
                 found_inf=getattr(optimizer, "found_inf", None), **cache["extra"])
        return None

    return step


def check_compile_optimizer(train: Any) -> None:
    """Raise UserError (one line) when ``train.compile_optimizer`` or ``train.compile_network`` cannot
    work on this machine: torch.compile builds CPU kernels with the C++ compiler ``$CXX`` (default
    g++). Checked before training starts, instead of failing at the first update."""
    keys = [k for k, on in (("train.compile_optimizer", train.optimizer == "rmsprop" and train.compile_optimizer),
                            ("train.compile_network", train.compile_network)) if on]
    cxx = os.environ.get("CXX") or "g++"
    if keys and shutil.which(cxx) is None:
        raise UserError(f"{keys[0]}: torch.compile needs a C++ compiler and {cxx!r} was not found "
                        f"(install one, point $CXX at it, or set {keys[0]}=false)")


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
