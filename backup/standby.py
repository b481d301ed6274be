"""The standby guest: the guest's QEMU, launched on the replica ahead of a failover.

Starting QEMU takes 100-150 ms, and a failover would otherwise spend it while
fencing runs on the same cores. So once a session's replica is resumable
the backup launches QEMU on the replica's RAM and disk files with `-incoming
defer`, its network relay with the TAP not yet on the bridge (user networking:
its host ports not yet bound). Such a QEMU never runs the guest and never writes
guest RAM: only the device state loaded at activation (`migrate-incoming`) makes
it a machine. A launch that fails here is reported at once, while there is still
time to fix what would make a failover fail the same way.

A standby belongs to one session: a new session starts the disk over, so its
predecessor is discarded, not reused.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from remus.backup.replica import Replica
from remus.common import log
from remus.common.config import Config
from remus.common.durable import private_dir
from remus.common.nicgroup import make_netbuf
from remus.common.qemu import GuestPaths, QemuGuest
from remus.common.waiting import cancel_and_wait

_log = log.get("remus.standby")

RETRY_FIRST_S = 5.0
RETRY_MAX_S = 60.0


@dataclass
class Launched:
    """A QEMU waiting for its device state, and the network it will use (or None)."""
    guest: QemuGuest
    netbuf: object | None
    launch_ms: float

    def alive(self) -> bool:
        proc = self.guest.proc
        return proc is not None and proc.returncode is None

    async def discard(self) -> None:
        self.guest.kill()
        if self.guest.proc is not None:
            await self.guest.proc.wait()
        await self.guest.close_qmp()
        if self.netbuf is not None:
            await self.netbuf.close()


async def launch_guest(cfg: Config, replica: Replica) -> Launched:
    """QEMU on the replica's files waiting for incoming device state, with its network
    relay started but off the bridge. Nothing here lets the guest execute or send."""
    run_dir = Path(cfg.backup.state_dir) / "run"
    private_dir(run_dir)
    guest = QemuGuest(cfg, GuestPaths(run_dir=run_dir, ram_file=replica.ram_file))
    t0 = time.monotonic()
    netbuf = make_netbuf(cfg, run_dir, buffering=True)
    try:
        net_args = None
        if netbuf is not None:
            await netbuf.start()
            net_args = netbuf.qemu_netdev_args()
        await guest.launch(incoming=True, net_args=net_args,
                           replicas=[str(p) for p in replica.disk_files(len(cfg.mirrored_disks))],
                           host_forward=False)
    except BaseException:
        await Launched(guest, netbuf, 0.0).discard()
        raise
    return Launched(guest, netbuf, (time.monotonic() - t0) * 1000)


class StandbyGuest:
    """Keeps one launched QEMU ready for the current session, relaunching it (with
    backoff) if it dies or fails to start, until a failover takes it."""

    def __init__(self, cfg: Config, replica: Replica):
        self.cfg, self.replica = cfg, replica
        self.session: str | None = None
        self._task: asyncio.Task | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._noted: asyncio.Task | None = None  # the task whose QEMU death was logged
        self.last_error: str | None = None

    def want(self, session: str) -> None:
        """Have a standby for `session`: launch one in the background unless it is
        there, on its way, or waiting out the backoff after a failure."""
        task = self._task
        if session != self.session:
            self._failures, self._retry_at = 0, 0.0
        else:
            state = self._state()
            if state in ("ready", "launching"):
                return
            if state == "gone" and self._noted is not task:  # QEMU died standing by
                self._noted = task
                self._backoff()
                guest = task.result().guest
                _log.warning("standby-guest-gone", session=session, qemu_pid=guest.pid,
                             exit=guest.proc.returncode,
                             relaunch_in_s=self._retry_at - time.monotonic())
            if state != "none" and time.monotonic() < self._retry_at:
                return
        self.session = session
        self._task = asyncio.create_task(self._replace(task, session))

    def _state(self) -> str:
        task = self._task
        if task is None:
            return "none"
        if not task.done():
            return "launching"
        if task.cancelled() or task.exception() is not None:
            return "failed"
        return "ready" if task.result().alive() else "gone"

    def _backoff(self) -> float:
        self._failures += 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        return delay

    async def _replace(self, old: asyncio.Task | None, session: str) -> Launched:
        await discard_launch(old)
        try:
            launched = await launch_guest(self.cfg, self.replica)
        except Exception as exc:
            delay = self._backoff()
            self.last_error = f"{type(exc).__name__}: {exc}"
            _log.error("standby-guest-failed", session=session, reason=self.last_error,
                       retry_in_s=delay,
                       detail="a failover now would have to launch QEMU itself and may fail "
                              "the same way")
            raise
        self.last_error = None
        _log.info("standby-guest-ready", session=session, qemu_pid=launched.guest.pid,
                  launch_ms=launched.launch_ms,
                  detail="QEMU waits on the replica for the device state of a failover")
        return launched

    async def take(self, session: str) -> Launched | None:
        """The standby for `session`, if there is a live one (awaiting a launch under
        way); the caller then owns it. Anything else is discarded first, so the caller
        may launch its own on the same TAP and sockets."""
        task, task_session = self._task, self.session
        self._task, self.session = None, None
        if task is None:
            return None
        if task_session != session:
            await discard_launch(task)
            return None
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            await discard_launch(task)
            raise
        if task.cancelled() or task.exception() is not None:
            return None  # logged by _replace
        launched = task.result()
        if launched.alive():
            return launched
        await launched.discard()
        return None

    def describe(self) -> dict:
        state = self._state()
        out = {"state": state}
        if state != "none":
            out["session"] = self.session
        if state == "failed":
            out["error"] = self.last_error
        if state == "ready":
            out["qemu_pid"] = self._task.result().guest.pid
        return out

    async def close(self) -> None:
        task, self._task, self.session = self._task, None, None
        await discard_launch(task)


async def discard_launch(task: asyncio.Task | None) -> None:
    """End a launch, whether under way or done: cancel it, or stop what it started."""
    if task is None:
        return
    await cancel_and_wait(task)
    if task.cancelled() or task.exception() is not None:
        return
    await task.result().discard()
