"""What a host is and how it is doing: the typed status every role reports.

The same values travel as JSON over the control socket (`remusctl status`,
drills, re-protection) and feed the metrics endpoint, so the names of roles
and states are defined here once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum


class RoleName(str, Enum):
    """The role a host publishes in its heartbeat and its status."""
    PRIMARY = "primary"      # runs the guest and checkpoints it to the other host
    BACKUP = "backup"        # keeps the replica; takes the guest over when the primary is lost
    FENCING = "fencing"      # a backup making sure the lost primary is off (beats only)
    STALE = "stale"          # a backup whose replica may not be resumed (beats only)
    ACTIVE = "active"        # runs a taken-over guest, unprotected until re-protected
    STOOD_DOWN = "stood-down"  # stopped its copy: a newer generation holds the guest

    def __str__(self) -> str:
        return self.value


# Roles whose host holds the guest or is about to: a starting host must not boot it.
HOLDING_ROLES = frozenset({RoleName.PRIMARY, RoleName.ACTIVE, RoleName.FENCING})


class PrimaryState(str, Enum):
    CONNECTING = "connecting"    # no session with the backup (yet, or again)
    SYNCING = "syncing"          # the first full checkpoint (pre-copy) is on its way
    PROTECTING = "protecting"    # checkpoints are committed: output flows as they are
    DEGRADED = "degraded"        # the backup is lost; the guest runs unprotected
    PAUSED = "paused"            # the backup is lost; the guest waits (on_backup_loss = pause)
    HANDED_OVER = "handed-over"  # the guest was handed to the backup
    HOLDING = "holding"          # the backup is lost; output held until it can no longer take over

    def __str__(self) -> str:
        return self.value


class BackupState(str, Enum):
    WAITING = "waiting"    # no session
    SYNCING = "syncing"    # a session's first full checkpoint is on its way
    STANDBY = "standby"    # a consistent checkpoint is committed: resumable
    STALE = "stale"        # the primary runs on without us: not resumable
    FENCING = "fencing"    # the primary is lost; making sure it is off
    ACTIVATING = "activating"  # resuming the guest from the replica

    def __str__(self) -> str:
        return self.value


class ActiveState(str, Enum):
    ACTIVE = "active"
    REPROTECTING = "reprotecting"

    def __str__(self) -> str:
        return self.value


@dataclass
class Status:
    """Fields every role reports; a role's status adds its own."""
    role: RoleName
    host: str                 # which host of the config this is: "primary" or "backup"
    guest: str
    state: str
    pid: int
    generation: int
    session: str | None
    last_committed_epoch: int
    heartbeat: dict | None = None

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "usage":
                out.update(value)  # the guest's CPU and memory figures, flat
            else:
                out[f.name] = value.value if isinstance(value, Enum) else value
        return out


@dataclass
class PrimaryStatus(Status):
    qemu_pid: int | None = None
    interval_ms: int = 0
    trigger: str = "interval"             # [replication] trigger in effect
    output_triggered: int | None = None   # of the recent checkpoints, taken for output
    in_flight: int | None = None          # checkpoints sent, not yet acknowledged
    pipeline: int = 1                     # [replication] pipeline: how many may be in flight
    capture: str = ""
    checkpoints_per_s: float | None = None
    pause_p50_ms: float | None = None
    pause_p99_ms: float | None = None
    bytes_per_s: float | None = None
    ack_p50_ms: float | None = None
    held_output: dict | None = None
    input_copied: dict = field(default_factory=dict)
    sync: dict | None = None
    disk_throttled_s: float | None = None
    output_hold_s_left: float | None = None  # while holding: until the output flows again
    usage: dict = field(default_factory=dict)


@dataclass
class BackupStatus(Status):
    replica: dict = field(default_factory=dict)
    fencing: dict = field(default_factory=dict)
    last_failover: dict | None = None
    standby_guest: dict = field(default_factory=lambda: {"state": "off"})
    stale_reason: str | None = None


@dataclass
class ActiveStatus(Status):
    qemu_pid: int | None = None
    last_failover: dict | None = None
    usage: dict = field(default_factory=dict)


def starting(host: str, guest: str, pid: int, generation: int) -> Status:
    return Status(RoleName(host), host, guest, "starting", pid, generation, None, 0)
