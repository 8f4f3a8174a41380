"""Topology: world / data-parallel / pipeline sizes, this rank's coordinates, sub-communicators.

Built once in the CLI from COMM_WORLD and passed down; library code never touches COMM_WORLD.

Layout for world W and S pipeline stages (dp = W / S pipeline groups)::

    pipeline group g = world ranks [g*S, (g+1)*S)     pp_comm: the S ranks of one group
    stage s of group g = world rank g*S + s           dp_comm: the dp ranks that hold stage s
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpi4py import MPI


@dataclass(frozen=True)
class Layout:
    """Pure arithmetic of the layout (no communicators), unit-testable without MPI."""

    world: int
    pipeline_stages: int = 1

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got {self.world}")
        if self.pipeline_stages < 1:
            raise ValueError(f"parallel.pipeline_stages must be >= 1, got {self.pipeline_stages}")
        if self.world % self.pipeline_stages:
            raise ValueError(
                f"world size {self.world} is not divisible by parallel.pipeline_stages={self.pipeline_stages}"
            )

    @property
    def dp(self) -> int:
        return self.world // self.pipeline_stages

    def stage_of(self, rank: int) -> int:
        return rank % self.pipeline_stages

    def group_of(self, rank: int) -> int:
        return rank // self.pipeline_stages


@dataclass
class Topology:
    """This rank's place in the job plus the communicators each kind of traffic uses."""

    comm: Any  # MPI.Comm: the whole job (world)
    layout: Layout
    dp_comm: Any = field(repr=False)  # ranks holding the same pipeline stage (gradient averaging)
    pp_comm: Any = field(repr=False)  # ranks of one pipeline group (activations)

    @classmethod
    def build(cls, comm: Any, pipeline_stages: int = 1) -> "Topology":
        layout = Layout(comm.Get_size(), pipeline_stages)
        rank = comm.Get_rank()
        if layout.pipeline_stages == 1:
            dp_comm, pp_comm = comm, MPI.COMM_SELF
        else:
            dp_comm = comm.Split(color=layout.stage_of(rank), key=rank)
            pp_comm = comm.Split(color=layout.group_of(rank), key=rank)
        return cls(comm=comm, layout=layout, dp_comm=dp_comm, pp_comm=pp_comm)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pipeline_stages(self) -> int:
        return self.layout.pipeline_stages

    @property
    def stage(self) -> int:
        return self.layout.stage_of(self.rank)

    @property
    def group(self) -> int:
        return self.layout.group_of(self.rank)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"world_size": self.world, "dp": self.dp, "pipeline_stages": self.pipeline_stages}
