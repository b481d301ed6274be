"""Disk writes in checkpoints: staged with the pages, bounded, checked, never partial."""
import numpy as np
import pytest

from remus.common.protocol import (DISK_EXTENT, BackupProtocol, CheckpointEncoder, CheckpointStaged,
                                   DiskWritten, SessionOpened)
from remus.common.wire import FrameDecoder, ProtocolError, encode_frame_parts

FP = "fp"
SESSION = "0123456789abcdef0123456789abcdef"
PS, NPAGES = 64, 8
RAM = PS * NPAGES
DISK = 1 << 20


def extents(*pairs):
    return np.array(list(pairs), dtype=DISK_EXTENT)


def session(disk_size=DISK, extents_=None, data=b"", synced=True, max_raw=1 << 20):
    """hello and one full checkpoint carrying `extents_` of `data` (written as the
    primary's WriteSet would hold them)."""
    from remus.common.diskset import WriteSet
    ws, pos = WriteSet(), 0
    for offset, length in ([] if extents_ is None else extents_.tolist()):
        ws.add(offset, data[pos:pos + length])
        pos += length
    enc = CheckpointEncoder(PS)
    pages = np.arange(NPAGES * PS, dtype=np.uint8).reshape(NPAGES, PS)
    frames = [enc.hello(FP, SESSION, RAM, [disk_size] if disk_size else [])]
    frames += list(enc.checkpoint(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), pages, None, b"dev",
                                  disk_runs=ws.runs(max_raw), disk_synced=synced))
    return frames


def backup(disk=True, disks=None):
    return BackupProtocol(FP, RAM, PS, lambda idx: np.zeros((len(idx), PS), np.uint8),
                          disks=int(disk) if disks is None else disks)


def written(events) -> tuple[list, bytes]:
    """The disk extents and data of a checkpoint's DiskWritten events, joined."""
    ws = [e for e in events if isinstance(e, DiskWritten)]
    return [tuple(x) for w in ws for x in w.extents.tolist()], b"".join(w.data for w in ws)


def test_disk_writes_come_with_the_checkpoint():
    data = b"a" * 512 + b"b" * 1024
    b = backup()
    events = b.receive(b"".join(session(extents_=extents((0, 512), (4096, 1024)), data=data)))
    assert isinstance(events[0], SessionOpened) and events[0].disk_sizes == (DISK,)
    staged = [e for e in events if isinstance(e, CheckpointStaged)][0].checkpoint
    assert staged.disk_synced
    assert written(events) == ([(0, 512), (4096, 1024)], data)


def test_many_extents_split_into_several_frames(monkeypatch):
    import remus.common.protocol as protocol
    monkeypatch.setattr(protocol, "MAX_FRAME_RAW", 2048)
    table = extents(*[(i * 4096, 1024) for i in range(10)])
    data = bytes(range(256)) * 40
    frames = session(extents_=table, data=data, max_raw=2048)
    assert sum(FrameDecoder().feed(f)[0].header["t"] == "disk" for f in frames) == 5
    assert written(backup().receive(b"".join(frames)))[1] == data


@pytest.mark.parametrize("disk_size, expect_disk, message", [
    (DISK, False, "disk mismatch: primary mirrors 1 disk\\(s\\), this backup expects 0"),
    (0, True, "disk mismatch"),
    (1000, True, "whole number of sectors"),
])
def test_hello_disk_mismatch(disk_size, expect_disk, message):
    frames = session(disk_size=disk_size, synced=False)
    with pytest.raises(ProtocolError, match=message):
        backup(expect_disk).receive(frames[0])


def disk_frame(table, data, disk=0):
    return encode_frame_parts({"t": "disk", "disk": disk, "count": len(table), "codec": "none",
                               "raw_len": len(data)},
                              memoryview(np.ascontiguousarray(table)).cast("B"), data)


