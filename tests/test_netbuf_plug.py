"""The kernel ("plug") network output buffer.

Encoding tests compile the netlink requests with pyroute2's IPBatch (nothing is
sent) and decode them again. Live tests run in a throwaway network namespace:
TAP, IFB, ingress qdisc, u32 + mirred redirect run wherever those exist; the
plug qdisc part skips with the probe's reason where the kernel has no sch_plug.
"""
import asyncio
import errno
import gzip
import os
import secrets
import signal
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute
from pyroute2.iproute.linux import IPBatch
from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELQDISC, RTM_DELTFILTER, RTM_NEWLINK, RTM_NEWQDISC, RTM_NEWTFILTER
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from remus.common.hooks import CheckpointDevice
from remus.common.netbuf_plug import (
    ETH_P_ALL, FILTER_PRIO, INGRESS_HANDLE, PLUG_HANDLE, PLUG_MISSING, TC_ACT_STOLEN,
    TC_H_INGRESS, TC_H_ROOT, TCA_EGRESS_REDIR, NetBufferError, PlugNetBuffer, PlugUnsupported,
    Request, ifb_request, ingress_request, netns_delete, no_ipv6_addr_request,
    plug_action_request, plug_qdisc_request, plug_supported, qemu_netdev_args,
    redirect_filter_request, tap_request,
)

# ---------------------------------------------------------------------------
# Encoding (no kernel involved)


@pytest.fixture(scope="module")
def batch():
    ipb = IPBatch()
    yield ipb
    ipb.close()


def compile_request(ipb, req: Request):
    ipb.reset()
    getattr(ipb, req.method)(req.command, **req.kwargs)
    data = bytes(ipb.batch)
    msg = (tcmsg if req.method == "tc" else ifinfmsg)(data)
    msg.decode()
    assert msg["header"]["length"] == len(data)  # exactly one message
    return msg, data


def plug_qopt(data: bytes) -> tuple[int, int]:
    """struct tc_plug_qopt {int action; __u32 limit;}, read from the raw TCA_OPTIONS."""
    off = 16 + 20  # nlmsghdr + struct tcmsg
    while off < len(data):
        length, kind = struct.unpack_from("HH", data, off)
        if kind & 0x3FFF == 2:  # TCA_OPTIONS
            assert length == 4 + 8
            return struct.unpack_from("iI", data, off + 4)
        off += (length + 3) & ~3
    raise AssertionError("no TCA_OPTIONS")


@pytest.mark.parametrize("name,value", [
    ("TCQ_PLUG_BUFFER", 0), ("TCQ_PLUG_RELEASE_ONE", 1), ("TCQ_PLUG_RELEASE_INDEFINITE", 2)])
def test_plug_actions_encode_the_kernel_constants(batch, name, value):
    msg, data = compile_request(batch, plug_action_request(9, name))
    assert msg["header"]["type"] == RTM_NEWQDISC
    flags = msg["header"]["flags"]
    assert flags & NLM_F_REPLACE and not flags & (NLM_F_CREATE | NLM_F_EXCL)  # change, never create
    assert (msg["index"], msg["handle"], msg["parent"]) == (9, PLUG_HANDLE, TC_H_ROOT)
    assert msg.get_attr("TCA_KIND") == "plug"
    assert msg.get_attr("TCA_OPTIONS")["action"] == value
    assert plug_qopt(data)[0] == value


def test_action_constants_match_pkt_sched_h_and_pyroute2():
    from pyroute2.netlink.rtnl.tcmsg.sched_plug import actions
    from remus.common.netbuf_plug import PLUG_ACTIONS
    assert PLUG_ACTIONS == {"TCQ_PLUG_BUFFER": 0, "TCQ_PLUG_RELEASE_ONE": 1,
                            "TCQ_PLUG_RELEASE_INDEFINITE": 2, "TCQ_PLUG_LIMIT": 3} == actions


def test_plug_limit_action_carries_the_limit(batch):
    msg, data = compile_request(batch, plug_action_request(9, "TCQ_PLUG_LIMIT", 65536))
    assert plug_qopt(data) == (3, 65536)
    with pytest.raises(ValueError):
        plug_action_request(9, "TCQ_PLUG_LIMIT")  # no limit = limit 0 = drop everything


