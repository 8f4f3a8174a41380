"""Gradient reduction strategies: how a learner's flat gradient buffer becomes the replicas' mean.

Every learner keeps its gradient in ONE flat buffer (``flat_grad``; the parameters' ``.grad`` are views
of it) and hands it to a :class:`GradientReducer`:

* :class:`FusedReducer`: one blocking Allreduce of the whole CPU buffer after backward (the default).
* :class:`HostStagedReducer`: a device (CUDA) buffer copied to pinned host memory, reduced there,
  copied back.
* :class:`BucketReducer`: buckets of the buffer reduced with non-blocking ``Iallreduce`` started from
  gradient hooks during backward (overlap), on a CPU buffer or staged through host memory.
* :class:`PipelineStageReducer`: the fused Allreduce over the replicas of one pipeline stage, and the
  gradient norm summed over the stages of the pipeline group.

The learner calls ``start(local_bad)`` once its local loss is known and before backward, then
``reduce(local_bad)`` after backward, then ``grad_norm()``. ``local_bad`` says that this rank's loss is
NaN/Inf. THE FINITENESS CONTRACT: after ``reduce`` the buffer holds a non-finite value on every replica
(so ``grad_norm`` is non-finite on every rank that must agree) iff some replica's loss or gradient was
non-finite. A non-finite local gradient carries itself through the sum; a non-finite loss with a
finite gradient (a Huber loss of an infinite target, say) is carried by filling this rank's
contribution with NaN, ALWAYS before the reduction of that part of the buffer starts: never into a
buffer under a pending non-blocking operation, and never before a copy that would overwrite it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpidqn.distributed import collectives as C
from mpidqn.distributed import watchdog


class GradientReducer:
    """Base strategy: no reduction (one replica). Subclasses reduce over ``comm``."""

    def __init__(self, flat: torch.Tensor, comm: Any) -> None:
        self.flat = flat
        self.comm = comm
        self.size = comm.Get_size()
        self.seconds = 0.0  # time spent in the reduction (and the norm, where it is a collective)

    def start(self, local_bad: bool) -> None:
        """After the local loss is known, before backward (overlapping strategies start here)."""

    def reduce(self, local_bad: bool) -> None:
        """Average ``flat`` over the replicas, carrying ``local_bad`` (see the module docstring)."""
        t0 = time.perf_counter()
        if local_bad:
            self.flat.fill_(float("nan"))
        self._reduce()
        self.seconds += time.perf_counter() - t0

    def _reduce(self) -> None:
        pass

    def grad_norm(self) -> float:
        """Norm of the whole network's reduced gradient (the same on every rank that must agree)."""
        return float(self.grad_norm_tensor())

    def grad_norm_tensor(self) -> torch.Tensor:
        """:meth:`grad_norm` as a 0-dim tensor on the buffer's device (nothing read back)."""
        return torch.linalg.vector_norm(self.flat)


class FusedReducer(GradientReducer):
    """One blocking Allreduce of the whole CPU buffer (no packing: the buffer IS the gradients)."""

    def _reduce(self) -> None:
        C.allreduce_mean_(self.flat, self.comm)


class HostStagedReducer(GradientReducer):
    """A device buffer reduced through a pinned host copy (MPI reads host memory)."""

    def __init__(self, flat: torch.Tensor, comm: Any) -> None:
        super().__init__(flat, comm)
        self.host = torch.zeros(flat.numel(), pin_memory=flat.device.type == "cuda")

    def reduce(self, local_bad: bool) -> None:
        if self.size == 1:
            return super().reduce(local_bad)
        t0 = time.perf_counter()
        self.host.copy_(self.flat)
        if local_bad:  # after the copy that would overwrite it
            self.host.fill_(float("nan"))
        C.allreduce_mean_(self.host, self.comm)
        self.flat.copy_(self.host, non_blocking=True)
        self.seconds += time.perf_counter() - t0


class PipelineStageReducer(FusedReducer):
    """Fused Allreduce over the replicas of this pipeline stage (``dp_comm``); the norm for clipping is
    the GLOBAL one, squared stage norms summed over the pipeline group (``pp_comm``), so a NaN/Inf in
    any stage of any group makes it non-finite on every rank of the group."""

    def __init__(self, flat: torch.Tensor, dp_comm: Any, pp_comm: Any) -> None:
        super().__init__(flat, dp_comm)
        self.pp_comm = pp_comm

    def grad_norm(self) -> float:
        t0 = time.perf_counter()
        sq = np.array([float(torch.sum(self.flat.double() ** 2))])
        norm = float(np.sqrt(C.allreduce_array(sq, self.pp_comm, phase="gradient norm")[0]))
        self.seconds += time.perf_counter() - t0
        return norm


