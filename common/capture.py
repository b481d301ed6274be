"""Dirty-page capture: which 4 KiB pages of guest RAM changed since the last checkpoint.

Two modes behind one interface:
- compare: keep a shadow copy of RAM and compare against it at each pause
  (works on any kernel; costs one RAM-sized copy and a memory scan);
- softdirty: ask the kernel which pages QEMU wrote (/proc/PID/pagemap bit 55
  after clearing with /proc/PID/clear_refs = 4); needs CONFIG_MEM_SOFT_DIRTY.

Both copy the dirty pages into a staging array while the guest is paused, so
the guest can resume before anything is compressed or sent.

Pre-copy rounds run while the guest runs, so they need no consistent copy:
`precopy_batches` hands out the round's pages a batch at a time, read as they
go (a page the guest changes after it was read is found by the next round).
Memory then stays at one batch, however big the guest, beyond compare's shadow.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remus.common import log

_log = log.get("remus.capture")

PAGE_SIZE = 4096
SOFT_DIRTY_BIT = 55
PAGEMAP_ENTRY = 8
CLEAR_SOFT_DIRTY = b"4"
_SCAN_BLOCK = 256  # pages per memcmp: unchanged blocks are skipped in one call

_libc = ctypes.CDLL(None)  # CDLL calls release the GIL
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


@dataclass
class Captured:
    """Pages copied out of a paused guest."""
    indices: np.ndarray          # uint32, ascending
    new_pages: np.ndarray        # (n, PAGE_SIZE) uint8, copies
    previous_pages: np.ndarray | None = None  # what the backup holds for those pages, if known
    full: bool = False


class RamView:
    """The daemon's own read-only mapping of the guest RAM file."""

    def __init__(self, path: Path, size: int):
        if size % PAGE_SIZE:
            raise ValueError(f"RAM size {size} is not a multiple of {PAGE_SIZE}")
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDONLY)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ValueError(f"RAM file {path} is {actual} bytes, expected {size}")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self.words = self.pages.view(np.uint64)

    @property
    def npages(self) -> int:
        return self.pages.shape[0]

    def close(self) -> None:
        self.pages = self.words = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # a staging array still references it; freed with it


