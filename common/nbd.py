"""A small NBD server for the disk-replication target of a QEMU mirror job.

The primary daemon runs QEMU's ``blockdev-mirror`` (``sync=full``,
``copy-mode=write-blocking``) with an NBD export served here as its target:
every guest write, and the job's initial copy, arrives as an NBD request, and
a guest write completes only once this server has replied to it.

Two layers:

``NbdServerConnection``
    The protocol, sans I/O (the way h11 does HTTP): ``initial_bytes()`` is the
    greeting, ``receive(data)`` turns received bytes (split anywhere) into
    events, ``reply(...)`` formats the answer to a request. Nothing here
    touches a socket.

``NbdServer``
    The asyncio adapter the daemon uses: a unix socket, one
    ``NbdServerConnection`` per client, the daemon's callbacks.

Protocol subset (fixed newstyle only, simple replies only, no TLS):

- Greeting ``NBDMAGIC IHAVEOPT`` with FIXED_NEWSTYLE|NO_ZEROES. The client
  flags must contain FIXED_NEWSTYLE and nothing beyond NO_ZEROES.
- Options: NBD_OPT_GO and NBD_OPT_INFO (NBD_INFO_EXPORT always,
  NBD_INFO_BLOCK_SIZE (1, 4096, max_request) when asked; other info requests
  are ignored, as the spec allows; unknown export -> NBD_REP_ERR_UNKNOWN),
  NBD_OPT_EXPORT_NAME (size, flags, and the 124 zero bytes unless the client
  set NO_ZEROES; an unknown export ends the session: ``NbdError``),
  NBD_OPT_ABORT (ACK, then ``Disconnect``), NBD_OPT_LIST (one NBD_REP_SERVER
  per export). Every other option (STRUCTURED_REPLY, LIST/SET_META_CONTEXT,
  STARTTLS, EXTENDED_HEADERS, unknown ones) is answered NBD_REP_ERR_UNSUP;
  QEMU's client then carries on with simple replies. A syntactically broken
  GO/INFO/LIST gets NBD_REP_ERR_INVALID.
- Transmission flags: HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES.
- Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES become events; DISC
  becomes ``Disconnect``; CACHE and BLOCK_STATUS (never negotiated, no
  payload) are answered EINVAL.

Who answers what: the daemon answers every ``Write``/``Read``/``Flush``/
``Trim``/``WriteZeroes`` event with ``reply()``. Requests that are refused
(out of range, too long a read, a flag not valid for the command,
FLUSH with a non-zero offset or length, CACHE, BLOCK_STATUS) or that
need no work (length 0) are answered by the state machine itself: it emits a
``Send`` event carrying the reply, in stream order, and no other event. An
out-of-range WRITE or WRITE_ZEROES gets ENOSPC (the spec's SHOULD, also what
QEMU's own server does), every other refusal EINVAL. The payload of a refused
WRITE is consumed and dropped.

Bounds (hostile-input safety): an option is at most ``MAX_OPTION_LENGTH``
bytes, an export name at most 4096 bytes, at most ``MAX_OPTIONS`` options per
connection, a WRITE payload at most ``max_request`` bytes and a READ at most
``max_request``; TRIM and WRITE_ZEROES carry no payload and may span the whole
export (QEMU sends a discard as one request whatever the advertised
maximum: a 100 MiB TRIM was seen with a 32 MiB maximum block size).
The state machine never holds more than one unfinished message
(``16 + MAX_OPTION_LENGTH`` or ``28 + max_request`` bytes) once ``receive``
has returned. Violations that break the framing or the spec's MUSTs raise
``NbdError``: bad option or request magic, unknown client flags, an oversized
option, too many options, an unknown export in EXPORT_NAME, a WRITE longer
than ``max_request``, an unknown command, data after NBD_CMD_DISC or
NBD_OPT_ABORT, a stream that ends in the middle of a message. After an
``NbdError`` the connection is dead: every further ``receive`` raises.

``receive(b"")`` means end of stream: at a message boundary it yields
``Disconnect()`` (once), in the middle of a message it raises ``NbdError``.

QEMU's client as observed (QEMU 7.2, tests/test_nbd.py): options
STRUCTURED_REPLY (refused) then GO with an INFO_BLOCK_SIZE request; no
SET_META_CONTEXT once structured replies are refused; ``qemu-nbd --list``
sends STRUCTURED_REPLY, LIST, INFO, ABORT. It honours the maximum block size
for WRITE and WRITE_ZEROES. A ``blockdev-mirror`` (sync=full,
write-blocking) target sees: WRITE_ZEROES (without NO_HOLE) for the source's
holes, WRITE in 64 KiB pieces for its data, a FLUSH before BLOCK_JOB_READY;
then every guest write as one WRITE (``write -z`` as WRITE_ZEROES with
NO_HOLE), and never a READ. With ``discard: unmap`` on the nbd node the job
first zeroes the whole target (WRITE_ZEROES of max-block size). Discards
through the mirror filter are dropped by QEMU 7.2 and never arrive.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Union

from remus.common import log

_log = log.get("remus.nbd")

# --------------------------------------------------------------------------
# Protocol constants (NetworkBlockDevice/nbd doc/proto.md)

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9   # option reply
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
TRANSMISSION_FLAGS = (FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA
                      | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES)

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# error values (NBD's own numbering, equal to Linux errno)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# the commands this server accepts, with the command flags valid for each
# (FUA is valid on every command once SEND_FUA is advertised)
_VALID_FLAGS = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}

# bounds
MAX_NAME = 4096                  # the spec's limit for any string
MAX_OPTION_LENGTH = 8192         # GO/INFO with a 4096-byte name and ~2000 info requests
MAX_OPTIONS = 64                 # options per connection (QEMU sends 3 or 4)
DEFAULT_MAX_REQUEST = 32 << 20   # QEMU's NBD_MAX_BUFFER_SIZE
PREFERRED_BLOCK = 4096

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")          # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")   # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")      # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")    # magic, error, handle
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

_OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO", OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY", OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT", OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}


def option_name(option: int) -> str:
    return _OPTION_NAMES.get(option, str(option))


class NbdError(Exception):
    """The client violated the protocol; the message says how. Close the connection."""


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to send to the client (handshake replies, replies the state machine gives itself)."""
    data: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """The transmission phase has begun, on this export."""
    export: str
    size: int


