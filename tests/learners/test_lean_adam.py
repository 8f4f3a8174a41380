"""The Adam step the learners use (functional, on state lists gathered once) is torch's Adam.step bit for bit."""
from __future__ import annotations

import copy

import torch

from mpidqn.learners.optim import Hyper, make_optimizer, set_optimizer_lr


def test_lean_adam_step_equals_torch_adam_through_lr_changes_and_a_reload():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ref = copy.deepcopy(net)
    ours = make_optimizer(list(net.parameters()), Hyper(lr=1e-2, adam_eps=1e-6))
    theirs = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-6, fused=True)
    for it in range(30):
        x = torch.randn(8, 5)
        for model, opt in ((net, ours), (ref, theirs)):
            opt.zero_grad(set_to_none=False) if it else None
            model(x).pow(2).mean().backward()
            opt.step()
        if it == 10:
            for opt in (ours, theirs):
                set_optimizer_lr(opt, 3e-3)
        if it == 20:  # a checkpoint round trip replaces the state tensors: the step must follow them
            ours.load_state_dict(copy.deepcopy(ours.state_dict()))
        for a, b in zip(net.parameters(), ref.parameters()):
            assert torch.equal(a, b), it
    assert ours.state_dict()["state"][0]["step"] == theirs.state_dict()["state"][0]["step"] == 30
