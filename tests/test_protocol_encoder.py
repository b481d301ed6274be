"""The primary's side of the checkpoint stream, pinned down on its own: the frames
CheckpointEncoder produces and the arguments it refuses (with the message the
operator reads), the header checks of messages, the end-frame checksum and its
hashing pool, and PrimaryProtocol's handling of what the backup sends."""
from __future__ import annotations

import hashlib
import re
import struct
import threading

import numpy as np
import pytest
import zstandard

from remus.common.protocol import (PROTOCOL_VERSION, Acked, CheckpointEncoder, DiskRun,
                                   PrimaryProtocol, Progress, Rejected, Welcome,
                                   checkpoint_checksum)
from remus.common.protocol import checksum as checksum_mod
from remus.common.protocol.checksum import Hasher, new_hasher
from remus.common.protocol.messages import (DISK_EXTENT, FROM_PRIMARY, MAX_DISK_SIZE,
                                            MAX_DISKS, MAX_EPOCH, MAX_FRAME_RAW, MAX_INPUT_COUNT,
                                            MAX_INPUT_FRAME, MIN_INPUT_FRAME, ZERO_EXTENT,
                                            check_fields, check_int)
from remus.common.wire import Frame, FrameDecoder, ProtocolError, encode_frame

FP = "fingerprint-0123"
SESSION = "0123456789abcdef0123456789abcdef"
PS = 64
RAM = 32 * PS
ENC = CheckpointEncoder(PS)  # shared: no test feeds its device frames (maybe deltas) to a backup
IDX2 = np.array([1, 3], dtype=np.uint32)
PAGES2 = np.zeros((2, PS), np.uint8)


def exactly(message: str) -> str:
    """A `match` pattern for the whole error message, not just part of it."""
    return "^" + re.escape(message) + "$"


def decode(data: bytes) -> list[Frame]:
    frames = FrameDecoder().feed(data)
    assert sum(len(encode_frame(f.header, f.payload)) for f in frames) == len(data)
    return frames


def decode_all(frames) -> list[Frame]:
    return [f for data in frames for f in decode(data)]


def page_counts(frames) -> list[int]:
    return [f.header["count"] for f in decode_all(frames) if f.header["t"] == "pages"]


# --------------------------------------------------------------------------
# Encoder arguments: what is refused, and the message that says why

