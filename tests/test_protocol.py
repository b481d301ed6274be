"""Checkpoint-stream protocol: encoder, PrimaryProtocol, BackupProtocol (no sockets)."""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis_budget import examples
from hypothesis import strategies as st

from remus.common.protocol import (
    PROTOCOL_VERSION,
    Acked,
    BackupProtocol,
    CheckpointEncoder,
    CheckpointStaged,
    InputReceived,
    PeerBye,
    PrimaryProtocol,
    Rejected,
    Send,
    SessionOpened,
    StagedCheckpoint,
    Welcome,
    checkpoint_checksum,
)
from remus.common.wire import FrameDecoder, ProtocolError, encode_frame, encode_frame_parts

FP = "fingerprint-0123"
SESSION = "0123456789abcdef0123456789abcdef"
PS = 64
NPAGES = 32
RAM = PS * NPAGES


# --------------------------------------------------------------------------
# Helpers: a simulated primary producing a stream, a simulated backup daemon


@dataclass
class Sent:
    epoch: int
    full: bool
    taken_at: float
    indices: np.ndarray
    pages: np.ndarray
    device_state: bytes


def make_stream(
    seed: int = 0,
    n_ckpt: int = 3,
    compression: str = "zstd",
    xor: bool = True,
    batch: int = 5,
    ps: int = PS,
    npages: int = NPAGES,
    empty_incremental: bool = False,
) -> tuple[list[bytes], list[Sent]]:
    """Frames (hello first) of a session and what each checkpoint carries."""
    rng = np.random.default_rng(seed)
    enc = CheckpointEncoder(ps, compression)
    ram = rng.integers(0, 256, (npages, ps), dtype=np.uint8)
    ram[rng.random(npages) < 0.4] = 0  # some compressible pages
    frames = [enc.hello(FP, SESSION, npages * ps)]
    sent: list[Sent] = []
    replica_view = None  # what the primary knows the backup holds
    device = b""
    for epoch in range(1, n_ckpt + 1):
        if epoch == 1:
            full, idx = True, np.arange(npages, dtype=np.uint32)
        else:
            full = False
            k = 0 if empty_incremental else int(rng.integers(0, npages + 1))
            idx = np.sort(rng.choice(npages, k, replace=False)).astype(np.uint32)
            for i in idx:  # dirty a few bytes of each page
                pos = rng.integers(0, ps, 3)
                ram[i, pos] ^= rng.integers(1, 256, 3, dtype=np.uint8)
        new = ram[idx].copy()
        prev = replica_view[idx] if (xor and not full) else None
        device = _next_device(rng, device)
        taken_at = 1_700_000_000.0 + epoch * 0.25
        frames += list(enc.checkpoint(epoch, full, taken_at, idx, new, prev, device, batch_pages=batch))
        sent.append(Sent(epoch, full, taken_at, idx, new, device))
        replica_view = ram.copy()
    return frames, sent


def _next_device(rng, device: bytes) -> bytes:
    """A device state after `device`: mostly a few bytes changed (a delta frame), now
    and then one of another length (sent whole)."""
    if not device or rng.random() < 0.25:
        return rng.bytes(int(rng.integers(1, 200)))
    changed = bytearray(device)
    for pos in rng.integers(0, len(changed), 2):
        changed[pos] ^= int(rng.integers(1, 256))
    return bytes(changed)


class Daemon:
    """Minimal backup daemon: commits staged checkpoints to a replica and acks."""

    def __init__(self, max_payload: int | None = None, ps: int = PS, npages: int = NPAGES,
                 fp: str = FP, read_only_previous: bool = False, auto_ack: bool = True):
        self.replica = np.zeros((npages, ps), dtype=np.uint8)
        self.staged: list[StagedCheckpoint] = []
        self.events: list = []
        self.acks: list[bytes] = []
        self.auto_ack = auto_ack

        def read_previous(idx):
            out = self.replica[idx]
            if read_only_previous:
                out.setflags(write=False)
            return out

        kw = {} if max_payload is None else {"max_payload": max_payload}
        self.proto = BackupProtocol(fp, npages * ps, ps, read_previous, **kw)

    def feed(self, data: bytes) -> None:
        for ev in self.proto.receive(data):
            self.events.append(ev)
            if isinstance(ev, CheckpointStaged):
                sc = ev.checkpoint
                self.replica[sc.indices] = sc.pages
                self.staged.append(sc)
                if self.auto_ack:
                    self.acks.append(self.proto.ack(sc.epoch))


def assert_same(sc: StagedCheckpoint, exp: Sent) -> None:
    assert sc.epoch == exp.epoch
    assert sc.full is exp.full
    assert sc.taken_at == exp.taken_at
    assert sc.indices.dtype == np.uint32
    assert np.array_equal(sc.indices, exp.indices)
    assert sc.pages.dtype == np.uint8
    assert sc.pages.shape == exp.pages.shape
    assert np.array_equal(sc.pages, exp.pages)
    assert sc.device_state == exp.device_state


def split(data: bytes, cuts) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def frame(header: dict, payload: bytes = b"") -> bytes:
    return encode_frame(header, payload)


def header_of(data: bytes) -> dict:
    return FrameDecoder().feed(data)[0].header


def retype(data: bytes, **changes) -> bytes:
    """Re-encode a frame with header fields changed (None deletes)."""
    f = FrameDecoder().feed(data)[0]
    h = dict(f.header)
    for k, v in changes.items():
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    return encode_frame(h, f.payload)


def opened() -> Daemon:
    d = Daemon()
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    return d


def hello_frame(**changes) -> bytes:
    h = {"t": "hello", "version": PROTOCOL_VERSION, "fingerprint": FP, "session": SESSION,
         "ram_size": RAM, "page_size": PS, "disk_sizes": [], "media": [], "generation": 1}
    h.update(changes)
    return frame(h)


# --------------------------------------------------------------------------
# Handshake


def test_handshake_roundtrip():
    d = Daemon()
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    assert d.proto.state == "idle"
    assert d.events[0] == SessionOpened(SESSION, RAM, PS)
    assert isinstance(d.events[1], Send)
    assert header_of(d.events[1].data) == {"t": "welcome", "version": PROTOCOL_VERSION,
                                             "session": SESSION, "generation": 0}
    primary = PrimaryProtocol(SESSION)
    assert primary.receive(d.events[1].data) == [Welcome(SESSION, 0)]
    assert primary.state == "ready"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 7}, f"peer speaks protocol version 7, this backup speaks {PROTOCOL_VERSION}"),
        ({"fingerprint": "other"}, "fingerprint mismatch"),
        ({"ram_size": RAM * 2}, "ram_size mismatch"),
        ({"page_size": PS * 2}, "page_size mismatch"),
        ({"session": "xyz"}, "session must be 32 lowercase hex"),
        ({"session": SESSION.upper()}, "session must be 32 lowercase hex"),
        ({"session": SESSION + "\n"}, "session must be 32 lowercase hex"),
        ({"version": "1"}, "'version' must be a int"),
        ({"ram_size": True}, "'ram_size' must be a int"),
        ({"extra": 1}, "unknown field"),
        ({"disk_sizes": [1 << 20]}, "disk mismatch: primary mirrors 1 disk"),
        ({"disk_sizes": "x"}, "'disk_sizes' must be a intlist"),
        ({"media": ["1:ab"]}, "read-only media mismatch: primary has 1, this backup 0"),
    ],
)
def test_hello_rejected_with_reply(changes, message):
    d = Daemon()
    with pytest.raises(ProtocolError, match=message) as info:
        d.feed(hello_frame(**changes))
    reply = info.value.reply
    assert reply is not None
    h = header_of(reply)
    assert h["t"] == "reject" and message.split(",")[0] in h["reason"]
    assert d.proto.state == "failed"
    # the primary sees the reject
    assert PrimaryProtocol(SESSION).receive(reply) == [Rejected(h["reason"], 0)]


def test_hello_missing_field():
    d = Daemon()
    with pytest.raises(ProtocolError, match="missing the field 'fingerprint'") as info:
        d.feed(retype(hello_frame(), fingerprint=None))
    assert info.value.reply is not None


def test_first_message_must_be_hello():
    frames, _ = make_stream()
    d = Daemon()
    with pytest.raises(ProtocolError, match="first message must be 'hello', got 'begin'") as info:
        d.feed(frames[1])
    assert header_of(info.value.reply)["t"] == "reject"


def test_garbage_before_hello_gets_reject_reply():
    d = Daemon()
    with pytest.raises(ProtocolError) as info:
        d.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert header_of(info.value.reply)["t"] == "reject"


