"""The test-only fault seam (mpidqn/train/faults.py) on its own: parsing, the named points, and the
NaN and perturb faults applied from outside a learner. The faults in real runs: test_faults.py."""
from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
import torch

from mpidqn.train import faults


@pytest.fixture(autouse=True)
def disarmed(monkeypatch):
    monkeypatch.delenv("MPIDQN_FAULT", raising=False)
    yield
    faults.install("")


def test_unset_is_disarmed_and_every_point_is_a_no_op():
    assert faults.install() is None
    for where in ("step", "checkpoint", "rank_file"):
        faults.point(where, 0, 10**9)


def test_spec_from_the_environment_and_unknown_kinds(monkeypatch):
    monkeypatch.setenv("MPIDQN_FAULT", "kill:1:1000")
    assert faults.install() == faults.Fault("kill", 1, 1000)
    with pytest.raises(ValueError, match="unknown kind 'oops'"):
        faults.install("oops:1:1")


def test_a_fault_fires_only_at_its_point_on_its_rank_from_its_step():
    faults.install("raise:1:100")
    faults.point("step", 0, 200)  # another rank
    faults.point("step", 1, 99)  # too early
    faults.point("checkpoint", 1, 200)  # another point
    with pytest.raises(RuntimeError, match="injected fault"):
        faults.point("step", 1, 100)


def test_enospc_fails_the_rank_file_and_leaves_nothing_behind(tmp_path):
    faults.install("enospc:0:5")
    faults.point("rank_file", 0, 4, path=tmp_path / "rank_00000.h5")
    with pytest.raises(OSError) as e:
        faults.point("rank_file", 0, 5, path=tmp_path / "rank_00000.h5")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "rank_00000.h5")
    assert list(tmp_path.iterdir()) == []


def test_nan_poisons_the_loss_forward_only_and_perturb_fires_once():
    torch.manual_seed(0)
    learner = SimpleNamespace(online=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))
    x = torch.ones(4, 3)
    faults.install("nan:0:10")
    faults.point("step", 0, 10, learner=learner)
    faults.point("step", 0, 11, learner=learner)  # from then on; the hook is installed once
    assert len(learner.online._forward_hooks) == 1
    loss = learner.online(x).pow(2).mean()
    loss.backward()
    assert torch.isnan(loss) and all(torch.isnan(p.grad).all() for p in learner.online.parameters())
    with torch.no_grad():  # acting and TD targets are untouched
        assert torch.isfinite(learner.online(x)).all()

    weight = learner.online[1].weight
    before = weight.detach().clone()
    faults.install("perturb:0:10")
    faults.point("step", 0, 10, learner=learner)
    faults.point("step", 0, 11, learner=learner)
    diff = (weight.detach() - before).view(-1)
    assert diff[0] == pytest.approx(1e-3) and (diff[1:] == 0).all()
