import pytest

from remus.primary.netbuf import EpochQueue


def test_frames_leave_only_when_their_epoch_commits():
    q = EpochQueue(cap_bytes=1 << 20)
    q.hold(b"a1")
    q.hold(b"a2")
    q.seal(1)
    q.hold(b"b1")          # produced during epoch 2
    assert q.release(0) == []
    assert q.release(1) == [b"a1", b"a2"]
    q.seal(2)
    q.hold(b"c1")
    q.seal(3)
    assert q.release(3) == [b"b1", b"c1"]   # in order, across epochs
    assert q.held_frames == 0 and q.held_bytes == 0


def test_release_all_keeps_order_and_includes_the_open_epoch():
    q = EpochQueue(1 << 20)
    q.hold(b"1")
    q.seal(5)
    q.hold(b"2")
    assert q.release_all() == [b"1", b"2"]
    assert q.held_frames == 0 and q.released_frames == 2


def test_cap_drops_new_frames_and_counts_them():
    q = EpochQueue(cap_bytes=10)
    assert q.hold(b"x" * 6)
    assert not q.hold(b"y" * 6)
    assert q.dropped_frames == 1 and q.held_bytes == 6
    q.seal(1)
    q.release(1)
    assert q.hold(b"y" * 6)  # room again once released


def test_barriers_must_advance():
    q = EpochQueue(100)
    q.seal(2)
    with pytest.raises(ValueError):
        q.seal(2)
