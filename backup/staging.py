"""A consistent checkpoint held aside until its end frame is verified.

Once the replica is resumable, a checkpoint must not touch it before it is
whole: the primary may die in the middle of sending it. Its pages (the dirty
set of one epoch) are kept in memory; its disk data, which can be as large as
the primary's per-epoch cap, goes to an unnamed staging file beside the
replica (gone with its descriptor, so a crash leaves nothing behind) and is
read back a frame at a time when the checkpoint commits.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


class StagedData:
    def __init__(self, directory: Path):
        self.dir = directory
        self._pages: list[tuple[np.ndarray, np.ndarray]] = []
        self._disk: list[tuple[int, np.ndarray, int, int]] = []  # disk, table, file position, bytes
        self._zeroes: list[tuple[int, np.ndarray]] = []
        self._file = None
        self._end = 0

    @property
    def disk_bytes(self) -> int:
        return self._end

    def add_pages(self, indices: np.ndarray, pages: np.ndarray) -> None:
        self._pages.append((indices, pages))

    def add_disk(self, disk: int, extents: np.ndarray, data: bytes) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.dir, prefix="staging-")
        view, pos, fd = memoryview(data), 0, self._file.fileno()
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], self._end + pos)
        self._disk.append((disk, extents, self._end, len(data)))
        self._end += len(data)

    def add_zeroes(self, disk: int, extents: np.ndarray) -> None:
        self._zeroes.append((disk, extents))

    def apply(self, ram_pages: np.ndarray, write_extents: Callable, zero_extents: Callable) -> None:
        """Into the replica: pages, disk data, zeroed ranges (all disjoint, so in any order)."""
        for indices, pages in self._pages:
            ram_pages[indices] = pages
        for disk, extents, pos, size in self._disk:
            data = os.pread(self._file.fileno(), size, pos)
            if len(data) != size:
                raise OSError(f"staging file in {self.dir} is short at {pos}: {len(data)} of {size}")
            write_extents(disk, extents, memoryview(data))
        for disk, extents in self._zeroes:
            zero_extents(disk, extents)

    def discard(self) -> None:
        self._pages.clear()
        self._disk.clear()
        self._zeroes.clear()
        self._end = 0
        if self._file is not None:
            self._file.close()
            self._file = None
