"""Heartbeat between the primary and backup daemons, apart from the checkpoint stream.

In the style of ZeroMQ's Binary Star: each node publishes a small beat every
`interval_ms` on every link and subscribes to its peer's beats; the peer is
lost on a link after `miss` intervals without a beat there, and lost
altogether when it is lost on every link. The beats are sent and watched by a
process of their own (see ``proxy``).

Modules, each importing only modules listed above it:

    settings  HeartbeatConfig, Link, HeartbeatError, the logger's name
    keys      CURVE key files: loaded and checked, or generated
    events    what the heartbeat reports to the daemon, and PeerView
    auth      the ZAP check that admits only the peer's key
    outbox    the heartbeat process's messages and logs to the daemon
    runner    the beat loop (Runner)
    child     the heartbeat process's entry point (child_main)
    proxy     Heartbeat: the daemon's handle, which spawns child_main
"""
from remus.common.heartbeat.events import (Event, LinkDown, LinkUp, PeerBack, PeerBeat, PeerLost,
                                           PeerView)
from remus.common.heartbeat.keys import generate_keys, load_keys
from remus.common.heartbeat.proxy import Heartbeat
from remus.common.heartbeat.runner import MAX_BEAT_BYTES
from remus.common.heartbeat.settings import LOGGER, HeartbeatConfig, HeartbeatError, Link

__all__ = [
    "LOGGER", "MAX_BEAT_BYTES", "HeartbeatError", "Link", "HeartbeatConfig", "load_keys",
    "LinkUp", "LinkDown", "PeerLost", "PeerBack", "PeerBeat", "Event", "PeerView",
    "Heartbeat", "generate_keys",
]
