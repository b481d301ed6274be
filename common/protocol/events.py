"""The events the protocol objects return to the daemons, and the checkpoint a backup stages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Welcome:
    session: str
    generation: int = 0


@dataclass(frozen=True)
class Rejected:
    """The backup refused the session. `generation` is the highest it knows to have
    held the guest; `supersedes`: that is newer than the primary's and the backup is
    authenticated (TLS), so the primary's copy is stale and must stand down. From an
    unauthenticated backup (plain TCP) the same claim is only a refusal: anyone who
    reaches the primary's connection could have sent it."""
    reason: str
    generation: int = 0
    supersedes: bool = False


@dataclass(frozen=True)
class Acked:
    epoch: int


@dataclass(frozen=True)
class Progress:
    """The backup has received `bytes` of checkpoint `epoch` so far."""
    epoch: int
    bytes: int


@dataclass(frozen=True)
class SessionOpened:
    session: str
    ram_size: int
    page_size: int
    disk_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Send:
    """Bytes the backup daemon must write to the primary."""

    data: bytes


@dataclass(eq=False)
class StagedCheckpoint:
    epoch: int
    full: bool
    taken_at: float
    indices: np.ndarray  # uint32, strictly increasing
    pages: np.ndarray  # (len(indices), page_size) uint8, NEW contents
    device_state: bytes
    disk_synced: bool = False
    precopy: bool = False  # a pre-copy round: pages only, not a resumable state
    pages_received: int = 0  # pages in this checkpoint (streamed ones too)


@dataclass(frozen=True, eq=False)
class CheckpointStaged:
    checkpoint: StagedCheckpoint


@dataclass(frozen=True)
class PeerBye:
    reason: str


@dataclass(frozen=True)
class PeerHandover:
    """The primary's guest is stopped for good after checkpoint `epoch`: take over."""

    epoch: int
    reason: str



@dataclass(frozen=True, eq=False)
class PagesReceived:
    """Streaming: one pages frame of checkpoint `epoch`, decoded (new contents)."""
    epoch: int
    indices: np.ndarray  # uint32, strictly increasing
    pages: np.ndarray    # (len(indices), page_size) uint8


@dataclass(frozen=True, eq=False)
class DiskWritten:
    """One disk frame of checkpoint `epoch`: extents of mirrored disk `disk` and their bytes."""
    epoch: int
    disk: int
    extents: np.ndarray  # DISK_EXTENT
    data: bytes


@dataclass(frozen=True, eq=False)
class DiskZeroed:
    """One zero frame of checkpoint `epoch`: ranges of disk `disk` that read as zeroes."""
    epoch: int
    disk: int
    extents: np.ndarray  # ZERO_EXTENT


@dataclass(frozen=True, eq=False)
class InputReceived:
    """Frames the primary handed to the guest after the barrier of `after_epoch`."""

    after_epoch: int
    frames: list[bytes]
    nic: int = 0
