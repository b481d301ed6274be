"""NBD server: the sans-I/O state machine, the asyncio adapter, and QEMU's real client."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_budget import examples
from hypothesis import strategies as st

from remus.common import nbd
from remus.common.nbd import (
    Disconnect,
    Flush,
    NbdError,
    NbdServer,
    NbdServerConnection,
    Read,
    Ready,
    Send,
    Trim,
    Write,
    WriteZeroes,
)

SIZE = 1 << 20
C_FLAGS = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES


# --------------------------------------------------------------------------
# Client-side encoders and decoders for the tests


def client_flags(flags: int = C_FLAGS) -> bytes:
    return struct.pack(">I", flags)


def opt(option: int, data: bytes = b"", magic: int = nbd.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, option, len(data)) + data


def go_data(name: bytes | str, *infos: int) -> bytes:
    if isinstance(name, str):
        name = name.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def req(cmd: int, handle: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
        payload: bytes = b"", magic: int = nbd.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload


def write_req(handle: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return req(nbd.CMD_WRITE, handle, offset, len(data), flags, data)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split fixed-newstyle option replies into (option, type, payload)."""
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == nbd.REPLY_MAGIC_OPT
        out.append((option, rtype, data[20 : 20 + length]))
        assert len(data) >= 20 + length
        data = data[20 + length :]
    return out


def simple_reply(data: bytes) -> tuple[int, int, bytes]:
    magic, error, handle = struct.unpack_from(">IIQ", data)
    assert magic == nbd.SIMPLE_REPLY_MAGIC
    return handle, error, data[16:]


def sends(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def ready_conn(exports=None, max_request: int = nbd.DEFAULT_MAX_REQUEST) -> NbdServerConnection:
    conn = NbdServerConnection(exports or {"disk": SIZE}, max_request)
    conn.initial_bytes()
    events = conn.receive(client_flags() + opt(nbd.OPT_GO, go_data("disk", nbd.INFO_BLOCK_SIZE)))
    assert events[-1] == Ready("disk", (exports or {"disk": SIZE})["disk"])
    assert conn.state == "transmission"
    return conn


HANDSHAKE = client_flags() + opt(nbd.OPT_GO, go_data("disk"))


# --------------------------------------------------------------------------
# Handshake


def test_greeting():
    data = NbdServerConnection({"disk": SIZE}).initial_bytes()
    assert data == b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)


def test_go_with_block_size():
    conn = NbdServerConnection({"disk": SIZE})
    assert conn.state == "flags"
    assert conn.receive(client_flags()) == []
    assert conn.state == "options"
    events = conn.receive(opt(nbd.OPT_GO, go_data("disk", nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME)))
    assert len(events) == 2 and events[1] == Ready("disk", SIZE)
    replies = option_replies(events[0].data)
    assert [(o, t) for o, t, _ in replies] == [
        (nbd.OPT_GO, nbd.REP_INFO), (nbd.OPT_GO, nbd.REP_INFO), (nbd.OPT_GO, nbd.REP_ACK)]
    assert struct.unpack(">HQH", replies[0][2]) == (nbd.INFO_EXPORT, SIZE, 0x6D)
    assert struct.unpack(">HIII", replies[1][2]) == (nbd.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
    assert conn.state == "transmission" and conn.export == "disk" and conn.size == SIZE
    assert conn.options == [nbd.OPT_GO]


def test_go_without_block_size_request_sends_only_export_info():
    conn = NbdServerConnection({"disk": SIZE}, max_request=1 << 20)
    events = conn.receive(client_flags() + opt(nbd.OPT_GO, go_data("disk")))
    replies = option_replies(events[0].data)
    assert [t for _, t, _ in replies] == [nbd.REP_INFO, nbd.REP_ACK]
    assert events[1] == Ready("disk", SIZE)


def test_block_size_follows_max_request():
    conn = NbdServerConnection({"disk": SIZE}, max_request=65536)
    events = conn.receive(client_flags() + opt(nbd.OPT_INFO, go_data("disk", nbd.INFO_BLOCK_SIZE)))
    info = option_replies(events[0].data)[1][2]
    assert struct.unpack(">HIII", info) == (nbd.INFO_BLOCK_SIZE, 1, 4096, 65536)


@pytest.mark.parametrize("option", [nbd.OPT_GO, nbd.OPT_EXPORT_NAME])
def test_sizes_and_block_limits_are_unsigned_up_to_their_full_width(option):
    """The export size is a u64 and the maximum block size a u32 on the wire."""
    size, max_request = 2**64 - 1, 2**32 - 1
    conn = NbdServerConnection({"disk": size}, max_request)
    if option == nbd.OPT_GO:
        events = conn.receive(client_flags() + opt(option, go_data("disk", nbd.INFO_BLOCK_SIZE)))
        replies = option_replies(events[0].data)
        assert struct.unpack(">HQH", replies[0][2]) == (nbd.INFO_EXPORT, size, nbd.TRANSMISSION_FLAGS)
        assert struct.unpack(">HIII", replies[1][2]) == (nbd.INFO_BLOCK_SIZE, 1, 4096, max_request)
    else:
        events = conn.receive(client_flags() + opt(option, b"disk"))
        assert struct.unpack(">QH", events[0].data) == (size, nbd.TRANSMISSION_FLAGS)
    assert events[-1] == Ready("disk", size)


def test_info_then_go_and_several_exports():
    conn = NbdServerConnection({"a": 4096, "b": 8192})
    events = conn.receive(client_flags() + opt(nbd.OPT_INFO, go_data("b")))
    replies = option_replies(sends(events))
    assert struct.unpack(">HQH", replies[0][2]) == (0, 8192, 0x6D)
    assert replies[-1][:2] == (nbd.OPT_INFO, nbd.REP_ACK)
    assert not any(isinstance(e, Ready) for e in events)
    assert conn.state == "options"
    events = conn.receive(opt(nbd.OPT_GO, go_data("a")))
    assert events[-1] == Ready("a", 4096)


@pytest.mark.parametrize("option", [nbd.OPT_GO, nbd.OPT_INFO])
def test_unknown_export_is_refused_and_haggling_continues(option):
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags() + opt(option, go_data("nope")))
    assert option_replies(sends(events)) == [(option, nbd.REP_ERR_UNKNOWN, b"unknown export")]
    assert conn.state == "options"
    assert conn.receive(opt(nbd.OPT_GO, go_data("disk")))[-1] == Ready("disk", SIZE)


def test_empty_name_is_not_a_default_export():
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags() + opt(nbd.OPT_GO, go_data(b"")))
    assert option_replies(sends(events))[0][1] == nbd.REP_ERR_UNKNOWN
    conn = NbdServerConnection({"": 4096})
    assert conn.receive(client_flags() + opt(nbd.OPT_GO, go_data(b"")))[-1] == Ready("", 4096)


@pytest.mark.parametrize("data,why", [
    (b"", "option too short"),                                                   # nothing
    (bytes(5), "option too short"),                                             # 6 bytes is the least
    (b"\x00\x00\x00\x04dis", "bad name length"),                                 # shorter than the name
    (struct.pack(">I", 4) + b"disk", "bad name length"),                        # no info count
    (struct.pack(">I", 4) + b"disk" + b"\x00", "bad name length"),              # half an info count
    (struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + b"\x00\x03",
     "bad information request count"),                                          # count says 2, has 1
    (struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 0, 3),
     "bad information request count"),                                          # count says 0, has 1
    (struct.pack(">I", 0xFFFFFFFF) + b"disk\x00\x00", "bad name length"),        # name length 4 GiB
    (struct.pack(">I", 4097) + b"x" * 4097 + b"\x00\x00", "bad name length"),    # name longer than 4096
    (go_data(b"\xff\xfe"), "export name is not valid UTF-8"),                    # not UTF-8
    (go_data(b"di\x00sk"), "export name is not valid UTF-8"),                     # NUL in the name
])
@pytest.mark.parametrize("option", [nbd.OPT_GO, nbd.OPT_INFO])
def test_malformed_go_and_info_are_invalid(option, data, why):
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags() + opt(option, data))
    (reply,) = option_replies(sends(events))
    assert reply == (option, nbd.REP_ERR_INVALID, why.encode())
    assert conn.state == "options"
    assert conn.receive(opt(nbd.OPT_GO, go_data("disk")))[-1] == Ready("disk", SIZE)


