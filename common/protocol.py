"""The checkpoint-stream protocol between the primary and the backup, sans I/O.

Like h11 does for HTTP, this module never touches a socket: the daemons feed
received bytes in (``receive``) and get events out, and every method that
produces something to send returns the bytes. Framing is in ``wire``.

Messages (header "t"; every other field is in the msgpack header, bulk data
is in the frame payload)::

    hello    P->B  version, fingerprint, session (32 lowercase hex), ram_size, page_size,
                   disk_sizes (one per mirrored disk, in the guest's order), media (size
                   and sha256 of each read-only medium, "SIZE:HEX"), generation (the
                   generation at which the sender holds the guest)
    welcome  B->P  version, session, generation (the highest this backup knows of)
    reject   B->P  reason, generation (as in welcome; a primary below it must stand down)
    begin    P->B  epoch (>= 1), full, taken_at (unix time the guest was paused, or
                   the copy started for pre-copy), disk_synced, precopy
    pages    P->B  count, codec ("zstd"|"none"), xor, raw_len
                   payload: count uint32 LE page indices, then the encoded pages
                   (raw_len = count * page_size decoded bytes; with xor they are
                   new XOR previous page contents)
    device   P->B  codec, raw_len; payload: the encoded device state (raw_len > 0)
    disk     P->B  disk (index into disk_sizes), count, codec, raw_len; payload:
                   count DISK_EXTENT records
                   (offset uint64 LE, length uint32 LE), then the encoded bytes
                   of those extents (raw_len decoded bytes)
    zero     P->B  disk, count; payload: count ZERO_EXTENT records (offset, length, both
                   uint64 LE): ranges that read as zeroes (holes, write-zeroes,
                   discards); the backup punches them, no data travels
    end      P->B  epoch, pages (pages in this checkpoint), checksum
    ack      B->P  epoch
    progress B->P  epoch, bytes (payload bytes of checkpoint `epoch` received so far:
                   a big checkpoint is still flowing, so the primary's wait for its
                   ack follows progress rather than one deadline)
    bye      P->B  reason (the primary ends the session on purpose: do not activate)
    handover P->B  epoch, reason (the primary stopped its guest for good right after
                   checkpoint `epoch`, which the backup acknowledged: take over now,
                   no fencing needed; an operator's planned switchover)
    input    P->B  after_epoch, count; payload: count frames, each a uint32 LE length
                   and an Ethernet frame the primary passed TO the guest after the
                   barrier of checkpoint `after_epoch`. Not part of any checkpoint:
                   the backup keeps those newer than its last commit and, if it
                   activates, hands them to the resumed guest again, so that a
                   client's request the lost primary had received is not lost with it.

A checkpoint is ``begin, pages*, (disk|zero)*, device, end``; its disk and zero
frames come in disk order, and within one disk their extents are sorted and
disjoint across all its disk and zero frames. A pre-copy round
(``precopy``: taken while the guest runs, so not a consistent state) has no
device frame; its disk frames carry the writes so far, in order. The backup
applies it but stays not resumable. Pre-copy rounds come first in a session, the first of them full;
the first checkpoint after them may then be incremental. The checksum in ``end`` is the
hex blake2b (digest_size=16) over, in order:

    1. the 17-byte preamble ``struct.pack("<QBd", epoch, flags, taken_at)``
       with flags = full | precopy << 1,
    2. for each pages frame, its index bytes (uint32 LE) then the NEW page
       contents (after undoing xor),
    3. for each disk frame, its extent table then the raw (decoded) data; for
       each zero frame, its extent table,
    4. the raw (decoded) device state.

(1) is there so that a corrupted ``full`` flag or ``taken_at`` cannot slip
through either: every field of a staged checkpoint is covered.

Errors: anything wrong with what the peer sent raises ``ProtocolError`` (the
protocol object is then dead; during the backup's handshake the exception's
``reply`` holds a reject frame to send). Misuse by the calling daemon
(bad arguments, acking an epoch that is not awaiting an ack) raises
``ValueError``/``TypeError``.

Limits on the backup besides the frame limits in ``wire``: the decoded size of
one pages or device frame (``raw_len``) is at most ``max_payload`` too (the
encoder keeps pages frames at or below ``MAX_FRAME_RAW`` decoded bytes).

Disk data is handed out frame by frame as ``DiskWritten`` and ``DiskZeroed``
events, in stream order. Streaming (``BackupProtocol(stream=True)``, what the
daemon uses): pages are not gathered into the staged checkpoint either but handed
out the same way as ``PagesReceived``, from the ``events()`` generator; the daemon applies or stages each before it asks for
the next, so a later frame's xor base is what the daemon holds. Memory then
stays at one frame whatever the size of the checkpoint.

A ``bye`` is accepted between checkpoints and inside one (the open checkpoint
is then abandoned without error): either way the backup gets ``PeerBye``.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import zstandard

from .wire import (
    DEFAULT_MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    encode_frame_parts,
)

__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "CheckpointEncoder",
    "PrimaryProtocol",
    "BackupProtocol",
    "StagedCheckpoint",
    "Welcome",
    "Rejected",
    "Acked",
    "SessionOpened",
    "Send",
    "CheckpointStaged",
    "PeerBye",
    "PeerHandover",
    "InputReceived",
    "DiskRun",
    "PagesReceived",
    "DiskWritten",
    "DiskZeroed",
    "Progress",
    "checkpoint_checksum",
]

PROTOCOL_VERSION = 3
CODECS = ("zstd", "none")
# The encoder keeps the decoded size of one pages frame at or below this, so
# that a backup with the default max_payload accepts it even if incompressible.
MAX_FRAME_RAW = DEFAULT_MAX_PAYLOAD // 4
_MAX_EPOCH = 2**63 - 1
_SESSION_RE = re.compile(r"[0-9a-f]{32}")
_PREAMBLE = struct.Struct("<QBd")
_LE_U32 = np.dtype("<u4")


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Welcome:
    session: str
    generation: int = 0


@dataclass(frozen=True)
class Rejected:
    reason: str
    generation: int = 0


@dataclass(frozen=True)
class Acked:
    epoch: int


@dataclass(frozen=True)
class Progress:
    """The backup has received `bytes` of checkpoint `epoch` so far."""
    epoch: int
    bytes: int


@dataclass(frozen=True)
class SessionOpened:
    session: str
    ram_size: int
    page_size: int
    disk_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Send:
    """Bytes the backup daemon must write to the primary."""

    data: bytes


@dataclass(eq=False)
class StagedCheckpoint:
    epoch: int
    full: bool
    taken_at: float
    indices: np.ndarray  # uint32, strictly increasing
    pages: np.ndarray  # (len(indices), page_size) uint8, NEW contents
    device_state: bytes
    disk_synced: bool = False
    precopy: bool = False  # a pre-copy round: pages only, not a resumable state
    pages_received: int = 0  # pages in this checkpoint (streamed ones too)


@dataclass(frozen=True, eq=False)
class CheckpointStaged:
    checkpoint: StagedCheckpoint


@dataclass(frozen=True)
class PeerBye:
    reason: str


@dataclass(frozen=True)
class PeerHandover:
    """The primary's guest is stopped for good after checkpoint `epoch`: take over."""

    epoch: int
    reason: str


