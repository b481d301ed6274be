"""Holding the guest's output after losing the backup, for the takeover window.

When a session that protected the guest is lost, the backup may be dead, or it
may be cut off and about to fence this host and resume the guest from its last
checkpoint. Output released now could then be taken back. So the output stays
held, the guest running, until the backup can no longer take over
(common/takeover.py: the last byte sent + stream timeout + window + margin),
or until the backup's beats say its replica is stale, or a new session's first
commit releases it. Then it flows again, unprotected.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

from remus.common import log
from remus.common.hooks import Hooks
from remus.common.waiting import cancel_and_wait

_log = log.get("remus.primary")

POLL_S = 0.1
# Test-only: release on backup loss at once, as before the window existed, so a test can
# show what the hold prevents. Never set in production.
RELEASE_AT_ONCE_ENV = "REMUS_TEST_RELEASE_ON_BACKUP_LOSS"


class OutputHold:
    def __init__(self, hooks: Hooks, hold_s: float, backup_gave_up: Callable[[], bool]):
        self.hooks = hooks
        self.hold_s = hold_s
        if os.environ.get(RELEASE_AT_ONCE_ENV):
            self.hold_s = 0.0
            _log.warning("output-hold-off", detail=f"{RELEASE_AT_ONCE_ENV} is set (a test "
                         "switch): output is released as soon as the backup is lost, which "
                         "lets a partition take back replies clients saw (unsafe)")
        self.backup_gave_up = backup_gave_up  # the backup beats that its replica is stale
        self.until: float | None = None       # monotonic; None: not holding
        self.started_at = 0.0
        self._task: asyncio.Task | None = None
        self.on_release: Callable[[], None] = lambda: None

    @property
    def active(self) -> bool:
        return self.until is not None

    def left_s(self) -> float | None:
        return None if self.until is None else max(0.0, round(self.until - time.monotonic(), 1))

    def start(self, last_sent_at: float) -> None:
        """Hold from now until `last_sent_at` + hold_s (a hold already running goes on:
        its deadline is the earlier session's, which the backup still counts from)."""
        if self.active:
            return
        # What is held joins the open epoch: the next session's first commit (its
        # full checkpoint covers the state that produced it) or the window's end frees it.
        self.hooks.carry_over()
        self.started_at = time.monotonic()
        self.until = last_sent_at + self.hold_s
        self._task = asyncio.create_task(self._release_when_safe(), name="output-hold")
        _log.warning("output-held", hold_s=round(self.until - self.started_at, 1),
                     detail="backup lost: the guest runs on, its output held until the backup "
                            "can no longer take over (takeover window), then released")

    async def end(self) -> None:
        """A new session committed a checkpoint: what was held went out with it."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        self._task, self.until = None, None

    async def _release_when_safe(self) -> None:
        while True:
            left = self.until - time.monotonic()
            if left <= 0:
                why = "the takeover window passed: the backup can no longer resume the guest"
                break
            if self.backup_gave_up():
                why = "the backup's beats say its replica is stale: it will not resume the guest"
                break
            await asyncio.sleep(min(left, POLL_S))
        held_s = time.monotonic() - self.started_at
        self.until = None
        await self.hooks.unprotected()
        self.on_release()
        _log.warning("output-released", held_s=round(held_s, 3), reason=why,
                     detail="the guest runs unprotected until a backup returns")
