"""Replay shard: ring, n-step returns, sampling, state round trips, re-sharding. No MPI."""
from __future__ import annotations

import numpy as np
import pytest

from mpidqn.replay.shard import (
    Batch,
    NStepAccumulator,
    ReplayShard,
    partition_plan,
    partition_transitions,
)

FALSE2 = np.zeros(2, bool)


def step(shard: ReplayShard, t: int, *, term: tuple[bool, ...] | None = None,
         trunc: tuple[bool, ...] | None = None) -> int:
    """Add step t for every env; env e observes 100*e + t and gets reward t + e/10."""
    e = np.arange(shard.num_envs)
    obs = (100 * e + t).astype(np.float32)[:, None]
    off = np.zeros(shard.num_envs, bool)
    terminated = off if term is None else np.array(term)
    truncated = off if trunc is None else np.array(trunc)
    return shard.add(obs, 10 * e + t, t + e / 10, obs + 0.5, terminated, truncated)


def single_env_episode(n: int, gamma: float, rewards: list[float], *, terminated: bool,
                       ) -> dict[str, np.ndarray]:
    """Run one env through an episode ending at the last step; return everything emitted."""
    acc = NStepAccumulator(1, n, gamma, (1,), np.float32)
    out = []
    for t, r in enumerate(rewards):
        last = t == len(rewards) - 1
        out.append(acc.push(np.array([[t]], np.float32), np.array([t]), np.array([r]),
                            np.array([[t + 1]], np.float32), np.array([last and terminated]),
                            np.array([last and not terminated])))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def test_ring_wraps_and_keeps_newest_oldest_first() -> None:
    shard = ReplayShard(5, (1,), np.float32, num_envs=2)
    written = sum(step(shard, t) for t in range(6))  # 12 transitions
    assert written == 12 and shard.num_added == 12
    assert len(shard) == 5 and shard.capacity == 5
    # rows arrive env 0 then env 1 at each step: 0, 100, 1, 101, ..., 5, 105
    np.testing.assert_array_equal(shard.transitions()["obs"][:, 0], [103, 4, 104, 5, 105])


