from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpidqn.nn.actor import NumpyActor
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers


@pytest.mark.parametrize("activation, dueling, layer_norm", [("relu", False, False), ("tanh", True, False),
                                                             ("relu", True, True)])
def test_numpy_actor_matches_the_torch_network(activation, dueling, layer_norm):
    torch.manual_seed(0)
    layers = mlp_layers(6, 5, [32, 16], activation, dueling, layer_norm)
    if layer_norm:  # non-trivial affine parameters, so a mirror that ignored them would differ
        for m in layers:
            if isinstance(m, torch.nn.LayerNorm):
                torch.nn.init.normal_(m.weight)
                torch.nn.init.normal_(m.bias)
    assert NumpyActor.supports(layers)
    net = torch.nn.Sequential(*layers)
    actor = NumpyActor(layers)
    actor.refresh(0)
    obs = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    with torch.no_grad():
        q = net(torch.from_numpy(obs)).numpy()
    top2 = np.sort(q, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # ignore float near-ties
    assert np.array_equal(actor.greedy(obs)[clear], q.argmax(1)[clear]) and clear.sum() > 150


def test_gelu_networks_act_through_torch():
    assert not NumpyActor.supports(mlp_layers(4, 2, [8], "gelu"))


def test_learner_actor_follows_updates_and_loads():
    torch.manual_seed(0)
    learner = Learner(torch.nn.Sequential(*mlp_layers(3, 4, [16])), Hyper(lr=0.5), MPI.COMM_SELF)
    obs = np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32)

    def torch_greedy():
        with torch.no_grad():
            return learner.online(torch.from_numpy(obs)).argmax(1).numpy()

    assert learner._actor is not None and np.array_equal(learner.greedy_actions(obs), torch_greedy())
    state = {k: v for k, v in learner.state_dict().items()}
    state = {**state, "online": {k: v.clone() for k, v in state["online"].items()}}
    x = torch.from_numpy(obs)
    for _ in range(5):  # big steps so the greedy actions change
        learner.backward(x, torch.zeros(32, dtype=torch.long), torch.full((32,), 100.0))
        learner.step()
    assert np.array_equal(learner.greedy_actions(obs), torch_greedy())
    learner.load_state_dict(state)
    assert np.array_equal(learner.greedy_actions(obs), torch_greedy())
