"""The primary host's record of the guest it ran: its generation, and whether it
may still run (primary.json in the state directory)."""
from __future__ import annotations

import json
from pathlib import Path

from remus.common.durable import write_atomic
from remus.common.qemu import GuestError


def read_generation(state_dir: Path) -> int:
    """The generation this host holds the guest at: 1 until a failover to this host (as
    the backup of a re-protected guest, its replica is in the same directory) raised it."""
    generation = int(_read_record(state_dir).get("generation", 1))
    try:
        replica = json.loads((state_dir / "replica.json").read_text())
        generation = max(generation, int(replica.get("generation", 1)))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return generation


def was_running(state_dir: Path) -> bool:
    """Whether the guest this host last ran may still run: its daemon did not see it end
    (a crash, a handover, a failover, standing down)."""
    return bool(_read_record(state_dir).get("running", False))


def write_running(state_dir: Path, generation: int, running: bool) -> None:
    """Durably: a host that loses power right after must find what was written here."""
    write_atomic(state_dir / "primary.json",
                 json.dumps({"generation": generation, "running": running}).encode())


def _read_record(state_dir: Path) -> dict:
    path = state_dir / "primary.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise GuestError(f"{path} unreadable: {exc}") from None
