"""Framing of the checkpoint stream, sans I/O.

A frame on the wire is::

    >II prefix (header_len, payload_len)   8 bytes
    msgpack map header                     header_len bytes, a dict with str keys
                                           and a str "t" (the message type)
    payload                                payload_len raw bytes

Nothing here touches a socket: ``encode_frame`` returns the bytes to send and
``FrameDecoder.feed`` turns received bytes (split anywhere) into ``Frame``s.
Oversized lengths are rejected as soon as the 8-byte prefix is complete, so a
broken or hostile peer can never make the decoder buffer more than
``PREFIX_SIZE + MAX_HEADER + max_payload`` bytes. A header is flat: scalars and
lists of scalars; containers nested deeper than ``MAX_DEPTH`` are refused, so
no later step (a check, an error message, a log line) can recurse without end.
A decoder's ``header_check`` sees each header before its payload is read.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

PREFIX = struct.Struct(">II")
PREFIX_SIZE = PREFIX.size  # 8
MAX_HEADER = 64 * 1024
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
# The map itself is level 1, a list in it level 2; one level to spare.
MAX_DEPTH = 3
_U32_MAX = 0xFFFFFFFF


class ProtocolError(Exception):
    """The peer sent something this side cannot accept; the message says what.

    ``reply`` optionally carries bytes the daemon should send to the peer
    before closing the connection (a ``reject`` frame during the handshake).
    """

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Frame:
    header: dict
    payload: bytes


def _pack_header(header: dict) -> bytes:
    if not isinstance(header, dict):
        raise TypeError(f"frame header must be a dict, not {type(header).__name__}")
    if not isinstance(header.get("t"), str):
        raise ValueError('frame header needs a str "t" (the message type)')
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ValueError(f"frame header is {len(packed)} bytes, the limit is {MAX_HEADER}")
    return packed


def encode_frame_parts(header: dict, *parts: bytes | bytearray | memoryview) -> bytes:
    """Like ``encode_frame`` with the payload given as pieces (joined without an
    intermediate copy)."""
    packed = _pack_header(header)
    views = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
    payload_len = sum(len(v) for v in views)
    if payload_len > _U32_MAX:
        raise ValueError(f"frame payload is {payload_len} bytes, more than a frame can carry")
    return b"".join([PREFIX.pack(len(packed), payload_len), packed, *views])


def encode_frame(header: dict, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """The bytes of one frame carrying ``header`` (must have a str "t") and ``payload``."""
    return encode_frame_parts(header, payload)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed in a frame header")


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply `value` nests lists and maps (a scalar: 0, a flat list: 1), counted
    without recursion and only up to ``limit + 1`` (anything deeper reads as that)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def unpack_map(raw: bytes | memoryview, what: str = "frame header",
               max_depth: int = MAX_DEPTH) -> dict:
    """A msgpack map with str keys, nested at most ``max_depth`` levels (the map
    counts as one); ProtocolError naming `what` if it is anything else."""
    try:
        value = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext
        )
    except Exception as exc:  # msgpack raises a zoo of exception types (StackError,
        # ValueError, ...); RecursionError is one of them too
        raise ProtocolError(f"{what} is not valid msgpack: {type(exc).__name__}: "
                            f"{str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(value).__name__}")
    if nesting_depth(value, max_depth) > max_depth:
        raise ProtocolError(f"{what} nests lists or maps more than {max_depth} levels deep")
    for key in value:
        if not isinstance(key, str):
            raise ProtocolError(f"{what} key {key!r:.40} is not a string")
    return value


def decode_header(raw: bytes | memoryview) -> dict:
    """Decode and check a frame header; ProtocolError if it is not a valid one."""
    header = unpack_map(raw)
    t = header.get("t")
    if not isinstance(t, str):
        raise ProtocolError('frame header has no str "t" (message type)')
    return header


class FrameDecoder:
    """Bytes in, ``Frame``s out.

    Each body part (header, payload) is collected as a list of chunks and
    joined once when complete, so a multi-MiB payload arriving in many small
    pieces costs O(size), not O(size**2). ``buffered`` is the number of bytes
    currently held for the incomplete frame.
    """

    _PREFIX, _HEADER, _PAYLOAD = 0, 1, 2

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 header_check: Callable[[dict, int], None] | None = None) -> None:
        """`header_check(header, payload_len)` runs as soon as a frame's header is in,
        before a byte of its payload is taken; it may raise ProtocolError."""
        if not isinstance(max_payload, int) or not 0 <= max_payload <= _U32_MAX:
            raise ValueError(f"max_payload must be an int from 0 to {_U32_MAX}")
        self.max_payload = max_payload
        self._header_check = header_check
        self._stage = self._PREFIX
        self._need = PREFIX_SIZE
        self._chunks: list[bytes] = []
        self._have = 0
        self._header: dict | None = None
        self._header_len = 0
        self._payload_len = 0
        self._error: str | None = None
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes held for the frame being received (0 between frames)."""
        if self._stage == self._PREFIX:
            return self._have
        if self._stage == self._HEADER:
            return PREFIX_SIZE + self._have
        return PREFIX_SIZE + self._header_len + self._have

    @property
    def in_frame(self) -> bool:
        """True if part of a frame has been received but not all of it."""
        return self._stage != self._PREFIX or self._have > 0

    def _fail(self, message: str) -> ProtocolError:
        """Dead from now on, holding nothing (``buffered`` 0, not ``in_frame``)."""
        self._error = message
        self._chunks = []
        self._have = 0
        self._stage, self._need = self._PREFIX, PREFIX_SIZE
        return ProtocolError(message)

    def _take(self, view: memoryview, pos: int) -> tuple[bytes | None, int]:
        """Consume up to the bytes still needed for the current part; return the
        complete part (or None if more is needed) and the new position."""
        need = self._need - self._have
        avail = len(view) - pos
        if not self._chunks and avail >= need:
            return bytes(view[pos : pos + need]), pos + need
        take = min(need, avail)
        self._chunks.append(bytes(view[pos : pos + take]))
        self._have += take
        if self._have < self._need:
            return None, pos + take
        whole = b"".join(self._chunks)
        self._chunks = []
        self._have = 0
        return whole, pos + take

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise ProtocolError(f"frame decoder is unusable after an earlier error ({self._error})")
        if self._closed:
            raise ProtocolError("frame decoder was closed (stream ended); no more data expected")
        view = memoryview(data).cast("B")
        frames: list[Frame] = []
        pos = 0
        end = len(view)
        while pos < end:
            part, pos = self._take(view, pos)
            if part is None:
                break
            if self._stage == self._PREFIX:
                header_len, payload_len = PREFIX.unpack(part)
                if header_len == 0 or header_len > MAX_HEADER:
                    raise self._fail(
                        f"frame header length {header_len} is out of range (1..{MAX_HEADER})"
                    )
                if payload_len > self.max_payload:
                    raise self._fail(
                        f"frame payload length {payload_len} exceeds the limit of "
                        f"{self.max_payload} bytes"
                    )
                self._header_len = header_len
                self._payload_len = payload_len
                self._stage, self._need = self._HEADER, header_len
            elif self._stage == self._HEADER:
                try:
                    self._header = decode_header(part)
                    if self._header_check is not None:
                        self._header_check(self._header, self._payload_len)
                except ProtocolError as exc:
                    raise self._fail(str(exc)) from None
                self._stage, self._need = self._PAYLOAD, self._payload_len
                if self._payload_len == 0:
                    frames.append(self._complete(b""))
            else:
                frames.append(self._complete(part))
        return frames

    def _complete(self, payload: bytes) -> Frame:
        frame = Frame(self._header, payload)  # type: ignore[arg-type]
        self._header = None
        self._stage, self._need = self._PREFIX, PREFIX_SIZE
        return frame

    def close(self) -> None:
        """End of stream. Raises ProtocolError if a partial frame is buffered."""
        if self._error is not None:
            raise ProtocolError(f"frame decoder is unusable after an earlier error ({self._error})")
        self._closed = True
        if self.in_frame:
            held = self.buffered
            raise self._fail(
                f"stream ended in the middle of a frame ({held} bytes of an incomplete "
                "frame were received)"
            )
