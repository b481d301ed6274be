"""Frames the primary handed to the guest since the last committed checkpoint; pure.

The resumed guest continues from the last committed checkpoint, which never
saw these frames. Handing them to it again turns a lost request into an
answered one at once, instead of after the client's retransmission timeout
(1 s for a SYN). Replay is an optimisation, not a guarantee: anything the
log does not hold is recovered by the client's TCP as before, and a frame
given twice is a duplicate TCP discards.
"""
from __future__ import annotations

from collections import deque


class InputLog:
    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self._groups: deque[tuple[int, int, list[bytes]]] = deque()  # (after_epoch, nic, frames)
        self.held_bytes = 0
        self.dropped_frames = 0

    def add(self, after_epoch: int, frames: list[bytes], nic: int = 0) -> None:
        size = sum(map(len, frames))
        if self.held_bytes + size > self.cap_bytes:
            self.dropped_frames += len(frames)  # the client's TCP will resend them
            return
        self._groups.append((after_epoch, nic, frames))
        self.held_bytes += size

    def committed(self, epoch: int) -> None:
        """Checkpoint `epoch` is committed: input from before its barrier is in it."""
        while self._groups and self._groups[0][0] < epoch:
            _, _, frames = self._groups.popleft()
            self.held_bytes -= sum(map(len, frames))

    def replay(self, epoch: int) -> list[tuple[int, bytes]]:
        """(NIC, frame) to hand to a guest resumed from checkpoint `epoch`, in order."""
        return [(nic, f) for after, nic, frames in self._groups if after >= epoch for f in frames]

    def clear(self) -> None:
        self._groups.clear()
        self.held_bytes = 0
