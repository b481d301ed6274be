"""When may the backup take over? A pure judge, fed facts, giving verdicts.

With a heartbeat, the primary is presumed dead only when the checkpoint
stream AND every heartbeat link have gone quiet. The stream alone failing
while beats still arrive means the primary is alive and, as Remus does, runs
on unprotected: the replica is then stale and must never be resumed until a
new session has resynchronised it. Without a heartbeat the stream is the only
signal, which cannot tell a dead primary from a partition (unsafe; logged).
"""
from __future__ import annotations

from dataclasses import dataclass

WAIT = "wait"          # nothing to do (yet)
FAILOVER = "failover"  # fence the primary, then activate
STALE = "stale"        # the primary lives on without us: the replica is no longer resumable


@dataclass(frozen=True)
class Verdict:
    action: str
    reason: str
    fence: bool = True  # False: the primary itself said its guest is stopped


class FailoverJudge:
    def __init__(self, heartbeat: bool, grace_s: float):
        """`grace_s`: how long after the stream is lost the heartbeat gets to
        declare the peer lost (miss * interval plus a margin)."""
        self.heartbeat = heartbeat
        self.grace_s = grace_s
        self.resumable = False   # a checkpoint of the current session is committed
        self.lost_at: float | None = None
        self.lost_reason = ""
        self.peer_alive = heartbeat
        self.stale = False
        self.stale_reason: str | None = None
        self.handover: str | None = None

    def session_started(self) -> None:
        self.resumable = False
        self.lost_at = None
        self.stale = False
        self.stale_reason = None

    def mark_stale(self, reason: str) -> None:
        """The replica must not be resumed until a new session resynchronises it."""
        self.stale, self.stale_reason = True, reason

    def committed(self) -> None:
        self.resumable = True

    def stream_lost(self, now: float, reason: str) -> None:
        if self.lost_at is None:
            self.lost_at, self.lost_reason = now, reason

    def session_failed(self, now: float, reason: str) -> None:
        """The session broke on this side (a local error, not the primary's doing). The
        primary sees its stream drop and runs on without us, so the replica is stale
        unless the heartbeat says the primary is gone as well. Without a heartbeat
        nothing can say so: the replica is stale, never resumed on a local failure."""
        if self.heartbeat:
            self.stream_lost(now, reason)
        else:
            self.mark_stale(reason)

    def peer(self, alive: bool) -> None:
        self.peer_alive = alive

    def handed_over(self, now: float, reason: str) -> None:
        """The primary stopped its guest after a checkpoint we committed and asks us to
        take over: no fencing, no waiting."""
        self.handover = reason
        self.lost_at = now

    def verdict(self, now: float) -> Verdict:
        if self.handover is not None and self.resumable:
            return Verdict(FAILOVER, f"the primary handed the guest over ({self.handover})",
                           fence=False)
        if self.lost_at is None or not self.resumable or self.stale:
            return Verdict(WAIT, "")
        if not self.heartbeat:
            return Verdict(FAILOVER, f"{self.lost_reason} (no heartbeat configured: the stream "
                                     "is the only sign of life)")
        if not self.peer_alive:
            return Verdict(FAILOVER, f"{self.lost_reason}, and the primary is silent on every "
                                     "heartbeat link")
        if now - self.lost_at < self.grace_s:
            return Verdict(WAIT, "stream lost; waiting for the heartbeat's verdict")
        reason = (f"{self.lost_reason}, but the primary still beats: it is alive and runs "
                  "unprotected; not activating, the replica is stale until it resynchronises")
        self.mark_stale(reason)
        return Verdict(STALE, reason)
