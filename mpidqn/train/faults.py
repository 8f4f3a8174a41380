"""TEST-ONLY fault injection: the one seam between the tests and the production classes.

``MPIDQN_FAULT=<kind>:<rank>:<global step>`` makes rank ``rank`` misbehave once the global step
reaches ``step``. Never set it in real runs. Kinds, and the fault point each fires at:

============================  =================  ==================================================
kind                          point              what happens
============================  =================  ==================================================
``raise``                     ``step``           an exception in the loop (one rank's error must end every rank)
``stop``                      ``step``           as if SIGUSR1 arrived (checkpoint, exit 75) at a deterministic step
``kill``                      ``step``           SIGKILL this process in the loop (a rank dies mid-training)
``hang``                      ``step``           this rank sleeps forever (the others' watchdog must end the job)
``nan``                       ``step``           this rank's loss is NaN from then on (train.nonfinite: skip or stop)
``perturb``                   ``step``           add 1e-3 to this rank's first parameter, once (the replica check must see it)
``kill_in_checkpoint``        ``checkpoint``     SIGKILL between this rank's data files and the COMPLETE marker
``pause_in_checkpoint``       ``checkpoint``     sleep 5 s there, once (a slow disk: a signal arrives mid-checkpoint)
``enospc``                    ``rank_file``      writing this rank's checkpoint file fails with "No space left on device"
============================  =================  ==================================================

The hook interface is one function, :func:`point`, called at the named points by the code that owns
them (``step``: the training loop after each iteration; ``checkpoint`` and ``rank_file``: the
checkpoint manager). :func:`install` (the trainer calls it once) reads ``MPIDQN_FAULT``; while it is
unset, :func:`point` returns at its first line. Nothing else in the package knows about faults: the
NaN loss is injected from outside the learner by a forward hook on its online network that poisons
the output of every forward pass run with autograd on (the loss's; acting and TD targets run without
it), so the loss, its gradient and the learner's non-finite check all see NaN, exactly as a real
numerical blow-up of this rank would look.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpidqn.train import stop as signals

POINTS = {"raise": "step", "stop": "step", "kill": "step", "hang": "step", "nan": "step", "perturb": "step",
          "kill_in_checkpoint": "checkpoint", "pause_in_checkpoint": "checkpoint", "enospc": "rank_file"}
KINDS = tuple(POINTS)
PAUSE_S = 5.0  # pause_in_checkpoint


@dataclass
class Fault:
    """One parsed ``MPIDQN_FAULT``."""

    kind: str
    rank: int
    step: int
    done: bool = False  # a one-shot fault (perturb, nan's hook) has been applied

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        kind, rank, step = spec.split(":")
        if kind not in POINTS:
            raise ValueError(f"MPIDQN_FAULT={spec}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        return cls(kind, int(rank), int(step))

    def due(self, where: str, rank: int, step: int) -> bool:
        return POINTS[self.kind] == where and rank == self.rank and step >= self.step


_active: Fault | None = None


def install(spec: str | None = None) -> Fault | None:
    """Arm the fault of ``spec`` (default: ``$MPIDQN_FAULT``; unset or empty disarms); return it."""
    global _active
    spec = os.environ.get("MPIDQN_FAULT") if spec is None else spec
    _active = Fault.parse(spec) if spec else None
    return _active


def point(where: str, rank: int, step: int, *, learner: Any = None, path: Path | None = None) -> None:
    """Fault point ``where`` reached by ``rank`` at global ``step``: fire the armed fault if it is due.

    ``learner`` (point ``step``) is what ``nan`` and ``perturb`` act on; ``path`` (point ``rank_file``)
    is the file whose write ``enospc`` fails.
    """
    fault = _active
    if fault is None or not fault.due(where, rank, step):
        return
    kind = fault.kind
    if kind == "raise":
        raise RuntimeError(f"injected fault (MPIDQN_FAULT) at step {step}")
    if kind == "stop":
        signals.request(signal.SIGUSR1)
    elif kind in ("kill", "kill_in_checkpoint"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "pause_in_checkpoint" and not fault.done:
        fault.done = True
        time.sleep(PAUSE_S)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "nan" and not fault.done:
        fault.done = True
        poison_loss(learner)
    elif kind == "perturb" and not fault.done:
        fault.done = True
        with torch.no_grad():
            next(p for p in learner.online.parameters() if p.numel()).view(-1)[0] += 1e-3
    elif kind == "enospc":
        assert path is not None
        tmp = path.with_name(f".{path.name}.tmp")  # the disk fills up in the middle of this file
        tmp.write_bytes(b"\0" * 4096)
        tmp.unlink()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _Restore:
    """A hook handle for a patched attribute: ``.remove()`` puts the original back."""

    def __init__(self, obj: Any, name: str, original: Any) -> None:
        self.obj, self.name, self.original = obj, name, original

    def remove(self) -> None:
        setattr(self.obj, self.name, self.original)


def poison_loss(learner: Any) -> Any:
    """Make every forward pass that the loss is computed from return NaN (so does the loss): the
    online network's forward with autograd on, or the learner's MLP kernel's forward that keeps its
    inputs for backward (:mod:`mpidqn.learners.mlp_kernel`). Returns a handle (``.remove()`` undoes it)."""
    kernel = getattr(learner, "_kernel", None)
    if kernel is not None:
        forward = kernel.forward

        def poisoned(obs: torch.Tensor, keep: bool = True) -> torch.Tensor:
            out = forward(obs, keep)
            return out * float("nan") if keep else out

        kernel.forward = poisoned
        return _Restore(kernel, "forward", forward)

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output * float("nan") if torch.is_grad_enabled() else None

    return learner.online.register_forward_hook(hook)
