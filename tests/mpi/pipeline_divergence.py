"""Run with mpiexec -n 2: a PipelineLearner whose single stage is replicated on both ranks (dp_comm =
world) detects a perturbed parameter on one replica, on both ranks, naming the tensor."""
from __future__ import annotations

import torch
from mpi4py import MPI

from mpidqn.errors import ReplicaDivergenceError
from mpidqn.learners.data_parallel import Hyper
from mpidqn.nn.mlp import mlp_layers
from mpidqn.learners.pipeline import PipelineLearner

comm = MPI.COMM_WORLD
torch.manual_seed(0)
learner = PipelineLearner(mlp_layers(4, 2, [8, 8]), (4,), Hyper(), pp_comm=MPI.COMM_SELF, dp_comm=comm)
learner.check_replicas()  # identical after the broadcast
if comm.Get_rank() == 1:
    with torch.no_grad():
        learner.params[2].view(-1)[0] += 1e-3
try:
    learner.check_replicas()
except ReplicaDivergenceError as e:
    print(f"OK rank {comm.Get_rank()}: {e}", flush=True)
else:
    print(f"FAIL rank {comm.Get_rank()}: no divergence detected", flush=True)
