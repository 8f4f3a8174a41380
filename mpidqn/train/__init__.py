"""The training loop and what it drives: run dirs, checkpoints, evaluation, stop requests, console and log rows.

This package is also the function ``mpidqn.train(config_or_path, run_dir=..., **overrides)``: calling it
calls :func:`mpidqn.api.train` (see there). A package and a function cannot both be the attribute
``mpidqn.train``, and once any ``mpidqn.train.*`` module is imported the package is; so the package
itself is made callable.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from mpidqn import api as _api


class _CallablePackage(types.ModuleType):
    """A module whose call is :func:`mpidqn.api.train`."""

    def __call__(self, config_or_path: Any = None, run_dir: Any = None, **kwargs: Any) -> _api.TrainResult:
        return _api.train(config_or_path, run_dir, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