BAD_ARGUMENTS = [
    (lambda: CheckpointEncoder(0), ValueError, "page_size must be >= 1, got 0"),
    (lambda: CheckpointEncoder("64"), TypeError, "page_size must be an int, not str"),
    (lambda: CheckpointEncoder(PS, "lz4"), ValueError,
     "compression must be one of ('zstd', 'none'), got 'lz4'"),
    (lambda: ENC.hello(b"fp", SESSION, RAM), TypeError, "fingerprint must be a str"),
    (lambda: ENC.hello(FP, "ABC", RAM), ValueError,
     "session must be 32 lowercase hex digits, got 'ABC'"),
    (lambda: ENC.hello(FP, SESSION, PS - 1), ValueError, "ram_size must be >= 64, got 63"),
    (lambda: ENC.hello(FP, SESSION, RAM + 1), ValueError,
     "ram_size 2049 is not a multiple of page_size 64"),
    (lambda: ENC.hello(FP, SESSION, RAM, disk_sizes=[0]), ValueError,
     f"disk_size must be in 1..{MAX_DISK_SIZE}, got 0"),
    (lambda: ENC.hello(FP, SESSION, RAM, disk_sizes=[MAX_DISK_SIZE + 1]), ValueError,
     f"disk_size must be in 1..{MAX_DISK_SIZE}, got {MAX_DISK_SIZE + 1}"),
    (lambda: ENC.hello(FP, SESSION, RAM, generation=0), ValueError,
     f"generation must be in 1..{MAX_EPOCH}, got 0"),
    (lambda: ENC.hello(FP, SESSION, RAM, generation=MAX_EPOCH + 1), ValueError,
     f"generation must be in 1..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
    (lambda: ENC.input(-1, [bytes(60)]), ValueError, f"after_epoch must be in 0..{MAX_EPOCH}, got -1"),
    (lambda: ENC.input(MAX_EPOCH + 1, [bytes(60)]), ValueError,
     f"after_epoch must be in 0..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
    (lambda: ENC.input(0, []), ValueError,
     f"an input message carries 1..{MAX_INPUT_COUNT} frames, not 0"),
    (lambda: ENC.input(0, [bytes(60)] * (MAX_INPUT_COUNT + 1)), ValueError,
     f"an input message carries 1..{MAX_INPUT_COUNT} frames, not {MAX_INPUT_COUNT + 1}"),
    (lambda: ENC.input(0, [bytes(MIN_INPUT_FRAME - 1)]), ValueError,
     f"input frame of {MIN_INPUT_FRAME - 1} bytes is not an Ethernet frame"),
    (lambda: ENC.input(0, [bytes(MAX_INPUT_FRAME + 1)]), ValueError,
     f"input frame of {MAX_INPUT_FRAME + 1} bytes is not an Ethernet frame"),
    (lambda: ENC.input(0, [bytes(60)], nic=8), ValueError, "nic must be in 0..7, got 8"),
    (lambda: ENC.input(0, [bytes(60)], nic=-1), ValueError, "nic must be in 0..7, got -1"),
    (lambda: ENC.bye(None), TypeError, "reason must be a str"),
    (lambda: ENC.handover(3, None), TypeError, "reason must be a str"),
    (lambda: ENC.handover(0, "x"), ValueError, f"epoch must be in 1..{MAX_EPOCH}, got 0"),
    (lambda: ENC.handover(MAX_EPOCH + 1, "x"), ValueError,
     f"epoch must be in 1..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
    (lambda: ENC.handover(True, "x"), TypeError, "epoch must be an int, not bool"),
    (lambda: ENC.checkpoint(0, False, 0.0, IDX2, PAGES2, None, b"d"), ValueError,
     f"epoch must be in 1..{MAX_EPOCH}, got 0"),
    (lambda: ENC.checkpoint(MAX_EPOCH + 1, False, 0.0, IDX2, PAGES2, None, b"d"), ValueError,
     f"epoch must be in 1..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
    (lambda: ENC.checkpoint(2, 0, 0.0, IDX2, PAGES2, None, b"d"), TypeError,
     "full must be a bool"),
    (lambda: ENC.checkpoint(2, False, float("inf"), IDX2, PAGES2, None, b"d"), ValueError,
     "taken_at must be finite"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2, PAGES2, None, b"d", batch_pages=0), ValueError,
     "batch_pages must be >= 1, got 0"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2, PAGES2, None, b"d", precopy=True), ValueError,
     "a pre-copy round carries no device state and no synced disk"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2, PAGES2, None, b"", disk_synced=True,
                            precopy=True), ValueError,
     "a pre-copy round carries no device state and no synced disk"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2, PAGES2, None, b""), ValueError,
     "device_state must not be empty"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2.reshape(2, 1), PAGES2, None, b"d"), ValueError,
     "indices must be a 1-D integer array, got uint32 shape (2, 1)"),
    (lambda: ENC.checkpoint(2, False, 0.0, np.array([1.0, 3.0]), PAGES2, None, b"d"), ValueError,
     "indices must be a 1-D integer array, got float64 shape (2,)"),
    (lambda: ENC.checkpoint(2, False, 0.0, np.array([-1, 3]), PAGES2, None, b"d"), ValueError,
     "indices must fit in uint32"),
    (lambda: ENC.checkpoint(2, False, 0.0, np.array([1, 2**32]), PAGES2, None, b"d"), ValueError,
     "indices must fit in uint32"),
    (lambda: ENC.checkpoint(2, False, 0.0, np.array([1, 5, 3]), np.zeros((3, PS), np.uint8), None,
                            b"d"), ValueError, "indices must be strictly increasing"),
    (lambda: ENC.checkpoint(1, True, 0.0, IDX2, PAGES2, None, b"d"), ValueError,
     "a full checkpoint must list every page 0..npages-1"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2, PAGES2[:1], None, b"d"), ValueError,
     f"new_pages must be uint8 of shape (2, {PS}), got uint8 (1, {PS})"),
    (lambda: ENC.checkpoint(1, True, 0.0, np.arange(2), PAGES2, PAGES2, b"d"), ValueError,
     "a full checkpoint must not use xor (previous_pages must be None)"),
    (lambda: ENC.checkpoint(2, False, 0.0, IDX2, PAGES2, PAGES2.astype(np.int16), b"d"),
     ValueError, f"previous_pages must be uint8 of shape (2, {PS}), got int16 (2, {PS})"),
    (lambda: ENC.precopy_round(0, True, 0.0, []), ValueError,
     f"epoch must be in 1..{MAX_EPOCH}, got 0"),
    (lambda: ENC.precopy_round(MAX_EPOCH + 1, True, 0.0, []), ValueError,
     f"epoch must be in 1..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
    (lambda: ENC.precopy_round(1, True, 0.0, [], batch_pages=0), ValueError,
     "batch_pages must be >= 1, got 0"),
    (lambda: list(ENC.precopy_round(1, False, 0.0, [(IDX2, PAGES2[:1], None)])), ValueError,
     f"a batch of 2 pages has pages of shape (1, {PS})"),
    (lambda: list(ENC.precopy_round(1, False, 0.0, [(IDX2, PAGES2, PAGES2[:1])])), ValueError,
     f"a batch of 2 pages has pages of shape (2, {PS})"),
]


