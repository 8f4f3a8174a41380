"""The training loop: act, store, sample, learn, evaluate, checkpoint, log. It owns no maths."""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mpidqn.algo.dqn import per_rank_epsilon, resumed_updates_start, update_rounds
from mpidqn.algo.large_batch import warmup_factor
from mpidqn.algo.schedules import Schedules
from mpidqn.config import Config, batch_plan, priority_params, rows_per_rank
from mpidqn.distributed import collectives as C
from mpidqn.distributed import watchdog
from mpidqn.distributed.hosts import limit_threads, resolve_threads, reuse_freed_memory
from mpidqn.envs.presets import spec_from_config
from mpidqn.envs.snapshot import refusal_line, restore_envs, seal_envs
from mpidqn.envs.vector import (
    acting_noise_seed,
    env_reset_seeds,
    make_vector_env,
    shared_seed,
    spawn_seeds,
    true_next_obs,
)
from mpidqn.io.h5tree import Json, flatten, unflatten
from mpidqn.io.trust import Trust
from mpidqn.learners.factory import build_learner
from mpidqn.replay.frames import make_replay_shard
from mpidqn.replay.shard import ReplayShard, partition_plan
from mpidqn.train import faults
from mpidqn.train import stop as signals
from mpidqn.train.checkpoints import (
    CheckpointContent,
    read_model,
    read_rank,
    read_replay_rows,
    replay_lengths,
    replay_max_priority,
)
from mpidqn.train.evaluation import evaluate_learner
from mpidqn.train.reporting import Progress, RunHeader
from mpidqn.train.sampling import RoundSampler
from mpidqn.train.timing import PhaseTimer

PHASES = ("env", "act", "replay", "learn", "comm", "eval", "checkpoint", "log")
TIMING_NAMES = (*PHASES, "idle")  # idle: wall time of the process outside every phase


@dataclass
class Counters:
    """Global progress, identical on every rank."""

    env_steps: int = 0
    iterations: int = 0
    episodes: int = 0
    samples: int = 0  # transitions sampled by all updates (the replay ratio is samples / env_steps)


@dataclass
class EpisodeTracker:
    """Per-sub-env running return/length; finished episodes wait here until the next log gather."""

    num_envs: int
    returns: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)
    finished: list[tuple[int, float, int]] = field(default_factory=list)  # (global step, return, length)

    def __post_init__(self) -> None:
        self.returns = np.zeros(self.num_envs, dtype=np.float64)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    def record(self, rewards: np.ndarray, done: np.ndarray, step: int) -> None:
        self.returns += rewards
        self.lengths += 1
        for i in np.flatnonzero(done):
            self.finished.append((step, float(self.returns[i]), int(self.lengths[i])))
            self.returns[i] = 0.0
            self.lengths[i] = 0

    def finished_rows(self) -> np.ndarray:
        """Finished episodes not yet reported, as (global step, return, length) rows."""
        return np.array(self.finished, dtype=np.float64).reshape(-1, 3)

    def pop(self) -> np.ndarray:
        out = self.finished_rows()
        self.finished = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"returns": self.returns.copy(), "lengths": self.lengths.copy(), "finished": self.finished_rows()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns[:] = state["returns"]
        self.lengths[:] = state["lengths"]
        self.finished = [(int(s), float(r), int(n)) for s, r, n in np.asarray(state["finished"]).reshape(-1, 3)]


def crossed(prev: int, cur: int, interval: int) -> bool:
    """True when a multiple of ``interval`` lies in (prev, cur]."""
    return interval > 0 and prev // interval != cur // interval