@pytest.mark.parametrize("table, data, message", [
    (extents((DISK - 512, 1024)), b"x" * 1024, "beyond disk 0's"),
    (extents((0, 1024), (512, 512)), b"x" * 1536, "sorted and disjoint"),
    (extents((4096, 512), (0, 512)), b"x" * 1024, "sorted and disjoint"),
    (extents((0, 512)), b"x" * 100, "do not add up"),
    (extents((0, 0)), b"", "raw_len"),
])
def test_bad_disk_frames_are_rejected(table, data, message):
    frames = session(synced=False)
    b = backup()
    b.receive(b"".join(frames[:3]))  # hello, begin, one pages frame
    with pytest.raises(ProtocolError, match=message):
        b.receive(disk_frame(table, data))


def test_disk_frame_in_a_session_without_disk_is_rejected():
    frames = session(disk_size=0, synced=False)
    b = backup(disk=False)
    b.receive(b"".join(frames[:3]))
    with pytest.raises(ProtocolError, match="no disk"):
        b.receive(disk_frame(extents((0, 512)), b"x" * 512))


def test_corrupt_disk_data_fails_the_checksum():
    frames = session(extents_=extents((0, 512)), data=b"q" * 512)
    kinds = [FrameDecoder().feed(f)[0].header["t"] for f in frames]
    i = kinds.index("disk")
    bad = bytearray(frames[i])
    bad[-1] ^= 0xFF  # zstd may not apply to a run of q's; flip the last byte either way
    frames[i] = bytes(bad)
    with pytest.raises(ProtocolError):
        backup().receive(b"".join(frames))


# ---- zeroed ranges and streaming

from remus.common.diskset import SealedWrites, WriteSet  # noqa: E402
from remus.common.protocol import (PROTOCOL_VERSION, ZERO_EXTENT, DiskZeroed,  # noqa: E402
                                   PagesReceived,
                                   PrimaryProtocol, Progress)
from remus.common.wire import encode_frame  # noqa: E402


def zeroes(*pairs):
    return np.array(list(pairs), dtype=ZERO_EXTENT)


def zero_frame(table, disk=0):
    return encode_frame_parts({"t": "zero", "disk": disk, "count": len(table)},
                              memoryview(np.ascontiguousarray(table)).cast("B"))


def session_with(*sets: WriteSet, disk_size=DISK):
    enc = CheckpointEncoder(PS)
    pages = np.arange(NPAGES * PS, dtype=np.uint8).reshape(NPAGES, PS)
    frames = [enc.hello(FP, SESSION, RAM, [disk_size] * len(sets))]
    frames += list(enc.checkpoint(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), pages, None,
                                  b"dev", disk_runs=SealedWrites(list(sets)).runs(),
                                  disk_synced=True))
    return frames


def test_zeroed_ranges_travel_without_data_and_stream_in_order():
    ws = WriteSet()
    ws.add_zeroes(0, DISK)           # the whole disk reads as zeroes...
    ws.add(4096, b"w" * 512)         # ...but for one write in it
    frames = session_with(ws)
    assert sum(map(len, frames)) < RAM + 2048  # the megabyte of zeroes costs ~16 bytes a range
    b = BackupProtocol(FP, RAM, PS, lambda idx: np.zeros((len(idx), PS), np.uint8), disks=1,
                       stream=True)
    events = list(b.events(b"".join(frames)))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SessionOpened", "Send", "PagesReceived", "DiskZeroed", "DiskWritten",
                     "DiskZeroed", "CheckpointStaged"]
    z1, w, z2 = (e for e in events if isinstance(e, (DiskZeroed, DiskWritten)))
    assert z1.extents.tolist() == [(0, 4096)] and z2.extents.tolist() == [(4608, DISK - 4608)]
    assert w.extents.tolist() == [(4096, 512)] and w.data == b"w" * 512
    staged = events[-1].checkpoint
    assert staged.pages_received == NPAGES and len(staged.pages) == 0  # streamed, not gathered


