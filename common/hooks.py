"""Checkpoint devices: the extension points of the primary's epoch loop.

As in the original Remus script, each device is told when the guest has been
suspended for a checkpoint, when it is about to resume, and when the backup
has acknowledged the checkpoint. Network output buffering and disk
replication plug in here.
"""
from __future__ import annotations

# Where a drill may make the primary die: before and after each hook, the seed's
# drill commands s s2 r r2 c c2.
DRILL_POINTS = {"s": "postsuspend-before", "s2": "postsuspend-after", "r": "preresume-before",
                "r2": "preresume-after", "c": "commit-before", "c2": "commit-after"}


class CheckpointDevice:
    name = "device"

    async def postsuspend(self, epoch: int) -> None:
        """The guest is paused; epoch `epoch` is closing."""

    async def preresume(self, epoch: int) -> None:
        """The checkpoint is captured; the guest is about to run again."""

    async def commit(self, epoch: int) -> None:
        """The backup holds checkpoint `epoch`: effects of it may leave the host."""

    async def unprotected(self) -> None:
        """The backup is gone: stop holding anything back."""

    def silence(self) -> None:
        """Another host holds the guest now: drop everything held, release nothing ever again."""

    def carry_over(self) -> None:
        """The session is lost but the guest stays paused: keep what is held for the next
        session's first commit (its full checkpoint covers the state that produced it)."""


class Hooks:
    """Runs every device's hook in order; disks must commit before network."""

    def __init__(self, devices: list[CheckpointDevice] | None = None):
        self.devices = list(devices or [])
        self.last_run: str | None = None  # the last phase whose hooks all ran (drills log it)

    async def postsuspend(self, epoch: int) -> None:
        for d in self.devices:
            await d.postsuspend(epoch)
        self.last_run = "postsuspend"

    async def preresume(self, epoch: int) -> None:
        for d in self.devices:
            await d.preresume(epoch)
        self.last_run = "preresume"

    async def commit(self, epoch: int) -> None:
        for d in self.devices:
            await d.commit(epoch)
        self.last_run = "commit"

    async def unprotected(self) -> None:
        for d in self.devices:
            await d.unprotected()

    def silence(self) -> None:
        for d in self.devices:
            d.silence()

    def carry_over(self) -> None:
        for d in self.devices:
            d.carry_over()
