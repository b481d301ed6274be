"""The heartbeat for one side of the pair, from the config (None: no heartbeat)."""
from __future__ import annotations

from pathlib import Path

from remus.common.config import Config
from remus.common.heartbeat import Heartbeat, HeartbeatConfig, Link
from remus.common.peer_map import PEER


def heartbeat_for(cfg: Config, role: str) -> Heartbeat | None:
    hb = cfg.heartbeat
    if not hb.links:
        return None
    peer = PEER[role]
    me = 0 if role == "primary" else 1
    keys = Path(hb.keys_dir)
    return Heartbeat(HeartbeatConfig(
        node=role, peer_node=peer,
        links=[Link(local=pair[me], peer=pair[1 - me]) for pair in hb.links],
        secret_key=keys / f"{role}.key_secret", peer_public_key=keys / f"{peer}.key",
        interval_ms=hb.interval_ms, miss=hb.miss))


def heartbeat_status(hb: Heartbeat | None) -> dict | None:
    """Per link: up, last beat age, missed beats, round trip; and the peer's last beat."""
    if hb is None:
        return None
    view = hb.view()
    return {"peer_alive": view.peer_alive, "running": view.running, "links": view.links,
            "peer": view.last_beat}


def grace_s(cfg: Config) -> float:
    """How long the heartbeat needs to call a dead peer lost, with a margin for a busy host."""
    hb = cfg.heartbeat
    return hb.miss * hb.interval_ms / 1000 * 1.5 + 0.3