@dataclass(frozen=True, slots=True)
class Write:
    handle: int
    offset: int
    data: bytes
    fua: bool = False


@dataclass(frozen=True, slots=True)
class Read:
    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Flush:
    handle: int


@dataclass(frozen=True, slots=True)
class Trim:
    handle: int
    offset: int
    length: int
    fua: bool = False


@dataclass(frozen=True, slots=True)
class WriteZeroes:
    handle: int
    offset: int
    length: int
    may_trim: bool   # NBD_CMD_FLAG_NO_HOLE was not set
    fua: bool = False


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC, NBD_OPT_ABORT, or end of stream at a message boundary."""


Event = Union[Send, Ready, Write, Read, Flush, Trim, WriteZeroes, Disconnect]


# --------------------------------------------------------------------------
# The state machine


class NbdServerConnection:
    """One client connection, sans I/O.

    ``state`` is one of ``"flags"`` (waiting for the client flags),
    ``"options"`` (option haggling), ``"transmission"``, ``"closed"`` (after
    ``Disconnect``) and ``"error"`` (after ``NbdError``).
    """

    def __init__(self, exports: dict[str, int], max_request: int = DEFAULT_MAX_REQUEST):
        if not exports:
            raise ValueError("no exports")
        for name, size in exports.items():
            if not isinstance(name, str) or len(name.encode()) > MAX_NAME or "\0" in name:
                raise ValueError(f"bad export name {name!r}")
            if not isinstance(size, int) or not 0 <= size <= _U64:
                raise ValueError(f"bad size {size!r} for export {name!r}")
        if not PREFERRED_BLOCK <= max_request <= _U32:
            raise ValueError(f"max_request must be within [{PREFERRED_BLOCK}, 2**32-1]")
        self.exports = dict(exports)
        self.max_request = max_request
        self.state = "flags"
        self.export: str | None = None
        self.size = 0
        self.no_zeroes = False
        self.options: list[int] = []   # option codes received, in order (for logs and tests)
        self._buf = bytearray()
        self._pos = 0
        self._pending: tuple | None = None   # a header whose payload has not all arrived

    # ---- public API

    def initial_bytes(self) -> bytes:
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole message."""
        return len(self._buf) - self._pos

    def receive(self, data: bytes) -> list[Event]:
        if self.state == "error":
            raise NbdError("connection already failed")
        if not data:
            return self._eof()
        self._buf += data   # when closed: nothing is buffered, the loop is skipped, and this raises
        events: list[Event] = []
        try:
            while self.state != "closed":
                if not self._step(events):
                    break
            if self.state == "closed" and self.buffered:
                raise NbdError(f"{self.buffered} bytes after the client disconnected")
        except NbdError:
            self._fail()
            raise
        del self._buf[: self._pos]
        self._pos = 0
        return events

    def reply(self, handle: int, error: int = 0, data: bytes = b"") -> bytes:
        """A simple reply; ``data`` (a READ's result) only with ``error == 0``."""
        if self.state not in ("transmission", "closed"):
            raise RuntimeError(f"no replies in state {self.state}")
        if not 0 <= handle <= _U64 or not 0 <= error <= _U32:
            raise ValueError("handle or error out of range")
        if error and data:
            raise ValueError("an error reply carries no data")
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + bytes(data)

    # ---- internals

    def _fail(self) -> None:
        self.state = "error"
        self._buf = bytearray()
        self._pos = 0

    def _eof(self) -> list[Event]:
        if self.state == "closed":
            return []
        if self._pending is not None or self.buffered:
            where = "a request" if self.state == "transmission" else "the handshake"
            self._fail()
            raise NbdError(f"stream ended in the middle of {where}")
        self.state = "closed"
        return [Disconnect()]

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) - self._pos < n:
            return None
        with memoryview(self._buf) as view:   # one copy, not two
            chunk = bytes(view[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def _step(self, events: list[Event]) -> bool:
        """Consume one message if it is complete; False if more bytes are needed."""
        if self.state == "flags":
            raw = self._take(4)
            if raw is None:
                return False
            (flags,) = _CLIENT_FLAGS.unpack(raw)
            if not flags & FLAG_C_FIXED_NEWSTYLE:
                raise NbdError(f"client flags {flags:#x} lack FIXED_NEWSTYLE")
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                raise NbdError(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self.state = "options"
            return True
        if self.state == "options":
            return self._step_option(events)
        return self._step_request(events)

    # ---- handshake

    def _step_option(self, events: list[Event]) -> bool:
        if self._pending is None:
            raw = self._take(_OPTION.size)
            if raw is None:
                return False
            magic, option, length = _OPTION.unpack(raw)
            if magic != IHAVEOPT:
                raise NbdError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise NbdError(f"option {option_name(option)} is {length} bytes, "
                               f"the limit is {MAX_OPTION_LENGTH}")
            if len(self.options) >= MAX_OPTIONS:
                raise NbdError(f"more than {MAX_OPTIONS} options")
            self.options.append(option)
            self._pending = (option, length)
        option, length = self._pending
        data = self._take(length)
        if data is None:
            return False
        self._pending = None
        self._option(option, data, events)
        return True

    def _rep(self, option: int, rtype: int, data: bytes = b"") -> bytes:
        return _OPTION_REPLY.pack(REPLY_MAGIC_OPT, option, rtype, len(data)) + data

    def _option(self, option: int, data: bytes, events: list[Event]) -> None:
        if option == OPT_EXPORT_NAME:
            if len(data) > MAX_NAME:
                raise NbdError(f"export name of {len(data)} bytes")
            name = self._decode_name(data)
            if name is None or name not in self.exports:
                raise NbdError(f"unknown export {data[:64]!r} in EXPORT_NAME")
            size = self.exports[name]
            reply = struct.pack(">QH", size, TRANSMISSION_FLAGS)
            if not self.no_zeroes:
                reply += bytes(124)
            events.append(Send(reply))
            self._enter_transmission(name, events)
        elif option == OPT_ABORT:
            events.append(Send(self._rep(option, REP_ACK)))
            events.append(Disconnect())
            self.state = "closed"
        elif option == OPT_LIST:
            if data:
                events.append(Send(self._rep(option, REP_ERR_INVALID, b"LIST takes no data")))
                return
            out = b"".join(
                self._rep(option, REP_SERVER, struct.pack(">I", len(n.encode())) + n.encode())
                for n in self.exports)
            events.append(Send(out + self._rep(option, REP_ACK)))
        elif option in (OPT_INFO, OPT_GO):
            self._info_or_go(option, data, events)
        else:
            events.append(Send(self._rep(option, REP_ERR_UNSUP,
                                         f"{option_name(option)} not supported".encode())))

    @staticmethod
    def _decode_name(raw: bytes) -> str | None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return None if "\0" in name else name

    def _info_or_go(self, option: int, data: bytes, events: list[Event]) -> None:
        def invalid(why: str) -> None:
            events.append(Send(self._rep(option, REP_ERR_INVALID, why.encode())))

        if len(data) < 6:
            return invalid("option too short")
        (name_len,) = struct.unpack_from(">I", data, 0)
        if name_len > MAX_NAME or 4 + name_len + 2 > len(data):
            return invalid("bad name length")
        raw_name = data[4 : 4 + name_len]
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * count:
            return invalid("bad information request count")
        requests = struct.unpack_from(f">{count}H", data, 4 + name_len + 2)
        name = self._decode_name(raw_name)
        if name is None:
            return invalid("export name is not valid UTF-8")
        if name not in self.exports:
            events.append(Send(self._rep(option, REP_ERR_UNKNOWN, b"unknown export")))
            return
        size = self.exports[name]
        out = self._rep(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, TRANSMISSION_FLAGS))
        if INFO_BLOCK_SIZE in requests:
            out += self._rep(option, REP_INFO, struct.pack(
                ">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, self.max_request))
        out += self._rep(option, REP_ACK)
        events.append(Send(out))
        if option == OPT_GO:
            self._enter_transmission(name, events)

    def _enter_transmission(self, name: str, events: list[Event]) -> None:
        self.export = name
        self.size = self.exports[name]
        self.state = "transmission"
        events.append(Ready(name, self.size))

    # ---- transmission

    def _step_request(self, events: list[Event]) -> bool:
        if self._pending is None:
            raw = self._take(_REQUEST.size)
            if raw is None:
                return False
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack(raw)
            if magic != REQUEST_MAGIC:
                raise NbdError(f"bad request magic {magic:#x}")
            if cmd == CMD_WRITE:
                if length > self.max_request:
                    raise NbdError(f"WRITE of {length} bytes, the limit is {self.max_request}")
                self._pending = (flags, handle, offset, length)
            else:
                self._request(cmd, flags, handle, offset, length, events)
                return True
        flags, handle, offset, length = self._pending
        data = self._take(length)
        if data is None:
            return False
        self._pending = None
        if err := self._check(CMD_WRITE, flags, offset, length):
            events.append(Send(self.reply(handle, err)))
        elif length == 0:
            events.append(Send(self.reply(handle)))
        else:
            events.append(Write(handle, offset, data, bool(flags & CMD_FLAG_FUA)))
        return True

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The error to answer a well-framed request with, or 0."""
        if flags & ~_VALID_FLAGS[cmd]:
            return NBD_EINVAL
        if cmd == CMD_READ and length > self.max_request:
            return NBD_EINVAL
        if offset > self.size or length > self.size - offset:
            return NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
        return 0

    def _request(self, cmd: int, flags: int, handle: int, offset: int, length: int,
                 events: list[Event]) -> None:
        if cmd == CMD_DISC:
            events.append(Disconnect())
            self.state = "closed"
            return
        if cmd in (CMD_CACHE, CMD_BLOCK_STATUS):
            events.append(Send(self.reply(handle, NBD_EINVAL)))
            return
        if cmd not in _VALID_FLAGS:
            raise NbdError(f"unknown command {cmd}")
        if cmd == CMD_FLUSH:
            if flags & ~_VALID_FLAGS[cmd] or offset or length:
                events.append(Send(self.reply(handle, NBD_EINVAL)))
            else:
                events.append(Flush(handle))
            return
        if err := self._check(cmd, flags, offset, length):
            events.append(Send(self.reply(handle, err)))
        elif length == 0:
            events.append(Send(self.reply(handle)))
        elif cmd == CMD_READ:
            events.append(Read(handle, offset, length))
        elif cmd == CMD_TRIM:
            events.append(Trim(handle, offset, length, bool(flags & CMD_FLAG_FUA)))
        else:
            events.append(WriteZeroes(handle, offset, length,
                                      may_trim=not flags & CMD_FLAG_NO_HOLE,
                                      fua=bool(flags & CMD_FLAG_FUA)))


# --------------------------------------------------------------------------
# asyncio adapter


class NbdServer:
    """Serves one export on a unix socket; the daemon's callbacks see every change.

    - ``Write``: ``on_write(offset, data)``, THEN the reply. A guest write in a
      write-blocking mirror completes only after ``on_write`` has returned.
    - ``WriteZeroes`` and ``Trim``: ``on_zero(offset, length)`` (no data: a
      zeroed range of any size costs nothing) or, without ``on_zero``,
      ``on_write(offset, zeroes)`` in pieces of at most ``max_request`` bytes;
      then the reply. A trim is replicated as zeroes because the replica must read what the source reads: a discard
      on a raw file punches a hole (and on qcow2 without a backing file makes
      the clusters read as zero), so the source then reads zeroes. (With
      QEMU 7.2 a guest discard through the mirror's filter node never
      reaches the target at all; direct NBD clients such as qemu-io do send
      TRIM.)
    - ``Flush``: ``on_flush()`` if given, then the reply.
    - ``Read``: ``on_read(offset, length)`` if given (it must return exactly
      ``length`` bytes, else EIO), otherwise EINVAL.
    - A callback that raises gets EIO for that request (logged); the
      connection stays up.
    - A client that violates the protocol is logged (``nbd-protocol-error``)
      and disconnected; the server keeps accepting new connections.

    Callbacks run in the event loop's thread, one request at a time, in the
    order the requests arrived.

    ``throttle``, if given, is awaited before the reply to every write, zero or
    trim (and before the next request of that connection is read): a slow
    throttle slows the client's writes down, as a full disk queue would.
    """

    READ_CHUNK = 256 * 1024

    def __init__(self, socket_path: Path, export: str, size: int,
                 on_write: Callable[[int, bytes], None],
                 on_read: Callable[[int, int], bytes] | None = None,
                 on_flush: Callable[[], None] | None = None,
                 max_request: int = DEFAULT_MAX_REQUEST,
                 on_zero: Callable[[int, int], None] | None = None,
                 throttle: Callable[[], Awaitable[None]] | None = None):
        NbdServerConnection({export: size}, max_request)   # validates the arguments
        self.socket_path = Path(socket_path)
        self.export = export
        self.size = size
        self.on_write = on_write
        self.on_read = on_read
        self.on_flush = on_flush
        self.on_zero = on_zero
        self.throttle = throttle
        self.max_request = max_request
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._zeroes = b""

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)   # left over by a previous run
        self._server = await asyncio.start_unix_server(
            self._on_connection, path=str(self.socket_path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def __aenter__(self) -> "NbdServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- one connection

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = NbdServerConnection({self.export: self.size}, self.max_request)
        try:
            writer.write(conn.initial_bytes())
            await writer.drain()
            while conn.state != "closed":
                data = await reader.read(self.READ_CHUNK)
                for event in conn.receive(data):
                    out = self._handle(conn, event)
                    if self.throttle is not None and isinstance(event, (Write, WriteZeroes, Trim)):
                        await self.throttle()
                    if out:
                        writer.write(out)
                if conn.state == "closed":
                    # NBD_CMD_DISC / NBD_OPT_ABORT / EOF: the client need not
                    # read what is left (an ABORT's ACK), so a reset is no error.
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                else:
                    await writer.drain()
        except NbdError as exc:
            _log.error("nbd-protocol-error", export=self.export, error=str(exc))
        except ConnectionError as exc:
            _log.warning("nbd-connection-lost", export=self.export, error=str(exc))
        except asyncio.CancelledError:
            # close(): end quietly. Re-raising would make asyncio's stream
            # callback (Python 3.11) log the cancellation as an error.
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    def _handle(self, conn: NbdServerConnection, ev: Event) -> bytes | None:
        if isinstance(ev, Send):
            return ev.data
        if isinstance(ev, Write):
            _log.debug("nbd-write", offset=ev.offset, length=len(ev.data), fua=ev.fua)
            return self._call(conn, ev.handle, self.on_write, ev.offset, ev.data)
        if isinstance(ev, (WriteZeroes, Trim)):
            if isinstance(ev, WriteZeroes):
                _log.debug("nbd-write-zeroes", offset=ev.offset, length=ev.length,
                           may_trim=ev.may_trim, fua=ev.fua)
            else:
                _log.debug("nbd-trim", offset=ev.offset, length=ev.length, fua=ev.fua)
            zero = self.on_zero if self.on_zero is not None else self._write_zeroes
            return self._call(conn, ev.handle, zero, ev.offset, ev.length)
        if isinstance(ev, Flush):
            _log.debug("nbd-flush")
            if self.on_flush is None:
                return conn.reply(ev.handle)
            return self._call(conn, ev.handle, self.on_flush)
        if isinstance(ev, Read):
            _log.debug("nbd-read", offset=ev.offset, length=ev.length)
            if self.on_read is None:
                return conn.reply(ev.handle, NBD_EINVAL)
            try:
                data = self.on_read(ev.offset, ev.length)
                if len(data) != ev.length:
                    raise ValueError(f"on_read returned {len(data)} bytes, not {ev.length}")
            except Exception as exc:
                _log.error("nbd-callback-error", op="read", error=repr(exc))
                return conn.reply(ev.handle, NBD_EIO)
            return conn.reply(ev.handle, 0, data)
        if isinstance(ev, Ready):
            _log.info("nbd-client-ready", export=ev.export, size=ev.size,
                      options=",".join(option_name(o) for o in conn.options))
            return None
        if isinstance(ev, Disconnect):
            _log.debug("nbd-client-disconnect", export=self.export,
                       options=",".join(option_name(o) for o in conn.options))
            return None
        raise AssertionError(f"unhandled event {ev!r}")

    def _call(self, conn: NbdServerConnection, handle: int, fn: Callable, *args) -> bytes:
        try:
            fn(*args)
        except Exception as exc:
            _log.error("nbd-callback-error", op=getattr(fn, "__name__", "?"), error=repr(exc))
            return conn.reply(handle, NBD_EIO)
        return conn.reply(handle)

    def _write_zeroes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, self.max_request)
            if len(self._zeroes) < n:
                self._zeroes = bytes(n)
            self.on_write(offset, self._zeroes if n == len(self._zeroes) else bytes(n))
            offset += n
            length -= n


__all__ = [
    "NbdError", "NbdServerConnection", "NbdServer",
    "Send", "Ready", "Write", "Read", "Flush", "Trim", "WriteZeroes", "Disconnect", "Event",
]
