"""Checkpoint write throughput vs a raw sequential write of the same bytes, and the training pause.

    python benchmarks/checkpoint_io.py [--transitions 1000000] [--obs-dim 4] [--dir /tmp] [--repeats 3]

A single-rank trainer gets a replay shard filled with --transitions random transitions; then, in
alternation: (a) a full checkpoint (CheckpointManager.save: model + rank file with the shard, fsync,
CRC32, manifest) and (b) a raw write of the same number of bytes (numpy tofile + fsync) on the same
disk. Prints MB/s of both, their ratio, and the training pause (wall time of save()).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpidqn.train.checkpoints import CheckpointManager
from mpidqn.config import load_config
from mpidqn.train.reporting import SilentReporter
from mpidqn.distributed.topology import Topology
from mpidqn.train.loop import Trainer


def raw_write(path: Path, nbytes: int) -> float:
    data = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        data.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transitions", type=int, default=1_000_000)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(None, [f"train.buffer_size={args.transitions}", "train.learning_starts=0"])
    trainer = Trainer(cfg, Topology.build(MPI.COMM_SELF), SilentReporter())
    n = args.transitions
    rng = np.random.default_rng(1)
    trainer.replay.extend({
        "obs": rng.normal(size=(n, 4)).astype(np.float32), "actions": rng.integers(2, size=n),
        "rewards": np.ones(n, np.float32), "next_obs": rng.normal(size=(n, 4)).astype(np.float32),
        "discounts": np.full(n, 0.99, np.float32)})
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="mpidqn-ckpt-bench-"))
    manager = CheckpointManager(root, MPI.COMM_SELF, keep=1, attrs={"format_version": 1, "config": "", "world_size": 1,
                                "pipeline_stages": 1, "mpidqn_version": "bench"}, say=print)
    trainer.checkpoints = manager
    ckpt_s, raw_s, sizes = [], [], []
    for i in range(args.repeats):
        trainer.counters.env_steps = i + 1  # a new checkpoint directory each time
        t0 = time.perf_counter()
        path = manager.save(trainer.checkpoint_content())
        ckpt_s.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
        sizes.append(size)
        raw_s.append(raw_write(root / "raw.bin", size))
    shutil.rmtree(root)
    size = float(np.median(sizes))
    mb_ckpt, mb_raw = size / np.median(ckpt_s) / 1e6, size / np.median(raw_s) / 1e6
    print(f"replay shard: {n:,} transitions, checkpoint {size / 1e6:.1f} MB ({size / n:.1f} bytes/transition), "
          f"{args.repeats} alternating repeats on {args.dir}")
    print(f"checkpoint write {mb_ckpt:8.1f} MB/s (training pause {np.median(ckpt_s):.2f} s)")
    print(f"raw write        {mb_raw:8.1f} MB/s")
    print(f"ratio checkpoint / raw: {mb_ckpt / mb_raw:.2f}x")


if __name__ == "__main__":
    main()
