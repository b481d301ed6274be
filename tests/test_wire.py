"""Framing: encode_frame / FrameDecoder (no sockets)."""
from __future__ import annotations

import array
import os
import struct
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_budget import examples
from hypothesis import strategies as st

from remus.common.wire import (
    DEFAULT_MAX_PAYLOAD,
    MAX_HEADER,
    PREFIX_SIZE,
    Frame,
    FrameDecoder,
    ProtocolError,
    decode_header,
    encode_frame,
    encode_frame_parts,
    nesting_depth,
    unpack_map,
)
from remus.common import wire


def raw_frame(header_bytes: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header_bytes), len(payload)) + header_bytes + payload


def feed_all(decoder: FrameDecoder, data: bytes, chunk: int | None = None) -> list[Frame]:
    if chunk is None:
        return decoder.feed(data)
    frames = []
    for i in range(0, len(data), chunk):
        frames += decoder.feed(data[i : i + chunk])
    return frames


# --------------------------------------------------------------------------
# Round trips


def test_encode_layout():
    data = encode_frame({"t": "x", "a": 1}, b"payload")
    hl, pl = struct.unpack(">II", data[:8])
    assert pl == 7 and len(data) == 8 + hl + pl
    assert msgpack.unpackb(data[8 : 8 + hl]) == {"t": "x", "a": 1}
    assert data[8 + hl :] == b"payload"


@pytest.mark.parametrize("payload", [b"", b"x", bytearray(b"abc"), memoryview(b"hello world")[2:7]])
def test_roundtrip_payload_types(payload):
    dec = FrameDecoder()
    frames = dec.feed(encode_frame({"t": "m", "k": [1, "two", 3.5, None, True]}, payload))
    assert frames == [Frame({"t": "m", "k": [1, "two", 3.5, None, True]}, bytes(payload))]
    assert isinstance(frames[0].payload, bytes)
    dec.close()


def test_many_frames_one_feed_and_byte_by_byte():
    stream = b"".join(encode_frame({"t": "n", "i": i}, os.urandom(i * 7)) for i in range(30))
    whole = FrameDecoder().feed(stream)
    assert [f.header["i"] for f in whole] == list(range(30))
    dec = FrameDecoder()
    one = feed_all(dec, stream, chunk=1)
    assert one == whole
    assert dec.buffered == 0 and not dec.in_frame
    dec.close()


def test_empty_feed_is_harmless():
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    data = encode_frame({"t": "a"})
    assert dec.feed(data[:3]) == []
    assert dec.feed(b"") == []
    assert dec.feed(data[3:]) == [Frame({"t": "a"}, b"")]


def test_large_payload_in_small_chunks_is_linear():
    payload = os.urandom(24 * 1024 * 1024)
    data = encode_frame({"t": "big"}, payload)
    dec = FrameDecoder()
    start = time.perf_counter()
    frames = feed_all(dec, data, chunk=16 * 1024)
    elapsed = time.perf_counter() - start
    assert len(frames) == 1 and frames[0].payload == payload
    # quadratic copying would take minutes here
    assert elapsed < 3.0, elapsed


def test_buffered_tracks_partial_frame():
    data = encode_frame({"t": "p"}, b"z" * 100)
    dec = FrameDecoder()
    dec.feed(data[:5])
    assert dec.buffered == 5 and dec.in_frame
    dec.feed(data[5:20])
    assert dec.buffered == 20
    dec.feed(data[20:-1])
    assert dec.buffered == len(data) - 1
    assert len(dec.feed(data[-1:])) == 1
    assert dec.buffered == 0


# --------------------------------------------------------------------------
# Rejections


def test_oversized_payload_rejected_at_prefix():
    dec = FrameDecoder(max_payload=1000)
    with pytest.raises(ProtocolError, match="payload length 1001 exceeds the limit of 1000"):
        dec.feed(struct.pack(">II", 5, 1001))
    dec = FrameDecoder(max_payload=1000)
    assert len(dec.feed(encode_frame({"t": "a"}, b"x" * 1000))) == 1


def test_default_max_payload():
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(struct.pack(">II", 5, DEFAULT_MAX_PAYLOAD + 1))


