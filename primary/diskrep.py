"""Disk write capture on the primary, exact at epoch boundaries.

QEMU mirrors the guest disk to an NBD export served here (`blockdev-mirror`,
`copy-mode: write-blocking`): a guest write completes only after it reached
this daemon, and `stop` drains in-flight I/O, so the writes received before a
pause are exactly the epoch's. The job's initial copy arrives the same way and
fills the backup's replica; a checkpoint taken after the job was ready
carries a disk the backup may resume. The job is never completed or pivoted;
each new session starts a new one (a full copy).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np

from remus.common import log
from remus.common.diskset import WriteSet
from remus.common.nbd import NbdServer
from remus.common.qemu import QemuGuest

_log = log.get("remus.disk")

EXPORT = "remus"
TARGET_NODE = "remus-target"
JOB = "remus-mirror"


class DiskReplicator:
    def __init__(self, guest: QemuGuest, disk: Path, run_dir: Path):
        self.guest = guest
        self.disk = disk
        self.size = os.path.getsize(disk)
        self.socket_path = run_dir / "nbd.sock"
        self._fd = os.open(disk, os.O_RDONLY)
        self.server = NbdServer(self.socket_path, EXPORT, self.size, on_write=self._on_write,
                                on_read=self._on_read)
        self.writes = WriteSet()
        self.active = False  # a session wants the writes
        self.ready = False   # the job's initial copy is complete
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()

    def _on_write(self, offset: int, data: bytes) -> None:
        if self.active:
            self.writes.add(offset, data)

    def _on_read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)  # the target mirrors the source

    async def session_start(self) -> None:
        """Start a fresh mirror: its initial copy refills the backup's replica."""
        await self._stop_job()
        self.writes = WriteSet()
        self.ready = False
        self.active = True
        await self.guest.execute("blockdev-add", {
            "driver": "nbd", "node-name": TARGET_NODE, "export": EXPORT,
            "server": {"type": "unix", "path": str(self.socket_path)}})
        self._watch = asyncio.create_task(self._wait_ready())
        await self.guest.execute("blockdev-mirror", {
            "job-id": JOB, "device": "disk0", "target": TARGET_NODE, "sync": "full",
            "copy-mode": "write-blocking"})
        _log.info("disk-sync-start", disk=str(self.disk), size=self.size)

    async def _wait_ready(self) -> None:
        assert self.guest.qmp is not None
        with self.guest.qmp.listener(("BLOCK_JOB_READY",)) as listener:
            async for event in listener:
                if event.get("data", {}).get("device") == JOB:
                    self.ready = True
                    _log.info("disk-synced", detail="mirror ready: later checkpoints carry a "
                                                    "resumable disk")
                    return

    def seal(self) -> tuple[np.ndarray, bytes, bool]:
        """At a pause: the epoch's writes, and whether the disk is in sync."""
        ws, self.writes = self.writes, WriteSet()
        table, data = ws.extents()
        return table, data, self.ready

    async def session_end(self) -> None:
        self.active = False
        self.writes = WriteSet()
        await self._stop_job()

    async def _stop_job(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        jobs = await self.guest.execute("query-block-jobs")
        if any(j.get("device") == JOB for j in jobs):
            # Cancelling a ready mirror completes it without switching the guest over.
            await self.guest.execute("block-job-cancel", {"device": JOB, "force": True})
            for _ in range(500):
                jobs = await self.guest.execute("query-block-jobs")
                if not any(j.get("device") == JOB for j in jobs):
                    break
                await asyncio.sleep(0.01)
        nodes = await self.guest.execute("query-named-block-nodes", {"flat": True})
        if any(n.get("node-name") == TARGET_NODE for n in nodes):
            await self.guest.execute("blockdev-del", {"node-name": TARGET_NODE})

    async def close(self) -> None:
        self.active = False
        await self.server.close()
        os.close(self._fd)
