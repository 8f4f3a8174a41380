"""Typed, nested run configuration: dataclasses, strict YAML loading, dotted overrides, validation.

No MPI and no torch here. YAML is only a serialisation of these dataclasses: unknown keys, wrong
types and impossible values raise :class:`ConfigError` naming the dotted key.

Step counting (the same whatever the world size):
  * ``train.total_steps``, ``train.learning_starts``, ``train.train_freq``, ``*.interval_steps`` and
    the epsilon schedule count GLOBAL environment steps: transitions collected by all ranks together.
    Every loop iteration each rank steps its ``env.num_envs`` envs once, so the global counter
    advances by ``world * env.num_envs`` per iteration.
  * Every multiple of ``train.train_freq`` global steps (from ``train.learning_starts`` on) gets one
    round of ``train.gradient_steps`` updates, done by every replica in lockstep; an iteration that
    crosses several multiples does several rounds. Updates per global env step are therefore
    ``gradient_steps / train_freq`` whatever the world size and ``env.num_envs``.
  * The global batch of an update is the transitions its gradient averages over, summed over all
    ranks: ``K * train.batch_size``, split over the ranks as evenly as integers allow (the first
    ``global % world`` ranks sample one row more, and every row weighs its share of the global batch). K = 1 (default) makes N ranks do exactly the
    updates of 1 rank on the same global batch. K > 1 is the large-batch mode (``train.batch_scale``, or
    ``train.batch_scope: per_rank`` for K = world): updates per env step fall by K while the replay ratio
    (transitions sampled per env step) stays the config's, and the settings counted in updates (target
    refresh, tau, ema_decay) and the learning rate follow the rules of :mod:`mpidqn.algo.large_batch`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mpidqn.algo.large_batch import ADAM_BETAS, BatchPlan
from mpidqn.errors import ConfigError


@dataclass
class EnvConfig:
    id: str = "CartPole-v1"
    """Gymnasium environment id (classic control, Box2D, ``ALE/...`` with the atari extra)."""
    num_envs: int = 1
    """Environment copies per rank, stepped as one synchronous vector env."""
    max_episode_steps: int | None = None
    """Override of the environment's time limit (None keeps the registered one); for Atari it counts
    agent steps (4 frames each)."""
    preset: Literal["auto", "none", "atari", "minatar"] = "auto"
    """Wrappers around the env. auto: "atari" for ``ALE/...`` ids, "minatar" for ``MinAtar/...``,
    else "none". atari: DQN preprocessing (no-op reset, frame skip 4, 84x84 gray, uint8);
    minatar: (C, 10, 10) uint8 channel-first observations. See mpidqn/envs/presets.py."""
    frame_stack: int | None = None
    """Observations stacked along a new first axis (FrameStackObservation, padded with the reset frame);
    None: 4 for Atari, 1 (no stacking) otherwise."""
    terminal_on_life_loss: bool = False
    """Atari: an episode ends when a life is lost (gymnasium's AtariPreprocessing semantics). Training
    only; evaluation always plays full games."""
    clip_rewards: bool | None = None
    """Clip training rewards to [-1, 1] (ClipReward); None: on for Atari, off otherwise. Evaluation
    reports unclipped returns; training episode returns are the clipped ones."""
    sticky_actions: float | None = None
    """Probability of repeating the previous action (Atari repeat_action_probability, MinAtar
    sticky_action_prob); None keeps the env's default (ALE v5: 0.25, MinAtar: 0.1)."""
    async_envs: bool = False
    """Step the num_envs copies in subprocesses (gymnasium AsyncVectorEnv) instead of in-process.
    Checkpoints then cannot hold the envs: a resume starts new episodes (replay and model are exact)."""
    backend: Literal["gymnasium", "envpool"] = "gymnasium"
    """What steps the num_envs training copies. gymnasium: the preset's wrappers in a gymnasium vector
    env (in-process, or subprocesses with async_envs). envpool: Atari only (``ALE/<Game>-v5``, preset
    atari; ``pip install -e ".[envpool]"``): one EnvPool (C++ threads) per rank with the same
    preprocessing, terminal_on_life_loss included; the remaining differences are listed in
    mpidqn/envs/pool.py. Checkpoints cannot hold it: a resume starts new episodes (replay and model are
    exact). Evaluation plays gymnasium's ALE with either backend."""


@dataclass
class NetworkConfig:
    kind: Literal["mlp", "nature_cnn", "minatar_cnn"] = "mlp"
    """Q-network: an MLP on flat observations; the Nature DQN CNN (3 conv + 512 FC) for (C, 84, 84)
    Atari frames; the MinAtar CNN (16 3x3 conv + 128 FC) for (C, 10, 10). CNNs scale uint8 inputs by
    1/255 in their first layer; ``hidden`` and ``activation`` apply to the MLP only."""
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    """Widths of the hidden layers of the MLP Q-network."""
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    """Hidden-layer activation."""
    dueling: bool = False
    """Dueling head: Q = V + A - mean(A)."""
    layer_norm: bool = False
    """MLP only: LayerNorm after every hidden Linear, before the activation (as in PQN, Gallici et al.
    2024): it bounds the features the TD targets bootstrap from and steadies late training."""
    distributional: bool = False
    """Distributional RL, the head that ``distribution`` names. C51 (Bellemare et al. 2017): a distribution
    over ``num_atoms`` returns evenly spaced on [v_min, v_max] per action, learnt by cross-entropy to the
    projected n-step target; actions maximise its expected value. train.loss is then unused; prioritized
    replay uses the per-row loss as priority. docs/rainbow.md."""
    distribution: Literal["c51", "qr"] = "c51"
    """With distributional true: ``c51``, or ``qr`` for QR-DQN (Dabney et al. 2018; Dopamine's quantile
    agent): ``num_atoms`` quantiles of the return per action at the fractions (2i+1) / (2 num_atoms),
    learnt by the quantile Huber loss (``kappa``) to the n-step target's quantiles; actions maximise their
    mean; v_min and v_max are unused."""
    num_atoms: int = 51
    """Atoms per action: C51's returns or QR-DQN's quantiles (Dopamine's num_atoms: 51 for C51, 200 for its
    quantile agent). Only with distributional true."""
    v_min: float = -10.0
    """Lowest return of the C51 support (Dopamine's vmin = -vmax). Only with distributional true."""
    v_max: float = 10.0
    """Highest return of the C51 support (Dopamine's vmax). Only with distributional true."""
    kappa: float = 1.0
    """QR-DQN: threshold of the quantile Huber loss (Dopamine's kappa). Only with distribution qr."""
    noisy: bool = False
    """Noisy nets (Fortunato et al. 2018): every Linear layer (the FC layers of a CNN) becomes a
    factorised Gaussian noisy layer. New noise per update from streams shared by all data-parallel
    replicas, acting noise from each rank's own stream, evaluation on the mean weights. Epsilon-greedy is
    off (train.exploration eps_start and eps_end 0) unless they are set explicitly. docs/rainbow.md."""
    noisy_sigma0: float = 0.5
    """sigma_0 of the factorised noise: the sigmas start at sigma_0 / sqrt(fan-in) (Fortunato et al.'s
    0.5). Only with noisy true."""


@dataclass
class ExplorationConfig:
    eps_start: float = 1.0
    """Epsilon at step 0."""
    eps_end: float = 0.04
    """Epsilon after the decay."""
    eps_fraction: float = 0.16
    """Fraction of train.total_steps over which epsilon decays linearly (a resume that changes total_steps
    continues the decay from the current epsilon)."""
    per_rank: bool = False
    """Ape-X style: rank r of W explores with eps_end ** (1 + alpha * r / (W - 1)) after the decay."""
    per_rank_alpha: float = 7.0
    """Exponent spread of the per-rank epsilons (Ape-X uses 7 with a base of 0.4)."""


@dataclass
class TrainConfig:
    total_steps: int = 50_000
    """Global environment steps (all ranks together) to train for."""
    learning_starts: int = 1_000
    """Global environment steps collected before the first update (at least world * num_envs * n_step, so
    every shard holds a transition). After a resume whose checkpoint holds fewer transitions (a light
    checkpoint, checkpoint.replay false), updates wait until the replay has refilled to this many (or
    to buffer_size, if smaller); a resume past it with its replay restored goes on updating at once."""
    buffer_size: int = 100_000
    """Global replay capacity in transitions; each rank holds a shard of about buffer_size / world."""
    batch_size: int = 64
    """Transitions per update at batch scale 1: the global batch is ``batch_scale * batch_size``, split over
    the ranks."""
    batch_scale: int = 1
    """K >= 1, the large-batch mode: every update averages over K * batch_size transitions and every round
    does gradient_steps / K updates (or, when K does not divide gradient_steps, gradient_steps updates every
    train_freq * K / gcd steps), so the replay ratio is that of K = 1 and updates per env step fall by K.
    The run's wall time is mostly its updates, so this is how ranks buy time: at K ranks each samples
    batch_size rows for 1/K of the updates. Kept per env step: the hard target refresh (every
    target_update_interval / K updates), tau (1 - (1 - tau) ** K), ema_decay (ema_decay ** K); the lr
    follows ``lr_scaling`` and ``lr_warmup_steps``, the optimizer's averages ``moment_scaling``. K is part
    of the algorithm, not of the layout: the same K learns the same at any world size (docs/parallelism.md,
    "Large batches")."""
    batch_scope: Literal["global", "per_rank"] = "global"
    """global: the batch scale is ``batch_scale``, whatever the world size. per_rank: every rank samples
    ``batch_size`` rows per update and the batch scale follows the world (K = world, ``batch_scale`` must
    stay 1): the large-batch mode sized to the job, which changes the algorithm with the world size."""
    train_freq: int = 256
    """Global environment steps between rounds of updates: every multiple of it gets its round, also when
    one iteration of all ranks crosses several."""
    gradient_steps: int = 128
    """Updates per round (every replica does each of them in lockstep). The replay ratio is
    gradient_steps * global batch / train_freq sampled transitions per global env step."""
    gamma: float = 0.99
    """Discount factor."""
    n_step: int = 8
    """n-step returns (1 = classic one-step TD). 8 in the CartPole default: a cart drifting out over 100+
    steps is the late failure there, and longer returns carry that end back faster (docs/results.md)."""
    lr: float = 2.3e-3
    """Learning rate (of whichever ``optimizer`` is chosen)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"
    """How lr scales with the batch scale K (``batch_scale``, or the world with batch_scope per_rank):
    none, linear (lr * K) or sqrt (lr * sqrt(K)); the factor is 1 at K = 1. linear: on CartPole's tuning
    seeds at K = 8 it reached 475 as soon as K = 1 did, sqrt later and none on fewer seeds
    (docs/scaling.md); not yet measured with RMSprop (the MinAtar and Atari configs)."""
    moment_scaling: Literal["none", "compound"] = "none"
    """How the optimizer's moving averages follow the batch scale K: none keeps Adam's betas (0.9, 0.999)
    and ``rmsprop_alpha`` per update; compound raises them to the power K (0.9 ** K, 0.999 ** K,
    rmsprop_alpha ** K), so that each average spans as many env steps as at K = 1 over K times fewer
    updates, as ``ema_decay`` does. The identity at K = 1."""
    lr_warmup_steps: int = 0
    """Global env steps, from learning_starts on, over which the lr rises linearly from 0 to its value
    (0 = no warm-up); a large-batch run's first, large steps start small."""
    lr_final_fraction: float = 0.05
    """Learning rate decays linearly to lr * lr_final_fraction at the end of training (1 = constant). A
    resume that changes total_steps continues the decay from the current value to the new end."""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """adam: Adam (fused kernel) with ``adam_eps``. rmsprop: RMSprop with ``rmsprop_alpha``, ``rmsprop_eps``
    and ``rmsprop_centered`` (the MinAtar reference and Nature DQN optimizer). A checkpoint resumes
    only with the optimizer it was written with."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    rmsprop_alpha: float = 0.95
    """RMSprop decay of the squared-gradient average (the "squared gradient momentum" 0.95 of Nature
    DQN and the MinAtar reference)."""
    rmsprop_eps: float = 0.01
    """RMSprop epsilon (the "min squared gradient" 0.01 of Nature DQN and the MinAtar reference); torch,
    like MinAtar's PyTorch reference, adds it outside the square root, Nature DQN inside."""
    rmsprop_centered: bool = True
    """Centered RMSprop: normalise by the variance of the gradient (mean of squares minus the squared
    mean) instead of the mean of squares, as Nature DQN and the MinAtar reference do."""
    compile_optimizer: bool = False
    """RMSprop only: compile its step with ``torch.compile`` into one fused loop over the parameters
    (about 8x faster per step on CPU than torch's multi-tensor RMSprop; Adam already runs one fused
    kernel). Needs a C++ compiler on CPU. The first run on a machine compiles when its first update runs
    (about 8 s on a 2-core VM, more on a busy one); torch caches the result in ``TORCHINDUCTOR_CACHE_DIR``
    (default ``/tmp/torchinductor_$USER``), so later runs there load it in about 2 s. Where ``/tmp`` is
    emptied after every job, point that variable at a directory that lasts (docs/slurm.md)."""
    compile_network: bool = False
    """Compile the online network's forward (and with it its backward) in the update with
    ``torch.compile`` (data parallel only, not with ``parallel.overlap_allreduce``; the hand-written MLP
    gradient is then not used). On the CPU it made Pong's update about 10 % faster (docs/results.md);
    compilation costs seconds to a minute at the first update, is cached across runs by torch, and needs
    a C++ compiler on the CPU. Checkpoints do not change."""
    mlp_kernel: bool = True
    """An MLP (Linear or noisy layers and ReLU, a plain or dueling head; not LayerNorm) learning on the
    CPU without ``parallel.overlap_allreduce`` computes its gradient with hand-written matrix products
    instead of autograd: the same gradient up to the order of float sums, about 1.2x faster updates on
    small batches. False: always autograd."""
    max_grad_norm: float | None = 10.0
    """Clip the global gradient norm (after averaging) to this; None disables clipping."""
    loss: Literal["huber", "mse"] = "huber"
    """TD loss."""
    double_dqn: bool = True
    """Double DQN targets: online net picks the action, target net evaluates it."""
    advantage_learning: float = 0.0
    """Advantage learning's alpha in [0, 1) (Bellemare et al. 2016): the TD target of (s, a) loses
    ``alpha * (max_b Q_target(s, b) - Q_target(s, a))``, which widens the gap between the greedy action
    and the others so that small errors in Q do not flip the greedy choice. One more target-network
    forward per batch. On CartPole's tuning seeds 0.5 and 0.9 did not beat the default
    (docs/results.md). 0: plain (double) DQN targets."""
    target_regularization: float = 0.0
    """kappa >= 0: adds ``kappa * sum_a (Q(s, a) - Q_target(s, a))^2``, averaged over the batch (weighted
    like the TD loss), to the loss: the functional regulariser of Piché et al. 2021, here beside the
    target network rather than instead of it (the TD target still bootstraps from it). It keeps every
    action's value near the target network's between refreshes, damping the policy churn that makes a
    learnt policy fall back late in a run. One more target-network forward per update. On CartPole's
    tuning seeds 0.01-0.05 did not beat the default (docs/results.md). 0: off."""
    target_update_interval: int = 256
    """Hard target update every this many updates (ignored when tau < 1)."""
    tau: float = 1.0
    """Polyak coefficient applied every update when < 1; 1 means hard updates."""
    ema_decay: float = 0.0
    """> 0: evaluations, the best-model choice and ``mpidqn evaluate`` use an exponential moving average
    of the online parameters (``avg += (1 - ema_decay) * (online - avg)`` after every update, starting
    at the first update) instead of the online parameters themselves; acting and learning still use the
    online network. It averages out the last updates' swings of a greedy policy: on CartPole (0.999)
    it removed most late drops of the evaluated return but not the failures of final models, so no
    shipped config uses it (docs/results.md, "Evaluated weights"). 0: off."""
    replay_storage: Literal["auto", "transitions", "frames"] = "auto"
    """transitions: every row holds obs and next_obs. frames: image observations are stored one frame
    per env step and stacks are rebuilt at sampling (about 7 KB instead of 56 KB per Atari transition).
    auto: frames for uint8 observations of 2 or more dimensions, transitions otherwise."""
    prioritized: bool = False
    """Prioritized replay (Schaul et al. 2016): a transition is drawn with probability p ** alpha / sum of
    p ** alpha, p = |TD error| + priority_eps written back after every update, new transitions at the
    running maximum priority, losses weighted by importance weights (N P(i)) ** -beta / max."""
    priority_alpha: float | None = None
    """Priority exponent alpha (0 = uniform); null means 0.6. Only with prioritized true."""
    priority_beta: float | None = None
    """Initial importance-weight exponent beta, annealed linearly to 1 at total_steps; null means 0.4.
    Only with prioritized true."""
    priority_eps: float | None = None
    """Added to |TD error| so no transition gets priority 0; null means 0.01. It bounds the smallest
    priority, and importance weights are normalised by the globally smallest probability, so the loss
    scale shrinks like (eps / p) ** (alpha * beta): with 1e-6 and RMSprop (eps 0.01 outside the root)
    MinAtar Breakout stopped learning (docs/results.md). Only with prioritized true."""
    replay_sampling: Literal["auto", "local", "global"] = "auto"
    """local: every rank draws its share of the global batch from its own shard (prioritized: normalised
    per shard, as Ape-X). global: the global batch is drawn exactly as from one buffer holding every
    shard (one small Allgather of the shard masses per draw; ranks then draw uneven counts, 0 included).
    auto: global with prioritized replay, local otherwise (uniform local sampling is the stratified
    version of the global draw, with no collective)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner's networks and batches live: cuda:<node-local rank % GPUs> when CUDA is
    available (auto) or required (cuda); replay stays in host memory. Pipelines run on the CPU."""
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    """Epsilon-greedy schedule."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/Inf loss or gradient on any rank (agreed by all ranks before the optimizer step): "skip" the
    update and count it (scalar ``nonfinite_skipped``), or "stop": record the event in the run log, keep
    the last good checkpoint (none is written) and exit with code 3."""


@dataclass
class ParallelConfig:
    pipeline_stages: int = 1
    """Ranks per pipeline group holding layer partitions of the Q-network (1 = pure data parallel)."""
    split_points: list[int] | None = None
    """First layer index of pipeline stages 1..S-1 (S-1 strictly increasing numbers); None balances the
    stages by parameter count. Layers are those of the MLP: [Flatten, Linear, act, ..., head]."""
    micro_batches: int = 4
    """Micro-batches per update in the pipeline (GPipe schedule); more shrink the bubble, cost messages."""
    torch_threads: int | Literal["auto"] = 1
    """Compute threads per rank: torch's intra-op threads and numpy's BLAS threads (ranks are processes;
    oversubscription hurts). "auto": each rank's share of its host, the CPUs the job's ranks there may run
    on divided by their number (1 rank on 2 CPUs: 2; 2 ranks: 1 each). Compare world sizes with "auto": a
    1-rank run at 1 thread leaves the other CPUs idle (docs/scaling.md)."""
    reuse_freed_memory: bool = True
    """Each rank has the C library's malloc (glibc) keep freed blocks of up to 32 MiB for reuse, and up to
    128 MiB of free memory at the top of its heap, instead of returning them to the system at every free:
    an update's temporary tensors above 128 KiB (e.g. 512 rows x 256 units) were otherwise mapped afresh
    and page-faulted on every update (600 faults per update at 512 rows, about a fifth of its time on
    CartPole's MLP). Costs up to that much resident memory per rank; no effect where the C library is not
    glibc."""
    sync_check_interval: int = 500
    """Updates between checks that all replicas hold bit-identical parameters (0 = never)."""
    collective_timeout_s: float = 600.0
    """Watchdog: a collective of the training loop (gradient Allreduce, stop-flag agreement, pipeline
    send/recv, checkpoint and log gathers) that does not complete within this many seconds aborts the
    job with one line naming the rank, the phase and the step, exit code 5 (0 disables the watchdog).
    Must exceed the longest legitimate wait, e.g. another rank's evaluation or checkpoint write."""
    overlap_allreduce: bool = False
    """Reduce gradients in buckets with non-blocking Iallreduce started from gradient hooks during
    backward (overlapping communication with computation); false: one fused Allreduce after backward."""
    bucket_mb: float = 2.0
    """Bucket size in MB for overlap_allreduce (buckets follow reverse parameter order)."""


@dataclass
class CheckpointConfig:
    interval_steps: int = 10_000
    """Global environment steps between periodic checkpoints (0 = only the final one)."""
    interval_minutes: float = 0.0
    """Also checkpoint when this many wall-clock minutes passed since the last one (0 = off; rank 0's clock)."""
    keep: int = 2
    """Newest complete checkpoints kept on disk."""
    replay: bool = True
    """Store the replay shards in checkpoints (false: light checkpoints)."""


@dataclass
class EvalConfig:
    interval_steps: int = 10_000
    """Global environment steps between greedy evaluations (0 = only the final one)."""
    episodes: int = 10
    """Greedy episodes per evaluation (split over the data-parallel ranks)."""
    stop_at: float | None = None
    """End the run at the first periodic evaluation whose mean return is >= this (a time-to-score run):
    that step is checkpointed and the run exits 0. Unset: train to train.total_steps. Resumable: a run
    continued with a higher (or no) stop_at trains on."""


@dataclass
class LogConfig:
    interval_steps: int = 5_000
    """Global environment steps between progress lines / log rows."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """Console output of rank 0: a progress bar on a TTY, plain lines otherwise (auto)."""
    tensorboard: bool = False
    """Rank 0 also writes TensorBoard event files to RUN_DIR/tensorboard/ as the run goes: the scalars
    of log.h5, evaluations and per-phase times (``tensorboard --logdir RUN_DIR``; needs the extra:
    ``pip install -e ".[tensorboard]"``). A resumed run appends without repeating steps."""


@dataclass
class Config:
    seed: int = 0
    """Root seed; per-rank streams are spawned from it with numpy.random.SeedSequence."""
    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- loading


def _kind(tp: Any) -> str:
    """How an error line names a value of type ``tp``."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, "a list")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors, arms = [], [a for a in args if a is not type(None)]
        for arg in arms:
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        if len(arms) > 1:  # e.g. int | Literal["auto"]: name every kind of value the key takes
            raise ConfigError(f"{key}: expected {' or '.join(map(_kind, arms))}, got {value!r}")
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(repr, typing.get_args(tp)))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 2e5 in YAML is a float
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise unknown_key(prefix, str(key), names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _from_dict(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(prefix + f.name, value, tp)
    return cls(**kwargs)


def unknown_key(prefix: str, key: str, names: typing.Iterable[str]) -> ConfigError:
    """``train.lrr: unknown config key (did you mean train.lr?)``: the closest key of the same section,
    else a key anywhere whose last part is ``key`` (``lr`` -> ``train.lr``)."""
    close = difflib.get_close_matches(key, sorted(names), n=1)
    guess = prefix + close[0] if close else next((n for n, _ in iter_fields() if n.rsplit(".", 1)[-1] == key), None)
    return ConfigError(f"{prefix}{key}: unknown config key" + (f" (did you mean {guess}?)" if guess else ""))


def _parse_scalar(text: str) -> Any:
    """Parse an override's right-hand side as YAML (``3``, ``1e-3``, ``true``, ``[64, 64]``, ``null``)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "2e5" and "1e-3" as strings; a user means numbers
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings onto a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: overrides are KEY=VALUE with a dotted key, e.g. train.lr=1e-3")
        set_dotted(data, key, _parse_scalar(raw))
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"]["c"] = value`` for ``key`` "a.b.c" (in place, creating sections)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: unknown config key")
        node = child
    node[parts[-1]] = value


def yaml_error(path: str, e: yaml.YAMLError) -> str:
    """``--config FILE:LINE:COLUMN: not valid YAML (problem)``, 1-based like an editor shows it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"--config {where}: not valid YAML ({f'{context}: ' if context else ''}{problem})"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or the embedded defaults when None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error(str(path), e)) from None
    apply_overrides(data, list(overrides))
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from nested plain data (sections as dicts; missing keys keep their defaults;
    with network.noisy, epsilon defaults to 0)."""
    _noisy_exploration_defaults(data)
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def _noisy_exploration_defaults(data: dict[str, Any]) -> None:
    """With network.noisy the noise explores: epsilon defaults to 0 (Dopamine's Rainbow with noisy nets),
    unless eps_start or eps_end were set in the file or an override (those are kept as given)."""
    net, train = data.get("network"), data.get("train", {})
    if not isinstance(net, dict) or net.get("noisy") is not True or not isinstance(train, dict):
        return
    x = data.setdefault("train", {}).setdefault("exploration", {})
    if isinstance(x, dict):
        x.setdefault("eps_start", 0.0)
        x.setdefault("eps_end", 0.0)


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a Config from the YAML text stored in a run directory, log or checkpoint."""
    return config_from_dict(yaml.safe_load(text) or {})


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Yield (dotted name, field) for every leaf field (nested config classes are walked into)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of dataclass ``cls``: the string literal right below the field in
    its class body (fields without one are absent)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


# ----------------------------------------------------------------------------- validation


def batch_scale(train: TrainConfig, world: int) -> int:
    """K of the large-batch mode for this world size: ``batch_scale``, or the world with per_rank scope."""
    return world if train.batch_scope == "per_rank" else train.batch_scale


def batch_plan(train: TrainConfig, world: int) -> BatchPlan:
    """Rows, rounds and rescaled update-counted settings of this run (see :mod:`mpidqn.algo.large_batch`)."""
    return BatchPlan.build(train.batch_size, batch_scale(train, world), train.train_freq, train.gradient_steps,
                           train.target_update_interval, train.tau, train.ema_decay, train.lr_scaling,
                           train.moment_scaling, ADAM_BETAS, train.rmsprop_alpha)


def samples_per_rank(train: TrainConfig, world: int, rank: int = 0) -> int:
    """Transitions rank ``rank`` samples per update: the global batch (``batch_plan``) split as evenly as
    integers allow, ``global // world`` rows and one more on the first ``global % world`` ranks (any world
    size runs, e.g. a requeue onto 3 ranks); the loss weights each row by its share of the global batch,
    so the gradient is the global batch's. Raises ConfigError when the global batch is smaller than the
    world."""
    global_batch = batch_plan(train, world).global_batch
    _require(global_batch >= world, "train.batch_size",
             f"the global batch {global_batch} (batch_scale {batch_scale(train, world)} x batch_size "
             f"{train.batch_size}) is smaller than the world size {world}: every rank samples a share of it; "
             f"use at least {world} rows or train.batch_scope=per_rank")
    return global_batch // world + int(rank < global_batch % world)


def rows_per_rank(train: TrainConfig, world: int) -> tuple[int, ...]:
    """``samples_per_rank`` of every rank of the world, in rank order."""
    return tuple(samples_per_rank(train, world, r) for r in range(world))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


PRIORITY_DEFAULTS = {"priority_alpha": 0.6, "priority_beta": 0.4, "priority_eps": 0.01}


def priority_params(train: TrainConfig) -> dict[str, float]:
    """alpha, beta and eps of prioritized replay, defaults filled in."""
    return {k: float(getattr(train, k) if getattr(train, k) is not None else v) for k, v in PRIORITY_DEFAULTS.items()}


def _validate_priority(t: TrainConfig) -> None:
    if not t.prioritized:
        for key in PRIORITY_DEFAULTS:
            _require(getattr(t, key) is None, f"train.{key}",
                     "is set but train.prioritized is false (set train.prioritized=true, or remove it)")
        return
    p = priority_params(t)
    _require(math.isfinite(p["priority_alpha"]) and p["priority_alpha"] >= 0, "train.priority_alpha",
             f"must be >= 0, got {p['priority_alpha']}")
    _require(0.0 <= p["priority_beta"] <= 1.0, "train.priority_beta", f"must be in [0, 1], got {p['priority_beta']}")
    _require(math.isfinite(p["priority_eps"]) and p["priority_eps"] > 0, "train.priority_eps",
             f"must be > 0, got {p['priority_eps']}")


def _validate_rainbow(cfg: Config) -> None:
    """C51, QR-DQN and noisy-net settings (network.distributional, network.noisy)."""
    n, t = cfg.network, cfg.train
    _require(n.num_atoms >= 2, "network.num_atoms", f"must be >= 2, got {n.num_atoms}")
    _require(math.isfinite(n.v_min) and math.isfinite(n.v_max) and n.v_min < n.v_max, "network.v_min",
             f"must be finite and below network.v_max, got v_min={n.v_min} v_max={n.v_max}")
    _require(n.noisy_sigma0 > 0 and math.isfinite(n.noisy_sigma0), "network.noisy_sigma0",
             f"must be > 0, got {n.noisy_sigma0}")
    _require(n.kappa > 0 and math.isfinite(n.kappa), "network.kappa", f"must be > 0, got {n.kappa}")
    if n.distributional:
        why = "does not apply to network.distributional (it learns distributions, not scalar targets); set it 0"
        _require(t.advantage_learning == 0.0, "train.advantage_learning", why)
        _require(t.target_regularization == 0.0, "train.target_regularization", why)


def validate(cfg: Config) -> None:
    """Reject impossible values, naming the key. World-size dependent checks live in Topology."""
    t, x = cfg.train, cfg.train.exploration
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _require(bool(cfg.env.id), "env.id", "must not be empty")
    _require(cfg.env.num_envs >= 1, "env.num_envs", f"must be >= 1, got {cfg.env.num_envs}")
    if cfg.env.max_episode_steps is not None:
        _require(cfg.env.max_episode_steps >= 1, "env.max_episode_steps", "must be >= 1")
    if cfg.env.frame_stack is not None:
        _require(cfg.env.frame_stack >= 1, "env.frame_stack", f"must be >= 1, got {cfg.env.frame_stack}")
    if cfg.env.backend == "envpool":
        _require(cfg.env.id.startswith("ALE/") and cfg.env.preset in ("auto", "atari"), "env.backend",
                 f"envpool serves Atari only (env.id ALE/..., env.preset auto or atari), got env.id={cfg.env.id} "
                 f"env.preset={cfg.env.preset}; use env.backend=gymnasium")
        _require(not cfg.env.async_envs, "env.async_envs",
                 "does not apply to env.backend=envpool (EnvPool steps its copies in its own threads); set it false")
    if cfg.env.sticky_actions is not None:
        _require(0.0 <= cfg.env.sticky_actions <= 1.0, "env.sticky_actions",
                 f"must be in [0, 1], got {cfg.env.sticky_actions}")
    _require(cfg.parallel.bucket_mb > 0, "parallel.bucket_mb", f"must be > 0, got {cfg.parallel.bucket_mb}")
    _require(len(cfg.network.hidden) >= 1, "network.hidden", "needs at least one hidden layer")
    _require(all(w >= 1 for w in cfg.network.hidden), "network.hidden", f"widths must be >= 1, got {cfg.network.hidden}")
    _validate_rainbow(cfg)
    _require(t.total_steps >= 1, "train.total_steps", f"must be >= 1, got {t.total_steps}")
    _require(0 <= t.learning_starts <= t.total_steps, "train.learning_starts",
             f"must be in [0, train.total_steps={t.total_steps}], got {t.learning_starts}")
    _require(t.buffer_size >= 1, "train.buffer_size", f"must be >= 1, got {t.buffer_size}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.batch_size <= t.buffer_size, "train.batch_size",
             f"{t.batch_size} is larger than train.buffer_size={t.buffer_size}")
    _require(t.batch_scale >= 1, "train.batch_scale", f"must be >= 1, got {t.batch_scale}")
    _require(t.batch_scope == "global" or t.batch_scale == 1, "train.batch_scale",
             f"is {t.batch_scale} but train.batch_scope=per_rank sets the batch scale to the world size; "
             "use one of them")
    _require(t.batch_scale * t.batch_size <= t.buffer_size, "train.batch_scale",
             f"a global batch of {t.batch_scale} x {t.batch_size} = {t.batch_scale * t.batch_size} transitions is "
             f"larger than train.buffer_size={t.buffer_size}")
    _require(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", f"must be >= 0, got {t.lr_warmup_steps}")
    _require(t.train_freq >= 1, "train.train_freq", f"must be >= 1, got {t.train_freq}")
    _require(t.gradient_steps >= 1, "train.gradient_steps", f"must be >= 1, got {t.gradient_steps}")
    _require(0.0 <= t.gamma <= 1.0, "train.gamma", f"must be in [0, 1], got {t.gamma}")
    _require(t.n_step >= 1, "train.n_step", f"must be >= 1, got {t.n_step}")
    _require(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0, got {t.lr}")
    _require(0.0 < t.lr_final_fraction <= 1.0, "train.lr_final_fraction", f"must be in (0, 1], got {t.lr_final_fraction}")
    _require(t.adam_eps > 0, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _require(0.0 <= t.advantage_learning < 1.0, "train.advantage_learning",
             f"must be in [0, 1), got {t.advantage_learning}")
    _require(0.0 <= t.target_regularization and math.isfinite(t.target_regularization),
             "train.target_regularization", f"must be >= 0, got {t.target_regularization}")
    _require(0.0 < t.rmsprop_alpha < 1.0, "train.rmsprop_alpha", f"must be in (0, 1), got {t.rmsprop_alpha}")
    _require(t.rmsprop_eps > 0 and math.isfinite(t.rmsprop_eps), "train.rmsprop_eps",
             f"must be > 0, got {t.rmsprop_eps}")
    if t.max_grad_norm is not None:
        _require(t.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0 or null, got {t.max_grad_norm}")
    _require(t.target_update_interval >= 1, "train.target_update_interval", f"must be >= 1, got {t.target_update_interval}")
    _require(0.0 < t.tau <= 1.0, "train.tau", f"must be in (0, 1], got {t.tau}")
    _validate_priority(t)
    for name in ("eps_start", "eps_end"):
        value = getattr(x, name)
        _require(0.0 <= value <= 1.0, f"train.exploration.{name}", f"must be in [0, 1], got {value}")
    _require(0.0 < x.eps_fraction <= 1.0, "train.exploration.eps_fraction", f"must be in (0, 1], got {x.eps_fraction}")
    _require(x.per_rank_alpha >= 0, "train.exploration.per_rank_alpha", f"must be >= 0, got {x.per_rank_alpha}")
    p = cfg.parallel
    _require(p.pipeline_stages >= 1, "parallel.pipeline_stages", f"must be >= 1, got {p.pipeline_stages}")
    _require(p.micro_batches >= 1, "parallel.micro_batches", f"must be >= 1, got {p.micro_batches}")
    if p.split_points is not None:
        _require(len(p.split_points) == p.pipeline_stages - 1, "parallel.split_points",
                 f"parallel.pipeline_stages={p.pipeline_stages} needs {p.pipeline_stages - 1} split point(s), "
                 f"got {len(p.split_points)}")
    if t.compile_network:
        _require(p.pipeline_stages == 1, "train.compile_network",
                 f"applies to data parallelism only, not to parallel.pipeline_stages={p.pipeline_stages}")
        _require(not p.overlap_allreduce, "train.compile_network",
                 "cannot be combined with parallel.overlap_allreduce (its buckets hook eager autograd)")
    _require(p.torch_threads == "auto" or p.torch_threads >= 1, "parallel.torch_threads",
             f"must be >= 1 or auto, got {p.torch_threads}")
    _require(p.collective_timeout_s >= 0 and math.isfinite(p.collective_timeout_s), "parallel.collective_timeout_s",
             f"must be >= 0 (0 disables the watchdog), got {p.collective_timeout_s}")
    _require(p.sync_check_interval >= 0, "parallel.sync_check_interval", f"must be >= 0, got {p.sync_check_interval}")
    _require(cfg.checkpoint.interval_steps >= 0, "checkpoint.interval_steps", "must be >= 0")
    _require(cfg.checkpoint.interval_minutes >= 0, "checkpoint.interval_minutes", "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    _require(cfg.eval.interval_steps >= 0, "eval.interval_steps", "must be >= 0")
    _require(cfg.eval.episodes >= 1, "eval.episodes", f"must be >= 1, got {cfg.eval.episodes}")
    if cfg.eval.stop_at is not None:
        _require(math.isfinite(cfg.eval.stop_at), "eval.stop_at", f"must be a finite return, got {cfg.eval.stop_at}")
        _require(cfg.eval.interval_steps > 0, "eval.stop_at",
                 "needs periodic evaluations: set eval.interval_steps > 0")
    _require(cfg.log.interval_steps >= 1, "log.interval_steps", f"must be >= 1, got {cfg.log.interval_steps}")
