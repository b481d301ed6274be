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
