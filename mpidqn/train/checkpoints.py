"""HDF5 checkpoints: atomic, verified, resumable on the same or a different number of ranks.

Layout of ``RUN_DIR/checkpoints/step_<global env steps, 12 digits>/``::

    model_s<stage>.h5   online + target parameters and optimizer state (Adam or RMSprop, under the
                        key ``optimizer``; ``adam`` in older files), keyed by global parameter name
                        (``<layer index>.<name>``); written by the first data-parallel rank of each
                        pipeline stage, so a checkpoint of S stages loads with any S'.
    rank_<rank>.h5      everything else that rank needs to continue exactly: counters, numpy/torch
                        RNG states, pickled vector env, current observations, episode statistics,
                        phase timers, and its replay shard (``checkpoint.replay``).
    COMPLETE            JSON manifest written LAST by rank 0 once every file is fsynced and renamed
                        into place: step, world, stages, format version, and size + CRC32 of each file.

``RUN_DIR/checkpoints/BEST`` (JSON: step, score, episodes, dir) names the checkpoint of the best
evaluation so far; pruning never removes it, whatever ``checkpoint.keep`` says.

A directory without a valid ``COMPLETE`` does not exist as a checkpoint. Every HDF5 file carries
root attributes ``format_version``, ``step``, ``world_size``, ``pipeline_stages``, ``config`` (YAML)
and ``mpidqn_version`` so plain h5py can read it (see h5tree.py for the node mapping).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import h5py
import numpy as np

from mpidqn import __version__
from mpidqn.distributed import watchdog
from mpidqn.errors import CheckpointWriteError, UserError
from mpidqn.io.h5tree import read_tree, write_tree
from mpidqn.train import faults

if TYPE_CHECKING:
    from mpidqn.replay.frames import FrameRows

FORMAT_VERSION = 1
MARKER = "COMPLETE"
BEST = "BEST"
_STEP_DIR = re.compile(r"^step_(\d{12})$")
_DATA_FILE = re.compile(r"^(model_s\d+|rank_\d{5,})\.h5$")  # the only names a manifest may list


def step_dir_name(step: int) -> str:
    return f"step_{step:012d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_h5_atomic(path: Path, attrs: dict[str, Any], tree: dict[str, Any]) -> dict[str, int]:
    """Write ``tree`` to ``path`` via a temporary name, fsync, rename; return its size and CRC32."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs)
            write_tree(f, tree)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        crc = file_crc32(tmp)  # while still in the page cache
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not stay full of our partial file
        raise
    return {"bytes": path.stat().st_size, "crc32": crc}


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- finding


