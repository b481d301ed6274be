"""What the heartbeat tells the daemon: events about the links and the peer, and
the peer's view (PeerView)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkUp:
    link: str


@dataclass(frozen=True)
class LinkDown:
    link: str
    missed: int = 0            # intervals without a beat when the link was declared down


@dataclass(frozen=True)
class PeerLost:
    """Down on every link (only after the peer was seen)."""
    silent_ms: float = 0.0     # age of the newest beat, on any link, at detection


@dataclass(frozen=True)
class PeerBack:
    """The peer is alive again (first=True: the first beat ever)."""
    beat: dict
    first: bool = False


@dataclass(frozen=True)
class PeerBeat:
    """A beat, when role/session/generation changed, else at most once a second."""
    beat: dict


Event = LinkUp | LinkDown | PeerLost | PeerBack | PeerBeat


@dataclass
class PeerView:
    links: list[dict]          # {"link", "up", "last_beat_age_ms" (None: never), "missed", "rtt_ms", "rejected"}
    peer_alive: bool           # up on at least one link
    last_beat: dict | None     # last beat from the peer: node, role, session, generation, epoch, seq, sent_at
    running: bool = True       # False once the heartbeat process has stopped or failed


EVENT_TYPES = {cls.__name__: cls for cls in (LinkUp, LinkDown, PeerLost, PeerBack, PeerBeat)}