def test_plug_qdisc_add_has_nonzero_limit(batch):
    msg, data = compile_request(batch, plug_qdisc_request(4, 1 << 20))
    assert msg["header"]["type"] == RTM_NEWQDISC
    assert msg["header"]["flags"] & NLM_F_CREATE and msg["header"]["flags"] & NLM_F_EXCL
    assert (msg["index"], msg["handle"], msg["parent"]) == (4, PLUG_HANDLE, TC_H_ROOT)
    assert plug_qopt(data) == (0, 1 << 20)
    for bad in (0, -1, None, 2**32, True, 1.5):
        with pytest.raises(ValueError):
            plug_qdisc_request(4, bad)


def test_pyroute2_traps_the_builders_avoid(batch):
    # An integer action silently becomes TCQ_PLUG_BUFFER in pyroute2 ...
    batch.reset()
    batch.tc("change", "plug", index=9, action=1)
    assert plug_qopt(bytes(batch.batch))[0] == 0
    # ... and a plug add without limit sends limit 0.
    batch.reset()
    batch.tc("add", "plug", index=9)
    assert plug_qopt(bytes(batch.batch))[1] == 0
    # The builders refuse both.
    for bad in (1, "RELEASE_ONE", None):
        with pytest.raises(ValueError):
            plug_action_request(9, bad)
    with pytest.raises(ValueError):
        PlugNetBuffer("t0", "i0", 0)


def test_ingress_qdisc(batch):
    msg, _ = compile_request(batch, ingress_request(5))
    assert msg["header"]["type"] == RTM_NEWQDISC
    assert (msg["index"], msg["handle"], msg["parent"]) == (5, INGRESS_HANDLE, TC_H_INGRESS)
    assert msg.get_attr("TCA_KIND") == "ingress"
    msg, _ = compile_request(batch, ingress_request(5, "del"))
    assert msg["header"]["type"] == RTM_DELQDISC


def test_redirect_filter_matches_all_protocols_and_redirects_to_ifb(batch):
    msg, _ = compile_request(batch, redirect_filter_request(5, 7))
    assert msg["header"]["type"] == RTM_NEWTFILTER
    assert (msg["index"], msg["parent"]) == (5, INGRESS_HANDLE)
    # tcm_info = prio << 16 | htons(protocol)
    assert msg["info"] & 0xFFFF == socket.htons(ETH_P_ALL) == socket.htons(0x0003)
    assert msg["info"] >> 16 == FILTER_PRIO
    assert msg.get_attr("TCA_KIND") == "u32"
    opts = msg.get_attr("TCA_OPTIONS")
    sel = opts.get_attr("TCA_U32_SEL")
    assert sel["flags"] & 1  # TC_U32_TERMINAL
    assert [(k["key_mask"], k["key_val"]) for k in sel["keys"]] == [(0, 0)]  # match anything
    acts = opts.get_attr("TCA_U32_ACT")
    [(prio_name, act)] = acts["attrs"]
    assert prio_name == "TCA_ACT_PRIO_1"
    assert act.get_attr("TCA_ACT_KIND") == "mirred"
    parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
    assert parms["eaction"] == TCA_EGRESS_REDIR
    assert parms["ifindex"] == 7
    assert parms["action"] == TC_ACT_STOLEN
    msg, _ = compile_request(batch, redirect_filter_request(5, 0, "del-filter"))
    assert msg["header"]["type"] == RTM_DELTFILTER
    assert msg["info"] & 0xFFFF == socket.htons(ETH_P_ALL)


def test_link_requests(batch):
    msg, _ = compile_request(batch, tap_request("vtap0"))  # IPBatch: no ioctl happens
    assert msg["header"]["type"] == RTM_NEWLINK
    assert msg.get_attr("IFLA_IFNAME") == "vtap0"
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "tuntap"
    data = info.get_attr("IFLA_INFO_DATA")
    assert data.get_attr("IFTUN_MODE") == "tap"
    assert data.get_attr("IFTUN_IFR")["no_pi"] == 1
    msg, _ = compile_request(batch, ifb_request("vifb0"))
    assert msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "ifb"
    msg, _ = compile_request(batch, no_ipv6_addr_request(6))
    assert msg["index"] == 6
    assert msg.get(("af_spec", "AF_INET6", "IFLA_INET6_ADDR_GEN_MODE")) == 1  # none
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(ValueError):
            tap_request(bad)