def test_several_disks_in_one_checkpoint_come_in_disk_order():
    system, data = WriteSet(), WriteSet()
    system.add(0, b"s" * 512)
    data.add_zeroes(0, 4096)
    data.add(8192, b"d" * 512)
    events = backup(disks=2).receive(b"".join(session_with(system, data)))
    disk_events = [(type(e).__name__, e.disk, e.extents.tolist()) for e in events
                   if hasattr(e, "disk")]
    assert disk_events == [("DiskWritten", 0, [(0, 512)]), ("DiskZeroed", 1, [(0, 4096)]),
                           ("DiskWritten", 1, [(8192, 512)])]


def test_a_disk_index_out_of_range_or_out_of_order_is_rejected():
    b = backup(disks=2)
    frames = session_with(WriteSet(), WriteSet())
    b.receive(b"".join(frames[:3]))
    with pytest.raises(ProtocolError, match="disk 2 is not one of the 2 mirrored disks"):
        b.receive(zero_frame(zeroes((0, 512)), disk=2))
    b = backup(disks=2)
    b.receive(b"".join(frames[:3]))
    b.receive(zero_frame(zeroes((4096, 512)), disk=1))
    with pytest.raises(ProtocolError, match="not sorted and disjoint"):
        b.receive(disk_frame(extents((8192, 512)), b"x" * 512, disk=0))  # disk 0 after disk 1


@pytest.mark.parametrize("table, message", [
    (zeroes((DISK - 512, 1024)), "beyond disk 0's"),
    (zeroes((0, 1024), (512, 512)), "sorted and disjoint"),
    (zeroes((4096, 512), (0, 512)), "sorted and disjoint"),
    (zeroes((0, 0)), "empty"),
    (zeroes((1 << 62, 512)), "beyond"),
])
def test_bad_zero_frames_are_rejected(table, message):
    b = backup()
    b.receive(b"".join(session(synced=False)[:3]))
    with pytest.raises(ProtocolError, match=message):
        b.receive(zero_frame(table))


def test_zero_frame_with_a_torn_table_is_rejected():
    b = backup()
    b.receive(b"".join(session(synced=False)[:3]))
    with pytest.raises(ProtocolError, match="does not match"):
        b.receive(encode_frame_parts({"t": "zero", "disk": 0, "count": 2}, bytes(24)))


def test_zero_frames_are_covered_by_the_checksum():
    ws = WriteSet()
    ws.add_zeroes(8192, 4096)
    frames = session_with(ws)
    i = [FrameDecoder().feed(f)[0].header["t"] for f in frames].index("zero")
    frames[i] = zero_frame(zeroes((8192, 8192)))  # a wider hole than the primary sent
    with pytest.raises(ProtocolError, match="checksum"):
        backup().receive(b"".join(frames))


def test_a_streamed_xor_frame_reads_what_the_daemon_applied_before_it():
    """Pages of checkpoint 2 are xor'ed against checkpoint 1's: a streaming backup that
    applies each event before taking the next decodes them right from one buffer."""
    enc = CheckpointEncoder(PS)
    ram = np.zeros((NPAGES, PS), np.uint8)
    first = np.full((NPAGES, PS), 3, np.uint8)
    second = np.full((2, PS), 5, np.uint8)
    data = enc.hello(FP, SESSION, RAM, [DISK]) + b"".join(
        enc.checkpoint(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), first, None, b"d")) + \
        b"".join(enc.checkpoint(2, False, 2.0, np.array([1, 6], np.uint32), second, first[[1, 6]], b"d"))
    b = BackupProtocol(FP, RAM, PS, lambda idx: ram[idx], disks=1, stream=True)
    for event in b.events(data):
        if isinstance(event, PagesReceived):
            ram[event.indices] = event.pages
        if isinstance(event, CheckpointStaged):
            b.ack(event.checkpoint.epoch)
    assert (ram[[1, 6]] == 5).all() and (ram[[0, 2, 3, 4, 5, 7]] == 3).all()


