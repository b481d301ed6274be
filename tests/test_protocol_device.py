"""Device state sent as a delta (XOR) against the previous checkpoint's: round trips,
sizes, when it goes whole instead, and what the backup refuses."""
from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from remus.common.protocol import (PROTOCOL_VERSION, BackupProtocol, CheckpointEncoder,
                                   CheckpointStaged, PrimaryProtocol)
from remus.common.wire import FrameDecoder, ProtocolError, encode_frame

FP = "fp"
SESSION = "0123456789abcdef0123456789abcdef"
PS, NPAGES = 64, 4
RAM = PS * NPAGES
ALL = np.arange(NPAGES, dtype=np.uint32)


def checkpoint(enc: CheckpointEncoder, epoch: int, device: bytes, full: bool | None = None,
               ) -> list[bytes]:
    """The frames of a checkpoint carrying `device` (full: every page; else no page)."""
    full = epoch == 1 if full is None else full
    idx = ALL if full else np.empty(0, np.uint32)
    pages = np.zeros((len(idx), PS), np.uint8)
    return list(enc.checkpoint(epoch, full, float(epoch), idx, pages, None, device))


def device_header(frames: list[bytes]) -> dict:
    (frame,) = [f for f in decode(frames) if f.header["t"] == "device"]
    return frame.header


def device_frame(frames: list[bytes]) -> bytes:
    """The encoded device frame of a checkpoint's frames (the one before end)."""
    assert FrameDecoder().feed(frames[-2])[0].header["t"] == "device"
    return frames[-2]


def decode(frames: list[bytes]):
    return FrameDecoder().feed(b"".join(frames))


def rebuilt(frames: list[bytes], payload=None, **changes) -> list[bytes]:
    """`frames` with the device frame's header fields changed, or its payload."""
    out = []
    for f in decode(frames):
        if f.header["t"] == "device":
            f.header.update(changes)
            out.append(encode_frame(f.header, f.payload if payload is None else payload))
        else:
            out.append(encode_frame(f.header, f.payload))
    return out


class Backup:
    """A backup protocol past the hello; acks each staged checkpoint unless told not to."""

    def __init__(self, auto_ack: bool = True):
        self.proto = BackupProtocol(FP, RAM, PS, lambda idx: np.zeros((len(idx), PS), np.uint8))
        self.proto.receive(CheckpointEncoder(PS).hello(FP, SESSION, RAM))
        self.auto_ack = auto_ack
        self.devices: list[bytes] = []

    def feed(self, frames: list[bytes]) -> None:
        for ev in self.proto.receive(b"".join(frames)):
            if isinstance(ev, CheckpointStaged):
                self.devices.append(ev.checkpoint.device_state)
                if self.auto_ack:
                    self.proto.ack(ev.checkpoint.epoch)


def changed(rng: np.random.Generator, state: bytes, n: int = 8) -> bytes:
    """`state` with `n` bytes changed, as QEMU's device state changes between checkpoints."""
    out = bytearray(state)
    for pos in rng.integers(0, len(out), n):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


# --------------------------------------------------------------------------
# What goes on the wire, and what the backup makes of it


def test_device_states_round_trip_as_deltas():
    rng = np.random.default_rng(1)
    states = [rng.bytes(4096)]
    for _ in range(5):
        states.append(changed(rng, states[-1]))
    enc, b = CheckpointEncoder(PS), Backup()
    frames = [checkpoint(enc, epoch, s) for epoch, s in enumerate(states, 1)]
    assert [device_header(f)["delta"] for f in frames] == [False] + [True] * 5
    for f in frames:
        b.feed(f)
    assert b.devices == states


def test_a_delta_is_a_small_fraction_of_the_whole_state():
    rng = np.random.default_rng(2)
    first = rng.bytes(256 * 1024)  # incompressible: zstd alone cannot shrink it
    second = changed(rng, first, 16)
    enc = CheckpointEncoder(PS)
    checkpoint(enc, 1, first)
    delta = device_frame(checkpoint(enc, 2, second))
    whole = device_frame(checkpoint(CheckpointEncoder(PS), 2, second))
    assert device_header([delta])["delta"] and not device_header([whole])["delta"]
    assert len(whole) > len(second)
    assert len(delta) < len(second) // 100


