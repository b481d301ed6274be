"""The disk writes of one epoch, coalesced: later writes win where they overlap.

Zeroed ranges (a mirror's holes, a guest's write-zeroes or discard, a write of
all-zero bytes) are kept as extents without data, so a 20 GiB hole costs a few
bytes here and on the wire, and the backup punches it into its replica.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Iterable, Iterator

import numpy as np

from remus.common.protocol import DISK_EXTENT, MAX_FRAME_RAW, ZERO_EXTENT, DiskRun

MAX_EXTENT = 4 << 20   # adjacent writes are merged up to this size
EXTENT_COST = 128      # what one extent costs in memory here, counted against the cap
ZERO_RUN_MAX = 4096    # zero extents per frame


_ZEROS = bytes(MAX_EXTENT)


def is_zero(data: bytes) -> bool:
    """All zero bytes? (memcmp against a zero buffer; stops at the first non-zero chunk)"""
    if data[:64] != _ZEROS[:min(64, len(data))]:
        return False  # most data: decided without copying the rest
    for k in range(64, len(data), len(_ZEROS)):
        chunk = data[k:k + len(_ZEROS)]
        if chunk != _ZEROS[:len(chunk)]:
            return False
    return True


class WriteSet:
    """Non-overlapping extents sorted by offset, each with its bytes or None (zeroes)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._lens: list[int] = []
        self._data: list[bytes | None] = []
        self.bytes = 0  # data held

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def cost(self) -> int:
        """Memory held, extents' bookkeeping included: what the epoch cap limits."""
        return self.bytes + EXTENT_COST * len(self._starts)

    def add(self, offset: int, data: bytes) -> None:
        if data:
            self._put(offset, len(data), bytes(data))

    def add_zeroes(self, offset: int, length: int) -> None:
        if length > 0:
            self._put(offset, length, None)

    def _put(self, offset: int, length: int, data: bytes | None) -> None:
        end = offset + length
        # First extent that could overlap: the one starting at or before offset.
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or self._starts[i] + self._lens[i] <= offset:
            i += 1
        # Cut the overlapped extents, keeping their parts outside [offset, end):
        # only the first can start before offset, only the last end after end.
        head, tail = [], []
        j = i
        while j < len(self._starts) and self._starts[j] < end:
            s, n, d = self._starts[j], self._lens[j], self._data[j]
            if s < offset:
                head.append((s, offset - s, None if d is None else d[: offset - s]))
            if s + n > end:
                tail.append((end, s + n - end, None if d is None else d[end - s:]))
            j += 1
        self.bytes -= sum(len(d) for d in self._data[i:j] if d is not None)
        new = [*head, (offset, length, data), *tail]
        self._starts[i:j] = [s for s, _, _ in new]
        self._lens[i:j] = [n for _, n, _ in new]
        self._data[i:j] = [d for _, _, d in new]
        self.bytes += sum(len(d) for _, _, d in new if d is not None)

    def runs(self, max_raw: int = MAX_FRAME_RAW, disk: int = 0) -> Iterator[DiskRun]:
        """The extents in offset order, as runs of one kind: data runs of at most
        `max_raw` bytes (adjacent writes merged up to MAX_EXTENT), zero runs of at
        most ZERO_RUN_MAX extents (adjacent ones merged); all tagged as mirrored `disk`."""
        extents = zip(self._starts, self._lens, self._data)
        for zero, group in itertools.groupby(extents, key=lambda e: e[2] is None):
            if zero:
                yield from _zero_runs(group, disk)
            else:
                yield from _data_runs(group, max_raw, disk)


def _zero_runs(extents: Iterable[tuple], disk: int) -> Iterator[DiskRun]:
    """One or more zero runs for consecutive zero extents (at least one)."""
    rows: list[list[int]] = []
    for s, n, _ in extents:
        if len(rows) >= ZERO_RUN_MAX:
            yield DiskRun(_table(rows, ZERO_EXTENT), None, disk)
            rows = []
        if rows and rows[-1][0] + rows[-1][1] == s:
            rows[-1][1] += n
        else:
            rows.append([s, n])
    yield DiskRun(_table(rows, ZERO_EXTENT), None, disk)


def _data_runs(extents: Iterable[tuple], max_raw: int, disk: int) -> Iterator[DiskRun]:
    """One or more data runs for consecutive data extents (at least one)."""
    rows: list[list[int]] = []
    chunks: list[bytes] = []
    size = 0
    for s0, n0, d0 in extents:
        for k in range(0, n0, MAX_EXTENT):  # a big write becomes several extents
            s, d = s0 + k, d0[k:k + MAX_EXTENT]
            if size + len(d) > max_raw and rows:
                yield DiskRun(_table(rows, DISK_EXTENT), chunks, disk)
                rows, chunks, size = [], [], 0
            if rows and rows[-1][0] + rows[-1][1] == s and rows[-1][1] + len(d) <= MAX_EXTENT:
                rows[-1][1] += len(d)
            else:
                rows.append([s, len(d)])
            chunks.append(d)
            size += len(d)
    yield DiskRun(_table(rows, DISK_EXTENT), chunks, disk)


def _table(rows: list[list[int]], dtype: np.dtype) -> np.ndarray:
    return np.array([tuple(r) for r in rows], dtype=dtype)


class SealedWrites:
    """The writes of one epoch on every mirrored disk, in disk order."""

    def __init__(self, sets: list[WriteSet]):
        self.sets = sets

    @property
    def bytes(self) -> int:
        return sum(ws.bytes for ws in self.sets)

    def __len__(self) -> int:
        return sum(len(ws) for ws in self.sets)

    def runs(self, max_raw: int = MAX_FRAME_RAW) -> Iterator[DiskRun]:
        for disk, ws in enumerate(self.sets):
            yield from ws.runs(max_raw, disk)
