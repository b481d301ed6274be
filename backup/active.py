"""The active role: run the taken-over guest, unprotected, on this host.

Until the guest ends, the operator stops the daemon, a newer generation
holds the guest elsewhere, or re-protection (`remusctl reprotect`, or
[replication] reprotect = "auto" once the other host stands by) makes this
host the guest's primary: the protecting role then takes the running guest.
"""
from __future__ import annotations

import asyncio

from remus.common import log, sdnotify
from remus.common.config import Config
from remus.common.exitcodes import EXIT_FAILED, EXIT_OK
from remus.common.holder import watch_for_newer_holder
from remus.common.peering import heartbeat_status
from remus.common.roles import Role, RunningGuest, StoodDown
from remus.common.status import ActiveState, ActiveStatus, RoleName

_log = log.get("remus.backup")


class Active(Role):
    name = RoleName.ACTIVE

    def __init__(self, cfg: Config, running: RunningGuest, session: str, epoch: int,
                 last_failover: dict):
        self.cfg, self.running = cfg, running
        self.session, self.epoch, self.last_failover = session, epoch, last_failover
        self.reprotect = asyncio.Event()
        self._commands = {"reprotect": self._request_reprotect}

    async def run(self, node) -> Role | int:
        generation = node.generation = self.running.generation
        sdnotify.notify(f"STATUS=active: running the VM at generation {generation}, unprotected")
        node.publish(self.session, self.epoch)
        tasks = {name: asyncio.create_task(coro, name=name) for name, coro in (
            ("qemu", self.running.guest.wait()), ("signal", node.stop.wait()),
            ("reprotect", self.reprotect.wait()),
            ("newer", watch_for_newer_holder(node, generation)))}
        auto = None
        if self.cfg.replication.reprotect == "auto" and node.hb is not None:
            auto = asyncio.create_task(reprotect_when_peer_stands_by(node.hb, self.reprotect))
        handed_on = False
        try:
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            next_role = await self._outcome(node, tasks, {t.get_name() for t in done})
            handed_on = isinstance(next_role, Role) and not isinstance(next_role, StoodDown)
            return next_role
        finally:
            for task in [*tasks.values(), auto]:
                if task is not None:
                    task.cancel()
            if not handed_on:
                await self.running.close()

    async def _outcome(self, node, tasks: dict, done: set[str]) -> Role | int:
        guest = self.running.guest
        if "newer" in done:
            if self.running.netbuf is not None:
                self.running.netbuf.silence()
            guest.kill()
            return StoodDown(self.running.generation, tasks["newer"].result(), _log)
        if "signal" in done:
            _log.info("backup-stop", reason="signal", action="quit the activated guest")
            await guest.quit()
            return EXIT_OK
        if "reprotect" in done:
            return node.roles.protecting(self.cfg.reversed(), self.running)
        _log.warning("guest-exit", status=tasks["qemu"].result(), reason=guest.shutdown_reason)
        return EXIT_OK if guest.shutdown_reason == "guest-shutdown" else EXIT_FAILED

    def _request_reprotect(self, _arg: str) -> dict:
        if self.reprotect.is_set():
            return {"ok": False, "error": "re-protection already requested"}
        self.reprotect.set()
        peer = self.cfg.reversed().backup.address
        _log.warning("reprotect-requested", peer=peer,
                     detail="this host becomes the primary; the other host its backup")
        return {"ok": True, "backup": peer}

    def commands(self) -> dict:
        return self._commands

    def healthy(self) -> bool:
        proc = self.running.guest.proc
        return proc is not None and proc.returncode is None

    def status(self, node) -> ActiveStatus:
        guest = self.running.guest
        state = ActiveState.REPROTECTING if self.reprotect.is_set() else ActiveState.ACTIVE
        return ActiveStatus(
            self.name, node.host, self.cfg.guest.name, state.value, node.pid,
            self.running.generation, self.session, self.epoch, heartbeat_status(node.hb),
            qemu_pid=guest.pid, last_failover=self.last_failover, usage=guest.usage())


async def reprotect_when_peer_stands_by(hb, reprotect: asyncio.Event) -> None:
    """[replication] reprotect = "auto": re-protect once the other host's beats say it
    waits as our backup."""
    while not reprotect.is_set():
        beat = hb.view().last_beat
        if (beat is not None and beat.get("role") in (RoleName.BACKUP.value, RoleName.STALE.value)
                and hb.view().peer_alive):
            _log.warning("reprotect-auto", peer_generation=beat.get("generation"),
                         detail="the other host stands by as the backup")
            reprotect.set()
            return
        await asyncio.sleep(0.2)
