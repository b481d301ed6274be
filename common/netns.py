"""Network namespaces as hosts: a client, a primary and a backup on one switch.

    client (10.213.K.1, eth0) ─┐
    primary (br0 10.213.K.2) ──┼── switch (bridge sw)
    backup  (br0 10.213.K.3) ──┘

The guest's TAP joins br0 on whichever host runs it and takes 10.213.K.100.
With `second_link`, primary and backup also share a private wire (switch
`hb`, eth1, 10.214.K.2 and .3), as a crossover cable for a second heartbeat.
With `guest_lan2`, a second guest network (switch `sw2`): the client's eth2
(10.215.K.1) and a bridge br1 on primary and backup (no address of their own)
for a guest's second NIC, which takes 10.215.K.100.
Everything lives in namespaces this object creates and deletes, so nothing
touches the machine's own network.
"""
from __future__ import annotations

import os
import subprocess

ROLES = ("client", "primary", "backup")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Lan:
    def __init__(self, index: int | None = None, second_link: bool = False,
                 guest_lan2: bool = False):
        self.second_link = second_link
        self.guest_lan2 = guest_lan2
        self.k = (os.getpid() if index is None else index) % 250 + 1
        tag = f"{os.getpid()}-{self.k}"
        self.ns = {role: f"remus-{tag}-{role}" for role in ("switch", *ROLES)}
        self.subnet = f"10.213.{self.k}"
        self.addr = {"client": f"{self.subnet}.1", "primary": f"{self.subnet}.2",
                     "backup": f"{self.subnet}.3", "guest": f"{self.subnet}.100"}
        self.addr2 = {"primary": f"10.214.{self.k}.2", "backup": f"10.214.{self.k}.3"}
        self.bridge = "br0"
        self.bridge2 = "br1"
        self.addr3 = {"client": f"10.215.{self.k}.1", "guest": f"10.215.{self.k}.100"}
        self._made: list[str] = []

    def __enter__(self) -> "Lan":
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        sw = self.ns["switch"]
        _ip("-n", sw, "link", "add", "sw", "type", "bridge")
        _ip("-n", sw, "link", "set", "sw", "up")
        for role in ROLES:
            port = f"to-{role}"
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", self.ns[role])
            _ip("-n", sw, "link", "set", port, "master", "sw", "up")
            ns = self.ns[role]
            if role == "client":
                _ip("-n", ns, "addr", "add", f"{self.addr[role]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
            else:
                # A host bridge, so the guest's TAP shares the host's uplink.
                _ip("-n", ns, "link", "add", self.bridge, "type", "bridge")
                _ip("-n", ns, "link", "set", "eth0", "master", self.bridge, "up")
                _ip("-n", ns, "link", "set", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr[role]}/24", "dev", self.bridge)
        if self.second_link:
            _ip("-n", sw, "link", "add", "hb", "type", "bridge")
            _ip("-n", sw, "link", "set", "hb", "up")
            for role in ("primary", "backup"):
                port = f"hb-{role}"
                _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth1",
                    "netns", self.ns[role])
                _ip("-n", sw, "link", "set", port, "master", "hb", "up")
                _ip("-n", self.ns[role], "addr", "add", f"{self.addr2[role]}/24", "dev", "eth1")
                _ip("-n", self.ns[role], "link", "set", "eth1", "up")
        if self.guest_lan2:
            self._create_guest_lan2()

    def _create_guest_lan2(self) -> None:
        sw = self.ns["switch"]
        _ip("-n", sw, "link", "add", "sw2", "type", "bridge")
        _ip("-n", sw, "link", "set", "sw2", "up")
        for role in ROLES:
            port, ns = f"g2-{role}", self.ns[role]
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth2",
                "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "sw2", "up")
            if role == "client":
                _ip("-n", ns, "addr", "add", f"{self.addr3['client']}/24", "dev", "eth2")
                _ip("-n", ns, "link", "set", "eth2", "up")
            else:
                _ip("-n", ns, "link", "add", self.bridge2, "type", "bridge")
                _ip("-n", ns, "link", "set", "eth2", "master", self.bridge2, "up")
                _ip("-n", ns, "link", "set", self.bridge2, "up")

    def destroy(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def exec(self, role: str) -> list[str]:
        """argv prefix that runs a command on host `role`."""
        return ["ip", "netns", "exec", self.ns[role]]

    def cut(self, role: str, wire: str = "lan") -> None:
        """Unplug host `role` from the LAN (`lan`) or the second link (`hb`)."""
        _ip("-n", self.ns["switch"], "link", "set", self._port(role, wire), "down")

    def mend(self, role: str, wire: str = "lan") -> None:
        _ip("-n", self.ns["switch"], "link", "set", self._port(role, wire), "up")

    def throttle(self, role: str, towards: str, kbit: int) -> None:
        """Slow what host `role` sends to host `towards` on the LAN to `kbit`, everything
        else it sends going at full speed: data queued here is lost if the host is then
        cut (a power loss), while frames to others overtake it."""
        ns, to = self.ns[role], f"{self.addr[towards]}/32"
        tc = ["tc", "-n", ns]
        for cmd in (["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "20"],
                    ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
                     "rate", f"{kbit}kbit", "quantum", "1514"],
                    ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
                     "rate", "10gbit", "quantum", "60000"],
                    ["filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "u32",
                     "match", "ip", "dst", to, "flowid", "1:10"]):
            subprocess.run([*tc, *cmd], check=True, capture_output=True)

    def unthrottle(self, role: str) -> None:
        subprocess.run(["tc", "-n", self.ns[role], "qdisc", "del", "dev", "eth0", "root"],
                       capture_output=True)

    def partition(self, a: str = "primary", b: str = "backup", heal: bool = False) -> None:
        """Cut hosts `a` and `b` off from each other on every wire, while both still
        reach everyone else (the client reaches both): blackhole routes both ways."""
        action = "del" if heal else "add"
        for here, there in ((a, b), (b, a)):
            for addrs in (self.addr, self.addr2):
                if there in addrs and here in addrs:
                    _ip("-n", self.ns[here], "route", action, "blackhole", f"{addrs[there]}/32")

    @staticmethod
    def _port(role: str, wire: str) -> str:
        return f"{'to' if wire == 'lan' else 'hb'}-{role}"
