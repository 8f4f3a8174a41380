"""A checkpoint's Policy acts through the numpy mirror of its network on small batches (noisy layers on
their mean weights, C51 on expected values) as through torch, and follows weights loaded into its net."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mpidqn.algo.categorical import Categorical
from mpidqn.nn.mlp import linear_factory, mlp_layers
from mpidqn.train.policy import Policy

CAT = Categorical(11, -3.0, 3.0)


def _net(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(*mlp_layers(5, 3, [32], dueling=True, num_atoms=CAT.num_atoms,
                                          linear=linear_factory(True)))
    for p in net.parameters():  # large sigmas: acting with the noise on would give other Q-values
        torch.nn.init.normal_(p, std=0.5)
    return net


def _torch_q(net: torch.nn.Module, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return CAT.q_values(net(torch.from_numpy(obs))).numpy()


def test_policy_acts_through_numpy_with_the_mean_weights_and_follows_loaded_weights():
    net = _net(0)
    policy = Policy(net, None, (5,), 3, 0, Path("ckpt"), "online", CAT)
    obs = np.random.default_rng(0).normal(size=(70, 5)).astype(np.float32)
    assert policy._numpy_actor() is not None
    np.testing.assert_allclose(policy.q_values(obs[:8]), _torch_q(net, obs[:8]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(policy.q_values(obs[0]), _torch_q(net, obs[:1])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(policy.q_values(obs)[:8], policy.q_values(obs[:8]), rtol=1e-5, atol=1e-5)  # torch
    before = policy.q_values(obs[:8])
    net.load_state_dict(_net(1).state_dict())  # in place: the mirror must notice
    after = policy.q_values(obs[:8])
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(after, _torch_q(net, obs[:8]), rtol=1e-5, atol=1e-5)
    policy.net = _net(2)  # another net altogether
    np.testing.assert_allclose(policy.q_values(obs[:8]), _torch_q(policy.net, obs[:8]), rtol=1e-5, atol=1e-5)
