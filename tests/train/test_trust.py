"""A run directory from someone else runs none of their code (issue #37): the env state of a
checkpoint is unpickled only when this user's secret signed it, or with --trust-run-dir."""
from __future__ import annotations

import json
import os
import pickle
import re
import stat
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MPI_SCRIPTS, inspect_json, mpidqn, mpirun, program_lines, run
from mpidqn.envs.snapshot import TRUST_HINT, restore_envs, seal_envs
from mpidqn.errors import UserError
from mpidqn.envs.vector import make_vector_env
from mpidqn.io.trust import Trust, load_or_create_secret, load_trust, read_secret, secret_path, sign, signed_with
from mpidqn.train.checkpoints import MARKER, find_latest


class Payload:
    """Unpickling it runs ``touch <path>``: the issue's reproduction."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def replace_env_pickle(ckpt_dir: Path, rank: int, data: bytes, signature: str | None = None) -> None:
    """What an attacker can do to a run directory: swap a rank file's ``envs/pickle`` (keeping its
    ``bytes`` attribute), set or drop the signature, and recompute the file's size and CRC32 in COMPLETE."""
    name = f"rank_{rank:05d}.h5"
    with h5py.File(ckpt_dir / name, "r+") as h:
        del h["envs/pickle"]
        h["envs"].create_dataset("pickle", data=np.void(data)).attrs["bytes"] = 1
        if signature is None:
            h["envs"].attrs.pop("signature", None)
        else:
            h["envs"].attrs["signature"] = signature
    manifest = json.loads((ckpt_dir / MARKER).read_text())
    raw = (ckpt_dir / name).read_bytes()
    manifest["files"][name] = {"bytes": len(raw), "crc32": zlib.crc32(raw)}
    (ckpt_dir / MARKER).write_text(json.dumps(manifest))


def warnings(text: str) -> list[str]:
    return [line for line in program_lines(text) if "warning" in line]


# ------------------------------------------------------------------ the secret and its signatures