@dataclass(frozen=True, eq=False)
class DiskRun:
    """Sorted, disjoint disk extents of one kind, for one frame: `data` holds their
    bytes in order (`table` is DISK_EXTENT), or is None for ranges that read as
    zeroes (`table` is ZERO_EXTENT)."""
    table: np.ndarray
    data: list[bytes] | None
    disk: int = 0  # which mirrored disk

    @property
    def raw_len(self) -> int:
        return 0 if self.data is None else sum(map(len, self.data))


@dataclass(frozen=True, eq=False)
class PagesReceived:
    """Streaming: one pages frame of checkpoint `epoch`, decoded (new contents)."""
    epoch: int
    indices: np.ndarray  # uint32, strictly increasing
    pages: np.ndarray    # (len(indices), page_size) uint8


@dataclass(frozen=True, eq=False)
class DiskWritten:
    """One disk frame of checkpoint `epoch`: extents of mirrored disk `disk` and their bytes."""
    epoch: int
    disk: int
    extents: np.ndarray  # DISK_EXTENT
    data: bytes


@dataclass(frozen=True, eq=False)
class DiskZeroed:
    """One zero frame of checkpoint `epoch`: ranges of disk `disk` that read as zeroes."""
    epoch: int
    disk: int
    extents: np.ndarray  # ZERO_EXTENT


@dataclass(frozen=True, eq=False)
class InputReceived:
    """Frames the primary handed to the guest after the barrier of `after_epoch`."""

    after_epoch: int
    frames: list[bytes]
    nic: int = 0


# --------------------------------------------------------------------------
# Message schemas

_Field = tuple[str, str]
_SCHEMA: dict[str, tuple[_Field, ...]] = {
    "hello": (
        ("version", "int"),
        ("fingerprint", "str"),
        ("session", "str"),
        ("ram_size", "int"),
        ("page_size", "int"),
        ("disk_sizes", "intlist"),
        ("media", "strlist"),
        ("generation", "int"),
    ),
    "welcome": (("version", "int"), ("session", "str"), ("generation", "int")),
    "reject": (("reason", "str"), ("generation", "int")),
    "begin": (("epoch", "int"), ("full", "bool"), ("taken_at", "float"), ("disk_synced", "bool"),
              ("precopy", "bool")),
    "pages": (("count", "int"), ("codec", "str"), ("xor", "bool"), ("raw_len", "int")),
    "disk": (("disk", "int"), ("count", "int"), ("codec", "str"), ("raw_len", "int")),
    "zero": (("disk", "int"), ("count", "int")),
    "device": (("codec", "str"), ("raw_len", "int")),
    "end": (("epoch", "int"), ("pages", "int"), ("checksum", "str")),
    "ack": (("epoch", "int"),),
    "progress": (("epoch", "int"), ("bytes", "int")),
    "bye": (("reason", "str"),),
    "input": (("after_epoch", "int"), ("count", "int"), ("nic", "int")),
    "handover": (("epoch", "int"), ("reason", "str")),
}
_WITH_PAYLOAD = frozenset({"pages", "disk", "zero", "device", "input"})
_FROM_PRIMARY = frozenset({"hello", "begin", "pages", "disk", "zero", "device", "end", "bye",
                           "input", "handover"})
# Input frames: Ethernet header at least, one jumbo frame with offloads at most.
MIN_INPUT_FRAME, MAX_INPUT_FRAME = 14, 65536 + 64
MAX_INPUT_COUNT = 4096
_INPUT_LEN = struct.Struct("<I")
# A disk frame's payload starts with `count` of these, then the encoded data.
DISK_EXTENT = np.dtype([("offset", "<u8"), ("length", "<u4")])
# A zero frame's payload is `count` of these: no data follows.
ZERO_EXTENT = np.dtype([("offset", "<u8"), ("length", "<u8")])
DISK_SECTOR = 512
MAX_DISK_SIZE = 1 << 50
MAX_DISKS = 16
MAX_NICS = 8
_FROM_BACKUP = frozenset({"welcome", "reject", "ack", "progress"})


def _fields(frame: Frame, sender: str, allowed: frozenset[str]) -> tuple[str, dict]:
    """Check a frame's type and header fields; return (type, fields)."""
    header = frame.header
    t = header["t"]
    schema = _SCHEMA.get(t)
    if schema is None:
        raise ProtocolError(f"unknown message type {t!r}")
    if t not in allowed:
        raise ProtocolError(f"message type {t!r} is never sent by a {sender}")
    out: dict = {}
    for name, kind in schema:
        if name not in header:
            raise ProtocolError(f"{t!r} message is missing the field {name!r}")
        value = header[name]
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind in ("intlist", "strlist"):
            item = str if kind == "strlist" else int
            ok = isinstance(value, list) and len(value) <= MAX_DISKS and all(
                isinstance(x, item) and not isinstance(x, bool) for x in value)
        else:  # float: an int is accepted too; must be finite
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                ok = math.isfinite(value)
        if not ok:
            raise ProtocolError(
                f"{t!r} message field {name!r} must be a{' finite' if kind == 'float' else ''} "
                f"{kind}, got {type(value).__name__} {value!r:.60}"
            )
        out[name] = value
    extra = set(header) - {"t"} - {name for name, _ in schema}
    if extra:
        raise ProtocolError(f"{t!r} message has unknown field(s) {sorted(extra)}")
    if t not in _WITH_PAYLOAD and frame.payload:
        raise ProtocolError(f"{t!r} message must not carry a payload ({len(frame.payload)} bytes)")
    return t, out


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {'>= ' + str(lo) if hi is None else f'in {lo}..{hi}'}, got {value}")
    return value


_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()
# Updates at least this big are hashed on a worker thread (hashlib releases
# the GIL for them), overlapping (de)compression and copying on the calling
# thread; smaller ones run inline when nothing of that hasher is queued.
_ASYNC_HASH_MIN = 256 * 1024
_HASH_BACKLOG = 32 << 20


_hash_pool_pid = 0


def _pool() -> ThreadPoolExecutor:
    global _hash_pool, _hash_pool_pid
    pid = os.getpid()
    if _hash_pool is None or _hash_pool_pid != pid:  # worker threads do not survive fork
        with _hash_pool_lock:
            if _hash_pool is None or _hash_pool_pid != pid:
                workers = max(1, min(4, os.cpu_count() or 1))
                _hash_pool = ThreadPoolExecutor(workers, thread_name_prefix="remus-hash")
                _hash_pool_pid = pid
    return _hash_pool


