"""One host's daemon across its role changes.

A host starts as the primary or the backup of its config, but the roles move:
the backup that activated runs the VM, re-protection makes it the sender and
the first host its backup. What belongs to the host rather than to a role
lives here: its identity in the pair, its heartbeat, its control socket, its
metrics endpoint and the stop signal. Each role phase installs its own status
and control commands while it runs.
"""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Callable

from remus.common import log, sdnotify
from remus.common.config import Config
from remus.common.control import ControlServer
from remus.common.metrics import Metrics
from remus.common.peering import heartbeat_for

_log = log.get("remus.node")


class Node:
    def __init__(self, cfg: Config, host: str):
        """`host`: "primary" or "backup", which host of `cfg` this is."""
        self.cfg = cfg
        self.host = host
        self.state_dir = Path(getattr(cfg, host).state_dir)
        self.hb = heartbeat_for(cfg, host)
        self.stop = asyncio.Event()
        self.status: Callable[[], dict] = lambda: {"role": host, "state": "starting"}
        self.commands: dict[str, Callable[[str], dict]] = {}
        # What systemd's watchdog is fed on: each phase says what healthy means for it.
        self.healthy: Callable[[], bool] = lambda: True
        self._watchdog: asyncio.Task | None = None
        self.control = ControlServer(self.state_dir, lambda: self.status(),
                                     _Commands(self))
        address = getattr(cfg.metrics, host)
        self.metrics = Metrics(lambda: self.status()) if address else None
        self._metrics_address = address

    async def start(self, role: str, generation: int) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if self.hb is not None:
            await self.hb.start()
            self.hb.update(role, "", generation, 0)
        if self.metrics is not None:
            self.metrics.serve(self._metrics_address)
            _log.info("metrics", address=self._metrics_address)
        await self.control.start()
        self._watchdog = asyncio.create_task(sdnotify.keep_alive(lambda: self.healthy()))

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.hb is not None:
            await self.hb.stop()
        await self.control.close()

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


class _Commands(dict):
    """The control commands of whichever role phase is running."""

    def __init__(self, node: Node):
        super().__init__()
        self._node = node

    def __contains__(self, name: object) -> bool:
        return name in self._node.commands

    def __getitem__(self, name: str):
        return self._node.commands[name]

    def __iter__(self):
        return iter(self._node.commands)