@dataclass
class Checkpoint:
    """A complete, verified checkpoint directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world(self) -> int:
        return int(self.manifest["world_size"])

    @property
    def pipeline_stages(self) -> int:
        return int(self.manifest["pipeline_stages"])

    def file(self, name: str) -> Path:
        return self.path / name

    def model_files(self) -> list[Path]:
        return [self.path / f"model_s{s}.h5" for s in range(self.pipeline_stages)]

    def config(self) -> Any:
        """The resolved config of the run that wrote this checkpoint."""
        from mpidqn.config import config_from_yaml_text

        with h5py.File(self.model_files()[0], "r") as h:
            return config_from_yaml_text(str(h.attrs["config"]))


def verify(path: Path, check_crc: bool = True) -> Checkpoint:
    """Return the Checkpoint at ``path`` or raise ValueError saying what is wrong with it."""
    marker = path / MARKER
    if not marker.exists():
        raise ValueError("incomplete (no COMPLETE marker)")
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable COMPLETE marker ({e})") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(manifest.get(k), int) and manifest[k] >= 0 for k in ("step", "world_size", "pipeline_stages")):
        raise ValueError("COMPLETE marker is not a manifest (a JSON object with step, world_size, pipeline_stages)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version} is not {FORMAT_VERSION} (written by mpidqn {manifest.get('mpidqn_version')})")
    files = manifest.get("files")
    # a manifest names files of its own directory only (never "../elsewhere"), each with its size and CRC32
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and _DATA_FILE.match(n) and isinstance(i, dict)
            and isinstance(i.get("bytes"), int) and isinstance(i.get("crc32"), int) for n, i in files.items()):
        raise ValueError("COMPLETE marker does not list the checkpoint's files as mpidqn writes them")
    for name, info in files.items():
        f = path / name
        if not f.exists():
            raise ValueError(f"{name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise ValueError(f"{name} is truncated ({f.stat().st_size} of {info['bytes']} bytes)")
        if check_crc and file_crc32(f) != info["crc32"]:
            raise ValueError(f"{name} is corrupted (CRC32 mismatch)")
    return Checkpoint(path, manifest)


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under ``root`` (complete or not), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def find_latest(root: Path, warn: Callable[[str], None] = lambda s: None) -> Checkpoint | None:
    """Newest intact checkpoint under ``root``; each damaged newer one is reported in one line."""
    for _, path in list_step_dirs(root):
        try:
            return verify(path)
        except ValueError as e:
            if (path / MARKER).exists():  # incomplete dirs are normal leftovers of a kill; say nothing
                warn(f"mpidqn: checkpoint {path} is unusable: {e}; trying an older one")
    return None


def read_best(root: Path) -> dict[str, Any] | None:
    """The BEST record of a checkpoints directory (step, score, episodes, dir), or None."""
    try:
        record = json.loads((Path(root) / BEST).read_text())
        return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
    except (OSError, ValueError):
        return None


def resolve(target: str | Path, best: bool = False) -> Checkpoint:
    """A run dir (newest intact checkpoint, or with ``best`` the one of the best evaluation) or a
    checkpoint dir -> Checkpoint, else UserError."""
    p = Path(target)
    if not p.exists():
        raise UserError(f"{p}: no such run directory or checkpoint")
    if best:
        record = read_best(p / "checkpoints")
        if record is None:
            raise UserError(f"{p}: no best checkpoint recorded (no {p / 'checkpoints' / BEST}; "
                            "evaluations record one as the run goes)")
        try:
            return verify(p / "checkpoints" / step_dir_name(int(record["step"])))
        except ValueError as e:
            raise UserError(f"{p}: the best checkpoint (step {int(record['step']):,}) is damaged: {e}") from None
    if (p / MARKER).exists() or _STEP_DIR.match(p.name):
        try:
            return verify(p)
        except ValueError as e:
            raise UserError(f"{p}: {e}") from None
    ckpt = find_latest(p / "checkpoints", warn=lambda s: print(s, flush=True))
    if ckpt is None:
        raise UserError(f"{p}: no complete checkpoint (looked in {p / 'checkpoints'})")
    return ckpt


def read_model(ckpt: Checkpoint) -> dict[str, Any]:
    """Merge the stage files into one model state: online, target, ema (the moving average of the
    parameters, empty without one), noise (the learning-noise streams of noisy layers, empty without),
    optimizer (Adam or RMSprop, by global name), optimizer_hparams,
    updates. Files of older versions call the optimizer entries "adam" and "adam_hparams" (whichever
    optimizer it was); they are read under the new names."""
    merged: dict[str, Any] = {"online": {}, "target": {}, "ema": {}, "optimizer": {}, "noise": {}}
    for f in ckpt.model_files():
        with h5py.File(f, "r") as h:
            tree = read_tree(h["model"])
        merged["online"].update(tree.get("online", {}))
        merged["target"].update(tree.get("target", {}))
        merged["ema"].update(tree.get("ema", {}))
        merged["noise"].update(tree.get("noise", {}))  # noisy layers' learning-noise streams by layer
        merged["optimizer"].update(tree.get("optimizer", tree.get("adam", {})))
        merged["optimizer_hparams"] = tree["optimizer_hparams"] if "optimizer_hparams" in tree else tree["adam_hparams"]
        merged["updates"] = tree["updates"]
        merged["nonfinite_skipped"] = tree.get("nonfinite_skipped", 0)
    return merged


def read_rank(ckpt: Checkpoint, rank: int, groups: tuple[str, ...] | None = None) -> dict[str, Any]:
    with h5py.File(ckpt.file(f"rank_{rank:05d}.h5"), "r") as h:
        names = groups if groups is not None else tuple(h.keys())
        return {g: read_tree(h[g]) for g in names if g in h}


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of the maximal runs of consecutive values of sorted, unique ``rows``."""
    if len(rows) == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts, lasts = rows[np.concatenate([[0], cut])], rows[np.concatenate([cut - 1, [len(rows) - 1]])]
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts)]


