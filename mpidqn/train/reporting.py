"""Rank 0's console: progress bar on a TTY, plain periodic lines otherwise (Slurm logs).

Every rank-0 side effect of the loop (printing, and the run log once attached) lives here; the
other ranks get :class:`SilentReporter`, so the loop has no scattered ``if rank == 0``. The trainer
hands over plain values (:class:`RunHeader`, :class:`Progress`, evaluation results); nothing here
reaches into the trainer, its learner or its optimizer.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

import numpy as np

LAUNCHERS = ("mpiexec", "mpirun", "hydra_pmi_proxy", "prterun", "prted", "prte", "orterun", "orted")


def _parent(pid: int) -> tuple[int, str]:
    """(parent pid, command name) of ``pid`` from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[1]), stat[stat.index("(") + 1: stat.rindex(")")]


def launcher_on_terminal(max_depth: int = 4) -> bool:
    """Whether the MPI launcher that started this process writes to a terminal.

    Under mpiexec a rank's stdout is a pipe to the launcher, which copies it to its own stdout, so
    ``isatty()`` is false even when the user watches a terminal. Walk up the parents (Linux /proc)
    while they are launcher processes (mpiexec, Hydra's proxy, PRRTE) and report whether one of them
    has a terminal as its stdout. Anything unreadable means no.
    """
    pid = os.getpid()
    try:
        for _ in range(max_depth):
            pid, _ = _parent(pid)
            if pid <= 1 or not _parent(pid)[1].startswith(LAUNCHERS):
                return False
            if os.readlink(f"/proc/{pid}/fd/1").startswith(("/dev/pts/", "/dev/tty")):
                return True
    except (OSError, ValueError, IndexError):
        return False
    return False


@dataclass(frozen=True)
class RunHeader:
    """What the first line of a run says, and where its progress starts."""

    env_id: str
    world: int
    dp: int
    pipeline_stages: int
    num_envs: int  # per rank
    parameters: int
    total_steps: int
    torch_threads: int
    step: int  # global env steps at the start (non-zero on resume)
    updates: int  # learner updates at the start
    device: str = "cpu"  # where rank 0's learner runs ("cuda:0", ...)


@dataclass(frozen=True)
class Progress:
    """One progress report of rank 0 (global values, gathered from every rank)."""

    step: int  # global env steps
    updates: int
    episodes: int  # finished episodes of all ranks so far
    recent_returns: Sequence[float]  # returns of the last (up to 100) episodes of all ranks
    epsilon: float
    learning_rate: float  # from the run's lr schedule at ``step``
    replay_size: int  # transitions in rank 0's replay shard
    metrics: dict[str, float]  # the learner's since the last report: loss, q_mean, nonfinite_skipped
    new_episodes: list[np.ndarray]  # per rank: (global step, return, length) rows since the last report
    timing_names: Sequence[str]
    timings: np.ndarray  # (ranks, len(timing_names)) cumulative seconds per phase
    wall: float  # seconds since the loop started
    samples: int = 0  # transitions sampled by all updates so far (the replay ratio's numerator)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}g}"  # NaN -> "-"


