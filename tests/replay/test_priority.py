"""Prioritized replay maths: the sum/min tree and exact sampling over shards (mpidqn/replay/priority.py)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mpidqn.replay.frames import FrameReplayShard
from mpidqn.replay.priority import ShardMass, SumTree, importance_weights, split_batch
from mpidqn.replay.shard import ReplayShard

ALPHA, BETA = 0.6, 0.4


def test_tree_sums_minima_and_last_write_wins():
    t = SumTree(5)  # padded to 8 leaves
    assert t.total == 0 and t.min == np.inf
    t.set(np.array([0, 3, 4]), np.array([1.0, 2.0, 0.5]))
    assert t.total == pytest.approx(3.5) and t.min == 0.5
    t.set(np.array([4, 4]), np.array([7.0, 3.0]))  # repeated slot: the last value stays
    assert t.get(np.array([4]))[0] == 3.0 and t.total == pytest.approx(6.0) and t.min == 1.0
    t.set(np.array([0]), np.array([0.0]))  # emptied slot: no longer drawn, no longer the minimum
    assert t.min == 2.0
    assert set(t.sample(2000, np.random.default_rng(0)).tolist()) == {3, 4}
    with pytest.raises(IndexError):
        t.set(np.array([5]), np.array([1.0]))
    with pytest.raises(ValueError):
        t.set(np.array([1]), np.array([np.nan]))


def test_tree_state_round_trip():
    rng = np.random.default_rng(1)
    t = SumTree(1000)
    t.set(np.arange(700), rng.random(700))
    u = SumTree.from_state(t.state())
    assert u.total == t.total and u.min == t.min
    v = rng.random(64) * t.total
    assert np.array_equal(u.find(v), t.find(v))


def _chi2_pvalue(slots: np.ndarray, masses: np.ndarray) -> float:
    counts = np.bincount(slots, minlength=len(masses))
    expected = masses / masses.sum() * len(slots)
    return float(stats.chisquare(counts, expected).pvalue)


def test_tree_draws_in_proportion_to_mass():
    rng = np.random.default_rng(2)
    masses = rng.random(50) ** 3 + 0.01
    t = SumTree(50)
    t.set(np.arange(50), masses)
    slots = t.sample(200_000, np.random.default_rng(3))
    assert _chi2_pvalue(slots, masses) > 1e-3
    # The same test rejects uniform draws: it can fail.
    uniform = np.random.default_rng(4).integers(0, 50, 200_000)
    assert _chi2_pvalue(uniform, masses) < 1e-6


def _shards(rng):
    """Three shards of deliberately unequal sizes and priority scales."""
    sizes = [10, 40, 3]
    prios = [rng.random(10) * 5.0, rng.random(40) * 0.5 + 0.01, np.array([8.0, 0.02, 1.0])]
    trees = []
    for n, p in zip(sizes, prios):
        t = SumTree(64)
        t.set(np.arange(n), p ** ALPHA)
        trees.append(t)
    return trees, prios


def test_global_sampling_over_shards_matches_one_buffer():
    """Shared split + local draws: slot frequencies over the union are p^alpha / sum(p^alpha)."""
    trees, prios = _shards(np.random.default_rng(5))
    masses = [ShardMass(t.total, t.min, len(p)) for t, p in zip(trees, prios)]
    shared = np.random.default_rng(6)  # the same stream on every rank
    local = [np.random.default_rng(100 + r) for r in range(3)]  # each rank's own stream
    offsets = np.cumsum([0] + [len(p) for p in prios])
    drawn = []
    for _ in range(4000):
        counts = split_batch(masses, 32, shared)
        assert counts.sum() == 32
        for r, t in enumerate(trees):
            drawn.append(t.sample(int(counts[r]), local[r]) + offsets[r])  # a count of 0 draws nothing
    union = np.concatenate(prios) ** ALPHA
    assert _chi2_pvalue(np.concatenate(drawn), union) > 1e-3
    # Drawing each rank's equal share locally (today's 'local' mode) is a different distribution.
    local_only = np.concatenate([t.sample(4000 * 32 // 3, local[r]) + offsets[r] for r, t in enumerate(trees)])
    assert _chi2_pvalue(local_only, union) < 1e-6


def test_importance_weights_equal_those_of_one_buffer():
    trees, prios = _shards(np.random.default_rng(7))
    masses = [ShardMass(t.total, t.min, len(p)) for t, p in zip(trees, prios)]
    union = np.concatenate(prios) ** ALPHA
    one = SumTree(len(union))
    one.set(np.arange(len(union)), union)
    single = [ShardMass(one.total, one.min, len(union))]
    offsets = np.cumsum([0] + [len(p) for p in prios])
    for r, t in enumerate(trees):
        slots = np.arange(len(prios[r]))
        w_sharded = importance_weights(t.get(slots), masses, BETA)
        w_single = importance_weights(one.get(slots + offsets[r]), single, BETA)
        np.testing.assert_allclose(w_sharded, w_single, rtol=1e-6)
        # Direct formula: (N P(i))^-beta / max_j (N P(j))^-beta.
        p = union[slots + offsets[r]] / union.sum()
        expect = (len(union) * p) ** -BETA / (len(union) * union.min() / union.sum()) ** -BETA
        np.testing.assert_allclose(w_sharded, expect, rtol=1e-5)
    assert importance_weights(np.array([union.min()]), masses, BETA)[0] == pytest.approx(1.0)


def test_uniform_masses_are_sizes():
    """Uniform replay is the special case mass = 1 per slot: the split follows the shard sizes and
    every weight is 1."""
    shards = [ShardMass(float(n), 1.0, n) for n in (5, 20, 75)]
    counts = np.sum([split_batch(shards, 100, np.random.default_rng(s)) for s in range(2000)], axis=0)
    assert stats.chisquare(counts, np.array([5, 20, 75]) / 100 * counts.sum()).pvalue > 1e-3
    np.testing.assert_array_equal(importance_weights(np.ones(4), shards, BETA), np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError):
        split_batch([ShardMass(0.0, np.inf, 0)], 8, np.random.default_rng(0))


# ----------------------------------------------------------------------------- shards with priorities


def _rows(n: int, seed: int = 0, obs_shape=(3,)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"obs": rng.normal(size=(n, *obs_shape)).astype(np.float32), "actions": rng.integers(2, size=n),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_obs": rng.normal(size=(n, *obs_shape)).astype(np.float32),
            "discounts": np.full(n, 0.99, np.float32)}


def test_new_transitions_get_the_running_maximum_and_updates_write_back():
    shard = ReplayShard(8, (3,), np.float32, 1, priority=(ALPHA, 1e-3))
    shard.extend(_rows(4))
    assert np.all(shard.priorities.p[:4] == 1.0)  # the initial maximum
    shard.update_priorities(np.array([0, 2]), np.array([3.0, 0.5]))
    np.testing.assert_allclose(shard.priorities.p[:4], [3.001, 1.0, 0.501, 1.0])
    shard.extend(_rows(2, seed=1))  # new rows at the running maximum, 3.001
    np.testing.assert_allclose(shard.priorities.p[4:6], [3.001, 3.001])
    assert shard.mass().total == pytest.approx(np.sum(shard.priorities.p[:6] ** ALPHA))
    assert shard.mass().min == pytest.approx(0.501 ** ALPHA)
    shard.extend(_rows(4, seed=2))  # wraps: slots 0 and 1 overwritten, at the maximum again
    np.testing.assert_allclose(shard.priorities.p[:2], [3.001, 3.001])
    assert len(shard) == 8 and shard.mass().size == 8


def test_prioritized_shard_draws_in_proportion_and_resumes_bit_identically():
    shard = ReplayShard(64, (3,), np.float32, 1, priority=(ALPHA, 1e-3))
    shard.extend(_rows(50))
    shard.update_priorities(np.arange(50), np.random.default_rng(3).exponential(size=50))
    slots = shard.sample_slots(40_000, np.random.default_rng(4))
    assert _chi2_pvalue(slots, shard.priorities.masses(np.arange(50))) > 1e-3
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in shard.state_dict().items()}
    back = ReplayShard(64, (3,), np.float32, 1, priority=(ALPHA, 1e-3))
    back.load_state_dict(state)
    assert back.priorities.max_p == shard.priorities.max_p
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(3):  # the same draws, the same write-backs, the same trees
        sa, sb = shard.sample_slots(32, a), back.sample_slots(32, b)
        np.testing.assert_array_equal(sa, sb)
        td = np.abs(np.random.default_rng(len(sa)).normal(size=32))
        shard.update_priorities(sa, td)
        back.update_priorities(sb, td)
    assert shard.priorities.tree.total == back.priorities.tree.total
    np.testing.assert_array_equal(shard.priorities.tree._sum, back.priorities.tree._sum)


def test_rows_moved_by_extend_keep_their_priorities():
    old = ReplayShard(16, (3,), np.float32, 1, priority=(ALPHA, 1e-3))
    old.extend(_rows(10))
    old.update_priorities(np.arange(10), np.arange(10) * 0.5)
    moved = old.transitions()
    assert "priority" in moved
    new = ReplayShard(16, (3,), np.float32, 1, priority=(ALPHA, 1e-3))
    new.extend(moved)
    np.testing.assert_array_equal(new.priorities.p[:10], old.priorities.p[:10])
    uniform = ReplayShard(16, (3,), np.float32, 1)  # a uniform shard ignores the column
    uniform.extend(moved)
    assert len(uniform) == 10


def test_uniform_shard_mass_is_its_size_and_weights_are_one():
    shard = ReplayShard(16, (3,), np.float32, 1)
    assert shard.mass().total == 0 and shard.mass().min == np.inf
    shard.extend(_rows(5))
    assert shard.mass() == ShardMass(5.0, 1.0, 5)
    assert np.all(shard.slot_masses(np.arange(3)) == 1)
    assert shard.sample_slots(0, np.random.default_rng(0)).shape == (0,)


def _frame_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n stacked (2, 4, 4) uint8 transitions of one long episode (next_obs shares a frame with obs)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, size=(n + 2, 4, 4), dtype=np.uint8)
    obs = np.stack([frames[i:i + 2] for i in range(n)])
    nxt = np.stack([frames[i + 1:i + 3] for i in range(n)])
    return {"obs": obs, "actions": rng.integers(2, size=n), "rewards": np.zeros(n, np.float32),
            "next_obs": nxt, "discounts": np.full(n, 0.99, np.float32)}


def test_frame_shard_priorities_follow_rows_through_eviction_and_compaction():
    shard = FrameReplayShard(12, (2, 4, 4), np.uint8, 1, stack=2, priority=(ALPHA, 1e-3))
    shard.extend(_frame_rows(8))
    shard.update_priorities(np.arange(8), np.arange(8, dtype=np.float64))
    moved = shard.transitions()
    np.testing.assert_allclose(moved["priority"], np.arange(8) + 1e-3)
    again = FrameReplayShard(12, (2, 4, 4), np.uint8, 1, stack=2, priority=(ALPHA, 1e-3))
    again.extend(moved)
    np.testing.assert_array_equal(again.transitions()["priority"], moved["priority"])
    # a tiny frame ring forces the oldest rows out: their slots must never be drawn again
    small = FrameReplayShard(12, (2, 4, 4), np.uint8, 1, stack=2, priority=(ALPHA, 1e-3),
                             frame_capacity=4 * (2 + 1) + 4)
    for i in range(5):
        small.extend(_frame_rows(4, seed=i))
    live = set(small.oldest_first().tolist())
    drawn = set(small.sample_slots(5000, np.random.default_rng(0)).tolist())
    assert drawn <= live and small.mass().size == len(small)
    assert small.mass().total == pytest.approx(np.sum(small.priorities.p[list(live)] ** ALPHA))
