"""Disk writes in checkpoints: staged with the pages, bounded, checked, never partial."""
import numpy as np
import pytest

from remus.common.protocol import (DISK_EXTENT, BackupProtocol, CheckpointEncoder, CheckpointStaged,
                                   SessionOpened)
from remus.common.wire import FrameDecoder, ProtocolError, encode_frame_parts

FP = "fp"
SESSION = "0123456789abcdef0123456789abcdef"
PS, NPAGES = 64, 8
RAM = PS * NPAGES
DISK = 1 << 20


def extents(*pairs):
    return np.array(list(pairs), dtype=DISK_EXTENT)


def session(disk_size=DISK, extents_=None, data=b"", synced=True):
    enc = CheckpointEncoder(PS)
    pages = np.arange(NPAGES * PS, dtype=np.uint8).reshape(NPAGES, PS)
    frames = [enc.hello(FP, SESSION, RAM, disk_size)]
    frames += list(enc.checkpoint(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), pages, None, b"dev",
                                  disk_extents=extents_, disk_data=data, disk_synced=synced))
    return frames


def backup(disk=True):
    return BackupProtocol(FP, RAM, PS, lambda idx: np.zeros((len(idx), PS), np.uint8), disk=disk)


def test_disk_writes_are_staged_with_the_checkpoint():
    data = b"a" * 512 + b"b" * 1024
    b = backup()
    events = b.receive(b"".join(session(extents_=extents((0, 512), (4096, 1024)), data=data)))
    assert isinstance(events[0], SessionOpened) and events[0].disk_size == DISK
    staged = [e for e in events if isinstance(e, CheckpointStaged)][0].checkpoint
    assert staged.disk_synced
    assert staged.disk_extents.tolist() == [(0, 512), (4096, 1024)]
    assert staged.disk_data == data


def test_many_extents_split_into_several_frames(monkeypatch):
    import remus.common.protocol as protocol
    monkeypatch.setattr(protocol, "MAX_FRAME_RAW", 2048)
    table = extents(*[(i * 4096, 1024) for i in range(10)])
    data = bytes(range(256)) * 40
    frames = session(extents_=table, data=data)
    assert sum(FrameDecoder().feed(f)[0].header["t"] == "disk" for f in frames) == 5
    staged = [e for e in backup().receive(b"".join(frames)) if isinstance(e, CheckpointStaged)][0]
    assert staged.checkpoint.disk_data == data


@pytest.mark.parametrize("disk_size, expect_disk, message", [
    (DISK, False, "disk mismatch"),
    (0, True, "disk mismatch"),
    (1000, True, "whole number of sectors"),
])
def test_hello_disk_mismatch(disk_size, expect_disk, message):
    frames = session(disk_size=disk_size, synced=False)
    with pytest.raises(ProtocolError, match=message):
        backup(expect_disk).receive(frames[0])


def disk_frame(table, data):
    return encode_frame_parts({"t": "disk", "count": len(table), "codec": "none", "raw_len": len(data)},
                              memoryview(np.ascontiguousarray(table)).cast("B"), data)


@pytest.mark.parametrize("table, data, message", [
    (extents((DISK - 512, 1024)), b"x" * 1024, "beyond"),
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
