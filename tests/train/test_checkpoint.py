"""Checkpoints: HDF5 round trips, exact and elastic resume, kill -9 safety, corruption, signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import MPI_SCRIPTS, _env, inspect_json, mpidqn, mpiexec, mpirun, run
from mpidqn.train.checkpoints import MARKER, CheckpointManager, find_latest, read_best, read_model, step_dir_name
from mpidqn.io.runlog import read_log
from mpidqn.io.h5tree import Json, read_tree, write_tree
from mpidqn.learners.data_parallel import Hyper, Learner
from mpidqn.learners.optim import optimizer_hparams
from mpidqn.nn.mlp import mlp_layers


def test_tree_round_trip_preserves_types(tmp_path):
    tree = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "t": torch.ones(2, dtype=torch.float64),
            "b": b"\x00pickle\xff", "j": Json({"state": {"s": 2 ** 100}}), "n": 3, "x": 0.5, "s": "txt",
            "g": {"ring": {"obs": np.zeros((0, 4), np.float32)}, "size": 0}}
    with h5py.File(tmp_path / "t.h5", "w") as f:
        write_tree(f, tree)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        back = read_tree(f)
    assert back["a"].dtype == np.int16 and np.array_equal(back["a"], tree["a"])
    assert back["t"].dtype == torch.float64 and torch.equal(back["t"], tree["t"])
    assert back["b"] == tree["b"] and back["j"] == {"state": {"s": 2 ** 100}}
    assert (back["n"], back["x"], back["s"], back["g"]["size"]) == (3, 0.5, "txt", 0)
    assert back["g"]["ring"]["obs"].shape == (0, 4)


@pytest.mark.parametrize("optimizer, compiled, keys", [("adam", False, {"step", "exp_avg", "exp_avg_sq"}),
                                                       ("rmsprop", False, {"step", "square_avg", "grad_avg"}),
                                                       ("rmsprop", True, {"step", "square_avg", "grad_avg"})])
def test_learner_state_round_trip_through_hdf5(tmp_path, optimizer, compiled, keys):
    def make(seed):
        torch.manual_seed(seed)
        return Learner(torch.nn.Sequential(*mlp_layers(3, 2, [8], dueling=True)),
                       Hyper(lr=1e-2, optimizer=optimizer, compile_optimizer=compiled), MPI.COMM_SELF)

    a = make(0)
    x = torch.randn(5, 3)
    for _ in range(3):
        a.backward(x, torch.zeros(5, dtype=torch.long), a.targets(torch.ones(5), x, torch.full((5,), 0.9)))
        a.step()
    with h5py.File(tmp_path / "m.h5", "w") as f:
        write_tree(f, {"model": a.state_dict()})
    with h5py.File(tmp_path / "m.h5", "r") as f:
        state = read_tree(f["model"])
    assert "adam" not in state and "adam_hparams" not in state
    assert all(set(st) == keys for st in state["optimizer"].values())  # Adam or RMSprop alike
    b = make(1)
    b.load_state_dict(state)
    assert b.updates == 3
    groups = [json.dumps(optimizer_hparams(m.optimizer)) for m in (a, b)]  # Adam's betas: tuple -> list
    assert groups[0] == groups[1]
    # a compiled step keeps its tensor learning rate across a load (a float would recompile it)
    assert isinstance(b.optimizer.param_groups[0]["lr"], torch.Tensor) == compiled
    for (n, p), q in zip(a.online.named_parameters(), b.online.parameters()):
        assert torch.equal(p, q), n
    # identical next step => optimizer state (moments, step count) came back too
    for m in (a, b):
        m.backward(x, torch.ones(5, dtype=torch.long), m.targets(torch.ones(5), x, torch.full((5,), 0.9)))
        m.step()
    for p, q in zip(a.online.parameters(), b.online.parameters()):
        assert torch.equal(p, q)


def test_optimizer_state_of_the_other_kind_is_refused():
    def make(optimizer):
        torch.manual_seed(0)
        return Learner(torch.nn.Sequential(*mlp_layers(3, 2, [8])), Hyper(optimizer=optimizer), MPI.COMM_SELF)

    adam = make("adam")
    x = torch.randn(4, 3)
    adam.backward(x, torch.zeros(4, dtype=torch.long), torch.ones(4))
    adam.step()
    with pytest.raises(ValueError, match="holds adam optimizer state, but train.optimizer is rmsprop"):
        make("rmsprop").load_state_dict(adam.state_dict())


def test_resume_with_another_optimizer_is_refused():
    from types import SimpleNamespace

    from mpidqn.config import load_config
    from mpidqn.errors import UserError
    from mpidqn.train.rundir import check_compatible

    ckpt = SimpleNamespace(path="run/checkpoints/step_000000001200", config=lambda: load_config())  # Adam
    check_compatible(ckpt, load_config(None, ["train.adam_eps=1e-6"]))  # other hyper-parameters are fine
    with pytest.raises(UserError) as e:
        check_compatible(ckpt, load_config(None, ["train.optimizer=rmsprop"]))
    assert str(e.value) == ("checkpoint run/checkpoints/step_000000001200 is incompatible: train.optimizer is "
                            "'adam' there and 'rmsprop' here")


def _model_tensors(run_dir):
    ckpt = find_latest(run_dir / "checkpoints")
    return ckpt, read_model(ckpt)


def test_model_files_of_older_versions_with_adam_keys_still_load(tmp_path):
    """Model files written before the rename hold the optimizer state under "adam"/"adam_hparams"
    (whichever optimizer it was): read_model and load_state_dict read them as the new keys."""
    from mpidqn.train.checkpoints import read_model

    def make(seed):
        torch.manual_seed(seed)
        return Learner(torch.nn.Sequential(*mlp_layers(3, 2, [8])), Hyper(lr=1e-2, optimizer="rmsprop"), MPI.COMM_SELF)

    a = make(0)
    x = torch.randn(5, 3)
    a.backward(x, torch.zeros(5, dtype=torch.long), a.targets(torch.ones(5), x, torch.full((5,), 0.9)))
    a.step()
    new = a.state_dict()
    old = {k: v for k, v in new.items() if k not in ("optimizer", "optimizer_hparams")}
    old["adam"], old["adam_hparams"] = new["optimizer"], new["optimizer_hparams"]
    with h5py.File(tmp_path / "model_s0.h5", "w") as f:
        write_tree(f, {"model": old})

    class OldCheckpoint:
        def model_files(self):
            return [tmp_path / "model_s0.h5"]

    merged = read_model(OldCheckpoint())
    assert set(merged["optimizer"]) == set(new["optimizer"]) and "adam" not in merged
    for state in (merged, old):  # through read_model, and a legacy state handed over directly
        b = make(1)
        b.load_state_dict(state)
        assert b.updates == 1 and b.lr == pytest.approx(1e-2)
        for k, st in b.state_dict()["optimizer"].items():
            for name, t in st.items():
                assert torch.equal(t, new["optimizer"][k][name]), (k, name)


@pytest.mark.parametrize("n,extra", [(1, []), (1, ["train.compile_network=true"]), (2, []), (2, ["train.prioritized=true"]),
                                     (2, ["train.prioritized=true", "parallel.pipeline_stages=2",
                                          "train.ema_decay=0.9"]),
                                     (2, ["train.prioritized=true", "network.distributional=true",
                                          "network.noisy=true", "network.dueling=true"])])
def test_exact_resume_is_bit_identical(tmp_path, tiny, n, extra):
    """Also with a compiled network (recompiled by the resumed process), prioritized replay (global
    sampling: priorities, sum-trees, running maximum, shared stream), a pipeline's stages with the
    moving average of their parameters, and Rainbow's C51 and noisy layers (learning and acting noise
    streams)."""
    args = [*tiny, "train.total_steps=2400", "checkpoint.interval_steps=0", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    assert mpidqn(n, ["--run-dir", str(a), *args], timeout=180).returncode == 0
    first = mpidqn(n, ["--run-dir", str(b), *args], env={"MPIDQN_FAULT": "stop:0:1100"}, timeout=180)
    assert first.returncode == 75, first.stderr
    stopped = inspect_json(b)["step"]
    assert 1100 <= stopped < 2400
    second = mpidqn(n, ["--run-dir", str(b), "--resume", *args], timeout=180)
    assert second.returncode == 0, second.stderr
    assert "resumed (exact)" in second.stdout + second.stderr
    (ca, ma), (cb, mb) = _model_tensors(a), _model_tensors(b)
    assert ca.step == cb.step == 2400 and ma["updates"] == mb["updates"]
    assert bool(ma["ema"]) == ("train.ema_decay=0.9" in extra) and set(ma["ema"]) == set(mb["ema"])
    for part in ("online", "target", "ema"):
        for name in ma[part]:
            assert torch.equal(ma[part][name], mb[part][name]), (part, name)
    assert bool(ma["noise"]) == ("network.noisy=true" in extra) and ma["noise"] == mb["noise"]
    for name in ma["optimizer"]:
        for k in ma["optimizer"][name]:
            assert torch.equal(ma["optimizer"][name][k], mb["optimizer"][name][k]), (name, k)


def test_checkpoint_without_replay_resumes_elastically_and_refills_before_updating(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = [*tiny, "checkpoint.replay=false"]  # tiny: learning_starts 200, a round of 4 updates per 100 steps
    assert mpidqn(2, ["--run-dir", str(run_dir), *args], timeout=180).returncode == 0
    first = inspect_json(run_dir)
    assert (first["step"], first["updates"], first["replay_transitions"]) == (1200, 44, 0)
    ckpt = find_latest(run_dir / "checkpoints")
    for rank in range(2):
        with h5py.File(ckpt.file(f"rank_{rank:05d}.h5"), "r") as h:
            assert "replay" not in h and "counters" in h  # no replay at all, not an empty one
    more = mpidqn(1, ["--run-dir", str(run_dir), *args, "train.total_steps=1600"], timeout=180)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "resumed (elastic)" in more.stdout
    info = inspect_json(run_dir)
    # the empty replay refills to learning_starts (steps 1201..1400) before the rounds at 1400, 1500, 1600
    assert (info["step"], info["world_size"], info["replay_transitions"]) == (1600, 1, 0)
    assert info["updates"] == 44 + 3 * 4


@pytest.mark.parametrize("old, new, extra", [(4, 2, []), (2, 4, []), (3, 1, []), (3, 2, ["train.prioritized=true"]),
                                            (2, 1, ["train.prioritized=true", "network.distributional=true",
                                                    "network.noisy=true", "parallel.pipeline_stages=2"])])
def test_elastic_resume_keeps_every_transition_once(tmp_path, tiny, old, new, extra):
    """Prioritized: every transition keeps its priority, and the run's maximum priority carries over.
    Rainbow (C51 and noisy layers, written by a 2-stage pipeline): the noise streams carry over too."""
    run_dir = tmp_path / "r"
    args = [*tiny, *extra, "train.total_steps=1200", "train.buffer_size=5000"]
    assert mpidqn(old, ["--run-dir", str(run_dir), *args], timeout=240).returncode == 0
    check = mpirun(new, [str(MPI_SCRIPTS / "elastic_check.py"), str(run_dir)], timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"OK elastic {old}->{new}: 1200 transitions" in check.stdout
    if (old, new) == (4, 2):  # and the real command continues on the new world size
        more = mpidqn(new, ["--run-dir", str(run_dir), *args[:-2], "train.total_steps=1600",
                            "train.buffer_size=5000"], timeout=180)
        assert more.returncode == 0, more.stderr
        assert "resumed (elastic)" in more.stdout
        info = inspect_json(run_dir)
        assert (info["step"], info["world_size"], info["replay_transitions"]) == (1600, 2, 1600)


@pytest.mark.parametrize("old, new, extra", [(2, 3, ["train.prioritized=true"]), (3, 2, [])])
def test_an_elastic_resume_onto_a_world_that_does_not_divide_the_batch_completes(tmp_path, tiny, old, new, extra):
    """Issue #35: the default global batch of 64 at 3 ranks (a requeue's allocation) is split 22, 21, 21
    instead of refused, before and after an elastic resume."""
    run_dir = tmp_path / "r"
    args = ["--run-dir", str(run_dir), *tiny, *extra, "train.batch_size=64"]
    p = mpidqn(old, args, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    first = inspect_json(run_dir)["updates"]
    more = mpidqn(new, [*args, "train.total_steps=1600"], timeout=240)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "resumed (elastic)" in more.stdout
    info = inspect_json(run_dir)
    assert (info["world_size"], info["updates"]) == (new, first + 4 * 4)  # the rounds at 1300 .. 1600
    assert 1600 <= info["step"] < 1600 + new  # 3 ranks step 3 at a time


def test_kill_9_during_checkpoint_write_leaves_previous_loadable(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = [*tiny, "train.total_steps=2400", "checkpoint.interval_steps=800"]
    p = mpidqn(2, ["--run-dir", str(run_dir), *args], env={"MPIDQN_FAULT": "kill_in_checkpoint:1:1600"}, timeout=120)
    assert p.returncode != 0
    dirs = sorted(d.name for d in (run_dir / "checkpoints").iterdir())
    assert dirs == ["step_000000000800", "step_000000001600"]
    assert not (run_dir / "checkpoints" / "step_000000001600" / MARKER).exists()
    assert inspect_json(run_dir)["step"] == 800
    resumed = mpidqn(2, ["--run-dir", str(run_dir), *args], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed (exact)" in resumed.stdout and inspect_json(run_dir)["step"] == 2400
    # the stale partial directory is gone, and only `keep` complete checkpoints remain (TINY evaluates
    # only at the end, so the best evaluation's checkpoint is the newest one)
    steps = sorted(d.name for d in (run_dir / "checkpoints").iterdir() if d.name.startswith("step_"))
    assert steps == ["step_000000001600", "step_000000002400"]
    assert read_best(run_dir / "checkpoints")["step"] == 2400


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path, tiny, damage):
    run_dir = tmp_path / "r"
    assert mpidqn(1, ["--run-dir", str(run_dir), *tiny, "checkpoint.interval_steps=600"]).returncode == 0
    victim = run_dir / "checkpoints" / "step_000000001200" / "rank_00000.h5"
    data = bytearray(victim.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    p = run([sys.executable, "-m", "mpidqn", "inspect", str(run_dir), "--json"])
    assert p.returncode == 0
    assert json.loads(p.stdout.splitlines()[-1])["step"] == 600
    expected = "is corrupted (CRC32 mismatch)" if damage == "corrupt" else "is truncated"
    notes = [ln for ln in p.stdout.splitlines()[:-1] if ln.strip()]
    assert len(notes) == 1 and "step_000000001200" in notes[0] and expected in notes[0], p.stdout


def test_signal_to_one_rank_checkpoints_and_exits_75(tmp_path, tiny):
    run_dir = tmp_path / "sig"
    cmd = [*mpiexec(2), sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), *tiny,
           "train.total_steps=10000000", "log.interval_steps=200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step"):
                break
        ranks = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_rank(int(p), str(run_dir))]
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGUSR1)  # one rank only: the others must agree and follow
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, err
    assert "exit 75 = resubmit me" in out
    info = inspect_json(run_dir)
    assert info["complete"] and 0 < info["step"] < 10_000_000


def _is_rank(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"python" in argv[0] and b"mpiexec" not in b" ".join(argv) and marker.encode() in b" ".join(argv)


def test_wall_clock_checkpoints_and_plain_h5py_readability(tmp_path, tiny):
    run_dir = tmp_path / "r"
    # 0.6 ms: due at every agreement of the ranks (every 256 steps) however fast the machine runs; at 30 ms
    # a fast machine ran the 1,200 steps with a single time-triggered checkpoint
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "checkpoint.interval_steps=0", "checkpoint.interval_minutes=0.00001",
                   "checkpoint.keep=100"], timeout=120)
    assert p.returncode == 0, p.stderr
    steps = sorted(int(d.name.split("_")[1]) for d in (run_dir / "checkpoints").iterdir() if d.name.startswith("step_"))
    assert len(steps) >= 3 and steps[-1] == 1200  # time-triggered ones plus the final one
    newest = run_dir / "checkpoints" / f"step_{steps[-1]:012d}"
    script = (
        "import sys, json, h5py\n"
        f"m = h5py.File({str(newest / 'model_s0.h5')!r}, 'r')\n"
        f"r = h5py.File({str(newest / 'rank_00001.h5')!r}, 'r')\n"
        "assert m.attrs['step'] == 1200 and m.attrs['world_size'] == 2 and 'torch' in json.loads(m.attrs['versions'])\n"
        "assert m['model/online/1.weight'].shape == (32, 4) and m['model/online/1.weight'].attrs['torch_dtype'] == 'float32'\n"
        "assert r['replay/ring'].attrs['size'] == 600 and r['replay/ring/obs'].shape == (600, 4)\n"
        "assert r['counters'].attrs['env_steps'] == 1200 and 'train:' in r.attrs['config']\n"
        "assert not any(k.startswith('mpidqn') for k in sys.modules)\n"
        "print('plain h5py OK')\n")
    out = run([sys.executable, "-c", script])
    assert out.returncode == 0 and "plain h5py OK" in out.stdout, out.stderr


def test_pruning_never_removes_the_best_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300, 400):
        (root / step_dir_name(step)).mkdir(parents=True)
        (root / step_dir_name(step) / MARKER).write_text("{}")
    manager = CheckpointManager(tmp_path, MPI.COMM_SELF, keep=1, attrs={}, say=print)
    manager.mark_best(200, 321.0, 10)
    assert sorted(p.name for p in root.iterdir()) == ["BEST", step_dir_name(200), step_dir_name(400)]
    assert read_best(root) == {"step": 200, "score": 321.0, "episodes": 10, "dir": step_dir_name(200)}
    again = CheckpointManager(tmp_path, MPI.COMM_SELF, keep=1, attrs={}, say=print)  # a resumed job
    assert again.best_step == 200
    manager.mark_best(400, 500.0, 10)  # a better evaluation: the old best becomes prunable
    assert sorted(p.name for p in root.iterdir()) == ["BEST", step_dir_name(400)]


def test_best_evaluation_checkpoint_is_kept_and_served(tmp_path, tiny):
    run_dir = tmp_path / "r"
    args = [*tiny, "train.total_steps=3000", "eval.interval_steps=300", "checkpoint.interval_steps=600",
            "checkpoint.keep=1"]
    assert mpidqn(1, ["--run-dir", str(run_dir), *args], timeout=240).returncode == 0
    evals = read_log(run_dir / "log.h5").tables["evaluations"]
    first_best = evals[int(np.argmax(evals["mean"]))]
    best = read_best(run_dir / "checkpoints")
    assert best["step"] == first_best["step"] and best["score"] == pytest.approx(first_best["mean"])
    assert (run_dir / "checkpoints" / best["dir"] / MARKER).exists()  # complete, whatever keep says
    info = inspect_json(run_dir)
    assert info["step"] == 3000 and info["best"]["step"] == best["step"]
    p = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--best", "--json", "--episodes", "2"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["step"] == best["step"]


def test_exact_resume_of_envs_that_pickle_only_their_arguments(tmp_path, tiny):
    """LunarLander (Box2D, EzPickle) pickles its constructor arguments, not its state: its checkpoint
    holds no envs and the resume starts new episodes instead of stepping an un-reset env."""
    pytest.importorskip("Box2D", reason="LunarLander needs the box2d extra")
    run_dir = tmp_path / "r"
    args = ["--run-dir", str(run_dir), *tiny, "env.id=LunarLander-v3"]
    p = mpidqn(1, args, env={"MPIDQN_FAULT": "stop:0:500"}, timeout=180)
    assert p.returncode == 75, p.stderr[-2000:]
    with h5py.File(find_latest(run_dir / "checkpoints").file("rank_00000.h5"), "r") as h:
        assert h["envs/pickle"].shape == (0,)  # nothing to restore from
    p = mpidqn(1, args, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed (exact)" in p.stdout and inspect_json(run_dir)["step"] == 1200
