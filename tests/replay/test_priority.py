"""Prioritized replay maths: the sum/min tree and exact sampling over shards (mpidqn/replay/priority.py)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mpidqn.replay.priority import ShardMass, SumTree, importance_weights, split_batch

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