def test_ring_transitions_are_exactly_the_newest() -> None:
    shard = ReplayShard(5, (1,), np.float32, num_envs=2)
    for t in range(6):
        step(shard, t)
    all_rows = [100 * e + t for t in range(6) for e in range(2)]
    tr = shard.transitions()
    np.testing.assert_array_equal(tr["obs"][:, 0], all_rows[-5:])
    np.testing.assert_array_equal(tr["next_obs"][:, 0], np.array(all_rows[-5:]) + 0.5)
    np.testing.assert_array_equal(tr["actions"], [10 * (o // 100) + o % 100 for o in all_rows[-5:]])


def test_nstep_returns_by_hand_terminated_early() -> None:
    g = 0.9
    out = single_env_episode(3, g, [1.0, 2.0], terminated=True)
    np.testing.assert_array_equal(out["obs"][:, 0], [0, 1])
    np.testing.assert_allclose(out["rewards"], [1 + g * 2, 2], rtol=1e-6)
    np.testing.assert_array_equal(out["discounts"], [0, 0])
    np.testing.assert_array_equal(out["next_obs"][:, 0], [2, 2])


def test_nstep_returns_by_hand_truncated_early_bootstraps() -> None:
    g = 0.9
    out = single_env_episode(3, g, [1.0, 2.0], terminated=False)
    np.testing.assert_allclose(out["rewards"], [1 + g * 2, 2], rtol=1e-6)
    np.testing.assert_allclose(out["discounts"], [g ** 2, g], rtol=1e-6)
    np.testing.assert_array_equal(out["next_obs"][:, 0], [2, 2])  # the true final observation


def test_nstep_returns_by_hand_long_episode() -> None:
    g = 0.9
    r = [1.0, 2.0, 3.0, 4.0, 5.0]
    out = single_env_episode(3, g, r, terminated=True)
    np.testing.assert_array_equal(out["obs"][:, 0], [0, 1, 2, 3, 4])
    expected = [1 + g * 2 + g * g * 3, 2 + g * 3 + g * g * 4, 3 + g * 4 + g * g * 5, 4 + g * 5, 5]
    np.testing.assert_allclose(out["rewards"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["discounts"], [g ** 3, g ** 3, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(out["next_obs"][:, 0], [3, 4, 5, 5, 5])
    np.testing.assert_array_equal(out["actions"], [0, 1, 2, 3, 4])


def test_nstep_full_horizon_at_episode_end() -> None:
    g = 0.5
    term = single_env_episode(2, g, [1.0, 1.0, 1.0], terminated=True)
    trunc = single_env_episode(2, g, [1.0, 1.0, 1.0], terminated=False)
    np.testing.assert_allclose(term["rewards"], [1.5, 1.5, 1.0])
    np.testing.assert_allclose(term["discounts"], [0.25, 0.0, 0.0])
    np.testing.assert_allclose(trunc["discounts"], [0.25, 0.25, 0.5])


def test_nstep_envs_interleave_independently() -> None:
    g = 0.9
    shard = ReplayShard(100, (1,), np.float32, num_envs=2, n_step=3, gamma=g)
    assert step(shard, 0) == 0
    assert step(shard, 1) == 0
    # env 1 terminates at t=2 (flushes 3 rows); env 0 emits its first full 3-step row
    assert step(shard, 2, term=(False, True)) == 4
    assert step(shard, 3) == 1  # env 0 full again; env 1 restarted, pending 1
    tr = shard.transitions()
    np.testing.assert_array_equal(tr["obs"][:, 0], [0, 100, 101, 102, 1])
    r1 = [0.1, 1.1, 2.1]
    np.testing.assert_allclose(tr["rewards"], [
        0 + g * 1 + g * g * 2,
        r1[0] + g * r1[1] + g * g * r1[2], r1[1] + g * r1[2], r1[2],
        1 + g * 2 + g * g * 3], rtol=1e-6)
    np.testing.assert_allclose(tr["discounts"], [g ** 3, 0, 0, 0, g ** 3], rtol=1e-6)
    np.testing.assert_array_equal(tr["next_obs"][:, 0], [2.5, 102.5, 102.5, 102.5, 3.5])
    np.testing.assert_array_equal(tr["actions"], [0, 10, 11, 12, 1])


def naive_nstep(n: int, gamma: float, steps: list[tuple]) -> list[tuple]:
    """Reference n-step bookkeeping: one deque per env, rows as (obs, action, return, next, discount)."""
    queues: dict[int, list] = {}
    rows = []
    for obs, actions, rewards, next_obs, term, trunc in steps:
        for e in range(len(actions)):
            q = queues.setdefault(e, [])
            q.append((obs[e, 0], actions[e], rewards[e]))
            due = q[:] if (term[e] or trunc[e]) else (q[:1] if len(q) == n else [])
            for k, (o, a, _) in enumerate(due):
                rest = q[k:]
                ret = sum(gamma ** i * r for i, (_, _, r) in enumerate(rest))
                disc = 0.0 if term[e] else gamma ** len(rest)
                rows.append((e, o, a, ret, next_obs[e, 0], disc))
            if term[e] or trunc[e]:
                q.clear()
            elif len(q) == n:
                q.pop(0)
    return rows


@pytest.mark.parametrize("n_step", [1, 2, 3, 5])
def test_nstep_matches_naive_reference_on_random_episodes(n_step: int) -> None:
    """Every emitted row (per env, in order) equals a deque-per-env reference, with episodes of 3 envs
    ending at random steps by termination or truncation (the fast path for steps where none ends and
    the general path both run)."""
    rng = np.random.default_rng(n_step)
    envs, gamma = 3, 0.9
    acc = NStepAccumulator(envs, n_step, gamma, (1,), np.float32)
    steps, got = [], []
    for t in range(300):
        obs = (1000 * np.arange(envs) + t).astype(np.float32)[:, None]
        end = rng.random(envs) < 0.08
        term, trunc = end & (rng.random(envs) < 0.5), end & ~(rng.random(envs) < 0.5)
        step_ = (obs, rng.integers(0, 4, envs), rng.normal(size=envs), obs + 0.5, term, trunc)
        steps.append(step_)
        out = acc.push(*step_)
        got += [(int(o // 1000), o, a, r, nx, d) for o, a, r, nx, d in zip(
            out["obs"][:, 0], out["actions"], out["rewards"], out["next_obs"][:, 0], out["discounts"])]
    want = naive_nstep(n_step, gamma, steps)
    by_env = sorted(got, key=lambda row: row[0])  # a stable sort: rows of one env keep their order
    assert by_env and len(got) == len(want)
    for g_row, w_row in zip(by_env, sorted(want, key=lambda row: row[0])):
        assert g_row[:3] == w_row[:3] and g_row[4] == w_row[4]
        np.testing.assert_allclose(g_row[3], w_row[3], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_row[5], w_row[5], rtol=1e-6)


def test_n1_equals_raw_transition() -> None:
    shard = ReplayShard(10, (3,), np.float32, num_envs=2, n_step=1, gamma=0.97)
    obs = np.arange(6, dtype=np.float32).reshape(2, 3)
    nxt = obs + 10
    assert shard.add(obs, np.array([1, 0]), np.array([0.5, -1.0]), nxt,
                     np.array([True, False]), np.array([False, True])) == 2
    tr = shard.transitions()
    np.testing.assert_array_equal(tr["obs"], obs)
    np.testing.assert_array_equal(tr["next_obs"], nxt)
    np.testing.assert_array_equal(tr["actions"], [1, 0])
    np.testing.assert_array_equal(tr["rewards"], np.float32([0.5, -1.0]))
    np.testing.assert_array_equal(tr["discounts"], np.float32([0.0, 0.97]))  # truncated bootstraps
    assert tr["actions"].dtype == np.int64 and tr["rewards"].dtype == np.float32


def test_sample_shapes_dtypes_and_uniform_support() -> None:
    shard = ReplayShard(8, (2, 2), np.uint8, num_envs=1)
    for t in range(8):
        o = np.full((1, 2, 2), t, np.uint8)
        shard.add(o, np.array([t]), np.array([t]), o + 1, FALSE2[:1], FALSE2[:1])
    batch = shard.sample(4000, np.random.default_rng(0))
    assert isinstance(batch, Batch)
    assert batch.obs.shape == (4000, 2, 2) and batch.obs.dtype == np.uint8
    assert batch.actions.dtype == np.int64 and batch.discounts.dtype == np.float32
    np.testing.assert_array_equal(batch.obs[:, 0, 0], batch.actions)  # rows stay aligned
    np.testing.assert_array_equal(batch.next_obs[:, 0, 0], batch.actions + 1)
    counts = np.bincount(batch.actions, minlength=8)
    assert counts.min() > 350  # every slot drawn, ~500 each


def test_sample_out_buffers_and_sample_many() -> None:
    shard = ReplayShard(16, (1,), np.float32, num_envs=2)
    for t in range(5):
        step(shard, t)
    out = shard.empty_batch(6)
    got = shard.sample(6, np.random.default_rng(1), out=out)
    assert got.obs is out.obs
    ref = shard.sample(6, np.random.default_rng(1))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    many = shard.sample_many(128, 4, np.random.default_rng(2))
    assert many.obs.shape == (512, 1) and many.rewards.shape == (512,)


def test_sample_empty_and_bad_sizes_rejected() -> None:
    shard = ReplayShard(4, (1,), np.float32, num_envs=1)
    with pytest.raises(ValueError, match="empty"):
        shard.sample(2, np.random.default_rng(0))
    step(shard, 0)
    with pytest.raises(ValueError, match="0"):
        shard.sample(0, np.random.default_rng(0))


def _filled_shard(capacity: int, steps: int, n_step: int = 3) -> ReplayShard:
    shard = ReplayShard(capacity, (1,), np.float32, num_envs=2, n_step=n_step, gamma=0.9)
    for t in range(steps):
        step(shard, t, term=(t % 7 == 6, False), trunc=(False, t % 5 == 4))
    return shard


def _assert_same_transitions(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _assert_same_samples(a: ReplayShard, b: ReplayShard, seed: int) -> None:
    batches = a.sample(32, np.random.default_rng(seed)), b.sample(32, np.random.default_rng(seed))
    for x, y in zip(*batches):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("steps", [3, 20])  # partly filled, and wrapped
def test_state_dict_round_trip_continues_exactly(steps: int) -> None:
    src = _filled_shard(capacity=16, steps=steps)
    d = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in src.state_dict().items()}
    assert all(isinstance(k, str) and not k.startswith("/") for k in d)
    assert all(isinstance(v, (np.ndarray, int)) for v in d.values())
    dst = ReplayShard(16, (1,), np.float32, num_envs=2, n_step=3, gamma=0.9)
    dst.load_state_dict(d)
    assert len(dst) == len(src) and dst.num_added == src.num_added
    _assert_same_samples(src, dst, seed=5)
    for t in range(steps, steps + 9):  # pending n-step queues continue too
        kw = dict(term=(t % 7 == 6, False), trunc=(False, t % 5 == 4))
        assert step(src, t, **kw) == step(dst, t, **kw)
    _assert_same_transitions(src.transitions(), dst.transitions())
    _assert_same_samples(src, dst, seed=6)


def test_load_state_dict_rejects_other_capacity() -> None:
    d = _filled_shard(capacity=16, steps=5).state_dict()
    with pytest.raises(ValueError, match="capacity"):
        ReplayShard(8, (1,), np.float32, num_envs=2, n_step=3, gamma=0.9).load_state_dict(d)


def test_extend_transitions_round_trip_and_overflow() -> None:
    src = _filled_shard(capacity=10, steps=12)
    tr = src.transitions()
    big = ReplayShard(10, (1,), np.float32, num_envs=2)
    big.extend(tr)
    _assert_same_transitions(big.transitions(), tr)
    small = ReplayShard(4, (1,), np.float32, num_envs=2)
    small.extend({k: v[:1] for k, v in tr.items()})
    small.extend(tr)  # more than capacity: the newest 4 kept
    _assert_same_transitions(small.transitions(), {k: v[-4:] for k, v in tr.items()})
    assert small.num_added == len(tr["actions"]) + 1


def _unique_shards(lengths: list[int]) -> list[dict[str, np.ndarray]]:
    """Old shards whose every transition has a unique obs: 1000*rank + row."""
    out = []
    for rank, n in enumerate(lengths):
        shard = ReplayShard(max(n, 1), (1,), np.float32, num_envs=1)
        obs = (1000 * rank + np.arange(n, dtype=np.float32))[:, None]
        shard.extend({"obs": obs, "actions": np.arange(n), "rewards": np.ones(n, np.float32),
                      "next_obs": obs + 0.5, "discounts": np.ones(n, np.float32)})
        out.append(shard.transitions())
    return out


@pytest.mark.parametrize("lengths,new_world,block", [
    ([7, 7, 6, 6], 2, 4096), ([11, 10], 4, 4096), ([5, 4, 4], 1, 4096), ([3, 0, 2, 2], 3, 4096),
    ([7, 7, 6, 6], 2, 3), ([11, 10], 4, 1), ([50, 50, 49], 2, 7), ([3, 0, 2, 2], 3, 2)])
def test_partition_transitions_loses_and_duplicates_nothing(lengths: list[int], new_world: int,
                                                            block: int) -> None:
    old = _unique_shards(lengths)
    new = partition_transitions(old, new_world, block=block)
    assert len(new) == new_world
    got = np.concatenate([p["obs"][:, 0] for p in new])
    want = np.concatenate([o["obs"][:, 0] for o in old])
    assert len(got) == len(want) == len(set(got.tolist()))
    assert sorted(got.tolist()) == sorted(want.tolist())
    for part in new:  # rows stay whole; each new shard oldest first within each old shard
        np.testing.assert_array_equal(part["next_obs"], part["obs"] + 0.5)
        for rank in range(len(lengths)):
            rows = part["obs"][:, 0][part["obs"][:, 0] // 1000 == rank]
            assert np.all(np.diff(rows) > 0)
    sizes = [len(p["actions"]) for p in new]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1  # shard_capacity's split


def test_partition_mixes_ages_newest_aligned() -> None:
    old = _unique_shards([4, 3])
    merged = partition_transitions(old, 1)[0]["obs"][:, 0]
    # newest rows aligned: rank 0's extra row is the oldest overall
    np.testing.assert_array_equal(merged, [0, 1, 1000, 2, 1001, 3, 1002])
    # one block each (the default block is larger than the buffer): the first 4 merged rows, the rest
    halves = partition_transitions(old, 2)
    np.testing.assert_array_equal(halves[0]["obs"][:, 0], [0, 1, 1000, 2])
    np.testing.assert_array_equal(halves[1]["obs"][:, 0], [1001, 3, 1002])
    # blocks of at most 2 merged rows in rounds (shard 0, shard 1): [0 1][1000] [2 1001][3 1002]
    halves = partition_transitions(old, 2, block=2)
    np.testing.assert_array_equal(halves[0]["obs"][:, 0], [0, 1, 2, 1001])
    np.testing.assert_array_equal(halves[1]["obs"][:, 0], [1000, 3, 1002])


def _runs(rows: np.ndarray) -> int:
    """Number of maximal runs of consecutive integers in ``rows``."""
    return int(len(rows) > 0) + int(np.count_nonzero(np.diff(rows) != 1))


@pytest.mark.parametrize("lengths,new_world,block", [
    ([1000, 1000, 1000], 2, 64), ([997, 1000], 3, 50), ([1000], 4, 100), ([600, 600, 600, 599], 3, 128)])
def test_partition_plan_deals_contiguous_blocks_spanning_all_ages(lengths: list[int], new_world: int,
                                                                  block: int) -> None:
    plan = partition_plan(lengths, new_world, block=block)
    total = sum(lengths)
    rounds = -(-total // (block * new_world))
    assert sum(len(r) for _, r in plan) == total
    oldest, band = max(lengths) - 1, block * new_world  # a round: at most `band` merged rows
    for ranks, rows in plan:
        age = np.asarray(lengths)[ranks] - 1 - rows  # 0 = newest, aligned over the old shards
        assert np.all(np.diff(age) <= 0)  # oldest first
        # spans all ages: a block in every round, so no gap of ages wider than two rounds
        assert age.max() >= oldest - band and age.min() <= band and np.all(np.diff(age) >= -2 * band)
        for old in range(len(lengths)):
            mine = rows[ranks == old]
            assert np.all(np.diff(mine) > 0)
            assert _runs(mine) <= rounds  # one contiguous run of old rows per block at most
    # the new shards' blocks tile the merged sequence: each block at most `block` merged rows
    owner = np.empty(total, np.int64)
    merged = partition_plan(lengths, 1)[0]
    key = {(int(r), int(i)): m for m, (r, i) in enumerate(zip(*merged))}
    for s, (ranks, rows) in enumerate(plan):
        owner[[key[(int(r), int(i))] for r, i in zip(ranks, rows)]] = s
    change = np.flatnonzero(np.diff(owner)) + 1
    blocks = np.diff(np.concatenate([[0], change, [total]]))
    assert blocks.max() <= block and len(blocks) <= rounds * new_world


def test_partition_of_full_shards_fits_the_new_capacities() -> None:
    """Full old shards of a global capacity re-dealt to another world size: every new share fits the
    new shard's capacity, so ``extend`` drops nothing."""
    global_capacity, old_world = 10_001, 3
    lengths = [ReplayShard.shard_capacity(global_capacity, old_world, r) for r in range(old_world)]
    for new_world in (1, 2, 4, 7):
        plan = partition_plan(lengths, new_world, block=16)
        for rank, (_, rows) in enumerate(plan):
            assert len(rows) <= ReplayShard.shard_capacity(global_capacity, new_world, rank)


def test_partition_plan_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="new_world=0"):
        partition_plan([3], 0)
    with pytest.raises(ValueError, match="block=0"):
        partition_plan([3], 2, block=0)
    with pytest.raises(ValueError, match="no old shards"):
        partition_plan([], 2)


@pytest.mark.parametrize("global_capacity,world", [(10, 3), (1_000_000, 8), (7, 7), (100, 1)])
def test_shard_capacity_sums_to_global(global_capacity: int, world: int) -> None:
    caps = [ReplayShard.shard_capacity(global_capacity, world, r) for r in range(world)]
    assert sum(caps) == global_capacity
    assert caps == sorted(caps, reverse=True) and caps[0] - caps[-1] <= 1


def test_shard_capacity_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="rank=3"):
        ReplayShard.shard_capacity(10, 3, 3)
    with pytest.raises(ValueError, match="world=0"):
        ReplayShard.shard_capacity(10, 0, 0)
    with pytest.raises(ValueError, match="2"):
        ReplayShard.shard_capacity(2, 4, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(capacity=0), "capacity=0"), (dict(capacity=-3), "capacity=-3"),
    (dict(n_step=0), "n_step=0"), (dict(gamma=1.5), "gamma=1.5"), (dict(gamma=-0.1), "gamma=-0.1"),
    (dict(num_envs=0), "num_envs=0")])
def test_constructor_rejects_bad_settings(kwargs: dict, match: str) -> None:
    args = dict(capacity=4, obs_shape=(1,), obs_dtype=np.float32, num_envs=1, n_step=1, gamma=0.9)
    with pytest.raises(ValueError, match=match):
        ReplayShard(**{**args, **kwargs})


def test_add_rejects_wrong_leading_dim() -> None:
    shard = ReplayShard(4, (1,), np.float32, num_envs=2)
    with pytest.raises(ValueError, match="obs"):
        shard.add(np.zeros((3, 1)), np.zeros(3), np.zeros(3), np.zeros((3, 1)), np.zeros(3, bool),
                  np.zeros(3, bool))


def test_state_dict_survives_hdf5(tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    src = _filled_shard(capacity=16, steps=20)
    with h5py.File(tmp_path / "replay.h5", "w") as f:
        for k, v in src.state_dict().items():
            f[k] = v
    with h5py.File(tmp_path / "replay.h5", "r") as f:
        d = {k: f[k][()] for k in src.state_dict()}
    dst = ReplayShard(16, (1,), np.float32, num_envs=2, n_step=3, gamma=0.9)
    dst.load_state_dict(d)
    _assert_same_transitions(src.transitions(), dst.transitions())
    assert step(src, 20) == step(dst, 20)
    _assert_same_transitions(src.transitions(), dst.transitions())
