"""The disk writes of one epoch, coalesced: later writes win where they overlap."""
from __future__ import annotations

import bisect

import numpy as np

from remus.common.protocol import DISK_EXTENT
MAX_EXTENT = 4 << 20  # adjacent writes are merged up to this size


class WriteSet:
    """Non-overlapping extents sorted by offset, each with its bytes."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._data: list[bytes] = []
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        # First extent that could overlap: the one starting at or before offset.
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or self._starts[i] + len(self._data[i]) <= offset:
            i += 1
        # Cut the overlapped extents, keeping their parts outside [offset, end).
        head = tail = None
        j = i
        while j < len(self._starts) and self._starts[j] < end:
            s, d = self._starts[j], self._data[j]
            if s < offset:
                head = (s, d[: offset - s])
            if s + len(d) > end:
                tail = (end, d[end - s:])
            j += 1
        removed = self._data[i:j]
        self.bytes -= sum(map(len, removed))
        new = [x for x in (head, (offset, bytes(data)), tail) if x is not None]
        self._starts[i:j] = [s for s, _ in new]
        self._data[i:j] = [d for _, d in new]
        self.bytes += sum(len(d) for _, d in new)

    def extents(self) -> tuple[np.ndarray, bytes]:
        """(offset, length) records and the bytes, adjacent extents merged."""
        starts, chunks = [], []
        for s0, d0 in zip(self._starts, self._data):
            for k in range(0, len(d0), MAX_EXTENT):  # a big write becomes several extents
                s, d = s0 + k, d0[k:k + MAX_EXTENT]
                if starts and starts[-1][0] + starts[-1][1] == s and starts[-1][1] + len(d) <= MAX_EXTENT:
                    starts[-1][1] += len(d)
                else:
                    starts.append([s, len(d)])
                chunks.append(d)
        table = np.array([tuple(x) for x in starts], dtype=DISK_EXTENT)
        return table, b"".join(chunks)
