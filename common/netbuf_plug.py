"""Network output buffering in the kernel, with the `plug` qdisc (sch_plug).

This is how Xen's libxl does Remus output commit. The guest's packets leave
QEMU through a TAP; on the host they arrive as *ingress* traffic of the TAP.
An ingress qdisc on the TAP holds a u32 filter that matches every packet
(protocol ETH_P_ALL, so ARP and IPv6 are held as well as IPv4: libxl matched
only `proto ip`) and redirects it with `mirred egress redirect` to an IFB
device. The IFB's root qdisc is `plug`; what it lets through, the IFB
re-injects into the TAP's receive path, and from there it reaches the bridge.

    guest -> QEMU -> TAP (ingress, u32 all -> mirred) -> IFB (root: plug) -> TAP rx -> bridge

At each checkpoint (postsuspend) the primary inserts a barrier in the plug
(TCQ_PLUG_BUFFER); when the backup acknowledges the checkpoint (commit) it
releases the packets up to that barrier (TCQ_PLUG_RELEASE_ONE). When there is
no backup (unprotected) everything passes (TCQ_PLUG_RELEASE_INDEFINITE) until
the next barrier.

sch_plug keeps only ONE barrier: TCQ_PLUG_BUFFER copies the count of packets
since the last barrier over the previous one's, so a second BUFFER before the
RELEASE_ONE of the first would make the kernel release the wrong number of
packets (some before their checkpoint is acknowledged). The replicator is
synchronous (commit(e) always comes before postsuspend(e+1), as in Xen), so
this never happens there. Should a postsuspend arrive with a barrier still
outstanding, this device sends no second BUFFER: that epoch's packets go
behind the next barrier, which only delays them (counted in
stats["coalesced_epochs"]). Never too early.

The requests are built by small pure functions (`*_request`) returning the
arguments of pyroute2's `IPRoute.tc()` / `IPRoute.link()`, so tests can
compile them into netlink messages (pyroute2's IPBatch) without a kernel.
Two pyroute2 traps are handled there: the plug action must be given BY NAME
(an integer silently becomes TCQ_PLUG_BUFFER), and a plug `add` without
`limit` sends limit 0, which drops every packet.
"""
from __future__ import annotations

import asyncio
import errno
import os
import re
import secrets
import subprocess
import threading
import time
from typing import NamedTuple

import pyroute2.config
from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from remus.common import log
from remus.common.hooks import CheckpointDevice

_log = log.get("remus.common.netbuf")

# linux/pkt_sched.h: struct tc_plug_qopt.action
TCQ_PLUG_BUFFER = 0
TCQ_PLUG_RELEASE_ONE = 1
TCQ_PLUG_RELEASE_INDEFINITE = 2
TCQ_PLUG_LIMIT = 3
PLUG_ACTIONS = {
    "TCQ_PLUG_BUFFER": TCQ_PLUG_BUFFER,
    "TCQ_PLUG_RELEASE_ONE": TCQ_PLUG_RELEASE_ONE,
    "TCQ_PLUG_RELEASE_INDEFINITE": TCQ_PLUG_RELEASE_INDEFINITE,
    "TCQ_PLUG_LIMIT": TCQ_PLUG_LIMIT,
}

ETH_P_ALL = 0x0003             # linux/if_ether.h: every protocol
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
INGRESS_HANDLE = 0xFFFF0000    # ffff:
FILTER_PRIO = 10               # as libxl
FILTER_CLASSID = 0xFFFF0001    # ffff:1; pyroute2's u32 requires a classid ("target")
PLUG_HANDLE = 0x00010000       # 1:
TCA_EGRESS_REDIR = 1           # linux/tc_act/tc_mirred.h
TC_ACT_STOLEN = 4              # linux/pkt_cls.h: what mirred redirect returns
IFNAMSIZ = 16

# pyroute2 enters a network namespace from a forked child, which it stops with
# SIGTERM. The child shares the daemon's asyncio signal wakeup fd, so a child
# still running when stopped (any slow machine) made the daemon's loop see a
# SIGTERM and stop: found in the kernel lab, where a daemon stopped "by signal"
# right after start or standby. This makes the child take SIGTERM's default
# action (die) before its work, so nothing reaches the shared wakeup fd.
pyroute2.config.disable_mp_signal = True