@pytest.mark.parametrize("call, error, message", BAD_ARGUMENTS)
def test_encoder_refuses_bad_arguments_with_a_message_naming_the_problem(call, error, message):
    with pytest.raises(error, match=exactly(message)):
        call()


def test_encoder_accepts_every_argument_at_its_bounds():
    enc = CheckpointEncoder(1)
    assert decode(enc.hello(FP, SESSION, 1))[0].header["page_size"] == 1
    ENC.input(MAX_EPOCH, [bytes(MIN_INPUT_FRAME), bytes(MAX_INPUT_FRAME)], nic=7)
    ENC.input(0, [bytes(MIN_INPUT_FRAME)] * MAX_INPUT_COUNT)
    assert decode(ENC.handover(MAX_EPOCH, "x"))[0].header["epoch"] == MAX_EPOCH
    assert decode(ENC.handover(1, "x"))[0].header["epoch"] == 1
    top = np.array([0xFFFFFFFF], dtype=np.uint32)
    frames = decode_all(ENC.checkpoint(MAX_EPOCH, False, 0.0, top, PAGES2[:1], None, b"d"))
    assert frames[0].header["epoch"] == MAX_EPOCH
    assert frames[1].payload[:4] == b"\xff\xff\xff\xff"
    one = np.array([7], dtype=np.uint32)
    assert len(list(ENC.checkpoint(2, False, 0.0, one, PAGES2[:1], None, b"d"))) == 4


def test_encoder_keeps_its_settings():
    enc = CheckpointEncoder(PS)
    assert (enc.page_size, enc.compression, enc.level) == (PS, "zstd", 1)
    enc = CheckpointEncoder(PS, "none", level=5)
    assert (enc.compression, enc.level) == ("none", 5)


# --------------------------------------------------------------------------
# What the encoder puts on the wire


def test_hello_header_carries_every_field():
    header = decode(ENC.hello(FP, SESSION, RAM, disk_sizes=[1, MAX_DISK_SIZE], media=[123, "x"],
                              generation=MAX_EPOCH))[0].header
    assert header == {"t": "hello", "version": PROTOCOL_VERSION, "fingerprint": FP,
                      "session": SESSION, "ram_size": RAM, "page_size": PS,
                      "disk_sizes": [1, MAX_DISK_SIZE], "media": ["123", "x"],
                      "generation": MAX_EPOCH}
    defaults = decode(ENC.hello(FP, SESSION, RAM))[0].header
    assert (defaults["disk_sizes"], defaults["media"], defaults["generation"]) == ([], [], 1)


