"""Heartbeat and fencing with real daemons on namespace hosts, the real fence_dummy agent,
and a test "power switch" that cuts the primary host when its status file says off."""
import re
import shutil
import subprocess
import sys
import time

import pytest

from remus.common.control import query
from remus.common.localpair import Pair, PowerSwitch, ha_config, wait_until
from remus.common.probe import read_replies

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("fence_dummy") and not shutil.which("/usr/sbin/fence_dummy"),
                                 reason="fence_dummy (Debian fence-agents) is not installed")]

LAN_OPTIONS = {"second_link": True}  # the conftest's `lan` fixture


def protected_pair(guest_image, lan, workdir, fence_type="file", device=None, **replication):
    extra, status = ha_config(lan, workdir, fence_type, device)
    pair = Pair(guest_image, workdir, lan=lan, extra_config=extra, **replication)
    pair.start_backup()
    pair.start_primary()
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
    return pair, status


def log_time(log: str, pos: int) -> float:
    """The wall-clock time (s) of the daemon log line holding offset `pos`."""
    line = log[log.rfind("\n", 0, pos) + 1:]
    stamp = line.split(" ", 1)[0]  # 2026-11-26T04:44:23.123, local time
    whole, ms = stamp.rsplit(".", 1)
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


def test_killed_primary_is_fenced_then_the_backup_activates(guest_image, lan, tmp_path):
    pair, status = protected_pair(guest_image, lan, tmp_path)
    switch = PowerSwitch(status, pair)
    try:
        before = int(pair.get("inc"))
        pair.primary.kill9()
        switch.start()
        fenced = pair.backup.wait_for(r"WARNING fenced ", 30)
        activating = pair.backup.wait_for(r"WARNING activating ", 30)
        activated = pair.backup.wait_for(r"WARNING activated epoch=", 30)
        log = pair.backup.log()
        # The backup's own log, in order: fenced, then activating (just before the
        # guest runs), then activated.
        assert fenced.start() < activating.start() < activated.start(), \
            f"activation began before fencing succeeded:\n{pair.backup.tail()}"
        assert status.read_text() == "off"
        # The power switch cut the primary before the replica ran (the log's stamps are
        # whole milliseconds, rounded down).
        assert switch.cut_at is not None, "activated without the primary's power being cut"
        activated_at = log_time(log, activated.start())
        assert switch.cut_at < activated_at + 0.001, \
            f"power cut at {switch.cut_at:.3f}, guest activated at {activated_at:.3f}"
        after = int(wait_until(lambda: pair.try_get("inc"), 60, "the activated guest"))
        assert after == before + 1
    finally:
        switch.done.set()
        pair.cleanup()


def test_cutting_every_link_fences_then_activates(guest_image, lan, tmp_path):
    pair, status = protected_pair(guest_image, lan, tmp_path)
    switch = PowerSwitch(status, pair)
    switch.start()
    try:
        lan.cut("primary", "lan")
        lan.cut("primary", "hb")
        pair.backup.wait_for(r"peer-lost", 30)
        pair.backup.wait_for(r"WARNING fenced ", 30)
        pair.backup.wait_for(r"activated epoch=", 30)
        assert switch.cut_at is not None, "activated without the primary's power being cut"
        # The switch cuts the host as the fence reports off; its kill may still be
        # landing under load.
        wait_until(lambda: pair.primary.proc.poll() is not None, 10, "the primary host off")
    finally:
        switch.done.set()
        lan.mend("primary", "lan")
        lan.mend("primary", "hb")
        pair.cleanup()


def test_one_of_two_links_lost_is_no_failover(guest_image, lan, tmp_path):
    pair, _ = protected_pair(guest_image, lan, tmp_path)
    try:
        lan.cut("primary", "hb")
        pair.backup.wait_for(r"link-down", 30)
        links = query(pair.workdir / "backup")["heartbeat"]["links"]
        down = [link for link in links if not link["up"]]
        assert len(links) == 2 and len(down) == 1 and down[0]["missed"] >= 5
        epoch = pair.replica_record()["epoch"]
        wait_until(lambda: pair.replica_record()["epoch"] >= epoch + 10, 30, "checkpoints to go on")
        log = pair.backup.log()
        assert not re.search(r"peer-lost|WARNING (fencing|activating) ", log)
    finally:
        lan.mend("primary", "hb")
        pair.cleanup()


