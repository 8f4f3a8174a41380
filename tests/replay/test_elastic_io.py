"""Elastic resume I/O: a new rank reads from the old rank files only the replay rows it receives.

``read_replay_rows`` is compared with the whole-read implementation it replaced (kept below as the
reference) for transition and frame shards with wrapped rings, and the elements it reads are counted.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_frame_replay import FRAME, fill, make_envs

from mpidqn.io.h5tree import read_tree, unflatten, write_tree
from mpidqn.replay.frames import FrameReplayShard, FrameRows, frame_rows_from_state, interleave_frame_rows
from mpidqn.replay.shard import FIELDS, ReplayShard, partition_plan
from mpidqn.train.checkpoints import (
    Checkpoint,
    read_replay_rows,
    read_shard_rows,
    replay_lengths,
)

STACK, N_STEP = 4, 3


def _whole_read_rows(ckpt: Checkpoint, plan: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray] | FrameRows | None:
    """The previous read_replay_rows: every old shard's datasets read whole, then the rows selected."""
    old_ranks, rows = plan
    parts, order = [], []
    for old in np.unique(old_ranks):
        mine = np.flatnonzero(old_ranks == old)
        with h5py.File(ckpt.file(f"rank_{int(old):05d}.h5"), "r") as h:
            ring = h["replay/ring"]
            cap, pos, size = (int(ring.attrs[k]) for k in ("capacity", "pos", "size"))
            slots = ((pos - size) % cap + rows[mine]) % cap
            if "frames" in h["replay"]:
                parts.append(frame_rows_from_state(read_tree(h["replay"]), rows[mine]))
            else:
                parts.append({k: ring[k][()][slots] for k in ring})
        order.append(mine)
    if not parts:
        return None
    where = np.argsort(np.concatenate(order), kind="stable")
    if not isinstance(parts[0], dict):
        source = np.repeat(np.arange(len(parts)), [len(m) for m in order])[where]
        return interleave_frame_rows(parts, source, STACK)
    return {k: np.concatenate([p[k] for p in parts])[where] for k in parts[0]}


def _transition_shard(rank: int, capacity: int, steps: int) -> ReplayShard:
    """Two envs, 3-step returns, episodes of 7 and 5 steps; obs unique per (rank, step, env)."""
    shard = ReplayShard(capacity, (3,), np.float32, num_envs=2, n_step=N_STEP, gamma=0.9)
    rng = np.random.default_rng(rank)
    for t in range(steps):
        obs = (100_000 * rank + 10 * t + np.arange(2, dtype=np.float32))[:, None] + np.zeros(3, np.float32)
        shard.add(obs, rng.integers(3, size=2), rng.normal(size=2), obs + 0.5,
                  np.array([t % 7 == 6, False]), np.array([False, t % 5 == 4]))
    return shard


def _frame_shard(rank: int, capacity: int, steps: int, num_envs: int = 2) -> FrameReplayShard:
    shard = FrameReplayShard(capacity, (STACK, *FRAME), np.uint8, num_envs, N_STEP, 0.9, STACK)
    fill([shard], steps, num_envs, STACK, seed=rank)
    return shard


def _save(path: Path, shards: list, extra: dict[str, np.ndarray] | None = None) -> Checkpoint:
    """Rank files as CheckpointManager writes them (the replay group only), with optional extra columns."""
    path.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        state = dict(shard.state_dict())
        for name, fn in (extra or {}).items():
            state[f"ring/{name}"] = fn(len(state["ring/actions"]), rank)
        with h5py.File(path / f"rank_{rank:05d}.h5", "w") as f:
            write_tree(f, {"replay": unflatten(state)})
    return Checkpoint(path, {"world_size": len(shards)})


def _wrapped(shard) -> bool:
    """The oldest stored row is not in slot 0: some run of rows wraps or starts mid-ring."""
    return (shard.state_dict()["ring/pos"] - len(shard)) % shard.capacity != 0


