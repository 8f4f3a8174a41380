"""The layer partition and micro-batch arithmetic of the pipeline (pure functions, no MPI), and a
one-stage PipelineLearner on MPI.COMM_SELF against the plain learner."""
from __future__ import annotations

import pytest
import torch

from mpidqn.nn.mlp import mlp_layers
from mpidqn.distributed.pipeline import FREE_LAYER_COST, boundary_shapes, layer_costs, partition_layers, split_sizes
from mpidqn.learners.pipeline import stage_module


def stage_costs(costs, ranges):
    return [sum(costs[a:b]) for a, b in ranges]


def test_equal_costs_split_evenly():
    assert partition_layers([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition_layers([1, 1, 1, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert partition_layers([1, 1, 1], 1) == [(0, 3)]


def test_uneven_costs_minimise_the_largest_stage():
    assert partition_layers([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert partition_layers([1, 2, 3, 4, 5], 2) == [(0, 3), (3, 5)]  # 6 | 9 beats 10 | 5
    costs = [7, 2, 5, 10, 8, 1, 1, 6]
    ranges = partition_layers(costs, 3)
    # exhaustive check: no contiguous 3-partition has a smaller maximum
    best = min(max(sum(costs[:i]), sum(costs[i:j]), sum(costs[j:]))
               for i in range(1, len(costs)) for j in range(i + 1, len(costs)))
    assert max(stage_costs(costs, ranges)) == best == 16


def test_ranges_are_contiguous_non_empty_and_cover_all_layers():
    costs = [3, 0.001, 9, 0.001, 9, 0.001, 2]
    for stages in range(1, len(costs) + 1):
        ranges = partition_layers(costs, stages)
        assert len(ranges) == stages
        assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
        assert all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(stages - 1))


def test_parameter_free_layers_cost_epsilon_and_follow_the_balance():
    layers = mlp_layers(4, 2, [64, 64])  # Flatten, Linear, ReLU, Linear, ReLU, Linear
    costs = layer_costs(layers)
    assert costs[0] == costs[2] == costs[4] == FREE_LAYER_COST
    assert costs[3] == 64 * 64 + 64
    ranges = partition_layers(costs, 2)
    assert ranges == [(0, 3), (3, 6)]  # the big middle Linear goes with the small head


def test_explicit_split_points_override_the_balance():
    assert partition_layers([100, 1, 1, 1], 2, [3]) == [(0, 3), (3, 4)]
    assert partition_layers([1] * 6, 3, [1, 5]) == [(0, 1), (1, 5), (5, 6)]


@pytest.mark.parametrize("points, match", [
    ([2, 2], r"strictly increasing layer indices in \[1, 5\] \(the network has 6 layers\)"),
    ([3, 1], "strictly increasing"),
    ([0, 3], "strictly increasing"),
    ([2, 6], "strictly increasing"),
    ([2], r"3 stages need 2 split point\(s\), got 1"),
])
def test_bad_split_points_are_rejected_naming_the_numbers(points, match):
    with pytest.raises(ValueError, match=match):
        partition_layers([1] * 6, 3, points)


def test_more_stages_than_layers_is_rejected():
    with pytest.raises(ValueError, match="7 pipeline stages but the network has only 6 layers"):
        partition_layers([1] * 6, 7)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        partition_layers([1] * 6, 0)


def test_split_sizes():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 8) == [1, 1, 1]
    assert split_sizes(0, 4) == [0]
    assert sum(split_sizes(1001, 7)) == 1001


def test_stages_keep_global_parameter_names_and_compose_to_the_full_network():
    torch.manual_seed(0)
    layers = mlp_layers(5, 3, [16, 16], dueling=True)
    full = torch.nn.Sequential(*layers)
    ranges = partition_layers(layer_costs(layers), 3)
    stages = [stage_module(layers, a, b) for a, b in ranges]
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert names == [n for n, _ in full.named_parameters()]
    x = torch.randn(4, 5)
    y = x
    for s in stages:
        y = s(y)
    assert torch.equal(y, full(x))
    shapes = boundary_shapes(layers, (5,), ranges)
    assert len(shapes) == 4 and shapes[0] == (5,) and shapes[-1] == (3,)


def test_one_stage_pipeline_with_rmsprop_matches_the_plain_learner():
    """Same updates as Learner with train.optimizer=rmsprop; the optimizer hparams it records (also those
    a parameter-free stage records from a throw-away optimizer) are RMSprop's."""
    import numpy as np
    from mpi4py import MPI

    from mpidqn.learners.data_parallel import Hyper, Learner
    from mpidqn.learners.pipeline import PipelineLearner
    from mpidqn.replay.shard import Batch

    def layers():
        torch.manual_seed(5)
        return mlp_layers(4, 3, [16, 8], dueling=True)

    hyper = Hyper(lr=1e-2, optimizer="rmsprop", max_grad_norm=0.5, target_update_interval=2, sync_check_interval=1)
    pipe = PipelineLearner(layers(), (4,), hyper, MPI.COMM_SELF, MPI.COMM_SELF, micro_batches=3)
    ref = Learner(torch.nn.Sequential(*layers()), hyper, MPI.COMM_SELF)
    rng = np.random.default_rng(1)
    for _ in range(3):
        rows = 2 * 10
        b = Batch(rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(3, size=rows),
                  rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, 4)).astype(np.float32),
                  np.full(rows, 0.99, np.float32))
        pipe.update_many(b, 2)
        ref.update_many(b, 2)
    for (name, p), q in zip(pipe.online.named_parameters(), ref.params):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    hparams = pipe.state_dict()["optimizer_hparams"].value
    assert hparams == ref.state_dict()["optimizer_hparams"].value
    assert (hparams["alpha"], hparams["eps"], hparams["centered"]) == (0.95, 0.01, True)
    pipe.optimizer = None  # as on a stage of parameter-free layers
    assert pipe.state_dict()["optimizer_hparams"].value == hparams
