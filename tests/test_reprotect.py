"""Re-protection after a failover, with real daemons on namespace hosts: the host that
took the guest over becomes its primary, the first host its backup, and a second
failover goes back, with no reply a client saw ever taken back."""
import shutil
import subprocess

import pytest

from remus.common.control import query
from remus.common.localpair import BIN, Pair, PowerSwitch, ha_config, wait_for_replies
from remus.common.probe import read_replies, taken_back

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("fence_dummy") or shutil.which("/usr/sbin/fence_dummy")),
                                 reason="fence_dummy (Debian fence-agents) is not installed")]

LAN_OPTIONS = {"second_link": True}  # the conftest's `lan` fixture


def test_fail_over_reprotect_and_fail_back_without_losing_a_reply(guest_image, lan, tmp_path):
    extra, power_a = ha_config(lan, tmp_path)
    power_b = tmp_path / "power-backup"
    pair = Pair(guest_image, tmp_path, lan=lan, extra_config=extra)
    switches = []
    try:
        pair.protect()
        probe = pair.start_probe()
        wait_for_replies(probe, 3, "the client's first replies", 30)

        # First failover: host A dies, B fences it and takes the guest over.
        switches.append(PowerSwitch(power_a, pair, "primary"))
        host_a = pair.primary
        host_a.kill9()
        switches[-1].start()
        host_b = pair.backup
        host_b.wait_for(r"failover-complete .*generation=2", 60)
        wait_for_replies(probe, 3, "replies from the guest on host B", 60)

        # Host A comes back: its remus-primary sees B holding the guest and stands by.
        power_a.write_text("on")
        pair.start_primary()
        pair.primary.wait_for(r"peer-holds-the-guest", 30)
        pair.primary.wait_for(r"backup-start", 30)
        assert "qemu-launch" not in pair.primary.log(), "host A started a second copy"
        status_a = query(tmp_path / "primary")
        assert status_a["role"] == "backup", status_a

        # remusctl reprotect on host B: B becomes the primary, A its backup.
        r = subprocess.run([*lan.exec("backup"), str(BIN / "remusctl"), "reprotect",
                            "-c", str(pair.config), "--timeout", "300"],
                           capture_output=True, text=True, timeout=330)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "protected again at generation 2" in r.stdout
        host_b.wait_for(r"protecting epoch=", 30)
        pair.primary.wait_for(r"standby session=", 30)
        wait_for_replies(probe, 3, "replies while B is protected by A", 60)

        # Second failover, the other way: B dies, A fences B and resumes the guest.
        switches.append(PowerSwitch(power_b, pair, "backup"))
        host_b.kill9()
        switches[-1].start()
        pair.primary.wait_for(r"WARNING fenced ", 60)
        pair.primary.wait_for(r"failover-complete .*generation=3", 60)
        assert power_b.read_text() == "off"
        wait_for_replies(probe, 3, "replies from the guest back on host A", 60)
        probe.stop()

        values = [v for _, v in read_replies(probe.log())]
        assert not taken_back(values), f"replies taken back: {taken_back(values)}"
        assert values == sorted(values)
    finally:
        for switch in switches:
            switch.done.set()
        pair.cleanup()