class Trainer:
    """Runs one rank's part of a data-parallel DQN job."""

    def __init__(self, cfg: Config, topo: Any, reporter: Any, checkpoints: Any | None = None,
                 trust: Trust = Trust(None, problem="the trainer was given no secret"),
                 threads: int | None = None) -> None:
        """``threads``: this rank's compute threads, ``parallel.torch_threads`` resolved (default: resolved
        here, "auto" among the ranks of ``topo.comm``: collective)."""
        self.cfg, self.topo, self.reporter, self.checkpoints = cfg, topo, reporter, checkpoints
        self.trust = trust  # signs the env state of checkpoints; decides which saved env state a resume loads
        self.threads = threads if threads is not None else resolve_threads(cfg.parallel.torch_threads, topo.comm)
        limit_threads(self.threads)
        if cfg.parallel.reuse_freed_memory:
            reuse_freed_memory()
        self.world, self.rank = topo.world, topo.rank
        self.seeds = spawn_seeds(cfg.seed, self.world, self.rank)
        self.env_spec = spec_from_config(cfg.env)
        self.envs = make_vector_env(self.env_spec, cfg.env.num_envs, asynchronous=cfg.env.async_envs,
                                    backend=cfg.env.backend)
        self.obs_shape = self.envs.single_observation_space.shape
        self.n_actions = int(self.envs.single_action_space.n)
        torch.manual_seed(cfg.seed)  # rank 0's initial parameters are broadcast to all replicas
        self.plan = batch_plan(cfg.train, self.world)  # the batch scale K and what it rescales
        lr = cfg.train.lr * self.plan.lr_factor
        self.base_lr = lr
        rows = rows_per_rank(cfg.train, self.world)
        self.batch_per_rank = rows[self.rank]
        self.schedules = Schedules.from_config(cfg.train)
        # every env has emitted a transition (n-step ones after n steps) before the first sample
        self.min_fill = self.world * cfg.env.num_envs * cfg.train.n_step
        self.updates_start = max(cfg.train.learning_starts, self.min_fill)
        self.learner = build_learner(cfg, topo, self.obs_shape, self.n_actions, lr, say=reporter.message,
                                     plan=self.plan)
        prio = priority_params(cfg.train)
        self.replay = make_replay_shard(  # the env's obs dtype: uint8 images stay uint8
            cfg.train.replay_storage, ReplayShard.shard_capacity(cfg.train.buffer_size, self.world, self.rank),
            self.obs_shape, self.envs.single_observation_space.dtype, cfg.env.num_envs,
            cfg.train.n_step, cfg.train.gamma, self.env_spec.frame_stack,
            priority=(prio["priority_alpha"], prio["priority_eps"]) if cfg.train.prioritized else None,
        )
        self.sampler = RoundSampler(cfg.train, topo, self.replay, rows, shared_seed(cfg.seed))
        self.explore_rng = np.random.default_rng(self.seeds["explore"])
        self.replay_rng = np.random.default_rng(self.seeds["replay"])
        # noisy nets: this rank's acting noise (the learner draws from it, the checkpoint keeps it)
        self.noise_rng = np.random.default_rng(acting_noise_seed(cfg.seed, self.rank)) if cfg.network.noisy else None
        if self.noise_rng is not None:
            self.learner.use_acting_noise(self.noise_rng)
        self.counters = Counters()
        self.episodes = EpisodeTracker(cfg.env.num_envs)
        self.recent_returns: deque[float] = deque(maxlen=100)  # last 100 episodes of all ranks
        self.timer = PhaseTimer(PHASES)
        self.timing_names = TIMING_NAMES
        self._t_process = time.perf_counter()
        self.obs, _ = self.envs.reset(seed=env_reset_seeds(self.seeds["env"], cfg.env.num_envs))
        self.steps_per_iteration = self.world * cfg.env.num_envs
        self.last_eval: dict[str, float] | None = None
        self.best = (-1, -math.inf)  # (step, mean return) of the best evaluation so far
        self._best_episodes = 0
        self.parameter_count = self.learner.total_parameters
        faults.install()  # TEST-ONLY MPIDQN_FAULT; without it every fault point is a no-op
        self._last_report_step = -1
        self._last_checkpoint_time = time.monotonic()
        self.watchdog = watchdog.install(
            watchdog.Watchdog(cfg.parallel.collective_timeout_s, self.rank, abort=watchdog.abort_job(topo.comm)))

    # ------------------------------------------------------------------ acting
    def epsilon(self) -> float:
        x = self.cfg.train.exploration
        eps = self.schedules.epsilon(self.counters.env_steps)
        if x.per_rank:
            eps = per_rank_epsilon(eps, self.rank, self.world, x.per_rank_alpha)
        return eps

    def act(self, eps: float) -> np.ndarray:
        n = self.cfg.env.num_envs
        # one uniform draw per env for "explore?" and one for the random action: Generator.integers
        # costs ~10 us per call at this size, more than the whole greedy forward pass
        u = self.explore_rng.random((2, n))
        explore = u[0] < eps
        random_actions = (u[1] * self.n_actions).astype(np.int64)
        if explore.all() and not self.learner.collective_acting:
            return random_actions
        greedy = self.learner.greedy_actions(self.obs)
        return np.where(explore, random_actions, greedy)

    def env_step(self) -> None:
        with self.timer("act"):
            actions = self.act(self.epsilon())
        with self.timer("env"):
            next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
            done = terminated | truncated
        step = self.counters.env_steps + self.steps_per_iteration
        with self.timer("replay"):
            self.replay.add(self.obs, actions, rewards, true_next_obs(next_obs, done, info), terminated, truncated)
        self.episodes.record(rewards, done, step)
        self.obs = next_obs

    # ------------------------------------------------------------------ learning
    def learning_rate(self) -> float:
        """The optimizer's learning rate at the current step: base lr x the lr schedule's factor x the
        warm-up's."""
        step = self.counters.env_steps
        warmup = warmup_factor(step, self.cfg.train.learning_starts, self.cfg.train.lr_warmup_steps)
        return self.base_lr * self.schedules.lr_factor(step) * warmup

    def learn(self, num_updates: int) -> None:
        self.learner.set_lr(self.learning_rate())
        self.counters.samples += num_updates * self.plan.global_batch
        comm_before = self.learner.comm_seconds
        if self.sampler.plain:
            with self.timer("replay"):
                batch = self.replay.sample_many(num_updates, self.batch_per_rank, self.replay_rng)
            with self.timer("learn"):
                self.learner.update_many(batch, num_updates)
        else:
            exchange_before = self.sampler.exchange_seconds
            self.sampler.learn(self.learner, num_updates, self.replay_rng,
                               self.schedules.beta(self.counters.env_steps), self.timer)
            self.timer.move("replay", "comm", self.sampler.exchange_seconds - exchange_before)
        comm = self.learner.comm_seconds - comm_before
        self.timer.move("learn", "comm", comm)  # the Allreduce ran inside update_many

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        """Train until total_steps (returns "done"), an evaluation at eval.stop_at (returns "target") or an
        agreed stop signal (returns "signal")."""
        cfg = self.cfg
        signals.install()  # normally done by the CLI already; harmless twice
        agree_every = max(1, 256 // self.steps_per_iteration)  # collectives every ~256 global steps
        t, c = self.topo, cfg
        self.reporter.start(RunHeader(
            env_id=c.env.id, world=t.world, dp=t.dp, pipeline_stages=t.pipeline_stages, num_envs=c.env.num_envs,
            parameters=self.parameter_count, total_steps=c.train.total_steps, torch_threads=self.threads,
            step=self.counters.env_steps, updates=self.learner.updates,
            device=str(getattr(self.learner, "device", None) or "cpu")))
        t_start = time.perf_counter()
        while self.counters.env_steps < cfg.train.total_steps:
            prev = self.counters.env_steps
            self.env_step()
            self.counters.env_steps += self.steps_per_iteration
            self.counters.iterations += 1
            cur = self.counters.env_steps
            self.reporter.tick(cur)
            self.watchdog.step = cur
            faults.point("step", self.rank, cur, learner=self.learner)
            rounds = update_rounds(prev, cur, self.plan.train_freq, self.updates_start)
            if rounds:
                self.learn(rounds * self.plan.gradient_steps)
            improved = False
            if crossed(prev, cur, cfg.eval.interval_steps) and cur < cfg.train.total_steps:
                improved = self.evaluate()
                if cfg.eval.stop_at is not None and self.last_eval["mean"] >= cfg.eval.stop_at:
                    # the same result on every rank (gathered), so every rank leaves here together
                    self.report_progress(time.perf_counter() - t_start)
                    self.save_checkpoint(best=improved)
                    return "target"
            if crossed(prev, cur, cfg.log.interval_steps):
                self.report_progress(time.perf_counter() - t_start)
            if crossed(prev, cur, cfg.checkpoint.interval_steps) or improved:
                self.save_checkpoint(best=improved)
            if self.counters.iterations % agree_every == 0:
                stop, due = C.agree_flags(
                    [signals.received() is not None, self._checkpoint_due()],
                    self.topo.comm)
                if stop:
                    signals.begin_stop()
                    self.report_progress(time.perf_counter() - t_start)
                    self.save_checkpoint()
                    return "signal"
                if due:
                    self.save_checkpoint()
        if self._last_report_step != self.counters.env_steps:
            self.report_progress(time.perf_counter() - t_start)
        self.save_checkpoint(best=self.evaluate(final=True))
        return "done"

    def evaluate(self, final: bool = False) -> bool:
        """Greedy evaluation on all ranks; True when it beats every earlier one (the same verdict on
        every rank, so all write its checkpoint together)."""
        with self.timer("eval"):
            result = evaluate_learner(self.learner, self.cfg, self.topo, self.counters.env_steps)
        self.last_eval = result
        self.reporter.evaluation(result, final)
        if result["mean"] <= self.best[1]:
            return False
        self.best = (self.counters.env_steps, float(result["mean"]))
        self._best_episodes = int(result["episodes"])
        return True

    def report_progress(self, wall: float) -> None:
        self._last_report_step = self.counters.env_steps
        with self.timer("log"):
            with watchdog.guard(self.topo.comm, "log gather"):
                gathered = self.topo.comm.allgather(self.episodes.pop())  # small: episodes since last report
                metrics = self.learner.pop_metrics()
                totals = self.timer.totals()
                idle = time.perf_counter() - self._t_process - totals.sum()
                timings = self.topo.comm.gather(np.append(totals, idle), root=0)
            for rows in gathered:
                self.recent_returns.extend(rows[:, 1].tolist())
                self.counters.episodes += len(rows)
            if self.topo.is_root:
                self.reporter.progress(Progress(
                    step=self.counters.env_steps, updates=self.learner.updates, episodes=self.counters.episodes,
                    samples=self.counters.samples, recent_returns=tuple(self.recent_returns), epsilon=self.epsilon(),
                    learning_rate=self.learning_rate(), replay_size=len(self.replay), metrics=metrics,
                    new_episodes=gathered, timing_names=self.timing_names, timings=np.stack(timings), wall=wall))

    def _checkpoint_due(self) -> bool:
        """Wall-clock checkpoints: rank 0's clock decides (the flag is agreed like a stop)."""
        minutes = self.cfg.checkpoint.interval_minutes
        return bool(minutes) and self.rank == 0 and time.monotonic() - self._last_checkpoint_time >= 60 * minutes

    def save_checkpoint(self, best: bool = False) -> None:
        """Write a checkpoint of this step (once per step); ``best``: it holds the best evaluation so far."""
        if self.checkpoints is None:
            return
        self._last_checkpoint_time = time.monotonic()
        with self.timer("checkpoint"):
            self.reporter.flush()  # log rows up to this step are on disk before the checkpoint counts
            if self.checkpoints.last_step != self.counters.env_steps:  # not written at this step yet
                self.checkpoints.save(self.checkpoint_content())
            if best:
                self.checkpoints.mark_best(self.best[0], self.best[1], self._best_episodes)

    # ------------------------------------------------------------------ checkpoint state
    def checkpoint_content(self) -> CheckpointContent:
        """This rank's part of a checkpoint of the current step. The model is written once per pipeline
        stage: by that stage's first data-parallel rank."""
        model = self.learner.state_dict() if self.topo.dp_comm.Get_rank() == 0 else None
        return CheckpointContent(step=self.counters.env_steps, stage=self.topo.stage, model=model,
                                 rank=self.rank_state())

    def rank_state(self) -> dict[str, Any]:
        """Everything besides the model that this rank needs to continue exactly."""
        state: dict[str, Any] = {
            "counters": {"env_steps": self.counters.env_steps, "iterations": self.counters.iterations,
                         "episodes": self.counters.episodes, "samples": self.counters.samples},
            "rng": {"explore": Json(self.explore_rng.bit_generator.state),
                    "replay": Json(self.replay_rng.bit_generator.state), "torch": torch.get_rng_state(),
                    "shared": Json(self.sampler.shared_rng.bit_generator.state),
                    **({"noise": Json(self.noise_rng.bit_generator.state)} if self.noise_rng is not None else {})},
            "envs": seal_envs(self.envs, self.obs, self.trust.key),
            "episodes": self.episodes.state_dict(),
            "schedules": self.schedules.state_dict(),
            "stats": {"timer": self.timer.totals(), "recent_returns": np.array(self.recent_returns, dtype=np.float64),
                      "best": np.array(self.best, dtype=np.float64)},
        }
        if self.cfg.checkpoint.replay:
            state["replay"] = unflatten(self.replay.state_dict())
        return state

    def load_checkpoint(self, ckpt: Any) -> str:
        """Resume from a verified checkpoint; "exact" on the same layout, else "elastic"."""
        self.learner.load_state_dict(read_model(ckpt))
        self._resume_schedules(ckpt)
        self._resume_warmup(ckpt)
        if ckpt.world == self.world and ckpt.pipeline_stages == self.topo.pipeline_stages:
            state = read_rank(ckpt, self.rank)
            self._load_counters(state)
            self.explore_rng.bit_generator.state = state["rng"]["explore"]
            self.replay_rng.bit_generator.state = state["rng"]["replay"]
            if "shared" in state["rng"]:
                self.sampler.shared_rng.bit_generator.state = state["rng"]["shared"]
            if self.noise_rng is not None and "noise" in state["rng"]:
                self.noise_rng.bit_generator.state = state["rng"]["noise"]
            torch.set_rng_state(state["rng"]["torch"])
            self.episodes.load_state_dict(state["episodes"])
            restored = self._resume_envs(state.get("envs", {}), ckpt)
            if "replay" in state:
                self.replay.load_state_dict(flatten(state["replay"]))
                if not restored:
                    self.replay.drop_pending()  # pending n-step steps belong to episodes not resumed
            return "exact"
        # Elastic: counters and model carry over; every rank's streams are re-derived from
        # (seed, resumed step) and its envs start new episodes; replay shards are re-partitioned.
        self._load_counters(read_rank(ckpt, 0, ("counters", "stats")))
        self.seeds = spawn_seeds(self.cfg.seed, self.world, self.rank, epoch=self.counters.env_steps)
        self.explore_rng = np.random.default_rng(self.seeds["explore"])
        self.replay_rng = np.random.default_rng(self.seeds["replay"])
        self.sampler.shared_rng = np.random.default_rng(shared_seed(self.cfg.seed, self.counters.env_steps))
        if self.noise_rng is not None:  # in place: the learner holds this generator
            fresh = np.random.default_rng(acting_noise_seed(self.cfg.seed, self.rank, self.counters.env_steps))
            self.noise_rng.bit_generator.state = fresh.bit_generator.state
        self.obs, _ = self.envs.reset(seed=env_reset_seeds(self.seeds["env"], self.cfg.env.num_envs))
        lengths = replay_lengths(ckpt)
        if lengths:
            rows = read_replay_rows(ckpt, partition_plan(lengths, self.world)[self.rank])
            if rows is not None:
                self.replay.extend(rows)
            top = replay_max_priority(ckpt) if self.replay.priorities is not None else None
            if top is not None:  # new transitions keep getting the run's maximum priority
                self.replay.priorities.raise_max(top)
        return "elastic"

    def _resume_envs(self, saved: Any, ckpt: Any) -> bool:
        """The saved envs where every rank restores its own (True); else every rank starts new episodes,
        seeded from (seed, resumed step) so they are not the run's first episodes again: envs whose state
        was not saved (async, EnvPool, EzPickle: see envs.pickle_envs) quietly, env state that is not
        trusted or not usable (issue #37) with one warning line. One verdict for all ranks."""
        envs, obs, why = restore_envs(saved if isinstance(saved, dict) else {}, self.trust, self.envs)
        refused = C.gather_errors(why, self.topo.comm)  # every rank learns every rank's verdict
        if not refused:
            self.envs.close()
            self.envs, self.obs = envs, obs
            return True
        if envs is not None:
            envs.close()
        problems = [(rank, text) for rank, text in refused if text]
        if problems:
            self.reporter.event(self.counters.env_steps, "envs_not_restored",
                                refusal_line(ckpt.path, problems, self.world))
        fresh = spawn_seeds(self.cfg.seed, self.world, self.rank, epoch=self.counters.env_steps)["env"]
        self.obs, _ = self.envs.reset(seed=env_reset_seeds(fresh, self.cfg.env.num_envs))
        self.episodes.returns[:] = 0.0
        self.episodes.lengths[:] = 0
        return False

    def _resume_schedules(self, ckpt: Any) -> None:
        """Epsilon and lr continue from their checkpointed values, re-anchored if total_steps changed."""
        saved = read_rank(ckpt, 0, ("schedules",)).get("schedules")
        # checkpoints before schedules were saved: the schedules of the config they were written with
        old_train = ckpt.config().train
        before = Schedules.from_state_dict(saved, old_train) if saved else Schedules.from_config(old_train)
        self.schedules = before.resumed(ckpt.step, self.cfg.train)

    def _resume_warmup(self, ckpt: Any) -> None:
        """A checkpoint without (enough) replay: collect until the replay holds learning_starts again (see
        resumed_updates_start; slack: the pending n-step rows and 1 % of the buffer for frame evictions)."""
        t = self.cfg.train
        restored = sum(replay_lengths(ckpt) or [])
        slack = self.min_fill + t.buffer_size // 100
        start = resumed_updates_start(ckpt.step, restored, t.learning_starts, t.buffer_size, slack, self.min_fill)
        self.updates_start = max(self.updates_start, start)

    def _load_counters(self, state: dict[str, Any]) -> None:
        c = state["counters"]
        # checkpoints written before samples were counted: every update so far at this run's global batch
        samples = int(c["samples"]) if "samples" in c else self.learner.updates * self.plan.global_batch
        self.counters = Counters(int(c["env_steps"]), int(c["iterations"]), int(c["episodes"]), samples)
        self.recent_returns.extend(np.asarray(state["stats"]["recent_returns"]).tolist())
        if "best" in state["stats"]:
            step, score = state["stats"]["best"]
            self.best = (int(step), float(score))