@pytest.mark.parametrize("flags,zeroes", [(C_FLAGS, 0), (nbd.FLAG_C_FIXED_NEWSTYLE, 124)])
def test_export_name(flags, zeroes):
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags(flags) + opt(nbd.OPT_EXPORT_NAME, b"disk"))
    assert events[1] == Ready("disk", SIZE)
    data = events[0].data
    assert len(data) == 10 + zeroes
    assert struct.unpack(">QH", data[:10]) == (SIZE, nbd.TRANSMISSION_FLAGS)
    assert data[10:] == bytes(zeroes)
    assert conn.state == "transmission"


@pytest.mark.parametrize("name", [b"nope", b"", b"\xff", b"x" * 4097])
def test_export_name_unknown_ends_the_session(name):
    conn = NbdServerConnection({"disk": SIZE})
    with pytest.raises(NbdError):
        conn.receive(client_flags() + opt(nbd.OPT_EXPORT_NAME, name))
    assert conn.state == "error"
    with pytest.raises(NbdError):
        conn.receive(opt(nbd.OPT_GO, go_data("disk")))


@pytest.mark.parametrize("option,data", [
    (nbd.OPT_STRUCTURED_REPLY, b""),
    (nbd.OPT_SET_META_CONTEXT, go_data("disk")[:-2] + struct.pack(">I", 1) + b"\x00\x00\x00\x0fbase:allocation"),
    (nbd.OPT_LIST_META_CONTEXT, struct.pack(">II", 4, 0) + b"disk"),
    (nbd.OPT_STARTTLS, b""),
    (nbd.OPT_EXTENDED_HEADERS, b""),
    (4, b"peek"),
    (12, b""),
    (0, b""),
    (0x7FFFFFFF, b"x" * 100),
    (0xFFFFFFFF, b""),
])
def test_refused_options(option, data):
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags() + opt(option, data))
    (reply,) = option_replies(sends(events))
    assert reply == (option, nbd.REP_ERR_UNSUP, f"{nbd.option_name(option)} not supported".encode())
    assert conn.state == "options"
    assert conn.receive(opt(nbd.OPT_GO, go_data("disk")))[-1] == Ready("disk", SIZE)
    assert conn.options == [option, nbd.OPT_GO]


def test_option_names_for_logs_and_error_replies():
    assert [nbd.option_name(o) for o in (nbd.OPT_GO, nbd.OPT_STRUCTURED_REPLY, 12, 2**32 - 1)] == [
        "GO", "STRUCTURED_REPLY", "12", "4294967295"]


def test_list():
    conn = NbdServerConnection({"a": 1, "bé": 2})
    replies = option_replies(sends(conn.receive(client_flags() + opt(nbd.OPT_LIST))))
    assert replies == [
        (nbd.OPT_LIST, nbd.REP_SERVER, struct.pack(">I", 1) + b"a"),
        (nbd.OPT_LIST, nbd.REP_SERVER, struct.pack(">I", 3) + "bé".encode()),
        (nbd.OPT_LIST, nbd.REP_ACK, b""),
    ]
    replies = option_replies(sends(conn.receive(opt(nbd.OPT_LIST, b"junk"))))
    assert replies == [(nbd.OPT_LIST, nbd.REP_ERR_INVALID, b"LIST takes no data")]
    assert conn.state == "options"


def test_abort():
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags() + opt(nbd.OPT_ABORT))
    assert option_replies(events[0].data) == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]
    assert events[1:] == [Disconnect()]
    assert conn.state == "closed"
    assert conn.receive(b"") == []
    with pytest.raises(NbdError, match="after the client disconnected"):
        conn.receive(b"x")


def test_abort_followed_by_bytes_in_the_same_chunk():
    conn = NbdServerConnection({"disk": SIZE})
    with pytest.raises(NbdError, match="after the client disconnected"):
        conn.receive(client_flags() + opt(nbd.OPT_ABORT) + b"more")


@pytest.mark.parametrize("flags", [0, nbd.FLAG_C_NO_ZEROES, C_FLAGS | 4, 0xFFFFFFFF, 1 | (1 << 31)])
def test_bad_client_flags(flags):
    conn = NbdServerConnection({"disk": SIZE})
    with pytest.raises(NbdError, match="flags"):
        conn.receive(client_flags(flags))


def test_bad_option_magic():
    conn = NbdServerConnection({"disk": SIZE})
    with pytest.raises(NbdError, match="option magic"):
        conn.receive(client_flags() + opt(nbd.OPT_GO, go_data("disk"), magic=nbd.NBDMAGIC))


@pytest.mark.parametrize("length", [nbd.MAX_OPTION_LENGTH + 1, 1 << 20, 0xFFFFFFFF])
def test_oversized_option_is_refused_before_its_data(length):
    conn = NbdServerConnection({"disk": SIZE})
    header = struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, length)
    with pytest.raises(NbdError, match="limit"):
        conn.receive(client_flags() + header)   # no data sent: nothing waited for
    assert conn.buffered == 0


def test_largest_option_is_accepted():
    conn = NbdServerConnection({"disk": SIZE})
    events = conn.receive(client_flags() + opt(99, bytes(nbd.MAX_OPTION_LENGTH)))
    assert option_replies(sends(events))[0][1] == nbd.REP_ERR_UNSUP


def test_too_many_options():
    conn = NbdServerConnection({"disk": SIZE})
    conn.receive(client_flags() + opt(nbd.OPT_LIST) * nbd.MAX_OPTIONS)
    with pytest.raises(NbdError, match="options"):
        conn.receive(opt(nbd.OPT_LIST))


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 64,
    b"\xff" * 64,
    bytes(range(256)),
])
def test_garbage_instead_of_a_client(garbage):
    conn = NbdServerConnection({"disk": SIZE})
    with pytest.raises(NbdError):
        conn.receive(garbage)


def test_options_after_transmission_started_are_requests():
    conn = ready_conn()
    with pytest.raises(NbdError, match="request magic"):
        conn.receive(opt(nbd.OPT_GO, go_data("disk", 3, 3)))


# --------------------------------------------------------------------------
# Transmission


def test_write_and_reply():
    conn = ready_conn()
    payload = os.urandom(5000)
    events = conn.receive(write_req(7, 4096, payload) + write_req(8, 0, b"ab", flags=nbd.CMD_FLAG_FUA))
    assert events == [Write(7, 4096, payload, False), Write(8, 0, b"ab", True)]
    assert isinstance(events[0].data, bytes)
    assert conn.reply(7) == struct.pack(">IIQ", 0x67446698, 0, 7)
    assert simple_reply(conn.reply(2**64 - 1, 5)) == (2**64 - 1, 5, b"")


def test_read_and_reply_with_data():
    conn = ready_conn()
    assert conn.receive(req(nbd.CMD_READ, 3, 512, 1024)) == [Read(3, 512, 1024)]
    assert conn.reply(3, 0, b"x" * 1024) == struct.pack(">IIQ", 0x67446698, 0, 3) + b"x" * 1024
    with pytest.raises(ValueError):
        conn.reply(3, nbd.NBD_EIO, b"x")
    with pytest.raises(ValueError):
        conn.reply(-1)


def test_reply_before_transmission_is_a_bug():
    conn = NbdServerConnection({"disk": SIZE})
    with pytest.raises(RuntimeError, match="^no replies in state flags$"):
        conn.reply(1)
    conn.receive(client_flags())
    with pytest.raises(RuntimeError, match="^no replies in state options$"):
        conn.reply(1)


