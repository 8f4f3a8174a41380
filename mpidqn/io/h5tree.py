"""Nested dicts <-> HDF5 groups, readable with plain h5py.

Mapping (every node self-describing, so ``h5ls -r`` or h5py alone can read a checkpoint):
  dict                       -> group
  numpy array                -> dataset (dtype and shape preserved)
  torch tensor               -> dataset with attribute ``torch_dtype`` (restored as a tensor)
  bytes                      -> opaque (``np.void``) scalar dataset with attribute ``bytes = 1`` (empty
                                bytes: an empty uint8 dataset)
  int / float / bool / str   -> attribute of the parent group
  Json(x)                    -> attribute ``json.<name>`` holding JSON text
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch


@dataclass
class Json:
    """Marks a small JSON-serialisable value (RNG state, hyper-parameters) stored as an attribute."""

    value: Any


def write_tree(group: h5py.Group, tree: dict[str, Any]) -> None:
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, dict):
            write_tree(group.require_group(key), value)
        elif isinstance(value, Json):
            group.attrs[f"json.{key}"] = json.dumps(value.value)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            ds = group.create_dataset(key, data=t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy())
            ds.attrs["torch_dtype"] = str(t.dtype).removeprefix("torch.")
        elif isinstance(value, (bytes, bytearray)):
            # HDF5 has no zero-size opaque type: empty bytes are an empty uint8 dataset
            ds = group.create_dataset(key, data=np.void(bytes(value)) if value else np.zeros(0, np.uint8))
            ds.attrs["bytes"] = 1
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        elif isinstance(value, (bool, int, float, str, np.integer, np.floating)):
            group.attrs[key] = value
        elif value is None:
            group.attrs[f"json.{key}"] = "null"
        else:
            raise TypeError(f"cannot store {type(value).__name__} at {group.name}/{key}")


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _torch_dtype(node: h5py.Dataset) -> torch.dtype:
    """The dtype a dataset's ``torch_dtype`` names; a file names only dtypes, no other attribute of torch."""
    name = str(node.attrs["torch_dtype"])
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{node.file.filename}:{node.name}: torch_dtype {name!r} is not a torch dtype")
    return dtype


def read_tree(group: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in group.attrs.items():
        if key.startswith("json."):
            out[key[5:]] = json.loads(value)
        else:
            out[key] = _scalar(value)
    for key, node in group.items():
        if isinstance(node, h5py.Group):
            out[key] = read_tree(node)
        elif node.attrs.get("bytes"):
            out[key] = node[()].tobytes()
        elif "torch_dtype" in node.attrs:
            out[key] = torch.from_numpy(np.asarray(node[()])).to(_torch_dtype(node))
        else:
            out[key] = node[()]
    return out


def flatten(tree: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """{"ring": {"obs": x}} -> {"ring/obs": x} (the flat names the replay shard uses)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            out[prefix + key] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"ring/obs": x} -> {"ring": {"obs": x}} (inverse of :func:`flatten`)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
