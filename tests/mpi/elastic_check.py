"""mpiexec -n N python elastic_check.py RUN_DIR: load the run's newest checkpoint into a trainer on N
ranks (possibly written by a different number) and check that the replay shards together hold every
stored transition exactly once, and that counters and parameters carried over."""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from mpi4py import MPI

from mpidqn.train.checkpoints import find_latest, read_model
from mpidqn.config import config_from_yaml_text
from mpidqn.train.reporting import SilentReporter
from mpidqn.distributed.topology import Topology
from mpidqn.train.loop import Trainer

comm = MPI.COMM_WORLD
run_dir = Path(sys.argv[1])
cfg = config_from_yaml_text((run_dir / "config.yaml").read_text())
ckpt = find_latest(run_dir / "checkpoints")
trainer = Trainer(cfg, Topology.build(comm), SilentReporter())
mode = trainer.load_checkpoint(ckpt)
assert mode == ("exact" if ckpt.world == comm.Get_size() else "elastic"), mode
assert trainer.counters.env_steps == ckpt.step
model = read_model(ckpt)
for name, p in trainer.learner.online.state_dict().items():
    assert torch.equal(p, model["online"][name]), name
for name, stream in trainer.learner.noise_streams.items():  # noisy layers: the learning noise carries over
    assert stream.bit_generator.state == model["noise"][name], name
assert set(trainer.learner.noise_streams) <= set(model["noise"])
mine = trainer.replay.transitions()
assert len(trainer.replay) <= trainer.replay.capacity
prioritized = "priority" in mine  # every row carries its priority
extra = [mine["priority"][:, None].astype(np.float32)] if prioritized else []
rows = comm.gather(np.concatenate([mine["obs"], mine["next_obs"], mine["actions"][:, None].astype(np.float32),
                                   mine["rewards"][:, None], *extra], axis=1), root=0)
tops = []
if comm.Get_rank() == 0:
    old = []
    for r in range(ckpt.world):
        with h5py.File(ckpt.file(f"rank_{r:05d}.h5"), "r") as h:
            g = h["replay/ring"]
            extra = [g["priority"][()][:, None].astype(np.float32)] if prioritized else []
            old.append(np.concatenate([g["obs"][()], g["next_obs"][()], g["actions"][()][:, None].astype(np.float32),
                                       g["rewards"][()][:, None], *extra], axis=1))
            tops.append(g.attrs.get("max_priority", 1.0))
    new, old = np.concatenate(rows), np.concatenate(old)
    assert len(new) == len(old), (len(new), len(old))
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731 - sort rows to compare as multisets
    assert np.array_equal(key(new), key(old)), "transitions lost or duplicated"
    if prioritized:
        assert len(np.unique(new[:, -1])) > 10, "priorities were never written back: the check has no teeth"
        assert trainer.replay.priorities.max_p == max(tops), (trainer.replay.priorities.max_p, tops)
    print(f"OK {mode} {ckpt.world}->{comm.Get_size()}: {len(new)} transitions")