def test_a_length_change_or_a_full_checkpoint_sends_the_state_whole():
    rng = np.random.default_rng(3)
    a1 = rng.bytes(100)
    a2 = changed(rng, a1)
    b1 = rng.bytes(120)
    b2, b3, b4 = changed(rng, b1), changed(rng, b1), changed(rng, b1)
    sequence = [(a1, True), (a2, False), (b1, False), (b2, False), (b3, True), (b4, False)]
    enc, backup = CheckpointEncoder(PS), Backup()
    frames = [checkpoint(enc, epoch, s, full) for epoch, (s, full) in enumerate(sequence, 1)]
    assert [device_header(f)["delta"] for f in frames] == [False, True, False, True, False, True]
    for f in frames:
        backup.feed(f)
    assert backup.devices == [s for s, _ in sequence]


def test_without_compression_the_state_goes_whole():
    # XOR would save nothing on the wire and cost time on both sides.
    enc = CheckpointEncoder(PS, "none")
    first = checkpoint(enc, 1, b"state-1")
    second = [f for f in decode(checkpoint(enc, 2, b"state-2")) if f.header["t"] == "device"]
    assert device_header(first)["delta"] is False
    assert (second[0].header["delta"], second[0].payload) == (False, b"state-2")


def test_pre_copy_rounds_carry_no_device_state_and_leave_the_base_alone():
    enc, b = CheckpointEncoder(PS), Backup()
    pages = np.zeros((NPAGES, PS), np.uint8)
    b.feed(list(enc.precopy_round(1, True, 1.0, [(ALL, pages, None)])))
    b.feed(list(enc.precopy_round(2, False, 2.0, [(ALL[:1], pages[:1], None)])))
    third = checkpoint(enc, 3, b"x" * 50, full=False)
    fourth = checkpoint(enc, 4, b"y" + b"x" * 49)
    assert (device_header(third)["delta"], device_header(fourth)["delta"]) == (False, True)
    b.feed(third + fourth)
    assert b.devices == [b"", b"", b"x" * 50, b"y" + b"x" * 49]


def test_pipelined_checkpoints_use_the_previous_one_received_as_base():
    """The primary sends checkpoint N+1 before N is acknowledged: its base is N
    all the same, on both sides."""
    rng = np.random.default_rng(4)
    states = [rng.bytes(1000)]
    for _ in range(6):
        states.append(changed(rng, states[-1]))
    enc, b = CheckpointEncoder(PS), Backup(auto_ack=False)
    frames = [checkpoint(enc, epoch, s) for epoch, s in enumerate(states, 1)]
    b.feed([x for f in frames[:4] for x in f])  # four in one read, none acknowledged
    b.proto.ack(1)
    b.feed(frames[4])
    for epoch in (2, 3, 4, 5):
        b.proto.ack(epoch)
    b.feed(frames[5] + frames[6])
    assert b.devices == states


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([1, 7, 300]), st.booleans(), st.integers(0, 3),
                          st.integers(0, 3)), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1))
def test_property_any_sequence_of_states_and_acks_round_trips(steps, seed):
    """Lengths that change or not, full checkpoints anywhere, acks lagging by up
    to three checkpoints: the backup always ends with the states sent."""
    rng = np.random.default_rng(seed)
    enc, b = CheckpointEncoder(PS), Backup(auto_ack=False)
    states, acked = [], 0
    for epoch, (length, full, changes, lag) in enumerate(steps, 1):
        last = states[-1] if states else b""
        state = changed(rng, last, changes) if len(last) == length else rng.bytes(length)
        states.append(state)
        b.feed(checkpoint(enc, epoch, state, full or epoch == 1))
        while acked < epoch - lag:
            acked += 1
            b.proto.ack(acked)
    assert b.devices == states


# --------------------------------------------------------------------------
# What the backup refuses, and that it then stages nothing


def refused(b: Backup, frames: list[bytes], message: str) -> None:
    staged = list(b.devices)
    with pytest.raises(ProtocolError, match=message):
        b.feed(frames)
    assert b.devices == staged
    assert b.proto.state == "failed"


