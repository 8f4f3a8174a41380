"""Atari and MinAtar: env presets, CNNs, tiny runs (reducers and devices: tests/learners/test_reducers.py)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, mpidqn, run
from mpidqn.nn.cnn import Scale, minatar_cnn_layers, nature_cnn_layers
from mpidqn.nn.registry import build_network
from mpidqn.config import load_config
from mpidqn.envs.presets import infer_preset, spec_from_config
from mpidqn.envs.vector import make_env, make_vector_env

pytest.importorskip("ale_py")
pytest.importorskip("minatar")


@pytest.mark.parametrize("env_id, shape, n", [("ALE/Pong-v5", (4, 84, 84), 6), ("MinAtar/Breakout-v1", (4, 10, 10), 3)])
def test_env_presets_build_and_step(env_id, shape, n):
    spec = spec_from_config(load_config(None, [f"env.id={env_id}"]).env)
    envs = make_vector_env(spec, 2)
    try:
        obs, _ = envs.reset(seed=[1, 2])
        assert obs.shape == (2, *shape) and obs.dtype == np.uint8
        assert envs.single_action_space.n == n
        obs, r, term, trunc, _ = envs.step(envs.action_space.sample())
        assert obs.shape == (2, *shape) and obs.dtype == np.uint8
    finally:
        envs.close()
    if env_id.startswith("ALE/"):
        first, _ = make_env(spec).reset(seed=0)
        assert all(np.array_equal(first[0], first[j]) for j in range(4))  # reset padding repeats frame 0


def test_preset_inference_and_eval_spec():
    assert infer_preset("ALE/Breakout-v5") == "atari"
    assert infer_preset("MinAtar/Asterix-v1") == "minatar"
    assert infer_preset("CartPole-v1") == "none"
    cfg = load_config(None, ["env.id=ALE/Pong-v5", "env.terminal_on_life_loss=true"]).env
    train, ev = spec_from_config(cfg), spec_from_config(cfg, evaluation=True)
    assert train.clip_rewards and train.terminal_on_life_loss and train.frame_stack == 4
    assert not ev.clip_rewards and not ev.terminal_on_life_loss


def test_cnns_take_uint8_and_are_layer_lists():
    atari = nature_cnn_layers((4, 84, 84), 6, dueling=True)
    assert isinstance(atari[0], Scale) and atari[0].factor == pytest.approx(1 / 255)
    q = torch.nn.Sequential(*atari)(torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8))
    assert q.shape == (2, 6)
    minatar = torch.nn.Sequential(*minatar_cnn_layers((4, 10, 10), 3))
    assert minatar(torch.zeros(3, 4, 10, 10, dtype=torch.uint8)).shape == (3, 3)
    cfg = load_config(None, ["network.kind=nature_cnn"]).network
    with pytest.raises(ValueError, match="nature_cnn"):
        build_network((4,), 2, cfg)


TINY_PONG = ["train.total_steps=400", "train.learning_starts=200", "train.buffer_size=2000", "train.batch_size=8",
             "train.gradient_steps=1", "eval.episodes=1", "eval.interval_steps=0", "env.max_episode_steps=50",
             "checkpoint.interval_steps=0", "log.interval_steps=200", "parallel.overlap_allreduce=true",
             "train.compile_network=false"]  # overlap hooks eager autograd


@pytest.mark.mpi
def test_tiny_pong_run_at_two_ranks_and_evaluate(tmp_path):
    run_dir = tmp_path / "pong"
    p = mpidqn(2, ["--config", str(ROOT / "configs" / "pong.yaml"), "--run-dir", str(run_dir), *TINY_PONG], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    e = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "1", "--json"], timeout=120)
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout.strip().splitlines()[-1])
    assert result["episodes"] == 1 and result["lengths"] == [50]


@pytest.mark.mpi
def test_tiny_minatar_run_resumes_elastically(tmp_path):
    run_dir = tmp_path / "minatar"
    head = ["--config", str(ROOT / "configs" / "minatar-breakout.yaml"), "--run-dir", str(run_dir)]
    args = ["train.learning_starts=100", "train.buffer_size=1000", "eval.episodes=1", "eval.interval_steps=0",
            "env.max_episode_steps=30", "log.interval_steps=100", "checkpoint.interval_steps=200"]
    p = mpidqn(2, [*head, *args, "train.total_steps=200"], timeout=300)  # includes torch.compile
    assert p.returncode == 0, p.stdout + p.stderr
    _check_moved_frame_rows(run_dir)
    p = mpidqn(1, [*head, "--resume", *args, "train.total_steps=300"], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "elastic" in p.stdout + p.stderr


def _check_moved_frame_rows(run_dir) -> None:
    """Issue #35, through the trainer's own elastic load (2 -> 1 rank, frame replay): the first sampled
    batch holds rows of the old shards, and while a table length of new steps arrives every moved row
    still stored gathers the stacks it held right after the load (a moved row is known by its frame
    index, older than every frame written after the load)."""
    from collections import Counter

    from mpi4py import MPI

    from mpidqn.config import config_from_yaml_text
    from mpidqn.distributed.topology import Topology
    from mpidqn.io.h5tree import flatten
    from mpidqn.replay.frames import FrameReplayShard
    from mpidqn.replay.shard import FIELDS, ReplayShard
    from mpidqn.train.checkpoints import find_latest, read_rank
    from mpidqn.train.loop import Trainer
    from mpidqn.train.reporting import SilentReporter

    cfg = config_from_yaml_text((run_dir / "config.yaml").read_text())
    ckpt = find_latest(run_dir / "checkpoints")
    trainer = Trainer(cfg, Topology.build(MPI.COMM_SELF), SilentReporter())
    try:
        assert trainer.load_checkpoint(ckpt) == "elastic"
        replay, t = trainer.replay, cfg.train
        assert isinstance(replay, FrameReplayShard)

        def keys(rows: dict) -> Counter:
            return Counter(b"".join(np.asarray(rows[k][i]).tobytes() for k in FIELDS) for i in range(len(rows["actions"])))

        old = Counter()
        for r in range(ckpt.world):
            shard = FrameReplayShard(ReplayShard.shard_capacity(t.buffer_size, ckpt.world, r), trainer.obs_shape,
                                     np.uint8, cfg.env.num_envs, t.n_step, t.gamma, cfg.env.frame_stack)
            shard.load_state_dict(flatten(read_rank(ckpt, r, ("replay",))["replay"]))
            old += keys(shard.transitions())
        batch = replay.sample(64, np.random.default_rng(0))
        assert set(keys(dict(zip(FIELDS, batch)))) <= set(old)
        moved = replay.transitions()
        assert keys(moved) == old  # every stored row moved, once
        written = int(replay.state_dict()["frames/written"])
        held = {int(i): (moved["obs"][j], moved["next_obs"][j])
                for j, i in enumerate(replay.state_dict()["ring/obs_idx"][replay.oldest_first()])}
        left = []
        for step in range(replay.capacity + 20):
            trainer.env_step()
            if step % 25 == 0 or step >= replay.capacity:
                now = replay.transitions()
                idx = replay.state_dict()["ring/obs_idx"][replay.oldest_first()]
                for j in np.flatnonzero(idx < written):
                    obs, nxt = held[int(idx[j])]
                    assert np.array_equal(now["obs"][j], obs) and np.array_equal(now["next_obs"][j], nxt), step
                left.append(int((idx < written).sum()))
        assert left[0] > 0 and left[-1] == 0 and len(set(left)) > 5, left
    finally:
        trainer.envs.close()
