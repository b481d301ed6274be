"""The backup's copy of the protected VM: RAM file, device state, and a state record.

Commit order makes a torn replica detectable after any crash: the record says
`applying` before the RAM file or device state is touched and `committed`
only after both are complete. A replica found `applying` (or `syncing`, or
already `activated`) is never resumed.
"""
from __future__ import annotations

import json
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remus.common.capture import PAGE_SIZE

FORMAT = 1

EMPTY = "empty"          # nothing received yet
SYNCING = "syncing"      # a session started; its first consistent checkpoint is not committed
APPLYING = "applying"    # a commit was in progress: RAM and device state may disagree
COMMITTED = "committed"  # RAM file + device state = checkpoint `epoch`
ACTIVATED = "activated"  # handed to a running QEMU: no longer a replica


class ReplicaError(RuntimeError):
    """The replica cannot be used; the message says why and what to do."""


@dataclass
class ReplicaState:
    state: str = EMPTY
    fingerprint: str = ""
    session: str = ""
    epoch: int = 0
    taken_at: float = 0.0
    committed_at: float = 0.0
    ram_size: int = 0
    page_size: int = PAGE_SIZE
    disk_size: int = 0
    disk_synced: bool = False  # the disk's initial copy had completed at `epoch`
    generation: int = 1        # rises at every activation; a lower one never holds the guest
    ram_complete: bool = False  # every page was written in this session (a full round)

    def as_dict(self) -> dict:
        return {"format": FORMAT, **self.__dict__}


class Replica:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ram_file = self.dir / "replica.ram"
        self.device_file = self.dir / "device.state"
        self.disk_file = self.dir / "replica.disk"
        self.record_file = self.dir / "replica.json"
        self.state = self._read_record()
        self._map: mmap.mmap | None = None
        self.pages: np.ndarray | None = None

    def _read_record(self) -> ReplicaState:
        try:
            data = json.loads(self.record_file.read_text())
        except FileNotFoundError:
            return ReplicaState()
        except (OSError, ValueError) as exc:
            raise ReplicaError(f"replica record {self.record_file} unreadable: {exc}") from None
        if data.pop("format", None) != FORMAT:
            raise ReplicaError(f"replica record {self.record_file} has an unknown format")
        try:
            return ReplicaState(**data)
        except TypeError as exc:
            raise ReplicaError(f"replica record {self.record_file} is malformed: {exc}") from None

    def _write_record(self) -> None:
        tmp = self.record_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.state.as_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record_file)

    def _set(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        self._write_record()

    # --- receiving -------------------------------------------------------
    def begin_session(self, session: str, fingerprint: str, ram_size: int, page_size: int,
                      disk_size: int = 0) -> None:
        """A new session supersedes whatever the replica held: it is stale from now on."""
        self._set(state=SYNCING, session=session, fingerprint=fingerprint, epoch=0,
                  taken_at=0.0, committed_at=0.0, ram_size=ram_size, page_size=page_size,
                  disk_size=disk_size, disk_synced=False, ram_complete=False)
        self._open_ram(ram_size)
        if disk_size:
            # The session's mirror copies the whole disk again; start from zeros.
            with open(self.disk_file, "wb") as f:
                f.truncate(disk_size)

    def _open_ram(self, size: int) -> None:
        if self._map is not None and len(self._map) == size:
            return
        self.close()
        fd = os.open(self.ram_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def read_pages(self, indices: np.ndarray) -> np.ndarray:
        assert self.pages is not None, "no session open"
        return self.pages[indices]

    def commit(self, epoch: int, full: bool, taken_at: float, indices: np.ndarray,
               pages: np.ndarray, device_state: bytes, disk_extents=None, disk_data: bytes = b"",
               disk_synced: bool = False, precopy: bool = False) -> None:
        """Apply a verified checkpoint. Only whole checkpoints come here. A pre-copy round
        (pages only, taken while the guest ran) leaves the replica syncing."""
        assert self.pages is not None, "no session open"
        if self.state.state not in (SYNCING, COMMITTED):
            raise ReplicaError(f"cannot commit into a replica in state {self.state.state}")
        if not full and not self.state.ram_complete:
            raise ReplicaError("the first checkpoint of a session must be full")
        if precopy:
            if self.state.state != SYNCING:
                raise ReplicaError("a pre-copy round after the replica became resumable")
            self._apply_pages(full, indices, pages)
            if disk_extents is not None and len(disk_extents):
                self._write_disk(disk_extents, disk_data)
            self._set(epoch=epoch, ram_complete=self.state.ram_complete or full)
            return
        self._set(state=APPLYING, epoch=epoch)
        self._apply_pages(full, indices, pages)
        if disk_extents is not None and len(disk_extents):
            self._write_disk(disk_extents, disk_data)
        tmp = self.device_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(device_state)
        os.replace(tmp, self.device_file)
        self._set(state=COMMITTED, taken_at=taken_at, committed_at=time.time(),
                  disk_synced=self.state.disk_synced or disk_synced, ram_complete=True)

    def _apply_pages(self, full: bool, indices: np.ndarray, pages: np.ndarray) -> None:
        if full and len(indices) == self.pages.shape[0]:
            self.pages[:] = pages
        else:
            self.pages[indices] = pages

    def _write_disk(self, extents, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        fd = os.open(self.disk_file, os.O_WRONLY)
        try:
            for offset, length in extents.tolist():
                os.pwrite(fd, view[pos:pos + length], offset)
                pos += length
        finally:
            os.close(fd)

    # --- activation ------------------------------------------------------
    def check_activatable(self, fingerprint: str) -> None:
        s = self.state
        if s.state == COMMITTED and s.fingerprint == fingerprint:
            if not self.ram_file.exists() or not self.device_file.exists():
                raise ReplicaError("replica record says committed but its files are missing")
            if s.disk_size and not s.disk_synced:
                raise ReplicaError("the replica disk is incomplete: the disk's initial copy had "
                                   f"not finished at the last committed epoch {s.epoch}")
            return
        reasons = {
            EMPTY: "the replica is empty: no checkpoint was ever committed",
            SYNCING: "the replica is stale: a new session started and its first full "
                     "checkpoint never completed",
            APPLYING: f"the replica is torn: the daemon stopped while applying epoch {s.epoch}; "
                      "RAM and device state may disagree",
            ACTIVATED: "the replica was already activated once; resuming it again would "
                       "fork the VM",
        }
        if s.state == COMMITTED:
            raise ReplicaError("the replica belongs to a different guest configuration "
                               f"(fingerprint {s.fingerprint}, expected {fingerprint})")
        raise ReplicaError(reasons.get(s.state, f"the replica is in unknown state {s.state}"))

    def mark_activated(self, generation: int | None = None) -> None:
        self.close()
        self._set(state=ACTIVATED, generation=generation or self.state.generation + 1)

    def close(self) -> None:
        self.pages = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
