"""When to take the next checkpoint, and why: a pure decision the replicator's loop asks.

A checkpoint is due every interval. With `[replication] trigger = "output"` the
guest's output waiting in the NIC buffers brings it forward, to no sooner than
min_interval_ms after the last pause: a reply then waits for one checkpoint
(pause, transfer, ack) instead of also waiting for the end of its interval. A
quiet guest holds no output, so it pauses no more often than before. A
handover, or the epoch's disk writes reaching their cap, take one at once.
"""
from __future__ import annotations

INTERVAL, OUTPUT, DISK, HANDOVER = "interval", "output", "disk", "handover"


def pause_trigger(now: float, due: float, last: float, min_gap: float, output_waiting: bool,
                  handover: bool = False, disk_full: bool = False) -> tuple[str | None, float]:
    """(why to pause now, or None) and, when None, the time to look again. `due` is
    the end of the interval, `last` the start of the last pause (monotonic s)."""
    if handover:
        return HANDOVER, now
    if disk_full:
        return DISK, now
    if now >= due:
        return INTERVAL, now
    earliest = last + min_gap
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