def test_input_frame_layout():
    frames = [bytes([1]) * MIN_INPUT_FRAME, bytes([2]) * 60]
    (f,) = decode(ENC.input(4, frames, nic=3))
    assert f.header == {"t": "input", "after_epoch": 4, "count": 2, "nic": 3}
    assert f.payload == (struct.pack("<I", MIN_INPUT_FRAME) + frames[0]
                         + struct.pack("<I", 60) + frames[1])


def test_bye_and_handover_frames():
    assert decode(ENC.bye("shutting down"))[0].header == {"t": "bye", "reason": "shutting down"}
    (f,) = decode(ENC.handover(9, "planned switchover"))
    assert f.header == {"t": "handover", "epoch": 9, "reason": "planned switchover"}
    assert f.payload == b""


def test_pages_per_frame_default_and_explicit_batch():
    n = 1025
    idx, pages = np.arange(n), np.zeros((n, PS), np.uint8)
    assert page_counts(ENC.checkpoint(1, True, 0.0, idx, pages, None, b"d")) == [1024, 1]
    assert page_counts(ENC.precopy_round(1, True, 0.0, [(idx, pages, None)])) == [1024, 1]
    small = np.arange(3)
    assert page_counts(ENC.checkpoint(1, True, 0.0, small, pages[:3], None, b"d",
                                      batch_pages=1)) == [1, 1, 1]
    assert page_counts(ENC.precopy_round(1, True, 0.0, [(small, pages[:3], None)],
                                         batch_pages=1)) == [1, 1, 1]


def test_pages_frame_never_decodes_to_more_than_max_frame_raw():
    ps = MAX_FRAME_RAW // 4
    enc = CheckpointEncoder(ps)
    idx, pages = np.arange(5), np.zeros((5, ps), np.uint8)
    assert page_counts(enc.checkpoint(1, True, 0.0, idx, pages, None, b"d",
                                      batch_pages=10**6)) == [4, 1]
    assert page_counts(enc.precopy_round(1, True, 0.0, [(idx, pages, None)],
                                         batch_pages=10**6)) == [4, 1]


def test_indices_of_any_integer_dtype_go_on_the_wire_as_uint32_le():
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (3, PS), dtype=np.uint8)
    # A new encoder each time: a second device frame from one would be a delta.
    reference = list(CheckpointEncoder(PS).checkpoint(2, False, 1.0, np.array([2, 5, 9], np.uint32),
                                                      pages, None, b"d"))
    for dtype in (np.int64, np.uint16, ">u4"):
        idx = np.array([2, 5, 9], dtype=dtype)
        assert list(CheckpointEncoder(PS).checkpoint(2, False, 1.0, idx, pages, None, b"d")) \
            == reference
    pre = [list(ENC.precopy_round(2, False, 1.0, [(np.array([2, 5, 9], dtype), pages, None)]))
           for dtype in (np.uint32, np.int64)]
    assert pre[0] == pre[1]
    assert decode(pre[0][1])[0].payload[:12] == struct.pack("<3I", 2, 5, 9)


def zstd_break_even_page() -> bytes:
    """A page whose zstd (level 1) output is exactly as long as the page."""
    cctx = zstandard.ZstdCompressor(level=1)
    tail = np.random.default_rng(0).integers(0, 256, PS, dtype=np.uint8).tobytes()
    for zeros in range(PS):
        page = bytes(zeros) + tail[zeros:]
        if len(cctx.compress(page)) == PS:
            return page
    raise AssertionError("no break-even page found")


def test_pages_are_compressed_only_when_that_makes_them_smaller():
    idx = np.array([4], np.uint32)
    even = np.frombuffer(zstd_break_even_page(), np.uint8).reshape(1, PS)
    frames = decode_all(ENC.checkpoint(2, False, 0.0, idx, even, None, b"d"))
    assert frames[1].header["codec"] == "none"
    assert frames[1].payload[4:] == even.tobytes()
    zero = np.zeros((1, PS), np.uint8)
    assert decode_all(ENC.checkpoint(2, False, 0.0, idx, zero, None, b"d"))[1].header["codec"] == "zstd"
    raw = CheckpointEncoder(PS, "none")
    assert decode_all(raw.checkpoint(2, False, 0.0, idx, zero, None, b"\0" * 100))[1].header["codec"] == "none"
    device = decode_all(raw.checkpoint(2, False, 0.0, idx, zero, None, b"\0" * 100))[2]
    assert (device.header["codec"], device.payload) == ("none", b"\0" * 100)