def _ring_slabs(first: int, count: int, capacity: int) -> list[tuple[int, int]]:
    """Physical ``[a, b)`` slot ranges of ``count`` consecutive ring positions from position ``first``
    (position ``i`` lives in slot ``i % capacity``): one range, or two where the ring wraps."""
    if count > capacity:
        raise ValueError(f"{count} ring positions exceed the ring's capacity {capacity}")
    a = first % capacity
    if a + count <= capacity:
        return [(a, a + count)]
    return [(a, capacity), (0, a + count - capacity)]


def _read_slabs(ds: h5py.Dataset, slabs: list[tuple[int, int]]) -> np.ndarray:
    """The hyperslabs ``ds[a:b]`` one after the other (only they are read)."""
    out = np.empty((sum(b - a for a, b in slabs), *ds.shape[1:]), ds.dtype)
    at = 0
    for a, b in slabs:
        if b > a:
            out[at:at + b - a] = ds[a:b]
            at += b - a
    return out


def read_shard_rows(replay: h5py.Group, rows: np.ndarray) -> dict[str, np.ndarray] | FrameRows:
    """The oldest-first ``rows`` of one saved replay shard (its ``replay`` group), reading only them.

    Every dataset of ``replay/ring`` with one entry per stored slot (whatever columns the shard saved)
    is read in the hyperslabs that hold the rows: a run of consecutive rows is one slab, two where the
    ring wraps (oldest-first row ``r`` is slot ``(pos - size + r) % capacity``). A transition shard gives
    those columns; a frame shard gives FrameRows, reading of its frame ring (and ``prev`` pointers)
    only the frames from the oldest ``need`` to the newest ``next_idx`` of each run of rows.
    """
    ring = replay["ring"]
    cap, pos, size = (int(ring.attrs[k]) for k in ("capacity", "pos", "size"))
    slots_saved = int(ring.attrs.get("filled", size))  # frame shards keep rows beyond ``size`` (dropped ones)
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= size):
        raise ValueError(f"rows outside the {size} stored rows of {replay.file.filename}")
    unique = np.unique(rows)
    runs = _runs(unique)
    slabs = [s for a, b in runs for s in _ring_slabs(pos - size + a, b - a, cap)]
    cols = {name: _read_slabs(ds, slabs) for name, ds in ring.items()
            if isinstance(ds, h5py.Dataset) and ds.ndim >= 1 and ds.shape[0] == slots_saved}
    back = np.searchsorted(unique, rows)  # unique -> the order asked for
    if "frames" not in replay:
        if len(unique) == len(rows) and np.array_equal(unique, rows):
            return cols
        return {k: v[back] for k, v in cols.items()}
    from mpidqn.replay.frames import frame_rows_from_spans

    frames = replay["frames"]
    ends = np.cumsum([b - a for a, b in runs])
    windows = sorted((int(cols["need"][e - (b - a):e].min()), int(cols["next_idx"][e - (b - a):e].max()) + 1)
                     for (a, b), e in zip(runs, ends))
    merged: list[list[int]] = []
    for lo, hi in windows:  # overlapping or touching windows are read once
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    picked = {k: v[back] for k, v in cols.items()}
    stack = int(frames.attrs["stack"])
    try:
        return frame_rows_from_spans(picked, _frame_spans(frames, merged or [[0, 0]]), stack)
    except ValueError:
        # A next_obs stack linked to frames older than its row's ``need`` (possible only for rows that
        # ``extend`` deduplicated from materialised stacks): read all the saved frames instead.
        saved = len(frames["frames"])
        written = int(frames.attrs["written"])
        return frame_rows_from_spans(picked, _frame_spans(frames, [[written - saved, written]]), stack)


