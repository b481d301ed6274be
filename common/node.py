"""One host's daemon across its role changes: the role machine's loop.

A host starts as the primary or the backup of its config, but the roles move
(see common/roles.py). What belongs to the host rather than to a role lives
here: its identity in the pair, its heartbeat, its control socket, its metrics
endpoint, the stop signal, and the current role, which alone decides the role
string the heartbeat publishes, the status, the control commands and what
"healthy" means for systemd's watchdog.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from remus.common import log, sdnotify
from remus.common.config import Config
from remus.common.control import ControlServer
from remus.common.durable import private_dir
from remus.common.metrics import Metrics
from remus.common.peering import heartbeat_for
from remus.common.roles import Role, RoleFactory
from remus.common.status import RoleName, Status

_log = log.get("remus.node")


class Node:
    def __init__(self, cfg: Config, host: str, roles: RoleFactory, generation: int = 1):
        """`host`: "primary" or "backup", which host of `cfg` this is; `roles`: how to
        make the roles of the other side when this host changes sides."""
        self.cfg = cfg
        self.host = host
        self.roles = roles
        self.pid = os.getpid()
        self.generation = generation
        self.role: Role | None = None
        self._published: tuple | None = None  # the last beat contents handed to hb
        # Owner-only (0700), an existing one tightened: it holds the guest's memory,
        # disks and console, and the sockets that control the daemon.
        self.state_dir = private_dir(Path(getattr(cfg, host).state_dir))
        private_dir(self.state_dir / "run")
        self.hb = heartbeat_for(cfg, host)
        self.stop = asyncio.Event()
        self._watchdog: asyncio.Task | None = None
        self.control = ControlServer(self.state_dir, lambda: self.status().to_dict(),
                                     _Commands(self))
        address = getattr(cfg.metrics, host)
        self.metrics = Metrics(self.status) if address else None
        self._metrics_address = address

    async def run(self, first: Role) -> int:
        """Run roles from `first` until one returns an exit code."""
        self.role = first
        await self._start()
        try:
            while True:
                following = await self.role.run(self)
                if not isinstance(following, Role):
                    return following
                _log.info("role-change", previous=self.role.name.value,
                          next=following.name.value)
                self.role = following
                self.publish()
        finally:
            await self._close()

    def status(self) -> Status:
        if self.role is None:
            return Status(RoleName(self.host), self.host, self.cfg.guest.name, "starting",
                          self.pid, self.generation, None, 0)
        return self.role.status(self)

    def publish(self, session: str = "", epoch: int = 0) -> None:
        """Beat the current role, at this host's generation, with the session and epoch."""
        if self.hb is None or self.role is None:
            return
        beat = (self.role.beat_role().value, session or "", self.generation, epoch)
        if beat != self._published:  # roles publish in loops: only a change is news
            self._published = beat
            self.hb.update(*beat)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_error_logger())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if self.hb is not None:
            self.publish()  # what the first beats carry
            await self.hb.start()
        if self.metrics is not None:
            self.metrics.serve(self._metrics_address)
            _log.info("metrics", address=self._metrics_address)
        await self.control.start()
        self._watchdog = asyncio.create_task(sdnotify.keep_alive(self._healthy))

    def _healthy(self) -> bool:
        return self.role is None or self.role.healthy()

    async def _close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.hb is not None:
            await self.hb.stop()
        await self.control.close()
        if self.metrics is not None:
            self.metrics.close()

    async def peer_beat(self, wait_s: float) -> dict | None:
        """The peer's latest beat, waiting up to `wait_s` for one (None: silent)."""
        if self.hb is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            beat = self.hb.view().last_beat
            if beat is not None or time.monotonic() >= deadline or self.stop.is_set():
                return beat
            await asyncio.sleep(0.05)


def _loop_error_logger():
    """asyncio's own error reports (e.g. accept() failing with EMFILE, once per attempt,
    each with a traceback) as rate-limited log lines: a flood of them must not bury the
    journal. The traceback goes to the debug level."""
    limited = log.RateLimited(_log, burst=3, interval=60.0, source_field="message")

    def report(loop, context: dict) -> None:
        message = context.get("message", "unhandled error in the event loop")
        exc = context.get("exception")
        if limited.error("event-loop-error", message, message=message,
                         error=repr(exc) if exc is not None else None):
            _log.debug("event-loop-error-detail", context=repr(context))
    return report


class _Commands(dict):
    """The control commands of the current role."""

    def __init__(self, node: Node):
        super().__init__()
        self._node = node

    def _current(self) -> dict:
        role = self._node.role
        return role.commands() if role is not None else {}

    def __contains__(self, name: object) -> bool:
        return name in self._current()

    def __getitem__(self, name: str):
        return self._current()[name]

    def __iter__(self):
        return iter(self._current())
