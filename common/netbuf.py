"""Output commit in userspace: the guest's NIC talks to this daemon, not to the wire.

QEMU's `-netdev stream` connects the guest NIC to a unix socket served here;
each frame is a 4-byte big-endian length and the Ethernet frame. Frames from
the guest are held per epoch and written to a TAP on the host bridge only when
the backup has acknowledged the checkpoint that produced them. Frames towards
the guest are passed on at once. Works on any kernel.
"""
from __future__ import annotations

import asyncio
import os
import struct
import time
from collections import deque
from pathlib import Path
from typing import Callable

from remus.common import log
from remus.common.tap import attach, open_tap
from remus.common.hooks import CheckpointDevice

_log = log.get("remus.netbuf")

MAX_FRAME = 65536 + 64  # an Ethernet frame with offloads; anything longer is a broken stream
MIN_FRAME = 14          # an Ethernet header; anything shorter is no frame
FRAME_OVERHEAD = 64     # what holding a frame costs beyond its bytes (object, list slot)
INBOUND_CAP = 4 << 20   # frames towards a guest that does not read them (paused, stuck)
WARN_EVERY_S = 5.0


class EpochQueue:
    """Frames grouped by the epoch that produced them; pure, no I/O.

    `seal(epoch)` closes the open group at a checkpoint barrier; `release(epoch)`
    hands back, in order, every frame sealed at or before `epoch`.
    """

    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self.open: list[bytes] = []
        self.sealed: deque[tuple[int, list[bytes]]] = deque()
        self.held_bytes = 0
        self.held_frames = 0
        self.dropped_frames = 0
        self.released_frames = 0

    def hold(self, frame: bytes) -> bool:
        """Hold `frame` for its epoch, unless that would pass the cap. The cap counts the
        memory a frame really takes, so tiny frames cannot hold many times the cap."""
        if self.held_bytes + len(frame) + FRAME_OVERHEAD > self.cap_bytes:
            self.dropped_frames += 1  # like a full NIC queue: TCP will resend
            return False
        self.open.append(frame)
        self.held_bytes += len(frame) + FRAME_OVERHEAD
        self.held_frames += 1
        return True

    def seal(self, epoch: int) -> None:
        if self.sealed and epoch <= self.sealed[-1][0]:
            raise ValueError(f"barrier {epoch} after barrier {self.sealed[-1][0]}")
        self.sealed.append((epoch, self.open))
        self.open = []

    def release(self, epoch: int) -> list[bytes]:
        out: list[bytes] = []
        while self.sealed and self.sealed[0][0] <= epoch:
            out.extend(self.sealed.popleft()[1])
        self._account(out)
        return out

    def carry_over(self) -> None:
        """Everything held joins the open epoch: epoch numbers restart with a new session."""
        self.open = [f for _, frames in self.sealed for f in frames] + self.open
        self.sealed.clear()

    def release_all(self) -> list[bytes]:
        out = [f for _, frames in self.sealed for f in frames] + self.open
        self.sealed.clear()
        self.open = []
        self._account(out)
        return out

    def _account(self, out: list[bytes]) -> None:
        self.held_frames -= len(out)
        self.held_bytes -= sum(map(len, out)) + FRAME_OVERHEAD * len(out)
        self.released_frames += len(out)


