import numpy as np
from hypothesis import given, settings, strategies as st

from remus.common import diskset
from remus.common.diskset import WriteSet

SIZE = 1 << 16


def apply(base: bytearray, table, data: bytes) -> None:
    pos = 0
    for off, length in table.tolist():
        base[off:off + length] = data[pos:pos + length]
        pos += length
    assert pos == len(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 5000), st.integers(0, 255)),
                max_size=30))
def test_coalesced_extents_reproduce_every_write_in_order(writes):
    model = bytearray(SIZE)
    ws = WriteSet()
    for off, length, value in writes:
        length = min(length, SIZE - off)
        chunk = bytes([value]) * length
        model[off:off + length] = chunk
        ws.add(off, chunk)
    table, data = ws.extents()
    replica = bytearray(SIZE)
    apply(replica, table, data)
    assert replica == model
    offs, lens = table["offset"].astype(int), table["length"].astype(int)
    assert np.all(offs[1:] >= offs[:-1] + lens[:-1])  # sorted, non-overlapping
    assert ws.bytes == len(data)


def test_big_writes_are_split_and_neighbours_merged(monkeypatch):
    monkeypatch.setattr(diskset, "MAX_EXTENT", 4096)
    ws = WriteSet()
    ws.add(0, b"a" * 10000)
    ws.add(10000, b"b" * 100)
    table, data = ws.extents()
    assert table["length"].tolist() == [4096, 4096, 1908] and table["offset"].tolist() == [0, 4096, 8192]
    assert data == b"a" * 10000 + b"b" * 100
    assert len(WriteSet().extents()[0]) == 0
