"""Who else holds the guest: watch the peer's beats for a newer generation.

A host that runs the guest (protecting or active) keeps beating its role and
progress, and stands down the moment the other host is seen running the guest
at a higher generation: two copies must never both release output.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from remus.common import log
from remus.common.heartbeat import HeartbeatError, LinkDown, PeerLost
from remus.common.status import RoleName

_log = log.get("remus.holder")

JITTER_REPORT_S = 10.0

Progress = Callable[[], tuple[str, int]]  # (session, last committed epoch)


async def watch_for_newer_holder(node, generation: int, progress: Progress | None = None) -> dict:
    """Keep `node`'s beats current; return the beat of a peer holding a newer generation.
    Never returns without a heartbeat."""
    hb = node.hb
    if hb is None:
        await asyncio.Event().wait()  # no heartbeat: nothing to learn from
    publisher = asyncio.create_task(_publish(node, progress))
    try:
        holder = await _newer_holder(hb, generation)
    except HeartbeatError as exc:
        _log.error("heartbeat-failed", error=str(exc), detail="running on without a heartbeat")
        holder = None
    finally:
        publisher.cancel()
    if holder is None:
        await asyncio.Event().wait()
    return holder


async def _publish(node, progress: Progress | None) -> None:
    hb = node.hb
    last_report = time.monotonic()
    while True:
        if progress is not None:
            node.publish(*progress())
        if time.monotonic() - last_report >= JITTER_REPORT_S:
            last_report = time.monotonic()
            j = hb.jitter()
            _log.info("heartbeat-jitter", beats=j.get("count"), p50_ms=j.get("p50_ms"),
                      p99_ms=j.get("p99_ms"), max_ms=j.get("max_ms"))
            hb.reset_jitter()
        await asyncio.sleep(0.1)


async def _newer_holder(hb, generation: int) -> dict | None:
    async for event in hb.events():
        beat = getattr(event, "beat", None)
        if (beat and beat.get("role") == RoleName.ACTIVE.value
                and int(beat.get("generation", 0)) > generation):
            return beat
        if isinstance(event, PeerLost):
            _log.warning("peer-lost", detail="the peer is silent on every heartbeat link")
        elif isinstance(event, LinkDown):
            _log.warning("link-down", link=event.link)
    return None
