"""The messages of the checkpoint stream: their schema, the checks of a received
header, and the limits both sides keep.

Messages (header "t"; every other field is in the msgpack header, bulk data
is in the frame payload)::

    hello    P->B  version, fingerprint, session (32 lowercase hex), ram_size, page_size,
                   disk_sizes (one per mirrored disk, in the guest's order), media (size
                   and sha256 of each read-only medium, "SIZE:HEX"), generation (the
                   generation at which the sender holds the guest)
    welcome  B->P  version, session, generation (the highest this backup knows of)
    reject   B->P  reason, generation (as in welcome; a primary below it must stand down,
                   if the backup is authenticated: over plain TCP only the heartbeat may
                   make it)
    begin    P->B  epoch (>= 1), full, taken_at (unix time the guest was paused, or
                   the copy started for pre-copy), disk_synced, precopy
    pages    P->B  count, codec ("zstd"|"none"), xor, raw_len
                   payload: count uint32 LE page indices, then the encoded pages
                   (raw_len = count * page_size decoded bytes; with xor they are
                   new XOR previous page contents)
    device   P->B  codec, raw_len, delta; payload: the encoded device state (raw_len > 0
                   decoded bytes); with delta, the state XOR the device state of the
                   previous checkpoint of the session that had one (the last one sent,
                   acknowledged or not), which must be raw_len bytes too. A full
                   checkpoint's device state is never a delta.
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
the first checkpoint after them may then be incremental. What the checksum in
``end`` covers is in ``checksum``.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from remus.common.wire import DEFAULT_MAX_PAYLOAD, Frame, ProtocolError

PROTOCOL_VERSION = 4
CODECS = ("zstd", "none")
# The encoder keeps the decoded size of one pages frame at or below this, so
# that a backup with the default max_payload accepts it even if incompressible.
MAX_FRAME_RAW = DEFAULT_MAX_PAYLOAD // 4
MAX_EPOCH = 2**63 - 1
SESSION_RE = re.compile(r"[0-9a-f]{32}")
LE_U32 = np.dtype("<u4")  # page indices on the wire


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
    "device": (("codec", "str"), ("raw_len", "int"), ("delta", "bool")),
    "end": (("epoch", "int"), ("pages", "int"), ("checksum", "str")),
    "ack": (("epoch", "int"),),
    "progress": (("epoch", "int"), ("bytes", "int")),
    "bye": (("reason", "str"),),
    "input": (("after_epoch", "int"), ("count", "int"), ("nic", "int")),
    "handover": (("epoch", "int"), ("reason", "str")),
}
_WITH_PAYLOAD = frozenset({"pages", "disk", "zero", "device", "input"})
FROM_PRIMARY = frozenset({"hello", "begin", "pages", "disk", "zero", "device", "end", "bye",
                          "input", "handover"})
# Input frames: Ethernet header at least, one jumbo frame with offloads at most.
MIN_INPUT_FRAME, MAX_INPUT_FRAME = 14, 65536 + 64
MAX_INPUT_COUNT = 4096
INPUT_LEN = struct.Struct("<I")
# A disk frame's payload starts with `count` of these, then the encoded data.
DISK_EXTENT = np.dtype([("offset", "<u8"), ("length", "<u4")])
# A zero frame's payload is `count` of these: no data follows.
ZERO_EXTENT = np.dtype([("offset", "<u8"), ("length", "<u8")])
DISK_SECTOR = 512
MAX_DISK_SIZE = 1 << 50
MAX_DISKS = 16
MAX_NICS = 8
FROM_BACKUP = frozenset({"welcome", "reject", "ack", "progress"})
# Before the hello is checked, a frame announcing more payload than this is refused on
# its header (a hello carries none; the slack lets another version's hello be named).
HANDSHAKE_MAX_PAYLOAD = 64 * 1024


def check_fields(frame: Frame, sender: str, allowed: frozenset[str]) -> tuple[str, dict]:
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


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """`value`, if it is an int in lo..hi; else TypeError or ValueError naming `name`
    (for the callers' arguments, not for what the peer sent)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {'>= ' + str(lo) if hi is None else f'in {lo}..{hi}'}, got {value}")
    return value