def test_qemu_netdev_args():
    dev = PlugNetBuffer("vtap0", "vifb0", 1 << 20)
    assert isinstance(dev, CheckpointDevice) and dev.name == "net-plug"
    assert dev.qemu_netdev_args("52:54:00:12:34:56") == [
        "-netdev", "tap,id=n0,ifname=vtap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile="]
    with pytest.raises(ValueError):
        qemu_netdev_args("vtap0", "52:54:00:12:34")


# ---------------------------------------------------------------------------
# Device logic against a recording fake of AsyncIPRoute (no kernel)


class FakeIPRoute:
    def __init__(self, links=None, fail=None):
        self.links = dict(links or {})   # name -> (index, kind)
        self.calls: list[tuple] = []
        self.fail = fail or {}           # (method, command, kind) -> errno
        self.closed = False
        self._next = 100

    async def link(self, command, **kw):
        self.calls.append(("link", command, kw.get("kind"), kw))
        if command == "get":
            if kw["ifname"] not in self.links:
                raise NetlinkError(errno.ENODEV, "No such device")
            index, kind = self.links[kw["ifname"]]
            return [{"index": index, ("linkinfo", "kind"): kind}]
        if command == "add":
            self._next += 1
            self.links[kw["ifname"]] = (self._next, "tun" if kw["kind"] == "tuntap" else kw["kind"])
        return []

    async def link_lookup(self, ifname):
        return [self.links[ifname][0]] if ifname in self.links else []

    async def tc(self, command, **kw):
        self.calls.append(("tc", command, kw.get("kind"), kw))
        code = self.fail.get(("tc", command, kw.get("kind")))
        if code:
            raise NetlinkError(code, os.strerror(code))
        return []

    def close(self):
        self.closed = True

    def plug_actions(self):
        return [kw["action"] for m, c, k, kw in self.calls if k == "plug" and c == "change"]


@pytest.fixture
def fake_rtnl(monkeypatch):
    """Make the device talk to a FakeIPRoute; returns a setter for the fake."""
    def use(fake: FakeIPRoute) -> FakeIPRoute:
        monkeypatch.setattr("remus.common.netbuf_plug._open_rtnl", lambda netns: fake)
        return fake
    return use


def run_started(fake_rtnl, body, fake=None) -> tuple[PlugNetBuffer, FakeIPRoute]:
    """start() a device on a fake, then run `body(dev)` in the same event loop."""
    fake = fake_rtnl(fake or FakeIPRoute())
    dev = PlugNetBuffer("vtap0", "vifb0", 1 << 20)

    async def run():
        await dev.start()
        fake.calls.clear()
        await body(dev)
    asyncio.run(run())
    return dev, fake


def test_start_sequence_and_close(fake_rtnl):
    fake = fake_rtnl(FakeIPRoute())
    dev = PlugNetBuffer("vtap0", "vifb0", 1 << 20)

    async def run():
        await dev.start()
        ops = [(m, c, k) for m, c, k, _ in fake.calls if c != "get"]
        assert ops == [
            ("link", "add", "tuntap"), ("link", "add", "ifb"),
            ("link", "set", None), ("link", "set", None), ("link", "set", None),
            ("tc", "del", "ingress"), ("tc", "add", "ingress"), ("tc", "add-filter", "u32"),
            ("tc", "add", "plug"), ("tc", "change", "plug")]
        add_plug = [kw for m, c, k, kw in fake.calls if (c, k) == ("add", "plug")][0]
        assert add_plug["limit"] == 1 << 20
        # Open until the first checkpoint: the guest is not protected yet.
        assert fake.plug_actions() == ["TCQ_PLUG_RELEASE_INDEFINITE"]
        fake.calls.clear()
        await dev.close()
        ops = [(m, c, k) for m, c, k, _ in fake.calls]
        assert ops == [("tc", "del-filter", "u32"), ("tc", "del", "ingress"), ("tc", "del", "plug"),
                       ("link", "del", None), ("link", "del", None)]
        assert fake.closed
        await dev.close()  # idempotent
    asyncio.run(run())


