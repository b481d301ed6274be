"""CURVE key files: a node's key pair and its peer's public key, loaded and checked,
and new pairs made (`remusctl keys generate`).

Keys are CURVE key pairs in zmq.auth.create_certificates format (NAME.key,
NAME.key_secret).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import zmq.auth
from zmq.utils import z85

from remus.common.heartbeat.settings import HeartbeatConfig, HeartbeatError


def load_keys(cfg: HeartbeatConfig) -> tuple[bytes, bytes, bytes]:
    """(own public, own secret, peer public) as z85 bytes; HeartbeatError naming the file."""

    def load(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
        what = "secret key" if want_secret else "peer public key"
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            if not path.exists():
                raise HeartbeatError(f"heartbeat {what} file {path} does not exist") from exc
            raise HeartbeatError(f"heartbeat {what} file {path} cannot be read: {exc}") from exc
        for label, key in (("public", public), ("secret", secret)):
            if key is None:
                continue
            try:
                ok = len(key) == 40 and len(z85.decode(key)) == 32
            except Exception:
                ok = False
            if not ok:
                raise HeartbeatError(f"heartbeat {what} file {path}: malformed {label} key")
        if want_secret and secret is None:
            raise HeartbeatError(f"heartbeat secret key file {path} holds no secret key "
                                 f"(is it the .key file instead of the .key_secret file?)")
        return public, secret

    own_public, own_secret = load(cfg.secret_key, True)
    peer_public, _ = load(cfg.peer_public_key, False)
    if peer_public == own_public:
        raise HeartbeatError(f"heartbeat peer public key {cfg.peer_public_key} is our own key")
    assert own_secret is not None
    return own_public, own_secret, peer_public


def generate_keys(directory: Path, nodes: list[str], force: bool = False) -> list[tuple[Path, Path]]:
    """CURVE key pairs NAME.key (public, 0644) and NAME.key_secret (0600) in `directory`."""
    directory = Path(directory).absolute()
    for name in nodes:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad node name {name!r}")
        if not force:
            for suffix in (".key", ".key_secret"):
                if (directory / f"{name}{suffix}").exists():
                    raise FileExistsError(f"{directory / (name + suffix)} exists (use --force to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    old = os.umask(0o077)      # the secret file is never readable by others, not even briefly
    try:
        for name in nodes:
            for suffix in (".key", ".key_secret"):
                with contextlib.suppress(FileNotFoundError):
                    (directory / f"{name}{suffix}").unlink()
            public, secret = zmq.auth.create_certificates(directory, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            made.append((Path(public), Path(secret)))
    finally:
        os.umask(old)
    return made
