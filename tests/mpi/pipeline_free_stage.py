"""Run under mpiexec -n 2: a 2-stage pipeline whose stage 0 is Flatten alone (no parameters, no
optimizer) trains like the unpartitioned learner on uint8 observations (which reach stage 0 as
uint8), skips a non-finite update on every stage, saves its stage files, and resumes from them
(new and legacy optimizer keys) to continue exactly like the reference."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from mpi4py import MPI

from mpidqn.io.h5tree import write_tree
from mpidqn.learners.base import QLearner
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.pipeline import PipelineLearner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.replay.shard import Batch
from mpidqn.train.checkpoints import read_model
from mpidqn.train.faults import poison_loss

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
OUT = Path(sys.argv[1])
torch.set_num_threads(1)
B, OBS, ACT, SEED = 6, 5, 3, 3
hyper = Hyper(lr=1e-2, optimizer="rmsprop", max_grad_norm=0.5, target_update_interval=2, sync_check_interval=1)


def layers():
    torch.manual_seed(SEED)
    return mlp_layers(OBS, ACT, [16], dueling=False)  # Flatten, Linear, ReLU, Linear


def pipe():
    return PipelineLearner(layers(), (OBS,), hyper, comm, MPI.COMM_SELF, micro_batches=2, split_points=[1])


learner = pipe()
reference = Learner(torch.nn.Sequential(*layers()), hyper, MPI.COMM_SELF)
assert isinstance(learner, QLearner)
assert learner.total_parameters == reference.total_parameters
if rank == 0:
    assert learner.layer_names == ["Flatten"] and learner.params == [] and learner.optimizer is None
rng = np.random.default_rng(11)  # the same global batch on every rank


def global_batch(rows):
    return Batch(rng.integers(0, 4, size=(rows, OBS)).astype(np.uint8), rng.integers(ACT, size=rows),
                 rng.normal(size=rows).astype(np.float32), rng.integers(0, 4, size=(rows, OBS)).astype(np.uint8),
                 np.full(rows, 0.99, np.float32))


def mine(full, u):
    return Batch(*(a.reshape(u, world, B, *a.shape[1:])[:, rank].reshape(u * B, *a.shape[1:]) for a in full))


def train(learners, rounds, u=2):
    for _ in range(rounds):
        full = global_batch(u * world * B)
        learners[0].update_many(mine(full, u), u)
        learners[1].update_many(full, u)


def check(p, what):
    ref = dict(zip(reference.param_names, reference.params))
    for name, t in zip(p.param_names, p.params):
        assert torch.allclose(t, ref[name], rtol=1e-4, atol=1e-6), (rank, what, name)
    assert p.updates == reference.updates and p.lr == reference.lr, (rank, what)


gb = learner.gather_batch(mine(global_batch(2 * world * B), 2), 2)
assert gb.obs is None or gb.obs.dtype == torch.uint8  # frames travel to stage 0 as uint8
train((learner, reference), 3)
check(learner, "trained")
obs = rng.integers(0, 4, size=(rank + 2, OBS)).astype(np.uint8)
assert np.array_equal(learner.greedy_actions(obs), reference.greedy_actions(obs))

# a NaN loss on the last stage: both stages (the parameter-free one too) skip it
hook = poison_loss(learner) if learner.link.last else None
learner.update_many(mine(global_batch(world * B), 1), 1)
if hook is not None:
    hook.remove()
assert learner.nonfinite_skipped == 1 and learner.updates == reference.updates, (rank, learner.nonfinite_skipped)

for lr in (5e-3, 2e-3):
    learner.set_lr(lr)
    reference.set_lr(lr)
    assert learner.lr == lr
state = learner.state_dict()
if rank == 0:
    assert state["optimizer"] == {} and state["optimizer_hparams"].value["lr"] == 2e-3
legacy = {k: v for k, v in state.items() if not k.startswith("optimizer")}
legacy["adam"], legacy["adam_hparams"] = state["optimizer"], state["optimizer_hparams"]
for kind, tree in (("new", state), ("legacy", legacy)):
    (OUT / kind).mkdir(parents=True, exist_ok=True)
    with h5py.File(OUT / kind / f"model_s{rank}.h5", "w") as f:
        write_tree(f, {"model": tree})
comm.Barrier()
ref_state = copy.deepcopy(reference.state_dict())  # state_dict shares the live tensors
train((learner, reference), 2)  # continue the original ...


class Files:
    def __init__(self, kind):
        self.kind = kind

    def model_files(self):
        return sorted((OUT / self.kind).glob("model_s*.h5"))


for kind in ("new", "legacy"):  # ... and resume twice from the files: the same steps again
    resumed = pipe()
    resumed.load_state_dict(read_model(Files(kind)))
    assert resumed.lr == 2e-3 and resumed.nonfinite_skipped == 1
    ref = Learner(torch.nn.Sequential(*layers()), hyper, MPI.COMM_SELF)  # the unpartitioned run, resumed
    ref.load_state_dict(copy.deepcopy(ref_state))  # a loaded optimizer shares the state's tensors
    rng = np.random.default_rng(99)  # the same new batches for both
    train((resumed, ref), 2)
    for name, t in zip(resumed.param_names, resumed.params):
        r = dict(zip(ref.param_names, ref.params))[name]
        assert torch.allclose(t, r, rtol=1e-4, atol=1e-6), (rank, kind, name)
    assert resumed.updates == ref.updates
print(f"rank {rank} stage {learner.stage}: OK")
