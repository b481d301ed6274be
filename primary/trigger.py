"""When to take the next checkpoint, and why: a pure decision the replicator's loop asks.

A checkpoint is due every interval. With `[replication] trigger = "output"` the
guest's output waiting in the NIC buffers brings it forward, to no sooner than
min_interval_ms after the last pause, nor sooner than max_rate allows: a reply
then waits for one checkpoint (pause, transfer, ack) instead of also waiting for
the end of its interval. A quiet guest holds no output, so it pauses no more
often than before. A handover, or the epoch's disk writes reaching their cap,
take one at once.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

INTERVAL, OUTPUT, DISK, HANDOVER = "interval", "output", "disk", "handover"


def pause_trigger(now: float, due: float, last: float, min_gap: float, output_waiting: bool,
                  handover: bool = False, disk_full: bool = False,
                  rate_floor: float = -math.inf) -> tuple[str | None, float]:
    """(why to pause now, or None) and, when None, the time to look again. `due` is
    the end of the interval, `last` the start of the last pause (monotonic s),
    `rate_floor` the earliest an output-triggered pause may come (see rate_floor)."""
    if handover:
        return HANDOVER, now
    if disk_full:
        return DISK, now
    if now >= due:
        return INTERVAL, now
    earliest = max(last + min_gap, rate_floor)
    if output_waiting:
        return (OUTPUT, now) if now >= earliest else (None, min(due, earliest))
    return None, due


def next_due(trigger: str, due: float, paused_at: float, interval: float) -> float:
    """The end of the next interval. On the interval's own pause the cadence is kept
    (due + interval), so that the loop's own latency does not stretch every epoch;
    a pause brought forward, or one more than an interval late, starts it afresh."""
    if trigger == INTERVAL and paused_at - due < interval:
        return due + interval
    return paused_at + interval


def rate_floor(recent_pauses: Sequence[float], max_rate: int) -> float:
    """The earliest output may bring a pause under `max_rate` pauses in any second
    (0: no such bound): one second after the max_rate-th latest pause. Pauses on
    the interval count towards the rate but are never held back by it."""
    if max_rate <= 0 or len(recent_pauses) < max_rate:
        return -math.inf
    return recent_pauses[-max_rate] + 1.0
