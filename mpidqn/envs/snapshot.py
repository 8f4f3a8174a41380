"""A rank's vector env in a checkpoint: pickled and signed when saved, unpickled only when trusted.

The ``envs`` group of a rank file holds ``pickle`` (the pickled vector env, empty when its state
cannot be pickled: see :func:`mpidqn.envs.vector.pickle_envs`), ``signature`` (HMAC-SHA256 of the
pickle under the writer's secret, empty without one) and ``obs`` (the current observations). The
pickle is loaded only when it is signed with this user's secret or the user trusts the run
directory (:class:`mpidqn.io.trust.Trust`); anything else is refused with the reason, and the caller
starts new episodes instead (issue #37).
"""
from __future__ import annotations

import pickle
from typing import Any

import gymnasium as gym
import numpy as np

from mpidqn.envs.vector import pickle_envs
from mpidqn.io.trust import Trust, sign, signed_with


def seal_envs(envs: gym.vector.VectorEnv, obs: np.ndarray, key: bytes | None) -> dict[str, Any]:
    """The ``envs`` group of a checkpoint: the pickled vector env, its signature under ``key`` (empty
    when there is no key or nothing to sign), the current observations."""
    data = pickle_envs(envs)
    return {"pickle": data, "signature": sign(key, data) if key is not None and data else "",
            "obs": np.asarray(obs)}


TRUST_HINT = "resume with --trust-run-dir if you trust whoever wrote this run directory"


def _refusal(saved: dict[str, Any], trust: Trust) -> str | None:
    """Why the saved pickle must not be unpickled (unpickling runs code), or None when it may."""
    if trust.run_dir_trusted:
        return None
    if trust.key is None:
        why = f"it cannot be verified, {trust.problem}"
    elif not saved.get("signature", ""):
        why = "it is not signed (written by another user, or by an mpidqn before signatures)"
    elif not signed_with(trust.key, saved["pickle"], saved["signature"]):
        why = "it is not signed with your secret (written by another user, or with another secret)"
    else:
        return None
    return f"{why}; {TRUST_HINT}"


def _mismatch(envs: Any, obs: Any, like: gym.vector.VectorEnv) -> str | None:
    """How the unpickled ``envs`` and saved ``obs`` differ from what this run builds (``like``)."""
    if not isinstance(envs, gym.vector.VectorEnv):
        return f"it holds a {type(envs).__name__}, not a vector env"
    if envs.num_envs != like.num_envs:
        return f"it holds {envs.num_envs} envs, this run {like.num_envs}"
    if envs.single_observation_space != like.single_observation_space or \
            envs.single_action_space != like.single_action_space:
        return "its observation or action space is not this run's"
    shape = (like.num_envs, *like.single_observation_space.shape)
    if not isinstance(obs, np.ndarray) or obs.shape != shape:
        return f"its saved observations are not an array of shape {shape}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def refusal_line(path: Any, problems: list[tuple[int, str]], world: int) -> str:
    """The one warning line of a resume whose saved env state some ranks did not restore."""
    rank, why = problems[0]
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    who = f"rank {rank}{more}: " if world > 1 else ""
    return (f"mpidqn: warning: the environments start new episodes (everything else resumes exactly); "
            f"their saved state in {path} is not loaded: {who}{why}")


def restore_envs(saved: dict[str, Any], trust: Trust, like: gym.vector.VectorEnv
                 ) -> tuple[gym.vector.VectorEnv | None, np.ndarray | None, str | None]:
    """``(envs, obs, None)`` restored from a checkpoint's ``envs`` group, else ``(None, None, why)``:
    ``why`` is empty when nothing was saved (the caller starts new episodes quietly) and one phrase
    when the saved state is refused or unusable (untrusted, malformed, another env)."""
    data = saved.get("pickle", b"")
    if not isinstance(data, bytes):
        return None, None, "its pickle is not a byte string"
    if not data:
        return None, None, ""
    why = _refusal(saved, trust)
    if why is not None:
        return None, None, why
    try:  # trusted bytes may still be damaged, or pickled by other versions of the env's packages
        envs = pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - unpickling raises whatever the pickled classes raise
        return None, None, f"it cannot be unpickled ({_first_line(e)})"
    obs = saved.get("obs")
    why = _mismatch(envs, obs, like)
    if why is not None:
        if isinstance(envs, gym.vector.VectorEnv):
            envs.close()
        return None, None, why
    return envs, obs, None
