"""Hostile clients cannot break protection: after each attack, checkpoints go on,
the replica stays resumable, and a failover still loses no reply a client saw."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remus.common.localpair import (Pair, PowerSwitch, assert_nothing_taken_back, ha_config,
                                    rss_anon, wait_until)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("fence_dummy") or shutil.which("/usr/sbin/fence_dummy")),
                                 reason="fence_dummy (Debian fence-agents) is not installed")]

LAN_OPTIONS = {"second_link": True}  # the conftest's `lan` fixture
ATTACKER = Path(__file__).with_name("stream_attacker.py")
FLOOD = Path(__file__).with_name("frame_flood.py")
GUEST_MAC = "52:54:00:12:34:56"  # the demo config's NIC
NOFILE = 1024  # systemd's default soft limit, as if the units did not raise it
ATTACK_S = 25


def _attack(lan, pair, idle: int, stalled: int) -> subprocess.Popen:
    return subprocess.Popen([*lan.exec("client"), sys.executable, str(ATTACKER),
                             lan.addr["backup"], str(pair.stream_port), str(idle), str(stalled),
                             str(ATTACK_S)], stdout=subprocess.PIPE, text=True)


def test_a_connection_flood_on_the_stream_port_does_not_stop_protection(guest_image, lan, tmp_path):
    extra, status = ha_config(lan, tmp_path)
    pair = Pair(guest_image, tmp_path, lan=lan, extra_config=extra)
    pair.daemon_wrapper = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"]
    switch = PowerSwitch(status, pair)
    attacker = None
    try:
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        probe = pair.start_probe("inc")
        session = pair.replica_record()["session"]
        log_before = len(pair.backup.log())
        attacker = _attack(lan, pair, idle=2000, stalled=50)
        started = time.time()
        for _ in range(3):  # checkpoints keep committing throughout the attack
            time.sleep(5)
            record = pair.committed_after(time.time() - 1, timeout=10)
            assert record["session"] == session, "the attack broke the session"
        minutes = (time.time() - started) / 60
        grown = len(pair.backup.log()) - log_before
        assert grown / minutes < 8_000, f"the backup's log grew {grown} bytes in {minutes:.1f} min"
        pair.primary.kill9()
        killed_at = time.time()
        switch.start()
        pair.backup.wait_for(r"activated epoch=", 60)
        assert_nothing_taken_back(probe, killed_at, "after a failover under attack")
        summary = json.loads(attacker.communicate(timeout=ATTACK_S + 30)[0])
        attacker = None
        assert summary["opened"] >= 2050, summary
        assert "stream-connections-refused" in pair.backup.log()
    finally:
        if attacker is not None:
            attacker.kill()
        switch.done.set()
        pair.cleanup()


def test_a_flood_of_input_to_a_paused_guest_keeps_the_primary_bounded(guest_image, lan, tmp_path):
    """The backup is lost and the guest waits (on_backup_loss = pause), so QEMU takes no
    input: a million frames towards the guest must not pile up in the primary."""
    pair = Pair(guest_image, tmp_path, lan=lan,
                config_overrides={"primary": {"on_backup_loss": "pause"}})
    try:
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        pair.backup.kill9()
        pair.primary.wait_for(r"guest-paused", 30)
        pid = pair.primary.proc.pid
        before = rss_anon(pid)
        flood = subprocess.run([*lan.exec("client"), sys.executable, str(FLOOD), "eth0",
                                GUEST_MAC, "1000000"], capture_output=True, text=True, timeout=300)
        assert flood.returncode == 0, flood.stderr
        grown = rss_anon(pid) - before
        assert grown < 32 << 20, f"the primary grew {grown >> 20} MiB under an input flood"
        assert "netbuf-inbound-full" in pair.primary.log(), "the flood never reached the cap"
        assert pair.primary.proc.poll() is None
    finally:
        pair.cleanup()
