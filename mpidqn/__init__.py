"""mpidqn: an MPI-based HPC batch trainer for Deep Q-Learning.

The Python API (docs/python-api.md); ``import mpidqn`` stays light (no torch, no MPI) and each
function imports what it needs when called:

    mpidqn.train(config_or_path, run_dir=..., **overrides)  -> TrainResult(run_dir, exit_code)
    mpidqn.load_policy(run_dir, best=True)                   -> Policy with predict(obs) -> actions
    mpidqn.load_run(run_dir)                                 -> Run: the log as pandas DataFrames
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mpidqn.api import TrainResult, load_policy, load_run
    from mpidqn.train.policy import Policy

__all__ = ["train", "load_policy", "load_run", "Policy", "TrainResult", "__version__"]
_LAZY = {"load_policy": "mpidqn.api", "load_run": "mpidqn.api", "TrainResult": "mpidqn.api",
         "Policy": "mpidqn.train.policy"}


def __getattr__(name: str) -> Any:
    if name == "train":  # the subpackage mpidqn.train, callable as mpidqn.api.train (see its __init__)
        return importlib.import_module("mpidqn.train")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
