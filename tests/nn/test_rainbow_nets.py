"""The Rainbow network parts: noisy layers (factorised noise, mean weights when off), C51's flat head
(plain and dueling) and the numpy actor acting on C51's expected values and through noisy layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpidqn.algo.categorical import Categorical
from mpidqn.algo.quantile import Quantile
from mpidqn.config import NetworkConfig
from mpidqn.nn.actor import NumpyActor
from mpidqn.nn.mlp import DuelingHead, linear_factory, mlp_layers
from mpidqn.nn.noisy import NoisyLinear, learning_streams, noisy_modules
from mpidqn.nn.registry import q_network_layers


def test_noisy_linear_is_its_mean_without_noise_and_factorised_with_it():
    torch.manual_seed(0)
    layer = NoisyLinear(4, 3, sigma0=0.5)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu)
    assert torch.allclose(layer.weight_sigma, torch.full((3, 4), 0.25))  # sigma0 / sqrt(fan-in)
    rng = np.random.default_rng(1)
    layer.resample(rng)
    eps = np.random.default_rng(1).standard_normal(7)
    f = np.sign(eps) * np.sqrt(np.abs(eps))
    w = layer.weight_mu + layer.weight_sigma * torch.outer(torch.tensor(f[4:]), torch.tensor(f[:4])).float()
    b = layer.bias_mu + layer.bias_sigma * torch.tensor(f[4:]).float()
    torch.testing.assert_close(layer(x), x @ w.T + b)
    assert "eps_in" not in layer.state_dict()  # the noise is not model state (its streams are)


def test_noisy_gradients_reach_mu_and_sigma():
    layer = NoisyLinear(3, 2)
    layer.resample(np.random.default_rng(0))
    layer(torch.randn(4, 3)).sum().backward()
    assert layer.weight_sigma.grad.abs().sum() > 0 and layer.bias_mu.grad.abs().sum() > 0


def test_learning_streams_depend_on_the_seed_and_the_layer_only():
    a = learning_streams(3, ["online.1", "target.1"])
    b = learning_streams(3, ["target.1"])
    assert a["target.1"].standard_normal() == b["target.1"].standard_normal()
    assert a["online.1"].standard_normal() != learning_streams(4, ["online.1"])["online.1"].standard_normal()


def test_registry_builds_noisy_c51_networks_of_every_kind():
    cfg = NetworkConfig(distributional=True, num_atoms=7, noisy=True, dueling=True, hidden=[16])
    mlp = torch.nn.Sequential(*q_network_layers((4,), 3, cfg))
    assert mlp(torch.zeros(2, 4)).shape == (2, 3 * 7)
    assert len(noisy_modules(mlp)) == 3  # hidden, value, advantage
    cnn = torch.nn.Sequential(*q_network_layers((4, 10, 10), 6, NetworkConfig(kind="minatar_cnn", distributional=True,
                                                                                noisy=True)))
    assert cnn(torch.zeros(2, 4, 10, 10)).shape == (2, 6 * 51)
    assert len(noisy_modules(cnn)) == 2  # the FC layer and the head; convolutions stay plain


def test_the_default_network_is_unchanged():
    torch.manual_seed(0)
    a = mlp_layers(4, 2, [8], dueling=True)
    torch.manual_seed(0)
    b = q_network_layers((4,), 2, NetworkConfig(hidden=[8], dueling=True))
    assert [type(m) for m in a] == [type(m) for m in b]
    for p, q in zip(torch.nn.Sequential(*a).state_dict().values(), torch.nn.Sequential(*b).state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cat", [Categorical(11, -5.0, 5.0), Quantile(11)], ids=["c51", "qr"])
@pytest.mark.parametrize("dueling", [False, True])
def test_numpy_actor_acts_on_distributional_q_values(dueling, cat):
    """C51 acts on the expected values, QR-DQN on the quantile means, in numpy as in torch."""
    torch.manual_seed(0)
    layers = mlp_layers(6, 4, [32], dueling=dueling, num_atoms=11)
    for p in torch.nn.Sequential(*layers).parameters():
        torch.nn.init.normal_(p, std=0.5)  # spread the distributions
    assert NumpyActor.supports(layers)
    actor = NumpyActor.mirror(torch.nn.Sequential(*layers), cat)
    actor.refresh(0)
    obs = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    with torch.no_grad():
        q = cat.q_values(torch.nn.Sequential(*layers)(torch.from_numpy(obs))).numpy()
    np.testing.assert_allclose(actor.q_values(obs), q, rtol=1e-5, atol=1e-4)
    top2 = np.sort(q, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() > 150 and np.array_equal(actor.greedy(obs)[clear], q.argmax(1)[clear])


@pytest.mark.parametrize("dueling, atoms", [(False, 1), (True, 1), (True, 11)])
def test_numpy_actor_mirrors_noisy_networks_with_noise_on_and_off(dueling, atoms):
    torch.manual_seed(0)
    layers = mlp_layers(6, 4, [32, 16], dueling=dueling, num_atoms=atoms, linear=linear_factory(True))
    net = torch.nn.Sequential(*layers)
    for p in net.parameters():  # large sigmas, so the noise moves Q far beyond float32 rounding
        torch.nn.init.normal_(p, std=0.5)
    cat = Categorical(atoms, -5.0, 5.0) if atoms > 1 else None
    assert NumpyActor.supports(layers) and isinstance(layers[-1], DuelingHead) == dueling
    actor = NumpyActor.mirror(net, cat)
    actor.refresh(0)
    obs = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)

    def torch_q() -> np.ndarray:
        with torch.no_grad():
            out = net(torch.from_numpy(obs))
        return out.numpy() if cat is None else cat.q_values(out).numpy()

    mean_q = torch_q()  # a fresh net: noise off, the mean weights
    np.testing.assert_allclose(actor.q_values(obs), mean_q, rtol=1e-5, atol=1e-4)
    rng = np.random.default_rng(1)
    for _ in range(2):  # each draw is read from the layers' buffers at call time, with no refresh
        for _, m in noisy_modules(net):
            m.resample(rng)
        noisy_q = torch_q()
        assert np.abs(noisy_q - mean_q).max() > 0.1
        np.testing.assert_allclose(actor.q_values(obs), noisy_q, rtol=1e-5, atol=1e-4)
    for _, m in noisy_modules(net):
        m.noise_on = False  # as inside the learner's evaluation_weights
    np.testing.assert_allclose(actor.q_values(obs), mean_q, rtol=1e-5, atol=1e-4)


def test_noisy_convolutional_networks_act_through_torch():
    cnn = q_network_layers((4, 10, 10), 6, NetworkConfig(kind="minatar_cnn", noisy=True))
    assert not NumpyActor.supports(cnn)
