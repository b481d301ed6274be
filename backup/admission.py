"""Who may hold a connection to the stream port, and how many.

The port is reachable from the network; each connection costs a file
descriptor and, with TLS, a handshake. Without limits, anyone on the LAN
holding enough idle connections starves the real session of descriptors and
the replica never becomes resumable. So connections are refused before any
byte is read when they come from an address other than the primary's (the
primary binds its end to [primary] address), or past a cap in total and per
source; at a cap the oldest connection that has not authenticated yet is
closed to make room, so stalled handshakes cannot lock the primary out.
Refusals are counted and logged as a summary at most every SUMMARY_EVERY_S,
not one line each.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from collections import Counter

from remus.common import log

_log = log.get("remus.backup")

MAX_CONNECTIONS = 16     # the session, a reconnecting primary, a few handshakes
MAX_PER_SOURCE = 4
SUMMARY_EVERY_S = 10.0


def normalise(ip: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 as IPv4."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def addresses_of(host: str) -> set[str] | None:
    """The addresses `host` stands for; None (anyone) for an unspecified address or a
    name that does not resolve (logged)."""
    if not host or host in ("0.0.0.0", "::", "*"):
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        _log.warning("primary-address-unresolved", host=host, error=str(exc),
                     detail="stream connections are accepted from any address")
        return None
    return {normalise(info[4][0]) for info in infos}


class Ticket:
    """One admitted connection; `abort` ends it if it has to make room."""

    def __init__(self, ip: str, abort):
        self.ip, self.abort = ip, abort
        self.authenticated = False  # past TLS (or the hello, without TLS): never evicted


class Admission:
    def __init__(self, allowed: set[str] | None, max_connections: int = MAX_CONNECTIONS,
                 max_per_source: int = MAX_PER_SOURCE, clock=time.monotonic):
        self.allowed = allowed
        self.max_connections, self.max_per_source = max_connections, max_per_source
        self.tickets: list[Ticket] = []  # oldest first
        self.refused: Counter[str] = Counter()  # by source and reason, since the last summary
        self.refused_total = 0
        self.evicted_total = 0
        self._clock = clock
        self._summary_at = clock()

    def admit(self, ip: str, abort=lambda: None) -> Ticket | None:
        """A ticket if a new connection from `ip` may be served (`release` it later), else
        None. At a cap, the oldest connection of that source (or of all) that has not
        authenticated yet makes room: stalled handshakes cannot lock the primary out."""
        ip = normalise(ip)
        if self.allowed is not None and ip not in self.allowed:
            return self._refuse(ip, "not the primary's address")
        same = [t for t in self.tickets if t.ip == ip]
        if len(same) >= self.max_per_source and not self._evict(same):
            return self._refuse(ip, "too many connections from this address")
        if len(self.tickets) >= self.max_connections and not self._evict(self.tickets):
            return self._refuse(ip, "too many connections")
        ticket = Ticket(ip, abort)
        self.tickets.append(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        if ticket in self.tickets:
            self.tickets.remove(ticket)

    def _evict(self, among: list[Ticket]) -> bool:
        victim = next((t for t in among if not t.authenticated), None)
        if victim is None:
            return False
        self.release(victim)
        victim.abort()
        self.evicted_total += 1
        self._count(f"{victim.ip}: evicted, not authenticated in time for a newer connection")
        return True

    def _refuse(self, ip: str, reason: str) -> None:
        self._count(f"{ip}: {reason}")
        return None

    def _count(self, what: str) -> None:
        self.refused[what] += 1
        self.refused_total += 1
        now = self._clock()
        if now - self._summary_at < SUMMARY_EVERY_S and self.refused_total > 1:
            return
        _log.warning("stream-connections-refused", count=sum(self.refused.values()),
                     seconds=round(now - self._summary_at, 1),
                     by_source=dict(self.refused.most_common(5)),
                     action="closed before reading; session and replica untouched")
        self.refused.clear()
        self._summary_at = now
