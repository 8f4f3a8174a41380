"""train.ema_decay: the moving average of the parameters that evaluations, the best model and
``mpidqn evaluate`` use, while acting and learning stay on the online parameters."""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import mpidqn, run
from mpidqn.train.policy import load_network
from mpidqn.io.runlog import read_log
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.nn.mlp import mlp_layers
from mpidqn.train.checkpoints import read_model, resolve


def _learner(decay: float, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    return Learner(torch.nn.Sequential(*mlp_layers(3, 4, [16])), Hyper(lr=0.5, ema_decay=decay), MPI.COMM_SELF)


def _steps(learner: Learner, n: int) -> list[list[torch.Tensor]]:
    """n big updates (the greedy actions change); the parameters after each."""
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32))
    after = []
    for i in range(n):
        learner.backward(x, torch.full((32,), i % 4, dtype=torch.long), torch.full((32,), 100.0 * (i + 1)))
        learner.step()
        after.append([p.detach().clone() for p in learner.params])
    return after


def _greedy(weights: list[torch.Tensor], obs: np.ndarray) -> np.ndarray:
    net = torch.nn.Sequential(*mlp_layers(3, 4, [16]))
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.copy_(w)
        return net(torch.from_numpy(obs)).argmax(1).numpy()


def test_average_follows_the_recurrence_from_the_first_update():
    learner = _learner(0.75)
    assert learner.ema is None  # nothing to average before the first update
    after = _steps(learner, 6)
    expected = [t.clone() for t in after[0]]
    for params in after[1:]:
        expected = [e + 0.25 * (p - e) for e, p in zip(expected, params)]
    assert all(torch.allclose(a, e, atol=1e-6, rtol=1e-5) for a, e in zip(learner.ema, expected))
    assert not all(torch.equal(a, p) for a, p in zip(learner.ema, after[-1]))  # it lags the online weights


def test_evaluation_weights_act_with_the_average_and_restore_the_online_weights():
    learner = _learner(0.5)
    _steps(learner, 2)
    torch.manual_seed(3)  # an average far from the online weights, so the greedy actions differ
    learner.ema = [torch.randn_like(p) for p in learner.params]
    online = [p.detach().clone() for p in learner.params]
    obs = np.random.default_rng(2).normal(size=(48, 3)).astype(np.float32)
    acting = learner.greedy_actions(obs)  # the numpy actor's path (<= 64 rows) caches the weights
    assert np.array_equal(acting, _greedy(online, obs))
    assert not np.array_equal(_greedy(learner.ema, obs), acting)  # the test can tell them apart
    with learner.evaluation_weights():
        assert np.array_equal(learner.greedy_actions(obs), _greedy(learner.ema, obs))
        # more than 64 rows: the torch path
        assert np.array_equal(learner.greedy_actions(np.concatenate([obs, obs]))[48:], _greedy(learner.ema, obs))
    assert all(torch.equal(p, o) for p, o in zip(learner.params, online))
    assert np.array_equal(learner.greedy_actions(obs), acting)
    with pytest.raises(RuntimeError), learner.evaluation_weights():
        raise RuntimeError("an evaluation that fails")
    assert all(torch.equal(p, o) for p, o in zip(learner.params, online))


def test_average_round_trips_through_the_model_state_and_is_absent_with_decay_0():
    a = _learner(0.5)
    _steps(a, 5)
    state = copy.deepcopy(a.state_dict())  # a live learner's state shares its tensors
    assert set(state["ema"]) == set(a.param_names)
    b = _learner(0.5, seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(a.ema, b.ema))
    _steps(a, 2)
    _steps(b, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.ema, b.ema))
    plain = _learner(0.0)
    _steps(plain, 3)
    assert plain.ema is None and "ema" not in plain.state_dict()
    online = [p.detach().clone() for p in plain.params]
    with plain.evaluation_weights():
        assert all(torch.equal(p, o) for p, o in zip(plain.params, online))
    plain.load_state_dict(state)  # a state with an average, loaded without train.ema_decay: ignored
    assert plain.ema is None
    b.load_state_dict(plain.state_dict())  # a state without one: the average restarts at the next update
    assert b.ema is None
    _steps(b, 1)
    assert all(torch.equal(e, p) for e, p in zip(b.ema, b.params))


@pytest.mark.parametrize("n, extra", [(1, []), (2, ["parallel.pipeline_stages=2"])])
def test_runs_evaluate_the_average_and_evaluate_serves_it(tmp_path, tiny, n, extra):
    """The run's final evaluation and ``mpidqn evaluate`` of its checkpoint judge the same (averaged)
    network, also when a pipeline's stages each hold part of it; ``--online`` judges the online one."""
    run_dir = tmp_path / "r"
    args = [*tiny, "train.ema_decay=0.9", "eval.episodes=4", *extra]
    p = mpidqn(n, ["--run-dir", str(run_dir), *args], timeout=240)
    assert p.returncode == 0, p.stderr
    final = read_log(run_dir / "log.h5").tables["evaluations"][-1]
    cli = [sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--json", "--episodes", "4"]
    averaged, online = (json.loads(run(c).stdout) for c in (cli, [*cli, "--online"]))
    assert averaged["weights"] == "moving average" and online["weights"] == "online"
    assert averaged["mean"] == pytest.approx(float(final["mean"]))
    info = json.loads(run([sys.executable, "-m", "mpidqn", "inspect", str(run_dir), "--json"]).stdout)
    assert info["evaluated_weights"] == "moving average (train.ema_decay=0.9)"
    ckpt = resolve(str(run_dir))
    model = read_model(ckpt)
    assert set(model["ema"]) == set(model["online"])  # every stage's share of the average was saved
    for online_flag, part in ((False, "ema"), (True, "online")):
        _, net, _ = load_network(ckpt, online=online_flag)
        served = dict(net.state_dict())
        assert all(torch.equal(served[k], v) for k, v in model[part].items()), part
    assert any(not torch.equal(model["ema"][k], model["online"][k]) for k in model["ema"])
