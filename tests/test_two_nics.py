"""A guest with two NICs on two bridges, both held by the output buffer: a client
increments the guest's counter through each NIC while the primary is killed at
random moments. Neither NIC's client ever sees a reply taken back."""
import random
import time

import pytest

from remus.common.localpair import Pair, assert_nothing_taken_back, wait_until
from remus.common.probe import read_replies

pytestmark = pytest.mark.integration

LAN_OPTIONS = {"guest_lan2": True}  # the conftest's `lan` fixture


def nics(lan) -> str:
    return f"""
[[nic]]
mac = "52:54:00:12:34:56"
bridge = "{lan.bridge}"
[[nic]]
mac = "52:54:00:12:34:57"
bridge = "{lan.bridge2}"
"""


def test_both_nics_hold_their_output_across_failovers(guest_image, lan, tmp_path):
    rng = random.Random(1207)
    for run in range(5):
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        pair = Pair(guest_image, workdir, lan=lan, extra_config=nics(lan),
                    append_extra=f"remus.ip1={lan.addr3['guest']}/24")
        try:
            pair.start_backup()
            pair.start_primary()
            pair.primary.wait_for(r"protecting epoch=\d+", 60)
            wait_until(lambda: pair.try_get("get"), 120, "the service on the first NIC")
            probes = [pair.start_probe("inc", nic) for nic in (0, 1)]
            for nic, probe in enumerate(probes):
                wait_until(lambda: len(read_replies(probe.log())) >= 3, 30,
                           f"the first replies through NIC {nic}")
            time.sleep(rng.uniform(0, 0.4))  # the random kill moment
            killed_at = time.time()
            pair.primary.kill9()
            pair.backup.wait_for(r"activated epoch=", 60)
            for nic, probe in enumerate(probes):
                assert_nothing_taken_back(probe, killed_at, f"run {run}, NIC {nic}")
        finally:
            pair.cleanup()
