"""Pipeline parallelism: the layer partition (pure), stage-to-stage links, the GPipe micro-batch schedule.

A pipeline group is ``pp_comm`` (S ranks); group rank s holds stage s, i.e. the contiguous layers
``[start, end)`` of the Q-network. Activations travel forward s -> s+1 and their gradients backward
s+1 -> s as contiguous float32 buffers (mpi4py buffer API, never pickle). Shapes are known on both
sides in advance (per-sample boundary shapes from a dry run of the layer list, micro-batch sizes
from the batch size), so no shape ever travels.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mpidqn.distributed import watchdog

# Cost of a parameter-free layer (Flatten, activation): tiny but positive, so ties between otherwise
# equal partitions are broken towards giving such layers to the lighter stage.
FREE_LAYER_COST = 1e-3
_FORWARD_TAG, _BACKWARD_TAG = 11, 12


def layer_costs(layers: Sequence[nn.Module]) -> list[float]:
    """Default partition cost of each layer: its parameter count (FREE_LAYER_COST when it has none)."""
    return [float(sum(p.numel() for p in layer.parameters())) or FREE_LAYER_COST for layer in layers]


def _check_split_points(n: int, stages: int, split_points: Sequence[int]) -> list[tuple[int, int]]:
    points = [int(p) for p in split_points]
    if len(points) != stages - 1:
        raise ValueError(
            f"split points {points}: {stages} stages need {stages - 1} split point(s), got {len(points)}")
    bounds = [0, *points, n]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"split points {points} must be strictly increasing layer indices in [1, {n - 1}] "
            f"(the network has {n} layers)")
    return list(zip(bounds, bounds[1:]))


def partition_layers(
    costs: Sequence[float], stages: int, split_points: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` layer ranges, one per stage, minimising the largest stage cost.

    Exact dynamic programme over prefix sums (O(stages * n^2), n = number of layers); among optimal
    partitions the one with the earliest cuts wins, so the result is deterministic on every rank.
    ``split_points`` (the first layer of stages 1..S-1) override the balance.
    """
    n = len(costs)
    if stages < 1:
        raise ValueError(f"pipeline stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"{stages} pipeline stages but the network has only {n} layers")
    if split_points is not None:
        return _check_split_points(n, stages, split_points)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    inf = float("inf")
    best = np.full((stages + 1, n + 1), inf)  # best[k, j]: first j layers in k stages
    cut = np.zeros((stages + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1, i], prefix[j] - prefix[i])
                if v < best[k, j]:
                    best[k, j], cut[k, j] = v, i
    ranges, j = [], n
    for k in range(stages, 0, -1):
        i = int(cut[k, j])
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``min(parts, total)`` near-equal micro-batches of ``total`` rows (larger ones first)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def boundary_shapes(layers: Sequence[nn.Module], obs_shape: Sequence[int], ranges: Sequence[tuple[int, int]]
                    ) -> list[tuple[int, ...]]:
    """Per-sample shape of the input of each stage and of the last stage's output (S + 1 shapes)."""
    x = torch.zeros((1, *obs_shape))
    shapes = [tuple(x.shape[1:])]
    with torch.no_grad():
        for start, end in ranges:
            for layer in layers[start:end]:
                x = layer(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


class StageLink:
    """Send/receive float32 tensors to/from the neighbouring stages of one pipeline group.

    Sends are non-blocking (Isend) so a stage computes the next micro-batch while its output travels;
    the caller keeps the returned request (which holds the buffer alive) until ``wait_all``.
    Time blocked in receives and waits is counted in ``wait_seconds`` (the pipeline bubble plus
    transfer time). Receives and waits go through the collective watchdog (phases "pipeline recv" and
    "pipeline send"), so a dead neighbour ends the job instead of hanging it.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.stage = comm.Get_rank()
        self.stages = comm.Get_size()
        self.first = self.stage == 0
        self.last = self.stage == self.stages - 1
        self.wait_seconds = 0.0
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def _isend(self, t: torch.Tensor, dest: int, tag: int) -> None:
        t = t.detach().to(torch.float32).contiguous()
        self._pending.append((self.comm.Isend(t.numpy(), dest=dest, tag=tag), t))

    def _recv(self, shape: tuple[int, ...], source: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=torch.float32)
        t0 = time.perf_counter()
        watchdog.wait(self.comm.Irecv(buf.numpy(), source=source, tag=tag), "pipeline recv")
        self.wait_seconds += time.perf_counter() - t0
        return buf

    def send_forward(self, t: torch.Tensor) -> None:
        self._isend(t, self.stage + 1, _FORWARD_TAG)

    def recv_forward(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._recv(shape, self.stage - 1, _FORWARD_TAG)

    def send_backward(self, t: torch.Tensor) -> None:
        self._isend(t, self.stage - 1, _BACKWARD_TAG)

    def recv_backward(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._recv(shape, self.stage + 1, _BACKWARD_TAG)

    def wait_all(self) -> None:
        if not self._pending:
            return
        t0 = time.perf_counter()
        watchdog.wait_all([r for r, _ in self._pending], "pipeline send")
        self.wait_seconds += time.perf_counter() - t0
        self._pending = []


def pipelined_forward(modules: Sequence[nn.Module], link: StageLink, x: torch.Tensor | None, sizes: Sequence[int],
                      in_shape: tuple[int, ...]) -> list[torch.Tensor] | None:
    """No-grad forward of ``sum(sizes)`` rows through the pipeline, micro-batch by micro-batch.

    Several stage modules of the same architecture (online and target for double DQN) share one
    pass: their activations of a micro-batch travel stacked in one message, so the pipeline fills
    and drains once. Stage 0 passes the input rows ``x``; the others pass None. Returns each
    module's network output on the last stage and None elsewhere.
    """
    k = len(modules)
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]
    offset = 0
    with torch.no_grad():
        for n in sizes:
            if link.first:
                inputs = [x[offset : offset + n]] * k
            else:
                inputs = list(link.recv_forward((k * n, *in_shape)).split(n))
            offset += n
            ys = [module(inp) for module, inp in zip(modules, inputs)]
            if link.last:
                for out, y in zip(outputs, ys):
                    out.append(y)
            else:
                link.send_forward(torch.cat(ys) if k > 1 else ys[0])
    link.wait_all()
    return [torch.cat(out) for out in outputs] if link.last else None


def gpipe_backward(
    module: nn.Module, link: StageLink, x: torch.Tensor | None, sizes: Sequence[int], in_shape: tuple[int, ...],
    loss_of: Callable[[int, int, torch.Tensor], torch.Tensor] | None,
) -> None:
    """One GPipe step: all micro-batch forwards, then all backwards (in reverse order).

    Gradients accumulate into the parameters' ``.grad`` (the caller zeroes them). On the last stage
    ``loss_of(offset, n, output)`` gives each micro-batch's share of the loss (already weighted by
    ``n / total`` so the shares sum to the batch mean).
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    offset = 0
    for n in sizes:
        if link.first:
            inp = x[offset : offset + n]
        else:
            inp = link.recv_forward((n, *in_shape)).requires_grad_(True)
        y = module(inp)
        if link.last:
            y = loss_of(offset, n, y)
        else:
            link.send_forward(y)
        inputs.append(inp)
        outputs.append(y)
        offset += n
    for m in reversed(range(len(sizes))):
        y = outputs[m]
        grad = None if link.last else link.recv_backward(tuple(y.shape))
        if y.requires_grad:  # a stage of parameter-free layers right after the input has nothing to do
            y.backward(grad)
        if not link.first:
            g = inputs[m].grad
            link.send_backward(g if g is not None else torch.zeros_like(inputs[m]))
    link.wait_all()
