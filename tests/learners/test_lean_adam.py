"""The Adam the learners use (LeanAdam: torch's functional fused Adam, no torch.optim.Optimizer) steps,
saves and loads as torch's Adam does, bit for bit, and a learner built on it does not import torch._dynamo."""
from __future__ import annotations

import copy
import subprocess
import sys

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
            for p in model.parameters() if it else ():
                p.grad.zero_()  # in place, as the learners' flat gradient buffer is
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


def _pair(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ref = copy.deepcopy(net)
    return (net, make_optimizer(list(net.parameters()), Hyper(lr=1e-2, adam_eps=1e-6))), \
        (ref, torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-6, fused=True))


def _steps(pairs, n, found_inf=None):
    for _ in range(n):
        x = torch.randn(8, 5)
        for model, opt in pairs:
            for p in model.parameters():
                p.grad = None
            model(x).pow(2).mean().backward()
            opt.found_inf = found_inf
            opt.step()


def test_lean_adam_saves_what_torch_adam_saves_and_each_loads_the_others_state():
    """Checkpoints written by torch's Adam (before LeanAdam) resume bit-identically, and the other way."""
    ours, theirs = _pair()
    _steps([ours, theirs], 5)
    a, b = ours[1].state_dict(), theirs[1].state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]) and a["state"][i][k].dtype == b["state"][i][k].dtype
    # swap: each optimizer continues from the other's state (and parameters)
    (net, lean), (ref, adam) = ours, theirs
    lean.load_state_dict(copy.deepcopy(b))
    adam.load_state_dict(copy.deepcopy(a))
    _steps([(net, lean), (ref, adam)], 5)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))
    assert float(lean.state_dict()["state"][0]["step"]) == 10


def test_lean_adam_skips_the_step_on_found_inf_as_torch_adam_does():
    ours, theirs = _pair(1)
    _steps([ours, theirs], 3)
    _steps([ours, theirs], 2, found_inf=torch.ones(()))  # skipped: parameters, moments and step count stay
    _steps([ours, theirs], 2, found_inf=torch.zeros(()))
    assert all(torch.equal(p, q) for p, q in zip(ours[0].parameters(), theirs[0].parameters()))
    assert float(ours[1].state[next(ours[0].parameters())]["step"]) == 5


def test_an_adam_learner_trains_saves_and_loads_without_importing_torch_dynamo():
    """torch's optimizers import torch._dynamo when built, stepped or saved: ~1.3 s of every rank's start."""
    code = """
import sys, torch
from mpi4py import MPI
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
learner = Learner(torch.nn.Sequential(*mlp_layers(4, 2, [8])), Hyper(sync_check_interval=0), MPI.COMM_SELF)
obs = torch.randn(16, 4)
learner.backward(obs, torch.randint(2, (16,)), learner.targets(torch.zeros(16), obs, torch.full((16,), 0.9)))
learner.reduce_gradients()
learner.step()
learner.load_state_dict(learner.state_dict())
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