def test_second_hello_rejected():
    d = opened()
    with pytest.raises(ProtocolError, match="second hello"):
        d.feed(hello_frame())


def test_backup_constructor_validation():
    with pytest.raises(ValueError):
        BackupProtocol(FP, 100, 64, lambda i: None)
    with pytest.raises(ValueError):
        BackupProtocol(FP, 0, 64, lambda i: None)


# --------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("xor", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_roundtrip(compression, xor, chunk):
    frames, sent = make_stream(seed=3, n_ckpt=4, compression=compression, xor=xor)
    stream = b"".join(frames)
    d = Daemon()
    step = len(stream) if chunk is None else chunk
    for i in range(0, len(stream), step):
        d.feed(stream[i : i + step])
    d.proto.close()
    assert [sc.epoch for sc in d.staged] == [1, 2, 3, 4]
    for sc, exp in zip(d.staged, sent):
        assert_same(sc, exp)
    assert [header_of(a) for a in d.acks] == [{"t": "ack", "epoch": e} for e in (1, 2, 3, 4)]
    assert d.proto.state == "closed"


def test_roundtrip_frame_by_frame_states():
    frames, sent = make_stream(n_ckpt=2)
    d = Daemon()
    d.feed(frames[0])
    assert d.proto.state == "idle"
    d.feed(frames[1])
    assert d.proto.state == "in-checkpoint"
    for f in frames[2:]:
        d.feed(f)
    assert d.proto.state == "idle"
    assert len(d.staged) == 2


def test_empty_incremental_checkpoint():
    frames, sent = make_stream(n_ckpt=3, empty_incremental=True)
    kinds = [header_of(f)["t"] for f in frames]
    assert kinds.count("pages") == 7  # only the full one (32 pages / 5 per frame)
    d = Daemon()
    d.feed(b"".join(frames))
    assert len(d.staged) == 3
    for sc, exp in zip(d.staged, sent):
        assert_same(sc, exp)
    assert d.staged[1].indices.shape == (0,) and d.staged[1].pages.shape == (0, PS)


def test_full_checkpoint_later_in_session():
    enc = CheckpointEncoder(PS)
    rng = np.random.default_rng(1)
    ram = rng.integers(0, 256, (NPAGES, PS), dtype=np.uint8)
    all_idx = np.arange(NPAGES, dtype=np.uint32)
    d = opened()
    for epoch in (1, 2, 3):
        for f in enc.checkpoint(epoch, True, 1.0, all_idx, ram, None, b"d"):
            d.feed(f)
        ram = ram ^ np.uint8(epoch)
    assert [sc.full for sc in d.staged] == [True, True, True]


def test_compression_falls_back_to_none_for_random_pages():
    frames, _ = make_stream(seed=5, n_ckpt=1)
    codecs = {header_of(f).get("codec") for f in frames[2:-1]}
    assert codecs <= {"zstd", "none"}
    enc = CheckpointEncoder(PS)
    pages = np.random.default_rng(0).integers(0, 256, (NPAGES, PS), dtype=np.uint8)
    fr = list(enc.checkpoint(1, True, 0.0, np.arange(NPAGES, dtype=np.uint32), pages, None, b"x"))
    assert header_of(fr[1])["codec"] == "none"
    zeros = np.zeros((NPAGES, PS), np.uint8)
    fr = list(enc.checkpoint(1, True, 0.0, np.arange(NPAGES, dtype=np.uint32), zeros, None, b"x"))
    assert header_of(fr[1])["codec"] == "zstd"


def test_frame_sequence_shape():
    frames, sent = make_stream(n_ckpt=1, batch=10)
    kinds = [header_of(f)["t"] for f in frames]
    assert kinds == ["hello", "begin", "pages", "pages", "pages", "pages", "device", "end"]
    end = header_of(frames[-1])
    assert end["pages"] == NPAGES and end["epoch"] == 1
    exp = sent[0]
    assert end["checksum"] == checkpoint_checksum(
        1, True, exp.taken_at, exp.indices, exp.pages, exp.device_state, batches=[10, 10, 10, 2]
    )


def test_xor_uses_staged_but_unacked_checkpoint():
    """The whole session in one receive call: later xor frames must be decoded
    against checkpoints staged in the same call, before the daemon committed."""
    frames, sent = make_stream(seed=9, n_ckpt=5, xor=True)
    d = Daemon(read_only_previous=True)  # overlay must copy, never write into it
    d.feed(b"".join(frames))
    assert len(d.staged) == 5
    for sc, exp in zip(d.staged, sent):
        assert_same(sc, exp)


def test_ack_order_and_misuse():
    frames, _ = make_stream(n_ckpt=3)
    d = Daemon(auto_ack=False)
    d.feed(b"".join(frames))
    assert [sc.epoch for sc in d.staged] == [1, 2, 3]
    with pytest.raises(ValueError, match="awaiting an ack is epoch 1"):
        d.proto.ack(2)
    assert header_of(d.proto.ack(1)) == {"t": "ack", "epoch": 1}
    assert header_of(d.proto.ack(2))["epoch"] == 2
    d.proto.ack(3)
    with pytest.raises(ValueError, match="no staged checkpoint"):
        d.proto.ack(3)


# --------------------------------------------------------------------------
# Primary protocol


def welcome(session=SESSION, version=PROTOCOL_VERSION) -> bytes:
    return frame({"t": "welcome", "version": version, "session": session, "generation": 1})


def ack(epoch) -> bytes:
    return frame({"t": "ack", "epoch": epoch})


def test_primary_acks_in_order():
    p = PrimaryProtocol(SESSION)
    p.sent(1)
    p.sent(2)
    data = welcome() + ack(1) + ack(2)
    events = []
    for i in range(len(data)):
        events += p.receive(data[i : i + 1])
    assert events == [Welcome(SESSION, 1), Acked(1), Acked(2)]
    assert p.outstanding == ()
    p.close()


@pytest.mark.parametrize(
    "setup, data, message",
    [
        ([1], ack(1), "before the backup's welcome"),
        ([], welcome() + ack(1), "no checkpoint is awaiting an ack"),
        ([1, 2], welcome() + ack(2), "oldest unacknowledged checkpoint sent is epoch 1"),
        ([1], welcome() + ack(1) + ack(1), "no checkpoint is awaiting"),
        ([], welcome(session="f" * 32), "welcome is for session"),
        ([], welcome(version=7), f"peer speaks protocol version 7, this primary speaks {PROTOCOL_VERSION}"),
        ([], welcome() + welcome(), "second welcome"),
        ([], frame({"t": "bogus"}), "unknown message type 'bogus'"),
        ([], frame({"t": "begin", "epoch": 1, "full": True, "taken_at": 0.0, "disk_synced": False, "precopy": False}), "never sent by a backup"),
        ([], frame({"t": "reject", "reason": "x", "generation": 1}) + welcome(), "after the backup rejected"),
        ([], welcome() + frame({"t": "reject", "reason": "x", "generation": 1}), "after it welcomed"),
        ([], welcome() + frame({"t": "ack", "epoch": "1"}), "'epoch' must be a int"),
        ([], frame({"t": "welcome", "version": PROTOCOL_VERSION,
                                             "session": SESSION, "generation": 0}, b"x"), "must not carry a payload"),
    ],
)
def test_primary_errors(setup, data, message):
    p = PrimaryProtocol(SESSION)
    for e in setup:
        p.sent(e)
    with pytest.raises(ProtocolError, match=message):
        p.receive(data)
    assert p.state == "failed"
    with pytest.raises(ProtocolError, match="unusable"):
        p.receive(welcome())


def test_primary_rejected_event():
    p = PrimaryProtocol(SESSION)
    reject = frame({"t": "reject", "reason": "configs differ", "generation": 3})
    assert p.receive(reject) == [Rejected("configs differ", 3)]
    assert p.state == "rejected"


def test_primary_sent_validation_and_close():
    p = PrimaryProtocol(SESSION)
    p.sent(3)
    with pytest.raises(ValueError):
        p.sent(3)
    with pytest.raises(ValueError):
        p.sent(0)
    with pytest.raises(ValueError):
        PrimaryProtocol("nothex")
    p.receive(welcome()[:5])
    with pytest.raises(ProtocolError, match="middle of a frame"):
        p.close()


# --------------------------------------------------------------------------
# Encoder argument validation


