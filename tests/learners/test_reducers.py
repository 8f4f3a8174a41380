"""Gradient reduction strategies (learners/reducers.py) and the learner interface, on an MLP or the
MinAtar CNN's layers (no Atari or MinAtar environment needed)."""
from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from conftest import MPI_SCRIPTS, mpirun
from mpidqn.learners.base import QLearner
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.device import select_device
from mpidqn.learners.pipeline import PipelineLearner
from mpidqn.learners.reducers import BucketReducer, FusedReducer, bucket_bounds, make_reducer
from mpidqn.nn.mlp import mlp_layers


def test_bucket_bounds_reverse_order_cover_everything():
    b = bucket_bounds([10, 5, 7, 3], 8)
    assert [m for _, _, m in b] == [[3, 2], [1, 0]]
    assert b[0][:2] == (15, 25) and b[-1][0] == 0
    assert bucket_bounds([4], 100) == [(0, 4, [0])]


def test_device_selection():
    assert select_device("auto", 3, False, 0) == "cpu"
    assert select_device("cpu", 3, True, 2) == "cpu"
    assert select_device("auto", 3, True, 2) == "cuda:1"
    assert select_device("cuda", 4, True, 4) == "cuda:0"
    with pytest.raises(ValueError, match="cuda"):
        select_device("cuda", 0, False, 0)


def test_learners_are_qlearners_with_lr_and_total_parameters():
    torch.manual_seed(0)
    learner = Learner(torch.nn.Sequential(*mlp_layers(4, 2, [8])), Hyper(lr=1e-3), MPI.COMM_SELF, overlap=True)
    assert isinstance(learner, QLearner) and isinstance(learner.reducer, BucketReducer)
    assert learner.total_parameters == 4 * 8 + 8 + 8 * 2 + 2
    learner.set_lr(5e-4)
    assert learner.lr == 5e-4 == learner.optimizer.param_groups[0]["lr"]
    assert not learner.greedy_policy().collective
    pipe = PipelineLearner(mlp_layers(4, 2, [8]), (4,), Hyper(lr=1e-3), MPI.COMM_SELF, MPI.COMM_SELF)
    assert isinstance(pipe, QLearner) and pipe.greedy_policy().collective and pipe.total_parameters == 58
    assert isinstance(make_reducer(torch.zeros(3), [], MPI.COMM_SELF), FusedReducer)


def test_one_replica_nonfinite_loss_is_skipped_by_every_strategy():
    """With one rank there is no reduction to carry the poison: the reducer still makes the norm non-finite
    (an infinite Huber loss has a finite gradient)."""
    for overlap in (False, True):
        torch.manual_seed(0)
        learner = Learner(torch.nn.Sequential(*mlp_layers(3, 2, [8])), Hyper(lr=1e-2), MPI.COMM_SELF, overlap=overlap)
        x = torch.randn(4, 3)
        targets = learner.targets(torch.ones(4), x, torch.full((4,), 0.9))
        targets[0] = float("inf")
        learner.backward(x, torch.zeros(4, dtype=torch.long), targets)
        learner.reduce_gradients()
        learner.step()
        assert (learner.updates, learner.nonfinite_skipped) == (0, 1)


@pytest.mark.mpi
def test_overlapped_buckets_equal_fused_on_the_minatar_cnn_at_two_ranks():
    p = mpirun(2, [str(MPI_SCRIPTS / "overlap_grads.py")], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("overlap == fused") == 2


@pytest.mark.mpi
def test_every_strategy_equals_fused_and_agrees_on_a_nonfinite_loss_at_two_ranks():
    p = mpirun(2, [str(MPI_SCRIPTS / "reducers.py")], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for line in ("every strategy == fused", "every strategy agrees to skip", "every strategy agrees to stop"):
        assert p.stdout.count(line) == 2, p.stdout
