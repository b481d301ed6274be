"""Test helper, never installed: a broken primary for test_output_commit's negative
control of early release.

Put this directory first on PYTHONPATH of a primary daemon and set
REMUS_TEST_RELEASE_AT_SEND=1: the primary then lets a checkpoint's held output out
as soon as the checkpoint is sent, without waiting for the backup's ack (the bug
an output-commit system must not have). Production code has no such switch; this
patches the replicator from outside.
"""
import os
import sys

if os.environ.get("REMUS_TEST_RELEASE_AT_SEND"):
    from remus.primary.replicator import Replicator

    _complete = Replicator._complete

    async def _release_first(self, stats, sent_at, before=None):
        await self.hooks.commit(stats.epoch)  # the break: out before the ack
        await _complete(self, stats, sent_at, before)

    Replicator._complete = _release_first
    print("TEST-BREAK: this primary releases output before the backup acknowledges",
          file=sys.stderr, flush=True)
