"""Test helper, never installed: a broken backup for test_disk's negative control.

Put this directory first on PYTHONPATH of a backup daemon and set
REMUS_TEST_DROP_BACKUP_DISK_WRITES=1: the backup then drops the disk writes of
every staged checkpoint (it still commits their RAM and device state), so its
replica disk misses records the guest reported. Production code has no such
switch; this patches the receiver from outside.
"""
import os
import sys

if os.environ.get("REMUS_TEST_DROP_BACKUP_DISK_WRITES"):
    from remus.backup import receiver
    from remus.common.protocol import DiskWritten

    _destination = receiver.Receiver._destination

    def _dropping(self, conn, event, streaming):
        if isinstance(event, DiskWritten) and not streaming:
            return (lambda: None,)
        return _destination(self, conn, event, streaming)

    receiver.Receiver._destination = _dropping
    print("TEST-BREAK: this backup drops the disk writes of staged checkpoints",
          file=sys.stderr, flush=True)
