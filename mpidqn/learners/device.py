"""Data-parallel learner variants: gradient reduction overlapped with backward, and a CUDA device.

* :class:`BucketReducer` splits the flat gradient buffer into contiguous buckets in REVERSE parameter
  order (the order backward produces gradients) and starts a non-blocking ``Iallreduce`` per bucket
  from ``register_post_accumulate_grad_hook`` as soon as all its gradients are accumulated. Buckets
  are started strictly in index order on every rank (a later bucket that becomes ready first waits
  for the earlier ones), because MPI matches non-blocking collectives by the order they are started
  (DDP's fixed bucket order, for the same reason). ``wait`` finishes them before the optimizer step.
  MPICH progresses non-blocking collectives inside MPI calls: every hook calls ``Testall`` to push
  the outstanding ones along.
* :class:`ExtLearner` is :class:`~mpidqn.learners.data_parallel.Learner` with either or both: overlap, and networks on
  ``cuda:<node-local rank % GPUs>`` (the flat gradient buffer lives on the GPU; MPI reduces a pinned
  host copy of it; replay stays in host memory). THE CUDA PATH IS UNTESTED (no GPU was available).
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
from mpidqn.learners.data_parallel import Hyper, Learner, make_optimizer


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


class BucketReducer:
    """Averages a flat CPU gradient buffer over ``comm`` in buckets started during backward."""

    def __init__(self, flat: torch.Tensor, params: Sequence[nn.Parameter], comm: Any, bucket_bytes: int,
                 stage: Callable[[int, int], np.ndarray] | None = None,
                 unstage: Callable[[int, int], None] | None = None) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self.buf = flat.numpy() if stage is None else None
        self.stage, self.unstage = stage, unstage  # device buffers: copy a slice to / from host memory
        elems = max(1, bucket_bytes // flat.element_size())
        self.buckets = bucket_bounds([p.numel() for p in params], elems)
        self.bucket_of = {i: b for b, (_, _, members) in enumerate(self.buckets) for i in members}
        self.requests: list[Any] = []
        self.pending = np.zeros(len(self.buckets), np.int64)
        self.next_start = 0
        self.handles = []
        if self.size > 1:
            for i, p in enumerate(params):
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            b = self.bucket_of[index]
            self.pending[b] -= 1
            self._start_ready()
            if self.requests:
                MPI.Request.Testall(self.requests)  # drive progress of the started reductions
        return hook

    def arm(self) -> None:
        """Before each backward: every bucket waits for all its gradients again."""
        self.pending[:] = [len(m) for _, _, m in self.buckets]
        self.next_start = 0
        self.requests = []

    def _start_ready(self) -> None:
        while self.next_start < len(self.buckets) and self.pending[self.next_start] == 0:
            lo, hi, _ = self.buckets[self.next_start]
            view = self.buf[lo:hi] if self.stage is None else self.stage(lo, hi)
            self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, view, op=MPI.SUM))
            self.next_start += 1

    def wait(self) -> None:
        """Start buckets whose hooks did not fire (unused parameters), finish all, divide by size."""
        if self.size == 1:
            return
        self.pending[:] = 0
        self._start_ready()
        watchdog.wait_all(self.requests, "gradient allreduce (overlapped)")
        self.requests = []
        for lo, hi, _ in self.buckets:
            if self.stage is None:
                self.buf[lo:hi] *= 1.0 / self.size
            else:
                self.unstage(lo, hi)


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


class ExtLearner(Learner):
    """Learner with overlapped bucketed reduction and/or a CUDA device (see the module docstring)."""

    def __init__(self, online: nn.Module, hyper: Hyper, comm: Any, device: str = "cpu",
                 overlap: bool = False, bucket_bytes: int = 2 << 20) -> None:
        super().__init__(online, hyper, comm)  # on the CPU: parameter broadcast, flat gradient buffer
        dev = torch.device(device)
        if dev.type != "cpu":
            self._to_device(dev)
        self.reducer = None
        if overlap:
            stage = unstage = None
            if dev.type != "cpu":
                stage, unstage = self._stage_slice, self._unstage_slice
            self.reducer = BucketReducer(self.flat_grad, self.params, comm, bucket_bytes, stage, unstage)

    def _to_device(self, dev: torch.device) -> None:
        # module.to keeps the Parameter objects (the optimizer's), but moves their .grad to new
        # tensors: rebuild the flat buffer on the device and point the grads at its views again.
        self.device = dev
        self.online.to(dev)
        self.target.to(dev)
        self.flat_grad = torch.zeros(self.flat_grad.numel(), device=dev)
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.host_grad = torch.zeros(self.flat_grad.numel(), pin_memory=True)
        self.optimizer = make_optimizer(self.params, self.hyper)
        self._loss_sum = torch.zeros((), device=dev)
        self._q_sum = torch.zeros((), device=dev)

    def _stage_slice(self, lo: int, hi: int) -> np.ndarray:
        self.host_grad[lo:hi].copy_(self.flat_grad[lo:hi])  # synchronous: MPI reads it right away
        return self.host_grad[lo:hi].numpy()

    def _unstage_slice(self, lo: int, hi: int) -> None:
        host = self.host_grad[lo:hi]
        host.mul_(1.0 / self.comm.Get_size())
        self.flat_grad[lo:hi].copy_(host, non_blocking=True)

    @torch.no_grad()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        if self.device is None:
            return super().greedy_actions(obs)
        x = torch.from_numpy(np.asarray(obs, dtype=np.float32)).to(self.device)
        return self.online(x).argmax(dim=1).cpu().numpy()

    def backward(self, obs, actions, targets) -> torch.Tensor:
        if self.reducer is not None:
            self.reducer.arm()
        return super().backward(obs, actions, targets)

    def reduce_gradients(self) -> None:
        if self.reducer is None and self.device is None:
            return super().reduce_gradients()
        t0 = time.perf_counter()
        if self.reducer is not None:
            self.reducer.wait()
        elif self.comm.Get_size() > 1:
            self.host_grad.copy_(self.flat_grad)
            C.allreduce_mean_(self.host_grad, self.comm)
            self.flat_grad.copy_(self.host_grad, non_blocking=True)
        self.comm_seconds += time.perf_counter() - t0

    def check_replicas(self) -> None:
        if self.device is None:
            return super().check_replicas()
        params = self.params
        self.params = [p.detach().cpu() for p in params]  # fingerprints read host memory
        try:
            super().check_replicas()
        finally:
            self.params = params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.device is None:
            return state
        return _to_cpu(state)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree


def make_dp_learner(online: nn.Module, hyper: Hyper, cfg: Any, topo: Any) -> Learner:
    """The data-parallel learner for the config: plain Learner unless overlap or a GPU is asked for."""
    try:
        device = select_device(cfg.train.device, local_rank(topo.comm), torch.cuda.is_available(),
                               torch.cuda.device_count())
    except ValueError as e:
        from mpidqn.errors import UserError

        raise UserError(str(e)) from None
    if device == "cpu" and not cfg.parallel.overlap_allreduce:
        return Learner(online, hyper, topo.dp_comm)  # the default path, untouched
    return ExtLearner(online, hyper, topo.dp_comm, device, cfg.parallel.overlap_allreduce,
                      int(cfg.parallel.bucket_mb * (1 << 20)))
