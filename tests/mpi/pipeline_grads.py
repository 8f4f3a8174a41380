"""Run under mpiexec -n W with argument S: a pipeline of S stages (dp = W / S groups) computes the same
averaged, globally clipped gradient and takes the same optimizer steps as ONE unpartitioned learner on
the union of all W minibatches (double DQN and dueling on). Also checks greedy actions against it.
Optional arguments: micro-batches (default 3), the optimizer, adam (default) or rmsprop,
train.advantage_learning's alpha and train.target_regularization's kappa (defaults 0), and "rainbow":
C51 atoms in the last stage and noisy layers in every stage (the same noise as the unpartitioned model),
or "qr": QR-DQN quantiles in the last stage with noisy layers."""
from __future__ import annotations

import sys

import numpy as np
import torch
from mpi4py import MPI

from mpidqn.algo.categorical import Categorical
from mpidqn.algo.quantile import Quantile
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import linear_factory, mlp_layers
from mpidqn.learners.pipeline import PipelineLearner
from mpidqn.replay.shard import Batch
from mpidqn.distributed.topology import Topology

S = int(sys.argv[1])
MICRO = int(sys.argv[2]) if len(sys.argv) > 2 else 3
OPTIMIZER = sys.argv[3] if len(sys.argv) > 3 else "adam"
ALPHA = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
KAPPA = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
HEAD = sys.argv[6] if len(sys.argv) > 6 else "q"
RAINBOW = HEAD in ("rainbow", "qr")
ATOMS = 11 if RAINBOW else 1
topo = Topology.build(MPI.COMM_WORLD, S)
rank, world = topo.rank, topo.world
torch.set_num_threads(1)
B, OBS, ACT, HIDDEN, SEED = 8, 5, 3, [16, 12, 16], 7
hyper = Hyper(lr=1e-2, optimizer=OPTIMIZER, double_dqn=True, max_grad_norm=0.5, target_update_interval=2,
              sync_check_interval=1, advantage_learning=ALPHA, target_regularization=KAPPA,
              distribution=(Categorical(ATOMS, -3.0, 3.0) if HEAD == "rainbow" else Quantile(ATOMS, 0.5) if HEAD == "qr"
                            else None), noise_seed=3)


def layers():
    torch.manual_seed(SEED)
    return mlp_layers(OBS, ACT, HIDDEN, dueling=True, num_atoms=ATOMS, linear=linear_factory(RAINBOW))


pipe = PipelineLearner(layers(), (OBS,), hyper, topo.pp_comm, topo.dp_comm, micro_batches=MICRO)
reference = Learner(torch.nn.Sequential(*layers()), hyper, MPI.COMM_SELF)
assert len(pipe.params) < len(reference.params), "a stage must not hold the whole network"


def global_batch(rng, rows):
    return Batch(rng.normal(size=(rows, OBS)).astype(np.float32), rng.integers(ACT, size=rows),
                 rng.normal(size=rows).astype(np.float32), rng.normal(size=(rows, OBS)).astype(np.float32),
                 ((rng.random(rows) > 0.2) * 0.99).astype(np.float32))


def check(what):
    ref = dict(zip(reference.param_names, reference.params))
    ref_grad = {n: p.grad for n, p in ref.items()}
    for name, p in zip(pipe.param_names, pipe.params):
        assert torch.allclose(p.grad, ref_grad[name], rtol=1e-4, atol=1e-6), (
            rank, what, name, (p.grad - ref_grad[name]).abs().max().item())
        assert torch.allclose(p, ref[name], rtol=1e-4, atol=1e-6), (rank, what, name)


rng = np.random.default_rng(123)  # the same global batch on every rank
for it in range(4):
    U = 1 if it < 3 else 2  # the last round has 2 updates per update_many
    full = global_batch(rng, U * world * B)
    # rank r samples rows r*B..(r+1)*B of every update u (the layout sample_many returns)
    per = [Batch(*(a.reshape(U, world, B, *a.shape[1:])[:, r].reshape(U * B, *a.shape[1:]) for a in full))
           for r in range(world)]
    pipe.update_many(per[rank], U)
    reference.update_many(full, U)  # update u of `full` is the union of every rank's u-th minibatch
    check(f"round {it}")

# greedy actions: each rank brings its own rows (different counts), gets the unpartitioned argmax back
obs = rng.normal(size=(rank + 1, OBS)).astype(np.float32)
mine = pipe.greedy_actions(obs)
assert np.array_equal(mine, reference.greedy_actions(obs)), (rank, mine)
# metrics are known on every stage
assert np.isfinite(pipe.pop_metrics()["loss"])
state = pipe.state_dict()
assert set(state["online"]) == {n for n in reference.online.state_dict() if n.split(".")[0] in
                                {str(i) for i in range(*pipe.layer_span)}}
print(f"rank {rank} stage {pipe.stage}: OK")