class UserspaceNetBuffer(CheckpointDevice):
    name = "net-userspace"

    def __init__(self, tap: str, socket_path: Path, cap_bytes: int, buffering: bool = True,
                 netdev_id: str = "n0"):
        self.tap_name = tap
        self.netdev_id = netdev_id
        self.socket_path = socket_path
        self.queue = EpochQueue(cap_bytes)
        self.buffering_enabled = buffering  # False with --no-net
        self.protecting = False  # between the first barrier of a session and its loss
        self._tap_fd = -1
        self._server: asyncio.AbstractServer | None = None
        self._to_guest: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._last_warning = 0.0
        self._last_inbound_warning = 0.0
        self.tap_write_drops = 0
        self.inbound_dropped = 0  # towards the guest, past INBOUND_CAP
        self.runt_frames = 0      # from the guest, shorter than an Ethernet header
        self.silenced = False
        # Told of every batch of frames handed to the guest (the replicator copies
        # them to the backup for replay after a failover).
        self.inbound_listener: Callable[[list[bytes]], None] | None = None
        self.output_listener: Callable[[], None] | None = None  # output waits for a checkpoint

    def qemu_netdev_args(self, mac: str) -> list[str]:
        n = self.netdev_id
        return ["-netdev", f"stream,id={n},server=off,addr.type=unix,addr.path={self.socket_path}",
                "-device", f"virtio-net-pci,netdev={n},mac={mac},romfile="]

    @property
    def stats(self) -> dict:
        q = self.queue
        return {"held_frames": q.held_frames, "held_bytes": q.held_bytes,
                "dropped_frames": q.dropped_frames, "released_frames": q.released_frames,
                "tap_write_drops": self.tap_write_drops, "inbound_dropped": self.inbound_dropped,
                "runt_frames": self.runt_frames}

    async def start(self) -> None:
        """Before QEMU starts: it connects to our socket at launch."""
        self._tap_fd = open_tap(self.tap_name)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve_guest, path=str(self.socket_path))
        asyncio.get_running_loop().add_reader(self._tap_fd, self._from_wire)
        _log.info("netbuf-start", mode="userspace", tap=self.tap_name,
                  buffering=self.buffering_enabled, cap_bytes=self.queue.cap_bytes)

    async def attach(self, bridge: str) -> None:
        await asyncio.to_thread(attach, self.tap_name, bridge)  # pyroute2 runs its own loop

    async def wait_connected(self, timeout: float = 15.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def _serve_guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._to_guest is not None:
            _log.error("netbuf-second-connection", action="refused")
            writer.close()
            return
        self._to_guest = writer
        self._connected.set()
        try:
            while True:
                head = await reader.readexactly(4)
                (length,) = struct.unpack(">I", head)
                if not 0 < length <= MAX_FRAME:
                    _log.error("netbuf-bad-frame", length=length, action="closing the guest NIC stream")
                    break
                frame = await reader.readexactly(length)
                if length < MIN_FRAME:
                    self.runt_frames += 1  # no Ethernet frame: never sent, never held
                    continue
                self._from_guest(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._to_guest = None
            writer.close()

    def _from_guest(self, frame: bytes) -> None:
        if self.buffering_enabled and self.protecting:
            first = not self.queue.open
            if not self.queue.hold(frame):
                self._warn_full()
            elif first and self.output_listener is not None:
                self.output_listener()  # the epoch's first held frame: output waits
        else:
            self._write_tap(frame)

    def _warn_full(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            _log.warning("netbuf-full", cap_bytes=self.queue.cap_bytes,
                         dropped_frames=self.queue.dropped_frames,
                         detail="output held longer than the buffer allows; dropping new frames")

    def _write_tap(self, frame: bytes) -> None:
        if self.silenced:
            return
        try:
            os.write(self._tap_fd, frame)
        except BlockingIOError:
            self.tap_write_drops += 1
        except OSError as exc:
            self.tap_write_drops += 1
            _log.debug("tap-write-failed", error=exc.strerror)

    def _from_wire(self) -> None:
        # Traffic towards the guest is never held, but a guest that does not read it
        # (paused, stuck) must not make it pile up here: past INBOUND_CAP it is dropped,
        # as a full NIC ring would.
        batch: list[bytes] = []
        for _ in range(64):
            try:
                frame = os.read(self._tap_fd, MAX_FRAME)
            except OSError:  # BlockingIOError included: nothing more to read
                break
            if self._to_guest is None or not frame:
                continue
            if self._to_guest.transport.get_write_buffer_size() >= INBOUND_CAP:
                self._drop_inbound()
                continue
            self._to_guest.writelines((struct.pack(">I", len(frame)), frame))  # no copy
            batch.append(frame)
        if batch and self.inbound_listener is not None:
            self.inbound_listener(batch)

    def _drop_inbound(self) -> None:
        self.inbound_dropped += 1
        now = time.monotonic()
        if now - self._last_inbound_warning >= WARN_EVERY_S:
            self._last_inbound_warning = now
            _log.warning("netbuf-inbound-full", cap_bytes=INBOUND_CAP,
                         dropped_frames=self.inbound_dropped,
                         detail="the guest does not take its input; dropping frames towards it")

    def to_guest(self, frames: list[bytes]) -> int:
        """Hand `frames` to the guest's NIC as if they came from the wire (the input
        replay of a failover). Returns how many went; none without a QEMU connected."""
        if self._to_guest is None:
            return 0
        for frame in frames:
            self._to_guest.writelines((struct.pack(">I", len(frame)), frame))
        return len(frames)

    async def postsuspend(self, epoch: int) -> None:
        # The guest is paused: everything read so far belongs to this epoch or
        # an earlier one. A frame still in flight is counted in the next epoch,
        # which only delays it.
        self.protecting = True
        self.queue.seal(epoch)

    async def commit(self, epoch: int) -> None:
        for frame in self.queue.release(epoch):
            self._write_tap(frame)

    async def unprotected(self) -> None:
        self.protecting = False
        released = self.queue.release_all()
        for frame in released:
            self._write_tap(frame)
        if released:
            _log.warning("netbuf-released-unprotected", frames=len(released),
                         detail="backup lost: held output released, guest runs unprotected")

    def carry_over(self) -> None:
        self.queue.carry_over()

    def silence(self) -> None:
        self.silenced = True
        dropped = self.queue.release_all()
        _log.warning("netbuf-silenced", dropped_frames=len(dropped),
                     detail="held output dropped; nothing will leave this host again")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._tap_fd >= 0:
            asyncio.get_running_loop().remove_reader(self._tap_fd)
            os.close(self._tap_fd)
            self._tap_fd = -1
        self.socket_path.unlink(missing_ok=True)
