"""The backup's copy of the protected VM: RAM file, device state, and a state record.

Commit order makes a torn replica detectable after any crash: the record says
`applying` before the RAM file or device state is touched and `committed`
only after both are complete. A replica found `applying` (or `syncing`, or
already `activated`) is never resumed.

While a session syncs (the record says `syncing`, so nothing here is
resumable) checkpoints are applied as they stream in, frame by frame; once
the replica is `committed`, a checkpoint is staged whole (backup/staging.py)
and applied only after its end frame was verified.

Zeroed disk ranges are punched out of the replica disk (fallocate), so it
stays as sparse as the source.

Durability (a power loss of the backup host at any moment): every record is
written with common/durable.write_atomic (temporary file, fsync, rename,
directory fsync), so the record on disk is always one that was written whole.
The record saying `applying` is on disk before the RAM file or a disk is
touched, and before a record saying `committed` is renamed into place, the
RAM file and the disks are flushed (fdatasync) and the device state is
written durably: a `committed` record found after a power loss never sits over
torn data. Pages go into the RAM file with pwrite (the mapping is only read,
see write_pages), so fdatasync writes back just the pages a checkpoint
changed: its cost follows the data written, not the size of guest RAM; the
same holds for the disks' written extents. The record changes in memory only
once its file was written (a failed write leaves both as they were).

Everything here is owner-only: the directory 0700, its files 0600.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from remus.common.capture import PAGE_SIZE
from remus.common.durable import open_private, private_dir, tighten, write_atomic

FORMAT = 2  # 1: a single disk_size instead of disk_sizes

EMPTY = "empty"          # nothing received yet
SYNCING = "syncing"      # a session started; its first consistent checkpoint is not committed
APPLYING = "applying"    # a commit was in progress: RAM and device state may disagree
COMMITTED = "committed"  # RAM file + device state = checkpoint `epoch`
ACTIVATED = "activated"  # handed to a running QEMU: no longer a replica


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_ZERO_CHUNK = 1 << 20


def punch_zeroes(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeroes, deallocated where the file
    system can (it then stays sparse), else written with zeroes."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset}+{length}: {os.strerror(err)}")
    zeros = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):  # a short write is not an error: write the rest
        done += os.pwrite(fd, data[done:], offset + done)


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
    disk_sizes: list = field(default_factory=list)  # one per mirrored disk
    disk_synced: bool = False  # the disk's initial copy had completed at `epoch`
    generation: int = 1        # rises at every activation; a lower one never holds the guest
    ram_complete: bool = False  # every page was written in this session (a full round)

    def as_dict(self) -> dict:
        return {"format": FORMAT, **self.__dict__}


class Replica:
    def __init__(self, state_dir: Path):
        self.dir = private_dir(state_dir)
        self.ram_file = self.dir / "replica.ram"
        self.device_file = self.dir / "device.state"
        self.disk_file = self.dir / "replica.disk"  # the first mirrored disk's
        self.record_file = self.dir / "replica.json"
        for path in (self.ram_file, self.device_file, self.record_file,
                     *self.dir.glob("replica.disk*")):
            tighten(path)  # as an older version may have left them
        self.state = self._read_record()
        self._map: mmap.mmap | None = None
        self._ram_fd = -1  # pages are written and flushed through it
        self.pages: np.ndarray | None = None
        self._disk_fds: list[int] = []
        self._unflushed: set[int] = set()  # descriptors written since their last flush
        self._flush_failed: str | None = None  # until the next session rewrites everything

    def _read_record(self) -> ReplicaState:
        try:
            data = json.loads(self.record_file.read_text())
        except FileNotFoundError:
            return ReplicaState()
        except (OSError, ValueError) as exc:
            raise ReplicaError(f"replica record {self.record_file} unreadable: {exc}") from None
        fmt = data.pop("format", None)
        if fmt == 1:  # one disk at most: its size was disk_size
            size = data.pop("disk_size", 0)
            data["disk_sizes"] = [size] if size else []
        elif fmt != FORMAT:
            raise ReplicaError(f"replica record {self.record_file} has an unknown format")
        try:
            return ReplicaState(**data)
        except TypeError as exc:
            raise ReplicaError(f"replica record {self.record_file} is malformed: {exc}") from None

    def _set(self, **changes) -> None:
        """The record with `changes`: on disk (durably) first, then in memory. If the
        write fails (EMFILE, ENOSPC, EIO) the state in memory is still what the file
        says, and the error propagates."""
        record = dataclasses.replace(self.state, **changes)
        write_atomic(self.record_file, json.dumps(record.as_dict()).encode())
        for key, value in changes.items():
            setattr(self.state, key, value)

    # --- receiving -------------------------------------------------------
    def begin_session(self, session: str, fingerprint: str, ram_size: int, page_size: int,
                      disk_sizes=()) -> None:
        """A new session supersedes whatever the replica held: it is stale from now on."""
        self._set(state=SYNCING, session=session, fingerprint=fingerprint, epoch=0,
                  taken_at=0.0, committed_at=0.0, ram_size=ram_size, page_size=page_size,
                  disk_sizes=list(disk_sizes), disk_synced=False, ram_complete=False)
        self._open_ram(ram_size)
        self._close_disk()
        self._flush_failed = None  # its first checkpoint is full: every page written again
        for path, size in zip(self.disk_files(len(disk_sizes)), disk_sizes):
            # The session's mirror copies the whole disk again; start from an empty,
            # sparse file (a hole reads as zeroes).
            fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
            self._disk_fds.append(fd)
            self._unflushed.add(fd)  # the truncation too must be on disk before `committed`
            os.ftruncate(fd, size)

    def disk_files(self, count: int) -> list[Path]:
        """The replica files of the guest's `count` mirrored disks, in order."""
        return [self.disk_file, *(self.dir / f"replica.disk{i}" for i in range(1, count))][:count]

    def _open_ram(self, size: int) -> None:
        if self._map is not None and len(self._map) == size:
            return
        self.close()
        fd = open_private(self.ram_file, os.O_RDWR)
        try:
            os.ftruncate(fd, size)
            # Read-only: pages are written with pwrite (see write_pages). Read at
            # random: no read-ahead, so a page read back is cached one page large.
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._map.madvise(mmap.MADV_RANDOM)
        except BaseException:
            os.close(fd)
            raise
        self._ram_fd = fd
        self._unflushed.add(fd)
        self.pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def read_pages(self, indices: np.ndarray) -> np.ndarray:
        assert self.pages is not None, "no session open"
        return self.pages[indices]

    # --- streaming, while the session syncs (nothing here is resumable yet)
    def _check_syncing(self) -> None:
        assert self.pages is not None, "no session open"
        if self.state.state != SYNCING:
            raise ReplicaError(f"streamed data into a replica in state {self.state.state}")

    def apply_pages(self, indices: np.ndarray, pages: np.ndarray) -> None:
        self._check_syncing()
        self.write_pages(indices, pages)

    def write_disk(self, disk: int, extents, data: bytes) -> None:
        self._check_syncing()
        self._write_extents(disk, extents, memoryview(data))

    def zero_disk(self, disk: int, extents) -> None:
        self._check_syncing()
        self._zero_extents(disk, extents)

    def round_applied(self, epoch: int, full: bool) -> None:
        """A streamed pre-copy round is complete."""
        self._check_syncing()
        self._set(epoch=epoch, ram_complete=self.state.ram_complete or full)

    def commit_streamed(self, epoch: int, full: bool, taken_at: float, device_state: bytes,
                        disk_synced: bool) -> None:
        """The first consistent checkpoint of a session, its pages and disk already
        streamed in: with its device state the replica becomes resumable."""
        self._check_syncing()
        if not full and not self.state.ram_complete:
            raise ReplicaError("the first checkpoint of a session must be full")
        self._set(epoch=epoch)
        self._make_durable(device_state)
        self._set(state=COMMITTED, taken_at=taken_at, committed_at=time.time(),
                  disk_synced=self.state.disk_synced or disk_synced, ram_complete=True)

    # --- whole checkpoints
    def commit_staged(self, cp, staged) -> None:
        """Apply checkpoint `cp` (a protocol StagedCheckpoint, whole and verified) whose
        pages and disk data wait in `staged` (backup/staging.py)."""
        self.commit(cp.epoch, cp.full, cp.taken_at, cp.indices, cp.pages, cp.device_state,
                    disk_synced=cp.disk_synced, precopy=cp.precopy, staged=staged)

    def commit(self, epoch: int, full: bool, taken_at: float, indices: np.ndarray,
               pages: np.ndarray, device_state: bytes, disk_synced: bool = False,
               precopy: bool = False, staged=None) -> None:
        """Apply a verified checkpoint. Only whole checkpoints come here. A pre-copy round
        (pages only, taken while the guest ran) leaves the replica syncing. `staged`
        (backup/staging.py) holds what was staged of it: pages and disk data."""
        assert self.pages is not None, "no session open"
        if self.state.state not in (SYNCING, COMMITTED):
            raise ReplicaError(f"cannot commit into a replica in state {self.state.state}")
        if not full and not self.state.ram_complete:
            raise ReplicaError("the first checkpoint of a session must be full")
        if precopy:
            if self.state.state != SYNCING:
                raise ReplicaError("a pre-copy round after the replica became resumable")
            self._apply(indices, pages, staged)
            self._set(epoch=epoch, ram_complete=self.state.ram_complete or full)
            return
        self._set(state=APPLYING, epoch=epoch)
        self._apply(indices, pages, staged)
        self._make_durable(device_state)
        self._set(state=COMMITTED, taken_at=taken_at, committed_at=time.time(),
                  disk_synced=self.state.disk_synced or disk_synced, ram_complete=True)

    def _apply(self, indices: np.ndarray, pages: np.ndarray, staged) -> None:
        self.write_pages(indices, pages)
        if staged is not None:
            staged.apply(self.write_pages, self._write_extents, self._zero_extents)

    def _make_durable(self, device_state: bytes) -> None:
        """What a `committed` record stands for, on disk: the RAM file's and the disks'
        written pages flushed, the device state written whole. Only after this may the
        record say `committed`.

        After a failed flush the kernel may have dropped the pages it could not write
        and a later flush can succeed without them: nothing of this session is
        committed again (the record stays `applying`); the next session, whose first
        checkpoint writes every page and the whole disks, starts over."""
        if self._flush_failed:
            raise ReplicaError(f"a flush of the replica failed in this session "
                               f"({self._flush_failed}); it is resynchronised by the next one")
        for fd in [self._ram_fd, *self._disk_fds]:
            if fd in self._unflushed:  # a flush costs a disk cache flush even when clean
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    self._flush_failed = str(exc)
                    raise
                self._unflushed.discard(fd)
        write_atomic(self.device_file, device_state)

    def write_pages(self, indices: np.ndarray, pages: np.ndarray) -> None:
        """Pages into the RAM file, one pwrite each, so that a flush writes back just
        the pages a checkpoint changed.

        Not through the mapping: a page written through a shared mapping dirties its
        whole page-cache folio, and where the file system caches files in large folios
        (ext4 from Linux 6.16, XFS) a flush then writes up to MiBs per page changed.
        A pwrite dirties only the blocks it wrote, and one page per call keeps the
        folios it creates one page large (ext4 sizes a new folio by the write: a small
        write into a large folio costs ~100 us there, into a small one ~2 us).
        The mapping sees the same page cache, so reads agree."""
        npages = self.pages.shape[0]
        if not len(indices):
            return
        if pages.shape != (len(indices), PAGE_SIZE):
            raise ValueError(f"{pages.shape} pages for {len(indices)} indices")
        offsets = np.asarray(indices, dtype=np.int64) * PAGE_SIZE
        if int(offsets.min()) < 0 or int(offsets.max()) >= npages * PAGE_SIZE:
            raise IndexError(f"page index out of range (0..{npages - 1})")
        data, fd = memoryview(np.ascontiguousarray(pages)).cast("B"), self._ram_fd
        self._unflushed.add(fd)
        for i, offset in enumerate(offsets.tolist()):
            _pwrite_all(fd, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], offset)

    def _write_extents(self, disk: int, extents, data: memoryview) -> None:
        fd, pos = self._disk_fds[disk], 0
        self._unflushed.add(fd)
        for offset, length in extents.tolist():
            _pwrite_all(fd, data[pos:pos + length], offset)
            pos += length

    def _zero_extents(self, disk: int, extents) -> None:
        fd = self._disk_fds[disk]
        self._unflushed.add(fd)
        for offset, length in extents.tolist():
            punch_zeroes(fd, offset, length)

    # --- activation ------------------------------------------------------
    def check_activatable(self, fingerprint: str) -> None:
        s = self.state
        if s.state == COMMITTED and s.fingerprint == fingerprint:
            if not self.ram_file.exists() or not self.device_file.exists():
                raise ReplicaError("replica record says committed but its files are missing")
            if s.disk_sizes and not s.disk_synced:
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

    def _close_disk(self) -> None:
        for fd in self._disk_fds:
            os.close(fd)
            self._unflushed.discard(fd)
        self._disk_fds = []

    def close(self) -> None:
        self._close_disk()
        self.pages = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        if self._ram_fd >= 0:
            os.close(self._ram_fd)
            self._unflushed.discard(self._ram_fd)
            self._ram_fd = -1