def test_barriers_synchronous_epochs(fake_rtnl):
    async def body(dev):
        for epoch in (1, 2, 3):
            await dev.postsuspend(epoch)
            assert dev.stats["barriers_outstanding"] == 1
            await dev.preresume(epoch)
            await dev.commit(epoch)
            assert dev.stats["barriers_outstanding"] == 0
    dev, fake = run_started(fake_rtnl, body)
    assert fake.plug_actions() == ["TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE"] * 3
    assert dev.stats["buffered_epochs"] == dev.stats["released_epochs"] == 3


def test_barriers_never_release_early(fake_rtnl):
    """sch_plug keeps one barrier; a second postsuspend before the commit is folded into the next."""
    async def body(dev):
        await dev.postsuspend(1)
        await dev.postsuspend(2)          # no second BUFFER: it would corrupt the kernel's count
        assert dev.stats["coalesced_epochs"] == 1
        await dev.commit(1)               # releases epoch 1
        await dev.commit(2)               # no barrier separates epoch 2 from later output: wait
        await dev.postsuspend(3)          # barrier covers epochs 2 and 3
        await dev.commit(2)               # older than the barrier: nothing
        await dev.commit(3)
    _, fake = run_started(fake_rtnl, body)
    assert fake.plug_actions() == ["TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE",
                                   "TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE"]


def test_epochs_restarting_without_unprotected_do_not_stall_output(fake_rtnl):
    async def body(dev):
        await dev.postsuspend(57)         # session lost before the ack, unprotected() not called
        await dev.postsuspend(1)          # new session: its checkpoint 1 is newer than the barrier
        await dev.commit(1)               # so its ack releases the barrier's output
        assert dev.stats["barriers_outstanding"] == 0
    _, fake = run_started(fake_rtnl, body)
    assert fake.plug_actions() == ["TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE"]


def test_unprotected_releases_everything_until_next_barrier(fake_rtnl):
    async def body(dev):
        await dev.postsuspend(7)
        await dev.unprotected()           # backup lost with epoch 7 unacknowledged
        assert dev.stats["barriers_outstanding"] == 0
        await dev.commit(7)               # stale: nothing more to release
        await dev.postsuspend(1)          # new session, epochs restart
        await dev.commit(1)
    _, fake = run_started(fake_rtnl, body)
    assert fake.plug_actions() == ["TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_INDEFINITE",
                                   "TCQ_PLUG_BUFFER", "TCQ_PLUG_RELEASE_ONE"]


def test_device_is_bound_to_the_loop_it_started_in(fake_rtnl):
    dev, fake = run_started(fake_rtnl, lambda dev: asyncio.sleep(0))
    with pytest.raises(NetBufferError, match="vtap0: netlink: used from another event loop"):
        asyncio.run(dev.postsuspend(1))   # instead of pyroute2 hanging
    asyncio.run(dev.close())              # teardown works from any loop


def test_hooks_errors_name_device_and_operation(fake_rtnl):
    dev = PlugNetBuffer("vtap0", "vifb0", 1 << 20)
    with pytest.raises(NetBufferError, match="vifb0: postsuspend"):
        asyncio.run(dev.postsuspend(1))
    asyncio.run(dev.unprotected())  # nothing held: no-op
    fake = fake_rtnl(FakeIPRoute(fail={("tc", "change", "plug"): errno.ENODEV}))
    with pytest.raises(NetBufferError, match=r"vifb0: plug TCQ_PLUG_RELEASE_INDEFINITE.*ENODEV"):
        asyncio.run(dev.start())
    assert fake.closed  # rolled back


