"""The EnvPool backend (env.backend: envpool): refused outside Atari; with envpool installed, the same
frames, rewards and ends as the gymnasium preset, the trainer's autoreset contract, and a real run."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ROOT, mpidqn, run

from mpidqn.config import ConfigError, load_config
from mpidqn.envs.presets import EnvSpec
from mpidqn.envs.vector import make_vector_env, pickle_envs

NOT_INSTALLED = 'envpool is not installed (pip install -e ".[envpool]")'


def need_envpool() -> None:
    pytest.importorskip("envpool", reason=NOT_INSTALLED)
    pytest.importorskip("ale_py")  # evaluation and the comparisons play gymnasium's ALE


@pytest.mark.parametrize("overrides", [
    ["env.backend=envpool"],  # CartPole-v1
    ["env.id=MinAtar/Breakout-v1", "env.backend=envpool"],
    ["env.id=ALE/Pong-v5", "env.preset=none", "env.backend=envpool"],
])
def test_envpool_backend_is_refused_outside_atari(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert message.startswith("env.backend: envpool serves Atari only") and "\n" not in message


def test_envpool_backend_refuses_async_envs_and_unknown_backends():
    with pytest.raises(ConfigError, match=r"^env.async_envs: does not apply to env.backend=envpool"):
        load_config(None, ["env.id=ALE/Pong-v5", "env.backend=envpool", "env.async_envs=true"])
    with pytest.raises(ConfigError, match="env.backend"):
        load_config(None, ["env.backend=dm_env"])
    assert load_config(None, ["env.id=ALE/Pong-v5", "env.backend=envpool"]).env.backend == "envpool"


def _stacks_repeat_first_frame(obs: np.ndarray) -> bool:
    return all(np.array_equal(o[0], o[j]) for o in obs for j in range(1, len(o)))


@pytest.mark.parametrize("game, life_loss", [("Breakout", True), ("Pong", False)])
def test_envpool_plays_the_gymnasium_presets_frames(game, life_loss):
    """Without sticky actions and with one reset no-op both backends are deterministic: the same actions
    give the same observations (autoreset ones included), rewards and ends. Only the final frame of a
    life lost differs (gymnasium stops the frame skip on the frame of the loss, EnvPool does not)."""
    need_envpool()
    spec = EnvSpec(f"ALE/{game}-v5", "atari", max_episode_steps=60, frame_stack=4, clip_rewards=True,
                   sticky_actions=0.0, noop_max=1, terminal_on_life_loss=life_loss)
    gym_envs, pool = make_vector_env(spec, 2), make_vector_env(spec, 2, backend="envpool")
    try:
        assert pool.single_observation_space == gym_envs.single_observation_space
        assert pool.single_action_space == gym_envs.single_action_space
        a, _ = gym_envs.reset(seed=[0, 1])
        b, _ = pool.reset(seed=[0, 1])
        assert np.array_equal(a, b)
        rng, ends, lives_lost = np.random.default_rng(3), 0, 0
        for _ in range(150):
            actions = rng.integers(0, pool.single_action_space.n, 2)
            a, ra, ta, ua, ia = gym_envs.step(actions)
            b, rb, tb, ub, ib = pool.step(actions)
            assert np.array_equal(a, b) and np.array_equal(ra, rb)
            assert np.array_equal(ta, tb) and np.array_equal(ua, ub)
            for i in np.flatnonzero(ta | ua):
                ends += 1
                if ua[i] and not ta[i]:
                    assert np.array_equal(ia["final_obs"][i], ib["final_obs"][i])
                else:
                    lives_lost += 1
                assert _stacks_repeat_first_frame(b[i:i + 1])  # the autoreset obs starts a new game
        assert ends >= 2 and (lives_lost >= 1) == life_loss
    finally:
        gym_envs.close()
        pool.close()


def test_envpool_vector_env_contract():
    need_envpool()
    spec = EnvSpec("ALE/Pong-v5", "atari", max_episode_steps=5, frame_stack=4, clip_rewards=True)
    pool = make_vector_env(spec, 3, backend="envpool")
    try:
        first, _ = pool.reset(seed=[7, 8, 9])
        assert first.shape == (3, 4, 84, 84) and first.dtype == np.uint8 and _stacks_repeat_first_frame(first)
        trace = [pool.step(np.full(3, 2))[:4] for _ in range(4)]
        obs, rewards, terminated, truncated, info = pool.step(np.full(3, 2))
        assert truncated.all() and not terminated.any() and rewards.dtype == np.float64
        assert info["_final_obs"].all() and info["final_obs"].shape == obs.shape
        assert np.array_equal(info["final_obs"][:, :3], trace[-1][0][:, 1:])  # the stack went on to the end
        assert _stacks_repeat_first_frame(obs)  # same-step autoreset: the next episode's first obs
        assert pickle_envs(pool) == b""  # like async envs: a resume starts new episodes
        again, _ = pool.reset(seed=[7, 8, 9])
        assert np.array_equal(again, first)
        assert all(np.array_equal(pool.step(np.full(3, 2))[0], t[0]) for t in trace)  # seeded: reproducible
    finally:
        pool.close()
    flat = make_vector_env(EnvSpec("ALE/Pong-v5", "atari", frame_stack=1), 2, backend="envpool")
    try:
        assert flat.single_observation_space.shape == (84, 84) and flat.reset(seed=0)[0].shape == (2, 84, 84)
    finally:
        flat.close()


@pytest.mark.mpi
def test_tiny_pong_run_with_envpool_checkpoints_resumes_and_evaluates(tmp_path):
    need_envpool()
    run_dir = tmp_path / "pong"
    head = ["--config", str(ROOT / "configs" / "pong.yaml"), "--run-dir", str(run_dir)]
    args = ["env.backend=envpool", "env.num_envs=2", "train.learning_starts=200", "train.buffer_size=2000", "train.batch_size=8",
            "eval.episodes=1", "eval.interval_steps=0", "env.max_episode_steps=50", "checkpoint.interval_steps=200",
            "log.interval_steps=200"]
    p = mpidqn(1, [*head, *args, "train.total_steps=400"], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    p = mpidqn(1, [*head, "--resume", *args, "train.total_steps=600"], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed (exact)" in p.stdout + p.stderr
    e = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "1", "--json"], timeout=120)
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout.strip().splitlines()[-1])
    assert result["step"] == 600 and result["episodes"] == 1 and result["lengths"] == [50]
