"""Tables over runs: tidy (long) metrics, one summary row per run, per-rank time, seed groups."""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
import pandas as pd

from mpidqn.analysis.curves import iqm_interval
from mpidqn.analysis.paired import paired_step_difference
from mpidqn.analysis.runs import Run, settings
from mpidqn.distributed.hosts import host_threads

TIDY_COLUMNS = ["run", "seed", "world", "step", "metric", "value"]
EVAL_METRIC = "eval_return"
SUMMARY_COLUMNS = ["run", "env", "seed", "world_size", "pipeline_stages", "env_steps", "wall_time_s",
                   "final_eval_return", "best_eval_return", "env_steps_per_s", "comm_share"]
# Settings that never make two runs different experiments: the seed, and where things were written.
_NOT_SETTINGS = ("seed",)
_NOT_SETTING_SUFFIXES = ("dir", "path")


def tidy(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (run, step, metric): every logged scalar, and ``eval_return`` (evaluation mean)."""
    parts = []
    for run in runs:
        scalars = run.scalars.drop(columns="wall_time", errors="ignore")
        long = scalars.melt(id_vars="step", var_name="metric", value_name="value") if len(scalars) else None
        evals = pd.DataFrame({"step": run.evaluations.get("step", []), "metric": EVAL_METRIC,
                              "value": run.evaluations.get("mean", [])})
        for part in (long, evals):
            if part is not None and len(part):
                parts.append(part.assign(run=run.name, seed=run.seed, world=run.world_size))
    if not parts:
        return pd.DataFrame(columns=TIDY_COLUMNS)
    frame = pd.concat(parts, ignore_index=True)
    return frame.dropna(subset=["value"])[TIDY_COLUMNS].reset_index(drop=True)


def summary(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run (columns ``SUMMARY_COLUMNS``).

    ``env_steps`` is the largest global step logged, ``wall_time_s`` the largest wall time (both
    summed over resumed segments), ``env_steps_per_s`` their ratio (end to end, start-up, evaluation
    and checkpoints included: what a user waits for), ``comm_share`` the fraction of all ranks'
    timed seconds spent in the ``comm`` phase.
    """
    rows = []
    for run in runs:
        steps = _largest(run, "step")
        wall = _largest(run, "wall_time")
        evals = run.evaluations["mean"] if len(run.evaluations) else pd.Series(dtype=float)
        rows.append({
            "run": run.name, "env": run.env_id, "seed": run.seed, "world_size": run.world_size,
            "pipeline_stages": run.pipeline_stages, "env_steps": steps, "wall_time_s": wall,
            "final_eval_return": evals.iloc[-1] if len(evals) else np.nan,
            "best_eval_return": evals.max() if len(evals) else np.nan,
            "env_steps_per_s": steps / wall if wall > 0 else np.nan,
            "comm_share": comm_share(run),
        })
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    table["env_steps"] = table["env_steps"].astype("Int64")  # a count; NaN-able for an empty log
    return table


AGGREGATE_COLUMNS = ["setting", "runs", "final_eval_iqm", "final_eval_ci_low", "final_eval_ci_high",
                     "final_eval_mean", "final_eval_min", "best_eval_iqm", "env_steps_per_s", "wall_time_s"]


def aggregate(groups: dict[str, list[Run]], table: pd.DataFrame) -> pd.DataFrame:
    """One row per group of runs that differ only in the seed: the interquartile mean of the final
    (and best) evaluation over the seeds with a 95 % bootstrap interval, plus the mean and the worst
    seed so a failure is not averaged away; ``wall_time_s`` is the mean wall time of a seed."""
    by_run = table.set_index("run")
    rows = []
    for label, runs in groups.items():
        t = by_run.loc[[r.name for r in runs]]
        final = t["final_eval_return"].dropna().to_numpy()
        best = t["best_eval_return"].dropna().to_numpy()
        center, low, high = iqm_interval(final) if len(final) else (np.nan, np.nan, np.nan)
        rows.append({
            "setting": label, "runs": len(runs), "final_eval_iqm": float(center), "final_eval_ci_low": float(low),
            "final_eval_ci_high": float(high), "final_eval_mean": final.mean() if len(final) else np.nan,
            "final_eval_min": final.min() if len(final) else np.nan,
            "best_eval_iqm": float(iqm_interval(best)[0]) if len(best) else np.nan,
            "env_steps_per_s": t["env_steps_per_s"].mean(), "wall_time_s": t["wall_time_s"].mean(),
        })
    return pd.DataFrame(rows, columns=AGGREGATE_COLUMNS)


TIME_TO_SCORE_COLUMNS = ["setting", "world_size", "runs", "reached", "median_steps_to_target",
                         "median_seconds_to_target", "fraction_of_best_1_rank", "median_seconds_per_1k_steps",
                         "speed_fraction_of_best_1_rank", "paired_seeds", "extra_steps_mean", "extra_steps_stderr",
                         "threads_per_core"]


def time_to_target(run: Run, target: float) -> tuple[float, float]:
    """(env steps, wall seconds of the run) at its first evaluation whose mean is >= ``target``; NaNs
    when none reached it. The seconds are the run's own clock (resumed segments add up), evaluations
    included: what a user waits for."""
    ev = run.evaluations
    hit = ev[ev["mean"] >= target] if len(ev) else ev
    if not len(hit):
        return np.nan, np.nan
    return float(hit["step"].iloc[0]), float(hit["wall_time"].iloc[0])


def time_to_score(groups: dict[str, list[Run]], target: float) -> pd.DataFrame:
    """Per group of seeds: how many reached ``target``, the median env steps and seconds to it over those
    that did, and that median as a fraction of the fastest 1-rank group's: the share of the 1-rank time a
    job of this setting needs (NaN when no 1-rank group reached the target).

    That fraction mixes the speed with when each seed first passes the score, which moves by whole
    evaluation intervals from seed to seed. So two more views: the speed alone (the median seconds per
    1,000 env steps up to the score, and its fraction of the fastest 1-rank group's), and the learning
    alone (against the fastest 1-rank group, seed by seed: the mean of the extra env steps this group
    needed and its standard error, see :func:`paired_step_difference`). With the same algorithm at
    every world size (``train.batch_scale``) the extra steps should be seed noise, and the speed
    fraction is what a job at that world size can expect."""
    rows, first = [], {}
    for label, runs in groups.items():
        hits = [(r.seed, *time_to_target(r, target)) for r in runs]
        hits = [h for h in hits if h[1] == h[1]]
        first[label] = {}
        for seed, steps, _ in hits:  # by seed, for the pairing (a repeated seed: its first run)
            first[label].setdefault(seed, steps)
        worlds = sorted({r.world_size for r in runs}, key=str)
        rates = [1000 * wall / steps for _, steps, wall in hits if steps > 0]
        cores = [c for c in map(threads_per_core, runs) if c == c]  # NaN: the log does not say
        rows.append({"setting": label, "world_size": worlds[0] if len(worlds) == 1 else "mixed", "runs": len(runs),
                     "reached": len(hits),
                     "median_steps_to_target": np.median([h[1] for h in hits]) if hits else np.nan,
                     "median_seconds_to_target": np.median([h[2] for h in hits]) if hits else np.nan,
                     "median_seconds_per_1k_steps": np.median(rates) if rates else np.nan,
                     # below 1: the setting left CPUs of its host idle (e.g. 1 rank at 1 thread on 2 CPUs)
                     "threads_per_core": float(np.median(cores)) if cores else np.nan})
    table = pd.DataFrame(rows)
    if not len(table):
        return pd.DataFrame(columns=TIME_TO_SCORE_COLUMNS)
    one_rank = table[(table["world_size"] == 1) & (table["reached"] > 0)]
    best = one_rank["median_seconds_to_target"].min() if len(one_rank) else np.nan
    table["fraction_of_best_1_rank"] = table["median_seconds_to_target"] / best
    table["speed_fraction_of_best_1_rank"] = (table["median_seconds_per_1k_steps"]
                                              / (one_rank["median_seconds_per_1k_steps"].min() if len(one_rank) else np.nan))
    reference = (first[one_rank.loc[one_rank["median_seconds_to_target"].idxmin(), "setting"]]
                 if len(one_rank) else {})
    paired = [paired_step_difference(first[label], reference) for label in table["setting"]]
    table["paired_seeds"], table["extra_steps_mean"], table["extra_steps_stderr"] = (
        [p[0] for p in paired], [p[1] for p in paired], [p[2] for p in paired])
    return table[TIME_TO_SCORE_COLUMNS]


def idle_cpus_notes(scores: pd.DataFrame) -> list[str]:
    """A note where the fastest 1-rank setting of a :func:`time_to_score` table left CPUs of its host idle
    (fewer compute threads than CPUs): its fractions then flatter the ranks, which put those CPUs to work."""
    best = scores[(scores["world_size"] == 1) & (scores["fraction_of_best_1_rank"] == 1.0)]
    return [f"the fastest 1-rank setting ({row.setting}) ran {row.threads_per_core:.2g} compute threads per CPU of "
            "its host, so the fractions are against a run that leaves CPUs idle; rerun it with "
            "parallel.torch_threads=auto to compare against one rank using them all"
            for row in best.itertuples() if row.threads_per_core < 1]


def _largest(run: Run, column: str) -> float:
    values = [frame[column].max() for frame in (run.scalars, run.episodes, run.evaluations, run.timings)
              if len(frame)]
    return float(max(values)) if values else np.nan


def time_breakdown(run: Run) -> pd.DataFrame:
    """Seconds per phase (columns) per rank (index), summed over the run's segments.

    Timings are cumulative since each process started, so a segment's share is its last row per
    rank; a rank that existed in only some segments (world size changed at a resume) gets those.
    """
    t = run.timings
    if not len(t):
        return pd.DataFrame()
    phases = [c for c in t.columns if c not in ("segment", "step", "wall_time", "rank")]
    last = t.sort_values("step", kind="stable").groupby(["segment", "rank"]).tail(1)
    return last.groupby("rank")[phases].sum(min_count=1).dropna(axis=1, how="all").fillna(0.0)


def phase_timeline(run: Run) -> pd.DataFrame:
    """Seconds per phase of every rank in every report interval: one row per (rank, step), the step at
    the interval's end. The timings are cumulative per process, so an interval is the difference to the
    rank's previous row in the same segment (the first row of a segment counts from its start)."""
    t = run.timings
    if not len(t):
        return pd.DataFrame()
    phases = [c for c in t.columns if c not in ("segment", "step", "wall_time", "rank")]
    t = t.sort_values(["segment", "rank", "step"], kind="stable")
    per = t.groupby(["segment", "rank"])[phases].diff().fillna(t[phases])
    out = pd.concat([t[["rank", "step"]], per.clip(lower=0.0)], axis=1)
    return out.dropna(axis=1, how="all").reset_index(drop=True)


WAIT_PHASES = ("comm", "idle")  # time a rank spends in collectives or outside every phase
LOCKSTEP_COLUMNS = ["run", "world_size", "intervals", "wait_share", "transfer_share", "imbalance_share",
                    "jitter_share", "slowest_rank", "slowest_share", "imbalance_phase", "threads_per_core"]


def threads_per_core(run: Run) -> float:
    """Rank threads per CPU on the run's most crowded host: the compute threads of its ranks there (the
    log's ``rank_threads``; older logs: ranks times ``parallel.torch_threads``) over the CPUs they may use
    (the log's ``host_cores``). Above 1 the ranks take turns on the cores, so they also wait for each
    other to be scheduled; below 1 CPUs stay idle. NaN for a log that does not record the cores."""
    hosts, cores = run.metadata.get("rank_hosts"), run.metadata.get("host_cores")
    if not isinstance(hosts, list) or not isinstance(cores, dict) or not cores:
        return float("nan")
    threads = run.metadata.get("rank_threads")  # per rank, "auto" resolved; older logs: the setting
    if not isinstance(threads, list) or len(threads) != len(hosts):
        threads = [int(run.setting("parallel.torch_threads", 1) or 1)] * len(hosts)
    per_host = host_threads(hosts, threads)
    return max(per_host.get(h, 0) / max(1, int(n)) for h, n in cores.items())


def lockstep(run: Run) -> dict[str, object] | None:
    """Where a multi-rank run's waiting comes from, from its per-rank phases per report interval.

    Ranks meet in every gradient Allreduce, so a rank waits there (``comm``) for the slowest, or outside
    every phase (``idle``). Per interval: a rank's *busy* time is the sum of its other phases. The shares
    (of the mean interval, averaged over ranks and intervals) split the wait into:

    - ``transfer_share``: the busiest rank's ``comm``: over the interval it waits for nobody, so this is
      the data movement itself plus the waits it still has at single collectives (an upper bound of the
      transfer; a bare Allreduce of the gradient measured alone gives the transfer);
    - ``imbalance_share``: the mean of (slowest rank's busy time - this rank's): uneven work over the
      whole interval, which lockstep turns into waiting;
    - ``jitter_share``: the rest of the wait: ranks that are slow at different moments (an env reset, a
      garbage collection) make the others wait at each collective although their totals even out.

    ``slowest_rank`` is the rank most often the busiest (``slowest_share`` of the intervals) and
    ``imbalance_phase`` the phase whose spread over ranks (max - mean) is largest: the one to look at.
    ``threads_per_core`` (:func:`threads_per_core`) above 1 means an oversubscribed host: a rank that is
    descheduled stalls the others at single collectives, which shows as transfer and jitter.
    None for a 1-rank run or a run without timings.
    """
    rows = phase_timeline(run)
    if not len(rows) or rows["rank"].nunique() < 2:
        return None
    phases = [c for c in rows.columns if c not in ("rank", "step")]
    work = [p for p in phases if p not in WAIT_PHASES]
    waits = [p for p in WAIT_PHASES if p in rows]
    rows = rows.assign(busy=rows[work].sum(axis=1), wait=rows[waits].sum(axis=1))
    rows["total"] = rows["busy"] + rows["wait"]
    by = rows.groupby("step")
    rows = rows[by["rank"].transform("size") >= 2]  # an interval that only one rank reported says nothing
    by = rows.groupby("step")
    slowest = rows.loc[by["busy"].idxmax()]
    interval = by["total"].mean()
    imbalance = (by["busy"].transform("max") - rows["busy"]).groupby(rows["step"]).mean()
    transfer = slowest.set_index("step")["comm"] if "comm" in rows else pd.Series(0.0, index=interval.index)
    wait = by["wait"].mean()
    spread = {p: float((by[p].max() - by[p].mean()).sum()) for p in work}
    counts = slowest["rank"].value_counts()
    total = float(interval.sum())
    if total <= 0:
        return None
    return {
        "run": run.name, "world_size": int(rows["rank"].nunique()), "intervals": int(len(interval)),
        "wait_share": float(wait.sum()) / total,
        "transfer_share": float(transfer.sum()) / total,
        "imbalance_share": float(imbalance.sum()) / total,
        "jitter_share": float((wait - transfer - imbalance).clip(lower=0.0).sum()) / total,
        "slowest_rank": int(counts.index[0]), "slowest_share": float(counts.iloc[0]) / len(interval),
        "imbalance_phase": max(spread, key=spread.get), "threads_per_core": threads_per_core(run),
    }


def lockstep_table(runs: Sequence[Run]) -> pd.DataFrame:
    """:func:`lockstep` of every multi-rank run (an empty table when there is none)."""
    rows = [r for r in map(lockstep, runs) if r is not None]
    return pd.DataFrame(rows, columns=LOCKSTEP_COLUMNS)


def host_groups(ranks: Sequence[int], rank_hosts: object) -> list[tuple[str, list[int]]]:
    """``ranks`` grouped by host, hosts in the order of their lowest rank: [(host, ranks), ...].

    ``rank_hosts`` is the log's ``rank_hosts`` metadata (host of rank i at index i, as of the newest
    segment); ranks it does not cover (an older log, a world that shrank at a resume) are under "?".
    """
    known = list(rank_hosts) if isinstance(rank_hosts, (list, tuple)) else []
    groups: dict[str, list[int]] = {}
    for rank in sorted(ranks):
        host = str(known[rank]) if 0 <= rank < len(known) else "?"
        groups.setdefault(host, []).append(rank)
    return list(groups.items())


def comm_share(run: Run) -> float:
    breakdown = time_breakdown(run)
    total = breakdown.to_numpy().sum() if len(breakdown) else 0.0
    if "comm" not in breakdown or total <= 0:
        return np.nan
    return float(breakdown["comm"].sum() / total)


def experiment_settings(run: Run, ignore: Sequence[str] = ()) -> dict[str, object]:
    """The settings that make an experiment: all but the seed, paths and the keys in ``ignore``."""
    return {k: v for k, v in settings(run).items()
            if k not in _NOT_SETTINGS and k not in ignore and not k.split(".")[-1].endswith(_NOT_SETTING_SUFFIXES)}


def varying_settings(runs: Sequence[Run], ignore: Sequence[str] = ()) -> list[str]:
    """Keys (seed, paths and ``ignore`` aside) whose value is not the same in every run."""
    flat = [experiment_settings(run, ignore) for run in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def group_by_settings(runs: Sequence[Run], ignore: Sequence[str] = ()) -> dict[str, list[Run]]:
    """Runs with equal settings (apart from seed, paths and ``ignore``), labelled by the keys that vary.

    Where more than ``LABEL_KEYS`` keys vary (two agents' configs side by side), a group is labelled by
    what its run directories' names share instead (``DQN-s100``, ``DQN-s101`` -> ``DQN``), when that tells
    every group apart."""
    varying = varying_settings(runs, ignore)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        flat = experiment_settings(run, ignore)
        label = ", ".join(f"{k}={flat.get(k)}" for k in varying) or str(run.env_id or "all runs")
        groups.setdefault(label, []).append(run)
    if len(varying) > LABEL_KEYS:
        names = {label: name_stem([run.name for run in group]) for label, group in groups.items()}
        if all(names.values()) and len(set(names.values())) == len(names):
            return {names[label]: group for label, group in groups.items()}
    return groups


LABEL_KEYS = 4


def name_stem(names: Sequence[str]) -> str:
    """The common start of run directory names without its seed part and trailing separators:
    ``["DQN-s100", "DQN-s101"]`` -> ``"DQN"``; ``""`` where nothing is left."""
    stem = os.path.commonprefix(list(names)) if names else ""
    return re.sub(r"[-_.]?(s|seed)?\d*$", "", stem).rstrip("-_. ")


def scaling_problem(runs: Sequence[Run]) -> str | None:
    """Why these runs cannot make a scaling plot (None when they differ only in world size and seed)."""
    sizes = {run.world_size for run in runs}
    if None in sizes:
        return "a run's log has no world_size"
    if len(sizes) < 2:
        return "every run has the same world size"
    other = varying_settings(runs, ignore=("world_size",))
    if other:
        return f"the runs differ in more than world size and seed ({', '.join(other)})"
    return None
