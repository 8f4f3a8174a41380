"""Collectives on an explicit communicator. Every function returns early when the communicator has
one rank; all payloads travel with the buffer API (no pickling) except short error messages.

The collectives the training loop calls are started non-blocking and completed through the
collective watchdog (:mod:`mpidqn.distributed.watchdog`), so a hung or dead rank ends the job with one line
instead of a silent hang; ``phase`` names the collective in that line."""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.distributed import watchdog


def allreduce_mean_(flat: torch.Tensor, comm: Any, phase: str = "gradient allreduce") -> None:
    """Average a contiguous CPU float tensor over ``comm`` in place (one Allreduce, watched)."""
    n = comm.Get_size()
    if n == 1:
        return
    buf = flat.numpy()
    watchdog.wait(comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), phase)
    buf *= 1.0 / n


def broadcast_tensors_(tensors: Sequence[torch.Tensor], comm: Any, root: int = 0) -> None:
    """Broadcast tensors from ``root`` in the given (fixed) order as one flat buffer."""
    if comm.Get_size() == 1 or not tensors:
        return
    dtypes = {t.dtype for t in tensors}  # one common dtype travels exactly (float32 params: no upcast)
    dtype = dtypes.pop() if len(dtypes) == 1 and torch.bfloat16 not in dtypes else torch.float64
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    comm.Bcast(flat.numpy(), root=root)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def allreduce_array(values: np.ndarray, comm: Any, op: Any = MPI.SUM, phase: str = "allreduce") -> np.ndarray:
    """Reduce a small numpy array over ``comm`` and return the result (a new array)."""
    values = np.ascontiguousarray(values)
    if comm.Get_size() == 1:
        return values.copy()
    out = np.empty_like(values)
    watchdog.wait(comm.Iallreduce(values, out, op=op), phase)
    return out


def agree_flags(flags: Sequence[bool], comm: Any, phase: str = "stop-flag agreement") -> list[bool]:
    """Several agreements in one collective: flag i is true everywhere if it is true on any rank."""
    local = np.array([int(bool(f)) for f in flags], dtype=np.int32)
    if comm.Get_size() == 1:
        return [bool(x) for x in local]
    return [bool(x) for x in allreduce_array(local, comm, MPI.MAX, phase)]


def tensor_fingerprints(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """CRC32 of each tensor's bytes: equal fingerprints everywhere means bit-identical replicas."""
    return np.array([zlib.crc32(t.detach().contiguous().numpy().tobytes()) for t in tensors], dtype=np.int64)


def first_divergent(fingerprints: np.ndarray, comm: Any) -> int | None:
    """Index of the first tensor whose fingerprint differs between ranks of ``comm``, else None."""
    if comm.Get_size() == 1:
        return None
    lo = allreduce_array(fingerprints, comm, MPI.MIN, "replica check")
    hi = allreduce_array(fingerprints, comm, MPI.MAX, "replica check")
    differ = np.flatnonzero(lo != hi)
    return int(differ[0]) if differ.size else None


def gather_errors(message: str | None, comm: Any) -> list[tuple[int, str]]:
    """Every rank learns which ranks failed a setup step and why (small pickled strings)."""
    if comm.Get_size() == 1:
        return [(0, message)] if message is not None else []
    messages = comm.allgather(message)
    return [(rank, m) for rank, m in enumerate(messages) if m is not None]
