"""Per-epoch figures and their summaries."""
from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO


@dataclass
class EpochStats:
    epoch: int
    full: bool
    taken_at: float      # unix time of the pause
    pause_ms: float      # guest stopped: stop .. cont
    capture_ms: float    # dirty scan + copy, inside the pause
    device_ms: float     # device state save, inside the pause
    dirty_pages: int
    device_bytes: int
    disk_bytes: int      # guest disk writes carried by this checkpoint
    wire_bytes: int      # bytes sent for this checkpoint, framing included
    send_ms: float       # encode + send, guest running
    ack_ms: float        # last byte sent .. ack received
    trigger: str = "interval"  # why it was taken: interval, output, disk, handover
    stop_ms: float = 0.0       # inside the pause: QMP stop until the guest is stopped
    resume_ms: float = 0.0     # inside the pause: preresume hooks + QMP cont
    in_flight: int = 0         # earlier checkpoints still unacknowledged when it was taken


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class EpochLog:
    """Keeps a window of recent epochs and optionally appends every epoch as JSON."""

    def __init__(self, path: Path | None = None, window: int = 1000):
        self.recent: deque[EpochStats] = deque(maxlen=window)
        self.listeners: list = []  # called with each EpochStats (metrics)
        self._out: IO[str] | None = open(path, "a", buffering=1) if path else None

    def add(self, stats: EpochStats) -> None:
        self.recent.append(stats)
        for listener in self.listeners:
            listener(stats)
        if self._out is not None:
            self._out.write(json.dumps(asdict(stats)) + "\n")

    def summary(self) -> dict:
        incr = [s for s in self.recent if not s.full]
        pauses = [s.pause_ms for s in incr]
        span = (incr[-1].taken_at - incr[0].taken_at) if len(incr) > 1 else 0.0
        return {
            "epochs": len(incr),
            "checkpoints_per_s": (len(incr) - 1) / span if span > 0 else 0.0,
            "pause_p50_ms": percentile(pauses, 0.5),
            "pause_p99_ms": percentile(pauses, 0.99),
            "dirty_pages_p50": percentile([s.dirty_pages for s in incr], 0.5),
            "wire_bytes_p50": percentile([s.wire_bytes for s in incr], 0.5),
            "ack_p50_ms": percentile([s.ack_ms for s in incr], 0.5),
            "bytes_per_s": sum(s.wire_bytes for s in incr[1:]) / span if span > 0 else 0.0,
            "output_triggered": sum(s.trigger == "output" for s in incr),
        }

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