def test_start_without_sch_plug_rolls_back(fake_rtnl):
    fake = fake_rtnl(FakeIPRoute(links={"vtap0": (3, "tun")},  # existing TAP is reused, and kept
                                 fail={("tc", "add", "plug"): errno.ENOENT}))
    dev = PlugNetBuffer("vtap0", "vifb0", 1 << 20)
    with pytest.raises(PlugUnsupported, match="vifb0: add plug qdisc: kernel has no sch_plug"):
        asyncio.run(dev.start())
    undo = [(m, c, k) for m, c, k, _ in fake.calls][-3:]
    assert undo == [("tc", "del-filter", "u32"), ("tc", "del", "ingress"), ("link", "del", None)]
    assert fake.closed
    deleted = [kw["index"] for m, c, k, kw in fake.calls if (m, c) == ("link", "del")]
    assert deleted == [fake.links["vifb0"][0]]  # the IFB it made, not the TAP it found


def test_existing_device_of_wrong_kind_is_refused(fake_rtnl):
    fake_rtnl(FakeIPRoute(links={"vtap0": (3, "veth")}))
    dev = PlugNetBuffer("vtap0", "vifb0", 1 << 20)
    with pytest.raises(NetBufferError, match="vtap0: use existing tap: it is of kind 'veth'"):
        asyncio.run(dev.start())


# ---------------------------------------------------------------------------
# Live, in a throwaway network namespace


def _kernel_config(option: str) -> str | None:
    """'y', 'm', 'n' (not set) or None (no /proc/config.gz)."""
    try:
        text = gzip.open("/proc/config.gz", "rt").read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(option + "="):
            return line.split("=", 1)[1]
        if line == f"# {option} is not set":
            return "n"
    return "n"


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP, IFB)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


live = pytest.mark.skipif(_can_netns() is not None, reason=_can_netns() or "")


@pytest.fixture
def netns():
    name = f"remus-t-{secrets.token_hex(4)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        yield name
    finally:
        assert netns_delete(name), f"could not delete network namespace {name}"


def _links(ns) -> dict:
    """Links of the netns by name (synchronous pyroute2: call via asyncio.to_thread in a loop)."""
    with IPRoute(netns=ns, flags=0) as ipr:
        return {link.get("ifname"): link for link in ipr.get_links()}


def _qdiscs(ns, index) -> list:
    with IPRoute(netns=ns, flags=0) as ipr:
        return [(q.get_attr("TCA_KIND"), q["parent"], q["handle"]) for q in ipr.get_qdiscs(index)]


def _plug_qlen(ns, index) -> int:
    """Packets the IFB's plug qdisc is holding."""
    with IPRoute(netns=ns, flags=0) as ipr:
        for q in ipr.get_qdiscs(index):
            if q.get_attr("TCA_KIND") == "plug" and q["handle"] == PLUG_HANDLE:
                return q.get_attr("TCA_STATS2").get_attr("TCA_STATS_QUEUE")["qlen"]
    raise AssertionError("no plug qdisc")


async def _plug_holds(ns, index, count, within=2.0) -> int:
    """Wait (bounded) until the plug holds `count` packets; what it holds then."""
    deadline = time.monotonic() + within
    while True:
        got = await asyncio.to_thread(_plug_qlen, ns, index)
        if got >= count or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


def _redirect_filters(ns, index) -> list:
    with IPRoute(netns=ns, flags=0) as ipr:
        return [f for f in ipr.get_filters(index, parent=INGRESS_HANDLE)
                if f.get_attr("TCA_OPTIONS") and f.get_attr("TCA_OPTIONS").get_attr("TCA_U32_ACT")]


def _netns_list() -> set:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def _ip(ns, *args):
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


INJECT = r"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000))  # TAP|NO_PI
src = bytes.fromhex("525400aabbcc")
arp = (b"\xff" * 6 + src + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
       + src + bytes([10, 0, 0, 2]) + b"\x00" * 6 + bytes([10, 0, 0, 1]))
ipv6 = (bytes.fromhex("333300000001") + src + b"\x86\xdd"
        + bytes.fromhex("60000000000811ff") + b"\xfe\x80" + b"\x00" * 13 + b"\x02"
        + b"\xff\x02" + b"\x00" * 13 + b"\x01" + struct.pack("!HHHH", 9, 9, 8, 0))
