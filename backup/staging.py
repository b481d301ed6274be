"""A consistent checkpoint held aside until its end frame is verified.

Once the replica is resumable, a checkpoint must not touch it before it is
whole: the primary may die in the middle of sending it. Its pages (the dirty
set of one epoch) are kept in memory up to `memory_cap`, the rest of them and
its disk data go to an unnamed staging file beside the replica (gone with its
descriptor, so a crash leaves nothing behind); they are read back a frame at
a time when the checkpoint commits. So a guest that dirties much of its RAM
in one epoch costs disk, not the daemon's memory.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


MEMORY_CAP = 64 << 20  # staged pages kept in memory; beyond, they go to the file


class StagedData:
    def __init__(self, directory: Path, memory_cap: int = MEMORY_CAP):
        self.dir = directory
        self.memory_cap = memory_cap
        self._pages: list[tuple[np.ndarray, np.ndarray]] = []
        self._page_bytes = 0
        self._spilled: list[tuple[np.ndarray, int, tuple]] = []  # indices, file position, shape
        self._disk: list[tuple[int, np.ndarray, int, int]] = []  # disk, table, file position, bytes
        self._zeroes: list[tuple[int, np.ndarray]] = []
        self._file = None
        self._end = 0

    @property
    def disk_bytes(self) -> int:
        return self._end

    def add_pages(self, indices: np.ndarray, pages: np.ndarray) -> None:
        if self._page_bytes + pages.nbytes <= self.memory_cap:
            self._pages.append((indices, pages))
            self._page_bytes += pages.nbytes
        else:
            self._spilled.append((indices, self._append(memoryview(pages).cast("B")), pages.shape))

    def add_disk(self, disk: int, extents: np.ndarray, data: bytes) -> None:
        self._disk.append((disk, extents, self._append(memoryview(data)), len(data)))

    def _append(self, view: memoryview) -> int:
        """Write `view` at the end of the staging file; its position there."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.dir, prefix="staging-")
        start, pos, fd = self._end, 0, self._file.fileno()
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], start + pos)
        self._end += len(view)
        return start

    def _read(self, pos: int, size: int) -> bytes:
        data = os.pread(self._file.fileno(), size, pos)
        if len(data) != size:
            raise OSError(f"staging file in {self.dir} is short at {pos}: {len(data)} of {size}")
        return data

    def add_zeroes(self, disk: int, extents: np.ndarray) -> None:
        self._zeroes.append((disk, extents))

    def apply(self, write_pages: Callable, write_extents: Callable, zero_extents: Callable) -> None:
        """Into the replica: pages, disk data, zeroed ranges (all disjoint, so in any order)."""
        for indices, pages in self._pages:
            write_pages(indices, pages)
        for indices, pos, shape in self._spilled:
            size = shape[0] * shape[1]
            write_pages(indices, np.frombuffer(self._read(pos, size), np.uint8).reshape(shape))
        for disk, extents, pos, size in self._disk:
            write_extents(disk, extents, memoryview(self._read(pos, size)))
        for disk, extents in self._zeroes:
            zero_extents(disk, extents)

    def discard(self) -> None:
        self._pages.clear()
        self._page_bytes = 0
        self._spilled.clear()
        self._disk.clear()
        self._zeroes.clear()
        self._end = 0
        if self._file is not None:
            self._file.close()
            self._file = None