@pytest.mark.parametrize("handle,error,data,message", [
    (-1, 0, b"", "handle or error out of range"),
    (2**64, 0, b"", "handle or error out of range"),       # the handle is a u64
    (1, -1, b"", "handle or error out of range"),
    (1, 2**32, b"", "handle or error out of range"),       # the error is a u32
    (1, nbd.NBD_EIO, b"x", "an error reply carries no data"),
])
def test_reply_refuses_what_the_wire_cannot_carry(handle, error, data, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ready_conn().reply(handle, error, data)


def test_reply_field_bounds_are_inclusive():
    conn = ready_conn()
    assert simple_reply(conn.reply(0, 2**32 - 1)) == (0, 2**32 - 1, b"")
    assert simple_reply(conn.reply(2**64 - 1, 0, b"data")) == (2**64 - 1, 0, b"data")


def test_flush_trim_write_zeroes_disc():
    conn = ready_conn()
    stream = (req(nbd.CMD_FLUSH, 1)
              + req(nbd.CMD_FLUSH, 2, flags=nbd.CMD_FLAG_FUA)
              + req(nbd.CMD_TRIM, 3, 4096, 8192)
              + req(nbd.CMD_TRIM, 4, 0, SIZE, flags=nbd.CMD_FLAG_FUA)
              + req(nbd.CMD_WRITE_ZEROES, 5, 0, 100)
              + req(nbd.CMD_WRITE_ZEROES, 6, 10, SIZE - 10, flags=nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
              + req(nbd.CMD_DISC))
    assert conn.receive(stream) == [
        Flush(1), Flush(2),
        Trim(3, 4096, 8192), Trim(4, 0, SIZE, fua=True),
        WriteZeroes(5, 0, 100, may_trim=True), WriteZeroes(6, 10, SIZE - 10, may_trim=False, fua=True),
        Disconnect(),
    ]
    assert conn.state == "closed"
    assert simple_reply(conn.reply(6)) == (6, 0, b"")   # in-flight requests still get replies
    assert conn.receive(b"") == []


def test_trim_and_write_zeroes_may_exceed_max_request():
    big = 1 << 30
    conn = ready_conn({"disk": big}, max_request=4096)
    events = conn.receive(req(nbd.CMD_TRIM, 1, 0, big) + req(nbd.CMD_WRITE_ZEROES, 2, 0, big))
    assert events == [Trim(1, 0, big), WriteZeroes(2, 0, big, True)]


def error_of(events) -> tuple[int, int]:
    (event,) = events
    assert isinstance(event, Send)
    handle, error, rest = simple_reply(event.data)
    assert rest == b""
    return handle, error


@pytest.mark.parametrize("cmd,offset,length,error", [
    (nbd.CMD_READ, SIZE - 1, 2, nbd.NBD_EINVAL),
    (nbd.CMD_READ, SIZE + 1, 0, nbd.NBD_EINVAL),
    (nbd.CMD_READ, 2**64 - 1, 1, nbd.NBD_EINVAL),
    (nbd.CMD_TRIM, 0, SIZE + 1, nbd.NBD_EINVAL),
    (nbd.CMD_TRIM, 2**64 - 4096, 8192, nbd.NBD_EINVAL),
    (nbd.CMD_WRITE_ZEROES, SIZE, 1, nbd.NBD_ENOSPC),
    (nbd.CMD_WRITE_ZEROES, 2**63, 2**32 - 1, nbd.NBD_ENOSPC),
])
def test_out_of_range_is_answered_by_the_state_machine(cmd, offset, length, error):
    conn = ready_conn()
    assert error_of(conn.receive(req(cmd, 42, offset, length))) == (42, error)
    assert conn.state == "transmission"
    assert conn.receive(req(nbd.CMD_FLUSH, 43)) == [Flush(43)]


@pytest.mark.parametrize("offset", [SIZE - 10, SIZE, SIZE + 1, 2**64 - 1])
def test_out_of_range_write_consumes_its_payload(offset):
    conn = ready_conn()
    events = conn.receive(write_req(9, offset, b"y" * 11) + write_req(10, 0, b"ok"))
    assert error_of(events[:1]) == (9, nbd.NBD_ENOSPC)
    assert events[1:] == [Write(10, 0, b"ok")]


def test_write_at_the_very_end_is_fine():
    conn = ready_conn()
    assert conn.receive(write_req(1, SIZE - 3, b"end")) == [Write(1, SIZE - 3, b"end")]


def test_read_longer_than_max_request_is_refused():
    conn = ready_conn({"disk": 1 << 30}, max_request=65536)
    assert error_of(conn.receive(req(nbd.CMD_READ, 5, 0, 65537))) == (5, nbd.NBD_EINVAL)
    assert conn.receive(req(nbd.CMD_READ, 6, 0, 65536)) == [Read(6, 0, 65536)]


@pytest.mark.parametrize("length", [65537, 1 << 31, 0xFFFFFFFF])
def test_write_longer_than_max_request_is_a_violation_before_its_payload(length):
    conn = ready_conn({"disk": 1 << 40}, max_request=65536)
    with pytest.raises(NbdError, match="WRITE of"):
        conn.receive(req(nbd.CMD_WRITE, 1, 0, length))
    assert conn.buffered == 0


@pytest.mark.parametrize("cmd", [nbd.CMD_READ, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES])
def test_zero_length_needs_no_daemon(cmd):
    conn = ready_conn()
    assert error_of(conn.receive(req(cmd, 77, SIZE, 0))) == (77, 0)


def test_zero_length_write():
    conn = ready_conn()
    assert error_of(conn.receive(req(nbd.CMD_WRITE, 78, 100, 0))) == (78, 0)


@pytest.mark.parametrize("cmd,flags", [
    (nbd.CMD_READ, nbd.CMD_FLAG_DF),
    (nbd.CMD_READ, nbd.CMD_FLAG_NO_HOLE),
    (nbd.CMD_TRIM, nbd.CMD_FLAG_NO_HOLE),
    (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_FAST_ZERO),
    (nbd.CMD_FLUSH, nbd.CMD_FLAG_REQ_ONE),
    (nbd.CMD_READ, 0x8000),
])
def test_invalid_command_flags(cmd, flags):
    conn = ready_conn()
    assert error_of(conn.receive(req(cmd, 3, 0, 512, flags))) == (3, nbd.NBD_EINVAL)


def test_invalid_write_flags_still_consume_the_payload():
    conn = ready_conn()
    events = conn.receive(write_req(1, 0, b"abc", flags=nbd.CMD_FLAG_NO_HOLE) + req(nbd.CMD_FLUSH, 2))
    assert error_of(events[:1]) == (1, nbd.NBD_EINVAL)
    assert events[1:] == [Flush(2)]


@pytest.mark.parametrize("offset,length", [(1, 0), (0, 1), (2**64 - 1, 2**32 - 1)])
def test_flush_with_offset_or_length(offset, length):
    conn = ready_conn()
    assert error_of(conn.receive(req(nbd.CMD_FLUSH, 4, offset, length))) == (4, nbd.NBD_EINVAL)


@pytest.mark.parametrize("cmd", [nbd.CMD_CACHE, nbd.CMD_BLOCK_STATUS])
def test_unnegotiated_commands_without_payload(cmd):
    conn = ready_conn()
    assert error_of(conn.receive(req(cmd, 5, 0, 4096))) == (5, nbd.NBD_EINVAL)


@pytest.mark.parametrize("cmd", [8, 9, 0x100, 0xFFFF])
def test_unknown_command(cmd):
    conn = ready_conn()
    with pytest.raises(NbdError, match="unknown command"):
        conn.receive(req(cmd, 1, 0, 4096))


@pytest.mark.parametrize("magic", [0, 0x67446698, 0x25609514, 0xFFFFFFFF])
def test_bad_request_magic(magic):
    conn = ready_conn()
    with pytest.raises(NbdError, match="request magic"):
        conn.receive(req(nbd.CMD_READ, 1, 0, 512, magic=magic))


def test_data_after_disc():
    conn = ready_conn()
    with pytest.raises(NbdError, match="after the client disconnected"):
        conn.receive(req(nbd.CMD_DISC) + req(nbd.CMD_FLUSH))
    conn = ready_conn()
    assert conn.receive(req(nbd.CMD_DISC)) == [Disconnect()]
    with pytest.raises(NbdError, match="after the client disconnected"):
        conn.receive(b"\x00")
    with pytest.raises(NbdError):
        conn.receive(b"")   # dead for good


# --------------------------------------------------------------------------
# End of stream and truncation


def test_eof_at_a_boundary_is_a_disconnect():
    for prefix in (b"", client_flags(), client_flags() + opt(nbd.OPT_LIST)):
        conn = NbdServerConnection({"disk": SIZE})
        if prefix:
            conn.receive(prefix)
        assert conn.receive(b"") == [Disconnect()]
        assert conn.state == "closed"
    conn = ready_conn()
    conn.receive(write_req(1, 0, b"x"))
    assert conn.receive(b"") == [Disconnect()]
    assert conn.receive(b"") == []


@pytest.mark.parametrize("stream,where", [
    (b"\x00\x00", "the handshake"),                                             # half the client flags
    (client_flags() + opt(nbd.OPT_GO, go_data("disk"))[:10], "the handshake"),  # half an option header
    (client_flags() + opt(nbd.OPT_GO, go_data("disk"))[:-1], "the handshake"),  # option data cut short
    (HANDSHAKE + req(nbd.CMD_READ, 1, 0, 512)[:27], "a request"),               # a request header cut short
    (HANDSHAKE + write_req(1, 0, b"abcdef")[:-1], "a request"),                 # a write payload cut short
])
def test_truncated_stream(stream, where):
    conn = NbdServerConnection({"disk": SIZE})
    conn.receive(stream)
    with pytest.raises(NbdError, match=f"^stream ended in the middle of {where}$"):
        conn.receive(b"")
    assert conn.state == "error"


def test_partial_write_is_buffered_only_up_to_its_length():
    conn = ready_conn(max_request=65536)
    header = req(nbd.CMD_WRITE, 1, 0, 65536)
    assert conn.receive(header + b"a" * 1000) == []
    assert conn.buffered == 1000
    events = conn.receive(b"a" * 64536 + req(nbd.CMD_FLUSH, 2)[:5])
    assert events == [Write(1, 0, b"a" * 65536)]
    assert conn.buffered == 5


def test_byte_by_byte_equals_whole():
    stream = (client_flags() + opt(nbd.OPT_STRUCTURED_REPLY) + opt(nbd.OPT_INFO, go_data("disk", 3))
              + opt(nbd.OPT_GO, go_data("disk", 3)) + write_req(1, 10, os.urandom(3000))
              + req(nbd.CMD_READ, 2, 0, 10) + req(nbd.CMD_WRITE_ZEROES, 3, 0, 4096)
              + write_req(4, SIZE, b"zz") + req(nbd.CMD_FLUSH, 5) + req(nbd.CMD_DISC))
    whole = NbdServerConnection({"disk": SIZE}).receive(stream)
    conn = NbdServerConnection({"disk": SIZE})
    pieces = [e for i in range(len(stream)) for e in conn.receive(stream[i : i + 1])]
    assert pieces == whole
    assert [type(e).__name__ for e in whole] == [
        "Send", "Send", "Send", "Ready", "Write", "Read", "WriteZeroes", "Send", "Flush", "Disconnect"]


@pytest.mark.parametrize("exports,max_request,message", [
    ({}, 65536, "^no exports$"),
    ({b"disk": 1}, 65536, "^bad export name b'disk'$"),
    ({"x" * 4097: 1}, 65536, "^bad export name 'xxx"),
    ({"é" * 2049: 1}, 65536, "^bad export name 'ééé"),   # 4098 bytes in UTF-8: the spec counts bytes
    ({"di\0sk": 1}, 65536, "^bad export name 'di.x00sk'$"),
    ({"disk": -1}, 65536, "^bad size -1 for export 'disk'$"),
    ({"disk": 2**64}, 65536, "^bad size 18446744073709551616 for export 'disk'$"),
    ({"disk": 1.0}, 65536, "^bad size 1.0 for export 'disk'$"),
    ({"disk": 1}, 4095, r"^max_request must be within \[4096, 2\*\*32-1\]$"),
    ({"disk": 1}, 2**32, r"^max_request must be within \[4096, 2\*\*32-1\]$"),
])
def test_constructor_validation(exports, max_request, message):
    with pytest.raises(ValueError, match=message):
        NbdServerConnection(exports, max_request)


def test_constructor_bounds_are_inclusive_and_start_in_the_flags_state():
    for exports, max_request in [({"é" * 2048: 0}, 4096), ({"x" * 4096: 2**64 - 1}, 2**32 - 1)]:
        conn = NbdServerConnection(exports, max_request)
        assert (conn.state, conn.export, conn.size, conn.no_zeroes, conn.options, conn.buffered) == (
            "flags", None, 0, False, [], 0)
        assert conn.max_request == max_request and conn.exports == exports


@pytest.mark.parametrize("option", [nbd.OPT_GO, nbd.OPT_EXPORT_NAME])
def test_an_export_name_of_exactly_4096_bytes_is_served(option):
    """The spec's string limit is 4096 bytes: a name that long is still valid."""
    name = "n" * 4096
    conn = NbdServerConnection({name: 8192})
    data = go_data(name) if option == nbd.OPT_GO else name.encode()
    assert conn.receive(client_flags() + opt(option, data))[-1] == Ready(name, 8192)


@pytest.mark.parametrize("stream,message", [
    (client_flags(0), "^client flags 0x0 lack FIXED_NEWSTYLE$"),
    (client_flags(C_FLAGS | 4), "^unknown client flags 0x7$"),
    (client_flags() + opt(nbd.OPT_GO, magic=0x1234), "^bad option magic 0x1234$"),
    (client_flags() + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 8193),
     "^option GO is 8193 bytes, the limit is 8192$"),
    (client_flags() + opt(nbd.OPT_LIST) * 65, "^more than 64 options$"),
    (client_flags() + opt(nbd.OPT_EXPORT_NAME, b"x" * 4097), "^export name of 4097 bytes$"),
    (client_flags() + opt(nbd.OPT_EXPORT_NAME, b"nope"), r"^unknown export b'nope' in EXPORT_NAME$"),
    (client_flags() + opt(nbd.OPT_EXPORT_NAME, b"n" * 100),   # the name quoted up to 64 bytes
     "^unknown export b'" + "n" * 64 + "' in EXPORT_NAME$"),
    (HANDSHAKE + req(nbd.CMD_READ, magic=0xABC), "^bad request magic 0xabc$"),
    (HANDSHAKE + req(nbd.CMD_WRITE, length=65537), "^WRITE of 65537 bytes, the limit is 65536$"),
    (HANDSHAKE + req(9), "^unknown command 9$"),
    (HANDSHAKE + req(nbd.CMD_DISC) + req(nbd.CMD_FLUSH), "^28 bytes after the client disconnected$"),
])
def test_protocol_violations_say_what_was_wrong(stream, message):
    """The NbdError text is what the operator reads in nbd-protocol-error."""
    conn = NbdServerConnection({"disk": SIZE}, max_request=65536)
    with pytest.raises(NbdError, match=message):
        conn.receive(stream)
    with pytest.raises(NbdError, match="^connection already failed$"):
        conn.receive(b"x")


def test_bytes_after_disconnect_are_counted_in_a_later_chunk():
    conn = ready_conn()
    conn.receive(req(nbd.CMD_DISC))
    with pytest.raises(NbdError, match="^3 bytes after the client disconnected$"):
        conn.receive(b"xyz")


# --------------------------------------------------------------------------
# Property tests: hostile input only ever raises NbdError, never buffers unboundedly

FUZZ_MAX_REQUEST = 4096
FUZZ_SIZE = 65536
BUFFER_BOUND = max(16 + nbd.MAX_OPTION_LENGTH, 28 + FUZZ_MAX_REQUEST)


def feed_checked(conn: NbdServerConnection, chunks: list[bytes], size: int = FUZZ_SIZE) -> list:
    """Feed chunks; every event must respect the bounds; stop at the first NbdError."""
    events = []
    try:
        for chunk in chunks:
            got = conn.receive(chunk)
            assert conn.buffered <= BUFFER_BOUND
            for e in got:
                if isinstance(e, Write):
                    assert 0 < len(e.data) <= FUZZ_MAX_REQUEST and e.offset + len(e.data) <= size
                elif isinstance(e, Read):
                    assert 0 < e.length <= FUZZ_MAX_REQUEST and e.offset + e.length <= size
                elif isinstance(e, (Trim, WriteZeroes)):
                    assert 0 < e.length and e.offset + e.length <= size
                elif isinstance(e, Send):
                    assert len(e.data) < 64 * 1024
            events += got
        events += conn.receive(b"")
    except NbdError:
        assert conn.state == "error" and conn.buffered == 0
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


fuzz_settings = settings(max_examples=examples(300), deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


@fuzz_settings
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8))
def test_fuzz_random_bytes_from_the_start(data, cuts):
    conn = NbdServerConnection({"disk": FUZZ_SIZE}, FUZZ_MAX_REQUEST)
    feed_checked(conn, split(data, cuts))


