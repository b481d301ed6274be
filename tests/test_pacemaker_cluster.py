"""ocf:remus:remus in a real two-node Pacemaker + Corosync cluster, on one machine.

Each cluster node is one of the Lan's namespace hosts (primary, backup) with a
mount namespace of its own: private /etc/corosync, /var/lib/corosync,
/var/lib/pacemaker, /var/log/pacemaker, /var/log/corosync, a fresh /run and
/dev/shm (the guest's RAM directory bound back in), and its own OCF root
(/usr/lib/ocf/resource.d) holding only the agent, so nothing of the machine's is
changed. Corosync (knet, two_node) runs on the hosts' LAN addresses; libqb's IPC
sockets are abstract unix sockets, which are per network namespace, so the two
stacks do not see each other's daemons. The CIB is written to each node's
cib.xml before it starts (no crm_feature_set: 2.1.5 refuses a newer one).
Stonith: one fence_dummy device per node (type=file), stonith-action=off, so a
fenced node's status file reads "off"; a fenced node's "power" is everything in
its mount namespace (corosync, Pacemaker, the Remus daemon, QEMU).

The cluster boots the guest on the config's primary host (promotion), the
backup's replica becomes resumable; then the primary node is lost (power off, or
cut off the LAN while alive), the survivor must fence it through fence_dummy,
then promote its replica, and the guest must go on with nothing a client saw
taken back. Both tests together take about 45 s here.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(any(shutil.which(p) is None for p in
                           ("corosync", "pacemakerd", "fence_dummy", "nsenter", "unshare")),
                       reason="needs Debian's corosync, pacemaker and fence-agents"),
]

NODES = {"primary": "node-p", "backup": "node-b"}  # Lan host -> cluster node name
PRIVATE_DIRS = {"etc-corosync": "/etc/corosync", "lib-corosync": "/var/lib/corosync",
                "lib-pacemaker": "/var/lib/pacemaker", "log-pacemaker": "/var/log/pacemaker",
                "log-corosync": "/var/log/corosync",
                "ocf": "/usr/lib/ocf/resource.d"}
PACEMAKERD = shutil.which("pacemakerd") or "/usr/sbin/pacemakerd"

# The node's "init": mounts its private directories, starts corosync then pacemakerd,
# and reaps whatever ends in its mount namespace (a child subreaper), so a killed node
# leaves no zombies behind.
HOLDER = r"""
import ctypes, os, subprocess, sys, time
root = sys.argv[1]
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
for line in open(os.path.join(root, "mounts")):
    src, dst, mode = line.split()
    if src == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=" + mode, "tmpfs", dst], check=True)
    else:
        os.makedirs(dst, exist_ok=True)
        subprocess.run(["mount", "--bind", src, dst], check=True)
