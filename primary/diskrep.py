"""Disk write capture on the primary, exact at epoch boundaries.

QEMU mirrors the guest disk to an NBD export served here (`blockdev-mirror`,
`copy-mode: write-blocking`): a guest write completes only after it reached
this daemon, and `stop` drains in-flight I/O, so the writes received before a
pause are exactly the epoch's. The job's initial copy arrives the same way and
fills the backup's replica; a checkpoint taken after the job was ready
carries a disk the backup may resume. The job is never completed or pivoted;
each new session starts a new one (a full copy).

Zeroed ranges (the source's holes in the initial copy, write-zeroes, writes of
all-zero bytes) are kept as extents without data, so the copy of a sparse disk
costs time and memory in proportion to its allocated data. What an epoch holds
is capped: past the cap the NBD server delays its replies, so the guest's (or
the initial copy's) writes wait, as on a full disk queue, and the replicator is
woken to send what is held. Before a pause the cap is lifted (`stop` drains
in-flight writes and must not wait for a checkpoint that needs it).
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

from remus.common import log
from remus.common.diskset import SealedWrites, WriteSet, is_zero
from remus.common.hooks import CheckpointDevice
from remus.common.nbd import NbdServer
from remus.common.qemu import QemuGuest, disk_node

_log = log.get("remus.disk")

EXPORT = "remus"


class DiskReplicator:
    """One mirrored disk: the mirror job from guest node `node` and its NBD target."""

    def __init__(self, guest: QemuGuest, disk: Path, run_dir: Path, size: int, node: str = "disk0",
                 index: int = 0, cap: int = 64 << 20, on_full: Callable[[], None] | None = None):
        self.guest = guest
        self.disk = disk
        self.node = node
        self.size = size  # what the guest sees (a qcow2 file's virtual size)
        self.job = f"remus-mirror{index}"
        self.target = f"remus-target{index}"
        self.socket_path = run_dir / f"nbd{index}.sock"
        self.server = NbdServer(self.socket_path, EXPORT, self.size, on_write=self._on_write,
                                on_zero=self._on_zero, throttle=self._throttle)
        self.writes = WriteSet()
        self.cap = cap            # bytes an epoch may hold before writes wait
        self.on_full = on_full    # told when writes start waiting: send what is held
        self.throttled_s = 0.0    # time writes spent waiting for room
        self._room = asyncio.Event()
        self._lifted = False      # a pause is draining: accept whatever arrives
        self._sending: WriteSet | None = None  # sealed, still being sent: counts too
        self.active = False  # a session wants the writes
        self.ready = False   # the job's initial copy is complete
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()

    def _on_write(self, offset: int, data: bytes) -> None:
        if not self.active:
            return
        if is_zero(data):
            self.writes.add_zeroes(offset, len(data))
        else:
            self.writes.add(offset, data)

    def _on_zero(self, offset: int, length: int) -> None:
        if self.active:
            self.writes.add_zeroes(offset, length)

    @property
    def held(self) -> int:
        """Memory held for the backup: this epoch's writes and those still being sent."""
        return self.writes.cost + (self._sending.cost if self._sending is not None else 0)

    async def _throttle(self) -> None:
        if self.held < self.cap or self._lifted or not self.active:
            return
        t0 = time.monotonic()
        if self.on_full is not None and self.writes.cost >= self.cap // 2:
            self.on_full()
        while self.held >= self.cap and not self._lifted and self.active:
            self._room.clear()
            await self._room.wait()
        self.throttled_s += time.monotonic() - t0

    @property
    def over_cap(self) -> bool:
        """Writes wait for room: the held writes should be sent now."""
        return self.held >= self.cap and self.writes.cost >= self.cap // 2

    def lift_cap(self) -> None:
        """Before `stop`: in-flight writes must complete for the pause to happen."""
        self._lifted = True
        self._room.set()

    async def copy_progress(self) -> tuple[int, int] | None:
        """(bytes done, bytes to do) of the mirror's initial copy, while it runs."""
        for job in await self.guest.execute("query-block-jobs"):
            if job.get("device") == self.job:
                return int(job.get("offset", 0)), int(job.get("len", 0))
        return None

    async def session_start(self) -> None:
        """Start a fresh mirror: its initial copy refills the backup's replica."""
        await self._stop_job()
        self.writes = WriteSet()
        self.ready = False
        self.active = True
        await self.guest.execute("blockdev-add", {
            "driver": "nbd", "node-name": self.target, "export": EXPORT,
            "server": {"type": "unix", "path": str(self.socket_path)}})
        self._watch = asyncio.create_task(self._wait_ready())
        await self.guest.execute("blockdev-mirror", {
            "job-id": self.job, "device": self.node, "target": self.target, "sync": "full",
            "copy-mode": "write-blocking"})
        _log.info("disk-sync-start", disk=str(self.disk), node=self.node, size=self.size)

    async def _wait_ready(self) -> None:
        assert self.guest.qmp is not None
        with self.guest.qmp.listener(("BLOCK_JOB_READY",)) as listener:
            async for event in listener:
                if event.get("data", {}).get("device") == self.job:
                    self.ready = True
                    _log.info("disk-synced", disk=str(self.disk),
                              detail="mirror ready: later checkpoints carry a resumable disk")
                    return

    def seal(self) -> tuple[WriteSet, bool]:
        """At a pause (or a pre-copy round): the writes so far, and whether the disk is
        in sync. Writes waiting for room go on."""
        ws, self.writes = self.writes, WriteSet()
        self._sending = ws
        self._lifted = False
        self._room.set()
        return ws, self.ready

    def sent(self) -> None:
        """The sealed writes are on the wire: their memory is free."""
        self._sending = None
        self._room.set()

    async def session_end(self) -> None:
        self.active = False
        self.writes = WriteSet()
        self._sending = None
        self._room.set()
        await self._stop_job()

    async def _stop_job(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        jobs = await self.guest.execute("query-block-jobs")
        if any(j.get("device") == self.job for j in jobs):
            # Cancelling a ready mirror completes it without switching the guest over.
            await self.guest.execute("block-job-cancel", {"device": self.job, "force": True})
            for _ in range(500):
                jobs = await self.guest.execute("query-block-jobs")
                if not any(j.get("device") == self.job for j in jobs):
                    break
                await asyncio.sleep(0.01)
        nodes = await self.guest.execute("query-named-block-nodes", {"flat": True})
        if any(n.get("node-name") == self.target for n in nodes):
            await self.guest.execute("blockdev-del", {"node-name": self.target})

    async def close(self) -> None:
        self.active = False
        await self.server.close()


class MirroredDisks(CheckpointDevice):
    """Every writable disk of the guest, mirrored together, as one checkpoint device:
    at postsuspend it seals the epoch's writes of all of them, which the replicator
    takes for the checkpoint. The cap is shared. Nothing is held back at commit: a
    write reached this host's disk before the guest saw it complete, and the backup
    applies the epoch's writes with the checkpoint."""
    name = "disks"

    def __init__(self, disks: list[DiskReplicator]):
        self.disks = disks
        self._sealed: tuple[SealedWrites, bool] | None = None

    async def postsuspend(self, epoch: int) -> None:
        # Stopped and drained: every guest write of this epoch has reached us.
        self._sealed = self.seal()

    def take_sealed(self) -> tuple[SealedWrites, bool]:
        """The writes sealed at the last postsuspend, and whether every disk is in sync."""
        sealed, self._sealed = self._sealed, None
        assert sealed is not None, "take_sealed() without a postsuspend"
        return sealed

    @classmethod
    async def create(cls, guest: QemuGuest, cfg, sources: list[str], run_dir: Path,
                     cap: int) -> "MirroredDisks":
        """`sources`: this host's files of the mirrored disks, in order (the config's on a
        first primary, the replicas on a host re-protecting the guest it took over)."""
        nodes = [disk_node(i) for i, d in enumerate(cfg.disks) if not d.readonly]
        sizes = await guest.node_sizes()
        share = max(1 << 20, cap // max(1, len(nodes)))
        disks = [DiskReplicator(guest, Path(src), run_dir, sizes[node], node, j, share)
                 for j, (src, node) in enumerate(zip(sources, nodes))]
        for d in disks:
            await d.start()
        return cls(disks)

    @property
    def sizes(self) -> list[int]:
        return [d.size for d in self.disks]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def ready(self) -> bool:
        return all(d.ready for d in self.disks)

    @property
    def over_cap(self) -> bool:
        return any(d.over_cap for d in self.disks)

    @property
    def throttled_s(self) -> float:
        return sum(d.throttled_s for d in self.disks)

    def set_on_full(self, callback: Callable[[], None]) -> None:
        for d in self.disks:
            d.on_full = callback

    def lift_cap(self) -> None:
        for d in self.disks:
            d.lift_cap()

    def seal(self) -> tuple[SealedWrites, bool]:
        sealed = [d.seal() for d in self.disks]
        return SealedWrites([ws for ws, _ in sealed]), all(ready for _, ready in sealed)

    def sent(self) -> None:
        for d in self.disks:
            d.sent()

    async def copy_progress(self) -> tuple[int, int] | None:
        parts = [p for p in [await d.copy_progress() for d in self.disks] if p is not None]
        return (sum(p[0] for p in parts), sum(p[1] for p in parts)) if parts else None

    async def session_start(self) -> None:
        for d in self.disks:
            await d.session_start()

    async def session_end(self) -> None:
        for d in self.disks:
            await d.session_end()

    async def close(self) -> None:
        for d in self.disks:
            await d.close()
