"""The guest's NICs, as the config declares them: `[[nic]]` tables, or the
single NIC of `[network]` (its mac, bridge and tap).

Every NIC of a bridged guest is held by the output buffer: each has its TAP on
its own bridge, and the frames of all of them are released per epoch, in order,
when the backup acknowledges the checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from remus.common.disks import check_keys

MAX_NICS = 8
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
_IF_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_KEYS = {"mac", "bridge", "tap", "model"}


class NicConfigError(ValueError):
    """A `[[nic]]` entry that cannot be used; the message names the entry and key."""


@dataclass(frozen=True)
class NicSpec:
    mac: str
    bridge: str
    tap: str
    model: str = "virtio-net"


def default_tap(guest: str, index: int) -> str:
    return ("rm-" + guest)[:15] if index == 0 else f"rm{index}-{guest}"[:15]


def parse_nics(entries, network, guest: str) -> tuple[NicSpec, ...]:
    """`[[nic]]` entries, or the one NIC `[network]` describes (bridged mode only)."""
    if entries is None:
        if network.mode != "bridged":
            return ()
        return (NicSpec(network.mac, network.bridge, network.tap or default_tap(guest, 0)),)
    if network.mode != "bridged":
        raise NicConfigError('[[nic]]: several NICs need [network] mode = "bridged"')
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise NicConfigError("[[nic]] must be an array of tables, one per NIC")
    if not 1 <= len(entries) <= MAX_NICS:
        raise NicConfigError(f"[[nic]]: {len(entries)} NICs, 1 to {MAX_NICS}")
    nics = tuple(_one(i, e, guest) for i, e in enumerate(entries))
    for what in ("mac", "tap"):
        values = [getattr(n, what) for n in nics]
        if len(set(values)) != len(values):
            raise NicConfigError(f"[[nic]] {what}: two NICs have the same {what}")
    return nics


def _one(index: int, entry: dict, guest: str) -> NicSpec:
    where = f"[[nic]] #{index + 1}"
    check_keys(where, entry, _KEYS, NicConfigError)
    mac = entry.get("mac")
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.lower()) or int(mac[:2], 16) & 1:
        raise NicConfigError(f"{where} mac: required, a unicast MAC like 52:54:00:12:34:56")
    bridge = entry.get("bridge")
    if not isinstance(bridge, str) or not _IF_RE.fullmatch(bridge):
        raise NicConfigError(f"{where} bridge: required, the bridge on each host its TAP joins")
    tap = entry.get("tap", default_tap(guest, index))
    if not isinstance(tap, str) or not _IF_RE.fullmatch(tap):
        raise NicConfigError(f"{where} tap: an interface name of at most 15 characters")
    if entry.get("model", "virtio-net") != "virtio-net":
        raise NicConfigError(f"{where} model: only virtio-net (got {entry['model']!r})")
    return NicSpec(mac.lower(), bridge, tap)