@fuzz_settings
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8))
def test_fuzz_random_bytes_in_transmission(data, cuts):
    conn = NbdServerConnection({"disk": FUZZ_SIZE}, FUZZ_MAX_REQUEST)
    conn.receive(HANDSHAKE)
    feed_checked(conn, split(data, cuts))


@fuzz_settings
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8))
def test_fuzz_random_bytes_in_option_haggling(data, cuts):
    conn = NbdServerConnection({"disk": FUZZ_SIZE}, FUZZ_MAX_REQUEST)
    conn.receive(client_flags())
    feed_checked(conn, split(data, cuts))


interesting_u32 = st.one_of(st.integers(0, 70000), st.sampled_from([
    FUZZ_MAX_REQUEST, FUZZ_MAX_REQUEST + 1, FUZZ_SIZE, FUZZ_SIZE + 1, 2**31, 2**32 - 1]))
interesting_u64 = st.one_of(st.integers(0, 70000), st.sampled_from([
    FUZZ_SIZE - 1, FUZZ_SIZE, 2**63, 2**64 - 1, 2**64 - 4096]))


def rarely(draw, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def requests(draw):
    """Mostly well-framed requests with hostile fields; now and then broken framing."""
    if rarely(draw, 15):
        cmd = draw(st.integers(0, 0xFFFF))
    elif rarely(draw, 30):
        cmd = nbd.CMD_DISC
    else:
        cmd = draw(st.sampled_from([nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_WRITE, nbd.CMD_FLUSH,
                                    nbd.CMD_TRIM, nbd.CMD_CACHE, nbd.CMD_WRITE_ZEROES,
                                    nbd.CMD_BLOCK_STATUS]))
    flags = draw(st.integers(0, 0xFFFF)) if rarely(draw, 8) else draw(st.sampled_from([0, 1, 2, 3]))
    magic = draw(st.integers(0, 2**32 - 1)) if rarely(draw, 20) else nbd.REQUEST_MAGIC
    offset = draw(interesting_u64) if rarely(draw, 4) else draw(st.integers(0, FUZZ_SIZE))
    length = draw(interesting_u32) if rarely(draw, 4) else draw(st.integers(0, FUZZ_MAX_REQUEST))
    if cmd == nbd.CMD_FLUSH and not rarely(draw, 4):
        offset = length = 0
    payload = b""
    if cmd == nbd.CMD_WRITE:
        # usually the announced payload, sometimes less or more
        n = draw(st.integers(0, 5000)) if rarely(draw, 10) else min(length, 5000)
        payload = bytes([draw(st.integers(0, 255))]) * n
    elif rarely(draw, 10):
        payload = draw(st.binary(max_size=40))
    return req(cmd, draw(st.integers(0, 2**64 - 1)), offset, length, flags, payload, magic)


@fuzz_settings
@given(st.lists(requests(), max_size=12), st.lists(st.integers(0, 100000), max_size=6))
def test_fuzz_structured_requests(reqs, cuts):
    conn = NbdServerConnection({"disk": FUZZ_SIZE}, FUZZ_MAX_REQUEST)
    conn.receive(HANDSHAKE)
    feed_checked(conn, split(b"".join(reqs), cuts))


@st.composite
def options(draw):
    option = draw(st.integers(0, 2**32 - 1)) if rarely(draw, 5) else draw(st.integers(0, 12))
    if draw(st.booleans()):
        name = draw(st.sampled_from([b"disk", b"other", b""])) if draw(st.booleans()) \
            else draw(st.binary(max_size=20))
        infos = draw(st.lists(st.integers(0, 5), max_size=5))
        data = go_data(name, *infos)
        if rarely(draw, 4):
            data = data[: draw(st.integers(0, len(data)))]
    else:
        data = draw(st.binary(max_size=60))
    magic = draw(st.integers(0, 2**64 - 1)) if rarely(draw, 20) else nbd.IHAVEOPT
    body = opt(option, data, magic)
    if rarely(draw, 10):   # lie about the length
        body = body[:12] + struct.pack(">I", draw(interesting_u32)) + body[16:]
    return body


@fuzz_settings
@given(st.sampled_from([C_FLAGS] * 6 + [1, 0, 3 | 8]), st.lists(options(), max_size=8),
       st.binary(max_size=200), st.lists(st.integers(0, 100000), max_size=6))
def test_fuzz_structured_options(flags, opts, tail, cuts):
    conn = NbdServerConnection({"disk": FUZZ_SIZE, "other": 4096}, FUZZ_MAX_REQUEST)
    feed_checked(conn, split(client_flags(flags) + b"".join(opts) + tail, cuts))


@fuzz_settings
@given(st.lists(st.tuples(st.integers(0, FUZZ_SIZE - 1), st.binary(min_size=1, max_size=300)),
                max_size=10),
       st.lists(st.integers(0, 10000), max_size=10))
def test_valid_writes_any_split(writes, cuts):
    """However a valid stream is split, the events are the same and rebuild the same image."""
    writes = [(off, data[: FUZZ_SIZE - off]) for off, data in writes]
    stream = HANDSHAKE + b"".join(write_req(i, off, d) for i, (off, d) in enumerate(writes))
    stream += req(nbd.CMD_DISC)
    whole = NbdServerConnection({"disk": FUZZ_SIZE}, FUZZ_MAX_REQUEST).receive(stream)
    conn = NbdServerConnection({"disk": FUZZ_SIZE}, FUZZ_MAX_REQUEST)
    pieces = [e for chunk in split(stream, cuts) for e in conn.receive(chunk)]
    assert pieces == whole
    assert [(e.offset, e.data) for e in whole if isinstance(e, Write)] == writes
    assert whole[-1] == Disconnect()


# --------------------------------------------------------------------------
# The asyncio adapter, with a hand-written client


class Client:
    """A minimal NBD client over asyncio streams, for adapter tests."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, export: str = "disk", refused: tuple[int, ...] = ()) -> "Client":
        """Handshake: the options `refused` (each answered with an error), then GO."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        greeting = await reader.readexactly(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        writer.write(client_flags() + b"".join(opt(o) for o in refused) + opt(nbd.OPT_GO, go_data(export)))
        for _ in refused:
            _, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
            assert rtype & (1 << 31)
            await reader.readexactly(length)
        replies = []
        while True:
            head = await reader.readexactly(20)
            _, option, rtype, length = struct.unpack(">QIII", head)
            replies.append((rtype, await reader.readexactly(length)))
            if rtype == nbd.REP_ACK or rtype & (1 << 31):
                break
        assert replies[-1][0] == nbd.REP_ACK, replies
        return cls(reader, writer)

    async def call(self, request: bytes, read_length: int = 0) -> tuple[int, int, bytes]:
        self.writer.write(request)
        handle, error, _ = simple_reply(await self.reader.readexactly(16))
        data = await self.reader.readexactly(read_length) if read_length and not error else b""
        return handle, error, data

    async def close(self) -> None:
        self.writer.write(req(nbd.CMD_DISC))
        await self.writer.drain()
        assert await self.reader.read() == b""
        self.writer.close()


class Disk:
    """What the daemon would do: keep a copy, record the calls."""

    def __init__(self, size: int, fill: int = 0xEE):
        self.image = bytearray([fill]) * size
        self.calls: list[tuple] = []
        self.fail_next = False

    def on_write(self, offset: int, data: bytes) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk on fire")
        self.calls.append(("write", offset, len(data), time.monotonic()))
        self.image[offset : offset + len(data)] = data

    def on_read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        return bytes(self.image[offset : offset + length])

    def on_flush(self) -> None:
        self.calls.append(("flush",))


@pytest.fixture
def sockdir():
    # unix socket paths must stay short; pytest's tmp_path can be long
    path = Path(tempfile.mkdtemp(prefix="nbd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(coro, timeout: float = 20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_adapter_round_trip(sockdir):
    disk = Disk(SIZE)

    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, disk.on_write, disk.on_read,
                             disk.on_flush, max_request=65536) as server:
            c = await Client.connect(server.socket_path)
            assert await c.call(write_req(1, 100, b"hello")) == (1, 0, b"")
            assert disk.calls[-1][:3] == ("write", 100, 5)   # on_write ran before the reply
            assert await c.call(req(nbd.CMD_READ, 2, 98, 9), 9) == (2, 0, b"\xee\xeehello\xee\xee")
            assert await c.call(req(nbd.CMD_FLUSH, 3)) == (3, 0, b"")
            assert disk.calls[-1] == ("flush",)
            # write zeroes and trim become zero writes of at most max_request bytes
            disk.calls.clear()
            assert await c.call(req(nbd.CMD_WRITE_ZEROES, 4, 1000, 150000)) == (4, 0, b"")
            assert [c[1:3] for c in disk.calls] == [(1000, 65536), (66536, 65536), (132072, 18928)]
            assert disk.image[1000:151000] == bytes(150000)
            disk.calls.clear()
            assert await c.call(req(nbd.CMD_TRIM, 5, 0, 100)) == (5, 0, b"")
            assert [c[1:3] for c in disk.calls] == [(0, 100)]
            assert disk.image[:105] == bytes(100) + b"hello"
            # refused by the state machine: the daemon never sees them
            disk.calls.clear()
            assert await c.call(write_req(6, SIZE - 1, b"ab")) == (6, nbd.NBD_ENOSPC, b"")
            assert await c.call(req(nbd.CMD_READ, 7, 0, 65537)) == (7, nbd.NBD_EINVAL, b"")
            assert disk.calls == []
            await c.close()
            assert (sockdir / "s").exists()
        assert not (sockdir / "s").exists()

    run(main())


def test_adapter_callback_errors_and_missing_callbacks(sockdir, caplog):
    disk = Disk(SIZE)

    def bad_read(offset, length):
        return b"short"

    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, disk.on_write) as server:
            c = await Client.connect(server.socket_path)
            assert await c.call(req(nbd.CMD_READ, 1, 0, 512), 512) == (1, nbd.NBD_EINVAL, b"")
            assert await c.call(req(nbd.CMD_FLUSH, 2)) == (2, 0, b"")   # no on_flush: nothing to do
            disk.fail_next = True
            assert await c.call(write_req(3, 0, b"x")) == (3, nbd.NBD_EIO, b"")
            assert await c.call(write_req(4, 0, b"y")) == (4, 0, b"")   # the connection lives on
            await c.close()
        async with NbdServer(sockdir / "s", "disk", SIZE, disk.on_write, bad_read) as server:
            c = await Client.connect(server.socket_path)
            assert await c.call(req(nbd.CMD_READ, 5, 0, 512), 512) == (5, nbd.NBD_EIO, b"")
            await c.close()

    run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("nbd-callback-error") and "disk on fire" in m for m in errors)
    assert any(m.startswith("nbd-callback-error op=read") and "returned 5 bytes" in m for m in errors)