def test_encoder_validation():
    enc = CheckpointEncoder(PS)
    idx = np.array([1, 3], dtype=np.uint32)
    pages = np.zeros((2, PS), np.uint8)
    with pytest.raises(ValueError, match="strictly increasing"):
        enc.checkpoint(2, False, 0.0, idx[::-1], pages, None, b"d")
    with pytest.raises(ValueError, match="strictly increasing"):
        enc.checkpoint(2, False, 0.0, np.array([1, 1], np.uint32), pages, None, b"d")
    with pytest.raises(ValueError, match="new_pages"):
        enc.checkpoint(2, False, 0.0, idx, pages[:1], None, b"d")
    with pytest.raises(ValueError, match="new_pages"):
        enc.checkpoint(2, False, 0.0, idx, pages.astype(np.int16), None, b"d")
    with pytest.raises(ValueError, match="previous_pages"):
        enc.checkpoint(2, False, 0.0, idx, pages, pages[:1], b"d")
    with pytest.raises(ValueError, match="must not use xor"):
        enc.checkpoint(1, True, 0.0, np.arange(2, dtype=np.uint32), pages, pages, b"d")
    with pytest.raises(ValueError, match="every page"):
        enc.checkpoint(1, True, 0.0, idx, pages, None, b"d")
    with pytest.raises(ValueError, match="device_state"):
        enc.checkpoint(2, False, 0.0, idx, pages, None, b"")
    with pytest.raises(ValueError, match="epoch"):
        enc.checkpoint(0, False, 0.0, idx, pages, None, b"d")
    with pytest.raises(ValueError, match="finite"):
        enc.checkpoint(2, False, float("nan"), idx, pages, None, b"d")
    with pytest.raises(ValueError, match="session"):
        enc.hello(FP, "abc", RAM)
    with pytest.raises(ValueError, match="multiple"):
        enc.hello(FP, SESSION, RAM + 1)
    with pytest.raises(ValueError, match="compression"):
        CheckpointEncoder(PS, "lz4")


# --------------------------------------------------------------------------
# Backup rejections. Each builds a session whose stream is broken in one way
# and checks that the error names the problem and nothing is staged for it.

ALL = np.arange(NPAGES, dtype=np.uint32)
RNG = np.random.default_rng(42)
FULL_PAGES = RNG.integers(0, 256, (NPAGES, PS), dtype=np.uint8)


# The helpers take a new encoder unless given one: an encoder belongs to one session
# (its device frames are deltas against its previous one), so tests must not share one.
def full_frames(epoch=1, enc=None, batch=8, device=b"dev", taken_at=5.0) -> list[bytes]:
    enc = enc or CheckpointEncoder(PS)
    return list(enc.checkpoint(epoch, True, taken_at, ALL, FULL_PAGES, None, device, batch_pages=batch))


def incr_frames(epoch=2, idx=(1, 5, 9), xor=True, enc=None, batch=8) -> list[bytes]:
    enc = enc or CheckpointEncoder(PS)
    idx = np.array(idx, dtype=np.uint32)
    new = FULL_PAGES[idx] ^ np.uint8(0x5A)
    prev = FULL_PAGES[idx] if xor else None
    return list(enc.checkpoint(epoch, False, 6.0, idx, new, prev, b"dev2", batch_pages=batch))


def expect_reject(frames: list[bytes], message: str, staged_before: int = 0) -> Daemon:
    d = opened()
    with pytest.raises(ProtocolError, match=message) as info:
        for f in frames:
            d.feed(f)
    assert len(d.staged) == staged_before
    assert d.proto.state == "failed"
    assert info.value.reply is None  # not a handshake problem
    with pytest.raises(ProtocolError, match="unusable"):
        d.proto.receive(b"")
    return d


def patch_pages(data: bytes, idx=None, encoded=None, **changes) -> bytes:
    """Rebuild a pages frame with other indices/encoded data/header fields."""
    f = FrameDecoder().feed(data)[0]
    h = dict(f.header)
    count = h["count"]
    old_idx, old_enc = f.payload[: 4 * count], f.payload[4 * count :]
    if idx is not None:
        old_idx = np.array(idx, dtype="<u4").tobytes()
    if encoded is not None:
        old_enc = encoded
    h.update(changes)
    return encode_frame_parts(h, old_idx, old_enc)


def test_first_checkpoint_must_be_full():
    expect_reject(incr_frames(epoch=1), "first checkpoint of a session must be full")


def test_epoch_must_follow():
    expect_reject(full_frames(1) + incr_frames(3), "epoch 3 does not follow the last staged epoch 1", 1)
    expect_reject(full_frames(1) + incr_frames(1), "epoch 1 does not follow", 1)
    expect_reject(full_frames(5) + full_frames(5), "epoch 5 does not follow", 1)


def test_epoch_zero():
    f = full_frames(1)
    expect_reject([retype(f[0], epoch=0)] + f[1:], "epoch 0 is out of range")


def test_full_must_not_use_xor():
    f = full_frames()
    expect_reject([f[0], retype(f[1], xor=True)] + f[2:], "full checkpoint must not use xor")


def test_full_must_cover_every_page():
    f = full_frames(batch=8)  # begin, 4 pages frames, device, end
    # dropping the last pages frame
    expect_reject(f[:4] + f[5:], "end says 32 pages, 24 were received")
    # and lying about the count in end too
    expect_reject(f[:4] + f[5:6] + [retype(f[6], pages=24)], "full checkpoint has 24 of the guest's 32 pages")
    # skipping pages
    expect_reject([f[0], f[2]], "full checkpoint must send pages 0..31 in order")


def test_page_index_beyond_ram():
    f = incr_frames()
    expect_reject(full_frames() + [f[0], patch_pages(f[1], idx=[1, 5, NPAGES])] + f[2:],
                  f"page index {NPAGES} is beyond the guest's {NPAGES} pages", 1)


def test_indices_not_increasing_within_frame():
    f = incr_frames()
    expect_reject(full_frames() + [f[0], patch_pages(f[1], idx=[5, 1, 9])], "not strictly increasing", 1)
    expect_reject(full_frames() + [f[0], patch_pages(f[1], idx=[1, 1, 9])], "not strictly increasing", 1)


def test_indices_not_increasing_across_frames():
    f = incr_frames(idx=(1, 5, 9, 12), batch=2)  # begin, pages(1,5), pages(9,12), device, end
    expect_reject(full_frames() + [f[0], f[2], f[1]], "page index 1 does not follow the previous frame's last index 12", 1)
    expect_reject(full_frames() + [f[0], f[1], f[1]], "page index 1 does not follow", 1)


def test_pages_count_vs_payload():
    f = incr_frames()
    short = encode_frame(header_of(f[1]) | {"count": 20, "raw_len": 20 * PS}, b"\x00" * 20)
    expect_reject(full_frames() + [f[0], short], "count 20 needs 80 index bytes, the payload has only 20", 1)
    expect_reject(full_frames() + [f[0], retype(f[1], count=NPAGES + 1)], "count 33 is out of range", 1)
    expect_reject(full_frames() + [f[0], retype(f[1], count=0)], "count 0 is out of range", 1)


def test_raw_len_must_match():
    f = incr_frames()
    expect_reject(full_frames() + [f[0], retype(f[1], raw_len=3 * PS + 1)], "raw_len 193 is not count\\*page_size = 192", 1)


def test_raw_len_bounded_by_max_payload():
    d = Daemon(max_payload=1024)
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    f = full_frames(batch=32)  # one pages frame of 2048 raw bytes
    with pytest.raises(ProtocolError):
        for x in f:
            d.feed(x)
    assert not d.staged
    # the same stream with small batches is fine under that limit
    d = Daemon(max_payload=1024)
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    for x in full_frames(batch=8):
        d.feed(x)
    assert len(d.staged) == 1


def test_decoded_size_limit_even_if_frame_is_small():
    # 16 zero pages compress to a few bytes; raw_len 1024 > max_payload 512
    zeros = np.zeros((NPAGES, PS), np.uint8)
    f = list(CheckpointEncoder(PS).checkpoint(1, True, 0.0, ALL, zeros, None, b"d", batch_pages=16))
    d = Daemon(max_payload=512)
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    d.feed(f[0])
    with pytest.raises(ProtocolError, match="raw_len 1024 exceeds the decoded-size limit of 512"):
        d.feed(f[1])


def test_zstd_declared_size_mismatch():
    idx = [1, 5, 9]
    f = incr_frames(idx=idx, xor=False)
    other = zstandard.ZstdCompressor().compress(b"\x00" * (2 * PS))
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=other, codec="zstd")],
                  "zstd frame declares 128 bytes, raw_len says 192", 1)


def test_zstd_without_content_size():
    f = incr_frames(xor=False)
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * (3 * PS))
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=blob, codec="zstd")],
                  "zstd frame declares no size", 1)


