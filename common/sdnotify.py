"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1 (a no-op outside systemd)."""
from __future__ import annotations

import asyncio
import os
import socket


def notify(*fields: str) -> bool:
    """Send `KEY=value` fields to $NOTIFY_SOCKET; False when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), path)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, when systemd asked for keep-alives for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def keep_alive(healthy) -> None:
    """Send WATCHDOG=1 every half WatchdogSec while `healthy()` says so: a stuck loop
    (or an unhealthy daemon) stops the keep-alives and systemd steps in."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