def test_stream_lost_while_beats_continue_is_no_activation(guest_image, lan, tmp_path):
    # The stream and the first link share the LAN; the second link still answers.
    pair, status = protected_pair(guest_image, lan, tmp_path, stream_timeout_ms=500)
    try:
        lan.cut("primary", "lan")
        pair.backup.wait_for(r"replica-stale", 30)
        log = pair.backup.log()
        assert not re.search(r"WARNING (fencing|activating) ", log)
        assert status.read_text() == "on"
        assert pair.primary.proc.poll() is None
    finally:
        lan.mend("primary", "lan")
        pair.cleanup()


def test_failing_fence_device_means_no_activation_and_a_loud_error(guest_image, lan, tmp_path):
    pair, status = protected_pair(guest_image, lan, tmp_path, fence_type="fail")
    try:
        pair.primary.kill9()
        first = pair.backup.wait_for(r"ERROR fencing-failed ", 60)
        pair.backup.wait_for(r"ERROR fencing-failed ", 60, start=first.end())  # it retries
        assert not re.search(r"WARNING activating ", pair.backup.log())
        assert pair.backup.proc.poll() is None
    finally:
        pair.cleanup()


SNIFF = r"""
import errno, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind((sys.argv[1], 0))
print("ready", flush=True)
while True:
    try:
        data, addr = s.recvfrom(65535)
    except OSError as exc:  # the port was down when bound: reported once, then it works
        if exc.errno == errno.ENETDOWN:
            continue
        raise
    if addr[2] == socket.PACKET_OUTGOING:
        continue  # what the switch sends to the host, not what the host sends
    if data[12:14] == b"\x88\xb5" and data[14:23] == b"REMUS-END":
        print("end", flush=True)
        break
    print(data[6:12].hex(":"), data[12:14].hex(), flush=True)
"""

END_MARK = r"""
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
s.send(b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + b"REMUS-END".ljust(46, b"\0"))
"""


def test_stale_primary_stands_down_and_releases_nothing(guest_image, lan, tmp_path):
    # A fence device that claims success without cutting anything: the worst case.
    pair, _ = protected_pair(guest_image, lan, tmp_path, device='kind = "command"\ncommand = ["true"]')
    guest_mac = pair.load_config().nics[0].mac
    try:
        probe = pair.start_probe("inc")  # the stale guest has replies held when it is cut off
        wait_until(lambda: read_replies(probe.log()), 30, "the probe's first reply")
        lan.cut("primary", "lan")
        lan.cut("primary", "hb")
        pair.backup.wait_for(r"activated epoch=", 60)
        # Everything the primary host puts on the LAN, seen at its switch port, from the
        # mend until the daemon has exited and a marker frame after it has come through.
        sniffer = pair._start("sniffer", [*lan.exec("switch"), sys.executable, "-c", SNIFF, "to-primary"])
        sniffer.wait_for(r"ready", 10)
        lan.mend("primary", "lan")
        lan.mend("primary", "hb")
        pair.primary.wait_for(r"stood-down", 30)
        assert pair.primary.proc.wait(30) == 5
        assert "netbuf-silenced" in pair.primary.log()
        subprocess.run([*lan.exec("primary"), sys.executable, "-c", END_MARK], check=True)
        sniffer.wait_for(r"(?m)^end$", 10)
        from_guest = [line for line in sniffer.log().splitlines() if line.startswith(guest_mac)]
        assert not from_guest, (f"the stale primary put {len(from_guest)} frames of the guest "
                                f"({guest_mac}) on the LAN after the mend: {from_guest[:5]}")
        # The guest the client reaches is the activated one, and it keeps answering.
        assert wait_until(lambda: pair.try_get("get"), 60, "the activated guest")
    finally:
        pair.cleanup()

