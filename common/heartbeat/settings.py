"""What a heartbeat runs with (HeartbeatConfig: node names, links, key files,
timing), the error it raises, and the logger both of its processes write to."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOGGER = "remus.heartbeat"
MAX_TEXT = 256  # role and session length


class HeartbeatError(RuntimeError):
    """The heartbeat cannot start (keys, addresses) or its process failed."""


def endpoint(addr: str, what: str) -> tuple[str, bool]:
    """'host:port' -> ('tcp://host:port', is_ipv6)."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {addr!r}: expected HOST:PORT with a port from 1 to 65535")
    ipv6 = ":" in host
    return (f"tcp://[{host}]:{port}" if ipv6 else f"tcp://{host}:{port}"), ipv6


@dataclass
class Link:
    local: str   # our bind address, "host:port" (our PUB)
    peer: str    # the peer's bind address for this link (its PUB)

    @property
    def name(self) -> str:
        return f"{self.local}->{self.peer}"


@dataclass(kw_only=True)
class HeartbeatConfig:
    node: str                  # our name, carried in every beat
    peer_node: str             # the only name accepted in received beats
    links: list[Link]
    secret_key: Path           # our NAME.key_secret
    peer_public_key: Path      # the peer's NAME.key
    interval_ms: int = 100
    miss: int = 5
    realtime: bool = True      # run the heartbeat process SCHED_RR if allowed (as corosync does)

    def __post_init__(self) -> None:
        self.secret_key = Path(self.secret_key)
        self.peer_public_key = Path(self.peer_public_key)
        self.links = [lk if isinstance(lk, Link) else Link(*lk) for lk in self.links]
        if not self.node or not self.peer_node:
            raise ValueError("heartbeat: node and peer_node must be set")
        if self.node == self.peer_node:
            raise ValueError(f"heartbeat: node and peer_node are both {self.node!r}")
        if not self.links:
            raise ValueError("heartbeat: at least one link is needed")
        for lk in self.links:
            endpoint(lk.local, "heartbeat link local address")
            endpoint(lk.peer, "heartbeat link peer address")
        locals_ = [lk.local for lk in self.links]
        if len(set(locals_)) != len(locals_):
            raise ValueError("heartbeat: two links bind the same local address")
        if not isinstance(self.interval_ms, int) or not 1 <= self.interval_ms <= 60_000:
            raise ValueError("heartbeat: interval_ms must be an integer from 1 to 60000")
        if not isinstance(self.miss, int) or not 1 <= self.miss <= 1000:
            raise ValueError("heartbeat: miss must be an integer from 1 to 1000")