class _Hasher:
    """blake2b(digest_size=16) whose big updates run on a worker thread, in
    order (at most one drain task per hasher at a time). The buffers passed in
    must not change until ``hexdigest`` returns. At most ``_HASH_BACKLOG``
    bytes wait to be hashed: past that ``update`` waits, so a checkpoint's
    buffers cannot pile up here faster than they are hashed."""

    __slots__ = ("_h", "_queue", "_lock", "_task", "_queued")

    def __init__(self, epoch: int, full: bool, taken_at: float, precopy: bool = False) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._h.update(_PREAMBLE.pack(epoch, (1 if full else 0) | (2 if precopy else 0), taken_at))
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._task: Future | None = None
        self._queued = 0

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._task = None
                    return
                data, size = self._queue.popleft()
            self._h.update(data)
            with self._lock:
                self._queued -= size

    def update(self, data) -> None:
        size = memoryview(data).nbytes
        with self._lock:
            idle = self._task is None
            if idle and size < _ASYNC_HASH_MIN:
                self._h.update(data)  # nothing queued: order is kept
                return
            self._queue.append((data, size))
            self._queued += size
            if idle:
                self._task = _pool().submit(self._drain)
            backlog = self._queued > _HASH_BACKLOG
        if backlog:
            self._wait()

    def _wait(self) -> None:
        while True:
            with self._lock:
                task = self._task
            if task is None:
                return
            task.result()

    def hexdigest(self) -> str:
        self._wait()
        return self._h.hexdigest()


def _new_hasher(epoch: int, full: bool, taken_at: float, precopy: bool = False) -> _Hasher:
    return _Hasher(epoch, full, taken_at, precopy)


def checkpoint_checksum(
    epoch: int,
    full: bool,
    taken_at: float,
    indices: np.ndarray,
    pages: np.ndarray,
    device_state: bytes,
    batches: list[int] | None = None,
    precopy: bool = False,
) -> str:
    """The end-frame checksum of a checkpoint (see the module docstring).

    The index bytes and page contents are hashed per pages frame, so the
    result depends on how the pages were split into frames: ``batches`` is
    the list of per-frame page counts (default: one frame for all pages).
    """
    h = _new_hasher(epoch, full, float(taken_at), precopy)
    idx = np.ascontiguousarray(indices, dtype=_LE_U32)
    pg = np.ascontiguousarray(pages, dtype=np.uint8)
    if batches is None:
        batches = [len(idx)] if len(idx) else []
    start = 0
    for n in batches:
        h.update(idx[start : start + n])
        h.update(pg[start : start + n])
        start += n
    h.update(device_state)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Primary side


