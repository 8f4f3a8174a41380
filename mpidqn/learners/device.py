"""Where a data-parallel learner runs (CPU or ``cuda:<node-local rank % GPUs>``) and how it reduces.

The device learner and the overlapped reduction are no classes of their own: :class:`Learner` takes a
device, and the reduction strategies live in :mod:`mpidqn.learners.reducers`. The CUDA path is tested
by ``tests/learners/test_cuda.py`` where a GPU is visible (last run on an H200, 2026-11-26, before
skip-or-take moved to the device and the batch copy to pinned memory).
"""
from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from mpidqn.errors import UserError
from mpidqn.learners.data_parallel import Hyper, Learner


def local_rank(comm: Any) -> int:
    """Rank among the processes of ``comm`` on this node (MPI_COMM_TYPE_SHARED)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def select_device(preference: str, local: int, cuda_available: bool, device_count: int) -> str:
    """"cpu" or "cuda:<local % device_count>" for ``train.device`` (auto, cpu, cuda). Pure function."""
    if preference == "cpu" or (preference == "auto" and not (cuda_available and device_count > 0)):
        return "cpu"
    if not cuda_available or device_count < 1:
        raise ValueError("train.device: cuda was requested but torch.cuda.is_available() is false")
    return f"cuda:{local % device_count}"


def make_dp_learner(online: nn.Module, hyper: Hyper, cfg: Any, topo: Any) -> Learner:
    """The data-parallel learner for the config: its device, and overlapped or fused reduction."""
    try:
        device = select_device(cfg.train.device, local_rank(topo.comm), torch.cuda.is_available(),
                               torch.cuda.device_count())
    except ValueError as e:
        raise UserError(str(e)) from None
    return Learner(online, hyper, topo.dp_comm, device, cfg.parallel.overlap_allreduce,
                   int(cfg.parallel.bucket_mb * (1 << 20)), cfg.train.mlp_kernel)