def test_precopy_rounds_from_batches_match_array_checkpoints():
    enc = CheckpointEncoder(PS, "none")
    pages = np.arange(NPAGES * PS, dtype=np.uint8).reshape(NPAGES, PS)
    idx = np.arange(NPAGES, dtype=np.uint32)
    batches = ((idx[a:a + 3], pages[a:a + 3], None) for a in range(0, NPAGES, 3))
    streamed = list(enc.precopy_round(1, True, 1.0, batches, batch_pages=3))
    arrays = list(enc.checkpoint(1, True, 1.0, idx, pages, None, b"", batch_pages=3, precopy=True))
    assert streamed == arrays


def test_progress_is_accepted_only_for_a_checkpoint_awaiting_its_ack():
    p = PrimaryProtocol(SESSION)
    welcome = encode_frame({"t": "welcome", "version": PROTOCOL_VERSION, "session": SESSION, "generation": 1})
    p.receive(welcome)
    p.sent(1)
    b = backup()
    assert p.receive(b.progress(1, 4096)) == [Progress(1, 4096)]
    with pytest.raises(ProtocolError, match="not awaiting"):
        p.receive(b.progress(2, 1))


def test_backup_reports_what_it_is_receiving():
    b = backup()
    frames = session(synced=False)
    b.receive(b"".join(frames[:3]))
    epoch, received = b.receiving
    assert epoch == 1 and received > 0
    b.receive(b"".join(frames[3:]))
    assert b.receiving is None


# ---- each refusal names its frame; each bound holds at its edge

import zstandard  # noqa: E402

from remus.common.protocol import MAX_DISK_SIZE  # noqa: E402


def in_checkpoint(max_payload=None):
    """A backup of one disk inside checkpoint 1, its pages received; and that session's frames
    (hello, begin, pages, device, end)."""
    kw = {} if max_payload is None else {"max_payload": max_payload}
    b = BackupProtocol(FP, RAM, PS, lambda idx: np.zeros((len(idx), PS), np.uint8), disks=1, **kw)
    frames = session(synced=False)
    b.receive(b"".join(frames[:3]))
    return b, frames


def raw_disk_frame(count, payload, raw_len, codec="none"):
    return encode_frame_parts({"t": "disk", "disk": 0, "count": count, "codec": codec,
                               "raw_len": raw_len}, payload)


def packed(n: int) -> bytes:
    return zstandard.ZstdCompressor().compress(bytes(n))


TABLE = memoryview(extents((0, 512))).cast("B").tobytes()
BAD_DISK_DATA = [  # frames after the pages of checkpoint 1 (None: that session's device frame)
    ([raw_disk_frame(0, b"x" * 512, 512)], "disk frame", "count 0 does not fit the 512-byte payload"),
    ([raw_disk_frame(50, TABLE + b"x" * 512, 512)], "disk frame",
     "count 50 does not fit the 524-byte payload"),
    ([disk_frame(extents((0, 512), (1024, 0)), b"x" * 512)], "disk frame",
     "extent lengths do not add up to raw_len 512"),
    ([disk_frame(extents((2**63 - 10, 100)), b"x" * 100)], "disk frame", "an extent is beyond any disk"),
    ([disk_frame(extents((0, 1024)), b"x" * 1024), disk_frame(extents((512, 512)), b"x" * 512)],
     "disk frame", "extents are not sorted and disjoint"),
    ([disk_frame(extents((0, 512), (1024, 512), (1200, 100)), b"x" * 1124)], "disk frame",
     "extents are not sorted and disjoint"),
    ([disk_frame(extents((DISK - 512, 1024)), b"x" * 1024)], "disk frame",
     f"an extent ends beyond disk 0's {DISK} bytes"),
    ([disk_frame(extents((MAX_DISK_SIZE, 512)), b"x" * 512)], "disk frame",
     f"an extent ends beyond disk 0's {DISK} bytes"),
    ([None, disk_frame(extents((0, 512)), b"x" * 512)], "disk frame", "disk data after the device frame"),
    ([raw_disk_frame(1, TABLE + b"notzstd", 512, "zstd")], "disk frame", r"not a zstd frame \(.*\)"),
    ([disk_frame(extents((0, 512)), b"x" * 512), "pages"], "pages frame", "pages after a disk frame"),
    ([zero_frame(zeroes((MAX_DISK_SIZE, 512)))], "zero frame", f"an extent ends beyond disk 0's {DISK} bytes"),
    ([zero_frame(zeroes((0, MAX_DISK_SIZE)))], "zero frame", f"an extent ends beyond disk 0's {DISK} bytes"),
    ([zero_frame(zeroes((MAX_DISK_SIZE + 1, 512)))], "zero frame", "an extent is empty or beyond any disk"),
    ([zero_frame(zeroes((0, MAX_DISK_SIZE + 1)))], "zero frame", "an extent is empty or beyond any disk"),
    ([encode_frame({"t": "device", "codec": "zstd", "raw_len": 3, "delta": False}, b"bad")],
     "device frame", r"not a zstd frame \(.*\)"),
    (["end"], "end of checkpoint", "no device frame"),
]