@pytest.mark.parametrize("garbage", [
    b"garbage that is no NBD client at all",
    client_flags() + opt(nbd.OPT_GO, b"x", magic=0),
    client_flags() + opt(nbd.OPT_EXPORT_NAME, b"nope"),
])
def test_adapter_drops_a_violating_client_and_keeps_serving(sockdir, caplog, garbage):
    disk = Disk(SIZE)

    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, disk.on_write) as server:
            reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
            await reader.readexactly(18)
            writer.write(garbage)
            assert await asyncio.wait_for(reader.read(), 5) == b""   # closed on us
            writer.close()
            c = await Client.connect(server.socket_path)
            assert await c.call(write_req(1, 0, b"ok")) == (1, 0, b"")
            await c.close()

    run(main())
    assert disk.image[:2] == b"ok"
    assert any(r.getMessage().startswith("nbd-protocol-error export=disk error=") and
               r.levelno == logging.ERROR for r in caplog.records)


def test_adapter_violation_in_transmission_and_close_with_clients_connected(sockdir, caplog):
    disk = Disk(SIZE)

    async def main():
        server = NbdServer(sockdir / "s", "disk", SIZE, disk.on_write)
        await server.start()
        bad = await Client.connect(server.socket_path)
        bad.writer.write(req(nbd.CMD_READ, 1, 0, 512, magic=0xDEADBEEF))
        assert await asyncio.wait_for(bad.reader.read(), 5) == b""
        idle = await Client.connect(server.socket_path)   # still connected at close()
        await server.close()
        assert await asyncio.wait_for(idle.reader.read(), 5) == b""
        assert not server.socket_path.exists()

    run(main())
    assert any("bad request magic" in r.getMessage() for r in caplog.records)


