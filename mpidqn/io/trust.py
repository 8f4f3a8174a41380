"""Which bytes of a run directory this user wrote: a per-user secret and HMAC-SHA256 signatures.

Unpickling runs code, and a run directory may come from someone else (a group directory on a
cluster, a colleague's run, an artifact of a paper), whose CRC32 manifest anyone can recompute
(issue #37). So the pickled vector env of a checkpoint is signed with a secret only this user can
read, and a resume unpickles only what verifies (or what the user trusts by name: ``--trust-run-dir``).

The secret is 32 random bytes (hex text) in ``$XDG_CONFIG_HOME/mpidqn/secret`` (default
``~/.config/mpidqn/secret``), created once with mode 600; a home directory shared by the nodes of a
cluster serves all of them, so a requeued job on other nodes verifies its own checkpoints.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
DOMAIN = b"mpidqn env state v1\0"  # a signature of env state is no signature of anything else


@dataclass(frozen=True)
class Trust:
    """What a resume may unpickle: bytes signed with ``key`` (this user's secret; None when it could
    not be loaded, ``problem`` says why), or anything when the user trusts the run directory."""

    key: bytes | None
    run_dir_trusted: bool = False
    problem: str = ""


def secret_path(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CONFIG_HOME/mpidqn/secret``, or ``~/.config/mpidqn/secret`` without XDG_CONFIG_HOME."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mpidqn" / "secret"


def read_secret(path: Path) -> bytes:
    """The secret at ``path``; FileNotFoundError when there is none, ValueError when it must not be
    used (readable by others, someone else's, too short)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ValueError(f"{path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        raise ValueError(f"{path} can be read by others (mode {st.st_mode & 0o777:o}); chmod 600 {path}")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ValueError(f"{path} does not hold hex text") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, fewer than {MIN_SECRET_BYTES}")
    return key


def load_or_create_secret(path: Path) -> bytes:
    """The secret at ``path``, created with mode 600 when missing. Two jobs creating it at once agree
    on one: each writes a private temporary file and links it into place, the first link wins."""
    try:
        return read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(SECRET_BYTES) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another job created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    return read_secret(path)


def load_trust(run_dir_trusted: bool, path: Path | None = None) -> Trust:
    """This user's Trust; a secret that cannot be loaded or created leaves ``key`` None (nothing is
    signed then, and a resume starts new episodes) and ``problem`` saying why, in a few words."""
    path = secret_path() if path is None else path
    try:
        return Trust(load_or_create_secret(path), run_dir_trusted)
    except (OSError, ValueError) as e:
        why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
        return Trust(None, run_dir_trusted, f"no usable secret ({why})")


def sign(key: bytes, data: bytes) -> str:
    """The HMAC-SHA256 of ``data`` under ``key``, as hex text."""
    return hmac.new(key, DOMAIN + data, hashlib.sha256).hexdigest()


def signed_with(key: bytes, data: bytes, signature: object) -> bool:
    """Whether ``signature`` (as read from a file: any type) is ``data``'s signature under ``key``,
    compared in constant time."""
    if not isinstance(signature, str) or not signature:
        return False
    return hmac.compare_digest(sign(key, data).encode(), signature.encode("utf-8", "replace"))
