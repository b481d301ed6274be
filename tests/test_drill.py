"""Failover drills, first-class: every phase of the checkpoint cycle, and a plain kill,
through heartbeat and fencing, with zero replies lost."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remus.common.control import query
from remus.common.hooks import DRILL_POINTS
from remus.common.localpair import Pair, PowerSwitch, ha_config, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("fence_dummy") or shutil.which("/usr/sbin/fence_dummy")),
                                 reason="fence_dummy (Debian fence-agents) is not installed")]
REMUSCTL = str(Path(sys.executable).parent / "remusctl")
ACTIVATING = re.compile(r"\bWARNING activating ")  # the backup's log line as it takes the guest

# The checkpoint cycle: postsuspend hooks, capture, preresume hooks, (the backup's
# ack), commit hooks. Before a point, the last hooks to have run:
HOOKS_RAN_BEFORE = {"s": "commit", "s2": "postsuspend", "r": "postsuspend",
                    "r2": "preresume", "c": "preresume", "c2": "commit"}
LAN_OPTIONS = {"second_link": True}  # the conftest's `lan` fixture


@pytest.mark.parametrize("how", ["s", "s2", "r", "r2", "c", "c2", "kill", "partition", "backup-crash"])
def test_drill_reports_zero_lost_replies(guest_image, lan, tmp_path, how):
    extra, status = ha_config(lan, tmp_path)
    # Defaults throughout: a primary cut off (partition) holds its output for the
    # takeover window, so it answers no client the backup never sees.
    pair = Pair(guest_image, tmp_path, lan=lan, extra_config=extra)
    switch = PowerSwitch(status, pair)
    switch.start()
    try:
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        inject = [f"--{how}"] if how in ("kill", "partition", "backup-crash") else ["--die-at", how]
        r = subprocess.run([REMUSCTL, "drill", "--config", str(pair.config), *inject, "--json", "--yes",
                            "--probe-url", pair.url("inc"), "--probe-netns", lan.ns["client"]],
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        assert report["replies_lost"] == 0 and report["replies"] >= 4
        events = [e["event"] for e in report["timeline"]]
        if how == "backup-crash":
            # Output held for the takeover window (nobody can tell a dead backup from one
            # about to take over), then released.
            assert events[:3] == ["inject", "primary-holding", "primary-degraded"], events
            assert report["detection_ms"] is None
            assert re.search(r"output-released held_s=", pair.primary.log())
            # The backup died without taking the guest; the primary runs on, unprotected.
            assert pair.backup.proc.poll() is not None, "the drill did not kill the backup"
            assert not ACTIVATING.search(pair.backup.log()), pair.backup.tail()
            assert pair.replica_record().get("state") != "activated"
            assert pair.primary.proc.poll() is None, pair.primary.tail()
            # ("connecting" between its attempts to reach a backup again)
            wait_until(lambda: query(pair.workdir / "primary")["state"] == "degraded", 15,
                       "the primary to report itself degraded")
            return
        assert report["detection_ms"] > 0 and report["fencing_ms"] > 0 and report["downtime_ms"] > 0
        assert events == ["inject", "activated", "first-reply"]
        # The line the backup-crash case looks for is there when the backup does activate.
        assert ACTIVATING.search(pair.backup.log()), pair.backup.tail()
        if how == "partition":
            log = pair.primary.log()
            assert "output-held" in log and "output-released" not in log, pair.primary.tail()
            assert switch.cut_at is not None
        elif how != "kill":
            # Died at exactly the named point: the point it names, and between the hooks
            # that surround that point (the last phase whose hooks ran).
            died = re.search(r"drill-die point=(\S+) epoch=\d+ hooks_ran=(\S+)", pair.primary.log())
            assert died, pair.primary.tail()
            assert died.groups() == (DRILL_POINTS[how], HOOKS_RAN_BEFORE[how]), died.group(0)
    finally:
        switch.done.set()
        pair.cleanup()


def test_drill_refuses_a_pair_not_marked_as_a_target(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[guest]\nname = "g"\nkernel = "k"\n[primary]\naddress = "127.0.0.1"\n'
                   '[backup]\naddress = "127.0.0.1:1"\n[tls]\ninsecure = true\n')
    r = subprocess.run([REMUSCTL, "drill", "--config", str(cfg), "--kill", "--probe-url", "http://x/"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "drill target" in r.stderr