@pytest.mark.parametrize("header_len", [0, MAX_HEADER + 1, 0xFFFFFFFF])
def test_header_length_out_of_range(header_len):
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="header length"):
        dec.feed(struct.pack(">II", header_len, 0))


def test_max_header_accepted():
    header = {"t": "a", "pad": ""}
    base = len(msgpack.packb(header))
    header["pad"] = "x" * (MAX_HEADER - base - 2)  # str8 -> str16 costs 2 more bytes
    data = encode_frame(header)
    assert struct.unpack(">I", data[:4])[0] == MAX_HEADER
    assert FrameDecoder().feed(data)[0].header == header


@pytest.mark.parametrize(
    "header_bytes, message",
    [
        (b"\xc1", "not valid msgpack"),  # never-used byte
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb("t"), "must be a msgpack map"),
        (msgpack.packb({"x": 1}), 'no str "t"'),
        (msgpack.packb({"t": 5}), 'no str "t"'),
        (msgpack.packb({"t": b"bytes"}, use_bin_type=True), 'no str "t"'),
        (msgpack.packb({b"t": "a"}, use_bin_type=True), "is not a string"),
        (msgpack.packb({1: "a", "t": "x"}), "not valid msgpack"),  # strict_map_key
        (msgpack.packb({"t": "a"}) + b"\x00", "not valid msgpack"),  # trailing bytes
        (msgpack.packb({"t": "a"})[:-1], "not valid msgpack"),  # truncated
        (msgpack.packb({"t": "a", "e": msgpack.ExtType(5, b"x")}), "not valid msgpack"),
    ],
)
def test_bad_headers(header_bytes, message):
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match=message):
        dec.feed(raw_frame(header_bytes))


def test_decoder_dead_after_error():
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(raw_frame(b"\xc1"))
    with pytest.raises(ProtocolError, match="unusable after an earlier error"):
        dec.feed(encode_frame({"t": "a"}))
    with pytest.raises(ProtocolError, match="unusable"):
        dec.close()


def test_close_mid_frame():
    data = encode_frame({"t": "a"}, b"12345")
    for cut in (1, 8, 9, len(data) - 1):
        dec = FrameDecoder()
        dec.feed(data[:cut])
        with pytest.raises(ProtocolError, match="stream ended in the middle of a frame"):
            dec.close()


def test_close_between_frames_and_feed_after_close():
    dec = FrameDecoder()
    dec.feed(encode_frame({"t": "a"}))
    dec.close()
    dec.close()  # idempotent
    with pytest.raises(ProtocolError, match="closed"):
        dec.feed(b"x")


def test_frames_before_error_in_same_feed_are_not_returned():
    # The decoder is all-or-error per feed; what matters is that it is dead.
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame({"t": "a"}) + raw_frame(b"\xc1"))


def test_encode_frame_rejects_bad_headers():
    with pytest.raises(ValueError, match='"t"'):
        encode_frame({"x": 1})
    with pytest.raises(ValueError, match='"t"'):
        encode_frame({"t": 1})
    with pytest.raises(TypeError):
        encode_frame([("t", "a")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        encode_frame({"t": "a", "pad": "x" * MAX_HEADER})


# --------------------------------------------------------------------------
# Properties

headers = st.fixed_dictionaries(
    {"t": st.text(max_size=8)},
    optional={
        "i": st.integers(-(2**63), 2**64 - 1),
        "s": st.text(max_size=20),
        "b": st.booleans(),
        "f": st.floats(allow_nan=False),
        "l": st.lists(st.integers(0, 9), max_size=4),
        "m": st.dictionaries(st.text(max_size=3), st.integers(-100, 100), max_size=3),
    },
)
frames_st = st.lists(st.tuples(headers, st.binary(max_size=300)), max_size=8)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=examples(200), deadline=None)
@given(frames_st, st.lists(st.integers(0, 5000), max_size=30))
def test_any_split_yields_same_frames(frames, cuts):
    stream = b"".join(encode_frame(h, p) for h, p in frames)
    dec = FrameDecoder()
    out = []
    for piece in split(stream, cuts):
        out += dec.feed(piece)
    dec.close()
    assert out == [Frame(h, p) for h, p in frames]


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            # well-formed prefixes with arbitrary (often oversized) lengths
            st.builds(
                lambda h, p: struct.pack(">II", h, p),
                st.integers(0, 2**32 - 1),
                st.integers(0, 2**32 - 1),
            ),
            st.builds(lambda h, p: encode_frame(h, p), headers, st.binary(max_size=200)),
        ),
        max_size=20,
    ),
    st.integers(0, 300),
)
def test_decoder_buffer_is_bounded_and_only_raises_protocol_error(pieces, max_payload):
    limit = PREFIX_SIZE + MAX_HEADER + max_payload
    dec = FrameDecoder(max_payload=max_payload)
    for piece in pieces:
        try:
            frames = dec.feed(piece)
        except ProtocolError:
            assert sum(map(len, dec._chunks)) == 0  # a dead decoder holds nothing
            assert dec.buffered == 0 and not dec.in_frame
            return
        for f in frames:
            assert len(f.payload) <= max_payload
            assert isinstance(f.header["t"], str)
        assert dec.buffered <= limit
        assert sum(map(len, dec._chunks)) <= dec.buffered
    try:
        dec.close()
    except ProtocolError as exc:
        assert "middle of a frame" in str(exc)