def test_secret_is_created_once_private_and_reused(tmp_path):
    path = secret_path({"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert path == tmp_path / "cfg" / "mpidqn" / "secret"
    key = load_or_create_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(key) == 32 and load_or_create_secret(path) == key and read_secret(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left behind


def test_a_secret_others_can_read_is_not_used(tmp_path):
    path = tmp_path / "secret"
    load_or_create_secret(path)
    path.chmod(0o644)
    trust = load_trust(False, path)
    assert trust.key is None and "chmod 600" in trust.problem


def test_signatures_verify_only_the_signed_bytes_under_the_same_key():
    key, other = b"k" * 32, b"o" * 32
    sig = sign(key, b"envs")
    assert signed_with(key, b"envs", sig)
    assert not signed_with(other, b"envs", sig) and not signed_with(key, b"envs!", sig)
    for bad in ("", "é" * 64, 7, None, np.zeros(3)):  # whatever a file holds: False, never an exception
        assert not signed_with(key, b"envs", bad)


# ------------------------------------------------------------------ restoring a rank's envs


@pytest.fixture
def envs():
    e = make_vector_env("CartPole-v1", 2)
    e.reset(seed=[1, 2])
    yield e
    e.close()


def test_own_signed_envs_are_restored_and_nothing_else_is(envs, tmp_path):
    key = b"s" * 32
    obs = np.zeros((2, 4), np.float32)
    saved = seal_envs(envs, obs, key)
    back, back_obs, why = restore_envs(saved, Trust(key), envs)
    assert why is None and back.num_envs == 2 and back_obs is obs
    back.close()
    for trust in (Trust(b"x" * 32), Trust(None, problem="no usable secret (test)")):
        assert restore_envs(saved, trust, envs)[:2] == (None, None)
        assert restore_envs(saved, trust, envs)[2].endswith(TRUST_HINT)
    marker = tmp_path / "PWNED"
    poisoned = {**saved, "pickle": pickle.dumps(Payload(marker))}
    assert restore_envs(poisoned, Trust(key), envs)[2].startswith("it is not signed with your secret")
    assert restore_envs({**poisoned, "signature": ""}, Trust(key), envs)[2].startswith("it is not signed")
    assert not marker.exists()


def test_trusted_but_unusable_env_state_is_refused_in_one_phrase(envs):
    key = b"s" * 32
    obs = np.zeros((2, 4), np.float32)
    data = seal_envs(envs, obs, key)["pickle"]
    cases = {
        data[: len(data) // 2]: "cannot be unpickled",  # truncated
        b"\x80\x05garbage": "cannot be unpickled",
        pickle.dumps(7): "holds a int, not a vector env",
        pickle.dumps(make_vector_env("CartPole-v1", 3)): "holds 3 envs, this run 2",
    }
    for blob, phrase in cases.items():
        for trust in (Trust(key), Trust(None, run_dir_trusted=True)):  # signed by this user, or trusted
            saved = {"pickle": blob, "signature": sign(key, blob), "obs": obs}
            back, _, why = restore_envs(saved, trust, envs)
            assert back is None and phrase in why and "\n" not in why
    saved = seal_envs(envs, np.zeros((2, 5), np.float32), key)
    assert "observations" in restore_envs(saved, Trust(key), envs)[2]
    assert restore_envs({**saved, "pickle": b""}, Trust(key), envs) == (None, None, "")  # nothing saved: quiet


# ------------------------------------------------------------------ the reproduction, end to end


@pytest.fixture
def poisoned_run(tmp_path, tiny):
    """A finished 1-rank run whose newest checkpoint's env pickle runs ``touch PWNED`` when unpickled."""
    run_dir = tmp_path / "R"
    p = mpidqn(1, ["--run-dir", str(run_dir), *tiny], timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    marker = tmp_path / "PWNED"
    replace_env_pickle(find_latest(run_dir / "checkpoints").path, 0, pickle.dumps(Payload(marker)))
    return run_dir, marker


def test_a_poisoned_run_dir_runs_nothing_through_evaluate_inspect_and_train(poisoned_run, tiny):
    run_dir, marker = poisoned_run
    p = run([sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "1", "--json"])
    assert p.returncode == 0, p.stderr
    assert inspect_json(run_dir)["step"] == 1200
    assert not marker.exists()
    p = mpidqn(1, ["--run-dir", str(run_dir), *tiny, "train.total_steps=1600"], timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not marker.exists()
    assert "resumed (exact)" in p.stdout
    (line,) = warnings(p.stdout + p.stderr)
    assert "start new episodes" in line and "not signed" in line and "--trust-run-dir" in line
    assert inspect_json(run_dir)["step"] == 1600


def test_a_malformed_env_pickle_of_a_trusted_run_dir_gives_one_line(tmp_path, tiny):
    run_dir = tmp_path / "R"
    assert mpidqn(1, ["--run-dir", str(run_dir), *tiny], timeout=180).returncode == 0
    ckpt = find_latest(run_dir / "checkpoints").path
    with h5py.File(ckpt / "rank_00000.h5", "r") as h:
        data = h["envs/pickle"][()].tobytes()
    replace_env_pickle(ckpt, 0, data[: len(data) // 3])  # truncated, unsigned
    p = mpidqn(1, ["--run-dir", str(run_dir), "--trust-run-dir", *tiny, "train.total_steps=1600"], timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    (line,) = warnings(p.stdout + p.stderr)
    assert "cannot be unpickled" in line and "--trust-run-dir" not in line


def test_ranks_agree_when_one_rank_file_is_not_trusted(tmp_path, tiny):
    """Rank 1's env state was swapped, rank 0's is the user's own: no rank resumes its old episodes,
    and with --trust-run-dir both do (the payload here is a harmless vector env of the right shape)."""
    run_dir = tmp_path / "R"
    p = mpidqn(2, ["--run-dir", str(run_dir), *tiny, "train.total_steps=1100"], timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = find_latest(run_dir / "checkpoints")
    with h5py.File(ckpt.file("rank_00001.h5"), "r") as h:
        data = h["envs/pickle"][()].tobytes()
    replace_env_pickle(ckpt.path, 1, data)  # the same bytes, its signature dropped
    script = [str(MPI_SCRIPTS / "trust_check.py"), str(ckpt.path), *tiny, "train.total_steps=1100"]
    for trusted, restored in ((False, False), (True, True)):
        p = mpirun(2, [*script, *(["--trust-run-dir"] if trusted else [])], timeout=180)
        assert p.returncode == 0, p.stderr[-2000:]
        verdicts = [json.loads(x) for x in re.findall(r"\{[^{}]*\}", p.stdout)]  # ranks' lines may interleave
        assert sorted(v["rank"] for v in verdicts) == [0, 1]
        assert all(v["restored"] == restored for v in verdicts), verdicts
        lines = warnings(p.stdout + p.stderr)
        assert len(lines) == (0 if restored else 1) and all("rank 1: it is not signed" in x for x in lines)


def set_config_env_id(ckpt_dir: Path, run_dir: Path, env_id: str) -> None:
    """Name another env.id in the run's config.yaml and in the checkpoint's model file (CRC recomputed)."""
    import yaml

    for path in (run_dir / "config.yaml",):
        data = yaml.safe_load(path.read_text())
        data["env"]["id"] = env_id
        path.write_text(yaml.safe_dump(data))
    with h5py.File(ckpt_dir / "model_s0.h5", "r+") as h:
        data = yaml.safe_load(str(h.attrs["config"]))
        data["env"]["id"] = env_id
        h.attrs["config"] = yaml.safe_dump(data)
    manifest = json.loads((ckpt_dir / MARKER).read_text())
    raw = (ckpt_dir / "model_s0.h5").read_bytes()
    manifest["files"]["model_s0.h5"] = {"bytes": len(raw), "crc32": zlib.crc32(raw)}
    (ckpt_dir / MARKER).write_text(json.dumps(manifest))


def test_an_env_id_naming_a_module_is_imported_only_from_a_trusted_run_dir(poisoned_run):
    """gymnasium imports the module of a "module:Env-v0" id; a module beside the user's working directory
    (here: a file the run directory's author placed there) would run its code."""
    run_dir, marker = poisoned_run
    work = run_dir.parent
    (work / "pwnmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    set_config_env_id(find_latest(run_dir / "checkpoints").path, run_dir, "pwnmod:CartPole-v1")
    evaluate = [sys.executable, "-m", "mpidqn", "evaluate", str(run_dir), "--episodes", "1", "--json"]
    for cmd in (evaluate, [sys.executable, "-m", "mpidqn", "--run-dir", str(run_dir), "train.total_steps=1600"]):
        p = run(cmd, cwd=work, timeout=180)
        assert p.returncode == 2, p.stderr[-2000:]
        (line,) = program_lines(p.stderr)
        assert "imports the Python module 'pwnmod'" in line and "--trust-run-dir" in line
        assert not marker.exists()
    from mpidqn.api import build_config, load_policy  # the Python API refuses it the same way

    for call in (lambda: load_policy(run_dir), lambda: build_config(None, run_dir)):
        with pytest.raises(UserError, match="imports the Python module 'pwnmod'"):
            call()
    assert not marker.exists()
    p = run([*evaluate, "--trust-run-dir"], cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    assert marker.exists()  # trusted: gymnasium imported it


def test_a_checkpoint_names_only_torch_dtypes(tmp_path):
    from mpidqn.io.h5tree import read_tree

    with h5py.File(tmp_path / "f.h5", "w") as h:
        h.create_dataset("w", data=np.zeros(2, np.float32)).attrs["torch_dtype"] = "load"
    with h5py.File(tmp_path / "f.h5", "r") as h, pytest.raises(ValueError, match="'load' is not a torch dtype"):
        read_tree(h)


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    from mpidqn.errors import UserError
    from mpidqn.io.runlock import RunLock

    target = tmp_path / "bashrc"
    target.write_text("mine\n")
    run_dir = tmp_path / "R"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        RunLock(run_dir).acquire()
    assert target.read_text() == "mine\n"


@pytest.mark.parametrize("manifest", [
    {"files": {"../../elsewhere.h5": {"bytes": 1, "crc32": 1}}},
    {"files": {"rank_00000.h5": "x"}},
    {"files": []},
    {"step": "7"},
])
def test_a_manifest_lists_only_files_of_its_own_checkpoint(tmp_path, manifest):
    from mpidqn.errors import UserError
    from mpidqn.train.checkpoints import resolve

    ckpt = tmp_path / "checkpoints" / "step_000000000100"
    ckpt.mkdir(parents=True)
    (ckpt / MARKER).write_text(json.dumps({"format_version": 1, "step": 100, "world_size": 1,
                                           "pipeline_stages": 1, **manifest}))
    with pytest.raises(UserError, match="COMPLETE marker"):
        resolve(ckpt)