class SilentReporter:
    """What ranks other than 0 report: nothing."""

    def start(self, header: RunHeader) -> None: ...
    def progress(self, p: Progress) -> None: ...
    def tick(self, step: int) -> None: ...
    def evaluation(self, result: dict, final: bool) -> None: ...
    def message(self, text: str) -> None: ...
    def event(self, step: int, kind: str, text: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class ConsoleReporter(SilentReporter):
    """Rank 0: progress lines or bar, evaluation lines, final summary; forwards rows to a run log."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None, runlog: Any | None = None) -> None:
        self.stream = stream or sys.stdout
        self.runlog = runlog
        on_terminal = self.stream.isatty() or (stream is None and launcher_on_terminal())
        use_bar = mode == "bar" or (mode == "auto" and on_terminal)
        self.bar = None
        if use_bar and mode != "none":
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                use_bar = False
        self.use_bar = use_bar
        self.quiet = mode == "none"
        self._last = (0.0, 0, 0, None)  # wall, env steps, updates, timings
        self.total_steps = 0

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif not self.quiet:
            print(text, file=self.stream, flush=True)

    def start(self, header: RunHeader) -> None:
        h = header
        self.total_steps = h.total_steps
        self.message(
            f"mpidqn: {h.env_id} | world {h.world} (dp {h.dp} x pipeline {h.pipeline_stages}) | "
            f"{h.num_envs} env/rank | {h.parameters:,} parameters | "
            f"{h.total_steps:,} global env steps | threads/rank {h.torch_threads}"
            + ("" if h.device == "cpu" else f" | learner on {h.device}")
        )
        if self.use_bar:
            self.bar = self._tqdm(total=h.total_steps, initial=h.step,
                                  unit="step", file=self.stream, dynamic_ncols=True)
        self._last = (0.0, h.step, h.updates, None)

    def tick(self, step: int) -> None:
        """Every loop iteration: move the bar to the global step (known on every rank, so no
        collective); tqdm redraws at most every 0.1 s. Plain lines wait for :meth:`progress`."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def progress(self, p: Progress) -> None:
        steps, updates, timings = p.step, p.updates, p.timings
        last_wall, last_steps, last_updates, last_timings = self._last
        dt = max(p.wall - last_wall, 1e-9)
        delta = timings if last_timings is None else timings - last_timings
        comm_idx = list(p.timing_names).index("comm")
        comm_share = float(delta[:, comm_idx].mean() / dt)
        stats = {
            "env_steps_per_s": (steps - last_steps) / dt,
            "updates_per_s": (updates - last_updates) / dt,
            "episode_return": float(np.mean(p.recent_returns)) if len(p.recent_returns) else float("nan"),
            "epsilon": p.epsilon,
            "comm_share": comm_share,
            **p.metrics,
        }
        self._last = (p.wall, steps, updates, timings)
        if self.runlog is not None:
            self._log_rows(p, stats)
        if self.bar is not None:
            self.bar.update(steps - self.bar.n)
            self.bar.set_postfix_str(
                f"ret {_fmt(stats['episode_return'])} loss {_fmt(stats['loss'])} eps {stats['epsilon']:.3f} "
                f"{stats['env_steps_per_s']:,.0f} st/s allreduce {100 * comm_share:.1f}%")  # drawn now, not later
            return
        self.message(
            f"step {steps:>9,}/{self.total_steps:,} | {stats['env_steps_per_s']:8,.0f} env-steps/s | "
            f"{stats['updates_per_s']:7,.1f} upd/s | return {_fmt(stats['episode_return'], 4):>6} "
            f"(last {len(p.recent_returns)}) | loss {_fmt(stats['loss'])} | eps {stats['epsilon']:.3f} | "
            f"allreduce {100 * comm_share:4.1f}%"
        )

    def _log_rows(self, p: Progress, stats: dict) -> None:
        log = self.runlog
        log.scalars(p.step, **stats, learning_rate=p.learning_rate, replay_size=float(p.replay_size),
                    updates=float(p.updates), episodes=float(p.episodes), samples=float(p.samples))
        rows = [r for r in p.new_episodes if len(r)]
        if rows:
            ranks = np.concatenate([np.full(len(r), rank) for rank, r in enumerate(p.new_episodes) if len(r)])
            block = np.concatenate(rows)
            log.episodes(ranks, block[:, 0].astype(np.int64), block[:, 1], block[:, 2].astype(np.int64))
        log.timings(p.step, list(p.timing_names), p.timings)
        log.maybe_flush()

    def flush(self) -> None:
        """Make every logged row durable (called with each checkpoint, so log and checkpoint agree)."""
        if self.runlog is not None:
            self.runlog.flush()

    def event(self, step: int, kind: str, text: str) -> None:
        """A diagnostic worth keeping: printed and recorded in the run log."""
        self.message(text)
        if self.runlog is not None:
            self.runlog.event(step, kind, text)

    def evaluation(self, result: dict, final: bool) -> None:
        if self.runlog is not None:
            self.runlog.evaluation(result["step"], np.asarray(result["returns"]))
            self.runlog.flush()
        label = "final evaluation" if final else "evaluation"
        self.message(
            f"{label} @ {result['step']:,} steps: mean {result['mean']:.1f} ± {result['std']:.1f} "
            f"(min {result['min']:.0f}, max {result['max']:.0f}, {result['episodes']} episodes)"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.runlog is not None:
            self.runlog.close()
