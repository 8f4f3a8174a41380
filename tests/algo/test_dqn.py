from __future__ import annotations

import numpy as np
import pytest
import torch

from mpidqn.algo.dqn import LinearSchedule, linear_schedule, per_rank_epsilon, polyak_update_, td_loss, td_targets
from mpidqn.envs.vector import spawn_seeds, true_next_obs


def test_td_targets_dqn_and_double_dqn():
    rewards = torch.tensor([1.0, 1.0, 0.5])
    discounts = torch.tensor([0.9, 0.0, 0.81])  # bootstrapped, terminated, truncated after 2 steps (n-step)
    q_target = torch.tensor([[1.0, 3.0], [5.0, 7.0], [2.0, -1.0]])
    q_online = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.0, 1.0]])
    assert torch.allclose(td_targets(rewards, discounts, q_target), torch.tensor([1 + 0.9 * 3, 1.0, 0.5 + 0.81 * 2]))
    # double DQN: the online net picks the action, the target net evaluates it
    assert torch.allclose(td_targets(rewards, discounts, q_target, q_online),
                          torch.tensor([1 + 0.9 * 1, 1.0, 0.5 + 0.81 * -1]))


def test_losses():
    q, y = torch.tensor([0.0, 3.0]), torch.tensor([0.5, 0.0])
    assert td_loss(q, y, "mse").item() == pytest.approx((0.25 + 9) / 2)
    assert td_loss(q, y, "huber").item() == pytest.approx((0.5 * 0.25 + 2.5) / 2)
    with pytest.raises(ValueError):
        td_loss(q, y, "l1")


def test_epsilon_schedule():
    epsilon_at = LinearSchedule(0, 1.0, 0.5 * 1000, 0.1)  # decay over fraction 0.5 of 1000 steps
    assert epsilon_at(0) == 1.0
    assert epsilon_at(250) == pytest.approx(0.55)
    assert epsilon_at(500) == pytest.approx(0.1)
    assert epsilon_at(10_000) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 1.0, 0.5) == pytest.approx(0.55)
    eps = [per_rank_epsilon(0.4, r, 8, 7.0) for r in range(8)]
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4 ** 8) and eps == sorted(eps, reverse=True)
    assert per_rank_epsilon(0.3, 0, 1, 7.0) == 0.3


def test_polyak_and_hard_update():
    target, online = [torch.zeros(3)], [torch.ones(3)]
    polyak_update_(target, online, 0.25)
    assert torch.allclose(target[0], torch.full((3,), 0.25))
    polyak_update_(target, online, 1.0)
    assert torch.equal(target[0], online[0])


def test_seeding_gives_distinct_reproducible_streams():
    draws = {}
    for rank in range(4):
        seqs = spawn_seeds(5, 4, rank)
        for name, seq in seqs.items():
            draws[(rank, name)] = tuple(np.random.default_rng(seq).integers(1 << 30, size=4))
    assert len(set(draws.values())) == len(draws)  # every rank and purpose has its own stream
    again = tuple(np.random.default_rng(spawn_seeds(5, 4, 2)["env"]).integers(1 << 30, size=4))
    assert again == draws[(2, "env")]
    elastic = tuple(np.random.default_rng(spawn_seeds(5, 4, 2, epoch=1000)["env"]).integers(1 << 30, size=4))
    assert elastic != draws[(2, "env")]


def test_true_next_obs_uses_final_observation_of_finished_envs():
    next_obs = np.array([[1.0], [2.0]])
    info = {"final_obs": np.array([None, np.array([9.0])], dtype=object)}
    out = true_next_obs(next_obs, np.array([False, True]), info)
    assert out.tolist() == [[1.0], [9.0]] and next_obs.tolist() == [[1.0], [2.0]]


@pytest.mark.parametrize("compiled", [False, True])
def test_rmsprop_learner_update_equals_torch_rmsprop_on_the_same_loss(compiled):
    """train.optimizer=rmsprop: the learner's updates are centered RMSprop (alpha 0.95, eps 0.01), the
    MinAtar reference optimizer, applied to the plain DQN loss of a hand-written training loop; also
    with train.compile_optimizer, through a learning-rate change."""
    import copy

    from mpi4py import MPI

    from mpidqn.learners.data_parallel import Hyper, Learner
    from mpidqn.nn.mlp import mlp_layers
    from mpidqn.replay.shard import Batch

    torch.manual_seed(3)
    net = torch.nn.Sequential(*mlp_layers(4, 3, [16]))
    ref, ref_target = copy.deepcopy(net), copy.deepcopy(net)
    hyper = Hyper(lr=1e-2, optimizer="rmsprop", max_grad_norm=None, double_dqn=False, target_update_interval=1000,
                  sync_check_interval=0, compile_optimizer=compiled)
    learner = Learner(net, hyper, MPI.COMM_SELF)
    assert isinstance(learner.optimizer, torch.optim.RMSprop)
    opt = torch.optim.RMSprop(ref.parameters(), lr=1e-2, alpha=0.95, eps=0.01, centered=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        if i == 2:  # a learning-rate schedule step
            learner.set_lr(5e-3)
            opt.param_groups[0]["lr"] = 5e-3
        b = Batch(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(3, size=8),
                  rng.normal(size=8).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32),
                  np.full(8, 0.99, np.float32))
        learner.update_many(b, 1)
        obs, next_obs = torch.from_numpy(b.obs), torch.from_numpy(b.next_obs)
        with torch.no_grad():
            y = torch.from_numpy(b.rewards) + torch.from_numpy(b.discounts) * ref_target(next_obs).max(dim=1).values
        q = ref(obs).gather(1, torch.from_numpy(b.actions).long().unsqueeze(1)).squeeze(1)
        opt.zero_grad()
        torch.nn.functional.smooth_l1_loss(q, y).backward()
        opt.step()
    assert learner.updates == 4
    moved = False
    for (name, p), q, p0 in zip(learner.online.named_parameters(), ref.parameters(), ref_target.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (name, (p - q).abs().max().item())
        moved |= not torch.equal(p, p0)
    assert moved
    assert set(learner.state_dict()["optimizer"]["1.weight"]) == {"step", "square_avg", "grad_avg"}