def test_adapter_replaces_a_stale_socket_but_not_a_file(sockdir):
    async def main():
        stale = await asyncio.start_unix_server(lambda r, w: None, path=str(sockdir / "s"))
        stale.close()
        await stale.wait_closed()
        assert (sockdir / "s").exists()   # left behind, as by a crashed daemon
        async with NbdServer(sockdir / "s", "disk", SIZE, lambda o, d: None) as server:
            c = await Client.connect(server.socket_path)
            await c.close()
        (sockdir / "f").write_text("not a socket")
        with pytest.raises(OSError):
            await NbdServer(sockdir / "f", "disk", SIZE, lambda o, d: None).start()
        assert (sockdir / "f").read_text() == "not a socket"

    run(main())


def test_adapter_validates_its_arguments_like_the_state_machine(sockdir):
    noop = lambda o, d: None   # noqa: E731
    for export, size, max_request in [("disk", SIZE, 100), ("disk", SIZE, 1 << 32),
                                      ("disk", -1, 65536), ("di\0sk", SIZE, 65536)]:
        with pytest.raises(ValueError):
            NbdServer(sockdir / "s", export, size, noop, max_request=max_request)


def test_adapter_close_is_safe_before_start_twice_and_without_its_socket(sockdir):
    async def main():
        await NbdServer(sockdir / "never", "disk", SIZE, lambda o, d: None).close()
        server = NbdServer(sockdir / "s", "disk", SIZE, lambda o, d: None)
        await server.start()
        (sockdir / "s").unlink()   # removed under us (a tmp cleaner, an operator)
        await server.close()
        await server.close()

    run(main())


def test_adapter_close_returns_only_once_every_connection_has_ended(sockdir):
    """After close() no callback runs: a connection held in the throttle is cancelled
    and has finished by the time close() returns."""
    disk = Disk(SIZE)
    seen: list[str] = []

    async def main():
        entered = asyncio.Event()

        async def throttle():
            entered.set()
            try:
                await asyncio.Event().wait()   # a disk queue that never drains
            finally:
                seen.append("throttle ended")

        server = NbdServer(sockdir / "s", "disk", SIZE, disk.on_write, throttle=throttle)
        await server.start()
        c = await Client.connect(server.socket_path)
        c.writer.write(write_req(1, 0, b"x"))
        await asyncio.wait_for(entered.wait(), 5)
        await server.close()
        assert seen == ["throttle ended"]
        assert await asyncio.wait_for(c.reader.read(), 5) == b""

    run(main())