@pytest.mark.parametrize("frames, what, message", BAD_DISK_DATA)
def test_bad_data_frames_are_refused_naming_the_frame_and_checkpoint(frames, what, message):
    b, session_frames = in_checkpoint()
    named = {None: session_frames[3], "pages": session_frames[2], "end": session_frames[4]}
    with pytest.raises(ProtocolError, match=rf"^{what}{'' if what == 'end of checkpoint' else ' in checkpoint'}"
                                            rf" 1: {message}$"):
        for f in frames:
            b.receive(named.get(f, f) if not isinstance(f, bytes) else f)


def test_disk_and_zero_frames_at_their_edges_are_taken():
    b, frames = in_checkpoint()
    events = b.receive(disk_frame(extents((0, 1)), b"a")  # one byte: the smallest write
                       + disk_frame(extents((512, 512), (1024, 512)), b"b" * 1024)  # adjacent extents
                       + zero_frame(zeroes((4096, 512), (4608, DISK - 4608))))  # up to the disk's end
    assert [(type(e).__name__, e.epoch) for e in events] == [("DiskWritten", 1), ("DiskWritten", 1),
                                                              ("DiskZeroed", 1)]
    assert all(type(e.data) is bytes for e in events[:2])  # not views of the receive buffer
    assert events[1].data == b"b" * 1024


def test_decoded_sizes_up_to_max_payload_are_taken():
    limit = 8192
    b, frames = in_checkpoint(max_payload=limit)
    table = memoryview(extents((0, limit))).cast("B").tobytes()
    b.receive(raw_disk_frame(1, table + packed(limit), limit, "zstd"))
    b.receive(encode_frame({"t": "device", "codec": "zstd", "raw_len": limit, "delta": False},
                           packed(limit)))
    with pytest.raises(ProtocolError, match=rf"^device frame in checkpoint 1: second device frame$"):
        b.receive(frames[3])
    b, frames = in_checkpoint(max_payload=limit)
    table = memoryview(extents((0, limit + 512))).cast("B").tobytes()
    with pytest.raises(ProtocolError, match=rf"^disk frame in checkpoint 1: raw_len {limit + 512} "
                                            r"is out of range$"):
        b.receive(raw_disk_frame(1, table + packed(limit + 512), limit + 512, "zstd"))
    b, frames = in_checkpoint(max_payload=limit)
    with pytest.raises(ProtocolError, match=rf"^device frame in checkpoint 1: raw_len {limit + 1} "
                                            rf"is out of range \(1\.\.{limit}\)$"):
        b.receive(encode_frame({"t": "device", "codec": "zstd", "raw_len": limit + 1, "delta": False},
                               packed(limit + 1)))