os.write(fd, arp)   # neither is IPv4: a `proto ip` filter would let both pass unbuffered
os.write(fd, ipv6)
os.close(fd)
"""


async def _inject(ns, tap):
    """The guest's side: write an ARP and an IPv6 frame into the TAP."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", INJECT, tap)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _ifb_count(ns, ifb, key, at_least, within=2.0) -> int:
    deadline = time.monotonic() + within
    while True:
        got = (await asyncio.to_thread(_links, ns))[ifb].get("stats64")[key]
        if got >= at_least or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


@live
def test_live_redirect_sends_every_protocol_to_the_ifb(netns):
    """TAP + IFB + ingress + u32(all)/mirred: ARP and IPv6 from the guest side reach the IFB."""
    async def run():
        dev = PlugNetBuffer("rtap0", "rifb0", 1 << 20, netns=netns)
        await dev.setup_redirect()
        try:
            links = await asyncio.to_thread(_links, netns)
            tap, ifb = links["rtap0"], links["rifb0"]
            assert tap.get(("linkinfo", "kind")) == "tun" and ifb.get(("linkinfo", "kind")) == "ifb"
            assert tap.get("state") == "up" and ifb.get("state") == "up"
            # the IFB sends nothing of its own (no IPv6 link-local, so no MLD) into the plug
            assert ifb.get(("af_spec", "AF_INET6", "IFLA_INET6_ADDR_GEN_MODE")) == 1
            qdiscs = await asyncio.to_thread(_qdiscs, netns, tap["index"])
            assert ("ingress", TC_H_INGRESS, INGRESS_HANDLE) in qdiscs
            [flt] = await asyncio.to_thread(_redirect_filters, netns, tap["index"])
            assert flt["info"] & 0xFFFF == socket.htons(ETH_P_ALL)
            act = flt.get_attr("TCA_OPTIONS").get_attr("TCA_U32_ACT")["attrs"][0][1]
            parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
            assert (parms["eaction"], parms["ifindex"]) == (TCA_EGRESS_REDIR, ifb["index"])

            before = ifb.get("stats64")["rx_packets"]
            await _inject(netns, "rtap0")
            assert await _ifb_count(netns, "rifb0", "rx_packets", before + 2) == before + 2

            await asyncio.to_thread(_ip, netns, "link", "add", "rbr0", "type", "bridge")
            await dev.attach("rbr0")
            links = await asyncio.to_thread(_links, netns)
            assert links["rtap0"].get("master") == links["rbr0"]["index"]
            with pytest.raises(NetBufferError, match="rtap0: attach to bridge nobr0: no such bridge"):
                await dev.attach("nobr0")
        finally:
            await dev.close()
        assert set(await asyncio.to_thread(_links, netns)) == {"lo", "rbr0"}
        await dev.close()  # idempotent
    asyncio.run(run())


@live
def test_live_close_keeps_a_tap_it_did_not_create(netns):
    _ip(netns, "tuntap", "add", "rtap1", "mode", "tap")

    async def run():
        dev = PlugNetBuffer("rtap1", "rifb1", 1 << 20, netns=netns)
        await dev.setup_redirect()
        index = (await asyncio.to_thread(_links, netns))["rtap1"]["index"]
        await dev.close()
        assert set(await asyncio.to_thread(_links, netns)) == {"lo", "rtap1"}
        assert [q for q in await asyncio.to_thread(_qdiscs, netns, index) if q[0] == "ingress"] == []
        # devices already gone, or the whole namespace, are not an error for close()
        await dev.setup_redirect()
        await asyncio.to_thread(_ip, netns, "link", "del", "rtap1")
        await asyncio.to_thread(_ip, netns, "link", "del", "rifb1")
        await dev.close()
    asyncio.run(run())


@live
def test_live_wrong_netns_is_an_error_not_a_new_namespace():
    name = f"remus-t-missing-{secrets.token_hex(3)}"
    dev = PlugNetBuffer("rtap9", "rifb9", 1 << 20, netns=name)
    try:
        with pytest.raises(NetBufferError, match="rtap9"):
            asyncio.run(dev.start())
        assert name not in _netns_list()  # pyroute2's default would have created it
    finally:
        netns_delete(name)