def _nested(depth: int) -> bytes:
    """msgpack of a list nested `depth` levels deep around nil (packb itself refuses to
    build one this deep)."""
    return b"\x91" * depth + b"\xc0"


def _header_with(field: bytes) -> bytes:
    """A header {"t": "hello", "v": <field>}, `field` given as msgpack bytes."""
    return b"\x82\xa1t\xa5hello\xa1v" + field


@pytest.mark.parametrize("depth", [3, 50, 1000, 1023, 5000])
def test_deeply_nested_header_is_a_protocol_error(depth):
    """A hostile header nesting lists ~1000 deep unpacked fine, then broke whatever
    recursed over it next (a check, an error message) with RecursionError."""
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="nests lists or maps|not valid msgpack"):
        dec.feed(raw_frame(_header_with(_nested(depth))))


def test_header_nesting_limit():
    assert FrameDecoder().feed(raw_frame(_header_with(_nested(2))))[0].header == {
        "t": "hello", "v": [[None]]}
    with pytest.raises(ProtocolError, match="more than 3 levels"):
        FrameDecoder().feed(raw_frame(_header_with(b"\x81\xa1k" + _nested(2))))


# --------------------------------------------------------------------------
# Limits, messages and state, one by one


def test_protocol_error_carries_an_optional_reply():
    assert ProtocolError("bad").reply is None
    err = ProtocolError("bad", reply=b"reject")
    assert str(err) == "bad" and err.reply == b"reject"


