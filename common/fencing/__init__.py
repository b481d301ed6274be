"""Fencing: make sure the primary is really off before the backup resumes the VM.

Pacemaker's semantics: the `[fencing]` table lists *levels*, tried in order;
a level succeeds only if every device in it succeeds (see ``fencer``). The
table's keys, the kinds of device and how secrets are kept are in ``plan``.

Modules, each importing only modules listed above it:

    plan    the [fencing] table parsed into a FencingPlan (raises ConfigError)
    runner  one bounded, scrubbed run of an agent or command
    fencer  Fencer: the levels run to fence a host, or its agents checked
    retry   fence_with_retry: the plan again, backing off, until fenced or stopped
    cli     `remusctl fence-test` (imports config, so it is not imported here)
"""
from remus.common.fencing.fencer import (STATUS_OFF, STATUS_ON, STATUS_UNKNOWN, DeviceResult,
                                         FenceResult, Fencer)
from remus.common.fencing.plan import (FAILURE_POLICIES, SBIN_PATH, TARGETS, AgentDevice,
                                       CommandDevice, Device, FencingPlan, Secret, parse)
from remus.common.fencing.retry import fence_with_retry
from remus.common.fencing.runner import DETAIL_CHARS, OUTPUT_LIMIT, PIPE_GRACE_S, SCRUBBED

__all__ = [
    "SBIN_PATH", "TARGETS", "FAILURE_POLICIES", "Secret", "AgentDevice", "CommandDevice",
    "Device", "FencingPlan", "parse",
    "OUTPUT_LIMIT", "DETAIL_CHARS", "PIPE_GRACE_S", "SCRUBBED",
    "STATUS_ON", "STATUS_UNKNOWN", "STATUS_OFF", "DeviceResult", "FenceResult", "Fencer",
    "fence_with_retry",
]
