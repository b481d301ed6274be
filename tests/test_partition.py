"""A partition between primary and backup, with a fence device slower than the
primary's detection of the loss: no reply a client saw is taken back, because the
primary holds its output for the takeover window (common/takeover.py) instead of
releasing it when its backup goes silent."""
import random
import re
import shutil
import time

import pytest

from remus.common.control import query
from remus.common.localpair import Pair, PowerSwitch, ha_config, wait_for_replies, wait_until
from remus.common.probe import read_replies, taken_back
from remus.common.takeover import output_hold_s, takeover_window_s
from remus.primary.output_hold import RELEASE_AT_ONCE_ENV

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (shutil.which("fence_dummy") or shutil.which("/usr/sbin/fence_dummy")),
                                 reason="fence_dummy (Debian fence-agents) is not installed")]

LAN_OPTIONS = {"second_link": True}  # the conftest's `lan` fixture
FENCE_DELAY_S = 7  # the device takes this long to power a host off: longer than ack_timeout_ms
SHORT_WINDOW = {"fencing": {"takeover_window_s": 6}}  # where fencing is quick or never succeeds


def _device(status, fence_type: str = "file", delay: float = 0) -> str:
    return (f'kind = "agent"\nagent = "fence_dummy"\noptions = {{ type = "{fence_type}", '
            f'status_file = "{status}", power_timeout = "1", delay = "{delay:g}" }}')


class Partitioned:
    """A protected pair whose primary and backup are cut off from each other (every
    wire) at a random moment of the epoch, while the client reaches both."""

    def __init__(self, guest_image, lan, workdir, device: str, overrides=None, env=()):
        extra, self.status = ha_config(lan, workdir, device=device)
        self.lan = lan
        self.pair = Pair(guest_image, workdir, lan=lan, extra_config=extra,
                         config_overrides=overrides)
        self.pair.daemon_wrapper = ["env", *env] if env else []
        self.switch = PowerSwitch(self.status, self.pair)
        self.cut = False

    def start(self, rng: random.Random):
        pair = self.pair
        pair.start_backup()
        pair.start_primary()
        pair.primary.wait_for(r"protecting epoch=\d+", 60)
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        self.probe = pair.start_probe("inc")
        wait_for_replies(self.probe, 5, "the client's first replies")
        time.sleep(rng.uniform(0, 0.2))  # a random moment of the epoch
        self.cut_at = time.time()
        self.lan.partition("primary", "backup")
        self.cut = True
        self.switch.start()
        return self

    def close(self) -> None:
        self.switch.done.set()
        if self.cut:
            self.lan.partition("primary", "backup", heal=True)
        self.pair.cleanup()


def _failover_after_partition(guest_image, lan, workdir, rng, env=()) -> dict:
    run = Partitioned(guest_image, lan, workdir, _device(workdir / "power", delay=FENCE_DELAY_S),
                      env=env)
    try:
        run.start(rng)
        pair = run.pair
        pair.backup.wait_for(r"activated epoch=", 90)
        # Replies after the cut may come from the cut-off primary too (if it released
        # them): count only those after the activation, from the resumed guest.
        activated_at = time.time()
        wait_until(lambda: sum(t > activated_at for t, _ in read_replies(run.probe.log())) >= 3,
                   60, "replies from the resumed guest")
        run.probe.stop()
        values = [v for _, v in read_replies(run.probe.log())]
        return {"taken_back": taken_back(values), "primary_log": pair.primary.log(),
                "replies": len(values)}
    finally:
        run.close()


def test_no_acknowledged_reply_is_lost_when_a_partition_outlasts_the_primarys_detection(
        guest_image, lan, tmp_path):
    rng = random.Random(20261203)
    for i in range(5):
        workdir = tmp_path / f"run{i}"
        workdir.mkdir()
        run = _failover_after_partition(guest_image, lan, workdir, rng)
        assert not run["taken_back"], f"run {i}: replies taken back: {run['taken_back']}"
        assert run["replies"] >= 8
        # The cut-off primary noticed its backup's loss and held everything it produced
        # since, until the backup's fence cut its power: nothing of it was released.
        assert "backup-lost" in run["primary_log"] and "output-held" in run["primary_log"]
        assert "output-released" not in run["primary_log"], f"run {i}: output released"


def test_releasing_on_backup_loss_takes_replies_back_in_the_same_partition(guest_image, lan,
                                                                         tmp_path):
    """Negative control: the old behaviour (a test-only switch) loses replies."""
    rng = random.Random(5)
    for i in range(3):
        workdir = tmp_path / f"run{i}"
        workdir.mkdir()
        run = _failover_after_partition(guest_image, lan, workdir, rng,
                                        env=[f"{RELEASE_AT_ONCE_ENV}=1"])
        if run["taken_back"]:
            return
    pytest.fail("releasing on backup loss never took a reply back: the test above cannot fail")


def test_a_dead_backup_holds_output_for_at_most_the_window_and_the_guest_runs_on(guest_image, lan,
                                                                               tmp_path):
    extra, _ = ha_config(lan, tmp_path)
    pair = Pair(guest_image, tmp_path, lan=lan, extra_config=extra, config_overrides=SHORT_WINDOW)
    try:
        pair.protect()
        hold_s = output_hold_s(pair.load_config())
        probe = pair.start_probe("inc")
        wait_for_replies(probe, 5, "the client's first replies")
        pair.backup.kill9()
        killed_at = time.time()
        released = pair.primary.wait_for(r"output-released held_s=([0-9.]+)", hold_s + 30)
        held = float(released.group(1))
        print(f"output held {held:.2f} s after the backup died (window bound {hold_s:.2f} s)")
        assert held <= hold_s + 0.5
        wait_until(lambda: sum(t > killed_at for t, _ in read_replies(probe.log())) >= 5, 60,
                   "replies after the hold")
        probe.stop()
        assert not taken_back([v for _, v in read_replies(probe.log())])
        assert "guest-paused" not in pair.primary.log()
        assert query(pair.workdir / "primary")["state"] == "degraded"
    finally:
        pair.cleanup()


def test_fencing_that_fails_past_the_window_never_activates(guest_image, lan, tmp_path):
    run = Partitioned(guest_image, lan, tmp_path, _device(tmp_path / "power", fence_type="fail"),
                      overrides=SHORT_WINDOW)
    try:
        run.start(random.Random(3))
        pair = run.pair
        window = takeover_window_s(pair.load_config())
        passed = pair.backup.wait_for(r"takeover-window-passed", window + 30)
        status = query(pair.workdir / "backup")
        assert status["state"] == "stale" and "takeover window" in status["stale_reason"]
        released = pair.primary.wait_for(r"output-released held_s=([0-9.]+)", 60)
        assert float(released.group(1)) >= window, "released before the backup gave up"
        time.sleep(1)
        log = pair.backup.log()
        assert not re.search(r"WARNING activating ", log), log[passed.start():]
        assert pair.primary.proc.poll() is None and run.switch.cut_at is None
    finally:
        run.close()
