import numpy as np
import pytest

from remus.backup.replica import APPLYING, Replica, ReplicaError
from remus.common.capture import PAGE_SIZE

NPAGES = 16
FP = "f" * 32


def full_pages(fill):
    return np.full((NPAGES, PAGE_SIZE), fill, dtype=np.uint8)


def test_commit_then_activatable(tmp_path):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(ReplicaError, match="stale"):
        r.check_activatable(FP)
    r.commit(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), full_pages(7), b"dev1")
    r.commit(2, False, 2.0, np.array([3], dtype=np.uint32), full_pages(9)[:1], b"dev2")
    r.check_activatable(FP)
    with pytest.raises(ReplicaError, match="different guest"):
        r.check_activatable("0" * 32)
    r.close()
    again = Replica(tmp_path)
    assert again.state.epoch == 2 and again.state.state == "committed"
    data = np.fromfile(again.ram_file, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    assert (data[3] == 9).all() and (data[4] == 7).all()
    assert again.device_file.read_bytes() == b"dev2"


def test_crash_while_applying_is_detected_after_restart(tmp_path):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE)
    r.commit(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), full_pages(1), b"d")
    r._set(state=APPLYING, epoch=2)  # what a crash in the middle of commit() leaves
    r.close()
    with pytest.raises(ReplicaError, match="torn"):
        Replica(tmp_path).check_activatable(FP)


def test_first_checkpoint_of_session_must_be_full(tmp_path):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(ReplicaError, match="full"):
        r.commit(1, False, 1.0, np.array([1], dtype=np.uint32), full_pages(1)[:1], b"d")


def test_activated_replica_is_never_resumed_twice(tmp_path):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE)
    r.commit(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), full_pages(1), b"d")
    r.mark_activated()
    with pytest.raises(ReplicaError, match="already activated"):
        Replica(tmp_path).check_activatable(FP)


def test_unreadable_record(tmp_path):
    (tmp_path / "replica.json").write_text("{not json")
    with pytest.raises(ReplicaError, match="unreadable"):
        Replica(tmp_path)


