"""The control socket: one JSON status snapshot per request, for `remusctl status`.

A unix socket in the daemon's state directory, owner-only (0600): whoever may
read it may learn everything about the pair. One request line, one JSON reply.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Callable

from remus.common import log

_log = log.get("remus.control")
SOCKET_NAME = "control.sock"
MAX_REQUEST = 256


class ControlServer:
    def __init__(self, state_dir: Path, status: Callable[[], dict],
                 commands: dict[str, Callable[[str], dict]] | None = None):
        """`commands`: extra requests, `NAME ARG` -> reply dict (e.g. drills)."""
        self.path = state_dir / SOCKET_NAME
        self._status = status
        self._commands = commands if commands is not None else {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            name, _, arg = line.decode(errors="replace").strip().partition(" ")
            if len(line) > MAX_REQUEST:
                reply = {"ok": False, "error": "request too long"}
            elif name == "status":
                reply = {"ok": True, "status": self._status()}
            elif name in self._commands:
                reply = self._commands[name](arg)
            else:
                known = ", ".join(["status", *self._commands])
                reply = {"ok": False, "error": f"unknown request {name!r} (known: {known})"}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        except Exception as exc:  # noqa: BLE001 - a status bug must not hurt the daemon
            _log.error("control-failed", error=repr(exc))
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)


def query(state_dir: Path, timeout: float = 5.0) -> dict:
    """Ask the daemon whose state directory this is for its status."""
    return request(state_dir, "status", timeout)["status"]


def request(state_dir: Path, line: str, timeout: float = 5.0) -> dict:
    path = state_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "control request failed"))
    return reply
