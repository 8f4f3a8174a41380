"""The large-batch contract: a batch scale K multiplies the global batch, divides the updates per env step
and keeps the replay ratio (transitions sampled per env step), at any K and any world size; the settings
counted in updates follow K so that they stay the same in env steps; what cannot hold is refused."""
from __future__ import annotations

import math

import pytest

from conftest import mpidqn
from mpidqn.algo.large_batch import (
    ADAM_BETAS,
    BatchPlan,
    compounded,
    compounded_decay,
    lr_factor,
    moment_decays,
    scaled_round,
    scaled_target_interval,
    warmup_factor,
)
from mpidqn.algo.dqn import update_rounds
from mpidqn.config import ConfigError, batch_plan, load_config, samples_per_rank
from mpidqn.io.runlog import read_log

# ------------------------------------------------------------------ the rules, as functions


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 16, 24])
@pytest.mark.parametrize("train_freq, gradient_steps", [(256, 128), (4, 1), (1, 1), (100, 6)])
def test_a_round_keeps_the_rows_per_env_step_at_every_k(k, train_freq, gradient_steps):
    freq, updates = scaled_round(train_freq, gradient_steps, k)
    assert updates * k * freq ** -1 == pytest.approx(gradient_steps / train_freq)  # rows per step x batch_size
    assert updates * k * train_freq == gradient_steps * freq  # exactly, in integers
    assert freq % train_freq == 0 and updates >= 1


def test_rounds_shrink_before_they_stretch():
    assert scaled_round(256, 128, 8) == (256, 16)  # K divides the round: same spacing, K times fewer updates
    assert scaled_round(256, 128, 3) == (768, 128)  # it does not: the round is stretched instead
    assert scaled_round(256, 128, 6) == (768, 64)
    assert scaled_round(4, 1, 4) == (16, 1)


def test_update_counted_settings_keep_their_meaning_in_env_steps():
    assert [scaled_target_interval(256, k) for k in (1, 2, 8, 3, 1000)] == [256, 128, 32, 85, 1]
    for tau in (0.005, 0.1, 1.0):  # one large update moves the target as far as K small ones
        assert 1 - compounded(tau, 4) == pytest.approx((1 - tau) ** 4)
        assert compounded(tau, 1) == pytest.approx(tau)
    assert compounded(1.0, 8) == 1.0
    assert compounded_decay(0.99, 8) == pytest.approx(0.99 ** 8) and compounded_decay(0.0, 8) == 0.0