def test_disk_and_zero_frames_and_their_checksum():
    table = np.array([(0, 512), (4096, 1024)], dtype=DISK_EXTENT)
    data = [b"a" * 512, b"b" * 1024]
    zeros = np.array([(1 << 20, 1 << 16)], dtype=ZERO_EXTENT)
    runs = [DiskRun(table, data, disk=1), DiskRun(zeros, None, disk=1)]
    idx = np.array([3], np.uint32)
    frames = decode_all(ENC.checkpoint(2, False, 7.0, idx, PAGES2[:1], None, b"dev", disk_runs=runs))
    assert [f.header["t"] for f in frames] == ["begin", "pages", "disk", "zero", "device", "end"]
    disk, zero = frames[2], frames[3]
    assert disk.header == {"t": "disk", "disk": 1, "count": 2, "codec": "zstd", "raw_len": 1536}
    assert disk.payload[:table.nbytes] == table.tobytes()
    assert zstandard.ZstdDecompressor().decompress(disk.payload[table.nbytes:]) == b"".join(data)
    assert zero.header == {"t": "zero", "disk": 1, "count": 1}
    assert zero.payload == zeros.tobytes()
    h = hashlib.blake2b(struct.pack("<QBd", 2, 0, 7.0), digest_size=16)
    for part in (idx.tobytes(), PAGES2[:1].tobytes(), table.tobytes(), b"".join(data),
                 zeros.tobytes(), b"dev"):
        h.update(part)
    assert frames[-1].header == {"t": "end", "epoch": 2, "pages": 1, "checksum": h.hexdigest()}


# --------------------------------------------------------------------------
# Message header checks


def checked(header: dict, payload: bytes = b"", allowed=FROM_PRIMARY):
    return check_fields(Frame(header, payload), "backup", allowed)


HELLO = {"t": "hello", "version": PROTOCOL_VERSION, "fingerprint": FP, "session": SESSION,
         "ram_size": RAM, "page_size": PS, "disk_sizes": [], "media": [], "generation": 1}


def test_list_fields_take_up_to_max_disks_items_of_their_type():
    sizes = list(range(1, MAX_DISKS + 1))
    assert checked({**HELLO, "disk_sizes": sizes})[1]["disk_sizes"] == sizes
    assert checked({**HELLO, "media": ["m"] * MAX_DISKS})[1]["media"] == ["m"] * MAX_DISKS


BAD_HEADERS = [
    ({**HELLO, "disk_sizes": list(range(1, MAX_DISKS + 2))},
     f"'hello' message field 'disk_sizes' must be a intlist, got list {list(range(1, MAX_DISKS + 2))!r:.60}"),
    ({**HELLO, "disk_sizes": ["1"]}, "'hello' message field 'disk_sizes' must be a intlist, got list ['1']"),
    ({**HELLO, "disk_sizes": [True]}, "'hello' message field 'disk_sizes' must be a intlist, got list [True]"),
    ({**HELLO, "media": [1]}, "'hello' message field 'media' must be a strlist, got list [1]"),
    ({**HELLO, "version": "3"}, "'hello' message field 'version' must be a int, got str '3'"),
    ({"t": "begin", "epoch": 1, "full": True, "taken_at": float("inf"), "disk_synced": False,
      "precopy": False}, "'begin' message field 'taken_at' must be a finite float, got float inf"),
]


@pytest.mark.parametrize("header, message", BAD_HEADERS)
def test_header_field_errors_name_the_field_the_kind_and_the_value(header, message):
    with pytest.raises(ProtocolError, match=exactly(message)):
        checked(header)


