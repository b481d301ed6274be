"""Failover under Pacemaker: the backup resumes the guest only when promoted.

With `[cluster] manager = "pacemaker"`, Pacemaker owns membership and fencing:
the failover judge still says when the primary is lost, but the backup only
reports it and waits. Pacemaker fences the lost node, then promotes this one
(ocf:remus:remus runs `remusctl promote`), and the gate turns that into the
verdict TakingOver acts on, without fencing again.

The takeover window (common/takeover.py) holds as without Pacemaker: a lost
primary may release output once the window has passed, so a replica not
promoted by then is stale, and the gate refuses to resume it.
"""
from __future__ import annotations

from dataclasses import dataclass

from remus.backup.failover import FAILOVER, WAIT, FailoverJudge, Verdict


@dataclass
class PromotionGate:
    judge: FailoverJudge
    window_s: float
    promoted: Verdict | None = None

    def refusal(self, now: float, stream_live: bool) -> str | None:
        """Why this replica may not be promoted now (None: it may)."""
        self.expire(now)
        judge = self.judge
        if judge.stale:
            return f"the replica is stale: {judge.stale_reason}"
        if not judge.resumable:
            return "no committed checkpoint of a session here: nothing to resume"
        if judge.handover is None and (stream_live or judge.lost_at is None):
            return "the primary is still sending checkpoints: demote it first"
        return None

    def promote(self, now: float, stream_live: bool) -> str | None:
        """Pacemaker's promote: the refusal, or None once the verdict is set."""
        refused = self.refusal(now, stream_live)
        if refused is None:
            handover = self.judge.handover is not None
            reason = ("promoted by the cluster manager after the primary handed the guest "
                      "over" if handover else "promoted by the cluster manager (it fenced "
                      "the lost primary)")
            self.promoted = Verdict(FAILOVER, reason, fence=not handover)
        return refused

    def expire(self, now: float) -> None:
        """Past the takeover window after a loss, the replica is stale."""
        judge = self.judge
        if (judge.lost_at is not None and judge.handover is None and not judge.stale
                and now - judge.lost_at > self.window_s):
            judge.mark_stale(f"not promoted within the takeover window ({self.window_s:g} s "
                             "after the primary was lost): it may have released output "
                             "this replica lacks")

    def decide(self, verdict: Verdict, now: float) -> Verdict:
        """The verdict to act on: the promotion once Pacemaker asked for it; until
        then the judge's, a failover turned into a wait."""
        if self.promoted is not None:
            return self.promoted
        self.expire(now)
        if verdict.action != FAILOVER:
            return verdict
        return Verdict(WAIT, f"{verdict.reason}; waiting for the cluster manager to "
                             "promote this node (it fences the lost one first)")