class CheckpointEncoder:
    """Produces the frames the primary sends. Stateless between calls apart from
    the reused zstd compression context."""

    def __init__(self, page_size: int, compression: str = "zstd", level: int = 1) -> None:
        self.page_size = _check_int("page_size", page_size, 1)
        if compression not in CODECS:
            raise ValueError(f"compression must be one of {CODECS}, got {compression!r}")
        self.compression = compression
        self.level = level
        self._cctx = zstandard.ZstdCompressor(level=level) if compression == "zstd" else None

    def hello(self, fingerprint: str, session: str, ram_size: int, disk_sizes=(),
              generation: int = 1, media=()) -> bytes:
        if not isinstance(fingerprint, str):
            raise TypeError("fingerprint must be a str")
        if not isinstance(session, str) or not _SESSION_RE.fullmatch(session):
            raise ValueError(f"session must be 32 lowercase hex digits, got {session!r}")
        _check_int("ram_size", ram_size, self.page_size)
        if ram_size % self.page_size:
            raise ValueError(f"ram_size {ram_size} is not a multiple of page_size {self.page_size}")
        return encode_frame(
            {
                "t": "hello",
                "version": PROTOCOL_VERSION,
                "fingerprint": fingerprint,
                "session": session,
                "ram_size": ram_size,
                "page_size": self.page_size,
                "disk_sizes": [_check_int("disk_size", d, 1, MAX_DISK_SIZE) for d in disk_sizes],
                "media": [str(m) for m in media],
                "generation": _check_int("generation", generation, 1, _MAX_EPOCH),
            }
        )

    def input(self, after_epoch: int, frames: list[bytes], nic: int = 0) -> bytes:
        """Frames passed to the guest's NIC `nic` after the barrier of `after_epoch`
        (0: before the first)."""
        _check_int("after_epoch", after_epoch, 0, _MAX_EPOCH)
        if not 1 <= len(frames) <= MAX_INPUT_COUNT:
            raise ValueError(f"an input message carries 1..{MAX_INPUT_COUNT} frames, not {len(frames)}")
        parts = []
        for f in frames:
            if not MIN_INPUT_FRAME <= len(f) <= MAX_INPUT_FRAME:
                raise ValueError(f"input frame of {len(f)} bytes is not an Ethernet frame")
            parts += (_INPUT_LEN.pack(len(f)), f)
        return encode_frame_parts({"t": "input", "after_epoch": after_epoch, "count": len(frames),
                                   "nic": _check_int("nic", nic, 0, MAX_NICS - 1)}, *parts)

    def bye(self, reason: str) -> bytes:
        if not isinstance(reason, str):
            raise TypeError("reason must be a str")
        return encode_frame({"t": "bye", "reason": reason})

    def handover(self, epoch: int, reason: str) -> bytes:
        if not isinstance(reason, str):
            raise TypeError("reason must be a str")
        return encode_frame({"t": "handover", "epoch": _check_int("epoch", epoch, 1, _MAX_EPOCH),
                             "reason": reason})

    def _encode(self, raw: memoryview | bytes) -> tuple[str, bytes | memoryview]:
        if self._cctx is not None:
            packed = self._cctx.compress(raw)
            if len(packed) < len(raw):
                return "zstd", packed
        return "none", raw

    def checkpoint(
        self,
        epoch: int,
        full: bool,
        taken_at: float,
        indices: np.ndarray,
        new_pages: np.ndarray,
        previous_pages: np.ndarray | None,
        device_state: bytes,
        batch_pages: int = 1024,
        disk_synced: bool = False,
        precopy: bool = False,
        disk_runs=(),
    ) -> Iterator[bytes]:
        """Validate the arguments now, then return an iterator over the encoded
        frames: begin, pages (batches of at most ``batch_pages`` pages), device, end.
        A ``precopy`` round has no device state (``device_state`` empty).

        The disk's writes come as ``disk_runs`` (``DiskRun``s in disk and offset
        order, zeroed ranges included, each at most MAX_FRAME_RAW bytes of data),
        encoded lazily, a frame at a time.

        ``previous_pages`` (same shape as ``new_pages``) turns on xor encoding;
        it must be None for a full checkpoint. Pages whose zstd output would not
        be smaller than the input are sent with codec "none".
        """
        _check_int("epoch", epoch, 1, _MAX_EPOCH)
        if not isinstance(full, (bool, np.bool_)):
            raise TypeError("full must be a bool")
        full = bool(full)
        taken_at = float(taken_at)
        if not math.isfinite(taken_at):
            raise ValueError("taken_at must be finite")
        _check_int("batch_pages", batch_pages, 1)
        idx, pages, prev = self._checked_pages(full, indices, new_pages, previous_pages)
        device = bytes(device_state)
        if precopy:
            if device or disk_synced:
                raise ValueError("a pre-copy round carries no device state and no synced disk")
        elif not device:
            raise ValueError("device_state must not be empty")
        batch = max(1, min(batch_pages, MAX_FRAME_RAW // self.page_size))
        return self._stream(epoch, full, taken_at, _array_batches(idx, pages, prev, batch), device,
                            disk_runs, bool(disk_synced), bool(precopy), batch)

    def _checked_pages(self, full: bool, indices, new_pages, previous_pages):
        """The checkpoint's page arguments, checked and made contiguous: (idx, pages, prev)."""
        ps = self.page_size
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "ui":
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} shape {idx.shape}")
        n = len(idx)
        if n:
            if int(idx.min()) < 0 or int(idx.max()) > 0xFFFFFFFF:
                raise ValueError("indices must fit in uint32")
            if n > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                raise ValueError("indices must be strictly increasing")
        idx = np.ascontiguousarray(idx, dtype=_LE_U32)
        if full and not np.array_equal(idx, np.arange(n, dtype=_LE_U32)):
            raise ValueError("a full checkpoint must list every page 0..npages-1")
        pages = np.asarray(new_pages)
        if pages.dtype != np.uint8 or pages.shape != (n, ps):
            raise ValueError(
                f"new_pages must be uint8 of shape ({n}, {ps}), got {pages.dtype} {pages.shape}"
            )
        pages = np.ascontiguousarray(pages)
        prev = None
        if previous_pages is not None:
            if full:
                raise ValueError("a full checkpoint must not use xor (previous_pages must be None)")
            prev = np.asarray(previous_pages)
            if prev.dtype != np.uint8 or prev.shape != (n, ps):
                raise ValueError(
                    f"previous_pages must be uint8 of shape ({n}, {ps}), got {prev.dtype} {prev.shape}"
                )
        return idx, pages, prev

    def precopy_round(self, epoch: int, full: bool, taken_at: float, batches, disk_runs=(),
                      batch_pages: int = 1024) -> Iterator[bytes]:
        """A pre-copy round from page batches produced as it goes: `batches` yields
        (indices, new_pages, previous_pages or None), indices strictly increasing
        across batches (a full round: every page in order). Nothing here holds more
        than one batch."""
        _check_int("epoch", epoch, 1, _MAX_EPOCH)
        batch = max(1, min(_check_int("batch_pages", batch_pages, 1), MAX_FRAME_RAW // self.page_size))
        return self._stream(epoch, bool(full), float(taken_at), batches, b"", disk_runs, False,
                            True, batch)

    def _stream(self, epoch: int, full: bool, taken_at: float, batches, device: bytes, runs,
                disk_synced: bool, precopy: bool, batch: int) -> Iterator[bytes]:
        h = _new_hasher(epoch, full, taken_at, precopy)
        yield encode_frame({"t": "begin", "epoch": epoch, "full": full, "taken_at": taken_at,
                            "disk_synced": disk_synced, "precopy": precopy})
        n = 0
        for idx, new, prev in batches:
            for start in range(0, len(idx), batch):
                yield self._pages_frame(h, idx[start:start + batch], new[start:start + batch],
                                        None if prev is None else prev[start:start + batch])
            n += len(idx)
        for run in runs:
            yield self._disk_frame(h, run)
        if not precopy:
            codec, encoded = self._encode(device)
            h.update(device)
            yield encode_frame_parts({"t": "device", "codec": codec, "raw_len": len(device)}, encoded)
        yield encode_frame({"t": "end", "epoch": epoch, "pages": n, "checksum": h.hexdigest()})

    def _pages_frame(self, h: _Hasher, idx: np.ndarray, new: np.ndarray,
                     prev: np.ndarray | None) -> bytes:
        """One pages frame; the hasher keeps `new` until its digest is taken."""
        count, ps = len(idx), self.page_size
        if new.shape != (count, ps) or (prev is not None and prev.shape != new.shape):
            raise ValueError(f"a batch of {count} pages has pages of shape {new.shape}")
        idx_bytes = memoryview(np.ascontiguousarray(idx, dtype=_LE_U32)).cast("B")
        new = np.ascontiguousarray(new)
        body = new if prev is None else np.bitwise_xor(new, prev)
        codec, encoded = self._encode(memoryview(body).cast("B"))
        h.update(idx_bytes)
        h.update(new)
        return encode_frame_parts({"t": "pages", "count": count, "codec": codec,
                                   "xor": prev is not None, "raw_len": count * ps},
                                  idx_bytes, encoded)

    def _disk_frame(self, h: _Hasher, run) -> bytes:
        """A disk frame for a run with data, a zero frame for one without."""
        table = memoryview(np.ascontiguousarray(run.table)).cast("B")
        h.update(table)
        if run.data is None:
            return encode_frame_parts({"t": "zero", "disk": run.disk, "count": len(run.table)},
                                      table)
        chunk = b"".join(run.data)
        codec, encoded = self._encode(chunk)
        h.update(chunk)
        return encode_frame_parts({"t": "disk", "disk": run.disk, "count": len(run.table),
                                   "codec": codec, "raw_len": len(chunk)}, table, encoded)


def _array_batches(idx: np.ndarray, pages: np.ndarray, prev: np.ndarray | None, batch: int):
    for start in range(0, len(idx), batch):
        stop = start + batch
        yield idx[start:stop], pages[start:stop], None if prev is None else prev[start:stop]


class PrimaryProtocol:
    """What the primary receives from the backup: welcome/reject, then acks.

    ``sent(epoch)`` records a checkpoint the daemon queued; acks must then
    arrive for exactly those epochs, in order.
    """

    def __init__(self, session: str, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if not isinstance(session, str) or not _SESSION_RE.fullmatch(session):
            raise ValueError(f"session must be 32 lowercase hex digits, got {session!r}")
        self.session = session
        self._decoder = FrameDecoder(max_payload)
        self._outstanding: deque[int] = deque()
        self._last_sent = 0
        self.state = "await-welcome"  # -> ready | rejected; failed | closed
        self._error: str | None = None

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Epochs sent but not yet acknowledged, oldest first."""
        return tuple(self._outstanding)

    def sent(self, epoch: int) -> None:
        _check_int("epoch", epoch, 1, _MAX_EPOCH)
        if epoch <= self._last_sent:
            raise ValueError(f"sent({epoch}) after sent({self._last_sent}): epochs must increase")
        self._last_sent = epoch
        self._outstanding.append(epoch)

    def receive(self, data: bytes) -> list[Welcome | Rejected | Acked | Progress]:
        if self._error is not None:
            raise ProtocolError(f"protocol is unusable after an earlier error ({self._error})")
        if self.state == "closed":
            raise ProtocolError("receive() after close()")
        try:
            events = []
            for frame in self._decoder.feed(data):
                events.append(self._handle(frame))
            return events
        except ProtocolError as exc:
            self._error = str(exc)
            self.state = "failed"
            raise

    def _handle(self, frame: Frame) -> Welcome | Rejected | Acked | Progress:
        t, f = _fields(frame, "backup", _FROM_BACKUP)
        if t == "progress":
            if self.state != "ready" or f["epoch"] not in self._outstanding or f["bytes"] < 0:
                raise ProtocolError(f"progress of epoch {f['epoch']}, which is not awaiting an ack")
            return Progress(f["epoch"], f["bytes"])
        if self.state == "rejected":
            raise ProtocolError(f"{t!r} message after the backup rejected the session")
        if t == "welcome":
            if self.state != "await-welcome":
                raise ProtocolError("second welcome from the backup")
            if f["version"] != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol version {f['version']}, this primary speaks "
                    f"{PROTOCOL_VERSION}"
                )
            if f["session"] != self.session:
                raise ProtocolError(
                    f"welcome is for session {f['session']!r}, this primary's session is "
                    f"{self.session!r}"
                )
            self.state = "ready"
            return Welcome(f["session"], f["generation"])
        if t == "reject":
            if self.state != "await-welcome":
                raise ProtocolError("reject from the backup after it welcomed the session")
            self.state = "rejected"
            return Rejected(f["reason"], f["generation"])
        # ack
        epoch = f["epoch"]
        if self.state != "ready":
            raise ProtocolError(f"ack for epoch {epoch} before the backup's welcome")
        if not self._outstanding:
            raise ProtocolError(f"ack for epoch {epoch}, but no checkpoint is awaiting an ack")
        if epoch != self._outstanding[0]:
            expected = self._outstanding[0]
            raise ProtocolError(
                f"ack for epoch {epoch}, but the oldest unacknowledged checkpoint sent is "
                f"epoch {expected}"
            )
        self._outstanding.popleft()
        return Acked(epoch)

    def close(self) -> None:
        """EOF from the backup. Raises ProtocolError if a frame was cut off."""
        if self.state in ("closed", "failed"):
            return
        self.state = "closed"
        self._decoder.close()


# --------------------------------------------------------------------------
# Backup side


class _Open:
    """A checkpoint between begin and end."""

    __slots__ = ("epoch", "full", "taken_at", "hasher", "received", "last_index", "precopy",
                 "full_pages", "idx_parts", "page_parts", "device", "disk_synced",
                 "disk_at", "bytes")

    def __init__(self, epoch: int, full: bool, taken_at: float, npages: int, page_size: int,
                 disk_synced: bool = False, precopy: bool = False, stream: bool = False):
        self.disk_synced = disk_synced
        self.precopy = precopy
        self.disk_at = (-1, 0)  # (disk, end of its last extent): frames come in that order
        self.bytes = 0  # payload bytes received
        self.epoch = epoch
        self.full = full
        self.taken_at = taken_at
        self.hasher = _new_hasher(epoch, full, taken_at, precopy)
        self.received = 0
        self.last_index = -1
        # Lazily committed by the OS: costs nothing until written.
        self.full_pages = np.empty((npages, page_size), dtype=np.uint8) if full and not stream \
            else None
        self.idx_parts: list[np.ndarray] = []
        self.page_parts: list[np.ndarray] = []
        self.device: bytes | None = None


class BackupProtocol:
    """What the backup receives from the primary, turned into events.

    ``read_previous(indices)`` must return the committed replica's pages at
    ``indices`` as a (n, page_size) uint8 array; it is used to undo xor. A
    checkpoint staged but not yet acknowledged (``ack``) is overlaid on top of
    it, so xor decoding is right even when one ``receive`` call carries the end
    of one checkpoint and pages of the next before the daemon got to commit.
    The returned array is never modified.
    """

    def __init__(
        self,
        fingerprint: str,
        ram_size: int,
        page_size: int,
        read_previous: Callable[[np.ndarray], np.ndarray],
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        disks: int = 0,
        generation: int = 0,
        stream: bool = False,
        media: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if not isinstance(fingerprint, str):
            raise TypeError("fingerprint must be a str")
        self.fingerprint = fingerprint
        self.stream = stream  # hand out page and disk data per frame (see the module doc)
        # The highest generation known to have held the guest: a primary below it is stale.
        self.generation = _check_int("generation", generation, 0, _MAX_EPOCH)
        self._last_input_epoch = 0
        self._consistent_staged = False  # a non-pre-copy checkpoint was staged
        self.disks = disks  # how many mirrored disks the guest has
        self.media = tuple(media)  # (file, "SIZE:SHA256") of each read-only medium here
        self.disk_sizes: tuple[int, ...] = ()
        self.page_size = _check_int("page_size", page_size, 1)
        self.ram_size = _check_int("ram_size", ram_size, page_size)
        if ram_size % page_size:
            raise ValueError(f"ram_size {ram_size} is not a multiple of page_size {page_size}")
        self.npages = ram_size // page_size
        if self.npages > 2**32:
            raise ValueError("more pages than uint32 page indices can address")
        self.max_payload = max_payload
        self._read_previous = read_previous
        self._decoder = FrameDecoder(max_payload)
        self._dctx = zstandard.ZstdDecompressor()
        self.session: str | None = None
        self.state = "await-hello"  # idle, in-checkpoint, bye, closed, failed
        self._open: _Open | None = None
        self._last_staged: int | None = None
        self._unacked: list[StagedCheckpoint] = []
        self._error: str | None = None

    # -- public API ---------------------------------------------------------

    def receive(self, data: bytes) -> list:
        """All the events of `data` (see ``events``)."""
        return list(self.events(data))

    def events(self, data: bytes) -> Iterator:
        """The events of `data`, one frame's worth at a time: a streaming daemon
        applies or stages each data event before it takes the next."""
        if self._error is not None:
            raise ProtocolError(f"protocol is unusable after an earlier error ({self._error})")
        if self.state == "closed":
            raise ProtocolError("receive() after close()")
        handshake = self.state == "await-hello"
        try:
            for frame in self._decoder.feed(data):
                handshake = self.state == "await-hello"
                events: list = []
                self._handle(frame, events)
                yield from events
        except ProtocolError as exc:
            self._fail(str(exc))
            if handshake and exc.reply is None:
                exc.reply = encode_frame({"t": "reject", "reason": str(exc),
                                          "generation": self.generation})
            raise
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise

    @property
    def receiving(self) -> tuple[int, int] | None:
        """(epoch, payload bytes so far) of the checkpoint being received, if any."""
        return (self._open.epoch, self._open.bytes) if self._open is not None else None

    def progress(self, epoch: int, received: int) -> bytes:
        """A progress frame: the daemon tells the primary a big checkpoint is flowing."""
        return encode_frame({"t": "progress", "epoch": _check_int("epoch", epoch, 1, _MAX_EPOCH),
                             "bytes": _check_int("bytes", received, 0)})

    def ack(self, epoch: int) -> bytes:
        """The ack frame for a staged checkpoint the daemon has committed.

        Acks go in staging order; normally ``epoch`` is the last staged one.
        """
        _check_int("epoch", epoch, 1, _MAX_EPOCH)
        if not self._unacked:
            raise ValueError(f"ack({epoch}): no staged checkpoint is awaiting an ack")
        if self._unacked[0].epoch != epoch:
            raise ValueError(
                f"ack({epoch}): the staged checkpoint awaiting an ack is epoch "
                f"{self._unacked[0].epoch}"
            )
        self._unacked.pop(0)
        return encode_frame({"t": "ack", "epoch": epoch})

    def close(self) -> None:
        """EOF from the primary. Raises ProtocolError if the stream was cut off
        in a frame or inside a checkpoint (which is then discarded)."""
        if self.state in ("closed", "failed"):
            return
        open_cp = self._open
        self._open = None
        self.state = "closed"
        try:
            self._decoder.close()
        except ProtocolError as exc:
            if open_cp is not None:
                raise ProtocolError(
                    f"{exc}; inside checkpoint {open_cp.epoch}, which was discarded"
                ) from None
            raise
        if open_cp is not None:
            raise ProtocolError(
                f"stream ended inside checkpoint {open_cp.epoch} (no end frame after "
                f"{open_cp.received} pages); the partial checkpoint was discarded"
            )

    # -- internals ----------------------------------------------------------

    def _fail(self, message: str) -> None:
        self._error = message
        self._open = None
        self.state = "failed"

    def _handle(self, frame: Frame, events: list) -> None:
        version = frame.header.get("version")
        if (self.state == "await-hello" and frame.header.get("t") == "hello"
                and type(version) is int and version != PROTOCOL_VERSION):
            # Another version may have other fields: name the version, not a field.
            raise ProtocolError(
                f"peer speaks protocol version {version!r:.20}, this backup speaks {PROTOCOL_VERSION}")
        t, f = _fields(frame, "primary", _FROM_PRIMARY)
        state = self.state
        if state == "await-hello":
            if t != "hello":
                raise ProtocolError(f"the first message must be 'hello', got {t!r}")
            events.extend(self._hello(f))
            return
        if state == "bye":
            raise ProtocolError(f"{t!r} message after bye")
        if t == "hello":
            raise ProtocolError("second hello in one session")
        if t == "bye":
            self._open = None  # a checkpoint in flight is abandoned on purpose
            self.state = "bye"
            events.append(PeerBye(f["reason"]))
            return
        if t == "input":
            events.append(self._input(f, frame.payload))
            return
        if t == "handover":
            if state != "idle" or self._last_staged != f["epoch"] or not self._consistent_staged:
                raise ProtocolError(
                    f"handover after epoch {f['epoch']}, but the last consistent checkpoint "
                    f"staged is {self._last_staged if self._consistent_staged else 'none'}"
                    f"{' and a checkpoint is open' if state != 'idle' else ''}")
            self.state = "bye"
            events.append(PeerHandover(f["epoch"], f["reason"]))
            return
        if state == "idle":
            if t != "begin":
                raise ProtocolError(f"{t!r} message outside a checkpoint (expected begin)")
            self._begin(f)
            return
        # in-checkpoint
        cp = self._open
        assert cp is not None
        if t == "begin":
            raise ProtocolError(
                f"begin of epoch {f['epoch']} while checkpoint {cp.epoch} is still open (no end)"
            )
        cp.bytes += len(frame.payload)
        if t == "pages":
            self._pages(cp, f, frame.payload, events)
        elif t == "disk":
            self._disk(cp, f, frame.payload, events)
        elif t == "zero":
            self._zero(cp, f, frame.payload, events)
        elif t == "device":
            self._device(cp, f, frame.payload)
        else:
            events.append(CheckpointStaged(self._end(cp, f)))

    def _hello(self, f: dict) -> list:
        if f["version"] != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {f['version']}, this backup speaks {PROTOCOL_VERSION}"
            )
        if f["fingerprint"] != self.fingerprint:
            raise ProtocolError(
                f"configuration fingerprint mismatch: primary has {f['fingerprint']!r:.80}, "
                f"this backup has {self.fingerprint!r} (the VM configs on the two hosts differ)"
            )
        if f["ram_size"] != self.ram_size:
            raise ProtocolError(
                f"ram_size mismatch: primary has {f['ram_size']}, this backup has {self.ram_size}"
            )
        if f["page_size"] != self.page_size:
            raise ProtocolError(
                f"page_size mismatch: primary has {f['page_size']}, this backup has {self.page_size}"
            )
        disk_sizes = tuple(f["disk_sizes"])
        if len(disk_sizes) != self.disks:
            raise ProtocolError(
                f"disk mismatch: primary mirrors {len(disk_sizes)} disk(s), this backup expects "
                f"{self.disks}")
        for i, size in enumerate(disk_sizes):
            if not 0 < size <= MAX_DISK_SIZE or size % DISK_SECTOR:
                raise ProtocolError(f"disk {i}: size {size} is not a whole number of sectors up "
                                    f"to 1 PiB")
        self._check_media(f["media"])
        if f["generation"] < max(self.generation, 1):
            raise ProtocolError(
                f"stale primary: it holds the guest at generation {f['generation']}, but "
                f"generation {self.generation} has held it since (a failover happened); "
                f"the old copy must not be protected")
        self.disk_sizes = disk_sizes
        session = f["session"]
        if not _SESSION_RE.fullmatch(session):
            raise ProtocolError(f"session must be 32 lowercase hex digits, got {session!r:.80}")
        self.session = session
        self.state = "idle"
        welcome = encode_frame({"t": "welcome", "version": PROTOCOL_VERSION, "session": session,
                                "generation": self.generation})
        return [SessionOpened(session, self.ram_size, self.page_size, disk_sizes), Send(welcome)]

    def _check_media(self, theirs: list[str]) -> None:
        """Read-only media are not replicated: both hosts must hold the same content."""
        if len(theirs) != len(self.media):
            raise ProtocolError(f"read-only media mismatch: primary has {len(theirs)}, this "
                                f"backup {len(self.media)}")
        for i, (mine, (name, digest)) in enumerate(zip(theirs, self.media)):
            if mine != digest:
                raise ProtocolError(
                    f"read-only medium #{i + 1} ({name} on this backup) differs between the "
                    f"hosts: primary has size:sha256 {mine:.80}, this backup {digest}; copy the "
                    f"same file to both hosts")

    def _input(self, f: dict, payload: bytes) -> InputReceived:
        after, count = f["after_epoch"], f["count"]
        newest = max(self._last_staged or 0, self._open.epoch if self._open else 0)
        if not self._last_input_epoch <= after <= newest + 1:
            raise ProtocolError(
                f"input after epoch {after}: expected {self._last_input_epoch}..{newest + 1} "
                f"(input comes in order, at most one barrier ahead of the checkpoints)")
        if not 1 <= count <= MAX_INPUT_COUNT:
            raise ProtocolError(f"input: count {count} is out of range (1..{MAX_INPUT_COUNT})")
        frames, view, pos = [], memoryview(payload), 0
        for _ in range(count):
            if pos + 4 > len(view):
                raise ProtocolError(f"input: payload ends inside frame {len(frames) + 1} of {count}")
            (n,) = _INPUT_LEN.unpack_from(view, pos)
            pos += 4
            if not MIN_INPUT_FRAME <= n <= MAX_INPUT_FRAME or pos + n > len(view):
                raise ProtocolError(f"input: frame {len(frames) + 1} of {count} has a bad length {n}")
            frames.append(bytes(view[pos:pos + n]))
            pos += n
        if pos != len(view):
            raise ProtocolError(f"input: {len(view) - pos} bytes after the last of {count} frames")
        if not 0 <= f["nic"] < MAX_NICS:
            raise ProtocolError(f"input: NIC {f['nic']} is out of range (0..{MAX_NICS - 1})")
        self._last_input_epoch = after
        return InputReceived(after, frames, f["nic"])

    def _begin(self, f: dict) -> None:
        epoch = f["epoch"]
        if not 1 <= epoch <= _MAX_EPOCH:
            raise ProtocolError(f"begin: epoch {epoch} is out of range (1..{_MAX_EPOCH})")
        if self._last_staged is None:
            if not f["full"]:
                raise ProtocolError(
                    f"begin: the first checkpoint of a session must be full (epoch {epoch} is not)"
                )
        elif epoch != self._last_staged + 1:
            raise ProtocolError(
                f"begin: epoch {epoch} does not follow the last staged epoch {self._last_staged}"
            )
        if f["disk_synced"] and not self.disks:
            raise ProtocolError(f"begin: epoch {epoch} claims a synced disk in a session without one")
        if f["precopy"] and self._consistent_staged:
            raise ProtocolError(f"begin: pre-copy round {epoch} after the first consistent checkpoint")
        if f["precopy"] and f["disk_synced"]:
            raise ProtocolError(f"begin: pre-copy round {epoch} claims a synced disk")
        self._open = _Open(epoch, f["full"], f["taken_at"], self.npages, self.page_size,
                           f["disk_synced"], f["precopy"], self.stream)
        self.state = "in-checkpoint"

    def _decode(self, what: str, codec: str, data: memoryview, raw_len: int) -> bytes | memoryview:
        if codec == "none":
            if len(data) != raw_len:
                raise ProtocolError(
                    f"{what}: uncompressed data is {len(data)} bytes, raw_len says {raw_len}"
                )
            return data
        if codec != "zstd":
            raise ProtocolError(f"{what}: unknown codec {codec!r} (expected one of {CODECS})")
        try:
            declared = zstandard.frame_content_size(data)
        except Exception as exc:
            raise ProtocolError(f"{what}: not a zstd frame ({exc})") from None
        if declared != raw_len:
            shown = "no size" if declared < 0 else f"{declared} bytes"
            raise ProtocolError(
                f"{what}: zstd frame declares {shown}, raw_len says {raw_len}"
            )
        dobj = self._dctx.decompressobj()
        try:
            out = dobj.decompress(data)
        except Exception as exc:  # ZstdError, or anything else libzstd objects to
            raise ProtocolError(f"{what}: zstd data is corrupt ({exc})") from None
        if len(out) != raw_len or not dobj.eof:
            raise ProtocolError(
                f"{what}: zstd data decoded to {len(out)} bytes"
                f"{'' if dobj.eof else ' (frame incomplete)'}, raw_len says {raw_len}"
            )
        if dobj.unused_data:
            raise ProtocolError(
                f"{what}: {len(dobj.unused_data)} stray bytes after the zstd frame"
            )
        return out

    def _previous(self, idx: np.ndarray) -> np.ndarray:
        prev = self._read_previous(idx)
        shape = (len(idx), self.page_size)
        if not isinstance(prev, np.ndarray) or prev.dtype != np.uint8 or prev.shape != shape:
            raise TypeError(
                f"read_previous must return a uint8 array of shape {shape}, got "
                f"{getattr(prev, 'dtype', type(prev).__name__)} {getattr(prev, 'shape', '')}"
            )
        copied = False
        for sc in self._unacked:  # oldest first: later checkpoints win
            if not len(sc.indices):
                continue
            pos = np.searchsorted(sc.indices, idx)
            inside = pos < len(sc.indices)
            hit = np.zeros(len(idx), dtype=bool)
            hit[inside] = sc.indices[pos[inside]] == idx[inside]
            if hit.any():
                if not copied:
                    prev = prev.copy()
                    copied = True
                prev[hit] = sc.pages[pos[hit]]
        return prev

    def _pages(self, cp: _Open, f: dict, payload: bytes, events: list) -> None:
        count, codec, xor, raw_len = f["count"], f["codec"], f["xor"], f["raw_len"]
        ps = self.page_size
        what = f"pages frame in checkpoint {cp.epoch}"
        if cp.device is not None:
            raise ProtocolError(f"{what}: pages after the device frame")
        if cp.disk_at[0] >= 0:
            raise ProtocolError(f"{what}: pages after a disk frame")
        if not 1 <= count <= self.npages:
            raise ProtocolError(f"{what}: count {count} is out of range (1..{self.npages})")
        if 4 * count > len(payload):
            raise ProtocolError(
                f"{what}: count {count} needs {4 * count} index bytes, the payload has "
                f"only {len(payload)}"
            )
        if raw_len != count * ps:
            raise ProtocolError(
                f"{what}: raw_len {raw_len} is not count*page_size = {count * ps}"
            )
        if raw_len > self.max_payload:
            raise ProtocolError(
                f"{what}: raw_len {raw_len} exceeds the decoded-size limit of "
                f"{self.max_payload} bytes"
            )
        if xor and cp.full:
            raise ProtocolError(f"{what}: a full checkpoint must not use xor")
        view = memoryview(payload)
        idx_bytes = view[: 4 * count]
        idx_le = np.frombuffer(idx_bytes, dtype=_LE_U32)
        first, last = int(idx_le[0]), int(idx_le[-1])
        if count > 1 and not bool(np.all(idx_le[1:] > idx_le[:-1])):
            raise ProtocolError(f"{what}: page indices are not strictly increasing")
        if first <= cp.last_index:
            raise ProtocolError(
                f"{what}: page index {first} does not follow the previous frame's last "
                f"index {cp.last_index}"
            )
        if last >= self.npages:
            raise ProtocolError(
                f"{what}: page index {last} is beyond the guest's {self.npages} pages"
            )
        if cp.full and (first != cp.received or last != cp.received + count - 1):
            raise ProtocolError(
                f"{what}: a full checkpoint must send pages 0..{self.npages - 1} in order, "
                f"got {first}..{last} after {cp.received} pages"
            )
        data = self._decode(what, codec, view[4 * count :], raw_len)
        decoded = np.frombuffer(data, dtype=np.uint8).reshape(count, ps)
        idx = idx_le.astype(np.uint32)
        if cp.full_pages is not None:
            dest = cp.full_pages[cp.received : cp.received + count]
        else:
            dest = np.empty((count, ps), dtype=np.uint8)
        if xor:
            np.bitwise_xor(decoded, self._previous(idx), out=dest)
        else:
            dest[...] = decoded
        cp.hasher.update(idx_bytes)
        cp.hasher.update(dest)
        if self.stream:
            events.append(PagesReceived(cp.epoch, idx, dest))
        elif cp.full_pages is None:
            cp.idx_parts.append(idx)
            cp.page_parts.append(dest)
        cp.received += count
        cp.last_index = last

    def _disk(self, cp: _Open, f: dict, payload: bytes, events: list) -> None:
        count, codec, raw_len = f["count"], f["codec"], f["raw_len"]
        what = f"disk frame in checkpoint {cp.epoch}"
        size = DISK_EXTENT.itemsize * count
        if not 1 <= count or size > len(payload):
            raise ProtocolError(f"{what}: count {count} does not fit the {len(payload)}-byte payload")
        if not 1 <= raw_len <= min(self.max_payload, MAX_FRAME_RAW):
            raise ProtocolError(f"{what}: raw_len {raw_len} is out of range")
        view = memoryview(payload)
        table = np.frombuffer(view[:size], dtype=DISK_EXTENT)
        offs = table["offset"].astype(np.int64)
        lens = table["length"].astype(np.int64)
        if int(lens.sum()) != raw_len or (lens == 0).any():
            raise ProtocolError(f"{what}: extent lengths do not add up to raw_len {raw_len}")
        self._place(cp, f["disk"], offs, offs + lens, what)
        data = self._decode(what, codec, view[size:], raw_len)
        chunk = data if isinstance(data, bytes) else bytes(data)
        cp.hasher.update(view[:size])
        cp.hasher.update(chunk)
        events.append(DiskWritten(cp.epoch, f["disk"], table.copy(), chunk))

    def _zero(self, cp: _Open, f: dict, payload: bytes, events: list) -> None:
        count = f["count"]
        what = f"zero frame in checkpoint {cp.epoch}"
        if count < 1 or ZERO_EXTENT.itemsize * count != len(payload):
            raise ProtocolError(f"{what}: count {count} does not match the {len(payload)}-byte payload")
        table = np.frombuffer(payload, dtype=ZERO_EXTENT)
        offs, lens = table["offset"], table["length"]
        if (lens == 0).any() or (offs > MAX_DISK_SIZE).any() or (lens > MAX_DISK_SIZE).any():
            raise ProtocolError(f"{what}: an extent is empty or beyond any disk")
        offs, lens = offs.astype(np.int64), lens.astype(np.int64)
        self._place(cp, f["disk"], offs, offs + lens, what)
        cp.hasher.update(payload)
        events.append(DiskZeroed(cp.epoch, f["disk"], table.copy()))

    def _place(self, cp: _Open, disk: int, offs: np.ndarray, ends: np.ndarray, what: str) -> None:
        """Extents of `disk` must fit it and follow the checkpoint's earlier ones."""
        if not self.disks:
            raise ProtocolError(f"{what}: this session has no disk")
        if cp.device is not None:
            raise ProtocolError(f"{what}: disk data after the device frame")
        if not 0 <= disk < len(self.disk_sizes):
            raise ProtocolError(f"{what}: disk {disk} is not one of the "
                                f"{len(self.disk_sizes)} mirrored disks")
        last_disk, last_end = cp.disk_at
        start = last_end if disk == last_disk else 0
        if disk < last_disk or offs[0] < start or (len(offs) > 1 and (offs[1:] < ends[:-1]).any()):
            raise ProtocolError(f"{what}: extents are not sorted and disjoint")
        if int(ends[-1]) > self.disk_sizes[disk] or (offs < 0).any():
            raise ProtocolError(f"{what}: an extent ends beyond disk {disk}'s "
                                f"{self.disk_sizes[disk]} bytes")
        cp.disk_at = (disk, int(ends[-1]))

    def _device(self, cp: _Open, f: dict, payload: bytes) -> None:
        codec, raw_len = f["codec"], f["raw_len"]
        what = f"device frame in checkpoint {cp.epoch}"
        if cp.precopy:
            raise ProtocolError(f"{what}: a pre-copy round carries no device state")
        if cp.device is not None:
            raise ProtocolError(f"{what}: second device frame")
        if not 1 <= raw_len <= self.max_payload:
            raise ProtocolError(f"{what}: raw_len {raw_len} is out of range (1..{self.max_payload})")
        data = self._decode(what, codec, memoryview(payload), raw_len)
        device = data if isinstance(data, bytes) else bytes(data)
        cp.hasher.update(device)
        cp.device = device

    def _end(self, cp: _Open, f: dict) -> StagedCheckpoint:
        what = f"end of checkpoint {cp.epoch}"
        if f["epoch"] != cp.epoch:
            raise ProtocolError(f"{what}: end frame is for epoch {f['epoch']}")
        if cp.device is None and not cp.precopy:
            raise ProtocolError(f"{what}: no device frame")
        if f["pages"] != cp.received:
            raise ProtocolError(f"{what}: end says {f['pages']} pages, {cp.received} were received")
        if cp.full and cp.received != self.npages:
            raise ProtocolError(
                f"{what}: full checkpoint has {cp.received} of the guest's {self.npages} pages"
            )
        digest = cp.hasher.hexdigest()
        if f["checksum"] != digest:
            raise ProtocolError(
                f"{what}: checksum mismatch (sent {f['checksum']!r:.40}, computed {digest!r})"
            )
        if cp.full_pages is not None:
            indices = np.arange(self.npages, dtype=np.uint32)
            pages = cp.full_pages
        elif len(cp.idx_parts) == 1:
            indices, pages = cp.idx_parts[0], cp.page_parts[0]
        elif cp.idx_parts:
            indices = np.concatenate(cp.idx_parts)
            pages = np.concatenate(cp.page_parts)
        else:
            indices = np.empty(0, dtype=np.uint32)
            pages = np.empty((0, self.page_size), dtype=np.uint8)
        staged = StagedCheckpoint(cp.epoch, cp.full, cp.taken_at, indices, pages, cp.device or b"",
                                  cp.disk_synced, cp.precopy, cp.received)
        self._consistent_staged = self._consistent_staged or not cp.precopy
        self._open = None
        self._last_staged = cp.epoch
        self._unacked.append(staged)
        self.state = "idle"
        return staged
