from __future__ import annotations

import pytest
from mpi4py import MPI

from mpidqn.distributed.topology import Layout, Topology


def test_layout_arithmetic():
    lay = Layout(8, 2)
    assert lay.dp == 4
    assert [lay.stage_of(r) for r in range(8)] == [0, 1] * 4
    assert [lay.group_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_layout_rejects_indivisible_world_with_numbers():
    with pytest.raises(ValueError, match="world size 6 is not divisible by parallel.pipeline_stages=4"):
        Layout(6, 4)
    with pytest.raises(ValueError):
        Layout(2, 0)


def test_topology_on_comm_self():
    topo = Topology.build(MPI.COMM_SELF)
    assert (topo.world, topo.dp, topo.stage, topo.rank, topo.is_root) == (1, 1, 0, 0, True)
