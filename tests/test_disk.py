"""Disk replication with checkpoint-consistent commit, with a real guest and client.

The guest writes numbered records to its disk (record N in sector N, synced)
and reports each one; the primary host is killed at random moments. After the
failover the replica disk must hold every record whose report the client saw,
and the guest's RAM counter must agree with its disk."""
import os
import random
import signal
import time
from pathlib import Path

import pytest

from remus.common.localpair import Pair, records_on_disk, wait_until
from remus.common.probe import read_replies

pytestmark = pytest.mark.integration


BREAK_DIR = Path(__file__).parent / "break_backup_disk"


def replies(probe) -> list[int]:
    return [v for _, v in read_replies(probe.log())]


def kill_primary_while_recording(guest_image, lan, workdir, rng, backup_wrapper=()):
    """One run: records flow, the primary is killed at a random moment, the backup
    takes over. (the last record the client saw, the guest's RAM counter, the
    records 1..N on the replica disk), and the backup's log."""
    pair = Pair(guest_image, workdir, lan=lan, disk_mib=16)
    try:
        pair.daemon_wrapper = list(backup_wrapper)
        pair.start_backup()
        pair.daemon_wrapper = []
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        pair.primary.wait_for(r"disk-synced", 60)
        wait_until(lambda: pair.replica_record().get("disk_synced"), 30,
                   "a committed checkpoint with the disk in sync")
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        probe = pair.start_probe("record")
        wait_until(lambda: len(replies(probe)) >= 3, 30, "the first records")
        time.sleep(rng.uniform(0, 0.4))  # the random kill moment
        probe.kill9()  # the client's view ends here
        pair.primary.kill9()
        reported = max(replies(probe))
        pair.backup.wait_for(r"activated epoch=", 60)
        # A record the guest was writing when the primary died is finished first.
        in_ram = int(wait_until(lambda: pair.try_get("disklast"), 30, "the guest's RAM counter"))
        pair.backup.signal(signal.SIGTERM)  # quit the guest: its disk is then complete
        assert pair.backup.proc.wait(30) == 0
        on_disk = records_on_disk(workdir / "backup" / "replica.disk")
        return reported, in_ram, on_disk, pair.backup.log()
    finally:
        pair.cleanup()


def violations(reported: int, in_ram: int, on_disk: int) -> list[str]:
    """What the disk guarantee forbids in one run's outcome."""
    found = []
    if on_disk < reported:
        found.append(f"the client saw record {reported}, the disk holds only 1..{on_disk}")
    if in_ram != on_disk:
        found.append(f"guest RAM says {in_ram}, its disk holds 1..{on_disk}")
    return found


def test_replica_disk_holds_every_reported_record(guest_image, lan, tmp_path):
    rng = random.Random(4)
    for run in range(10):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        reported, in_ram, on_disk, _ = kill_primary_while_recording(guest_image, lan, workdir, rng)
        assert not violations(reported, in_ram, on_disk), f"run {run}: {violations(reported, in_ram, on_disk)}"


def test_a_backup_that_drops_disk_writes_is_caught(guest_image, lan, tmp_path):
    """Negative control: with the backup's disk writes dropped (a test-side break,
    tests/break_backup_disk), the check above finds the lost records."""
    wrapper = ["env", f"PYTHONPATH={BREAK_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "REMUS_TEST_DROP_BACKUP_DISK_WRITES=1"]
    reported, in_ram, on_disk, backup_log = kill_primary_while_recording(
        guest_image, lan, tmp_path, random.Random(4), backup_wrapper=wrapper)
    assert "TEST-BREAK: this backup drops the disk writes" in backup_log  # the break was in force
    found = violations(reported, in_ram, on_disk)
    assert any("the client saw record" in v for v in found), (
        f"dropping the backup's disk writes went unnoticed: reported {reported}, "
        f"RAM {in_ram}, disk 1..{on_disk}")