def test_adapter_close_during_a_connections_teardown_returns_normally(sockdir, caplog):
    """close() racing a connection that is being closed (a violating client dropped
    just as the daemon shuts down) neither raises nor hangs."""
    async def main():
        server = NbdServer(sockdir / "s", "disk", SIZE, lambda o, d: None)
        closing: list[asyncio.Task] = []

        class CloseOnProtocolError(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("nbd-protocol-error") and not closing:
                    closing.append(asyncio.get_running_loop().create_task(server.close()))

        handler = CloseOnProtocolError()
        logging.getLogger("remus.nbd").addHandler(handler)
        try:
            await server.start()
            reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
            await reader.readexactly(18)
            writer.write(b"garbage that is no NBD client at all")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            while not closing:
                await asyncio.sleep(0.01)
            await asyncio.wait_for(closing[0], 5)
        finally:
            logging.getLogger("remus.nbd").removeHandler(handler)

    run(main())


def test_adapter_zeroes_without_on_zero_are_real_zero_writes_of_any_size(sockdir):
    disk = Disk(SIZE)

    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, disk.on_write, max_request=4096) as server:
            c = await Client.connect(server.socket_path)
            for handle, (cmd, offset, length) in enumerate([
                    (nbd.CMD_WRITE_ZEROES, 0, 4), (nbd.CMD_TRIM, 100, 1),
                    (nbd.CMD_WRITE_ZEROES, 200, 4096), (nbd.CMD_TRIM, 5000, 3), 
                    (nbd.CMD_WRITE_ZEROES, 8192, 10000)]):
                assert await c.call(req(cmd, handle, offset, length)) == (handle, 0, b"")
            await c.close()

    run(main())
    assert [c[1:3] for c in disk.calls] == [
        (0, 4), (100, 1), (200, 4096), (5000, 3), (8192, 4096), (12288, 4096), (16384, 1808)]
    expected = bytearray([0xEE]) * SIZE
    for offset, length in [(0, 4), (100, 1), (200, 4096), (5000, 3), (8192, 10000)]:
        expected[offset:offset + length] = bytes(length)
    assert disk.image == expected


def test_adapter_callback_error_log_names_the_callback(sockdir, caplog):
    def on_write(offset, data):
        raise OSError("disk on fire")

    async def main():
        for callback in (on_write, functools.partial(on_write)):
            async with NbdServer(sockdir / "s", "disk", SIZE, callback) as server:
                c = await Client.connect(server.socket_path)
                assert await c.call(write_req(1, 0, b"x")) == (1, nbd.NBD_EIO, b"")
                await c.close()

    run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "nbd-callback-error op=on_write error=\"OSError('disk on fire')\"",
        "nbd-callback-error op=? error=\"OSError('disk on fire')\""]


def test_adapter_logs_one_line_per_request_for_the_operator(sockdir, caplog):
    caplog.set_level(logging.DEBUG, logger="remus.nbd")
    disk = Disk(SIZE)

    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, disk.on_write, disk.on_read,
                             disk.on_flush) as server:
            c = await Client.connect(server.socket_path, refused=(nbd.OPT_STRUCTURED_REPLY, 99))
            await c.call(write_req(1, 100, b"hello", flags=nbd.CMD_FLAG_FUA))
            await c.call(req(nbd.CMD_WRITE_ZEROES, 2, 0, 10))
            await c.call(req(nbd.CMD_WRITE_ZEROES, 3, 0, 10, flags=nbd.CMD_FLAG_NO_HOLE))
            await c.call(req(nbd.CMD_TRIM, 4, 20, 5, flags=nbd.CMD_FLAG_FUA))
            await c.call(req(nbd.CMD_FLUSH, 5))
            await c.call(req(nbd.CMD_READ, 6, 98, 9), 9)
            await c.close()

    run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "remus.nbd"] == [
        f"nbd-client-ready export=disk size={SIZE} options=STRUCTURED_REPLY,99,GO",
        "nbd-write offset=100 length=5 fua=True",
        "nbd-write-zeroes offset=0 length=10 may_trim=True fua=False",
        "nbd-write-zeroes offset=0 length=10 may_trim=False fua=False",
        "nbd-trim offset=20 length=5 fua=True",
        "nbd-flush",
        "nbd-read offset=98 length=9",
        "nbd-client-disconnect export=disk options=STRUCTURED_REPLY,99,GO",
    ]


def unexpected_logs(caplog, *allowed: str) -> list[str]:
    """Warnings and errors from any logger (asyncio's included) not starting with `allowed`."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and not r.getMessage().startswith(allowed or ("\0",))]


async def all_connections_ended(server: NbdServer) -> None:
    """Wait until the server has finished, and forgotten, every connection."""
    for _ in range(300):
        if not server._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"connections still tracked: {server._tasks}")


def test_adapter_a_client_that_aborts_without_reading_the_ack_is_no_error(sockdir, caplog):
    """NBD_OPT_ABORT: the client "SHOULD" wait for the ACK but may just close; the
    server's failed write of the ACK is then no connection loss worth a warning."""
    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, lambda o, d: None) as server:
            for _ in range(3):
                reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
                await reader.readexactly(18)
                writer.write(client_flags() + opt(nbd.OPT_ABORT))
                writer.close()
                await writer.wait_closed()
            await all_connections_ended(server)

    run(main())
    assert unexpected_logs(caplog) == []


def test_adapter_a_client_gone_before_its_reply_is_a_lost_connection(sockdir, caplog):
    async def main():
        async with NbdServer(sockdir / "s", "disk", SIZE, lambda o, d: None) as server:
            c = await Client.connect(server.socket_path)
            c.writer.write(write_req(1, 0, b"x"))
            c.writer.close()   # gone without waiting for the reply
            await c.writer.wait_closed()
            await all_connections_ended(server)

    run(main())
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING and warning.name == "remus.nbd"
    assert re.fullmatch(r'nbd-connection-lost export=disk error="?\w.*', warning.getMessage())
    assert "error=None" not in warning.getMessage()


# --------------------------------------------------------------------------
# QEMU's real NBD client

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
needs_qemu_io = pytest.mark.skipif(not (QEMU_IO and QEMU_IMG), reason="qemu-utils not installed")


class LoopThread:
    """An event loop in a background thread, for serving while a blocking subprocess runs."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served(sockdir, caplog):
    """NbdServer for a 4 MiB export in a background loop; yields (disk, url, options seen)."""
    caplog.set_level(logging.INFO, logger="remus.nbd")
    size = 4 << 20
    disk = Disk(size)
    lt = LoopThread()
    server = NbdServer(sockdir / "nbd.sock", "disk0", size, disk.on_write, disk.on_read, disk.on_flush)
    lt.run(server.start())

    def options_seen() -> list[str]:
        return [r.getMessage().split("options=")[1] for r in caplog.records
                if r.getMessage().startswith("nbd-client-ready")]

    try:
        yield disk, f"nbd+unix:///disk0?socket={server.socket_path}", options_seen
    finally:
        lt.run(server.close())
        lt.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "remus.nbd"]


def qemu(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_qemu_io
def test_qemu_io_write_flush_zeroes_read_discard(served):
    disk, url, options_seen = served
    out = qemu(QEMU_IO, "-f", "raw", url,
               "-c", "write -P 0xab 4096 65536",
               "-c", "flush",
               "-c", "write -z 1048576 8192",
               "-c", "read -P 0xab 4096 65536",
               "-c", "discard 2097152 4096",
               "-c", "write -P 0x01 4194303 1")
    assert "read 65536/65536 bytes at offset 4096" in out
    expected = bytearray([0xEE]) * (4 << 20)
    expected[4096 : 4096 + 65536] = b"\xab" * 65536
    expected[1048576 : 1048576 + 8192] = bytes(8192)
    expected[2097152 : 2097152 + 4096] = bytes(4096)
    expected[-1] = 1
    assert disk.image == expected
    kinds = [c[0] for c in disk.calls]
    assert "flush" in kinds and ("read", 4096, 65536) in disk.calls
    # QEMU asks for structured replies first; refused with ERR_UNSUP it carries
    # on with simple replies and enters transmission with NBD_OPT_GO.
    (options,) = options_seen()
    assert options.split(",")[0] == "STRUCTURED_REPLY" and options.split(",")[-1] == "GO"


@needs_qemu_io
def test_qemu_honours_max_block_but_sends_one_big_discard(sockdir, caplog):
    caplog.set_level(logging.DEBUG, logger="remus.nbd")
    size = 4 << 20
    disk = Disk(size)
    lt = LoopThread()
    server = NbdServer(sockdir / "s", "d", size, disk.on_write, max_request=65536)
    lt.run(server.start())
    try:
        qemu(QEMU_IO, "-f", "raw", f"nbd+unix:///d?socket={server.socket_path}",
             "-c", "write -P 0x77 0 1M", "-c", "discard 0 4M")
    finally:
        lt.run(server.close())
        lt.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "remus.nbd"]
    writes = [m for m in messages if m.startswith("nbd-write ")]
    assert len(writes) == 16 and all("length=65536" in m for m in writes)
    assert [m for m in messages if m.startswith("nbd-trim")] == [
        "nbd-trim offset=0 length=4194304 fua=False"]
    # the trim reaches the daemon as zero writes no longer than max_request
    assert [c[1:3] for c in disk.calls[16:]] == [(i * 65536, 65536) for i in range(64)]
    assert disk.image == bytes(size)


@needs_qemu_io
def test_zeroes_and_discards_of_a_20_gib_export_reach_on_zero_without_data(sockdir):
    """A hole or a guest's wipe of a big disk must not become bytes in memory."""
    size = 20 << 30
    zeroed: list[tuple[int, int]] = []
    writes: list[int] = []
    lt = LoopThread()
    server = NbdServer(sockdir / "z", "d", size, lambda o, d: writes.append(len(d)),
                       on_zero=lambda o, n: zeroed.append((o, n)))
    lt.run(server.start())
    try:
        cmds = [c for k in range(20) for c in ("-c", f"write -z {k}G 1G", "-c", f"discard {k}G 1G")]
        qemu(QEMU_IO, "-f", "raw", f"nbd+unix:///d?socket={server.socket_path}", *cmds,
             "-c", "write -P 1 4096 512", timeout=120)
    finally:
        lt.run(server.close())
        lt.stop()
    assert writes == [512]
    assert sum(n for _, n in zeroed) == 2 * size and len(zeroed) < 2000


