"""The report's PNG plots. Each function writes one file and returns its path, or None (no data).

matplotlib ``Figure`` objects are used directly (the Agg canvas, no pyplot), so plotting neither
needs a display nor touches the backend of a notebook that imports this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from mpidqn.analysis.curves import CONFIDENCE, iqm_band, smooth
from mpidqn.analysis.runs import Run
from mpidqn.analysis.tables import host_groups, phase_timeline, time_breakdown

_X_LABELS = {"step": "env steps (all ranks)", "wall_time": "wall time (s)"}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def seed_curves_plot(groups: dict[str, list[Run]], curve: Callable[[Run], tuple[np.ndarray, np.ndarray]],
                     x: str, ylabel: str, path: Path) -> Path | None:
    """One line per group of seeds against ``x`` ("step" or "wall_time"): the IQM over the seeds of
    ``curve(run)``, with a bootstrap confidence band when a group has two seeds or more."""
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    ax = fig.add_subplot()
    seeds: list[int] = []
    for label, runs in groups.items():
        band = iqm_band([c for c in map(curve, runs) if len(c[0])])
        if not band.n or not len(band.x):
            continue
        seeds.append(band.n)
        line, = ax.plot(band.x, band.center, marker="o" if len(band.x) < 30 else None, markersize=3,
                        label=f"{label} ({band.n} seed{'s' if band.n > 1 else ''})")
        if band.n > 1:  # a band over one seed would only be its own curve
            ax.fill_between(band.x, band.low, band.high, color=line.get_color(), alpha=0.25, linewidth=0)
    if not seeds:
        return None
    if max(seeds) == 1:
        how = "one seed per config: no confidence band"
    elif min(seeds) == 1:
        how = f"IQM over seeds, {CONFIDENCE:.0%} bootstrap band (configs with 2+ seeds)"
    else:
        how = f"IQM over seeds, {CONFIDENCE:.0%} bootstrap band"
    ax.set(xlabel=_X_LABELS[x], ylabel=ylabel)
    ax.set_title(f"{ylabel} ({how})", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def eval_return_plot(groups: dict[str, list[Run]], x: str, path: Path) -> Path | None:
    """Greedy evaluation return of each group of seeds against ``x``."""
    def curve(r: Run) -> tuple[np.ndarray, np.ndarray]:
        e = r.evaluations
        return (e[x].to_numpy(), e["mean"].to_numpy()) if len(e) else (np.empty(0), np.empty(0))

    return seed_curves_plot(groups, curve, x, "evaluation return", path)


def training_return_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    """Return of the training episodes (exploring, all ranks), binned over env steps."""
    def curve(r: Run) -> tuple[np.ndarray, np.ndarray]:
        e = r.episodes.sort_values("step") if len(r.episodes) else r.episodes
        return smooth(e["step"].to_numpy(), e["return"].to_numpy()) if len(e) else (np.empty(0), np.empty(0))

    return seed_curves_plot(groups, curve, "step", "training episode return", path)


def loss_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    """TD loss (mean over the updates between log rows) against env steps."""
    def curve(r: Run) -> tuple[np.ndarray, np.ndarray]:
        s = r.scalars[["step", "loss"]].dropna() if "loss" in r.scalars else r.scalars
        return (s["step"].to_numpy(), s["loss"].to_numpy()) if len(s) else (np.empty(0), np.empty(0))

    return seed_curves_plot(groups, curve, "step", "TD loss", path)


def throughput(run: Run) -> pd.DataFrame:
    """(wall_time, env_steps_per_s) of a run: the logged scalar, else derived from step and time."""
    s = run.scalars
    if "env_steps_per_s" in s and s["env_steps_per_s"].notna().any():
        return s[["wall_time", "env_steps_per_s"]].dropna()
    if len(s) < 2:
        return pd.DataFrame(columns=["wall_time", "env_steps_per_s"])
    rate = s["step"].diff() / s["wall_time"].diff()
    return pd.DataFrame({"wall_time": s["wall_time"], "env_steps_per_s": rate}).replace(np.inf, np.nan).dropna()


def _warm_up(run: Run, index: pd.Index) -> np.ndarray:
    """Rows of the log before learning started (no updates yet): env stepping alone, much faster."""
    s = run.scalars
    if "updates" not in s:
        return np.zeros(len(index), dtype=bool)
    return (s["updates"].reindex(index).fillna(0) <= 0).to_numpy()


def throughput_plot(runs: Sequence[Run], path: Path) -> Path | None:
    """env-steps/s against wall time; the warm-up before the first update is dotted, and the legend
    gives each run's median rate while learning (the number a reader looks for)."""
    fig = Figure(layout="constrained", figsize=(7, 4.5))
    ax = fig.add_subplot()
    plotted = False
    for run in runs:
        data = throughput(run)
        if not len(data):
            continue
        warm = _warm_up(run, data.index)
        learning = data[~warm]
        rate = learning if len(learning) else data
        label = f"{run.name} (median {rate['env_steps_per_s'].median():,.0f}/s)"
        line, = ax.plot(rate["wall_time"], rate["env_steps_per_s"], label=label)
        if warm.any() and len(learning):  # joined to the first learning row so the curve is one piece
            w = pd.concat([data[warm], learning.iloc[:1]])
            ax.plot(w["wall_time"], w["env_steps_per_s"], ":", color=line.get_color())
        plotted = True
    if not plotted:
        return None
    ax.set(xlabel=_X_LABELS["wall_time"], ylabel="env steps / s (all ranks)",
           title="throughput (dotted: warm-up before the first update)")
    ax.set_ylim(bottom=0)  # a rate: its distance from 0 is the point
    ax.set_xlim(left=0)
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
    # wide enough for the bars, the legend beside them and the run's name (a figure title, so it is
    # laid out against the whole figure, not the axes the legend squeezes)
    width = max(6.5, 0.5 * (len(order) + len(groups) - 1) + 4.5, 0.085 * len(run.name) + 1.0)
    fig = Figure(layout="constrained", figsize=(width, 4.5))
    ax = fig.add_subplot()
    bottom = np.zeros(len(breakdown))
    for phase in breakdown.columns:
        ax.bar(ranks, breakdown[phase], bottom=bottom, label=phase)
        bottom += breakdown[phase].to_numpy()
    ax.set(xlabel="rank", ylabel="seconds", xticks=ranks)
    ax.set_xticklabels([str(r) for r in order])
    if "rank_hosts" in run.metadata:
        hosts = ax.secondary_xaxis(-0.14)
        hosts.set_xticks(centers, labels=[host for host, _ in groups])
        hosts.tick_params(length=0)
        hosts.set_xlabel("host")
    fig.suptitle(f"time per phase and rank\n{run.name}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1), title="phase")
    return _save(fig, path)


def phase_timeline_plot(run: Run, path: Path, max_ranks: int = 16) -> Path | None:
    """Where each rank's time went, interval by interval: one panel per rank (the first ``max_ranks``),
    the share of each report interval in each phase, stacked, against env steps. A rank that waits for
    the others in lockstep shows it as ``comm`` (inside the Allreduce) or ``idle``; one that is slow
    in a phase shows that phase growing where the others' comm grows."""
    timeline = phase_timeline(run)
    if not len(timeline) or timeline["step"].nunique() < 2:
        return None
    ranks = sorted(timeline["rank"].unique())[:max_ranks]
    phases = [c for c in timeline.columns if c not in ("rank", "step")]
    fig = Figure(layout="constrained", figsize=(8.5, 1.0 + 1.3 * len(ranks)))
    axes = fig.subplots(len(ranks), 1, sharex=True, squeeze=False)[:, 0]
    for ax, rank in zip(axes, ranks):
        mine = timeline[timeline["rank"] == rank].groupby("step")[phases].sum()
        share = mine.div(mine.sum(axis=1).replace(0.0, np.nan), axis=0).fillna(0.0)
        ax.stackplot(share.index, share.T.to_numpy(), labels=phases, step="pre")
        ax.set(ylim=(0, 1), ylabel=f"rank {rank}")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[-1].set_xlabel(_X_LABELS["step"])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="outside right upper", title="phase")
    shown = "" if len(ranks) == timeline["rank"].nunique() else f" (first {len(ranks)} ranks)"
    fig.suptitle(f"share of each report interval per phase and rank{shown}\n{run.name}", fontsize="medium")
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
