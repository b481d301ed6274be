"""The takeover window: how long after losing its primary a backup may still resume
the guest, and so how long a primary that lost its backup must hold its output.

A backup resumes the guest from its last committed checkpoint. That is safe only
if no output produced after that checkpoint ever left the primary. So the two
sides share one bound, computed from the same config:

- the backup resumes the guest only before `lost_at + W`, where lost_at is when it
  noticed the stream's loss and W = takeover_window_s(cfg): the heartbeat's
  verdict (grace_s), one full round of the fence plan (under Pacemaker, its
  fence timeout: it fences, then promotes), and a margin to prepare and resume
  the guest. Past it, the replica is stale (only an operator's
  --activate-now uses it);
- the primary that loses its backup holds the guest's output until
  `last_sent + stream_timeout + W + margin`: the backup notices the stream's
  loss at most stream_timeout after the last byte the primary sent, so by then
  it either resumed the guest or never will. The primary releases sooner if the
  backup's beats say it gave up (its replica stale), and a new session's first
  commit releases it as usual.

Both clocks are monotonic; only durations cross hosts.
"""
from __future__ import annotations

from remus.common.config import Config
from remus.common.peering import grace_s

ACTIVATION_MARGIN_S = 5.0  # QEMU launched without a standby, device state loaded, busy host
HOLD_MARGIN_S = 1.0        # the backup's check before resuming, clock rates, scheduling


def takeover_window_s(cfg: Config) -> float:
    """W: after noticing the stream's loss, how long the backup may still resume."""
    plan = cfg.fence_plan
    if plan.takeover_window_s is not None:
        return plan.takeover_window_s
    detect = grace_s(cfg) if cfg.heartbeat.links else 0.0
    fencing = cfg.cluster.fence_timeout_s if cfg.pacemaker else plan.round_bound_s()
    return detect + fencing + ACTIVATION_MARGIN_S


def output_hold_s(cfg: Config) -> float:
    """How long after its last byte to the backup a primary must hold its output."""
    return cfg.replication.stream_timeout_ms / 1000 + takeover_window_s(cfg) + HOLD_MARGIN_S