def test_zstd_forged_content_size_does_not_blow_up():
    f = incr_frames(xor=False)
    blob = bytearray(zstandard.ZstdCompressor().compress(b"\x00" * 100_000))
    # overwrite the 4-byte frame content size field with 3*PS (the frame
    # really holds 100000 bytes): decoding must stop at the declared size
    fhd = blob[4]
    assert fhd >> 6 == 2  # 4-byte content size field
    at = 5 if (fhd >> 5) & 1 else 6  # single-segment frames have no window byte
    blob[at : at + 4] = (3 * PS).to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(blob)) == 3 * PS
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=bytes(blob), codec="zstd")],
                  "zstd data is corrupt", 1)


def test_zstd_corrupt_and_trailing_data():
    f = incr_frames(xor=False)
    good = zstandard.ZstdCompressor().compress(np.random.default_rng(0).bytes(3 * PS))
    header_size = zstandard.frame_header_size(good)
    bad = bytearray(good)
    bad[header_size] |= 0b110  # first block: reserved block type
    bad = bytes(bad)
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=bad, codec="zstd")], "zstd", 1)
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=good[:-3], codec="zstd")], "zstd", 1)
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=good + b"junk", codec="zstd")],
                  "stray bytes after the zstd frame", 1)
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=b"notzstd", codec="zstd")],
                  "not a zstd frame", 1)


def test_unknown_codec_and_raw_length():
    f = incr_frames(enc=CheckpointEncoder(PS, "none"), xor=False)
    expect_reject(full_frames() + [f[0], retype(f[1], codec="lz4")], "unknown codec 'lz4'", 1)
    expect_reject(full_frames() + [f[0], patch_pages(f[1], encoded=b"\x00" * (3 * PS - 1))],
                  "uncompressed data is 191 bytes, raw_len says 192", 1)


def test_device_frame_rules():
    f = full_frames()  # begin, pages x4, device, end
    expect_reject(f[:5] + f[6:], "no device frame")
    expect_reject(f[:6] + f[5:6], "second device frame")
    expect_reject(f[:2] + f[5:6] + f[2:5], "pages after the device frame")
    expect_reject(f[:5] + [retype(f[5], raw_len=0)] + f[6:], "raw_len 0 is out of range")
    expect_reject(f[:5] + [retype(f[5], raw_len=4)] + f[6:], "raw_len says 4")


def test_end_checks():
    f = full_frames()
    expect_reject(f[:6] + [retype(f[6], epoch=2)], "end frame is for epoch 2")
    expect_reject(f[:6] + [retype(f[6], pages=31)], "end says 31 pages, 32 were received")
    expect_reject(f[:6] + [retype(f[6], checksum="0" * 32)], "checksum mismatch")


def test_corrupted_page_data_caught_by_checksum():
    f = incr_frames(enc=CheckpointEncoder(PS, "none"), xor=False)
    h = FrameDecoder().feed(f[1])[0]
    payload = bytearray(h.payload)
    payload[-1] ^= 1
    expect_reject(full_frames() + [f[0], encode_frame(h.header, bytes(payload))] + f[2:], "checksum mismatch", 1)


def test_corrupted_metadata_caught_by_checksum():
    f = full_frames()
    expect_reject([retype(f[0], taken_at=6.0)] + f[1:], "checksum mismatch")
    g = full_frames(epoch=2)
    expect_reject(full_frames() + [retype(g[0], full=False)] + g[1:], "checksum mismatch", 1)


def test_xor_flag_flip_caught():
    f = incr_frames(xor=True)
    expect_reject(full_frames() + [f[0], retype(f[1], xor=False)] + f[2:], "checksum mismatch", 1)


@pytest.mark.parametrize(
    "bad, message",
    [
        (frame({"t": "nope"}), "unknown message type 'nope'"),
        (frame({"t": "ack", "epoch": 1}), "never sent by a primary"),
        (frame({"t": "welcome", "version": PROTOCOL_VERSION,
                                             "session": SESSION, "generation": 0}), "never sent by a primary"),
        (frame({"t": "begin", "epoch": 2, "full": 1, "taken_at": 1.0, "disk_synced": False, "precopy": False}), "'full' must be a bool"),
        (frame({"t": "begin", "epoch": True, "full": False, "taken_at": 1.0, "disk_synced": False, "precopy": False}), "'epoch' must be a int"),
        (frame({"t": "begin", "epoch": 2.0, "full": False, "taken_at": 1.0, "disk_synced": False, "precopy": False}), "'epoch' must be a int"),
        (frame({"t": "begin", "epoch": 2, "full": False, "taken_at": "now", "disk_synced": False, "precopy": False}), "'taken_at' must be a finite float"),
        (frame({"t": "begin", "epoch": 2, "full": False, "taken_at": float("inf"), "disk_synced": False, "precopy": False}), "finite float"),
        (frame({"t": "begin", "epoch": 2, "full": False}), "missing the field 'taken_at'"),
        (frame({"t": "begin", "epoch": 2, "full": False, "taken_at": 1.0, "disk_synced": False, "precopy": False, "x": 0}), r"unknown field\(s\) \['x'\]"),
        (frame({"t": "begin", "epoch": 2, "full": False, "taken_at": 1.0, "disk_synced": False, "precopy": False}, b"p"), "must not carry a payload"),
        (frame({"t": "bye", "reason": 5}), "'reason' must be a str"),
        (frame({"t": "pages", "count": 1, "codec": "none", "xor": False, "raw_len": PS}, b"\0" * (PS + 4)),
         "'pages' message outside a checkpoint"),
        (frame({"t": "end", "epoch": 2, "pages": 0, "checksum": ""}), "outside a checkpoint"),
    ],
)
def test_bad_messages_after_handshake(bad, message):
    expect_reject(full_frames() + [bad], message, 1)


def test_begin_inside_checkpoint():
    f = full_frames()
    expect_reject(f[:3] + incr_frames(2)[:1], "begin of epoch 2 while checkpoint 1 is still open")


def test_oversized_frame_rejected_before_body():
    d = Daemon(max_payload=4096)
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    with pytest.raises(ProtocolError, match="exceeds the limit of 4096"):
        d.feed(struct.pack(">II", 10, 4097))


def test_bye_idle_and_mid_checkpoint():
    enc = CheckpointEncoder(PS)
    d = opened()
    for f in full_frames():
        d.feed(f)
    d.feed(enc.bye("operator stop"))
    assert d.events[-1] == PeerBye("operator stop")
    assert d.proto.state == "bye"
    d.proto.close()

    d = opened()
    f = full_frames()
    for x in f[:3]:
        d.feed(x)
    d.feed(enc.bye("shutting down"))
    assert d.events[-1] == PeerBye("shutting down")
    assert not d.staged
    d.proto.close()  # the partial checkpoint was abandoned on purpose: no error

    d = opened()
    d.feed(enc.bye("x"))
    with pytest.raises(ProtocolError, match="'begin' message after bye"):
        d.feed(f[0])


def test_close_truncation():
    f = full_frames()
    d = opened()
    for x in f[:3]:
        d.feed(x)
    with pytest.raises(ProtocolError, match="stream ended inside checkpoint 1 .*discarded"):
        d.proto.close()
    assert d.proto.state == "closed" and not d.staged

    d = opened()
    d.feed(b"".join(f[:3]) + f[3][:10])
    with pytest.raises(ProtocolError, match="middle of a frame.*checkpoint 1, which was discarded"):
        d.proto.close()

    d = opened()
    for x in f:
        d.feed(x)
    d.proto.close()  # clean end between checkpoints
    with pytest.raises(ProtocolError, match="after close"):
        d.proto.receive(b"")

    d = Daemon()
    d.proto.close()  # EOF before hello: nothing to complain about


def test_read_previous_contract_checked():
    d = Daemon()
    d.proto._read_previous = lambda idx: np.zeros((len(idx), PS + 1), np.uint8)
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    for x in full_frames():
        d.feed(x)
    d.proto._unacked.clear()
    f = incr_frames(xor=True)
    d.feed(f[0])
    with pytest.raises(TypeError, match="read_previous must return"):
        d.feed(f[1])
    assert d.proto.state == "failed"


# --------------------------------------------------------------------------
# Hypothesis properties