def test_long_values_are_cut_in_error_messages():
    value = [str(i) for i in range(40)]
    with pytest.raises(ProtocolError) as info:
        checked({**HELLO, "disk_sizes": value})
    assert str(info.value) == ("'hello' message field 'disk_sizes' must be a intlist, got list "
                               + repr(value)[:60])


def test_float_fields_accept_ints():
    assert checked({"t": "begin", "epoch": 1, "full": True, "taken_at": 5, "disk_synced": False,
                    "precopy": False})[1]["taken_at"] == 5.0


CHECK_INT = [
    (("x", True, 0), TypeError, "x must be an int, not bool"),
    (("x", 1.0, 0), TypeError, "x must be an int, not float"),
    (("x", 0, 1), ValueError, "x must be >= 1, got 0"),
    (("x", 8, 0, 7), ValueError, "x must be in 0..7, got 8"),
    (("x", -1, 0, 7), ValueError, "x must be in 0..7, got -1"),
]


@pytest.mark.parametrize("args, error, message", CHECK_INT)
def test_check_int_refuses_non_ints_and_values_out_of_range(args, error, message):
    with pytest.raises(error, match=exactly(message)):
        check_int(*args)


def test_check_int_accepts_its_bounds():
    assert [check_int("x", v, 0, 7) for v in (0, 7)] == [0, 7]
    assert check_int("x", 10**30, 1) == 10**30


# --------------------------------------------------------------------------
# The end-frame checksum: the documented construction, and the hashing pool


@pytest.mark.parametrize("full, precopy, flags", [(False, False, 0), (True, False, 1),
                                                  (False, True, 2), (True, True, 3)])
def test_checksum_is_blake2b_over_the_documented_preamble_and_data(full, precopy, flags):
    idx, pages = np.array([0, 2], np.uint32), np.arange(2 * PS, dtype=np.uint8).reshape(2, PS)
    expected = hashlib.blake2b(struct.pack("<QBd", 7, flags, 1.5) + idx.tobytes()
                               + pages.tobytes() + b"dev", digest_size=16).hexdigest()
    assert len(expected) == 32
    assert checkpoint_checksum(7, full, 1.5, idx, pages, b"dev", precopy=precopy) == expected
    h = new_hasher(7, full, 1.5, precopy)
    for part in (idx, pages, b"dev"):
        h.update(part)
    assert h.hexdigest() == expected


def test_a_hasher_is_for_a_consistent_checkpoint_unless_told_otherwise():
    consistent = hashlib.blake2b(struct.pack("<QBd", 4, 1, 0.5), digest_size=16).hexdigest()
    assert Hasher(4, True, 0.5).hexdigest() == consistent
    assert new_hasher(4, True, 0.5).hexdigest() == consistent


def test_checksum_takes_indices_and_pages_in_any_integer_form():
    idx, pages = [0, 3], [[i % 256] * PS for i in range(2)]
    native = checkpoint_checksum(2, False, 0.0, np.array(idx, np.uint32),
                                 np.array(pages, np.uint8), b"d")
    assert checkpoint_checksum(2, False, 0.0, idx, pages, b"d") == native
    assert checkpoint_checksum(2, False, 0.0, np.array(idx, np.int64), pages, b"d") == native
    empty = checkpoint_checksum(2, False, 0.0, np.array([], np.uint32),
                                np.zeros((0, PS), np.uint8), b"d")
    assert empty == hashlib.blake2b(struct.pack("<QBd", 2, 0, 0.0) + b"d",
                                    digest_size=16).hexdigest()


class HeldPool:
    """Stands in for the hashing pool: a submitted drain runs only when its
    result is asked for, so a test sees what waits and in what order it is hashed."""

    def __init__(self) -> None:
        self.submitted = 0
        self.ran = 0

    def submit(self, fn):
        self.submitted += 1
        pool = self

        class Task:
            done = False

            def result(self):
                if not self.done:
                    self.done = True
                    pool.ran += 1
                    fn()

        return Task()


