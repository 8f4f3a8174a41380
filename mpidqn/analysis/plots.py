"""The report's PNG plots. Each function writes one file and returns its path, or None (no data).

matplotlib ``Figure`` objects are used directly (the Agg canvas, no pyplot), so plotting neither
needs a display nor touches the backend of a notebook that imports this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mpidqn.analysis.curves import CONFIDENCE, bootstrap_band
from mpidqn.analysis.runs import Run
from mpidqn.analysis.tables import host_groups, time_breakdown

_X_LABELS = {"step": "env steps (all ranks)", "wall_time": "wall time (s)"}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def eval_return_plot(groups: dict[str, list[Run]], x: str, path: Path) -> Path | None:
    """Mean evaluation return of each group of seeds against ``x`` ("step" or "wall_time"),
    with a bootstrap confidence band over the seeds."""
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    ax = fig.add_subplot()
    plotted = False
    for label, runs in groups.items():
        curves = [(r.evaluations[x].to_numpy(), r.evaluations["mean"].to_numpy())
                  for r in runs if len(r.evaluations)]
        band = bootstrap_band(curves)
        if not band.n or not len(band.x):
            continue
        line, = ax.plot(band.x, band.mean, label=f"{label} (n={band.n})")
        ax.fill_between(band.x, band.low, band.high, color=line.get_color(), alpha=0.25, linewidth=0)
        plotted = True
    if not plotted:
        return None
    ax.set(xlabel=_X_LABELS[x], ylabel="evaluation return",
           title=f"evaluation return: mean over seeds, {CONFIDENCE:.0%} bootstrap band")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def throughput(run: Run) -> pd.DataFrame:
    """(wall_time, env_steps_per_s) of a run: the logged scalar, else derived from step and time."""
    s = run.scalars
    if "env_steps_per_s" in s and s["env_steps_per_s"].notna().any():
        return s[["wall_time", "env_steps_per_s"]].dropna()
    if len(s) < 2:
        return pd.DataFrame(columns=["wall_time", "env_steps_per_s"])
    rate = s["step"].diff() / s["wall_time"].diff()
    return pd.DataFrame({"wall_time": s["wall_time"], "env_steps_per_s": rate}).replace(np.inf, np.nan).dropna()


def throughput_plot(runs: Sequence[Run], path: Path) -> Path | None:
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    ax = fig.add_subplot()
    plotted = False
    for run in runs:
        data = throughput(run)
        if len(data):
            ax.plot(data["wall_time"], data["env_steps_per_s"], label=run.name)
            plotted = True
    if not plotted:
        return None
    ax.set(xlabel=_X_LABELS["wall_time"], ylabel="env steps / s", title="throughput")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def time_breakdown_plot(run: Run, path: Path) -> Path | None:
    """One stacked bar per rank: seconds in each phase; ranks grouped by host (log's ``rank_hosts``)."""
    breakdown = time_breakdown(run)
    if not len(breakdown):
        return None
    groups = host_groups(breakdown.index.tolist(), run.metadata.get("rank_hosts"))
    order = [rank for _, members in groups for rank in members]
    breakdown = breakdown.loc[order]
    positions, centers, start = [], [], 0  # the ranks in host order, a gap of one bar between hosts
    for _, members in groups:
        positions += range(start, start + len(members))
        centers.append(start + (len(members) - 1) / 2)
        start += len(members) + 1
    ranks = np.asarray(positions)
    fig = Figure(layout="constrained", figsize=(max(5.0, 0.5 * (len(order) + len(groups) - 1) + 3), 4.5))
    ax = fig.add_subplot()
    bottom = np.zeros(len(breakdown))
    for phase in breakdown.columns:
        ax.bar(ranks, breakdown[phase], bottom=bottom, label=phase)
        bottom += breakdown[phase].to_numpy()
    ax.set(xlabel="rank", ylabel="seconds", title=f"time per phase and rank: {run.name}", xticks=ranks)
    ax.set_xticklabels([str(r) for r in order])
    if "rank_hosts" in run.metadata:
        hosts = ax.secondary_xaxis(-0.14)
        hosts.set_xticks(centers, labels=[host for host, _ in groups])
        hosts.tick_params(length=0)
        hosts.set_xlabel("host")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


def scaling_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per world size: mean env-steps/s over seeds, speedup and efficiency against the smallest."""
    table = summary.groupby("world_size")["env_steps_per_s"].agg(["mean", "count"]).sort_index()
    base_world = float(table.index[0])
    table["speedup"] = table["mean"] / table["mean"].iloc[0]
    table["ideal"] = table.index.to_numpy(dtype=float) / base_world
    table["efficiency"] = table["speedup"] / table["ideal"]
    return table


def scaling_plot(summary: pd.DataFrame, path: Path) -> Path:
    table = scaling_table(summary)
    worlds = table.index.to_numpy(dtype=float)
    fig = Figure(layout="constrained", figsize=(9, 4))
    left, right = fig.subplots(1, 2)
    left.plot(worlds, table["ideal"], "k--", label="ideal")
    left.plot(worlds, table["speedup"], "o-", label="measured (mean over seeds)")
    per_run = summary["env_steps_per_s"] / table["mean"].iloc[0]
    left.scatter(summary["world_size"].astype(float), per_run, s=12, alpha=0.5, label="runs")
    left.set(xlabel="world size (ranks)", ylabel="speedup (env steps / s)", xticks=worlds)
    left.legend(fontsize="small")
    right.plot(worlds, table["efficiency"], "o-")
    right.axhline(1.0, color="k", linestyle="--")
    right.set(xlabel="world size (ranks)", ylabel="parallel efficiency", xticks=worlds, ylim=(0, None))
    fig.suptitle(f"scaling against world size {worlds[0]:g}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)
