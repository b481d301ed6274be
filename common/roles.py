"""The role machine's parts: what a role is, and what one role hands the next.

A host is always in exactly one role. The `Node` (common/node.py) runs the
current role; its `run()` returns the next role or an exit code:

    remus-primary ──> Starting ──(the peer holds the guest)──> Standby
                         │
                         └──(boot)──> Protecting ──> exit

    remus-backup  ──> Standby ──(primary lost)──> TakingOver ──> Active
                                                                   │
                         Protecting <──(remusctl reprotect)────────┘

    TakingOver ──(the takeover window passed)──> Standby, its replica stale

    any role that sees a newer generation holding the guest ──> StoodDown ──> exit

Roles live with the host side that owns their work (primary/, backup/); a
role of one side never imports the other. Where a role hands over to the
other side's role (Starting → Standby, Active → Protecting) it asks
`node.roles`, a `RoleFactory` that the entry point (remus.node) provides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from remus.common.exitcodes import EXIT_STOOD_DOWN
from remus.common.status import RoleName, Status

if TYPE_CHECKING:
    from remus.common.config import Config
    from remus.common.qemu import QemuGuest


class Role:
    """One phase of a host's life. Subclasses set `name` and implement `run`."""
    name: RoleName

    async def run(self, node) -> "Role | int":
        """Do this role's work; return the role that follows, or the exit code."""
        raise NotImplementedError

    def status(self, node) -> Status:
        return Status(self.name, node.host, node.cfg.guest.name, "starting", node.pid,
                      node.generation, None, 0)

    def commands(self) -> dict[str, Callable[[str], dict]]:
        """The control commands this role answers (remusctl drill, reprotect, ...)."""
        return {}

    def healthy(self) -> bool:
        """What systemd's watchdog is fed on."""
        return True

    def beat_role(self) -> RoleName:
        """The role published in the heartbeat: usually the role's name."""
        return self.name


@dataclass
class RunningGuest:
    """A running guest handed from one role to the next, with everything that goes
    with it; the role holding it closes it (kills QEMU, closes the NICs)."""
    guest: "QemuGuest"
    netbuf: object | None       # the NICs' output buffers (NicGroup), None outside bridged mode
    ram_file: Path
    disk_paths: list[str]       # the writable disks to mirror when protecting it
    generation: int
    cleanup: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)

    async def close(self) -> None:
        self.guest.kill()
        if self.netbuf is not None:
            await self.netbuf.close()
        for step in self.cleanup:
            result = step()
            if result is not None:
                await result


class RoleFactory(Protocol):
    """The roles one side asks for on the other side, provided by the entry point."""

    def standby(self, cfg: "Config") -> Role:
        """Keep the replica of the guest that `cfg`'s primary host runs."""

    def protecting(self, cfg: "Config", running: RunningGuest,
                   stats: Path | None = None) -> Role:
        """Checkpoint `running` to `cfg`'s backup host."""


class StoodDown(Role):
    """Another host holds the guest at a higher generation: this host's copy was
    stopped (by the role that saw it) and the daemon exits."""
    name = RoleName.STOOD_DOWN

    def __init__(self, generation: int, holder: dict, log):
        self.generation, self.holder, self._log = generation, holder, log

    async def run(self, node) -> int:
        self._log.error("stood-down", my_generation=self.generation,
                        holder=self.holder.get("node"),
                        holder_generation=self.holder.get("generation"),
                        detail="another host holds the guest at a higher generation; this copy "
                               "was stopped and its held output dropped")
        return EXIT_STOOD_DOWN
