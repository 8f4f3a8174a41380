"""C51's pure functions: the categorical projection against a brute-force reference, the loss and its
hand-written gradient against autograd of the unfused cross-entropy, the targets' action choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpidqn.algo.categorical import (Categorical, categorical_loss, categorical_loss_grad,
                                     project_distribution)


def brute_force_projection(rewards, discounts, probs, support):
    """Bellemare et al. 2017, Algorithm 1 written as Dopamine's projection: every shifted atom gives each
    support atom ``p * clip(1 - |Tz - z_j| / dz, 0, 1)``, atom by atom in float64 loops."""
    rows, atoms = probs.shape
    v_min, v_max = support[0], support[-1]
    dz = (v_max - v_min) / (atoms - 1)
    out = np.zeros((rows, atoms))
    for i in range(rows):
        for k in range(atoms):
            tz = min(max(rewards[i] + discounts[i] * support[k], v_min), v_max)
            for j in range(atoms):
                out[i, j] += probs[i, k] * min(max(1.0 - abs(tz - support[j]) / dz, 0.0), 1.0)
    return out


@pytest.mark.parametrize("atoms, v_min, v_max", [(51, -10.0, 10.0), (11, -3.0, 7.0), (2, 0.0, 1.0)])
def test_projection_matches_brute_force_with_terminals_and_n_step_discounts(atoms, v_min, v_max):
    rng = np.random.default_rng(atoms)
    rows, gamma = 24, 0.99
    n = rng.integers(1, 6, size=rows)  # n-step transitions of different lengths: discount gamma ** n
    terminal = rng.random(rows) < 0.3
    discounts = np.where(terminal, 0.0, gamma ** n)
    rewards = rng.normal(scale=4.0, size=rows)
    rewards[:3] = [v_max + 5.0, v_min - 5.0, v_min + (v_max - v_min) / (atoms - 1)]  # clipped, clipped, on an atom
    logits = rng.normal(size=(rows, atoms))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    support = np.linspace(v_min, v_max, atoms)
    got = project_distribution(torch.tensor(rewards, dtype=torch.float32), torch.tensor(discounts, dtype=torch.float32),
                               torch.tensor(probs, dtype=torch.float32), torch.linspace(v_min, v_max, atoms))
    want = brute_force_projection(rewards, discounts, probs, support)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, atol=1e-5)  # mass is conserved
    assert (got >= 0).all()
    # a terminal row is the reward alone: all mass on the (at most two) atoms around the clipped reward
    for i in np.flatnonzero(terminal):
        assert (got[i] > 1e-6).sum() <= 2
        mean = float((got[i] * torch.linspace(v_min, v_max, atoms)).sum())
        assert mean == pytest.approx(min(max(rewards[i], v_min), v_max), abs=1e-4)


def test_projection_of_an_identity_shift_keeps_the_distribution():
    support = torch.linspace(-5, 5, 21)
    probs = torch.softmax(torch.randn(4, 21), dim=1)
    out = project_distribution(torch.zeros(4), torch.ones(4), probs, support)
    torch.testing.assert_close(out, probs)


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_and_gradient_match_autograd_of_the_unfused_reference(weighted):
    torch.manual_seed(0)
    logits = torch.randn(16, 51, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(16, 51, dtype=torch.float64), dim=1)
    weights = torch.rand(16, dtype=torch.float64) / 16 if weighted else None
    ref_rows = -(target * torch.log(torch.softmax(logits, dim=1))).sum(dim=1)  # unfused
    ref = (weights * ref_rows).sum() if weighted else ref_rows.mean()
    (ref_grad,) = torch.autograd.grad(ref, logits)
    loss, rows = categorical_loss(logits, target, weights)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(rows, ref_rows.detach())
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(categorical_loss_grad(logits.detach(), target, weights), ref_grad)


def test_loss_and_grad_out_puts_the_gradient_on_the_taken_actions_atoms():
    cat = Categorical(5, -1.0, 1.0)
    out = torch.randn(6, 3 * 5, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([0, 2, 1, 1, 0, 2])
    target = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    loss, rows = categorical_loss(cat.taken(out, actions), target)
    (want,) = torch.autograd.grad(loss, out)
    got_loss, got_rows, got_grad = cat.loss_and_grad_out(out.detach(), actions, target)
    torch.testing.assert_close(got_grad, want)
    torch.testing.assert_close((got_loss, got_rows), (loss.detach(), rows.detach()))


@pytest.mark.parametrize("double", [False, True])
def test_targets_bootstrap_from_the_action_of_greatest_expected_value(double):
    cat = Categorical(3, -1.0, 1.0)
    big = 8.0
    # target net: action 0 sure of +1, action 1 sure of -1; online net prefers action 1
    next_target = torch.tensor([[-big, -big, big, big, -big, -big]])
    next_online = torch.tensor([[big, -big, -big, -big, -big, big]])
    y = cat.targets(torch.zeros(1), torch.ones(1), next_target, next_online if double else None)
    expected = (cat.support() * y[0]).sum()
    assert expected == pytest.approx(-1.0 if double else 1.0, abs=1e-3)
    torch.testing.assert_close(cat.q_values(next_target), torch.tensor([[1.0, -1.0]]), atol=1e-3, rtol=0)


def test_categorical_rejects_an_empty_support():
    with pytest.raises(ValueError, match="num_atoms"):
        Categorical(1, -1.0, 1.0)
    with pytest.raises(ValueError, match="v_min"):
        Categorical(51, 1.0, 1.0)