scenario = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "n_ckpt": st.integers(1, 4),
        "compression": st.sampled_from(["zstd", "none"]),
        "xor": st.booleans(),
        "batch": st.integers(1, 40),
    }
)


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario, st.data())
def test_property_any_split_same_checkpoints(params, data):
    frames, sent = make_stream(**params)
    stream = b"".join(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    d = Daemon()
    for piece in split(stream, cuts):
        d.feed(piece)
    d.proto.close()
    assert len(d.staged) == len(sent)
    for sc, exp in zip(d.staged, sent):
        assert_same(sc, exp)


MUTATIONS = ["flip", "truncate", "drop", "dup", "swap", "flip+truncate", "move"]


def mutate(frames: list[bytes], kind: str, data) -> bytes:
    frames = list(frames)
    n = len(frames)
    if kind == "drop":
        del frames[data.draw(st.integers(0, n - 1))]
    elif kind == "dup":
        i = data.draw(st.integers(0, n - 1))
        frames.insert(data.draw(st.integers(0, n)), frames[i])
    elif kind == "swap":
        i = data.draw(st.integers(0, n - 2))
        j = data.draw(st.integers(i + 1, n - 1))
        frames[i], frames[j] = frames[j], frames[i]
    elif kind == "move":
        f = frames.pop(data.draw(st.integers(0, n - 1)))
        frames.insert(data.draw(st.integers(0, n - 1)), f)
    stream = bytearray(b"".join(frames))
    if "flip" in kind:
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(stream) - 1))
            stream[pos] ^= data.draw(st.integers(1, 255))
    if "truncate" in kind:
        del stream[data.draw(st.integers(0, len(stream) - 1)) :]
    return bytes(stream)


def run_damaged(stream: bytes, cuts, sent: list[Sent]) -> list[StagedCheckpoint]:
    d = Daemon(max_payload=64 * 1024)
    try:
        for piece in split(stream, cuts):
            d.feed(piece)
        d.proto.close()
    except ProtocolError:
        pass
    # never a wrong checkpoint: what was staged is a prefix of what was sent
    assert [sc.epoch for sc in d.staged] == list(range(1, len(d.staged) + 1))
    for sc in d.staged:
        assert_same(sc, sent[sc.epoch - 1])
    return d.staged


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario, st.sampled_from(MUTATIONS), st.data())
def test_property_damaged_stream_never_stages_wrong_data(params, kind, data):
    frames, sent = make_stream(**params)
    stream = mutate(frames, kind, data)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=5))
    run_damaged(stream, cuts, sent)


def test_every_single_byte_corruption_and_truncation():
    """Exhaustive over a small stream: no position where damage goes unnoticed.

    Every flipped byte is refused (a ProtocolError from receive() or close())
    and the checkpoint it lies in is never staged. Every truncation stages
    exactly the checkpoints completed before the cut; close() accepts the cut
    only at a checkpoint boundary (after hello or an end frame) and raises
    everywhere else.
    """
    frames, sent = make_stream(seed=11, n_ckpt=2, npages=8, ps=16, batch=3,
                               compression="zstd", xor=True)
    stream = b"".join(frames)

    def run(s):
        """(error raised by receive, error raised by close, staged epochs)."""
        d = Daemon(ps=16, npages=8)
        fed_err = closed_err = None
        try:  # frame by frame as a socket might deliver them, event by event
            for piece in split(s, ends):
                for ev in d.proto.events(piece):
                    if isinstance(ev, CheckpointStaged):
                        d.staged.append(ev.checkpoint)
                        d.proto.ack(ev.checkpoint.epoch)
        except ProtocolError as exc:
            fed_err = exc
        if fed_err is None:
            try:
                d.proto.close()
            except ProtocolError as exc:
                closed_err = exc
        for sc in d.staged:
            assert_same(sc, sent[sc.epoch - 1])
        return fed_err, closed_err, [sc.epoch for sc in d.staged]

    # where each frame ends, and which checkpoint (0 = the handshake) it belongs to
    ends = []
    clean_cuts = {0: 0}  # cut position -> checkpoints complete before it
    owner = []  # per byte: the epoch of the checkpoint it carries (0 = hello)
    pos, epoch = 0, 0
    for f in frames:
        t = header_of(f)["t"]
        if t == "begin":
            epoch = header_of(f)["epoch"]
        owner += [epoch] * len(f)
        pos += len(f)
        ends.append(pos)
        if t in ("hello", "end"):
            clean_cuts[pos] = epoch
    assert len(owner) == len(stream)
    assert sorted(clean_cuts.values()) == [0, 0, 1, 2]  # the stream has what we think

    for i in range(len(stream)):
        damaged = bytearray(stream)
        damaged[i] ^= 0xA5
        fed_err, closed_err, staged = run(bytes(damaged))
        assert fed_err is not None or closed_err is not None, f"flipped byte {i} went unnoticed"
        assert staged == list(range(1, owner[i])), (
            f"flipped byte {i} (checkpoint {owner[i]}): staged {staged}")

    for i in range(len(stream) + 1):
        fed_err, closed_err, staged = run(stream[:i])
        assert fed_err is None, f"cut at {i}: receive() refused a clean prefix: {fed_err}"
        complete = max(n for cut, n in clean_cuts.items() if cut <= i)
        assert staged == list(range(1, complete + 1)), f"cut at {i}: staged {staged}"
        if i in clean_cuts:
            assert closed_err is None, f"cut at boundary {i}: close() raised {closed_err}"
        else:
            assert closed_err is not None, f"cut at {i} (inside a frame or checkpoint): close() was silent"


def test_full_checkpoint_128mib_is_fast():
    ps, npages = 4096, 32768
    rng = np.random.default_rng(0)
    ram = np.zeros((npages, ps), np.uint8)  # a plausible guest: mostly zero,
    ram[::4] = rng.integers(0, 256, (npages // 4, ps), dtype=np.uint8)  # some random,
    ram[1::4, :200] = 7  # some nearly empty
    enc = CheckpointEncoder(ps)
    proto = BackupProtocol(FP, npages * ps, ps, lambda idx: None)
    proto.receive(enc.hello(FP, SESSION, npages * ps))
    best = float("inf")
    for epoch in (1, 2, 3):  # best of three: the first one also pays for page faults
        start = time.perf_counter()
        staged = []
        for f in enc.checkpoint(epoch, True, 1.0, np.arange(npages, dtype=np.uint32), ram, None, b"dev"):
            staged += proto.receive(f)
        best = min(best, time.perf_counter() - start)
        sc = staged[-1].checkpoint
        assert np.array_equal(sc.pages, ram)
        proto.ack(epoch)
    print(f"128 MiB full checkpoint encode+decode: {best:.3f} s")
    assert best < 1.5, best


# --------------------------------------------------------------------------
# Input frames and generations


ETH = [bytes([i]) * 60 for i in range(1, 4)]


def test_input_roundtrip_between_and_inside_checkpoints():
    frames, _ = make_stream(n_ckpt=2)
    enc = CheckpointEncoder(PS)
    d = Daemon()
    d.feed(frames[0])  # hello
    d.feed(enc.input(0, ETH[:1]))
    d.feed(frames[1])  # begin of epoch 1
    d.feed(enc.input(1, ETH[1:], nic=1))  # after the barrier of 1, before its end, NIC 1
    for f in frames[2:]:
        d.feed(f)
    inputs = [e for e in d.events if isinstance(e, InputReceived)]
    assert [(e.after_epoch, e.nic, e.frames) for e in inputs] == [(0, 0, ETH[:1]), (1, 1, ETH[1:])]
    assert len(d.staged) == 2  # input never disturbs the checkpoints around it


@pytest.mark.parametrize("after, payload, message", [
    (5, struct.pack("<I", 60) + b"x" * 60, "input after epoch 5: expected 0..1"),
    (0, struct.pack("<I", 60) + b"x" * 59, "bad length 60"),
    (0, b"\x05\x00\x00\x00" + b"x" * 5, "bad length 5"),
    (0, struct.pack("<I", 60) + b"x" * 60 + b"tail", "4 bytes after the last"),
])
def test_bad_input_is_refused(after, payload, message):
    d = opened()
    with pytest.raises(ProtocolError, match=message):
        d.feed(frame({"t": "input", "after_epoch": after, "count": 1, "nic": 0}, payload))


def test_input_epochs_never_go_back():
    d = opened()
    enc = CheckpointEncoder(PS)
    frames, _ = make_stream(n_ckpt=1)
    for f in frames[1:]:
        d.feed(f)
    d.feed(enc.input(2, ETH[:1]))
    with pytest.raises(ProtocolError, match="expected 2..2"):
        d.feed(enc.input(1, ETH[:1]))


def test_input_encoder_validation():
    enc = CheckpointEncoder(PS)
    with pytest.raises(ValueError):
        enc.input(0, [])
    with pytest.raises(ValueError):
        enc.input(0, [b"short"])
    with pytest.raises(ValueError):
        enc.input(0, ETH[:1], nic=8)


def test_input_for_a_nic_out_of_range_is_refused():
    d = opened()
    with pytest.raises(ProtocolError, match="NIC 9 is out of range"):
        d.feed(frame({"t": "input", "after_epoch": 0, "count": 1, "nic": 9},
                     struct.pack("<I", 60) + b"x" * 60))


def test_stale_generation_is_rejected_with_the_known_generation():
    d = Daemon()
    d.proto.generation = 3  # a failover to generation 3 happened
    with pytest.raises(ProtocolError, match="stale primary: .* generation 2") as info:
        d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM, generation=2))
    assert PrimaryProtocol(SESSION).receive(info.value.reply)[0].generation == 3
    d = Daemon()
    d.proto.generation = 3
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM, generation=3))
    assert PrimaryProtocol(SESSION).receive(d.events[1].data) == [Welcome(SESSION, 3)]