def test_encode_frame_errors_say_what_is_wrong():
    with pytest.raises(TypeError, match=r"^frame header must be a dict, not list$"):
        encode_frame([("t", "a")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r'^frame header needs a str "t" \(the message type\)$'):
        encode_frame({"t": b"a"})
    pad = "x" * MAX_HEADER
    size = len(msgpack.packb({"t": "a", "pad": pad}))
    with pytest.raises(ValueError, match=rf"^frame header is {size} bytes, the limit is {MAX_HEADER}$"):
        encode_frame({"t": "a", "pad": pad})


def test_encode_frame_parts_joins_the_pieces_of_any_buffer_type():
    words = array.array("H", [1, 2])  # 2-byte items: counted in bytes, not items
    data = encode_frame_parts({"t": "p"}, b"ab", bytearray(b"cd"), memoryview(words))
    assert FrameDecoder().feed(data) == [Frame({"t": "p"}, b"abcd" + words.tobytes())]
    assert encode_frame_parts({"t": "p"}) == encode_frame({"t": "p"})


def test_a_payload_longer_than_the_prefix_can_say_is_refused(monkeypatch):
    monkeypatch.setattr(wire, "_U32_MAX", 10)
    assert len(encode_frame({"t": "a"}, b"x" * 10)) > 10
    with pytest.raises(ValueError, match=r"^frame payload is 11 bytes, more than a frame can carry$"):
        encode_frame_parts({"t": "a"}, b"x" * 6, b"y" * 5)


@pytest.mark.parametrize("max_payload, ok", [
    (0, True), (2**32 - 1, True), (2**32, False), (-1, False), (1.0, False), ("1", False)])
def test_max_payload_must_fit_a_length_prefix(max_payload, ok):
    if ok:
        assert FrameDecoder(max_payload=max_payload).max_payload == max_payload
    else:
        with pytest.raises(ValueError, match=r"^max_payload must be an int from 0 to 4294967295$"):
            FrameDecoder(max_payload=max_payload)


def test_zero_max_payload_takes_only_empty_frames():
    dec = FrameDecoder(max_payload=0)
    assert dec.feed(encode_frame({"t": "a"})) == [Frame({"t": "a"}, b"")]
    with pytest.raises(ProtocolError, match=r"^frame payload length 1 exceeds the limit of 0 bytes$"):
        dec.feed(encode_frame({"t": "a"}, b"x"))


@pytest.mark.parametrize("header_len", [0, MAX_HEADER + 1])
def test_header_length_error_names_the_range(header_len):
    with pytest.raises(ProtocolError, match=rf"^frame header length {header_len} is out of range "
                                            rf"\(1\.\.{MAX_HEADER}\)$"):
        FrameDecoder().feed(struct.pack(">II", header_len, 0))


@pytest.mark.parametrize("value, depth", [
    (5, 0), ("s", 0), ([], 1), ({}, 1), ((), 1), ([1, 2], 1), ([[1], 2], 2), ({"a": [1]}, 2),
    ({(1,): 1}, 2), ([{"a": {"b": 1}}], 3), ([[], [[[]]]], 4)])
def test_nesting_depth_counts_lists_maps_and_keys(value, depth):
    assert nesting_depth(value, limit=10) == depth


def test_nesting_depth_stops_one_past_the_limit():
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert nesting_depth(deep, limit=3) == 4
    assert nesting_depth([[[1]]], limit=3) == 3


def test_unpack_map_errors_name_what_was_unpacked():
    with pytest.raises(ProtocolError, match=r"^hello is not valid msgpack: ExtraData: "):
        unpack_map(msgpack.packb({"t": "a"}) + b"\x00", "hello")
    with pytest.raises(ProtocolError, match=r"^hello is not valid msgpack: ValueError: msgpack extension "
                                            r"type 5 is not allowed in a frame header$"):
        unpack_map(msgpack.packb({"e": msgpack.ExtType(5, b"x")}), "hello")
    with pytest.raises(ProtocolError) as exc:
        unpack_map(b"\xc1" * 300, "x")
    assert len(str(exc.value)) <= len("x is not valid msgpack: ExtraData: ") + 80
    with pytest.raises(ProtocolError, match=r"^hello must be a msgpack map, got list$"):
        unpack_map(msgpack.packb([1]), "hello")
    with pytest.raises(ProtocolError, match=r"^hello key b'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk is "
                                            r"not a string$"):
        unpack_map(msgpack.packb({b"k" * 100: 1}, use_bin_type=True), "hello")
    with pytest.raises(ProtocolError, match=r"^hello nests lists or maps more than 1 levels deep$"):
        unpack_map(msgpack.packb({"a": []}), "hello", max_depth=1)
    assert unpack_map(msgpack.packb({"a": []}), "hello", max_depth=2) == {"a": []}
    with pytest.raises(ProtocolError, match=r"^frame header must be a msgpack map, got int$"):
        unpack_map(msgpack.packb(1))


def test_unpacked_headers_keep_lists_and_str_payload_values():
    header = unpack_map(msgpack.packb({"t": "a", "l": [1, (2, 3)], "s": "é", "b": b"\x00"},
                                      use_bin_type=True))
    assert header == {"t": "a", "l": [1, [2, 3]], "s": "é", "b": b"\x00"}
    assert type(header["l"]) is list and type(header["l"][1]) is list


def test_decode_header_wants_a_str_type():
    assert decode_header(msgpack.packb({"t": "m", "x": 1})) == {"t": "m", "x": 1}
    with pytest.raises(ProtocolError, match=r'^frame header has no str "t" \(message type\)$'):
        decode_header(msgpack.packb({"t": None}))


def test_header_check_sees_each_header_before_its_payload():
    seen = []

    def check(header, payload_len):
        seen.append((header, payload_len))
        if header.get("bad"):
            raise ProtocolError(f"no {header['t']} here")

    dec = FrameDecoder(header_check=check)
    data = encode_frame({"t": "a"}, b"xyz")
    assert dec.feed(data[:-3]) == []
    assert seen == [({"t": "a"}, 3)]  # called before any payload byte arrived
    assert dec.feed(data[-3:]) == [Frame({"t": "a"}, b"xyz")]
    with pytest.raises(ProtocolError, match=r"^no b here$"):
        dec.feed(encode_frame({"t": "b", "bad": True}, b"payload"))
    with pytest.raises(ProtocolError, match=r"^frame decoder is unusable after an earlier error "
                                            r"\(no b here\)$"):
        dec.feed(b"")


def test_buffered_and_in_frame_through_every_stage():
    data = encode_frame({"t": "p"}, b"z" * 10)
    hl = struct.unpack(">I", data[:4])[0]
    dec = FrameDecoder()
    assert (dec.buffered, dec.in_frame) == (0, False)
    for cut, buffered in [(3, 3), (8, 8), (9, 9), (8 + hl, 8 + hl), (8 + hl + 4, 8 + hl + 4)]:
        dec = FrameDecoder()
        dec.feed(data[:cut])
        assert (dec.buffered, dec.in_frame) == (buffered, True), cut
    dec = FrameDecoder()
    for i in range(len(data) - 1):
        dec.feed(data[i : i + 1])
        assert dec.buffered == i + 1 and dec.in_frame
    assert dec.feed(data[-1:]) == [Frame({"t": "p"}, b"z" * 10)]
    assert (dec.buffered, dec.in_frame) == (0, False)


def test_close_mid_frame_says_how_much_was_received():
    data = encode_frame({"t": "a"}, b"12345")
    dec = FrameDecoder()
    dec.feed(data[:-2])
    with pytest.raises(ProtocolError, match=rf"^stream ended in the middle of a frame \({len(data) - 2} "
                                            r"bytes of an incomplete frame were received\)$"):
        dec.close()
    with pytest.raises(ProtocolError, match=r"^frame decoder is unusable after an earlier error "
                                            r"\(stream ended in the middle"):
        dec.close()


def test_feed_after_close_says_the_stream_ended():
    dec = FrameDecoder()
    dec.close()
    with pytest.raises(ProtocolError, match=r"^frame decoder was closed \(stream ended\); no more data "
                                            r"expected$"):
        dec.feed(b"")


def test_bytes_and_str_header_values_keep_their_types():
    header = {"t": "m", "b": b"\xff\x00", "s": "\xff", "l": [b"x", "x"]}
    assert FrameDecoder().feed(encode_frame(header)) == [Frame(header, b"")]


def test_a_long_msgpack_error_is_cut_to_80_characters():
    raw = msgpack.packb({"a": b"a" * 100000 + b"\xc3\x28"}, use_bin_type=False)  # bad UTF-8 str
    with pytest.raises(UnicodeDecodeError) as original:
        msgpack.unpackb(raw, raw=False)
    detail = str(original.value)
    assert len(detail) > 80
    with pytest.raises(ProtocolError) as exc:
        unpack_map(raw, "hello")
    assert str(exc.value) == f"hello is not valid msgpack: UnicodeDecodeError: {detail[:80]}"


@pytest.mark.parametrize("data", [
    struct.pack(">II", 0, 0),                            # bad prefix
    raw_frame(b"\xc1", b"payload"),                      # bad header
    encode_frame({"t": "a"}, b"x" * 50)[:-10],           # cut in the payload, then closed
    encode_frame({"t": "a"})[:-1],                       # cut in the header, then closed
    b"\x00\x00",                                         # cut in the prefix, then closed
], ids=["prefix", "header", "cut-payload", "cut-header", "cut-prefix"])
def test_a_failed_decoder_holds_nothing(data):
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(data)
        dec.close()
    assert (dec.buffered, dec.in_frame) == (0, False)