PLUG_MISSING = "kernel has no sch_plug (CONFIG_NET_SCH_PLUG)"
_GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class NetBufferError(RuntimeError):
    """A netlink operation of the network buffer failed; names device and operation."""

    def __init__(self, device: str, operation: str, cause: BaseException | str):
        self.device, self.operation, self.cause = device, operation, cause
        if isinstance(cause, NetlinkError):
            text = cause.args[1] if len(cause.args) > 1 else ""
            why = f"{errno.errorcode.get(cause.code, cause.code)} {text}"
        else:
            why = str(cause)
        super().__init__(f"{device}: {operation}: {why.strip()}")


class PlugUnsupported(NetBufferError):
    """The kernel cannot create a plug qdisc (no sch_plug)."""


class Request(NamedTuple):
    """One pyroute2 call: `getattr(ipr, method)(command, **kwargs)`."""
    method: str   # "tc" or "link"
    command: str
    kwargs: dict


# ----------------------------------------------------------------------------
# Request builders (pure)

def check_ifname(name: str) -> str:
    """As the kernel's dev_valid_name()."""
    if (not isinstance(name, str) or not name or len(name.encode()) >= IFNAMSIZ or name in (".", "..")
            or any(c in "/:" or c.isspace() for c in name)):
        raise ValueError(f"invalid interface name {name!r} (1-{IFNAMSIZ - 1} bytes, no '/', ':' or spaces)")
    return name


def tap_request(tap: str) -> Request:
    """A persistent TAP that QEMU (`-netdev tap,ifname=...`) opens by name."""
    flags = {"no_pi": 1, "one_queue": 0, "vnet_hdr": 1, "tun_excl": 0,
             "multi_queue": 0, "persist": 0, "nofilter": 0}  # pyroute2 reads every key
    return Request("link", "add", {"ifname": check_ifname(tap), "kind": "tuntap", "mode": "tap",
                                   "ifr": flags})


def ifb_request(ifb: str) -> Request:
    return Request("link", "add", {"ifname": check_ifname(ifb), "kind": "ifb"})


def link_up_request(index: int) -> Request:
    return Request("link", "set", {"index": index, "state": "up"})


def link_del_request(index: int) -> Request:
    return Request("link", "del", {"index": index})


IN6_ADDR_GEN_MODE_NONE = 1  # linux/if_link.h


