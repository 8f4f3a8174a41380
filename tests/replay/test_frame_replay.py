"""Frame-deduplicated replay returns exactly what a naive buffer of stacked observations returns."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from mpidqn.replay.frames import FrameReplayShard, FrameRows, frame_rows_from_state, make_replay_shard
from mpidqn.io.h5tree import unflatten
from mpidqn.replay.shard import FIELDS, ReplayShard

FRAME = (6, 5)


class RandomFrames(gym.Env):
    """Random uint8 frames; episodes end (terminated or truncated) after 1..12 steps."""

    observation_space = gym.spaces.Box(0, 255, FRAME, np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = int(self.np_random.integers(1, 13))
        return self._frame(), {}

    def _frame(self):
        f = self.np_random.integers(0, 256, FRAME, dtype=np.uint8)
        if self.np_random.random() < 0.2:
            f[:] = 7  # repeated frames, as in static screens
        return f

    def step(self, action):
        self.left -= 1
        end = self.left == 0
        term = end and self.np_random.random() < 0.5
        return self._frame(), float(self.np_random.normal()), term, end and not term, {}


def make_envs(num_envs: int, stack: int) -> gym.vector.VectorEnv:
    def one():
        env = RandomFrames()
        return gym.wrappers.FrameStackObservation(env, stack) if stack > 1 else env
    return gym.vector.SyncVectorEnv([one] * num_envs, autoreset_mode=AutoresetMode.SAME_STEP)


def fill(shards, steps: int, num_envs: int, stack: int, seed: int = 0) -> None:
    envs = make_envs(num_envs, stack)
    obs, _ = envs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        actions = rng.integers(3, size=num_envs)
        nxt, r, term, trunc, info = envs.step(actions)
        done = term | trunc
        true_next = nxt.copy()
        for i in np.flatnonzero(done):
            true_next[i] = info["final_obs"][i]
        for s in shards:
            s.add(obs, actions, r, true_next, term, trunc)
        obs = nxt


def shards(capacity, num_envs, n_step, stack, frame_capacity=None):
    shape = (stack, *FRAME) if stack > 1 else FRAME
    naive = ReplayShard(capacity, shape, np.uint8, num_envs, n_step, 0.9)
    frames = FrameReplayShard(capacity, shape, np.uint8, num_envs, n_step, 0.9, stack, frame_capacity)
    return naive, frames


def assert_suffix(naive: ReplayShard, frames: FrameReplayShard) -> None:
    """The frame shard holds the newest rows of the naive one (all of them unless frames ran out)."""
    a, b = naive.transitions(), frames.transitions()
    n = len(frames)
    assert 0 < n <= len(naive)
    for k in FIELDS:
        np.testing.assert_array_equal(a[k][len(naive) - n:], b[k], err_msg=k)


@pytest.mark.parametrize("stack", [1, 4])
@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("num_envs", [1, 3])
def test_same_rows_and_samples_as_naive_with_wraparound(stack, n_step, num_envs):
    naive, frames = shards(60, num_envs, n_step, stack, frame_capacity=400)  # ample frames: no row dropped
    fill([naive, frames], 150, num_envs, stack)
    assert naive.num_added > 2 * naive.capacity  # the rings wrapped
    assert len(frames) == len(naive)
    assert_suffix(naive, frames)
    for seed in range(3):
        a = naive.sample_many(2, 16, np.random.default_rng(seed))
        b = frames.sample_many(2, 16, np.random.default_rng(seed))
        for k, x, y in zip(FIELDS, a, b):
            np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.mark.parametrize("n_step", [1, 3])
def test_tight_frame_ring_drops_only_rows_whose_frames_are_gone(n_step):
    naive, frames = shards(60, 2, n_step, 4)  # default frame capacity: short episodes use extra frames
    fill([naive, frames], 300, 2, 4)
    assert_suffix(naive, frames)
    b = frames.sample(64, np.random.default_rng(0))
    rows = frames.transitions()
    keys = {o.tobytes() + n.tobytes() for o, n in zip(rows["obs"], rows["next_obs"])}
    assert all(o.tobytes() + n.tobytes() in keys for o, n in zip(b.obs, b.next_obs))


def test_episode_start_repeats_its_first_frame():
    _, frames = shards(30, 1, 1, 4)
    f = [np.full(FRAME, v, np.uint8) for v in range(5)]
    stack = lambda *xs: np.stack([f[x] for x in xs])[None]  # noqa: E731
    frames.add(stack(0, 0, 0, 0), [0], [1.0], stack(0, 0, 0, 1), [False], [False])
    frames.add(stack(0, 0, 0, 1), [0], [1.0], stack(0, 0, 1, 2), [True], [False])
    frames.add(stack(3, 3, 3, 3), [0], [1.0], stack(3, 3, 3, 4), [False], [False])
    t = frames.transitions()
    np.testing.assert_array_equal(t["obs"][2], stack(3, 3, 3, 3)[0])
    np.testing.assert_array_equal(t["next_obs"][2], stack(3, 3, 3, 4)[0])
    assert frames.frame_capacity and frames._frames.written == 5  # 0, 1, 2, 3, 4: each frame once


def test_state_dict_round_trip_continues_exactly():
    naive, a = shards(50, 2, 3, 4)
    fill([a], 80, 2, 4, seed=1)
    b = FrameReplayShard(50, (4, *FRAME), np.uint8, 2, 3, 0.9, 4)
    b.load_state_dict({k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in a.state_dict().items()})
    fill([a, b], 40, 2, 4, seed=2)
    for k in FIELDS:
        np.testing.assert_array_equal(a.transitions()[k], b.transitions()[k])


def test_reshard_with_frame_rows_and_materialised_extend():
    _, a = shards(80, 2, 2, 4)
    fill([a], 70, 2, 4, seed=3)
    rows = np.arange(len(a))[::2]
    part = frame_rows_from_state(unflatten(a.state_dict()), rows)
    assert len(part.frames) < 2 * len(rows)  # frames, not stacks, travel
    both = FrameRows.concat([part, part]).take(np.arange(2 * len(rows)))
    b = FrameReplayShard(200, (4, *FRAME), np.uint8, 1, 1, 0.9, 4)
    b.extend(both)
    c = FrameReplayShard(200, (4, *FRAME), np.uint8, 1, 1, 0.9, 4)
    full = a.transitions()
    c.extend(full)
    assert c._frames.written < 1.5 * len(a)  # deduplicated again (not 8 frames per row)
    for k in FIELDS:
        np.testing.assert_array_equal(b.transitions()[k][: len(rows)], full[k][rows])
        np.testing.assert_array_equal(b.transitions()[k][len(rows):], full[k][rows])
        np.testing.assert_array_equal(c.transitions()[k], full[k])


def test_auto_storage_choice():
    assert isinstance(make_replay_shard("auto", 10, (4, 84, 84), np.uint8, 1, 1, 0.99, 4), FrameReplayShard)
    assert isinstance(make_replay_shard("auto", 10, (4,), np.float32, 1, 1, 0.99, 1), ReplayShard)
    with pytest.raises(ValueError, match="stack=4"):
        FrameReplayShard(10, (3, 84, 84), np.uint8, 1, 1, 0.99, 4)
