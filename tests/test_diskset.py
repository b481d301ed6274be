from hypothesis import given, settings, strategies as st
from hypothesis_budget import examples

from remus.common import diskset
import pytest

from remus.common.diskset import SealedWrites, WriteSet, is_zero
from remus.common.protocol import DISK_EXTENT, ZERO_EXTENT

SIZE = 1 << 16


def apply(base: bytearray, ws: WriteSet, max_raw: int = 1 << 20) -> list:
    """Apply the set's runs to `base` as the backup would; returns the runs."""
    runs = list(ws.runs(max_raw))
    for run in runs:
        if run.data is None:
            assert run.table.dtype == ZERO_EXTENT
            for off, length in run.table.tolist():
                base[off:off + length] = bytes(length)
            continue
        assert run.table.dtype == DISK_EXTENT
        data, pos = b"".join(run.data), 0
        for off, length in run.table.tolist():
            base[off:off + length] = data[pos:pos + length]
            pos += length
        assert pos == len(data) == run.raw_len
    return runs


writes_strategy = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 5000),
                                     st.integers(0, 255), st.booleans()), max_size=30)


@settings(max_examples=examples(300), deadline=None)
@given(writes_strategy)
def test_coalesced_extents_reproduce_every_write_and_zeroing_in_order(writes):
    model = bytearray(b"\xee" * SIZE)  # the replica's old content: zeroes must overwrite it
    ws = WriteSet()
    for off, length, value, zero in writes:
        length = min(length, SIZE - off)
        if zero:
            model[off:off + length] = bytes(length)
            ws.add_zeroes(off, length)
        else:
            model[off:off + length] = bytes([value]) * length
            ws.add(off, bytes([value]) * length)
    replica = bytearray(b"\xee" * SIZE)
    runs = apply(replica, ws, max_raw=3000)
    assert replica == model
    rows = sorted((o, n) for run in runs for o, n in run.table.tolist())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(rows, rows[1:]))  # sorted, disjoint
    assert [r[0] for r in rows] == [o for run in runs for o, _ in run.table.tolist()]  # in order
    assert ws.bytes == sum(run.raw_len for run in runs)
    assert all(run.raw_len <= 3000 or len(run.table) == 1 for run in runs)


def test_a_huge_zeroed_range_costs_no_data():
    ws = WriteSet()
    ws.add(4096, b"x" * 4096)
    ws.add_zeroes(0, 20 << 30)  # a 20 GiB hole, as a mirror's initial copy reports it
    ws.add(8192, b"y" * 512)
    assert ws.bytes == 512 and ws.cost < 1024
    runs = list(ws.runs())
    assert [(r.data is None, r.table.tolist()) for r in runs] == [
        (True, [(0, 8192)]), (False, [(8192, 512)]), (True, [(8704, (20 << 30) - 8704)])]


def test_big_writes_are_split_and_neighbours_merged(monkeypatch):
    monkeypatch.setattr(diskset, "MAX_EXTENT", 4096)
    ws = WriteSet()
    ws.add(0, b"a" * 10000)
    ws.add(10000, b"b" * 100)
    (run,) = ws.runs()
    assert run.table["length"].tolist() == [4096, 4096, 1908]
    assert run.table["offset"].tolist() == [0, 4096, 8192]
    assert b"".join(run.data) == b"a" * 10000 + b"b" * 100
    assert list(WriteSet().runs()) == []


def test_data_runs_respect_the_frame_limit():
    ws = WriteSet()
    for k in range(10):
        ws.add(k * 1000, b"z" * 1000)
    runs = list(ws.runs(max_raw=2500))
    assert [r.raw_len for r in runs] == [2000] * 5


@pytest.mark.parametrize("data,zero", [
    (b"", True),
    (bytes(1), True),
    (bytes(10 << 20), True),                             # several 4 MiB chunks
    (b"\1" + bytes(100), False),                         # decided by the first 64 bytes
    (bytes(63) + b"\1", False),
    (bytes(64) + b"\1", False),                          # the first byte past the quick check
    (bytes(64) + b"\1" + bytes(100), False),
    (bytes(4 << 20) + b"\1" + bytes(100), False),        # the first byte of the second chunk
    (bytes(9 << 20) + b"\1", False),                     # the very last byte
])
def test_is_zero_looks_at_every_byte(data, zero):
    assert is_zero(data) is zero


def test_empty_writes_and_zeroings_leave_no_extent():
    ws = WriteSet()
    ws.add(100, b"")
    ws.add_zeroes(100, 0)
    ws.add_zeroes(100, -5)
    assert (len(ws), ws.bytes, ws.cost, list(ws.runs())) == (0, 0, 0, [])


