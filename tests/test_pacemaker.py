"""ocf:remus:remus through Pacemaker's own tools, against real daemons and a real guest.

Pacemaker's tools find agents only under their built-in OCF root
(/usr/lib/ocf/resource.d), so the agent is installed there for the test (as
`make install` does, pointing at this test's Python) and what was there before
is put back afterwards.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remus.common.localpair import wait_until

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = Path("/usr/lib/ocf/resource.d/remus")
AGENT = AGENT_DIR / "remus"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ocf-tester") is None or shutil.which("crm_resource") is None,
                       reason="needs Debian's resource-agents and pacemaker-cli-utils "
                              "(scripts/install-deps installs them)"),
]


@pytest.fixture(scope="module")
def installed_agent(tmp_path_factory):
    if not AGENT_DIR.parent.is_dir():
        pytest.skip(f"no OCF root at {AGENT_DIR.parent}")
    saved = tmp_path_factory.mktemp("ocf") / "remus.saved"
    had = AGENT.exists()
    if had:
        shutil.copy2(AGENT, saved)
    AGENT_DIR.mkdir(exist_ok=True)
    text = (ROOT / "ocf" / "remus").read_text().replace("@PYTHON@", sys.executable)
    AGENT.write_text(text)
    AGENT.chmod(0o755)
    try:
        yield AGENT
    finally:
        if had:
            shutil.copy2(saved, AGENT)
        else:
            AGENT.unlink(missing_ok=True)
            if not any(AGENT_DIR.iterdir()):
                AGENT_DIR.rmdir()


def test_ocf_tester_passes_against_a_real_guest(make_pair, installed_agent):
    """Start (standing by), promote (boots the guest: no replica anywhere), demote,
    promote again, stop, and the probes in between, as ocf-tester drives them."""
    pair = make_pair(config_overrides={"cluster": {"manager": "pacemaker"}})
    log = pair.workdir / "ocf-daemon.log"
    r = subprocess.run(["ocf-tester", "-n", "remus-vm", "-o", f"config={pair.config}",
                        "-o", "side=primary", "-o", f"log={log}", str(installed_agent)],
                       capture_output=True, text=True, timeout=600)
    daemon_log = log.read_text() if log.exists() else "(no daemon log)"
    assert r.returncode == 0 and "* rc=" not in r.stdout, (
        f"ocf-tester failed:\n{r.stdout}\n{r.stderr}\n--- daemon log ---\n{daemon_log[-4000:]}")
    assert daemon_log.count("primary-start") >= 2, \
        f"promote should have booted the guest twice:\n{daemon_log[-3000:]}"


# --- two nodes (namespace hosts), driven by crm_resource on a CIB written for the test ---

CIB = """<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0"><configuration><crm_config/><nodes/><resources>{resources}</resources>
<constraints/></configuration><status/></cib>"""
PRIMITIVE = """<primitive id="{rid}" class="ocf" provider="remus" type="remus">
<instance_attributes id="{rid}-ia">
<nvpair id="{rid}-config" name="config" value="{config}"/>
<nvpair id="{rid}-log" name="log" value="{log}"/>
</instance_attributes></primitive>"""
NODE = {"primary": "remus-a", "backup": "remus-b"}  # resource per host of the config


class Cluster:
    """The two hosts' resources, acted on with Pacemaker's crm_resource --force-*; each
    finds its side of the config by its own addresses (side=auto)."""

    def __init__(self, pair, lan, workdir):
        self.pair, self.lan = pair, lan
        self.cib = workdir / "cib.xml"
        self.cib.write_text(CIB.format(resources="".join(
            PRIMITIVE.format(rid=rid, config=pair.config,
                             log=workdir / f"{rid}.log") for side, rid in NODE.items())))
        self.logs = {side: workdir / f"{rid}.log" for side, rid in NODE.items()}

    def act(self, side: str, action: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "CIB_file": str(self.cib)}
        return subprocess.run([*self.lan.exec(side), "crm_resource", f"--force-{action}",
                               "-r", NODE[side]], env=env, capture_output=True, text=True,
                              timeout=180)

    def must(self, side: str, action: str) -> None:
        r = self.act(side, action)
        assert r.returncode == 0, (f"crm_resource --force-{action} on {side}: rc "
                                   f"{r.returncode}\n{r.stdout}\n{r.stderr}\n{self.tail(side)}")

    def status(self, side: str) -> dict:
        from remus.common.control import query
        return query(Path(getattr(self.pair.load_config(), side).state_dir))

    def tail(self, side: str) -> str:
        log = self.logs[side]
        return f"--- {side} daemon log ---\n" + (log.read_text()[-3000:] if log.exists() else "")

    def kill_host(self, side: str) -> float:
        """The host's daemon and its QEMU, SIGKILLed: a lost node, as Pacemaker fences it."""
        import psutil
        state_dir = Path(getattr(self.pair.load_config(), side).state_dir)
        daemon = psutil.Process(int((state_dir / "ocf-daemon.pid").read_text()))
        family = [daemon, *daemon.children(recursive=True)]
        killed_at = time.time()
        for p in family:
            p.kill()
        psutil.wait_procs(family, timeout=10)
        return killed_at

    def stop_all(self) -> None:
        for side in NODE:
            self.act(side, "stop")


@pytest.fixture
def cluster(guest_image, lan, tmp_path, installed_agent):
    from remus.common.localpair import Pair
    pair = Pair(guest_image, tmp_path, lan=lan, config_overrides={
        "cluster": {"manager": "pacemaker", "fence_timeout_s": 1}})
    c = Cluster(pair, lan, tmp_path)
    try:
        c.must("backup", "start")
        c.must("primary", "start")
        c.must("primary", "promote")  # no replica anywhere: the primary host boots it
        wait_until(lambda: c.status("backup").get("state") == "standby", 180,
                   "the backup's replica resumable (first checkpoint committed)")
        wait_until(lambda: pair.try_get("get"), 120, "the guest's service")
        yield c
    finally:
        c.stop_all()
        pair.cleanup()


def test_pacemaker_fails_the_guest_over_by_promotion_and_nothing_is_taken_back(cluster):
    from remus.common.localpair import assert_nothing_taken_back, wait_for_replies
    pair = cluster.pair
    assert cluster.act("backup", "check").returncode == 0, "a standby monitors as running"
    assert cluster.act("primary", "check").returncode == 8, "the primary monitors as promoted"
    probe = pair.start_probe("inc")
    wait_for_replies(probe, 5, "replies from the protected guest")
    killed_at = cluster.kill_host("primary")
    wait_until(lambda: "waiting for Pacemaker" in cluster.logs["backup"].read_text(), 30,
               "the backup reporting the lost primary")
    assert cluster.status("backup")["role"] == "backup", \
        "under Pacemaker the backup must not take over on its own"
    cluster.must("backup", "promote")
    assert cluster.status("backup")["role"] == "active"
    assert cluster.act("backup", "check").returncode == 8
    assert_nothing_taken_back(probe, killed_at, "failover by Pacemaker promotion")


def test_a_replica_past_the_takeover_window_is_never_promoted(cluster):
    killed_at = cluster.kill_host("primary")
    wait_until(lambda: cluster.status("backup").get("state") == "stale", 60,
               "the replica stale once the takeover window (1 + 5 s) has passed")
    assert time.time() - killed_at > 6
    r = cluster.act("backup", "promote")
    assert r.returncode != 0, f"a stale replica was promoted:\n{r.stdout}{r.stderr}"
    assert "stale" in r.stdout + r.stderr
    assert cluster.status("backup")["role"] == "backup"
    assert cluster.act("backup", "check").returncode == 0
