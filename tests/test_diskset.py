from hypothesis import given, settings, strategies as st
from hypothesis_budget import examples

from remus.common import diskset
from remus.common.diskset import WriteSet, is_zero
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


def test_is_zero():
    assert is_zero(bytes(10 << 20)) and is_zero(b"")
    assert not is_zero(bytes(9 << 20) + b"\1")
    assert not is_zero(b"\1" + bytes(100))