@live
def test_live_probe_names_sch_plug_and_leaves_nothing_behind():
    namespaces = _netns_list()
    ok, reason = plug_supported()
    assert {n for n in _netns_list() if n.startswith("remus-plugprobe")} <= \
        {n for n in namespaces if n.startswith("remus-plugprobe")}
    config = _kernel_config("CONFIG_NET_SCH_PLUG")
    if config == "n":
        assert (ok, reason) == (False, PLUG_MISSING)
        assert "sch_plug" in reason
    elif config in ("y", "m"):
        assert (ok, reason) == (True, "")
    else:
        assert ok or "sch_plug" in reason


@live
def test_live_probe_in_given_netns(netns):
    ok, reason = plug_supported(netns)
    assert ok or "sch_plug" in reason
    assert set(_links(netns)) == {"lo"}


@live
def test_live_start_without_sch_plug_raises_and_rolls_back(netns):
    ok, _ = plug_supported(netns)
    if ok:
        pytest.skip("this kernel has sch_plug")
    dev = PlugNetBuffer("rtap2", "rifb2", 1 << 20, netns=netns)
    with pytest.raises(PlugUnsupported, match="rifb2: add plug qdisc: kernel has no sch_plug"):
        asyncio.run(dev.start())
    assert set(_links(netns)) == {"lo"}


@live
def test_live_plug_holds_output_until_commit(netns):
    ok, reason = plug_supported(netns)
    if not ok:
        pytest.skip(reason)

    async def run():
        dev = PlugNetBuffer("rtap3", "rifb3", 1 << 20, netns=netns)
        await dev.start()
        try:
            ifb = (await asyncio.to_thread(_links, netns))["rifb3"]["index"]
            assert ("plug", TC_H_ROOT, PLUG_HANDLE) in await asyncio.to_thread(_qdiscs, netns, ifb)

            async def tx():
                return (await asyncio.to_thread(_links, netns))["rifb3"].get("stats64")["tx_packets"]

            sent = await tx()
            await _inject(netns, "rtap3")          # unprotected until the first checkpoint
            assert await _ifb_count(netns, "rifb3", "tx_packets", sent + 2) == sent + 2

            await dev.postsuspend(1)
            await dev.commit(1)
            sent = await tx()
            await _inject(netns, "rtap3")          # output of epoch 2
            assert await _plug_holds(netns, ifb, 2) == 2  # it reached the plug ...
            assert await tx() == sent              # held
            await dev.postsuspend(2)               # barrier after it
            assert await asyncio.to_thread(_plug_qlen, netns, ifb) == 2  # the barrier let none go
            assert await tx() == sent              # still held: not acknowledged
            await dev.commit(2)
            assert await _ifb_count(netns, "rifb3", "tx_packets", sent + 2) == sent + 2

            await _inject(netns, "rtap3")          # output of epoch 3 ...
            await dev.unprotected()                # ... released when the backup is lost
            assert await _ifb_count(netns, "rifb3", "tx_packets", sent + 4) == sent + 4
        finally:
            await dev.close()
        assert set(await asyncio.to_thread(_links, netns)) == {"lo"}
    asyncio.run(run())


def test_a_namespace_helper_stopped_late_is_no_sigterm_for_the_daemon():
    """pyroute2 enters a netns from a forked child and stops it with SIGTERM; the child
    shares asyncio's signal wakeup fd, so a child still running then (slow machine)
    made the daemon's loop see SIGTERM and stop. Importing netbuf_plug prevents it."""
    import pyroute2.config
    from pyroute2.process import ChildProcess, ChildProcessReturnValue
    assert pyroute2.config.disable_mp_signal

    def slow_child():
        time.sleep(2)  # still busy when the parent stops it
        return ChildProcessReturnValue(b"", [])

    def fork_and_stop():
        child = ChildProcess(target=slow_child, args=[])
        child.run()
        time.sleep(0.3)
        child.stop()

    async def main() -> bool:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await asyncio.to_thread(fork_and_stop)
            await asyncio.sleep(0.3)
            return stop.is_set()
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    assert not asyncio.run(main()), "the daemon's loop saw the helper's SIGTERM"