class CompareCapture:
    name = "compare"

    def __init__(self, ram: RamView, threads: int = 2):
        self.ram = ram
        self.shadow: np.ndarray | None = None
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="compare")
        # Blocks whose shadow is all zeros are compared against a small zero
        # buffer that stays in cache, halving the memory read for unused RAM.
        self._zeros = np.zeros(_SCAN_BLOCK * PAGE_SIZE, dtype=np.uint8)
        self._zero_block = np.zeros(0, dtype=bool)

    def _is_zero(self, addr: int, size: int) -> bool:
        return _memcmp(addr, self._zeros.ctypes.data, size) == 0

    def _refresh_zero_blocks(self, blocks) -> None:
        base, n = self.shadow.ctypes.data, self.ram.npages
        for blk in map(int, blocks):
            a = blk * _SCAN_BLOCK
            self._zero_block[blk] = self._is_zero(base + a * PAGE_SIZE,
                                                  (min(a + _SCAN_BLOCK, n) - a) * PAGE_SIZE)

    def full(self) -> Captured:
        self.shadow = np.array(self.ram.pages)  # copy: baseline for later compares
        nblocks = -(-self.ram.npages // _SCAN_BLOCK)
        self._zero_block = np.zeros(nblocks, dtype=bool)
        self._refresh_zero_blocks(range(nblocks))
        indices = np.arange(self.ram.npages, dtype=np.uint32)
        return Captured(indices, self.shadow, None, full=True)

    def _scan(self, start: int, stop: int) -> list[np.ndarray]:
        # The scan is memory-bound: memcmp reads both copies once, with no
        # temporaries, and stops at the first difference. Only a block that
        # differs is compared page by page, vectorised.
        live, shadow, zeros = self.ram.pages.ctypes.data, self.shadow.ctypes.data, self._zeros.ctypes.data
        live64, shadow64 = self.ram.words, self.shadow.view(np.uint64)
        zero_block = self._zero_block
        found = []
        for a in range(start, stop, _SCAN_BLOCK):
            b = min(a + _SCAN_BLOCK, stop)
            size = (b - a) * PAGE_SIZE
            if zero_block[a // _SCAN_BLOCK]:
                if _memcmp(live + a * PAGE_SIZE, zeros, size):
                    found.append(np.flatnonzero(live64[a:b].any(axis=1)) + a)
            elif _memcmp(live + a * PAGE_SIZE, shadow + a * PAGE_SIZE, size):
                found.append(np.flatnonzero((live64[a:b] != shadow64[a:b]).any(axis=1)) + a)
        return found

    def precopy_batches(self, full: bool, batch: int):
        """A pre-copy round as (indices, new pages, previous pages or None) batches; the
        shadow follows what was handed out. The first (full) round builds the shadow."""
        n = self.ram.npages
        if full:
            self.shadow = np.empty_like(self.ram.pages)  # filled batch by batch
            self._zero_block = np.zeros(-(-n // _SCAN_BLOCK), dtype=bool)
            for a in range(0, n, batch):
                b = min(a + batch, n)
                self.shadow[a:b] = self.ram.pages[a:b]
                self._refresh_zero_blocks(range(a // _SCAN_BLOCK, -(-b // _SCAN_BLOCK)))
                yield np.arange(a, b, dtype=np.uint32), self.shadow[a:b], None
            return
        indices = self._changed()
        for a in range(0, len(indices), batch):
            idx = indices[a:a + batch]
            new, prev = self.ram.pages[idx], self.shadow[idx]
            self.shadow[idx] = new
            self._refresh_zero_blocks(np.unique(idx // _SCAN_BLOCK))
            yield idx, new, prev

    def _changed(self) -> np.ndarray:
        n = self.ram.npages
        # Split on block boundaries so a block's zero flag applies to all of it.
        step = -(-n // self.threads // _SCAN_BLOCK) * _SCAN_BLOCK
        parts = [p for part in self._pool.map(lambda a: self._scan(a, min(a + step, n)),
                                               range(0, n, step)) for p in part]
        return np.concatenate(parts).astype(np.uint32) if parts else np.empty(0, np.uint32)

    def capture(self) -> Captured:
        """At a pause: find and copy the changed pages. Shadow is updated later."""
        assert self.shadow is not None, "full() must run first"
        indices = self._changed()
        return Captured(indices, self.ram.pages[indices])

    def after_resume(self, captured: Captured) -> None:
        """With the guest running again: remember the previous copies, update the shadow."""
        if captured.full or self.shadow is None:
            return
        captured.previous_pages = self.shadow[captured.indices]
        self.shadow[captured.indices] = captured.new_pages
        self._refresh_zero_blocks(np.unique(captured.indices // _SCAN_BLOCK))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.shadow = None


def dirty_indices_from_pagemap(entries: bytes | np.ndarray) -> np.ndarray:
    """Page numbers whose pagemap entry has the soft-dirty bit (55) set."""
    words = np.frombuffer(entries, dtype="<u8") if not isinstance(entries, np.ndarray) else entries
    return np.flatnonzero((words >> np.uint64(SOFT_DIRTY_BIT)) & np.uint64(1)).astype(np.uint32)


def find_mapping(pid: int, path: Path) -> tuple[int, int]:
    """(start, end) of the mapping of `path` in process `pid`, from /proc/PID/maps.

    A writable mapping wins over a read-only one: soft-dirty bits are per
    mapping, and only the one the guest RAM is written through (QEMU's) gets
    them. A process that also reads the file (as the daemon's RamView does)
    has a read-only mapping of the same file that never gets a dirty bit."""
    target = str(path.resolve())
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append(("w" not in fields[1], start, end))
    if not found:
        raise LookupError(f"process {pid} has no mapping of {target}")
    _read_only, start, end = min(found)
    return start, end


def softdirty_supported() -> tuple[bool, str]:
    """Probe on our own process: clear, write a page, see bit 55 set."""
    buf = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf[0] = 1
        addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
        with open("/proc/self/clear_refs", "wb", buffering=0) as f:
            f.write(CLEAR_SOFT_DIRTY)
        buf[0] = 2
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(addr // PAGE_SIZE * PAGEMAP_ENTRY)
            entry = f.read(PAGEMAP_ENTRY)
        if len(entry) != PAGEMAP_ENTRY:
            return False, "cannot read /proc/self/pagemap"
        if not dirty_indices_from_pagemap(entry).size:
            return False, "kernel does not track soft-dirty pages (CONFIG_MEM_SOFT_DIRTY unset)"
        return True, "soft-dirty bit set after a write"
    except OSError as exc:
        return False, f"soft-dirty probe failed: {exc.strerror or exc}"
    finally:
        buf.close()


class SoftDirtyCapture:
    name = "softdirty"

    def __init__(self, ram: RamView, qemu_pid: int):
        self.ram = ram
        self.pid = qemu_pid
        start, end = find_mapping(qemu_pid, ram.path)
        if end - start < ram.size:
            raise LookupError(f"QEMU maps {end - start} bytes of {ram.path}, expected {ram.size}")
        self._offset = start // PAGE_SIZE * PAGEMAP_ENTRY
        self._pagemap = open(f"/proc/{qemu_pid}/pagemap", "rb", buffering=0)

    def _clear(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "wb", buffering=0) as f:
            f.write(CLEAR_SOFT_DIRTY)

    def full(self) -> Captured:
        pages = np.array(self.ram.pages)
        self._clear()
        return Captured(np.arange(self.ram.npages, dtype=np.uint32), pages, None, full=True)

    def _dirty(self) -> np.ndarray:
        entries = os.pread(self._pagemap.fileno(), self.ram.npages * PAGEMAP_ENTRY, self._offset)
        return dirty_indices_from_pagemap(entries)

    def capture(self) -> Captured:
        indices = self._dirty()
        new_pages = self.ram.pages[indices]
        self._clear()  # still paused: every write after this is seen next time
        return Captured(indices, new_pages)

    def precopy_batches(self, full: bool, batch: int):
        """A pre-copy round, batch by batch: the bits are cleared before the pages are
        read, so a page written after its read is dirty again next round."""
        indices = np.arange(self.ram.npages, dtype=np.uint32) if full else self._dirty()
        self._clear()
        for a in range(0, len(indices), batch):
            idx = indices[a:a + batch]
            yield idx, self.ram.pages[idx], None

    def after_resume(self, captured: Captured) -> None:
        pass  # no shadow copy: pages go out without an XOR base

    def close(self) -> None:
        self._pagemap.close()


def make_capture(mode: str, ram: RamView, qemu_pid: int, threads: int = 2):
    """Pick the capture for `mode` (auto|compare|softdirty), falling back loudly."""
    if mode in ("auto", "softdirty"):
        ok, why = softdirty_supported()
        if ok:
            return SoftDirtyCapture(ram, qemu_pid)
        if mode == "softdirty":
            _log.warning("softdirty-unavailable", reason=why, fallback="compare")
        else:
            _log.info("capture-mode", mode="compare", reason=why)
    return CompareCapture(ram, threads)
