"""The Python API: ``mpidqn.train`` in this process and under mpiexec, ``load_policy``, ``load_run``."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import yaml

import mpidqn
from conftest import TINY, inspect_json, mpirun, run
from mpidqn.api import flat_overrides
from mpidqn.errors import UserError


def tiny_overrides() -> dict[str, object]:
    """TINY as Python values, dotted keys."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in TINY)}


def test_import_mpidqn_is_light():
    code = ("import sys, mpidqn; from mpidqn import train, load_policy, load_run; "
            "print(sorted(m for m in ('torch', 'mpi4py', 'pandas', 'gymnasium') if m in sys.modules))")
    p = run([sys.executable, "-c", code])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_overrides_dotted_and_nested_are_the_same():
    assert list(flat_overrides({"train.lr": 1e-3, "seed": 3, "eval": {"episodes": 4, "stop_at": 10}})) == [
        ("train.lr", 1e-3), ("seed", 3), ("eval.episodes", 4), ("eval.stop_at", 10)]


def test_train_in_process_then_load_policy_and_run(tmp_path):
    run_dir = tmp_path / "api"
    overrides = {**tiny_overrides(), "eval.interval_steps": 600}
    result = mpidqn.train(None, run_dir, seed=5, train={"lr": 2e-3}, **overrides)
    assert result.finished and result.exit_code == 0 and result.run_dir == run_dir
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["seed"], saved["train"]["lr"], saved["train"]["total_steps"]) == (5, 2e-3, 1200)
    assert inspect_json(run_dir)["step"] == 1200

    best = yaml.safe_load((run_dir / "checkpoints" / "BEST").read_text())
    policy = mpidqn.load_policy(run_dir)  # best=True: the best evaluation's checkpoint
    assert policy.step == best["step"] and policy.n_actions == 2 and policy.observation_shape == (4,)
    assert mpidqn.load_policy(run_dir, best=False).step == 1200
    env = policy.make_env()
    obs, _ = env.reset(seed=0)
    batch = np.stack([obs, -obs, 2 * obs])
    single = policy.predict(obs)
    assert isinstance(single, np.integer) and single == np.argmax(policy.q_values(obs))
    actions = policy.predict(batch)
    assert actions.shape == (3,) and actions.dtype == np.int64
    assert list(actions) == [policy.predict(o) for o in batch]
    env.step(single)  # an action the env accepts
    env.close()
    with pytest.raises(ValueError, match=r"observations of shape \(3,\): the policy wants \(4,\)"):
        policy.predict(np.zeros(3))

    log = mpidqn.load_run(run_dir)
    assert list(log.evaluations["step"]) == [600, 1200]
    assert log.scalars["step"].iloc[-1] == 1200


def test_train_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(UserError, match="train.lrr: unknown config key"):
        mpidqn.train(None, tmp_path / "bad", **{"train.lrr": 1e-3})
    with pytest.raises(UserError, match="train.lr: expected a number"):
        mpidqn.train(None, tmp_path / "bad", train={"lr": "fast"})
    assert not (tmp_path / "bad").exists()


def test_train_under_mpiexec(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, mpidqn\n"
        "from mpi4py import MPI\n"
        f"overrides = {tiny_overrides()!r}\n"
        "result = mpidqn.train(None, sys.argv[1], **overrides)\n"
        "with open(f'{sys.argv[1]}.rank{MPI.COMM_WORLD.Get_rank()}', 'w') as f:\n"
        "    f.write(f'{result.exit_code} {result.run_dir}')\n")
    run_dir = tmp_path / "mpi"
    p = mpirun(2, [str(script), str(run_dir)], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    for rank in range(2):  # every rank returns the same result
        assert (tmp_path / f"mpi.rank{rank}").read_text() == f"0 {run_dir}"
    assert inspect_json(run_dir)["world_size"] == 2
