"""train.compile_network: the update's forward and backward through ``torch.compile(online)``."""
from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpidqn.config import ConfigError, load_config
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers


def _learner(compiled: bool) -> Learner:
    torch.manual_seed(0)
    return Learner(torch.nn.Sequential(*mlp_layers(4, 3, [32, 32])), Hyper(lr=1e-2, compile_network=compiled),
                   MPI.COMM_SELF)


def test_compiled_update_matches_the_eager_one_and_fills_the_flat_gradient():
    eager, compiled = _learner(False), _learner(True)
    assert eager._kernel is not None and compiled._kernel is None  # compiling replaces the MLP kernel
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, t = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
        a = torch.randint(0, 3, (16,), generator=g)
        le, lc = eager.backward(x, a, t), compiled.backward(x, a, t)
        assert float(lc) == pytest.approx(float(le), rel=1e-5)
        assert compiled.flat_grad.abs().max() > 0  # backward accumulated into the views of the flat buffer
        assert torch.allclose(compiled.flat_grad, eager.flat_grad, rtol=1e-4, atol=1e-6)
        eager.step()
        compiled.step()
    assert all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(eager.params, compiled.params))
    empty = compiled.backward(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.numel() == 1 and compiled.flat_grad.abs().max() == 0  # a rank with no rows: eager, no gradient


@pytest.mark.parametrize("other, message", [
    ("parallel.pipeline_stages=2", "applies to data parallelism only"),
    ("parallel.overlap_allreduce=true", "cannot be combined with parallel.overlap_allreduce"),
])
def test_layouts_it_does_not_serve_are_refused_naming_the_key(other, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.compile_network=true", other])
    assert str(e.value).startswith("train.compile_network") and message in str(e.value)