def _frame_spans(frames: h5py.Group, windows: list[list[int]]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(lo, frames, prev)`` of the saved frame ring for the absolute index windows ``[lo, hi)``."""
    fcap = int(frames.attrs["capacity"])
    spans = []
    for lo, hi in windows:
        slabs = _ring_slabs(lo, hi - lo, fcap)
        spans.append((lo, _read_slabs(frames["frames"], slabs), _read_slabs(frames["prev"], slabs)))
    return spans


def read_replay_rows(ckpt: Checkpoint, plan: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray] | FrameRows | None:
    """The replay rows an elastic resume assigns to one new rank (see replay.partition_plan), in the
    plan's order: a dict of the ring's columns (all of them, also columns this version does not know),
    or FrameRows for frame shards, their frames laid out in the order the rows first read them
    (``interleave_frame_rows``); None if the plan is empty. Each old rank file is opened in turn and
    only the hyperslabs holding the new rank's rows are read (``read_shard_rows``)."""
    old_ranks, rows = plan
    parts: list[Any] = []
    source = np.empty(len(old_ranks), np.int64)
    stack = 1
    for i, old in enumerate(np.unique(old_ranks)):
        mine = np.flatnonzero(old_ranks == old)
        with h5py.File(ckpt.file(f"rank_{int(old):05d}.h5"), "r") as h:
            parts.append(read_shard_rows(h["replay"], rows[mine]))
            if "frames" in h["replay"]:
                stack = int(h["replay/frames"].attrs["stack"])
        source[mine] = i
    if not parts:
        return None
    if not isinstance(parts[0], dict):
        from mpidqn.replay.frames import interleave_frame_rows

        return interleave_frame_rows(parts, source, stack)
    where = np.argsort(np.argsort(source, kind="stable"), kind="stable")  # plan order of the parts' rows
    keys = [k for k in parts[0] if all(k in p for p in parts)]  # columns every old shard saved
    return {k: np.concatenate([p[k] for p in parts])[where] for k in keys}


def replay_max_priority(ckpt: Checkpoint) -> float | None:
    """The largest running maximum priority of the old shards (None: no prioritized replay saved)."""
    tops = []
    for r in range(ckpt.world):
        with h5py.File(ckpt.file(f"rank_{r:05d}.h5"), "r") as h:
            if "replay/ring" in h and "max_priority" in h["replay/ring"].attrs:
                tops.append(float(h["replay/ring"].attrs["max_priority"]))
    return max(tops) if tops else None


def replay_lengths(ckpt: Checkpoint) -> list[int] | None:
    """Stored transitions per old rank, or None when the checkpoint holds no replay."""
    lengths = []
    for r in range(ckpt.world):
        with h5py.File(ckpt.file(f"rank_{r:05d}.h5"), "r") as h:
            if "replay" not in h:
                return None
            lengths.append(int(h["replay/ring"].attrs["size"]))
    return lengths


# ----------------------------------------------------------------------------- writing


def _describe(e: OSError) -> str:
    """``[Errno 28] No space left on device: '/path'`` in one line."""
    return f"{e.strerror or e}: {e.filename}" if e.filename else (e.strerror or str(e))


@dataclass
class CheckpointContent:
    """One rank's part of the checkpoint of global step ``step``."""

    step: int
    stage: int  # this rank's pipeline stage: names the model file
    model: dict[str, Any] | None  # the learner's state_dict(); None where another rank of the stage writes it
    rank: dict[str, Any]  # everything else this rank needs to continue (counters, RNGs, envs, replay, ...)


class CheckpointManager:
    """Writes this rank's part of a checkpoint; rank 0 seals it with the manifest and prunes."""

    def __init__(self, run_dir: Path, comm: Any, keep: int, attrs: dict[str, Any], say: Callable[[str], None]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.comm = comm
        self.keep = keep
        self.attrs = attrs  # format_version, config, world_size, pipeline_stages, versions
        self.say = say
        self.last_step: int | None = None
        self.last_pause_s = 0.0
        best = read_best(self.root) if comm.Get_rank() == 0 else None
        self.best_step: int | None = int(best["step"]) if best else None

    def mark_best(self, step: int, score: float, episodes: int) -> None:
        """Rank 0: record the complete checkpoint of ``step`` as the best evaluation so far (written
        after that checkpoint is sealed); the previous best becomes prunable like any other."""
        if self.comm.Get_rank() != 0:
            return
        record = {"step": step, "score": score, "episodes": episodes, "dir": step_dir_name(step)}
        write_text_atomic(self.root / BEST, json.dumps(record))
        self.best_step = step
        self.prune()

    def save(self, content: CheckpointContent) -> Path | None:
        """Write this rank's files; rank 0 seals the checkpoint once every rank succeeded.

        A write error on any rank (disk full, unwritable run dir) is agreed on by all ranks: rank 0
        removes this step's partial directory, no COMPLETE is written (the previous checkpoint stays the
        newest), and every rank raises CheckpointWriteError naming the error and the path.
        """
        step = content.step
        if step == self.last_step:
            return None
        t0 = time.perf_counter()
        rank = self.comm.Get_rank()
        path = self.root / step_dir_name(step)
        files: dict[str, dict[str, int]] = {}
        error = None
        try:
            self._write_files(content, path, rank, files)
        except OSError as e:
            error = f"rank {rank}: {_describe(e)}"
        faults.point("checkpoint", rank, step)  # test-only: between the data files and the marker
        with watchdog.guard(self.comm, "checkpoint gather"):
            gathered = self.comm.gather((files, error), root=0)
        if rank == 0:
            errors = [err for _, err in gathered if err is not None]
            error = errors[0] if errors else None
            if error is None:
                try:
                    self._seal(path, step, gathered)
                except OSError as e:
                    error = f"rank 0: {_describe(e)}"
            if error is not None:
                shutil.rmtree(path, ignore_errors=True)  # partial files only: no COMPLETE was written
        # no rank runs ahead while the manifest is pending (kill-safety is the marker's); all learn the verdict
        with watchdog.guard(self.comm, "checkpoint barrier"):
            error = self.comm.bcast(error, root=0)
        if error is not None:
            raise CheckpointWriteError(f"checkpoint {path} could not be written ({error}); it was discarded")
        self.last_step = step
        self.last_pause_s = time.perf_counter() - t0
        return path

    def _write_files(self, content: CheckpointContent, path: Path, rank: int, files: dict[str, dict[str, int]]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        attrs = {**self.attrs, "step": content.step, "rank": rank}
        if content.model is not None:
            name = f"model_s{content.stage}.h5"
            files[name] = write_h5_atomic(path / name, attrs, {"model": content.model})
        name = f"rank_{rank:05d}.h5"
        faults.point("rank_file", rank, content.step, path=path / name)  # test-only: a full disk
        files[name] = write_h5_atomic(path / name, attrs, content.rank)

    def _seal(self, path: Path, step: int, gathered: list[tuple[dict[str, Any], str | None]]) -> None:
        fsync_dir(path)
        manifest = {
            "format_version": FORMAT_VERSION, "step": step, "world_size": self.comm.Get_size(),
            "pipeline_stages": int(self.attrs["pipeline_stages"]), "mpidqn_version": __version__,
            "created": time.time(), "files": {k: v for part, _ in gathered for k, v in part.items()},
        }
        write_text_atomic(path / MARKER, json.dumps(manifest, indent=1))
        self.prune()

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and the best one; drop older ones and stale
        partial dirs."""
        complete = 0
        for step, path in list_step_dirs(self.root):
            if (path / MARKER).exists():
                complete += 1
                if complete > self.keep and step != self.best_step:
                    shutil.rmtree(path, ignore_errors=True)
            elif complete:  # a partial dir older than a complete one is garbage from a crash
                shutil.rmtree(path, ignore_errors=True)