# --------------------------------------------------------------------------
# Pre-copy rounds


def _pages(rng, n):
    return rng.integers(0, 256, (n, PS), dtype=np.uint8)


def test_precopy_rounds_then_an_incremental_first_checkpoint():
    rng = np.random.default_rng(5)
    enc = CheckpointEncoder(PS)
    d = opened()
    ram = _pages(rng, NPAGES)
    frames = list(enc.checkpoint(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), ram, None, b"",
                                 precopy=True))
    idx = np.array([3, 7], dtype=np.uint32)
    new = _pages(rng, 2)
    frames += enc.checkpoint(2, False, 2.0, idx, new, ram[idx], b"", precopy=True)
    ram[idx] = new
    idx2 = np.array([7], dtype=np.uint32)
    new2 = _pages(rng, 1)
    frames += enc.checkpoint(3, False, 3.0, idx2, new2, ram[idx2], b"device")
    ram[idx2] = new2
    for f in frames:
        d.feed(f)
    assert [(s.epoch, s.precopy, s.device_state) for s in d.staged] == \
        [(1, True, b""), (2, True, b""), (3, False, b"device")]
    assert np.array_equal(d.replica, ram)


def test_precopy_after_the_first_consistent_checkpoint_is_refused():
    enc = CheckpointEncoder(PS)
    frames, _ = make_stream(n_ckpt=1)
    d = Daemon()
    for f in frames:
        d.feed(f)
    late = enc.checkpoint(2, False, 2.0, np.array([1], np.uint32), np.zeros((1, PS), np.uint8),
                          None, b"", precopy=True)
    with pytest.raises(ProtocolError, match="pre-copy round 2 after the first consistent"):
        d.feed(next(late))


def test_precopy_round_must_not_carry_device_state():
    enc = CheckpointEncoder(PS)
    with pytest.raises(ValueError, match="no device state"):
        enc.checkpoint(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32),
                       np.zeros((NPAGES, PS), np.uint8), None, b"dev", precopy=True)
    d = opened()
    d.feed(frame({"t": "begin", "epoch": 1, "full": True, "taken_at": 1.0, "disk_synced": False,
                  "precopy": True}))
    with pytest.raises(ProtocolError, match="carries no device state"):
        d.feed(frame({"t": "device", "codec": "none", "raw_len": 3, "delta": False}, b"dev"))


def test_precopy_flag_is_covered_by_the_checksum():
    idx, pages = np.arange(NPAGES, dtype=np.uint32), np.zeros((NPAGES, PS), np.uint8)
    frames = list(CheckpointEncoder(PS).checkpoint(1, True, 1.0, idx, pages, None, b"",
                                                   precopy=True))
    sent = header_of(frames[-1])["checksum"]
    assert sent == checkpoint_checksum(1, True, 1.0, idx, pages, b"", precopy=True)
    # A round whose flag were flipped in transit would not verify.
    assert sent != checkpoint_checksum(1, True, 1.0, idx, pages, b"", precopy=False)


# --------------------------------------------------------------------------
# Hostile headers: nesting


def _nested_frame(t: bytes, field: bytes, rest: dict) -> bytes:
    """A frame whose header has type `t`, the field `field` holding a list nested 1000
    deep, and the fields of `rest` (msgpack would refuse to pack such a list)."""
    body = msgpack.packb(rest)[1:] if rest else b""
    raw = (bytes([0x82 + len(rest)]) + b"\xa1t" + bytes([0xa0 + len(t)]) + t
           + bytes([0xa0 + len(field)]) + field + b"\x91" * 1000 + b"\xc0" + body)
    return struct.pack(">II", len(raw), 0) + raw


def test_deeply_nested_hello_is_refused_with_a_reject():
    d = Daemon()
    with pytest.raises(ProtocolError, match="nests lists or maps") as info:
        d.feed(_nested_frame(b"hello", b"version", {}))
    assert header_of(info.value.reply)["t"] == "reject"
    assert d.proto.state == "failed"


def test_deeply_nested_reject_is_a_protocol_error_for_the_primary():
    p = PrimaryProtocol(SESSION)
    with pytest.raises(ProtocolError, match="nests lists or maps"):
        p.receive(_nested_frame(b"reject", b"reason", {"generation": 1}))
    assert p.state == "failed"


# --------------------------------------------------------------------------
# Before the handshake: the first frame is judged on its header


def _header_only(header: dict, payload_len: int) -> bytes:
    """A frame's prefix and header, announcing `payload_len` bytes that never follow."""
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">II", len(packed), payload_len) + packed


@pytest.mark.parametrize("header, payload_len, message", [
    (None, 64 << 20, "hello with a payload of 67108864 bytes"),
    (None, (64 << 10) + 1, "hello with a payload of 65537 bytes"),
    ({"t": "begin", "epoch": 1, "full": True, "taken_at": 0.0, "disk_synced": False,
      "precopy": False}, 0, "first message must be 'hello', got 'begin'"),
    ({"t": "pages", "count": 1, "codec": "none", "xor": False, "raw_len": PS}, 1 << 20,
     "first message must be 'hello', got 'pages'"),
    ({"t": "bogus"}, 32 << 20, "first message must be 'hello', got 'bogus'"),
])
def test_first_frame_is_refused_on_its_header_before_its_payload(header, payload_len, message):
    """Over plain TCP anyone may connect: a 64 MiB 'hello', or any other frame, must not
    make the backup read (and hold) its payload before the handshake."""
    if header is None:
        header = FrameDecoder().feed(hello_frame())[0].header
    d = Daemon()
    with pytest.raises(ProtocolError, match=message) as info:
        d.feed(_header_only(header, payload_len))
    assert header_of(info.value.reply)["t"] == "reject"
    assert d.proto.state == "failed"


def test_a_hello_with_a_small_payload_is_still_read_and_refused():
    d = Daemon()
    with pytest.raises(ProtocolError, match="must not carry a payload"):
        d.feed(frame(FrameDecoder().feed(hello_frame())[0].header, b"x" * 100))


def test_after_the_hello_big_frames_are_welcome_even_in_the_same_read():
    frames, sent = make_stream(n_ckpt=1, batch=64, ps=4096, npages=64, compression="none")
    assert max(len(f) for f in frames) > 64 << 10
    d = Daemon(ps=4096, npages=64)
    d.feed(b"".join(frames))  # the hello and a full checkpoint in one piece
    staged = [e.checkpoint for e in d.events if isinstance(e, CheckpointStaged)]
    assert len(staged) == 1
    assert_same(staged[0], sent[0])


# --------------------------------------------------------------------------
# A reject claiming a newer generation: only an authenticated backup supersedes


@pytest.mark.parametrize("authenticated, claimed, supersedes", [
    (True, 5, True),      # TLS: the backup is who it says; a newer holder exists
    (True, 2, False),     # ... not newer than ours: a plain refusal
    (False, 5, False),    # plain TCP: anyone could have sent it
    (False, 99, False),
])
def test_reject_supersedes_only_from_an_authenticated_backup(authenticated, claimed, supersedes):
    p = PrimaryProtocol(SESSION, generation=2, authenticated=authenticated)
    reject = frame({"t": "reject", "reason": "stale primary", "generation": claimed})
    assert p.receive(reject) == [Rejected("stale primary", claimed, supersedes)]
    assert p.state == "rejected"


def test_a_primary_protocol_trusts_no_reject_by_default():
    reject = frame({"t": "reject", "reason": "stale primary", "generation": 9})
    assert not PrimaryProtocol(SESSION).receive(reject)[0].supersedes
    with pytest.raises(ValueError):
        PrimaryProtocol(SESSION, generation=-1)


# --------------------------------------------------------------------------
# The backup protocol at its edges: each bound on both sides, each refusal in
# the words an operator reads, and what the object reports between frames.

import tracemalloc  # noqa: E402

from remus.common.protocol import (DISK_SECTOR, MAX_DISK_SIZE, MAX_INPUT_COUNT,  # noqa: E402
                                   MAX_INPUT_FRAME, MAX_NICS,
                                   MIN_INPUT_FRAME, PagesReceived, PeerHandover)
