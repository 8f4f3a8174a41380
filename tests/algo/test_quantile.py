"""QR-DQN's pure functions (mpidqn/algo/quantile.py): the quantile Huber loss against a loop over
Dabney et al.'s definition, its hand-written gradient against autograd of the unfused loss, the targets,
and that minimising the loss puts each atom at its quantile of the target samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpidqn.algo.categorical import distribution_from_config
from mpidqn.algo.quantile import Quantile, quantile_huber_loss, quantile_huber_loss_and_grad
from mpidqn.config import NetworkConfig


def _reference_row(theta: np.ndarray, target: np.ndarray, kappa: float) -> float:
    """sum_i mean_j |tau_i - 1{u_ij < 0}| huber_kappa(u_ij) / kappa, u_ij = target_j - theta_i, in loops."""
    n = len(theta)
    total = 0.0
    for i in range(n):
        tau = (2 * i + 1) / (2 * n)
        acc = 0.0
        for t in target:
            u = t - theta[i]
            huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
            acc += abs(tau - (1.0 if u < 0 else 0.0)) * huber / kappa
        total += acc / len(target)
    return total


@pytest.mark.parametrize("kappa", [1.0, 0.3, 5.0])
def test_quantile_huber_loss_matches_the_definition_and_weights(kappa):
    rng = np.random.default_rng(0)
    theta = rng.normal(scale=2.0, size=(7, 9))
    target = rng.normal(scale=2.0, size=(7, 13))  # N' may differ from N
    loss, per_row = quantile_huber_loss(torch.tensor(theta), torch.tensor(target), kappa)
    expected = np.array([_reference_row(theta[r], target[r], kappa) for r in range(7)])
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=1e-10)
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-10)
    w = rng.random(7)
    weighted, _ = quantile_huber_loss(torch.tensor(theta), torch.tensor(target), kappa, torch.tensor(w))
    assert weighted.item() == pytest.approx((w * expected).sum(), rel=1e-10)


def _unfused(theta: torch.Tensor, target: torch.Tensor, kappa: float, w: torch.Tensor | None) -> torch.Tensor:
    """The loss in plain torch operations (the definition, Huber's two branches), for autograd to differentiate."""
    u = target.unsqueeze(1) - theta.unsqueeze(2)
    huber = torch.where(u.abs() <= kappa, 0.5 * u * u, kappa * (u.abs() - 0.5 * kappa))
    tau = ((torch.arange(theta.shape[1], dtype=theta.dtype) + 0.5) / theta.shape[1]).view(1, -1, 1)
    rows = ((tau - (u.detach() < 0).to(u.dtype)).abs() * huber).mean(dim=2).sum(dim=1) / kappa
    return rows.mean() if w is None else (w * rows).sum()


@pytest.mark.parametrize("weighted", [False, True])
def test_hand_written_gradient_equals_autograd_of_the_unfused_loss(weighted):
    rng = np.random.default_rng(1)
    theta = torch.tensor(rng.normal(scale=2.0, size=(6, 11)), requires_grad=True)
    target = torch.tensor(rng.normal(scale=2.0, size=(6, 9)))
    w = torch.tensor(rng.random(6)) if weighted else None
    (want,) = torch.autograd.grad(_unfused(theta, target, 0.8, w), theta)
    loss, per_row, grad = quantile_huber_loss_and_grad(theta.detach(), target, 0.8, w)
    torch.testing.assert_close(grad, want)
    torch.testing.assert_close(loss, _unfused(theta, target, 0.8, w).detach())
    # the autograd path (networks without the hand-written kernel) takes the same loss and gradient
    auto_loss, auto_rows = quantile_huber_loss(theta, target, 0.8, w)
    (auto_grad,) = torch.autograd.grad(3.0 * auto_loss, theta)
    torch.testing.assert_close(auto_grad, 3.0 * want)
    torch.testing.assert_close((auto_loss.detach(), auto_rows), (loss, per_row))
    assert not auto_rows.requires_grad  # prioritized replay reads it; no gradient flows through it


def test_loss_and_grad_out_puts_the_gradient_on_the_taken_actions_atoms():
    q = Quantile(4, 1.5)
    out = torch.randn(5, 3 * 4, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([2, 0, 1, 2, 0])
    target = torch.randn(5, 4, dtype=torch.float64)
    (want,) = torch.autograd.grad(_unfused(q.taken(out, actions), target, 1.5, None), out)
    loss, _, grad = q.loss_and_grad_out(out.detach(), actions, target)
    torch.testing.assert_close(grad, want)
    torch.testing.assert_close(loss, q.loss(q.taken(out.detach(), actions), target)[0])


def test_targets_shift_the_chosen_actions_quantiles_and_stop_at_terminal_rows():
    q = Quantile(4)
    # rows x (actions * atoms): action 1 has the greater mean under the target net, action 0 under the online
    nxt_target = torch.tensor([[0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0]] * 2)
    nxt_online = torch.tensor([[9.0, 9.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    r, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    torch.testing.assert_close(q.targets(r, d, nxt_target), torch.tensor([[3.5] * 4, [2.0] * 4]))
    torch.testing.assert_close(q.targets(r, d, nxt_target, nxt_online), torch.tensor([[1.0, 1.5, 2.0, 2.5], [2.0] * 4]))
    torch.testing.assert_close(q.q_values(nxt_target), torch.tensor([[1.5, 5.0]] * 2))


def test_minimising_the_loss_puts_each_atom_at_its_quantile():
    """The point of QR-DQN: gradient descent on the loss moves atom i to the tau_i-quantile of the
    target samples (here a skewed distribution, so quantiles and a mean fit differ)."""
    rng = np.random.default_rng(2)
    samples = torch.tensor(rng.exponential(scale=2.0, size=(1, 4000)))
    theta = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        quantile_huber_loss(theta, samples, 0.01)[0].backward()
        opt.step()
    want = np.quantile(samples.numpy()[0], (np.arange(5) + 0.5) / 5)
    np.testing.assert_allclose(theta.detach().numpy()[0], want, atol=0.05)


def test_config_picks_the_head():
    assert distribution_from_config(NetworkConfig()) is None
    assert distribution_from_config(NetworkConfig(distributional=True)).num_atoms == 51  # C51 by default
    qr = distribution_from_config(NetworkConfig(distributional=True, distribution="qr", num_atoms=8, kappa=0.5))
    assert qr == Quantile(8, 0.5)
