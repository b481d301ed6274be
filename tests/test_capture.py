import ctypes
import mmap
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from remus.common.capture import (PAGE_SIZE, CompareCapture, RamView, SoftDirtyCapture,
                                  dirty_indices_from_pagemap, find_mapping, make_capture,
                                  softdirty_supported)

NPAGES = 3000  # not a multiple of the scan block or of the thread split


@pytest.fixture
def ram(tmp_path):
    path = tmp_path / "guest.ram"
    path.write_bytes(os.urandom(NPAGES * PAGE_SIZE))
    fd = os.open(path, os.O_RDWR)
    writer = mmap.mmap(fd, NPAGES * PAGE_SIZE)
    os.close(fd)
    view = RamView(path, NPAGES * PAGE_SIZE)
    yield view, writer
    view.close()
    writer.close()


def poke(writer, page, offset=0, value=None):
    pos = page * PAGE_SIZE + offset
    writer[pos] = (writer[pos] + 1) % 256 if value is None else value


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compare_finds_exactly_the_changed_pages(ram, threads):
    view, writer = ram
    cap = CompareCapture(view, threads)
    full = cap.full()
    assert full.full and len(full.indices) == NPAGES
    assert len(cap.capture().indices) == 0
    changed = [0, 1, 1023, 1024, 1500, 2047, 2999]
    for i, page in enumerate(changed):
        poke(writer, page, offset=(i * 977) % PAGE_SIZE)  # first, middle and last words
    poke(writer, 5, PAGE_SIZE - 1)
    expect = sorted(set(changed + [5]))
    got = cap.capture()
    assert got.indices.tolist() == expect
    assert np.array_equal(got.new_pages, view.pages[expect])
    before = np.array(cap.shadow[expect])
    cap.after_resume(got)
    assert np.array_equal(got.previous_pages, before)
    assert len(cap.capture().indices) == 0  # shadow caught up


def test_compare_copies_are_taken_at_capture_time(ram):
    view, writer = ram
    cap = CompareCapture(view, 2)
    cap.full()
    poke(writer, 7, value=1)
    got = cap.capture()
    snapshot = got.new_pages.copy()
    poke(writer, 7, value=2)  # the guest runs on after the pause
    assert np.array_equal(got.new_pages, snapshot)


def test_pagemap_bit_55():
    entries = np.zeros(10, dtype="<u8")
    entries[[1, 4, 9]] = np.uint64(1 << 55)
    entries[2] = np.uint64((1 << 63) | (1 << 62) | 0x1234)  # present + swapped, not soft-dirty
    entries[4] |= np.uint64(1 << 63)
    assert dirty_indices_from_pagemap(entries.tobytes()).tolist() == [1, 4, 9]


def test_find_mapping_of_own_file(ram):
    view, _ = ram
    start, end = find_mapping(os.getpid(), view.path)
    assert end - start == NPAGES * PAGE_SIZE
    with pytest.raises(LookupError):
        find_mapping(os.getpid(), view.path.with_name("nope"))


def test_find_mapping_prefers_the_writable_mapping(ram):
    # The test process maps the file twice: the read-only view and the writer.
    # Only the writer's mapping gets soft-dirty bits (seen in the kernel lab).
    view, writer = ram
    start, _end = find_mapping(os.getpid(), view.path)
    assert start == ctypes.addressof(ctypes.c_char.from_buffer(writer))


def test_auto_falls_back_to_compare_without_softdirty(ram):
    view, _ = ram
    ok, why = softdirty_supported()
    cap = make_capture("auto", view, os.getpid())
    assert cap.name == ("softdirty" if ok else "compare")
    if not ok:
        assert "soft-dirty" in why or "pagemap" in why
    cap.close()


@pytest.fixture
def softdirty_break(monkeypatch):
    """The kernel lab's negative control (`make test-kernel`): with
    REMUS_TEST_SOFTDIRTY_BREAK set, the soft-dirty capture is broken on purpose
    and the soft-dirty tests must fail, which shows they test something.
    keep-bits: the bits are never cleared; drop-page: the first dirty page is lost."""
    mode = os.environ.get("REMUS_TEST_SOFTDIRTY_BREAK")
    if mode == "keep-bits":
        monkeypatch.setattr(SoftDirtyCapture, "_clear", lambda self: None)
    elif mode == "drop-page":
        dirty = SoftDirtyCapture._dirty
        monkeypatch.setattr(SoftDirtyCapture, "_dirty", lambda self: dirty(self)[1:])
    elif mode:
        raise ValueError(f"REMUS_TEST_SOFTDIRTY_BREAK={mode!r}: keep-bits or drop-page")