def _assert_same(got, want) -> None:
    if isinstance(want, FrameRows):
        assert isinstance(got, FrameRows)
        for name in ("frames", "prev", "obs_idx", "next_idx", "actions", "rewards", "discounts"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    else:
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _old_shards(kind: str, old_world: int, capacity: int = 40) -> list:
    """Old shards of unequal lengths, all but the last wrapped (steps enough to overwrite)."""
    if kind == "transitions":
        shards = [_transition_shard(r, capacity, 38 + 13 * r) for r in range(old_world)]
    else:
        shards = [_frame_shard(r, capacity, 70 + 9 * r) for r in range(old_world)]
    assert any(_wrapped(s) for s in shards)
    return shards


@pytest.mark.parametrize("kind", ["transitions", "frames"])
@pytest.mark.parametrize("old_world,new_world", [(3, 2), (2, 3), (1, 4)])
@pytest.mark.parametrize("block", [5, 4096])
def test_rows_each_new_rank_reads_equal_the_whole_read(tmp_path, kind, old_world, new_world, block):
    shards = _old_shards(kind, old_world)
    if kind == "frames":
        assert all(s._frames.written > s.frame_capacity for s in shards)  # the frame rings wrapped too
    ckpt = _save(tmp_path, shards)
    lengths = replay_lengths(ckpt)
    assert lengths == [len(s) for s in shards]
    plan = partition_plan(lengths, new_world, block=block)
    for ranks, rows in plan:
        _assert_same(read_replay_rows(ckpt, (ranks, rows)), _whole_read_rows(ckpt, (ranks, rows)))
    # and the new shards together hold every old row once
    cap = ReplayShard.shard_capacity(sum(s.capacity for s in shards), new_world, 0)
    new = []
    for ranks, rows in plan:
        shard = _transition_shard(0, cap, 0) if kind == "transitions" else _frame_shard(0, cap, 0)
        shard.extend(read_replay_rows(ckpt, (ranks, rows)))
        new.append(shard.transitions())
    def keys(parts: list) -> list[bytes]:
        return sorted(t["obs"][i].tobytes() + t["next_obs"][i].tobytes() + t["actions"][i].tobytes()
                      for t in parts for i in range(len(t["actions"])))

    assert keys(new) == keys([s.transitions() for s in shards])


def test_frame_rows_from_partial_reads_equal_frame_rows_from_state(tmp_path):
    """Several episodes (1..12 steps), wrapped row and frame rings; any subset and order of rows."""
    shard = _frame_shard(7, 50, 120, num_envs=3)
    assert _wrapped(shard) and shard._frames.written > 2 * shard.frame_capacity
    ckpt = _save(tmp_path, [shard])
    n = len(shard)
    rng = np.random.default_rng(0)
    subsets = [np.arange(n), np.arange(n)[::3], np.arange(n)[n // 2:], np.arange(n)[:7], rng.permutation(n)[:20],
               np.arange(n)[::-1], np.array([n - 1]), np.array([0, n - 1])]
    with h5py.File(ckpt.file("rank_00000.h5"), "r") as h:
        state = read_tree(h["replay"])
        for rows in subsets:
            _assert_same(read_shard_rows(h["replay"], rows), frame_rows_from_state(state, rows))


def test_a_next_stack_reaching_before_need_is_still_read_right(tmp_path):
    """A row whose next_obs stack links to a frame older than its obs stack (``extend`` of rows built by
    hand, or deduplicated from materialised stacks) lies outside the window read for it; the reader
    then reads all saved frames of that shard and the rows are still right. Frames: 0 A, 1 B (after A),
    2 C, 3 D (after C), 4 E (after B); the row is obs (C, D) -> next_obs (B, E), so need = 2 > 1."""
    pool = np.stack([np.full(FRAME, v, np.uint8) for v in (10, 11, 12, 13, 14)])
    rows = FrameRows(pool, np.array([0, 0, 2, 2, 1]), np.array([3, 3]), np.array([4, 4]),
                     np.array([1, 2]), np.array([0.5, 1.5], np.float32), np.array([0.9, 0.0], np.float32))
    shard = FrameReplayShard(10, (2, *FRAME), np.uint8, 1, 1, 0.9, 2)
    shard.extend(rows)
    assert shard.transitions()["next_obs"][0, 0, 0, 0] == 11  # B: before the row's need
    ckpt = _save(tmp_path, [shard])
    with h5py.File(ckpt.file("rank_00000.h5"), "r") as h:
        state = read_tree(h["replay"])
        for subset in (np.array([0]), np.array([1]), np.array([0, 1])):
            _assert_same(read_shard_rows(h["replay"], subset), frame_rows_from_state(state, subset))
        _assert_same(read_shard_rows(h["replay"], np.array([], np.int64)), frame_rows_from_state(state, np.array([], np.int64)))


def test_unknown_ring_columns_travel_and_are_ignored_by_extend(tmp_path):
    """A per-row column this version does not know (a float64 priority) comes with the rows."""
    shards = _old_shards("transitions", 3)
    ckpt = _save(tmp_path, shards, {"priority": lambda n, rank: rank + np.arange(n) / 1000.0})
    plan = partition_plan(replay_lengths(ckpt), 2, block=5)
    for ranks, rows in plan:
        got = read_replay_rows(ckpt, (ranks, rows))
        _assert_same(got, _whole_read_rows(ckpt, (ranks, rows)))
        assert set(got) == {*FIELDS, "priority"} and got["priority"].dtype == np.float64
        shard = _transition_shard(0, 200, 0)
        assert shard.extend(got) == len(rows)


class _CountReads:
    """Elements read per dataset name through ``h5py.Dataset.__getitem__`` (slices and ``[()]``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.elements: Counter[str] = Counter()
        getitem = h5py.Dataset.__getitem__

        def counting(ds, key, *args, **kwargs):
            out = getitem(ds, key, *args, **kwargs)
            self.elements[ds.name] += int(np.size(out))
            return out

        def uncounted(*args, **kwargs):
            raise AssertionError("read_direct bypasses the read count of this test")

        monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
        monkeypatch.setattr(h5py.Dataset, "read_direct", uncounted)


@pytest.mark.parametrize("kind", ["transitions", "frames"])
@pytest.mark.parametrize("old_world,new_world", [(3, 2), (2, 3), (1, 4)])
def test_new_ranks_together_read_each_stored_row_once(tmp_path, monkeypatch, kind, old_world, new_world):
    """Summed over the new ranks, the elements read from ``replay/ring/obs`` (every ring column) are
    the stored rows, and those read from ``replay/frames/frames`` the stored frames plus at most the
    frames in flight (``FrameReplayShard.in_flight``) per boundary between blocks: windows of
    consecutive blocks may share the frames of a few steps.

    The previous whole-read implementation (``_whole_read_rows``) reads every old shard whole for each
    new rank, W' times the stored rows; this test fails on it: it was checked by running the test with
    ``read_replay_rows`` replaced by that reference, and the last assertions below run the reference
    under the same count and require it to exceed the bound."""
    capacity, block = 500, 256
    if kind == "transitions":
        shards = [_transition_shard(r, capacity, 300 + 17 * r) for r in range(old_world)]
    else:
        shards = [_frame_shard(r, capacity, 700 + 17 * r, num_envs=1) for r in range(old_world)]
        assert all(s._frames.written > s.frame_capacity for s in shards)
    assert any(_wrapped(s) for s in shards)
    ckpt = _save(tmp_path, shards)
    plan = partition_plan(replay_lengths(ckpt), new_world, block=block)
    stored: Counter[str] = Counter()  # elements of the stored rows (and frames), before counting reads
    for r in range(old_world):
        with h5py.File(ckpt.file(f"rank_{r:05d}.h5"), "r") as h:
            columns = list(h["replay/ring"])
            for ds in h["replay/ring"].values():  # frame shards save dropped rows too: count only live ones
                stored[ds.name] += ds.size // len(ds) * len(shards[r])
            if "frames" in h["replay"]:
                stored["/replay/frames/frames"] += h["replay/frames/frames"].size
    frame_elems = int(np.prod(FRAME))
    boundaries = sum(len(np.flatnonzero(np.diff(rows[ranks == old]) != 1)) + 1
                     for ranks, rows in plan for old in range(old_world))  # runs of old rows, all new ranks
    slack = boundaries * (shards[0].in_flight * frame_elems if kind == "frames" else 0)

    def bounded(count: Counter) -> bool:
        rows_once = all(count[f"/replay/ring/{k}"] <= stored[f"/replay/ring/{k}"] for k in columns)
        frames_once = count["/replay/frames/frames"] <= stored["/replay/frames/frames"] + slack
        return rows_once and frames_once

    reads = _CountReads(monkeypatch)
    for ranks, rows in plan:
        read_replay_rows(ckpt, (ranks, rows))
    new = reads.elements.copy()
    assert new["/replay/ring/obs" if kind == "transitions" else "/replay/ring/obs_idx"] > 0
    assert bounded(new), (dict(new), stored, slack)
    if kind == "transitions":  # exactly once
        for k in columns:
            assert new[f"/replay/ring/{k}"] == stored[f"/replay/ring/{k}"], k
    reads.elements.clear()
    for ranks, rows in plan:
        _whole_read_rows(ckpt, (ranks, rows))
    assert not bounded(reads.elements)
    main = "/replay/ring/obs" if kind == "transitions" else "/replay/frames/frames"
    assert reads.elements[main] >= new_world * sum(
        len(s) * 3 if kind == "transitions" else min(s._frames.written, s.frame_capacity) * frame_elems for s in shards)


@pytest.mark.parametrize("kind", ["transitions", "frames"])
def test_priorities_travel_with_their_rows_to_the_new_shards(tmp_path, kind):
    """A prioritized shard re-sharded 3 -> 2: every new shard holds each row with the priority it had."""
    old = []
    for r in range(3):
        if kind == "transitions":
            shard = ReplayShard(40, (3,), np.float32, num_envs=2, n_step=N_STEP, gamma=0.9, priority=(0.6, 1e-3))
            fresh = _transition_shard(r, 40, 38 + 13 * r)
            shard.extend(fresh.transitions())
        else:
            shard = FrameReplayShard(40, (STACK, *FRAME), np.uint8, 2, N_STEP, 0.9, STACK, priority=(0.6, 1e-3))
            fill([shard], 70 + 9 * r, 2, STACK, seed=r)
        shard.update_priorities(shard.oldest_first() if kind == "frames" else np.arange(len(shard)),
                                np.random.default_rng(r).exponential(size=len(shard)))
        old.append(shard)
    ckpt = _save(tmp_path / "c", old)
    plan = partition_plan([len(s) for s in old], 2, block=5)
    moved = []
    for new_rank in range(2):
        new = (ReplayShard(60, (3,), np.float32, 2, N_STEP, 0.9, priority=(0.6, 1e-3)) if kind == "transitions" else
               FrameReplayShard(60, (STACK, *FRAME), np.uint8, 2, N_STEP, 0.9, STACK, priority=(0.6, 1e-3)))
        new.extend(read_replay_rows(ckpt, plan[new_rank]))
        moved.append(new.transitions())

    def rows(ts: list[dict]) -> Counter:
        return Counter((t["obs"][i].tobytes(), t["next_obs"][i].tobytes(), float(t["priority"][i]))
                       for t in ts for i in range(len(t["actions"])))
    assert rows(moved) == rows([s.transitions() for s in old])
    assert len({p for t in moved for p in t["priority"]}) > 10  # real, distinct priorities moved


TAG = 1e6  # rewards of the moved rows become TAG + their index in the plan: new rows' rewards stay far below


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (3, 2), (1, 3)])
def test_moved_frame_rows_keep_their_stacks_while_a_table_length_of_new_rows_arrives(tmp_path, old_world, new_world):
    """Issue #35: after an elastic resume of frame shards (frame rings wrapped), every moved row that is
    still stored gathers exactly the stacks it held right after ``extend``, step after step of ``add``
    until new rows filled the whole table; the moved rows that leave are the oldest of all old shards
    alike (a suffix of the plan, interleaved by age), so the rows kept per old rank stay in proportion."""
    num_envs, capacity = 2, 150
    shards = [_frame_shard(r, capacity, 260 + 5 * r, num_envs) for r in range(old_world)]
    assert all(s._frames.written > s.frame_capacity for s in shards)
    ckpt = _save(tmp_path, shards)
    olds = [s.transitions() for s in shards]
    lengths = replay_lengths(ckpt)
    for s, (ranks, rows) in enumerate(partition_plan(lengths, new_world)):
        new = _frame_shard(0, ReplayShard.shard_capacity(capacity * old_world, new_world, s), 0, num_envs)
        moved = read_replay_rows(ckpt, (ranks, rows))
        moved.rewards = (TAG + np.arange(len(moved))).astype(np.float32)
        new.extend(moved)
        want_obs = np.stack([olds[r]["obs"][i] for r, i in zip(ranks, rows)])
        want_next = np.stack([olds[r]["next_obs"][i] for r, i in zip(ranks, rows)])
        kept = _check_moved_rows(new, want_obs, want_next)
        assert len(kept) >= 0.95 * len(rows), (len(kept), len(rows))  # the frame ring holds nearly all
        envs = make_envs(num_envs, STACK)
        obs, _ = envs.reset(seed=100 + s)
        rng = np.random.default_rng(s)
        left = []
        for _ in range(new.capacity // num_envs + N_STEP + 1):  # a whole table length of new rows
            actions = rng.integers(3, size=num_envs)
            nxt, r, term, trunc, info = envs.step(actions)
            true_next = nxt.copy()
            for e in np.flatnonzero(term | trunc):
                true_next[e] = info["final_obs"][e]
            new.add(obs, actions, r, true_next, term, trunc)
            obs = nxt
            kept = _check_moved_rows(new, want_obs, want_next)
            left.append(len(kept))
            if len(kept) >= 30:
                assert np.array_equal(kept, np.arange(len(rows) - len(kept), len(rows)))  # the newest moved rows
                share = np.bincount(ranks[kept], minlength=old_world) / len(kept)
                assert np.allclose(share, np.asarray(lengths) / sum(lengths), atol=0.05), share
        assert left[-1] == 0 and len(set(left)) > 10  # they left a few at a time, and all are gone


def _check_moved_rows(shard: FrameReplayShard, want_obs: np.ndarray, want_next: np.ndarray) -> np.ndarray:
    """Plan indices of the moved rows still stored (sorted), after checking that each gathers its stacks."""
    t = shard.transitions()
    moved = t["rewards"] >= TAG
    idx = (t["rewards"][moved] - TAG).astype(np.int64)
    np.testing.assert_array_equal(t["obs"][moved], want_obs[idx])
    np.testing.assert_array_equal(t["next_obs"][moved], want_next[idx])
    return np.sort(idx)


def test_a_pool_larger_than_the_frame_ring_keeps_the_newest_rows_of_every_old_shard(tmp_path):
    """Issue #35, second symptom: where the moved frames exceed the new frame ring, the rows left out are
    the oldest of all old shards alike, not the rows of old rank 0 whatever their age."""
    shards = [_frame_shard(r, 100, 120) for r in range(8)]
    ckpt = _save(tmp_path, shards)
    olds = [s.transitions() for s in shards]
    lengths = replay_lengths(ckpt)
    ranks, rows = partition_plan(lengths, 1)[0]
    moved = read_replay_rows(ckpt, (ranks, rows))
    moved.rewards = (TAG + np.arange(len(moved))).astype(np.float32)
    new = FrameReplayShard(800, (STACK, *FRAME), np.uint8, 2, N_STEP, 0.9, STACK,
                           frame_capacity=len(moved.frames) * 3 // 4)
    new.extend(moved)
    kept = _check_moved_rows(new, np.stack([olds[r]["obs"][i] for r, i in zip(ranks, rows)]),
                             np.stack([olds[r]["next_obs"][i] for r, i in zip(ranks, rows)]))
    assert 0.5 * len(rows) < len(kept) < len(rows)
    assert np.array_equal(kept, np.arange(len(rows) - len(kept), len(rows)))
    share = np.bincount(ranks[kept], minlength=8) / len(kept)
    assert np.allclose(share, np.asarray(lengths) / sum(lengths), atol=0.02), share
