"""mpiexec -n N python trust_check.py CHECKPOINT_DIR [--trust-run-dir] [KEY=VALUE ...]: resume a
trainer from the checkpoint (written by N ranks) with the user's secret and print, per rank, one JSON
line saying whether its envs were restored (its current observations are the saved ones) or start new
episodes. Rank 0 prints the resume's warnings as the real command does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from mpidqn.config import load_config
from mpidqn.distributed.topology import Topology
from mpidqn.io.trust import load_trust
from mpidqn.train.checkpoints import verify
from mpidqn.train.loop import Trainer
from mpidqn.train.reporting import ConsoleReporter, SilentReporter

comm = MPI.COMM_WORLD
ckpt = verify(Path(sys.argv[1]))
trusted = "--trust-run-dir" in sys.argv
cfg = load_config(None, [a for a in sys.argv[2:] if "=" in a])
reporter = ConsoleReporter("lines") if comm.Get_rank() == 0 else SilentReporter()
trust = comm.bcast(load_trust(trusted) if comm.Get_rank() == 0 else None, root=0)
trainer = Trainer(cfg, Topology.build(comm), reporter, trust=trust)
assert trainer.load_checkpoint(ckpt) == "exact"
with h5py.File(ckpt.file(f"rank_{comm.Get_rank():05d}.h5"), "r") as h:
    saved_obs = h["envs/obs"][()]
restored = bool(np.array_equal(trainer.obs, saved_obs))
assert restored == bool(trainer.episodes.lengths.any())  # new episodes start at length 0
print(json.dumps({"rank": comm.Get_rank(), "restored": restored}), flush=True)
trainer.envs.close()