@pytest.fixture
def held_pool(monkeypatch):
    pool = HeldPool()
    monkeypatch.setattr(checksum_mod, "_pool", lambda: pool)
    monkeypatch.setattr(checksum_mod, "_ASYNC_HASH_MIN", 1024)
    monkeypatch.setattr(checksum_mod, "_HASH_BACKLOG", 4096)
    return pool


def test_big_updates_go_to_the_pool_small_ones_queue_behind_them(held_pool):
    h = Hasher(1, False, 0.0, False)
    h.update(b"a" * 1023)  # small, nothing queued: hashed here
    assert held_pool.submitted == 0
    h.update(b"b" * 1024)  # big: handed to the pool
    h.update(b"c")  # small, but must not overtake the queued one
    assert (held_pool.submitted, held_pool.ran) == (1, 0)
    expected = hashlib.blake2b(struct.pack("<QBd", 1, 0, 0.0) + b"a" * 1023 + b"b" * 1024 + b"c",
                               digest_size=16).hexdigest()
    assert h.hexdigest() == expected
    assert held_pool.ran == 1


def test_update_waits_only_once_the_backlog_is_exceeded(held_pool):
    h = Hasher(1, False, 0.0, False)
    h.update(b"x" * 4096)  # exactly the backlog: no wait
    assert held_pool.ran == 0
    h.update(b"y")  # one byte over: waits for the worker
    assert held_pool.ran == 1
    h.update(b"z" * 4096)  # the drained bytes no longer count
    assert (held_pool.submitted, held_pool.ran) == (2, 1)
    expected = hashlib.blake2b(struct.pack("<QBd", 1, 0, 0.0) + b"x" * 4096 + b"y" + b"z" * 4096,
                               digest_size=16).hexdigest()
    assert h.hexdigest() == expected


def test_a_real_pool_hashes_big_updates_in_order():
    data = [bytes([i]) * (300 * 1024) for i in range(5)] + [b"tail"]
    h = Hasher(3, True, 2.0, False)
    for d in data:
        h.update(d)
    assert h.hexdigest() == hashlib.blake2b(struct.pack("<QBd", 3, 1, 2.0) + b"".join(data),
                                            digest_size=16).hexdigest()


def test_hash_pool_is_made_once_per_process_with_named_threads(monkeypatch):
    pool = checksum_mod._pool()
    assert checksum_mod._pool() is pool
    name = pool.submit(lambda: threading.current_thread().name).result()
    assert name.startswith("remus-hash")
    real_pid = checksum_mod.os.getpid()
    monkeypatch.setattr(checksum_mod.os, "getpid", lambda: real_pid + 1)  # as after a fork
    forked = checksum_mod._pool()
    assert forked is not pool
    assert checksum_mod._pool() is forked
    monkeypatch.undo()
    assert checksum_mod._pool() is not forked  # back in "the parent": a pool of its own again
    forked.shutdown()


# --------------------------------------------------------------------------
# PrimaryProtocol


def frame(header: dict, payload: bytes = b"") -> bytes:
    return encode_frame(header, payload)


def welcome(generation: int = 1) -> bytes:
    return frame({"t": "welcome", "version": PROTOCOL_VERSION, "session": SESSION,
                  "generation": generation})


def reject(generation: int) -> bytes:
    return frame({"t": "reject", "reason": "configs differ", "generation": generation})


def ack(epoch: int) -> bytes:
    return frame({"t": "ack", "epoch": epoch})


def progress(epoch: int, nbytes: int) -> bytes:
    return frame({"t": "progress", "epoch": epoch, "bytes": nbytes})


