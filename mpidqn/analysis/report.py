"""``python -m mpidqn report RUN_DIR|SWEEP_DIR [...] [--out DIR]``: tables and plots over runs; a
sweep directory stands for its runs and adds a ranked table of its configs."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from mpidqn.analysis import plots
from mpidqn.analysis.sweep import is_sweep, ranked, sweep_runs
from mpidqn.analysis.runs import Run, RunLoadError, load_run
from mpidqn.analysis.tables import (
    aggregate,
    group_by_settings,
    idle_cpus_notes,
    lockstep_table,
    scaling_problem,
    summary,
    tidy,
    time_to_score,
)
from mpidqn.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK

PROG = "mpidqn report"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Summary tables (CSV) and plots (PNG) of one or more runs. Runs whose "
        "config differs only in the seed are aggregated: interquartile mean (IQM) with a 95% bootstrap "
        "confidence interval over the seeds.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run directory (holds log.h5) or a sweep directory (holds sweep.yaml)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where to write (default: DIR/report for one run or sweep, ./report for several)")
    parser.add_argument("--target", type=float, metavar="RETURN",
                        help="also the time to score: per setting (world size included), the median env steps and "
                        "seconds to the first evaluation >= RETURN and their fraction of the fastest 1-rank "
                        "setting's (time_to_score.csv)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="instead: write each run's log as TensorBoard events (RUN_DIR/tensorboard/, or "
                             "OUT/<run dir name>/ with --out); needs only the tensorboard extra")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage line; -h exits 0
        return int(exit_.code or 0)
    if args.tensorboard:
        from mpidqn.analysis.export import tensorboard_main

        return tensorboard_main(argv)
    run_dirs, sweep_notes = expand_sweeps(args.run_dirs)
    runs = load_runs(run_dirs)
    if not runs:
        print(f"{PROG}: no run could be read", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or (args.run_dirs[0] / "report" if len(args.run_dirs) == 1 else Path("report"))
    table = summary(runs)
    print(format_table(table))
    print()
    configs = aggregate(group_by_settings(runs), table)
    print(format_table(configs))
    print()
    sweep = any(map(is_sweep, args.run_dirs))
    if sweep:
        print("configs ranked by the IQM of the final evaluation over seeds:")
        print(format_table(ranked(configs)))
        print()
    scores = None
    if args.target is not None:
        scores = time_to_score(group_by_settings(runs), args.target)
        print(f"time to the first evaluation >= {args.target:g}")
        print(format_table(scores))
        for note in idle_cpus_notes(scores):
            print(f"note: {note}")
        print()
    waits = lockstep_table(runs)
    if len(waits):
        print("where the multi-rank runs wait (shares of the wall time; docs/scaling.md, Where the ranks wait):")
        print(format_table(waits))
        for row in waits[waits["threads_per_core"] > 1].itertuples():
            print(f"note: {row.run} ran {row.threads_per_core:.3g} rank threads per core on its most crowded host: "
                  "ranks also wait for each other to be scheduled, so its transfer and jitter shares overstate "
                  "those of a core per thread")
        print()
    try:
        out.mkdir(parents=True, exist_ok=True)
        written, notes = write_report(runs, table, out)
        if len(waits):
            waits.to_csv(out / "lockstep.csv", index=False)
            written.append(out / "lockstep.csv")
        if sweep:
            ranked(configs).to_csv(out / "ranked.csv", index=False)
            written.insert(2, out / "ranked.csv")
        if scores is not None:
            scores.to_csv(out / "time_to_score.csv", index=False)
            written.append(out / "time_to_score.csv")
    except OSError as err:
        print(f"{PROG}: cannot write to {out}: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILURE
    for path in written:
        print(f"wrote {path}")
    for note in [*sweep_notes, *notes]:
        print(f"note: {note}")
    return EXIT_OK


def expand_sweeps(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Each sweep directory replaced by its runs that have a log; notes on its unfinished runs."""
    run_dirs: list[Path] = []
    notes: list[str] = []
    for path in paths:
        if is_sweep(path):
            dirs, more = sweep_runs(path)
            run_dirs += dirs
            notes += more
        else:
            run_dirs.append(path)
    return run_dirs, notes


def format_table(table: pd.DataFrame) -> str:
    """Plain aligned text: 4 significant digits for fractions, "-" for anything missing."""
    def cell(value: object) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
        return str(value)

    return table.astype(object).map(cell).to_string(index=False)


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """Every readable run (names made unique); one stderr line per run skipped."""
    runs: list[Run] = []
    for run_dir in run_dirs:
        try:
            run = load_run(run_dir)
        except RunLoadError as err:
            print(f"{PROG}: skipping {run_dir}: {err}", file=sys.stderr)
            continue
        taken = {r.name for r in runs}
        base, k = run.name, 1
        while run.name in taken:
            k += 1
            run.name = f"{base}-{k}"
        runs.append(run)
    return runs


def write_report(runs: Sequence[Run], table: pd.DataFrame, out: Path) -> tuple[list[Path], list[str]]:
    """Write CSVs and PNGs into ``out``; return the paths written and notes on what was skipped."""
    groups = group_by_settings(runs)
    written = [out / "summary.csv", out / "aggregate.csv", out / "tidy.csv"]
    table.to_csv(written[0], index=False)
    aggregate(groups, table).to_csv(written[1], index=False)
    tidy(runs).to_csv(written[2], index=False)
    notes: list[str] = []

    def keep(path: Path | None, what: str) -> None:
        if path is None:
            notes.append(f"{what} skipped: nothing logged for it")
        else:
            written.append(path)

    keep(plots.eval_return_plot(groups, "step", out / "eval_return_vs_steps.png"), "eval return vs steps")
    keep(plots.eval_return_plot(groups, "wall_time", out / "eval_return_vs_wall_time.png"),
         "eval return vs wall time")
    keep(plots.training_return_plot(groups, out / "training_return_vs_steps.png"), "training return")
    keep(plots.loss_plot(groups, out / "loss_vs_steps.png"), "loss")
    keep(plots.throughput_plot(runs, out / "throughput.png"), "throughput")
    for run in runs:
        keep(plots.time_breakdown_plot(run, out / f"time_breakdown_{_file_safe(run.name)}.png"),
             f"time breakdown of {run.name}")
        keep(plots.phase_timeline_plot(run, out / f"timeline_{_file_safe(run.name)}.png"),
             f"phase timeline of {run.name}")
    problem = scaling_problem(runs)
    if problem is None and table["env_steps_per_s"].notna().all():
        table.pipe(plots.scaling_table).to_csv(out / "scaling.csv")
        written += [out / "scaling.csv", plots.scaling_plot(table, out / "scaling.png")]
    else:
        notes.append(f"scaling plot skipped: {problem or 'a run has no throughput'}")
    return written, notes


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
