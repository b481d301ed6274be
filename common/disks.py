"""The guest's disks, as the config declares them: `[[disk]]` tables, or the
older single `[guest] disk = PATH` (one raw virtio-blk disk).

Every writable disk is mirrored to the backup and all of them commit together
in one checkpoint; the replica of each is a raw, sparse file whatever the
source's format (a qcow2 image, its backing chain included, is read through
QEMU). Read-only media (a cloud-init seed, an installer ISO) are not
replicated: both hosts must hold the same content, which the handshake checks
by size and hash.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("raw", "qcow2")
BUSES = ("virtio-blk", "virtio-scsi")
MAX_DISKS = 16
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")
_KEYS = {"path", "format", "bus", "serial", "readonly"}


class DiskConfigError(ValueError):
    """A `[[disk]]` entry that cannot be used; the message names the entry and key."""


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str = "raw"
    bus: str = "virtio-blk"
    serial: str = ""
    readonly: bool = False

    def shape(self) -> dict:
        """What the guest sees of this disk: part of the configuration fingerprint."""
        return {"bus": self.bus, "serial": self.serial, "readonly": self.readonly}


def parse_disks(entries, legacy: str, base: Path) -> tuple[DiskSpec, ...]:
    """`[[disk]]` entries (a list of tables) or the legacy `[guest] disk` path."""
    if entries is None:
        return (DiskSpec(legacy),) if legacy else ()
    if legacy:
        raise DiskConfigError("[guest] disk and [[disk]] both given: list every disk as [[disk]]")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DiskConfigError("[[disk]] must be an array of tables, one per disk")
    if len(entries) > MAX_DISKS:
        raise DiskConfigError(f"[[disk]]: {len(entries)} disks, at most {MAX_DISKS}")
    disks = tuple(_one(i, entry, base) for i, entry in enumerate(entries, 1))
    serials = [d.serial for d in disks if d.serial]
    if len(serials) != len(set(serials)):
        raise DiskConfigError("[[disk]] serial: two disks have the same serial")
    return disks


def check_keys(where: str, entry: dict, known: set, error: type) -> None:
    """An entry of a [[table]] array may hold only the `known` keys."""
    unknown = set(entry) - known
    if unknown:
        raise error(f"{where} {sorted(unknown)[0]}: unknown key (known: "
                    f"{', '.join(sorted(known))})")


def _one(number: int, entry: dict, base: Path) -> DiskSpec:
    where = f"[[disk]] #{number}"
    check_keys(where, entry, _KEYS, DiskConfigError)
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise DiskConfigError(f"{where} path: required, the disk image's file")
    values = {"path": path if os.path.isabs(path) else str((base / path).resolve())}
    for key, choices in (("format", FORMATS), ("bus", BUSES)):
        if key in entry:
            if entry[key] not in choices:
                raise DiskConfigError(f"{where} {key}: must be one of {', '.join(choices)} "
                                      f"(got {entry[key]!r})")
            values[key] = entry[key]
    if "serial" in entry:
        if not isinstance(entry["serial"], str) or not _SERIAL_RE.fullmatch(entry["serial"]):
            raise DiskConfigError(f"{where} serial: 1 to 20 letters, digits, '_', '.', '-' "
                                  f"(got {entry['serial']!r})")
        values["serial"] = entry["serial"]
    if "readonly" in entry:
        if not isinstance(entry["readonly"], bool):
            raise DiskConfigError(f"{where} readonly: expected true or false")
        values["readonly"] = entry["readonly"]
    return DiskSpec(**values)


def media_digest(path: str, chunk: int = 1 << 20) -> str:
    """Size and sha256 of a read-only medium, as the handshake compares them."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return f"{size}:{h.hexdigest()}"


def read_only_media(disks) -> list[tuple[str, str]]:
    """(file, "SIZE:SHA256") of each read-only medium, in the guest's order."""
    out = []
    for d in disks:
        if d.readonly:
            try:
                out.append((d.path, media_digest(d.path)))
            except OSError as exc:
                raise DiskConfigError(f"[[disk]] {d.path}: cannot read this read-only medium "
                                      f"({exc.strerror or exc}); both hosts need the same "
                                      f"file") from None
    return out