PRIMARY_ARGUMENTS = [
    (lambda: PrimaryProtocol("ABC"), ValueError, "session must be 32 lowercase hex digits, got 'ABC'"),
    (lambda: PrimaryProtocol(SESSION, generation=-1), ValueError,
     f"generation must be in 0..{MAX_EPOCH}, got -1"),
    (lambda: PrimaryProtocol(SESSION, generation=MAX_EPOCH + 1), ValueError,
     f"generation must be in 0..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
    (lambda: PrimaryProtocol(SESSION).sent(0), ValueError, f"epoch must be in 1..{MAX_EPOCH}, got 0"),
    (lambda: PrimaryProtocol(SESSION).sent(MAX_EPOCH + 1), ValueError,
     f"epoch must be in 1..{MAX_EPOCH}, got {MAX_EPOCH + 1}"),
]


@pytest.mark.parametrize("call, error, message", PRIMARY_ARGUMENTS)
def test_primary_refuses_bad_arguments(call, error, message):
    with pytest.raises(error, match=exactly(message)):
        call()


def test_primary_generation_bounds_and_sent_epochs():
    assert PrimaryProtocol(SESSION, generation=0).generation == 0
    assert PrimaryProtocol(SESSION, generation=MAX_EPOCH).generation == MAX_EPOCH
    p = PrimaryProtocol(SESSION)
    p.sent(3)
    with pytest.raises(ValueError, match=exactly("sent(3) after sent(3): epochs must increase")):
        p.sent(3)
    p.sent(MAX_EPOCH)
    assert p.outstanding == (3, MAX_EPOCH)


@pytest.mark.parametrize("own, theirs, authenticated, supersedes", [
    (None, 2, True, True),  # a primary holds generation 1 unless told otherwise
    (None, 1, True, False),
    (2, 2, True, False),
    (2, 3, True, True),
    (0, 5, False, False),  # over plain TCP a reject never supersedes
])
def test_reject_supersedes_only_an_older_primary_and_only_if_authenticated(own, theirs,
                                                                          authenticated, supersedes):
    kwargs = {} if own is None else {"generation": own}
    p = PrimaryProtocol(SESSION, authenticated=authenticated, **kwargs)
    assert p.receive(reject(theirs)) == [Rejected("configs differ", theirs, supersedes)]
    assert p.state == "rejected"


def test_progress_of_an_awaited_checkpoint_from_zero_bytes():
    p = PrimaryProtocol(SESSION)
    p.sent(1)
    assert p.receive(welcome() + progress(1, 0) + progress(1, 10) + ack(1)) == [
        Welcome(SESSION, 1), Progress(1, 0), Progress(1, 10), Acked(1)]
    with pytest.raises(ProtocolError, match=exactly("progress of epoch 1, which is not awaiting an ack")):
        p.receive(progress(1, 5))


@pytest.mark.parametrize("sent, data, message", [
    ([], welcome() + welcome(), "second welcome from the backup"),
    ([], welcome() + reject(1), "reject from the backup after it welcomed the session"),
    ([1], welcome() + progress(1, -1), "progress of epoch 1, which is not awaiting an ack"),
    ([1], progress(1, 0), "progress of epoch 1, which is not awaiting an ack"),
])
def test_primary_protocol_errors_read_in_full(sent, data, message):
    p = PrimaryProtocol(SESSION)
    for epoch in sent:
        p.sent(epoch)
    with pytest.raises(ProtocolError, match=exactly(message)):
        p.receive(data)
    with pytest.raises(ProtocolError,
                       match=exactly(f"protocol is unusable after an earlier error ({message})")):
        p.receive(ack(1))


def test_close_ends_the_stream_once():
    p = PrimaryProtocol(SESSION)
    p.receive(welcome())
    p.close()
    assert p.state == "closed"
    with pytest.raises(ProtocolError, match=exactly("receive() after close()")):
        p.receive(ack(1))
    p = PrimaryProtocol(SESSION)
    p.receive(welcome()[:5])
    with pytest.raises(ProtocolError, match="middle of a frame"):
        p.close()
    assert p.state == "closed"
    p.close()  # a second close says nothing more


def test_close_after_a_protocol_error_does_not_raise_again():
    p = PrimaryProtocol(SESSION)
    bad = frame({"t": "welcome", "version": PROTOCOL_VERSION, "session": "f" * 32, "generation": 1})
    with pytest.raises(ProtocolError, match="welcome is for session"):
        p.receive(bad + ack(1)[:3])  # the error leaves part of a frame buffered
    assert p.state == "failed"
    p.close()
    assert p.state == "failed"

