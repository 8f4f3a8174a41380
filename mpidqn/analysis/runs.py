"""Run and load_run: one run directory's log.h5 as metadata, parsed config and DataFrames."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mpidqn.errors import UserError
from mpidqn.io.runlog import LogData, read_log

LOG_NAME = "log.h5"


class RunLoadError(UserError):
    """A run directory that cannot be analysed; the message says why, in one line."""


@dataclass
class Run:
    """One run: ``metadata`` are the log's root attributes, ``config`` the parsed ``config`` YAML.

    DataFrames have one column per field of the log's table (see ``mpidqn.io.runlog``); in ``events``
    ``kind`` and ``message`` are str, and ``evaluations`` has a ``returns`` column (one array per
    evaluation) instead of offsets.
    """

    name: str
    path: Path
    metadata: dict[str, object]
    config: dict[str, object]
    scalars: pd.DataFrame
    episodes: pd.DataFrame
    evaluations: pd.DataFrame
    timings: pd.DataFrame
    events: pd.DataFrame
    resumes: pd.DataFrame = field(default_factory=pd.DataFrame)

    def setting(self, dotted: str, default: object = None) -> object:
        """A config value by dotted name, e.g. ``run.setting("env.id")``."""
        node: object = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def seed(self) -> object:
        return self.setting("seed", self.metadata.get("seed"))

    @property
    def env_id(self) -> object:
        return self.setting("env.id", self.metadata.get("env_id"))

    @property
    def world_size(self) -> object:
        return self.metadata.get("world_size")

    @property
    def pipeline_stages(self) -> object:
        return self.metadata.get("pipeline_stages", self.setting("parallel.pipeline_stages"))


def load_run(run_dir: str | Path) -> Run:
    """Load ``RUN_DIR/log.h5`` (also while the run is being written, or after it was killed)."""
    path = Path(run_dir)
    if not path.exists():
        raise RunLoadError("no such directory")
    if not path.is_dir():
        raise RunLoadError("not a directory")
    log_path = path / LOG_NAME
    if not log_path.is_file():
        raise RunLoadError(f"no {LOG_NAME} in it")
    try:
        data = read_log(log_path)
    except OSError as err:
        raise RunLoadError(f"cannot read {LOG_NAME} (truncated or corrupt?): {_first_line(err)}") from err
    except (ValueError, KeyError) as err:
        raise RunLoadError(f"{LOG_NAME}: {_first_line(err)}") from err
    return Run(name=path.resolve().name, path=path, metadata=data.attrs, config=_config(data),
               **_frames(data))


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _config(data: LogData) -> dict[str, object]:
    raw = data.attrs.get("config")
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise RunLoadError(f"the config attribute of {LOG_NAME} is not valid YAML: {_first_line(err)}") from err
    if not isinstance(raw, dict):
        raise RunLoadError(f"the config attribute of {LOG_NAME} is not a mapping")
    return raw


def _frames(data: LogData) -> dict[str, pd.DataFrame]:
    t = data.tables
    events = pd.DataFrame(t["events"])
    for column in ("kind", "message"):
        events[column] = [b.decode("utf-8", "replace") for b in t["events"][column]]
    evals = t["evaluations"]
    returns = [t["eval_returns"][o:o + n] for o, n in zip(evals["offset"], evals["episodes"])]
    evaluations = pd.DataFrame(evals).drop(columns="offset")
    evaluations["returns"] = pd.Series(returns, dtype=object, index=evaluations.index)
    frames = {name: pd.DataFrame(t[name]) for name in ("scalars", "episodes", "timings", "resumes")}
    return {**frames, "events": events, "evaluations": evaluations}


def _flatten(node: object, flat: dict[str, object], prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(value, flat, f"{prefix}{key}.")
    else:
        flat[prefix[:-1]] = node
    flat.pop("", None)
    return flat


@functools.lru_cache(maxsize=1)
def default_settings() -> dict[str, object]:
    """Every config key of this version with its default value, flattened (dotted keys)."""
    from mpidqn.config import Config, to_dict

    return _flatten(to_dict(Config()), {})


def settings(run: Run) -> dict[str, object]:
    """The run's flattened config (dotted keys) plus world size and pipeline stages.

    A key the run's config lacks takes this version's default: keys are added with the default that keeps
    the earlier behaviour, so a run logged before a key existed ran as that default (and groups with
    newer runs of the same settings)."""
    flat = _flatten(run.config, {})
    for key, value in default_settings().items():
        flat.setdefault(key, value)
    flat["world_size"] = run.world_size
    flat["pipeline_stages"] = run.pipeline_stages
    return flat


def as_float(value: object) -> float:
    """A metadata or config value as float (NaN when missing or not a number)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float(np.nan)