from remus.common.protocol.messages import HANDSHAKE_MAX_PAYLOAD, MAX_EPOCH  # noqa: E402

EPOCHS = r"1\.\.9223372036854775807"


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((b"fp", RAM, PS), {}, TypeError, r"^fingerprint must be a str$"),
    ((FP, RAM, 0), {}, ValueError, r"^page_size must be >= 1, got 0$"),
    ((FP, PS - 1, PS), {}, ValueError, r"^ram_size must be >= 64, got 63$"),
    ((FP, RAM + 1, PS), {}, ValueError, r"^ram_size 2049 is not a multiple of page_size 64$"),
    ((FP, 2**32 + 1, 1), {}, ValueError, r"^more pages than uint32 page indices can address$"),
    ((FP, RAM, PS), {"generation": -1}, ValueError,
     r"^generation must be in 0\.\.9223372036854775807, got -1$"),
    ((FP, RAM, PS), {"generation": MAX_EPOCH + 1}, ValueError, r"^generation must be in 0\.\."),
])
def test_backup_constructor_names_the_bad_argument(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        BackupProtocol(*args, lambda idx: None, **kwargs)


def test_backup_constructor_edges_and_state_before_the_hello():
    b = BackupProtocol(FP, 2**32, 1, lambda idx: None, generation=MAX_EPOCH)  # every uint32 index
    assert (b.npages, b.generation) == (2**32, MAX_EPOCH)
    assert (b.state, b.session, b.disk_sizes, b.receiving) == ("await-hello", None, (), None)
    d = opened()
    assert (d.proto.state, d.proto.session) == ("idle", SESSION)


@pytest.mark.parametrize("call, message", [
    (lambda b: b.ack(0), rf"^epoch must be in {EPOCHS}, got 0$"),
    (lambda b: b.ack(MAX_EPOCH + 1), rf"^epoch must be in {EPOCHS}, got"),
    (lambda b: b.progress(0, 0), rf"^epoch must be in {EPOCHS}, got 0$"),
    (lambda b: b.progress(MAX_EPOCH + 1, 0), rf"^epoch must be in {EPOCHS}, got"),
    (lambda b: b.progress(1, -1), r"^bytes must be >= 0, got -1$"),
])
def test_ack_and_progress_refuse_arguments_out_of_range(call, message):
    with pytest.raises(ValueError, match=message):
        call(opened().proto)


def test_progress_frames_at_their_edges():
    b = opened().proto
    assert header_of(b.progress(1, 0)) == {"t": "progress", "epoch": 1, "bytes": 0}
    assert header_of(b.progress(MAX_EPOCH, 5))["epoch"] == MAX_EPOCH


def test_a_future_version_hello_is_refused_by_its_version_not_its_fields():
    d = Daemon()
    future = {"t": "hello", "version": PROTOCOL_VERSION + 1, "fingerprint": FP, "flavour": "new"}
    with pytest.raises(ProtocolError, match=rf"^peer speaks protocol version {PROTOCOL_VERSION + 1}, "
                                            rf"this backup speaks {PROTOCOL_VERSION}$") as info:
        d.feed(frame(future))
    assert header_of(info.value.reply)["t"] == "reject"


def test_a_hello_of_exactly_the_handshake_limit_is_read_before_it_is_judged():
    d = Daemon()
    hello = FrameDecoder().feed(hello_frame())[0].header
    with pytest.raises(ProtocolError, match="must not carry a payload"):
        d.feed(frame(hello, b"x" * HANDSHAKE_MAX_PAYLOAD))


def test_hello_disk_sizes_must_be_whole_sectors_up_to_the_limit():
    def hello(size):
        b = BackupProtocol(FP, RAM, PS, lambda idx: None, disks=1)
        return b, b.receive(hello_frame(disk_sizes=[size]))
    for size in (DISK_SECTOR, MAX_DISK_SIZE):
        b, events = hello(size)
        assert events[0] == SessionOpened(SESSION, RAM, PS, (size,)) and b.disk_sizes == (size,)
    for size in (0, MAX_DISK_SIZE + DISK_SECTOR, 1000):
        with pytest.raises(ProtocolError, match=rf"^disk 0: size {size} is not a whole number of "
                                                r"sectors up to 1 PiB$"):
            hello(size)


def test_read_only_media_must_match_one_by_one():
    media = (("a.iso", "1:aa"), ("b.iso", "2:bb"))
    b = BackupProtocol(FP, RAM, PS, lambda idx: None, media=media)
    assert isinstance(b.receive(hello_frame(media=["1:aa", "2:bb"]))[0], SessionOpened)
    b = BackupProtocol(FP, RAM, PS, lambda idx: None, media=media)
    with pytest.raises(ProtocolError, match=r"^read-only medium #2 \(b\.iso on this backup\) differs "
                                            r"between the hosts: primary has size:sha256 2:cc, this "
                                            r"backup 2:bb; copy the same file to both hosts$"):
        b.receive(hello_frame(media=["1:aa", "2:cc"]))


def begin_frame(epoch=1, full=True, disk_synced=False, precopy=False) -> bytes:
    return frame({"t": "begin", "epoch": epoch, "full": full, "taken_at": 1.0,
                  "disk_synced": disk_synced, "precopy": precopy})


@pytest.mark.parametrize("disks, begin, message", [
    (0, begin_frame(disk_synced=True),
     r"^begin: epoch 1 claims a synced disk in a session without one$"),
    (1, begin_frame(disk_synced=True, precopy=True), r"^begin: pre-copy round 1 claims a synced disk$"),
    (0, begin_frame(MAX_EPOCH + 1), rf"^begin: epoch {MAX_EPOCH + 1} is out of range \({EPOCHS}\)$"),
])
def test_begin_refusals_name_the_epoch(disks, begin, message):
    b = BackupProtocol(FP, RAM, PS, lambda idx: None, disks=disks)
    b.receive(hello_frame(disk_sizes=[1 << 20] * disks))
    with pytest.raises(ProtocolError, match=message):
        b.receive(begin)


def test_the_highest_epoch_may_begin_and_receiving_counts_every_payload_byte():
    d = opened()
    d.feed(begin_frame(MAX_EPOCH))
    assert d.proto.receiving == (MAX_EPOCH, 0)
    d = opened()
    f = full_frames()  # begin, 4 pages frames, device, end
    for x in f[:3]:
        d.feed(x)
    payloads = sum(len(FrameDecoder().feed(x)[0].payload) for x in f[1:3])
    assert d.proto.receiving == (1, payloads)


@pytest.mark.parametrize("before, epoch, message", [
    ("nothing", 1, "staged is none"),
    ("full", 2, "staged is 1"),
    ("open", 1, "staged is 1 and a checkpoint is open"),
    ("precopy", 1, "staged is none"),
])
def test_handover_only_right_after_the_last_consistent_checkpoint(before, epoch, message):
    enc = CheckpointEncoder(PS)
    d = opened()
    frames = {"nothing": [], "full": full_frames(), "open": full_frames() + incr_frames()[:2],
              "precopy": list(enc.checkpoint(1, True, 1.0, ALL, FULL_PAGES, None, b"", precopy=True))}
    for f in frames[before]:
        d.feed(f)
    with pytest.raises(ProtocolError, match=rf"^handover after epoch {epoch}, but the last "
                                            rf"consistent checkpoint {message}$"):
        d.feed(enc.handover(epoch, "planned"))


def test_handover_after_the_last_consistent_checkpoint_ends_the_session():
    enc = CheckpointEncoder(PS)
    d = opened()
    for f in full_frames():
        d.feed(f)
    d.feed(enc.handover(1, "planned stop"))
    assert d.events[-1] == PeerHandover(1, "planned stop") and d.proto.state == "bye"
    with pytest.raises(ProtocolError, match="'begin' message after bye"):
        d.feed(incr_frames()[0])


def test_close_after_a_failure_or_a_close_is_silent():
    f = full_frames()
    d = opened()
    with pytest.raises(ProtocolError, match="count 0 is out of range"):
        d.feed(f[0] + f[1] + retype(f[2], count=0) + f[3][:10])  # a frame cut short behind
    assert d.proto.receiving is None
    d.proto.close()  # the failure was reported already; the cut frame is not news
    with pytest.raises(ProtocolError, match=r"^protocol is unusable after an earlier error "
                                            r"\(pages frame in checkpoint 1: count 0 is out"):
        d.proto.receive(b"")
    d = opened()
    d.feed(f[0] + f[1][:10])
    with pytest.raises(ProtocolError, match="middle of a frame"):
        d.proto.close()
    d.proto.close()  # once is enough
    assert d.proto.receiving is None
    with pytest.raises(ProtocolError, match=r"^receive\(\) after close\(\)$"):
        d.proto.receive(b"")
    d = opened()
    with pytest.raises(ProtocolError, match="^second hello in one session$"):
        d.feed(hello_frame())


@pytest.mark.parametrize("previous, message", [
    (lambda idx: np.zeros((len(idx), PS), np.int16), r"got int16 \(3, 64\)$"),
    (lambda idx: [[0] * PS] * len(idx), "got list $"),
])
def test_read_previous_returning_the_wrong_thing_is_named(previous, message):
    d = Daemon()
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    for x in full_frames():
        d.feed(x)
    d.proto._unacked.clear()
    d.proto._read_previous = previous
    f = incr_frames(xor=True)
    d.feed(f[0])
    with pytest.raises(TypeError, match=r"^read_previous must return a uint8 array of shape "
                                        r"\(3, 64\), " + message):
        d.feed(f[1])
    with pytest.raises(ProtocolError, match=r"unusable after an earlier error \(TypeError: "
                                            r"read_previous must return"):
        d.proto.receive(b"")


def test_xor_sees_through_an_empty_unacked_checkpoint_to_a_later_one():
    """Checkpoints 1 (full), 2 (empty) and 3 staged in one call, none acked yet: the
    xor base of checkpoint 4 is checkpoint 3's pages, past the empty one."""
    enc = CheckpointEncoder(PS)
    idx = np.array([1, 5], np.uint32)
    third, fourth = FULL_PAGES[idx] ^ np.uint8(1), FULL_PAGES[idx] ^ np.uint8(2)
    none = np.empty(0, np.uint32)
    stream = full_frames() + list(enc.checkpoint(2, False, 2.0, none, FULL_PAGES[none], None, b"d"))
    stream += list(enc.checkpoint(3, False, 3.0, idx, third, FULL_PAGES[idx], b"d"))
    stream += list(enc.checkpoint(4, False, 4.0, idx, fourth, third, b"d"))
    d = opened()
    d.auto_ack = False
    d.feed(b"".join(stream))
    assert np.array_equal(d.staged[-1].pages, fourth)


def pages_frame(idx, encoded: bytes, codec="none", xor=False, count=None) -> bytes:
    idx = np.array(idx, dtype="<u4")
    n = len(idx) if count is None else count
    return encode_frame_parts({"t": "pages", "count": n, "codec": codec, "xor": xor, "raw_len": n * PS},
                              idx.tobytes(), encoded)


WITH_CHECKSUM = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(3 * PS))