log = open(os.path.join(root, "stack.log"), "ab")
subprocess.Popen(["corosync", "-f"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
time.sleep(1)
subprocess.Popen([sys.argv[2], "-f"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
open(os.path.join(root, "ready"), "w").close()
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""

COROSYNC = """totem {{
  version: 2
  cluster_name: remus-test
  transport: knet
  crypto_cipher: none
  crypto_hash: none
  token: 1000
}}
logging {{
  to_stderr: no
  to_logfile: yes
  logfile: /var/log/corosync/corosync.log
  to_syslog: no
  timestamp: on
}}
quorum {{
  provider: corosync_votequorum
  two_node: 1
}}
nodelist {{
{nodes}
}}
"""
COROSYNC_NODE = """  node {{
    name: {name}
    nodeid: {nodeid}
    ring0_addr: {addr}
  }}"""

CIB = """<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0"><configuration>
<crm_config><cluster_property_set id="opts">
<nvpair id="opts-stonith" name="stonith-enabled" value="true"/>
<nvpair id="opts-action" name="stonith-action" value="off"/>
<nvpair id="opts-dcdt" name="dc-deadtime" value="5s"/>
<nvpair id="opts-timeout" name="stonith-timeout" value="{fence_timeout}s"/>
</cluster_property_set></crm_config>
<nodes/>
<resources>{fences}
<clone id="vm-clone"><meta_attributes id="vm-clone-meta">
<nvpair id="vm-promotable" name="promotable" value="true"/>
<nvpair id="vm-pmax" name="promoted-max" value="1"/>
<nvpair id="vm-pnmax" name="promoted-node-max" value="1"/>
<nvpair id="vm-cmax" name="clone-max" value="2"/>
<nvpair id="vm-cnmax" name="clone-node-max" value="1"/>
<nvpair id="vm-notify" name="notify" value="true"/>
</meta_attributes>
<primitive id="vm" class="ocf" provider="remus" type="remus">
<instance_attributes id="vm-ia">
<nvpair id="vm-config" name="config" value="{config}"/>
<nvpair id="vm-log" name="log" value="/var/log/pacemaker/remus.log"/>
</instance_attributes>
<operations>
<op id="vm-start" name="start" interval="0" timeout="60s"/>
<op id="vm-stop" name="stop" interval="0" timeout="120s"/>
<op id="vm-promote" name="promote" interval="0" timeout="120s"/>
<op id="vm-demote" name="demote" interval="0" timeout="120s"/>
<op id="vm-mon-p" name="monitor" interval="2s" role="Promoted" timeout="30s"/>
<op id="vm-mon-u" name="monitor" interval="3s" role="Unpromoted" timeout="30s"/>
</operations></primitive></clone>
</resources>
<constraints>{fence_locations}</constraints>
</configuration><status/></cib>
"""
FENCE = """<primitive id="fence-{node}" class="stonith" type="fence_dummy">
<instance_attributes id="fence-{node}-ia">
<nvpair id="fence-{node}-type" name="type" value="file"/>
<nvpair id="fence-{node}-file" name="status_file" value="{status_file}"/>
<nvpair id="fence-{node}-hosts" name="pcmk_host_list" value="{node}"/>
<nvpair id="fence-{node}-delay" name="pcmk_delay_base" value="{delay}"/>
</instance_attributes>
<operations><op id="fence-{node}-mon" name="monitor" interval="60s"/></operations>
</primitive>"""
FENCE_LOCATION = '<rsc_location id="fence-{node}-away" rsc="fence-{node}" node="{node}" score="-INFINITY"/>'


def _pids_in_mount_ns(ns: str, exclude: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != exclude:
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


class Node:
    """One cluster node: a Lan host with its own mount namespace and cluster stack."""

    def __init__(self, lan, host: str, root: Path, corosync_conf: str, cib: str, agent: str,
                 ram_dir: Path):
        self.lan, self.host, self.name, self.root = lan, host, NODES[host], root
        root.mkdir(parents=True)
        self.status_file = root.parent / f"{self.name}.power"
        self.status_file.write_text("on")
        self.status_file.chmod(0o666)
        mounts = []
        for sub, target in PRIVATE_DIRS.items():
            d = root / sub
            d.mkdir(parents=True)
            mounts.append(f"{d} {target} -")
        # /run and /dev/shm: fresh tmpfs (libqb's ring buffers live in /dev/shm, and a
        # SIGKILLed stack leaves them behind); the guest's RAM directory is bound back in.
        mounts += ["tmpfs /run 755", "tmpfs /dev/shm 1777", f"{ram_dir} {ram_dir} -"]
        (root / "mounts").write_text("\n".join(mounts) + "\n")
        (root / "etc-corosync" / "corosync.conf").write_text(corosync_conf)
        if Path("/etc/corosync/uidgid.d").is_dir():
            shutil.copytree("/etc/corosync/uidgid.d", root / "etc-corosync" / "uidgid.d")
        lib = root / "lib-pacemaker"
        for sub in ("cib", "pengine", "blackbox", "cores"):
            (lib / sub).mkdir()
        (lib / "cib" / "cib.xml").write_text(cib)
        (lib / "cib" / "cib.xml").chmod(0o600)
        for path in [lib, *lib.rglob("*"), root / "log-pacemaker"]:
            shutil.chown(path, "hacluster", "haclient")
            if path.is_dir():
                path.chmod(0o770)
        (root / "ocf" / "remus").mkdir()
        (root / "ocf" / "remus" / "remus").write_text(agent)
        (root / "ocf" / "remus" / "remus").chmod(0o755)
        env = {**os.environ, "PCMK_logfile": "/var/log/pacemaker/pacemaker.log"}
        self.holder = subprocess.Popen(
            [*lan.exec(host), "unshare", "--mount", "--propagation", "private",
             sys.executable, "-c", HOLDER, str(root), PACEMAKERD],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(root / "holder.log", "ab"))
        deadline = time.monotonic() + 20
        while not (root / "ready").exists():
            assert self.holder.poll() is None and time.monotonic() < deadline, \
                f"node {self.name} did not come up:\n{(root / 'holder.log').read_text()}"
            time.sleep(0.1)
        self.mnt_ns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "-n", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def power_off(self) -> float:
        """Everything in the node's mount namespace SIGKILLed (its holder reaps them)."""
        at = time.time()
        for _ in range(50):
            pids = _pids_in_mount_ns(self.mnt_ns, self.holder.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return at

    def destroy(self) -> None:
        if self.holder.poll() is None:
            self.power_off()
            time.sleep(0.3)  # let the holder reap
            self.holder.kill()
        self.holder.wait(10)

    def log(self, name: str) -> str:
        path = {"pacemaker": self.root / "log-pacemaker" / "pacemaker.log",
                "corosync": self.root / "log-corosync" / "corosync.log",
                "remus": self.root / "log-pacemaker" / "remus.log",
                "stack": self.root / "stack.log"}[name]
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self) -> str:
        mon = self.run("crm_mon", "-1", "-A") if self.holder.poll() is None else None
        return (f"=== {self.name} crm_mon ===\n{mon.stdout if mon else '(node off)'}\n"
                f"--- {self.name} remus.log ---\n{self.log('remus')[-3000:]}\n"
                f"--- {self.name} pacemaker.log (errors) ---\n" + "\n".join(
                    line for line in self.log("pacemaker").splitlines()
                    if " error: " in line or " crit: " in line or "notice: Result" in line)[-4000:]
                + f"\n--- {self.name} corosync.log ---\n{self.log('corosync')[-1500:]}"
                + f"\n--- {self.name} stack output ---\n{self.log('stack')[-1500:]}")


class Cluster:
    def __init__(self, lan, pair, workdir: Path, fence_timeout: int):
        self.lan, self.pair = lan, pair
        nodes = "\n".join(COROSYNC_NODE.format(name=NODES[h], nodeid=i + 1, addr=lan.addr[h])
                          for i, h in enumerate(NODES))
        conf = COROSYNC.format(nodes=nodes)
        status = {h: workdir / f"{NODES[h]}.power" for h in NODES}
        cib = CIB.format(
            fence_timeout=fence_timeout, config=pair.config,
            # In a partition both nodes shoot; the shot at the backup waits, so the backup
            # (the replica) wins the race and the primary's power is cut first.
            fences="".join(FENCE.format(node=NODES[h], status_file=status[h],
                                        delay="6s" if h == "backup" else "0s") for h in NODES),
            fence_locations="".join(FENCE_LOCATION.format(node=NODES[h]) for h in NODES))
        agent = (ROOT / "ocf" / "remus").read_text().replace("@PYTHON@", sys.executable)
        self.nodes: dict[str, Node] = {}
        for h in NODES:
            self.nodes[h] = Node(lan, h, workdir / NODES[h], conf, cib, agent, pair.ram_dir)

    def mon(self, host: str) -> str:
        return self.nodes[host].run("crm_mon", "-1", "-A").stdout

    def promoted_on(self, host: str) -> bool:
        r = self.nodes[host].run("crm_resource", "--locate", "-r", "vm-clone")
        return f"is running on: {NODES[host]} Promoted" in r.stdout

    def report(self) -> str:
        return "\n".join(n.report() for n in self.nodes.values())

    def destroy(self) -> None:
        for n in self.nodes.values():
            n.destroy()


class PowerSwitch(threading.Thread):
    """The fence device's other end: powers a node off once its fence_dummy status
    file says off."""

    def __init__(self, node: Node):
        super().__init__(daemon=True)
        self.node, self.done = node, threading.Event()
        self.cut_at: float | None = None

    def run(self) -> None:
        while not self.done.is_set():
            if self.node.status_file.read_text() == "off":
                self.node.power_off()
                self.cut_at = time.time()
                return
            time.sleep(0.01)


def wait_until(cond, timeout, what, cluster=None):
    from remus.common.waiting import wait_until as wait
    try:
        return wait(cond, timeout, what, interval=0.3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.report() if cluster else ''}") from None


@pytest.fixture
def cluster(guest_image, lan, tmp_path):
    from remus.common.localpair import Pair
    fence_timeout = 30
    pair = Pair(guest_image, tmp_path, lan=lan, config_overrides={
        "cluster": {"manager": "pacemaker", "fence_timeout_s": fence_timeout}})
    c = None
    try:
        c = Cluster(lan, pair, tmp_path / "cluster", fence_timeout)
        yield c
    finally:
        if c is not None:
            c.destroy()
        pair.cleanup()


def protected(cluster):
    """Both nodes online, the guest booted by promotion on the primary host and its
    replica resumable on the backup; returns the seconds that took."""
    from remus.common.control import query
    started = time.monotonic()
    wait_until(lambda: "Online: [ node-b node-p ]" in cluster.mon("backup"), 60,
               "both nodes online in one partition with quorum", cluster)
    wait_until(lambda: cluster.promoted_on("primary"), 120,
               "the clone promoted on the config's primary host (guest booted)", cluster)
    backup_state = Path(cluster.pair.load_config().backup.state_dir)
    wait_until(lambda: query(backup_state).get("state") == "standby", 180,
               "the backup's replica resumable (first checkpoint committed)", cluster)
    wait_until(lambda: cluster.pair.try_get("get"), 120, "the guest's service", cluster)
    for node in cluster.nodes.values():
        assert node.status_file.read_text() == "on", \
            f"{node.name} was fenced while the cluster formed\n{cluster.report()}"
    if os.environ.get("PYTHONPATH"):  # a checkout run that way: its code, not the installed
        daemon = int((backup_state / "ocf-daemon.pid").read_text())
        environ = Path(f"/proc/{daemon}/environ").read_bytes().split(b"\0")
        assert f"PYTHONPATH={os.environ['PYTHONPATH']}".encode() in environ, \
            "the agent's daemon did not get the test's PYTHONPATH (through pacemakerd, execd)"
    return time.monotonic() - started


def watch_failover(cluster, since: float) -> tuple[dict, threading.Thread]:
    """When the primary's fence device went off and when the backup's daemon became
    active, to 50 ms, in the returned dict (filled by the returned thread)."""
    from remus.common.control import query
    backup_state = Path(cluster.pair.load_config().backup.state_dir)
    power = cluster.nodes["primary"].status_file
    seen: dict[str, float] = {}

    def watch():
        while "promoted" not in seen and time.time() - since < 120:
            if "fenced" not in seen and power.read_text() == "off":
                seen["fenced"] = time.time()
            try:
                if query(backup_state).get("role") == "active":
                    seen["promoted"] = time.time()
            except (OSError, ValueError, RuntimeError):
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return seen, thread


def check_failover(cluster, seen: dict, watcher: threading.Thread, since: float) -> None:
    wait_until(lambda: cluster.promoted_on("backup"), 90,
               "the survivor promoted after fencing the lost primary", cluster)
    watcher.join(10)
    p_power, b_power = (cluster.nodes[h].status_file for h in ("primary", "backup"))
    assert p_power.read_text() == "off", f"the lost primary was not fenced\n{cluster.report()}"
    assert b_power.read_text() == "on", f"the survivor was fenced\n{cluster.report()}"
    assert "fenced" in seen and "promoted" in seen, f"{seen}\n{cluster.report()}"
    assert seen["fenced"] <= seen["promoted"], \
        f"promoted {seen['fenced'] - seen['promoted']:.2f} s before the fence\n{cluster.report()}"
    history = cluster.nodes["backup"].run("stonith_admin", "--history", NODES["primary"]).stdout
    assert f"off of {NODES['primary']} successful" in history, history
    assert "waiting for Pacemaker" in cluster.nodes["backup"].log("remus")
    print(f"\nlost at 0 s -> fenced {seen['fenced'] - since:.2f} s "
          f"-> promoted {seen['promoted'] - since:.2f} s")


def test_the_cluster_fences_a_primary_that_lost_power_then_promotes_the_replica(cluster):
    from remus.common.localpair import assert_nothing_taken_back, wait_for_replies
    print(f"\ncluster up, guest protected: {protected(cluster):.1f} s")
    probe = cluster.pair.start_probe("inc")
    wait_for_replies(probe, 5, "replies from the protected guest")
    killed_at = cluster.nodes["primary"].power_off()
    seen, watcher = watch_failover(cluster, killed_at)
    check_failover(cluster, seen, watcher, killed_at)
    assert_nothing_taken_back(probe, killed_at, "failover by a Pacemaker cluster")


def test_in_a_partition_the_backup_shoots_first_and_takes_the_guest_over(cluster):
    """The primary node cut off the LAN, alive: both nodes go to fence each other; the
    delayed device lets the backup win, the power switch cuts the primary (stack,
    daemon, QEMU) before its own shot fires, and only then is the replica promoted."""
    from remus.common.localpair import assert_nothing_taken_back, wait_for_replies
    print(f"\ncluster up, guest protected: {protected(cluster):.1f} s")
    switch = PowerSwitch(cluster.nodes["primary"])
    switch.start()
    probe = cluster.pair.start_probe("inc")
    wait_for_replies(probe, 5, "replies from the protected guest")
    cut_at = time.time()
    cluster.lan.cut("primary")
    try:
        seen, watcher = watch_failover(cluster, cut_at)
        check_failover(cluster, seen, watcher, cut_at)
        assert switch.cut_at is not None and switch.cut_at <= seen["promoted"], \
            "promoted before the primary's power was cut"
        assert_nothing_taken_back(probe, cut_at, "failover after a partition")
    finally:
        switch.done.set()
        cluster.lan.mend("primary")