def test_a_delta_with_no_earlier_device_state_is_refused():
    enc, b = CheckpointEncoder(PS), Backup()
    b.feed(list(enc.precopy_round(1, True, 1.0, [(ALL, np.zeros((NPAGES, PS), np.uint8), None)])))
    refused(b, rebuilt(checkpoint(enc, 2, b"state", full=False), delta=True),
            r"^device frame in checkpoint 2: a delta, but no earlier checkpoint of this session "
            r"carried a device state$")


def test_a_delta_in_a_full_checkpoint_is_refused():
    enc, b = CheckpointEncoder(PS), Backup()
    b.feed(checkpoint(enc, 1, b"state"))
    refused(b, rebuilt(checkpoint(enc, 2, b"state", full=True), delta=True),
            r"^device frame in checkpoint 2: a full checkpoint's device state must be whole, "
            r"not a delta$")


def test_a_delta_of_another_length_than_its_base_is_refused():
    enc, b = CheckpointEncoder(PS), Backup()
    b.feed(checkpoint(enc, 1, b"x" * 100))
    refused(b, rebuilt(checkpoint(enc, 2, b"x" * 120), delta=True),
            r"^device frame in checkpoint 2: a delta of 120 bytes against a previous device "
            r"state of 100 bytes$")


def test_a_delta_against_another_base_fails_the_checksum():
    # The backup staged X; the primary's delta is against Y, of the same length.
    mine, theirs = CheckpointEncoder(PS), CheckpointEncoder(PS)
    b = Backup()
    b.feed(checkpoint(mine, 1, b"X" * 64))
    checkpoint(theirs, 1, b"Y" * 64)
    second = checkpoint(theirs, 2, b"Z" * 64)
    assert device_header(second)["delta"]
    refused(b, second, r"^end of checkpoint 2: checksum mismatch")
    assert b.devices == [b"X" * 64]


def test_a_tampered_delta_fails_the_checksum():
    enc, b = CheckpointEncoder(PS), Backup()
    b.feed(checkpoint(enc, 1, b"state-1" * 10))
    second = checkpoint(enc, 2, b"state-2" * 10)
    (dev,) = [f for f in decode(second) if f.header["t"] == "device"]
    xor = bytearray(zstandard.ZstdDecompressor().decompress(dev.payload))
    xor[3] ^= 1  # well-formed zstd of the wrong delta
    refused(b, rebuilt(second, payload=zstandard.ZstdCompressor().compress(bytes(xor))),
            r"^end of checkpoint 2: checksum mismatch")


@pytest.mark.parametrize("delta", [True, False])
def test_a_flipped_delta_flag_fails_the_checksum(delta):
    enc, b = CheckpointEncoder(PS), Backup()
    b.feed(checkpoint(enc, 1, b"a" * 40))
    second = checkpoint(enc, 2, b"b" * 40) if delta else checkpoint(CheckpointEncoder(PS), 2, b"b" * 40)
    assert device_header(second)["delta"] is delta
    refused(b, rebuilt(second, delta=not delta), r"^end of checkpoint 2: checksum mismatch")


def test_the_delta_field_must_be_a_bool():
    enc, b = CheckpointEncoder(PS), Backup()
    b.feed(checkpoint(enc, 1, b"a" * 40))
    refused(b, rebuilt(checkpoint(enc, 2, b"b" * 40), delta=1),
            r"^'device' message field 'delta' must be a bool, got int 1$")


# --------------------------------------------------------------------------
# A peer of protocol 3 (whole device states only) is refused at the handshake


def test_a_protocol_3_primary_is_refused_at_hello():
    hello = FrameDecoder().feed(CheckpointEncoder(PS).hello(FP, SESSION, RAM))[0].header
    b = BackupProtocol(FP, RAM, PS, lambda idx: None)
    with pytest.raises(ProtocolError, match=rf"^peer speaks protocol version 3, this backup "
                                            rf"speaks {PROTOCOL_VERSION}$") as info:
        b.receive(encode_frame({**hello, "version": 3}))
    assert FrameDecoder().feed(info.value.reply)[0].header["t"] == "reject"


def test_a_protocol_3_backup_is_refused_at_welcome():
    p = PrimaryProtocol(SESSION)
    with pytest.raises(ProtocolError, match=rf"^peer speaks protocol version 3, this primary "
                                            rf"speaks {PROTOCOL_VERSION}$"):
        p.receive(encode_frame({"t": "welcome", "version": 3, "session": SESSION, "generation": 1}))