# An extent [100, 200) overwritten by a write touching or sharing its bounds:
# the extents left, (offset, length, zero?), and no zero-length remnant (each
# extent counts EXTENT_COST against the epoch cap).
@pytest.mark.parametrize("offset,length,extents", [
    (100, 100, [(100, 100, False)]),                                        # the same range
    (100, 40, [(100, 40, False), (140, 60, True)]),                         # same start
    (160, 40, [(100, 60, True), (160, 40, False)]),                         # same end
    (0, 100, [(0, 100, False), (100, 100, True)]),                          # touches it before
    (200, 50, [(100, 100, True), (200, 50, False)]),                        # touches it after
    (120, 30, [(100, 20, True), (120, 30, False), (150, 50, True)]),        # inside
    (50, 200, [(50, 200, False)]),                                          # covers it
])
def test_overwrite_at_an_extents_bounds_keeps_exactly_the_parts_outside(offset, length, extents):
    ws = WriteSet()
    ws.add_zeroes(100, 100)
    ws.add(offset, b"d" * length)
    runs = [(off, n, r.data is None) for r in ws.runs() for off, n in r.table.tolist()]
    assert runs == extents
    assert len(ws) == len(extents)
    assert ws.cost == length + diskset.EXTENT_COST * len(extents)


def test_sealed_writes_tag_each_disks_runs_in_disk_order():
    a, b, empty = WriteSet(), WriteSet(), WriteSet()
    a.add(0, b"aa")
    a.add_zeroes(10, 5)
    b.add(7, b"bbb")
    sealed = SealedWrites([a, empty, b])
    assert (len(sealed), sealed.bytes) == (3, 5)
    assert [(r.disk, r.data, r.table.tolist()) for r in sealed.runs()] == [
        (0, [b"aa"], [(0, 2)]), (0, None, [(10, 5)]), (2, [b"bbb"], [(7, 3)])]


def zero_rows(ws: WriteSet) -> list:
    return [r.table.tolist() for r in ws.runs()]


def test_adjacent_zeroings_merge_into_one_extent_and_gaps_do_not():
    ws = WriteSet()
    for off in (0, 10, 30, 40):   # [0, 10) [10, 20) adjacent; a gap; [30, 40) [40, 50)
        ws.add_zeroes(off, 10)
    assert len(ws) == 4
    assert zero_rows(ws) == [[(0, 20), (30, 20)]]


def test_zero_runs_hold_at_most_zero_run_max_extents(monkeypatch):
    monkeypatch.setattr(diskset, "ZERO_RUN_MAX", 2)
    ws = WriteSet()
    for k in range(5):
        ws.add_zeroes(k * 100, 10)
    ws.add_zeroes(410, 10)   # adjacent to the last: merged, not a sixth extent
    assert zero_rows(ws) == [[(0, 10), (100, 10)], [(200, 10), (300, 10)], [(400, 20)]]
    assert [(r.disk, r.data, r.table.dtype) for r in ws.runs(disk=3)] == [(3, None, ZERO_EXTENT)] * 3
    # data runs are bounded by bytes, not by their number of extents
    ws = WriteSet()
    for k in range(5):
        ws.add(k * 100, b"d")
    assert [len(r.table) for r in ws.runs()] == [5]


def test_adjacent_writes_merge_up_to_exactly_max_extent(monkeypatch):
    monkeypatch.setattr(diskset, "MAX_EXTENT", 4096)
    ws = WriteSet()
    ws.add(0, b"a" * 2048)
    ws.add(2048, b"b" * 2048)   # together exactly MAX_EXTENT: one extent
    ws.add(4096, b"c")          # one byte more: a new extent
    (run,) = ws.runs()
    assert run.table.tolist() == [(0, 4096), (4096, 1)]


def test_a_data_run_fills_max_raw_exactly_before_a_new_one_starts():
    ws = WriteSet()
    for k in range(5):
        ws.add(k * 1000, b"z" * 1000)
    runs = list(ws.runs(max_raw=2000, disk=2))
    assert [(r.disk, r.table.dtype, r.table.tolist(), r.raw_len) for r in runs] == [
        (2, DISK_EXTENT, [(0, 2000)], 2000), (2, DISK_EXTENT, [(2000, 2000)], 2000),
        (2, DISK_EXTENT, [(4000, 1000)], 1000)]
    assert [r.raw_len for r in ws.runs(max_raw=1999)] == [1000] * 5
    assert [r.raw_len for r in ws.runs(max_raw=1)] == [1000] * 5   # one extent always fits


def test_zero_and_data_runs_alternate_with_their_own_limits():
    ws = WriteSet()
    ws.add_zeroes(0, 10)
    ws.add(10, b"x" * 10)
    ws.add_zeroes(20, 10)
    ws.add(30, b"y" * 10)
    assert [(r.data, r.table.tolist()) for r in ws.runs(max_raw=15)] == [
        (None, [(0, 10)]), ([b"x" * 10], [(10, 10)]), (None, [(20, 10)]), ([b"y" * 10], [(30, 10)])]
