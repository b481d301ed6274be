"""TAP devices owned by a daemon: created on open, gone when the last fd closes.

A non-persistent TAP cannot outlive the daemon and QEMU that hold it, so a
crash never leaves a stale port on the bridge.
"""
from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


class TapError(RuntimeError):
    """The TAP could not be created or attached; the message names the device."""


def open_tap(name: str) -> int:
    """Create TAP `name` and return its fd (non-blocking, close-on-exec)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise TapError(f"cannot create TAP {name}: {exc.strerror}") from None
    return fd


def attach(name: str, bridge: str) -> None:
    """Bring TAP `name` up as a port of `bridge`."""
    with IPRoute() as ipr:
        tap = ipr.link_lookup(ifname=name)
        br = ipr.link_lookup(ifname=bridge)
        if not tap:
            raise TapError(f"TAP {name} does not exist")
        if not br:
            raise TapError(f"bridge {bridge} does not exist on this host")
        try:
            ipr.link("set", index=tap[0], master=br[0], state="up")
        except Exception as exc:  # pyroute2 raises NetlinkError; keep the message
            raise TapError(f"cannot attach {name} to bridge {bridge}: {exc}") from None


def send_to_guest(name: str, frames: list[bytes]) -> int:
    """Hand `frames` to whatever reads TAP `name` (the guest's NIC): a frame sent on a
    TAP interface is what its fd reads. Returns how many went out."""
    import socket
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((name, 0))
        for frame in frames:
            try:
                s.send(frame)
                sent += 1
            except OSError:
                pass  # a full queue drops it, as the wire would; TCP resends
    return sent
