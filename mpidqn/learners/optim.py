"""The learners' optimizer share: the hyper-parameters (:class:`Hyper`), Adam or RMSprop, and their state."""
from __future__ import annotations

import inspect
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.adam import adam as _functional_adam  # a module function: no torch._dynamo

from mpidqn.algo.large_batch import ADAM_BETAS
from mpidqn.errors import UserError


@dataclass
class Hyper:
    """The learner's share of the config (decoupled from the config dataclasses for unit tests)."""

    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "rmsprop" (see make_optimizer)
    adam_eps: float = 1e-8
    adam_betas: tuple[float, float] = ADAM_BETAS  # train.moment_scaling may raise them to the power K
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
        rescaled to its batch scale (the config's own and Adam's default betas without it)."""
        plan = plan or train
        return cls(
            lr=lr, optimizer=train.optimizer, adam_eps=train.adam_eps,
            adam_betas=tuple(getattr(plan, "adam_betas", ADAM_BETAS)),
            rmsprop_alpha=plan.rmsprop_alpha,
            rmsprop_eps=train.rmsprop_eps, rmsprop_centered=train.rmsprop_centered,
            compile_optimizer=train.compile_optimizer, compile_network=train.compile_network,
            max_grad_norm=train.max_grad_norm, loss=train.loss,
            double_dqn=train.double_dqn, advantage_learning=train.advantage_learning,
            target_regularization=train.target_regularization,
            target_update_interval=plan.target_update_interval,
            tau=plan.tau, ema_decay=plan.ema_decay, sync_check_interval=sync_check_interval,
            nonfinite=train.nonfinite,
        )


def make_optimizer(params: list[torch.Tensor], hyper: Hyper, lr: float | None = None) -> Any:
    """The optimizer ``hyper.optimizer`` names over ``params`` (learning rate ``lr``, default ``hyper.lr``).

    Adam is :class:`LeanAdam`: torch's fused Adam step (one kernel over all tensors, about 2.5x faster
    than foreach on CPU at this size) without a ``torch.optim.Optimizer`` around it. torch has no fused
    RMSprop; its multi-tensor (foreach) kernels are a little faster than the per-tensor loop on CPU (and
    the usual choice on CUDA), so RMSprop uses those, unless
    ``hyper.compile_optimizer``: then its step is compiled by ``torch.compile`` into one fused loop (the
    instance's ``step`` is replaced; the optimizer's state and checkpoints are unchanged). The learning
    rate is then a tensor, so changing it (``set_optimizer_lr``) reuses the compiled step.
    """
    lr = hyper.lr if lr is None else lr
    if hyper.optimizer == "adam":
        return LeanAdam(params, lr=lr, eps=hyper.adam_eps, betas=hyper.adam_betas)
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


# torch.optim.Adam's hyper-parameters and their defaults, read from its signature: the keys of a torch
# Adam's parameter group, so checkpoints hold the same group whichever class wrote them
_ADAM_DEFAULTS = {k: v.default for k, v in inspect.signature(torch.optim.Adam.__init__).parameters.items()
                  if k not in ("self", "params")}
_ADAM_ARGS = tuple(inspect.signature(_functional_adam).parameters)


class LeanAdam:
    """Adam exactly as ``torch.optim.Adam(params, lr, eps=eps, fused=True)`` steps (the same functional
    :func:`torch.optim.adam.adam`, so every step is bit-identical), with the same ``param_groups``,
    ``state`` and ``state_dict`` / ``load_state_dict`` formats, but not a ``torch.optim.Optimizer``.

    Why: constructing, stepping or saving a torch optimizer imports ``torch._dynamo`` (its methods are
    wrapped in ``torch._disable_dynamo``), about 1.3 s of every process's start-up on a CPU core, paid
    again by every rank and every run, however short. And the step runs on state lists gathered once,
    instead of again on every step (``_init_group`` and the profiling wrapper: about 25 of the 90 us of
    a fused step over CartPole's 67k parameters on one CPU thread); they are gathered again after
    :meth:`load_state_dict`. Like torch's step it honours ``found_inf`` (a device flag: 1 skips the step
    and leaves the step count, see LearnerBase._step_on_device)."""

    def __init__(self, params: list[torch.Tensor], lr: float, eps: float,
                 betas: tuple[float, float] = ADAM_BETAS) -> None:
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        group = {**_ADAM_DEFAULTS, "lr": lr, "eps": eps, "betas": tuple(betas), "fused": True}
        self.param_groups: list[dict[str, Any]] = [{**group, "params": list(params)}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.found_inf: torch.Tensor | None = None
        self._cached: tuple[Any, ...] | None = None  # (lists, betas, the group's other arguments)

    def _gather(self) -> tuple[Any, ...]:
        """((params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps), betas, the group's other
        arguments of the functional adam), creating the state on the first step as torch's
        ``_init_group`` does for fused Adam."""
        group = self.param_groups[0]
        params = group["params"]
        for p in params:
            if p not in self.state:
                st = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group["amsgrad"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p] = st
        st = [self.state[p] for p in params]
        lists = (list(params), [p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                 [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [], [s["step"] for s in st])
        extra = {k: group[k] for k in _ADAM_ARGS if k in group and k not in ("params", "lr", "betas")}
        if "has_complex" in _ADAM_ARGS:
            extra["has_complex"] = False
        return lists, group["betas"], extra

    def step(self) -> None:
        cached = self._cached
        if cached is None or any(g is not p.grad for g, p in zip(cached[0][1], cached[0][0])):
            cached = self._cached = self._gather()  # first step, a load, or a gradient tensor replaced
        lists, (beta1, beta2), extra = cached
        with torch.no_grad():
            _functional_adam(*lists, beta1=beta1, beta2=beta2, lr=self.param_groups[0]["lr"], grad_scale=None,
                             found_inf=self.found_inf, **extra)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: state by parameter index, the group's hyper-parameters with ``params`` as indices."""
        group = self.param_groups[0]
        params = group["params"]
        return {"state": {i: self.state[p] for i, p in enumerate(params) if p in self.state},
                "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                                  "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copies of the state on each parameter's device (moments in its dtype, the step count in float32, as
        torch's fused Adam keeps it) and the stored hyper-parameters."""
        (saved,) = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(saved["params"]) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        self.state = {}
        for index, st in state_dict["state"].items():
            p = params[saved["params"].index(index)]
            self.state[p] = {k: (v.to(device=p.device, dtype=torch.float32 if k == "step" else p.dtype, copy=True)
                                 if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        self.param_groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": params}]
        self._cached = None


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
    # The moving averages' decays are this run's (train.moment_scaling at its batch scale), also where the
    # checkpoint was written at another one (batch_scope per_rank on another world size).
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = tuple(hyper.adam_betas)
        if "alpha" in group:
            group["alpha"] = hyper.rmsprop_alpha