def bucket_bounds(sizes: Sequence[int], bucket_elems: int) -> list[tuple[int, int, list[int]]]:
    """Buckets over a flat buffer holding tensors of ``sizes`` back to back, in reverse tensor order.

    Returns (lo, hi, tensor indices) per bucket; a bucket closes once it holds >= ``bucket_elems``
    elements (a tensor is never split). Pure function.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    buckets: list[tuple[int, int, list[int]]] = []
    members: list[int] = []
    hi = int(offsets[-1])
    for i in reversed(range(len(sizes))):
        members.append(i)
        lo = int(offsets[i])
        if hi - lo >= bucket_elems or i == 0:
            buckets.append((lo, hi, members))
            members, hi = [], lo
    return buckets


class BucketReducer(GradientReducer):
    """Buckets of the flat buffer reduced during backward (overlap), on the CPU or staged through host memory.

    The buffer is split into contiguous buckets in REVERSE parameter order (the order backward
    produces gradients); a non-blocking ``Iallreduce`` per bucket starts from
    ``register_post_accumulate_grad_hook`` as soon as all its gradients are accumulated. Buckets start
    strictly in index order on every rank (a later bucket that becomes ready first waits for the
    earlier ones), because MPI matches non-blocking collectives by the order they are started (DDP's
    fixed bucket order, for the same reason). MPICH progresses non-blocking collectives inside MPI
    calls: every hook calls ``Testall`` to push the outstanding ones along. ``reduce`` starts buckets
    whose hooks did not fire (unused parameters), waits for all, and only then touches the buffer.

    A non-finite local loss is known before backward (``start``): each bucket is then filled with NaN
    right before its reduction starts, so the poison travels with the sum and nothing writes into a
    bucket under a pending ``Iallreduce`` (or into a device slice after it was staged).
    """

    def __init__(self, flat: torch.Tensor, params: Sequence[nn.Parameter], comm: Any, bucket_bytes: int,
                 staged: bool | None = None) -> None:
        super().__init__(flat, comm)
        self.staged = flat.device.type != "cpu" if staged is None else staged  # staged=True: tests on the CPU
        self.host = torch.zeros(flat.numel(), pin_memory=flat.device.type == "cuda") if self.staged else flat
        self.buf = self.host.numpy()
        elems = max(1, bucket_bytes // flat.element_size())
        self.buckets = bucket_bounds([p.numel() for p in params], elems)
        self.bucket_of = {i: b for b, (_, _, members) in enumerate(self.buckets) for i in members}
        self.requests: list[Any] = []
        self.pending = np.zeros(len(self.buckets), np.int64)
        self.next_start = 0
        self.poison = False
        self.handles = []
        if self.size > 1:
            for i, p in enumerate(params):
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            self.pending[self.bucket_of[index]] -= 1
            self._start_ready()
            if self.requests:
                MPI.Request.Testall(self.requests)  # drive progress of the started reductions
        return hook

    def start(self, local_bad: bool) -> None:
        """Before each backward: every bucket waits for all its gradients again."""
        if self.requests:  # never re-arm under pending reductions (a backward without reduce)
            watchdog.wait_all(self.requests, "gradient allreduce (overlapped)")
        self.pending[:] = [len(m) for _, _, m in self.buckets]
        self.next_start = 0
        self.requests = []
        self.poison = local_bad

    def _start_ready(self) -> None:
        while self.next_start < len(self.buckets) and self.pending[self.next_start] == 0:
            lo, hi, _ = self.buckets[self.next_start]
            if self.staged:
                self.host[lo:hi].copy_(self.flat[lo:hi])  # synchronous: MPI reads it right away
            view = self.buf[lo:hi]
            if self.poison:
                view[:] = np.nan
            self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, view, op=MPI.SUM))
            self.next_start += 1

    def reduce(self, local_bad: bool) -> None:
        if self.size == 1:
            return super().reduce(local_bad)
        if local_bad and not self.poison:
            raise RuntimeError("BucketReducer: a non-finite loss must be passed to start() before backward")
        t0 = time.perf_counter()
        self.pending[:] = 0
        self._start_ready()
        watchdog.wait_all(self.requests, "gradient allreduce (overlapped)")
        self.requests = []
        for lo, hi, _ in self.buckets:
            self.buf[lo:hi] *= 1.0 / self.size
            if self.staged:
                self.flat[lo:hi].copy_(self.host[lo:hi], non_blocking=True)
        self.seconds += time.perf_counter() - t0


def make_reducer(flat: torch.Tensor, params: Sequence[nn.Parameter], comm: Any, overlap: bool = False,
                 bucket_bytes: int = 2 << 20) -> GradientReducer:
    """The data-parallel strategy for a buffer: overlapped buckets, host-staged (device buffer) or fused."""
    if overlap:
        return BucketReducer(flat, params, comm, bucket_bytes)
    if flat.device.type != "cpu":
        return HostStagedReducer(flat, comm)
    return FusedReducer(flat, comm)
