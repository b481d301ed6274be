"""Disk replication with checkpoint-consistent commit, with a real guest and client.

The guest writes numbered records to its disk (record N in sector N, synced)
and reports each one; the primary host is killed at random moments. After the
failover the replica disk must hold every record whose report the client saw,
and the guest's RAM counter must agree with its disk."""
import random
import signal
import time

import pytest

from remus.common.localpair import Pair, records_on_disk, wait_until
from remus.common.probe import read_replies

pytestmark = pytest.mark.integration


def replies(probe) -> list[int]:
    return [v for _, v in read_replies(probe.log())]


def test_replica_disk_holds_every_reported_record(guest_image, lan, tmp_path):
    rng = random.Random(4)
    for run in range(10):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        pair = Pair(guest_image, workdir, lan=lan, disk_mib=16)
        try:
            pair.start_backup()
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
            assert on_disk >= reported, (f"run {run}: the client saw record {reported}, "
                                         f"the disk holds only 1..{on_disk}")
            assert in_ram == on_disk, f"run {run}: guest RAM says {in_ram}, its disk holds 1..{on_disk}"
        finally:
            pair.cleanup()