def test_lr_rules_and_warm_up():
    assert [lr_factor(r, 4) for r in ("none", "linear", "sqrt")] == [1.0, 4.0, 2.0]
    assert lr_factor("sqrt", 1) == lr_factor("linear", 1) == 1.0
    assert warmup_factor(5000, 1000, 0) == 1.0
    assert [warmup_factor(s, 1000, 2000) for s in (500, 1000, 2000, 3000, 9000)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_moment_scaling_spans_the_same_env_steps_over_k_times_fewer_updates():
    assert moment_decays("none", (0.9, 0.999, 0.95), 8) == (0.9, 0.999, 0.95)
    assert moment_decays("compound", (0.9, 0.999, 0.95), 1) == (0.9, 0.999, 0.95)
    beta1, beta2, alpha = moment_decays("compound", (0.9, 0.999, 0.95), 8)
    assert (beta1, beta2, alpha) == pytest.approx((0.9 ** 8, 0.999 ** 8, 0.95 ** 8))
    import inspect

    import torch
    assert ADAM_BETAS == inspect.signature(torch.optim.Adam).parameters["betas"].default  # K = 1 is torch's Adam


def test_the_optimizer_steps_with_the_plans_decays_also_after_a_resume_at_another_k():
    """The learner's Adam (or RMSprop) takes the plan's betas (alpha); a checkpoint written at another
    batch scale (batch_scope per_rank on another world size) loads its moments but keeps this run's decays."""
    import torch
    from mpi4py import MPI

    from mpidqn.learners.data_parallel import Hyper, Learner

    for optimizer, key in (("adam", "betas"), ("rmsprop", "alpha")):
        learners = {}
        for k in (1, 4):
            cfg = load_config(None, [f"train.batch_scale={k}", "train.moment_scaling=compound",
                                     f"train.optimizer={optimizer}"])
            hyper = Hyper.from_config(cfg.train, 0, 1e-3, batch_plan(cfg.train, 1))
            torch.manual_seed(0)
            learners[k] = Learner(torch.nn.Sequential(torch.nn.Linear(3, 2)), hyper, MPI.COMM_SELF)
        expected = {"betas": (0.9 ** 4, 0.999 ** 4), "alpha": 0.95 ** 4}[key]
        group = learners[4].optimizer.param_groups[0]
        assert group[key] == pytest.approx(expected)
        for p in learners[1].params:
            p.grad.fill_(0.5)
        learners[1].optimizer.step()  # moments to carry over
        learners[4].load_state_dict(learners[1].state_dict())
        group = learners[4].optimizer.param_groups[0]
        assert group[key] == pytest.approx(expected)
        assert learners[4].optimizer.state_dict()["state"], "the moments were not loaded"


def test_k_1_is_the_config_itself():
    cfg = load_config(None, [])
    t = cfg.train
    plan = batch_plan(t, 4)  # K = 1 whatever the world size in the default global scope
    assert plan == BatchPlan(1, t.batch_size, t.train_freq, t.gradient_steps, t.target_update_interval, t.tau,
                             t.ema_decay, 1.0)


def test_per_rank_scope_is_the_large_batch_mode_at_k_equal_to_the_world():
    per_rank = load_config(None, ["train.batch_scope=per_rank", "train.lr_scaling=sqrt", "train.tau=0.01"])
    fixed = load_config(None, ["train.batch_scale=4", "train.lr_scaling=sqrt", "train.tau=0.01"])
    assert batch_plan(per_rank.train, 4) == batch_plan(fixed.train, 2) == batch_plan(fixed.train, 4)
    plan = batch_plan(fixed.train, 4)
    assert plan.k == 4 and plan.global_batch == 256 and plan.lr_factor == 2.0 and plan.gradient_steps == 32
    assert [samples_per_rank(fixed.train, w) for w in (1, 2, 4)] == [256, 128, 64]
    assert samples_per_rank(per_rank.train, 4) == 64
    assert plan.samples_per_env_step == batch_plan(load_config(None, []).train, 1).samples_per_env_step


@pytest.mark.parametrize("overrides, line", [
    (["train.batch_scale=0"], "train.batch_scale: must be >= 1, got 0"),
    (["train.batch_scale=2", "train.batch_scope=per_rank"],
     "train.batch_scale: is 2 but train.batch_scope=per_rank sets the batch scale to the world size; use one of them"),
    (["train.batch_scale=16", "train.buffer_size=1000"],
     "train.batch_scale: a global batch of 16 x 64 = 1024 transitions is larger than train.buffer_size=1000"),
    (["train.lr_warmup_steps=-1"], "train.lr_warmup_steps: must be >= 0, got -1"),
])
def test_what_cannot_hold_is_refused_in_one_line(overrides, line):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == line


# ------------------------------------------------------------------ the real command: log.h5 keeps the contract

RATIO = ["train.total_steps=600", "train.learning_starts=100", "train.train_freq=4", "train.gradient_steps=4",
         "train.batch_size=12", "train.buffer_size=2000", "network.hidden=[16]", "eval.interval_steps=0",
         "eval.episodes=1", "log.interval_steps=300", "log.progress=none", "checkpoint.interval_steps=0"]


def _logged(tmp_path, n: int, extra: list[str]) -> tuple[float, float, float]:
    """(samples, updates, env steps) of the last log row of a run at ``n`` ranks."""
    run_dir = tmp_path / f"w{n}-{'-'.join(extra)}"
    p = mpidqn(n, ["--run-dir", str(run_dir), *RATIO, *extra], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    last = read_log(run_dir / "log.h5").tables["scalars"][-1]
    return float(last["samples"]), float(last["updates"]), float(last["step"])


def test_the_replay_ratio_in_the_log_is_equal_at_every_k_and_every_world_size(tmp_path):
    rounds = sum(update_rounds(s - 1, s, 4, 100) for s in range(1, 601))
    samples_k1 = rounds * 4 * 12  # K = 1: 4 updates of 12 rows every 4 steps from step 100 on
    runs = {("K", k): _logged(tmp_path, 1, [f"train.batch_scale={k}", f"env.num_envs={k}"]) for k in (1, 2, 4)}
    runs.update({("ranks", n): _logged(tmp_path, n, ["train.batch_scale=2"]) for n in (2, 3)})
    runs[("per_rank", 3)] = _logged(tmp_path, 3, ["train.batch_scope=per_rank"])  # K = 3 stretches the round
    for key, (samples, updates, step) in runs.items():
        assert step == 600 and samples == samples_k1, (key, runs)
    assert [runs[("K", k)][1] for k in (1, 2, 4)] == [rounds * 4, rounds * 2, rounds]  # updates fall by K
    assert runs[("ranks", 2)][1] == runs[("ranks", 3)][1] == runs[("K", 2)][1]  # K, not the world, sets them
    assert math.isclose(runs[("per_rank", 3)][1] * 36, samples_k1)