def no_ipv6_addr_request(index: int) -> Request:
    """`ip link set DEV addrgenmode none`: no IPv6 link-local address on the IFB, so the
    IFB sends nothing of its own (MLD reports) into the plug, where it would count as guest output."""
    return Request("link", "set", {"index": index, "af_spec": {"attrs": [
        ["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]}})


def enslave_request(index: int, bridge_index: int) -> Request:
    return Request("link", "set", {"index": index, "master": bridge_index})


def ingress_request(tap_index: int, command: str = "add") -> Request:
    """The ingress qdisc (ffff:) on the TAP: what the guest sends arrives there."""
    return Request("tc", command, {"kind": "ingress", "index": tap_index,
                                   "handle": INGRESS_HANDLE, "parent": TC_H_INGRESS})


def redirect_filter_request(tap_index: int, ifb_index: int, command: str = "add-filter") -> Request:
    """u32 on ingress matching every packet of every protocol -> mirred egress redirect to the IFB."""
    kwargs = {"kind": "u32", "index": tap_index, "parent": INGRESS_HANDLE, "prio": FILTER_PRIO,
              "protocol": ETH_P_ALL}
    kwargs["target"] = FILTER_CLASSID  # pyroute2 wants it even to delete
    if command.startswith("del"):
        return Request("tc", command, kwargs)
    kwargs.update(
        keys=["0x0/0x0+0"],  # `match u32 0 0`: matches everything
        action={"kind": "mirred", "direction": "egress", "action": "redirect",
                "ifindex": ifb_index})
    return Request("tc", command, kwargs)


def plug_qdisc_request(ifb_index: int, limit_bytes: int) -> Request:
    """Root plug qdisc on the IFB. The limit is mandatory: 0 would drop every packet."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or not 0 < limit_bytes < 2**32:
        raise ValueError(f"plug limit must be a positive number of bytes below 2**32, not {limit_bytes!r}")
    return Request("tc", "add", {"kind": "plug", "index": ifb_index, "handle": PLUG_HANDLE,
                                 "parent": TC_H_ROOT, "limit": limit_bytes})


def plug_action_request(ifb_index: int, action: str, limit_bytes: int | None = None) -> Request:
    """Change the plug: `action` is a TCQ_PLUG_* NAME (pyroute2 maps unknown values, ints
    included, to TCQ_PLUG_BUFFER without a word)."""
    if action not in PLUG_ACTIONS:
        raise ValueError(f"plug action must be one of {sorted(PLUG_ACTIONS)}, not {action!r}")
    kwargs = {"kind": "plug", "index": ifb_index, "handle": PLUG_HANDLE, "parent": TC_H_ROOT,
              "action": action}
    if action == "TCQ_PLUG_LIMIT":
        kwargs["limit"] = plug_qdisc_request(ifb_index, limit_bytes).kwargs["limit"]  # validated
    return Request("tc", "change", kwargs)


def plug_del_request(ifb_index: int) -> Request:
    return Request("tc", "del", {"kind": "plug", "index": ifb_index, "handle": PLUG_HANDLE,
                                 "parent": TC_H_ROOT})


def qemu_netdev_args(tap: str, mac: str, netdev_id: str = "n0") -> list[str]:
    if not _MAC.match(mac):
        raise ValueError(f"invalid MAC address {mac!r}")
    return ["-netdev", f"tap,id={netdev_id},ifname={check_ifname(tap)},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev={netdev_id},mac={mac},romfile="]


def _errcode(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return exc.code
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _plug_error(ifb: str, exc: BaseException) -> NetBufferError:
    if _errcode(exc) in (errno.ENOENT, errno.EOPNOTSUPP):
        # An unknown qdisc kind is ENOENT ("Specified qdisc kind is unknown").
        return PlugUnsupported(ifb, "add plug qdisc", PLUG_MISSING)
    return NetBufferError(ifb, "add plug qdisc", exc)


# ----------------------------------------------------------------------------
# Run-time probe

def plug_supported(netns: str | None = None) -> tuple[bool, str]:
    """Try a plug qdisc on a temporary IFB and remove it again.

    Without `netns`, a temporary network namespace is created (`ip netns add`)
    and deleted, so the host is untouched; with it, the temporary IFB is made
    in that namespace. Returns (True, "") or (False, reason).
    """
    # pyroute2's synchronous IPRoute runs its own asyncio loop and refuses to
    # start inside a running one, so the probe always runs in its own thread.
    result: list = []

    def run() -> None:
        try:
            result.append(_probe(netns))
        except Exception as exc:  # noqa: BLE001 - the probe answers, it does not raise
            result.append((False, f"plug probe failed: {exc!r}"))
    thread = threading.Thread(target=run, name="plug-probe")
    thread.start()
    thread.join()
    return result[0]


def _probe(netns: str | None) -> tuple[bool, str]:
    temp_ns = None
    if netns is None:
        temp_ns = f"remus-plugprobe-{secrets.token_hex(4)}"
        try:
            subprocess.run(["ip", "netns", "add", temp_ns], check=True, capture_output=True,
                           text=True, timeout=10)
        except FileNotFoundError:
            return False, "cannot probe sch_plug: the `ip` command (iproute2) is missing"
        except subprocess.CalledProcessError as exc:
            return False, f"cannot probe sch_plug: ip netns add failed: {exc.stderr.strip()}"
        except subprocess.TimeoutExpired:
            return False, "cannot probe sch_plug: ip netns add timed out"
        netns = temp_ns
    ifb = f"plugprobe{secrets.token_hex(3)}"
    try:
        with IPRoute(netns=netns, flags=0, ext_ack=True) as ipr:
            try:
                _call(ipr, ifb_request(ifb))
                index = ipr.link_lookup(ifname=ifb)[0]
            except (NetlinkError, OSError, IndexError) as exc:
                return False, f"cannot probe sch_plug: create IFB {ifb}: {exc or 'not found'}"
            try:
                _call(ipr, plug_qdisc_request(index, 1 << 20))
                _call(ipr, plug_del_request(index))
            except (NetlinkError, OSError) as exc:
                err = _plug_error(ifb, exc)
                return False, PLUG_MISSING if isinstance(err, PlugUnsupported) else f"kernel refused: {err}"
            finally:
                try:
                    _call(ipr, link_del_request(index))
                except (NetlinkError, OSError):
                    pass
            return True, ""
    except (NetlinkError, OSError) as exc:
        return False, f"cannot probe sch_plug in netns {netns}: {exc}"
    finally:
        if temp_ns is not None:
            netns_delete(temp_ns)


def netns_delete(name: str, attempts: int = 5) -> bool:
    """`ip netns del NAME`, retried: it can fail while other `ip netns` commands
    run at the same time. True once the namespace is gone."""
    for attempt in range(attempts):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        if not os.path.exists(os.path.join("/run/netns", name)):
            return True
        time.sleep(0.05 * (attempt + 1))
    _log.warning("netns-delete-failed", netns=name)
    return False


def _call(ipr, req: Request):
    return getattr(ipr, req.method)(req.command, **req.kwargs)


# ----------------------------------------------------------------------------
# The device

class PlugNetBuffer(CheckpointDevice):
    """The primary's output buffer for one guest NIC, held by the kernel's plug qdisc.

    `netns`: do everything in that network namespace (tests; QEMU must then
    run in it too to open the TAP by name).
    """

    name = "net-plug"

    def __init__(self, tap: str, ifb: str, limit_bytes: int, *, netns: str | None = None,
                 netdev_id: str = "n0"):
        self.tap = check_ifname(tap)
        self.netdev_id = netdev_id
        self.ifb = check_ifname(ifb)
        if tap == ifb:
            raise ValueError(f"TAP and IFB need different names, both are {tap!r}")
        plug_qdisc_request(0, limit_bytes)  # validates the limit
        self.limit_bytes = limit_bytes
        self.netns = netns
        self.tap_index: int | None = None
        self.ifb_index: int | None = None
        self._ipr: AsyncIPRoute | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop self._ipr belongs to
        self._started = False
        self._created: list[str] = []     # what start() made, in order
        self._plugged = False
        self._barrier: int | None = None  # epoch of the one barrier in the plug, if any
        self.stats: dict = {"barriers_outstanding": 0, "buffered_epochs": 0,
                            "released_epochs": 0, "coalesced_epochs": 0, "unprotected": 0}

    def qemu_netdev_args(self, mac: str) -> list[str]:
        return qemu_netdev_args(self.tap, mac, self.netdev_id)

    # -- set-up ---------------------------------------------------------------

    async def start(self) -> None:
        """TAP, IFB, ingress + u32/mirred redirect, then the plug (open until postsuspend)."""
        if self._started:
            raise NetBufferError(self.tap, "start", "already started")
        try:
            await self.setup_redirect()
            await self._add_plug()
        except BaseException:
            try:
                await self.close()
            except NetBufferError as exc:
                _log.warning("netbuf-rollback-incomplete", error=str(exc))
            raise
        _log.info("netbuf-ready", tap=self.tap, ifb=self.ifb, limit_bytes=self.limit_bytes,
                  netns=self.netns)

    async def setup_redirect(self) -> None:
        """Everything before the plug: the guest's output goes to the IFB (unbuffered yet)."""
        if self._started:
            raise NetBufferError(self.tap, "start", "already started")
        self._started = True
        self.tap_index = await self._ensure_link(self.tap, "tun", tap_request(self.tap), "tap")
        self.ifb_index = await self._ensure_link(self.ifb, "ifb", ifb_request(self.ifb), "ifb")
        if "ifb" in self._created:
            await self._do(self.ifb, "set addrgenmode none", no_ipv6_addr_request(self.ifb_index),
                           ignore=(errno.EAFNOSUPPORT, errno.EOPNOTSUPP))
        await self._do(self.tap, "bring up TAP", link_up_request(self.tap_index))
        await self._do(self.ifb, "bring up IFB", link_up_request(self.ifb_index))
        # A stale ingress qdisc (and its filters) from an earlier run would make add fail.
        await self._do(self.tap, "remove stale ingress qdisc", ingress_request(self.tap_index, "del"),
                       ignore=_GONE)
        await self._do(self.tap, "add ingress qdisc", ingress_request(self.tap_index))
        self._created.append("ingress")
        await self._do(self.tap, f"add u32 filter (all protocols) mirred egress redirect to {self.ifb}",
                       redirect_filter_request(self.tap_index, self.ifb_index))
        self._created.append("filter")

    async def _add_plug(self) -> None:
        assert self.ifb_index is not None
        if "ifb" not in self._created:  # reused IFB: drop whatever root qdisc it has
            await self._do(self.ifb, "remove stale root qdisc", plug_del_request(self.ifb_index),
                           ignore=_GONE)
        try:
            await self._send(plug_qdisc_request(self.ifb_index, self.limit_bytes))
        except (NetlinkError, OSError) as exc:
            raise _plug_error(self.ifb, exc) from exc
        self._created.append("plug")
        self._plugged = True
        # A new plug holds everything; until the first checkpoint the guest is unprotected.
        await self._plug_action("TCQ_PLUG_RELEASE_INDEFINITE", "open the plug")

    async def attach(self, bridge: str) -> None:
        """Enslave the TAP to an existing bridge."""
        if self.tap_index is None:
            raise NetBufferError(self.tap, f"attach to bridge {bridge}", "not started")
        found = await self._conn().link_lookup(ifname=check_ifname(bridge))
        if not found:
            raise NetBufferError(self.tap, f"attach to bridge {bridge}", "no such bridge")
        await self._do(self.tap, f"attach to bridge {bridge}", enslave_request(self.tap_index, found[0]))

    # -- checkpoint hooks -------------------------------------------------------

    async def postsuspend(self, epoch: int) -> None:
        self._require_plug("postsuspend")
        if self._barrier is not None:
            # sch_plug holds one barrier: a second BUFFER would corrupt its count.
            # This epoch's packets wait for the next barrier instead (later, never early).
            if epoch <= self._barrier:
                # Epochs restarted (a new session) without unprotected(): this newer
                # checkpoint covers the barrier's output, so its commit may release it.
                self._barrier = epoch
            self.stats["coalesced_epochs"] += 1
            return
        await self._plug_action("TCQ_PLUG_BUFFER", f"buffer (barrier for epoch {epoch})")
        self._barrier = epoch
        self.stats["buffered_epochs"] += 1
        self.stats["barriers_outstanding"] = 1

    async def commit(self, epoch: int) -> None:
        self._require_plug("commit")
        if self._barrier is None or self._barrier > epoch:
            return  # no barrier at or before this epoch: nothing may leave yet
        await self._plug_action("TCQ_PLUG_RELEASE_ONE", f"release epoch {self._barrier}")
        self._barrier = None
        self.stats["released_epochs"] += 1
        self.stats["barriers_outstanding"] = 0

    async def unprotected(self) -> None:
        if not self._plugged:
            return  # nothing is held
        await self._plug_action("TCQ_PLUG_RELEASE_INDEFINITE", "release all (unprotected)")
        self._barrier = None
        self.stats["barriers_outstanding"] = 0
        self.stats["unprotected"] += 1

    # -- tear-down --------------------------------------------------------------

    async def close(self) -> None:
        """Remove what start() created. Idempotent; devices already gone are not an error."""
        if not self._started:
            return
        if self._ipr is not None and self._loop is not asyncio.get_running_loop():
            try:  # made in another (maybe closed) loop: drop it, use a new socket to clean up
                self._ipr.close()
            except RuntimeError:
                pass
            self._ipr = None
        ipr = self._conn()
        self._ipr = self._loop = None
        self._started = False
        created, self._created = self._created, []
        self._plugged = False
        self._barrier = None
        self.stats["barriers_outstanding"] = 0
        failures: list[str] = []

        async def undo(device: str, operation: str, req: Request) -> None:
            try:
                await _acall(ipr, req)
            except (NetlinkError, OSError) as exc:
                if _errcode(exc) not in _GONE:
                    failures.append(str(NetBufferError(device, operation, exc)))

        try:
            tap, ifb = self.tap_index, self.ifb_index
            if "filter" in created and tap is not None:
                await undo(self.tap, "remove u32 filter", redirect_filter_request(tap, 0, "del-filter"))
            if "ingress" in created and tap is not None:
                await undo(self.tap, "remove ingress qdisc", ingress_request(tap, "del"))
            if "plug" in created and ifb is not None:
                await undo(self.ifb, "remove plug qdisc", plug_del_request(ifb))
            if "ifb" in created and ifb is not None:
                await undo(self.ifb, "delete IFB", link_del_request(ifb))
            if "tap" in created and tap is not None:
                await undo(self.tap, "delete TAP", link_del_request(tap))
        finally:
            ipr.close()
            self.tap_index = self.ifb_index = None
        if failures:
            raise NetBufferError(f"{self.tap}/{self.ifb}", "close", "; ".join(failures))

    # -- helpers ------------------------------------------------------------------

    def _require_plug(self, hook: str) -> None:
        if not self._plugged:
            raise NetBufferError(self.ifb, hook, "the plug qdisc is not set up (start() not run)")

    async def _plug_action(self, action: str, operation: str) -> None:
        assert self.ifb_index is not None
        await self._do(self.ifb, f"plug {action}: {operation}", plug_action_request(self.ifb_index, action))

    def _conn(self) -> AsyncIPRoute:
        """The netlink socket. It belongs to the event loop it was made in: pyroute2's
        async sockets hang (no error) when used from another loop."""
        loop = asyncio.get_running_loop()
        if self._ipr is None:
            # flags=0: never create the netns (pyroute2's default O_CREAT makes a fresh,
            # empty one for a mistyped or already deleted name); ext_ack: kernel's error text.
            self._ipr, self._loop = _open_rtnl(self.netns), loop
        elif self._loop is not loop:
            raise NetBufferError(self.tap, "netlink", "used from another event loop than start()")
        return self._ipr

    async def _ensure_link(self, name: str, kind: str, req: Request, label: str) -> int:
        links = await self._lookup(name)
        if links:
            info = links[0].get(("linkinfo", "kind"))
            if info != kind:
                raise NetBufferError(name, f"use existing {label}", f"it is of kind {info!r}, not {kind!r}")
            _log.info("netbuf-reuse", device=name, kind=kind)
            return links[0]["index"]
        await self._do(name, f"create {label}", req)
        self._created.append(label)
        links = await self._lookup(name)
        if not links:
            raise NetBufferError(name, f"create {label}", "device did not appear")
        return links[0]["index"]

    async def _lookup(self, name: str) -> list:
        try:
            return list(await self._conn().link("get", ifname=name))
        except (NetlinkError, OSError) as exc:
            if isinstance(exc, NetlinkError) and exc.code == errno.ENODEV:
                return []
            raise NetBufferError(name, "look up link", exc) from exc

    async def _send(self, req: Request):
        return await _acall(self._conn(), req)

    async def _do(self, device: str, operation: str, req: Request, ignore: tuple = ()) -> None:
        try:
            await self._send(req)
        except (NetlinkError, OSError) as exc:
            if _errcode(exc) in ignore:
                return
            raise NetBufferError(device, operation, exc) from exc


def _open_rtnl(netns: str | None) -> AsyncIPRoute:
    return AsyncIPRoute(netns=netns, flags=0, ext_ack=True)


async def _acall(ipr: AsyncIPRoute, req: Request):
    return await getattr(ipr, req.method)(req.command, **req.kwargs)
