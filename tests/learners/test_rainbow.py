"""C51, QR-DQN and noisy nets in the data-parallel learner on one process: the hand-written MLP gradient
equals autograd's for C51 and QR-DQN (with noisy layers and a dueling head too), priorities are the per-row loss (C51's cross-entropy), noisy layers draw per update from streams a
model state carries, act with the acting stream and evaluate on their mean weights."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpidqn.algo.categorical import Categorical
from mpidqn.algo.quantile import Quantile
from mpidqn.learners.base import RoundPlan
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import linear_factory, mlp_layers
from mpidqn.replay.shard import Batch

CAT = Categorical(11, -3.0, 3.0)
QR = Quantile(11, kappa=0.5)


def _learner(kernel=True, noisy=False, dueling=False, head=CAT, **hyper) -> Learner:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*mlp_layers(5, 3, [32, 32], dueling=dueling, num_atoms=head.num_atoms,
                                          linear=linear_factory(noisy)))
    h = Hyper(lr=1e-3, sync_check_interval=0, distribution=head, noise_seed=5, **hyper)
    return Learner(net, h, MPI.COMM_SELF, mlp_kernel=kernel)


def _batch(rng, rows):
    return Batch(rng.normal(size=(rows, 5)).astype(np.float32), rng.integers(3, size=rows),
                 rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32),
                 np.where(rng.random(rows) < 0.2, 0.0, 0.99 ** 3).astype(np.float32))


@pytest.mark.parametrize("net", [{}, {"dueling": True, "noisy": True}], ids=["plain", "noisy-dueling"])
@pytest.mark.parametrize("head", [CAT, QR], ids=["c51", "qr"])
def test_distributional_rounds_follow_autograd_and_priorities_are_the_row_loss(head, net):
    fast, ref = _learner(kernel=True, max_grad_norm=1.0, target_update_interval=4, head=head, **net), \
        _learner(kernel=False, max_grad_norm=1.0, target_update_interval=4, head=head, **net)
    assert fast._kernel is not None and ref._kernel is None
    rng = np.random.default_rng(0)
    b = _batch(rng, 10 * 16)
    assert fast.update_many(b, 10) is None and ref.update_many(b, 10) is None
    b = _batch(rng, 6 * 16)
    plan = RoundPlan(np.full((6, 1), 16), (rng.random(96) / 16).astype(np.float32), td_errors=True)
    # the priorities of the first update's rows, by hand: C51's cross-entropy to the projected target,
    # QR-DQN's quantile Huber loss to the target quantiles
    with torch.no_grad():
        obs, act = torch.from_numpy(b.obs[:16]), torch.from_numpy(b.actions[:16]).long()
        y = ref.targets(torch.from_numpy(b.rewards[:16]), torch.from_numpy(b.next_obs[:16]),
                        torch.from_numpy(b.discounts[:16]))
        _, by_hand = head.loss(head.taken(ref.online(obs), act), y)
    got_fast, got_ref = fast.update_many(b, 6, plan), ref.update_many(b, 6, plan)
    np.testing.assert_allclose(got_fast, got_ref, rtol=1e-5, atol=1e-6)
    if not net:  # noisy layers draw new noise inside the update, which the hand computation cannot see
        np.testing.assert_allclose(got_ref[:16], by_hand.numpy(), rtol=1e-5, atol=1e-6)
    for a, c in zip([*fast.online.parameters(), *fast.target.parameters()],
                    [*ref.online.parameters(), *ref.target.parameters()]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    m = fast.pop_metrics()
    assert np.isfinite(m["loss"]) and -3.0 <= m["q_mean"] <= 3.0


def test_c51_greedy_actions_maximise_the_expected_value():
    learner = _learner(dueling=True)
    obs = np.random.default_rng(2).normal(size=(100, 5)).astype(np.float32)
    with torch.no_grad():
        q = CAT.q_values(learner.online(torch.from_numpy(obs))).numpy()
    assert learner._actor is not None
    top2 = np.sort(q, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    assert np.array_equal(learner.greedy_actions(obs)[clear], q.argmax(1)[clear])
    assert np.array_equal(learner.greedy_actions(np.repeat(obs, 2, axis=0))[::2][clear], q.argmax(1)[clear])  # torch


def test_noisy_updates_continue_bit_identically_from_a_model_state():
    rng = np.random.default_rng(1)
    rounds = [_batch(rng, 4 * 8) for _ in range(4)]
    a = _learner(noisy=True, dueling=True, double_dqn=True)
    for b in rounds[:2]:
        a.update_many(b, 4)
    state = copy.deepcopy(a.state_dict())
    assert set(state["noise"]) == {f"{net}.{layer}" for net in ("online", "target")
                                   for layer in ("1", "3", "5.value", "5.advantage")}
    b_ = _learner(noisy=True, dueling=True, double_dqn=True)
    b_.load_state_dict(state)
    for b in rounds[2:]:
        a.update_many(b, 4)
        b_.update_many(b, 4)
    for p, q in zip(a.params, b_.params):
        assert torch.equal(p, q)
    fresh = _learner(noisy=True, dueling=True, double_dqn=True)  # without the streams: different noise
    fresh.load_state_dict({**state, "noise": {}})
    fresh.update_many(rounds[2], 4)
    a2 = _learner(noisy=True, dueling=True, double_dqn=True)
    a2.load_state_dict(state)
    a2.update_many(rounds[2], 4)
    assert not all(torch.equal(p, q) for p, q in zip(fresh.params, a2.params))


def test_noisy_acting_draws_from_the_acting_stream_and_evaluation_uses_the_mean_weights():
    learner = _learner(noisy=True)
    for p in learner.params:  # large sigmas, so the noise changes actions
        torch.nn.init.normal_(p, std=1.0)
    obs = np.random.default_rng(3).normal(size=(64, 5)).astype(np.float32)
    with torch.no_grad():
        for _, m in learner._noisy:
            m.noise_on = False
        mean_actions = CAT.q_values(learner.online(torch.from_numpy(obs))).argmax(1).numpy()
    learner.use_acting_noise(np.random.default_rng(9))
    assert learner._actor is not None  # 64 rows: the numpy actor acts
    noisy = learner.greedy_actions(obs)
    assert not np.array_equal(noisy, mean_actions)
    learner.use_acting_noise(np.random.default_rng(9))
    assert np.array_equal(learner.greedy_actions(obs), noisy)  # the stream decides the noise
    stream = learner.act_noise
    before = copy.deepcopy(stream.bit_generator.state)
    with learner.evaluation_weights():
        assert np.array_equal(learner.greedy_actions(obs), mean_actions)
    assert stream.bit_generator.state == before  # evaluation draws nothing
    assert all(m.noise_on for name, m in learner._noisy if name.startswith("online."))


@pytest.mark.parametrize("double", [False, True])
def test_noisy_learners_draw_new_noise_every_update(double):
    learner = _learner(noisy=True, double_dqn=double)
    layer = dict(learner._noisy)["online.1"]
    seen = []
    rng = np.random.default_rng(0)
    for _ in range(3):
        learner.update_many(_batch(rng, 8), 1)
        seen.append(layer.eps_in.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_noisy_learners_act_through_numpy_as_through_torch_from_the_same_stream():
    fast, ref = _learner(noisy=True, dueling=True), _learner(noisy=True, dueling=True)
    ref._actor = None  # the torch path
    assert fast._actor is not None
    for p, q in zip(fast.params, ref.params):  # large sigmas, so the noise changes actions
        torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(p.numel()))
        q.data.copy_(p.data)
    fast.use_acting_noise(np.random.default_rng(9))
    ref.use_acting_noise(np.random.default_rng(9))
    rng = np.random.default_rng(4)
    changed = 0
    for step in range(6):
        if step == 3:  # new weights (and learning noise) between acting steps: the actor refreshes
            b = _batch(rng, 2 * 8)
            fast.update_many(b, 2)
            ref.update_many(b, 2)
        obs = rng.normal(size=(16, 5)).astype(np.float32)
        got, want = fast.greedy_actions(obs), ref.greedy_actions(obs)
        with torch.no_grad():  # the torch Q-values of the noise just drawn, to leave float near-ties out
            q = CAT.q_values(ref.online(torch.from_numpy(obs))).numpy()
        top2 = np.sort(q, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-4
        assert clear.sum() > 12 and np.array_equal(got[clear], want[clear])
        changed += int(step > 0 and not np.array_equal(want, previous))
        previous = want
    assert fast.act_noise.bit_generator.state == ref.act_noise.bit_generator.state  # the same draws
    assert changed > 0