def test_softdirty_on_own_process(ram, softdirty_break):
    ok, why = softdirty_supported()
    if not ok:
        pytest.skip(f"soft-dirty page tracking unavailable on this kernel: {why}")
    view, writer = ram
    cap = SoftDirtyCapture(view, os.getpid())
    cap.full()
    poke(writer, 3)
    poke(writer, 2500)
    got = cap.capture()
    assert {3, 2500} <= set(got.indices.tolist())
    cap.close()


# A separate process writes the guest RAM file through its own shared mapping,
# as QEMU does; one line of page numbers per round on stdin, "done" when written.
WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
ram = mmap.mmap(fd, int(sys.argv[2]))
print("ready", flush=True)
for line in sys.stdin:
    for page in map(int, line.split()):
        pos = page * 4096 + page * 7 % 4096
        ram[pos] = (ram[pos] + 1) % 256
    print("done", flush=True)
"""


def test_softdirty_finds_exactly_the_pages_another_process_wrote(ram, softdirty_break):
    ok, why = softdirty_supported()
    if not ok:
        pytest.skip(f"soft-dirty page tracking unavailable on this kernel: {why}")
    view, _ = ram
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(view.path), str(NPAGES * PAGE_SIZE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "ready\n"
        cap = SoftDirtyCapture(view, writer.pid)
        cap.full()
        rng = random.Random(20)
        for _round in range(6):
            pages = sorted(rng.sample(range(NPAGES), rng.randint(1, 300)))
            writer.stdin.write(" ".join(map(str, pages)) + "\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == "done\n"
            got = cap.capture()
            # Every page written since the last capture, and nothing else: a
            # page missed is lost on failover, a bit not cleared resends forever.
            assert got.indices.tolist() == pages
            assert np.array_equal(got.new_pages, view.pages[pages])
        assert cap.capture().indices.tolist() == []
        cap.close()
    finally:
        writer.kill()
        writer.wait()


def test_compare_sees_changes_in_zero_and_nonzero_blocks(tmp_path):
    npages = 1300
    path = tmp_path / "ram"
    data = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    data[300:600] = 5  # block 1 and part of block 2 non-zero, the rest zero
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDWR)
    writer = mmap.mmap(fd, npages * PAGE_SIZE)
    os.close(fd)
    view = RamView(path, npages * PAGE_SIZE)
    cap = CompareCapture(view, 2)
    cap.full()
    poke(writer, 10, 4095)    # zero block
    poke(writer, 400, 0, 0)   # non-zero block, byte set to zero
    poke(writer, 1299, 17)    # last, partial block
    got = cap.capture()
    assert got.indices.tolist() == [10, 400, 1299]
    cap.after_resume(got)
    poke(writer, 10, 4095, 0)  # back to zero: its block's shadow is no longer all-zero
    poke(writer, 11, 1)
    assert cap.capture().indices.tolist() == [10, 11]
    view.close()
    writer.close()


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 599), st.integers(0, PAGE_SIZE - 1),
                                 st.integers(0, 255)), max_size=40),
       threads=st.integers(1, 3))
def test_compare_property_reports_exactly_the_pages_whose_content_changed(tmp_path_factory, writes, threads):
    npages = 600
    path = tmp_path_factory.mktemp("ram") / "ram"
    rng = np.random.default_rng(len(writes))
    data = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
    data[:300] = 0  # zero blocks and non-zero blocks both
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDWR)
    writer = mmap.mmap(fd, npages * PAGE_SIZE)
    os.close(fd)
    view = RamView(path, npages * PAGE_SIZE)
    cap = CompareCapture(view, threads)
    cap.full()
    for page, offset, value in writes:
        poke(writer, page, offset, value)
    now = np.frombuffer(writer, dtype=np.uint8).reshape(npages, PAGE_SIZE)
    expect = np.flatnonzero((now != data).any(axis=1)).tolist()  # a write of the same byte is no change
    got = cap.capture()
    assert got.indices.tolist() == expect
    cap.after_resume(got)
    assert cap.capture().indices.tolist() == []
    del now
    cap.close()
    view.close()
    writer.close()
