"""Restart safety with real daemons on namespace hosts: restarting either service never
resumes a stale image and never loses the protected guest."""
import random
import shutil
import time

import pytest

from remus.common.localpair import Pair, PowerSwitch, ha_config, wait_for_replies, wait_until
from remus.common.probe import read_replies, taken_back

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("fence_dummy") or shutil.which("/usr/sbin/fence_dummy")),
                                 reason="fence_dummy (Debian fence-agents) is not installed")]

LAN_OPTIONS = {"second_link": True}  # the conftest's `lan` fixture


def assert_nothing_taken_back(probe) -> None:
    values = [v for _, v in read_replies(probe.log())]
    assert values and not taken_back(values), f"replies taken back: {taken_back(values)}"


def test_restarting_the_primary_service_hands_the_guest_over_both_ways(guest_image, lan,
                                                                      tmp_path):
    extra, power_a = ha_config(lan, tmp_path)
    power_b = tmp_path / "power-backup"
    pair = Pair(guest_image, tmp_path, lan=lan, extra_config=extra, reprotect="auto")
    try:
        pair.protect()
        probe = pair.start_probe()
        wait_for_replies(probe, 3, "the client's first replies")

        # `systemctl restart remus-primary` on host A: a planned handover, no fencing.
        host_a, host_b = pair.primary, pair.backup
        host_a.signal(15)
        host_a.wait_for(r"handed-over epoch=", 30)
        assert host_a.proc.wait(30) == 0
        host_b.wait_for(r"failover-complete .*fence_ms=0\.0+ generation=2", 30)
        assert "fence-attempt" not in host_b.log() and power_a.read_text() == "on"
        wait_for_replies(probe, 3, "replies from host B")
        pair.start_primary()  # ... and the restart: A sees B holding the guest
        pair.primary.wait_for(r"peer-holds-the-guest", 30)
        pair.primary.wait_for(r"backup-start", 30)
        assert "qemu-launch" not in pair.primary.log(), "host A started a second copy"
        # [replication] reprotect = "auto": B protects the guest as soon as A stands by.
        host_b.wait_for(r"reprotect-auto", 30)
        host_b.wait_for(r"protecting epoch=\d+", 120)
        wait_for_replies(probe, 3, "replies with B protected by A")

        # The same on host B, now the primary: the guest comes back to A.
        host_a = pair.primary
        host_b.signal(15)
        host_b.wait_for(r"handed-over epoch=", 30)
        assert host_b.proc.wait(30) == 0
        host_a.wait_for(r"failover-complete .*fence_ms=0\.0+ generation=3", 30)
        assert "fence-attempt" not in host_a.log() and power_b.read_text() == "on"
        wait_for_replies(probe, 3, "replies from host A again")
        probe.stop()
        assert_nothing_taken_back(probe)
    finally:
        pair.cleanup()


def test_restarting_the_backup_service_resyncs_cleanly_and_still_fails_over(guest_image, lan,
                                                                              tmp_path):
    extra, power_a = ha_config(lan, tmp_path)
    pair = Pair(guest_image, tmp_path, lan=lan, extra_config=extra)
    switch = PowerSwitch(power_a, pair)
    rng = random.Random(26)
    try:
        pair.protect()
        probe = pair.start_probe()
        wait_for_replies(probe, 3, "the client's first replies")
        sessions = {pair.replica_record()["session"]}
        for how in ("SIGTERM", "SIGKILL", "SIGKILL"):
            # Stop the backup at a random point of the epoch, commits included.
            marker = len(pair.primary.log())
            wait_until(lambda: pair.replica_record().get("state") == "committed", 30, "a commit")
            time.sleep(rng.uniform(0, 0.2))  # a random moment of the epoch, not a sync point
            if how == "SIGTERM":
                pair.backup.stop()
            else:
                pair.backup.kill9()
            pair.primary.wait_for(r"backup-lost", 30, start=marker)
            pair.primary.wait_for(r"output-held", 10, start=marker)
            if how == "SIGTERM":
                # A backup stopping on purpose beats that it will not take over: the
                # primary releases at once instead of waiting out the takeover window.
                pair.primary.wait_for(r"output-released .*reason=\"the backup's beats say", 10,
                                      start=marker)
                wait_for_replies(probe, 2, "replies while the backup is away (unprotected)")
            pair.start_backup()
            pair.primary.wait_for(r"protecting epoch=\d+", 90, start=marker)
            record = pair.replica_record()
            assert record["state"] == "committed" and record["session"] not in sessions, record
            sessions.add(record["session"])
        wait_for_replies(probe, 3, "replies after the last resync")
        # The resynchronised replica really is the guest: fail over to it.
        pair.primary.kill9()
        switch.start()
        pair.backup.wait_for(r"failover-complete", 60)
        wait_for_replies(probe, 3, "replies from the activated guest")
        probe.stop()
        assert_nothing_taken_back(probe)
    finally:
        switch.done.set()
        pair.cleanup()