def test_precopy_rounds_leave_the_replica_stale_until_a_consistent_checkpoint(tmp_path):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(ReplicaError, match="must be full"):
        r.commit(1, False, 1.0, np.array([1], np.uint32), full_pages(1)[:1], b"", precopy=True)
    r.commit(1, True, 1.0, np.arange(NPAGES, dtype=np.uint32), full_pages(7), b"", precopy=True)
    r.commit(2, False, 2.0, np.array([2], np.uint32), full_pages(8)[:1], b"", precopy=True)
    with pytest.raises(ReplicaError, match="stale"):
        r.check_activatable(FP)  # pre-copy rounds are never a resumable state
    r.commit(3, False, 3.0, np.array([3], np.uint32), full_pages(9)[:1], b"dev3")
    r.check_activatable(FP)
    data = np.fromfile(r.ram_file, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    assert (data[1] == 7).all() and (data[2] == 8).all() and (data[3] == 9).all()
    with pytest.raises(ReplicaError, match="after the replica became resumable"):
        r.commit(4, False, 4.0, np.array([1], np.uint32), full_pages(1)[:1], b"", precopy=True)


# ---- streaming while syncing, staging once resumable, sparse disks

from remus.backup.replica import SYNCING, punch_zeroes  # noqa: E402
from remus.backup.staging import StagedData  # noqa: E402
from remus.common.protocol import DISK_EXTENT, ZERO_EXTENT  # noqa: E402

DISK = 64 << 20


def disk_session(tmp_path):
    r = Replica(tmp_path)
    r.begin_session("s1", FP, NPAGES * PAGE_SIZE, PAGE_SIZE, [DISK, DISK])
    return r


def allocated(path) -> int:
    import os
    return os.stat(path).st_blocks * 512


def test_a_sync_streams_into_the_replica_and_commits_with_the_device_state(tmp_path):
    r = disk_session(tmp_path)
    r.apply_pages(np.arange(NPAGES, dtype=np.uint32), full_pages(4))
    r.write_disk(0, np.array([(1 << 20, 4096)], DISK_EXTENT), b"d" * 4096)
    r.write_disk(1, np.array([(0, 512)], DISK_EXTENT), b"e" * 512)
    r.zero_disk(0, np.array([(0, DISK)], ZERO_EXTENT)[:0])  # nothing to zero is fine
    r.round_applied(1, True)
    assert r.state.state == SYNCING and r.state.ram_complete
    with pytest.raises(ReplicaError):
        r.check_activatable(FP)
    r.apply_pages(np.array([2], np.uint32), full_pages(6)[:1])
    r.commit_streamed(2, False, 5.0, b"dev", True)
    r.check_activatable(FP)
    assert (r.pages[2] == 6).all() and (r.pages[3] == 4).all()
    assert (tmp_path / "device.state").read_bytes() == b"dev"
    assert (tmp_path / "replica.disk").read_bytes()[1 << 20:(1 << 20) + 4096] == b"d" * 4096
    assert (tmp_path / "replica.disk1").read_bytes()[:513] == b"e" * 512 + b"\0"
    assert r.disk_files(2) == [tmp_path / "replica.disk", tmp_path / "replica.disk1"]
    assert r.disk_files(0) == []
    with pytest.raises(ReplicaError, match="streamed data into a replica in state committed"):
        r.apply_pages(np.array([2], np.uint32), full_pages(1)[:1])  # resumable: staging only


def test_a_staged_checkpoint_reaches_the_replica_only_at_commit(tmp_path):
    r = disk_session(tmp_path)
    r.apply_pages(np.arange(NPAGES, dtype=np.uint32), full_pages(4))
    r.write_disk(0, np.array([(0, 8192)], DISK_EXTENT), b"a" * 8192)
    r.commit_streamed(1, True, 1.0, b"dev1", True)
    staged = StagedData(tmp_path)
    staged.add_pages(np.array([5], np.uint32), full_pages(9)[:1])
    staged.add_disk(0, np.array([(0, 512), (20 << 20, 512)], DISK_EXTENT), b"b" * 1024)
    staged.add_disk(1, np.array([(4096, 3)], DISK_EXTENT), b"xyz")
    staged.add_zeroes(0, np.array([(4096, 4096)], ZERO_EXTENT))
    disk = (tmp_path / "replica.disk").read_bytes()
    assert disk[:8192] == b"a" * 8192 and (r.pages[5] == 4).all()  # untouched while staged
    r.commit(2, False, 2.0, np.empty(0, np.uint32), np.empty((0, PAGE_SIZE), np.uint8), b"dev2",
             staged=staged)
    staged.discard()
    disk = (tmp_path / "replica.disk").read_bytes()
    assert disk[:512] == b"b" * 512 and disk[512:4096] == b"a" * 3584
    assert disk[4096:8192] == bytes(4096) and disk[20 << 20:(20 << 20) + 512] == b"b" * 512
    assert (tmp_path / "replica.disk1").read_bytes()[4096:4099] == b"xyz"
    assert (r.pages[5] == 9).all() and r.state.state == "committed" and r.state.epoch == 2
    assert not list(tmp_path.glob("staging*"))  # the staging file leaves nothing behind


def test_zeroed_ranges_are_punched_out_so_the_replica_stays_sparse(tmp_path):
    r = disk_session(tmp_path)
    r.write_disk(0, np.array([(0, 8 << 20)], DISK_EXTENT), b"x" * (8 << 20))
    assert allocated(tmp_path / "replica.disk") >= 8 << 20
    r.zero_disk(0, np.array([(4096, (8 << 20) - 4096), (16 << 20, 48 << 20)], ZERO_EXTENT))
    assert allocated(tmp_path / "replica.disk") <= 64 << 10
    data = (tmp_path / "replica.disk").read_bytes()
    assert data[:4096] == b"x" * 4096 and data[4096:] == bytes(DISK - 4096)


def test_punch_falls_back_to_writing_zeroes(tmp_path, monkeypatch):
    import remus.backup.replica as replica
    monkeypatch.setattr(replica, "_fallocate", lambda *a: (ctypes_set_errno(95), -1)[1])
    path = tmp_path / "f"
    path.write_bytes(b"y" * (3 << 20))
    import os
    fd = os.open(path, os.O_WRONLY)
    try:
        punch_zeroes(fd, 100, (2 << 20) + 5)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:100] == b"y" * 100 and data[100:(2 << 20) + 105] == bytes((2 << 20) + 5)
    assert data[(2 << 20) + 105:] == b"y" * (len(data) - (2 << 20) - 105)


def ctypes_set_errno(value: int) -> None:
    import ctypes
    ctypes.set_errno(value)


def test_a_record_of_the_single_disk_format_still_reads(tmp_path):
    import json
    (tmp_path / "replica.json").write_text(json.dumps({
        "format": 1, "state": "committed", "fingerprint": FP, "session": "s", "epoch": 3,
        "taken_at": 1.0, "committed_at": 2.0, "ram_size": 4096, "page_size": 4096,
        "disk_size": 1 << 20, "disk_synced": True, "generation": 2, "ram_complete": True}))
    assert Replica(tmp_path).state.disk_sizes == [1 << 20]


def test_staged_pages_beyond_the_memory_cap_go_to_the_staging_file(tmp_path):
    r = disk_session(tmp_path)
    r.apply_pages(np.arange(NPAGES, dtype=np.uint32), full_pages(1))
    r.commit_streamed(1, True, 1.0, b"dev1", False)
    staged = StagedData(tmp_path, memory_cap=2 * PAGE_SIZE)
    for i in range(NPAGES):  # one page a frame: the first two stay in memory
        staged.add_pages(np.array([i], np.uint32), np.full((1, PAGE_SIZE), 10 + i, np.uint8))
    assert staged._page_bytes == 2 * PAGE_SIZE and len(staged._spilled) == NPAGES - 2
    assert staged.disk_bytes == (NPAGES - 2) * PAGE_SIZE
    r.commit(2, False, 2.0, np.empty(0, np.uint32), np.empty((0, PAGE_SIZE), np.uint8), b"dev2",
             staged=staged)
    assert [int(r.pages[i][0]) for i in range(NPAGES)] == [10 + i for i in range(NPAGES)]
    staged.discard()
    assert staged._page_bytes == 0 and not staged._spilled