@needs_qemu_io
def test_a_slow_throttle_holds_the_write_reply(sockdir):
    size = 4 << 20
    disk = Disk(size)
    gate = None
    lt = LoopThread()

    async def make_gate():
        return asyncio.Event()
    gate = lt.run(make_gate())

    async def throttle():
        await gate.wait()
    server = NbdServer(sockdir / "t", "d", size, disk.on_write, throttle=throttle)
    lt.run(server.start())
    try:
        proc = subprocess.Popen([QEMU_IO, "-f", "raw", f"nbd+unix:///d?socket={server.socket_path}",
                                 "-c", "write -P 2 0 4096"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while not disk.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disk.calls, "the write never reached the server"
        time.sleep(0.3)  # the write has arrived; its reply must still be held
        assert proc.poll() is None, "qemu-io finished while the throttle held the reply"
        lt.loop.call_soon_threadsafe(gate.set)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
    finally:
        lt.run(server.close())
        lt.stop()
    assert disk.image[:4096] == b"\x02" * 4096


@needs_qemu_io
def test_qemu_io_out_of_range_is_an_error_for_qemu(served):
    disk, url, _ = served
    proc = subprocess.run([QEMU_IO, "-f", "raw", url, "-c", "write -P 1 4194304 512"],
                          capture_output=True, text=True, timeout=30)
    assert "write failed" in proc.stdout + proc.stderr   # qemu refuses past EOF itself
    assert disk.image == bytearray([0xEE]) * (4 << 20)


@needs_qemu_io
def test_qemu_img_convert_copies_an_image_through_the_server(served, sockdir):
    disk, url, _ = served
    src = sockdir / "src.raw"
    with open(src, "wb") as f:
        f.truncate(4 << 20)
        for offset, n in [(0, 100_000), (1 << 20, 4096), (3 << 20, 700_000)]:
            f.seek(offset)
            f.write(os.urandom(n))
    qemu(QEMU_IMG, "convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
    assert disk.image == src.read_bytes()   # holes arrive as zeroes, the 0xEE fill is gone


@needs_qemu_io
def test_qemu_nbd_list(served):
    _, _, options_seen = served
    sock = served[1].split("socket=")[1]
    out = qemu("qemu-nbd", "--list", "-k", sock)
    assert "export: 'disk0'" in out and "size:  4194304" in out
    assert "max block: 33554432" in out


@pytest.mark.skipif(not QEMU_SYSTEM, reason="qemu-system-x86 not installed")
def test_blockdev_mirror_write_blocking_into_the_server(sockdir, caplog):
    """A real mirror job: the initial copy lands whole, and a write through
    the mirror completes only after on_write has seen it."""
    from qemu.qmp import QMPClient

    caplog.set_level(logging.DEBUG, logger="remus.nbd")
    size = 8 << 20
    src = sockdir / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for offset, n in [(0, 100_000), (2 << 20, 3000), (size - 5000, 5000)]:
            f.seek(offset)
            f.write(os.urandom(n))
    disk = Disk(size)

    async def hmp(q, line: str) -> str:
        return await q.execute("human-monitor-command", {"command-line": line})

    async def main():
        async with NbdServer(sockdir / "nbd.sock", "disk0", size, disk.on_write,
                             on_flush=disk.on_flush) as server:
            qmp_sock = sockdir / "qmp.sock"
            proc = await asyncio.create_subprocess_exec(
                QEMU_SYSTEM, "-nodefaults", "-display", "none", "-machine", "q35",
                "-accel", "tcg", "-S", "-qmp", f"unix:{qmp_sock},server=on,wait=off",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            q = QMPClient("nbd-test")
            try:
                for _ in range(500):
                    if qmp_sock.exists():
                        break
                    await asyncio.sleep(0.02)
                await q.connect(str(qmp_sock))
                await q.execute("blockdev-add", {
                    "driver": "raw", "node-name": "src",
                    "file": {"driver": "file", "filename": str(src)}})
                await q.execute("blockdev-add", {
                    "driver": "nbd", "node-name": "tgt", "export": "disk0",
                    "server": {"type": "unix", "path": str(server.socket_path)}})
                with q.listener(("BLOCK_JOB_READY", "BLOCK_JOB_ERROR",
                                 "BLOCK_JOB_COMPLETED")) as events:
                    await q.execute("blockdev-mirror", {
                        "job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                        "copy-mode": "write-blocking", "filter-node-name": "mtop"})
                    event = await asyncio.wait_for(events.get(), 30)
                assert event["event"] == "BLOCK_JOB_READY", event
                assert disk.image == src.read_bytes()   # the whole disk, holes included
                assert disk.calls[-1] == ("flush",)     # flushed before READY

                # guest-path writes (through the mirror filter): synchronous
                disk.calls.clear()
                before = time.monotonic()
                await hmp(q, 'qemu-io mtop "write -P 0xcd 12288 4096"')
                after = time.monotonic()
                (call,) = disk.calls
                assert call[:3] == ("write", 12288, 4096) and before <= call[3] <= after
                await hmp(q, 'qemu-io mtop "write -z 1048576 65536"')
                assert disk.image == src.read_bytes()
                assert disk.image[12288:16384] == b"\xcd" * 4096

                with q.listener(("BLOCK_JOB_COMPLETED",)) as events:
                    await q.execute("block-job-cancel", {"device": "m"})
                    await asyncio.wait_for(events.get(), 30)
                await q.execute("blockdev-del", {"node-name": "tgt"})
                await q.execute("quit")
            finally:
                with contextlib.suppress(Exception):
                    await q.disconnect()
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                await proc.wait()

    run(main(), timeout=60)
    messages = [r.getMessage() for r in caplog.records if r.name == "remus.nbd"]
    assert any(m.startswith("nbd-client-ready") and m.endswith("options=STRUCTURED_REPLY,GO")
               for m in messages), messages
    assert "nbd-write-zeroes offset=1048576 length=65536 may_trim=False fua=False" in messages
    assert not any(m.startswith(("nbd-read", "nbd-trim", "nbd-protocol-error", "nbd-callback-error"))
                   for m in messages)