@pytest.mark.parametrize("frames, message", [
    ([pages_frame([1, 9, 5], bytes(3 * PS))], "page indices are not strictly increasing"),
    ([pages_frame([1, 5], bytes(2 * PS)), pages_frame([5, 9], bytes(2 * PS))],
     "page index 5 does not follow the previous frame's last index 5"),
    ([pages_frame([1, 5, 9], b"")], "uncompressed data is 0 bytes, raw_len says 192"),
    ([pages_frame([1, 5, 9], zstandard.ZstdCompressor().compress(b""), "zstd")],
     "zstd frame declares 0 bytes, raw_len says 192"),
    ([pages_frame([1, 5, 9], WITH_CHECKSUM[:-4], "zstd")],
     r"zstd data decoded to 192 bytes \(frame incomplete\), raw_len says 192"),
])
def test_pages_frame_refusals_name_the_frame(frames, message):
    expect_reject(full_frames() + incr_frames()[:1] + frames,
                  rf"^pages frame in checkpoint 2: {message}$", 1)


def test_a_full_checkpoint_frame_must_end_where_its_count_says():
    f = full_frames()  # pages 0..7 in the first frame
    skipped = patch_pages(f[1], idx=[0, 1, 2, 3, 4, 5, 6, 8])
    expect_reject([f[0], skipped], r"^pages frame in checkpoint 1: a full checkpoint must send pages "
                                   r"0\.\.31 in order, got 0\.\.8 after 0 pages$")


def test_pages_frames_at_the_decoded_size_limit_and_highly_compressed_are_taken():
    zeros = np.zeros((NPAGES, PS), np.uint8)
    d = Daemon(max_payload=RAM)  # raw_len of the one 32-page frame: exactly the limit
    d.feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
    frames = list(CheckpointEncoder(PS).checkpoint(1, True, 0.0, ALL, zeros, None, b"d", batch_pages=32))
    assert len(FrameDecoder().feed(frames[1])[0].payload) < 5 * 32  # < 1 byte of data a page
    for x in frames:
        d.feed(x)
    assert len(d.staged) == 1 and not d.staged[0].pages.any()


def test_streamed_pages_carry_their_epoch():
    b = BackupProtocol(FP, RAM, PS, lambda idx: None, stream=True)
    events = b.receive(CheckpointEncoder(PS).hello(FP, SESSION, RAM) + b"".join(full_frames()))
    assert {e.epoch for e in events if isinstance(e, PagesReceived)} == {1}


def test_a_full_checkpoint_is_gathered_in_place():
    """A full checkpoint is written straight into one array of the guest's size: the
    backup holds about one copy of the RAM, not the frames and a joined copy too."""
    ps, npages = 4096, 1024
    pages = (np.arange(npages)[:, None] // 3 + np.arange(ps) % 5).astype(np.uint8)  # compressible:
    enc = CheckpointEncoder(ps)  # the frames the hasher may still hold are small
    data = [enc.hello(FP, SESSION, ps * npages)]
    data += enc.checkpoint(1, True, 0.0, np.arange(npages, dtype=np.uint32), pages, None, b"d",
                           batch_pages=64)
    b = BackupProtocol(FP, ps * npages, ps, lambda idx: None)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        one_copy = np.empty_like(pages)
        one_copy_size = tracemalloc.get_traced_memory()[0] - base  # as tracemalloc counts it
        del one_copy
        tracemalloc.reset_peak()
        staged = [e for x in data for e in b.receive(x) if isinstance(e, CheckpointStaged)]
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert np.array_equal(staged[0].checkpoint.pages, pages)
    assert peak < 1.5 * one_copy_size


INPUT_ERRORS = [  # (after_epoch, count, nic, payload) of an input frame, refusal
    (2, 1, 0, struct.pack("<I", 60) + bytes(60),
     r"input after epoch 2: expected 0\.\.1 \(input comes in order, at most one barrier ahead of "
     r"the checkpoints\)"),
    (0, 0, 0, b"", r"input: count 0 is out of range \(1\.\.4096\)"),
    (0, MAX_INPUT_COUNT + 1, 0, b"", r"input: count 4097 is out of range \(1\.\.4096\)"),
    (0, 1, 0, b"", r"input: payload ends inside frame 1 of 1"),
    (0, 2, 0, struct.pack("<I", 60) + bytes(60), r"input: payload ends inside frame 2 of 2"),
    (0, 1, 0, struct.pack("<I", 60), r"input: frame 1 of 1 has a bad length 60"),
    (0, 2, 0, struct.pack("<I", 60) + bytes(60) + struct.pack("<I", 13) + bytes(13),
     r"input: frame 2 of 2 has a bad length 13"),
    (0, 1, 0, struct.pack("<I", MAX_INPUT_FRAME + 1) + bytes(MAX_INPUT_FRAME + 1),
     rf"input: frame 1 of 1 has a bad length {MAX_INPUT_FRAME + 1}"),
    (0, 1, MAX_NICS, struct.pack("<I", 60) + bytes(60), r"input: NIC 8 is out of range \(0\.\.7\)"),
]


@pytest.mark.parametrize("after, count, nic, payload, message", INPUT_ERRORS)
def test_input_refusals_say_which_frame_and_bound(after, count, nic, payload, message):
    d = opened()
    with pytest.raises(ProtocolError, match=f"^{message}$"):
        d.feed(frame({"t": "input", "after_epoch": after, "count": count, "nic": nic}, payload))


def test_input_at_its_edges_is_taken():
    sizes = [MIN_INPUT_FRAME, MAX_INPUT_FRAME, 61]
    eth = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    many = [bytes(MIN_INPUT_FRAME)] * MAX_INPUT_COUNT
    enc = CheckpointEncoder(PS)
    d = opened()
    d.feed(begin_frame(1))  # checkpoint 1 open, none staged: input may follow its barrier
    d.feed(enc.input(2, eth, nic=MAX_NICS - 1) + enc.input(2, many))
    inputs = [e for e in d.events if isinstance(e, InputReceived)]
    assert [(e.after_epoch, e.nic, e.frames) for e in inputs] == [(2, MAX_NICS - 1, eth), (2, 0, many)]
