"""All the guest's NICs as one checkpoint device.

Each NIC has its own output buffer (userspace relay or plug qdisc) and TAP on
its own bridge. The group runs every hook on each of them in the guest's NIC
order, so the frames of an epoch leave on every NIC only once the backup holds
the checkpoint, and copies what each hands to the guest to the backup tagged
with the NIC's index, for replay on the same NIC after a failover.
"""
from __future__ import annotations

from typing import Callable

from remus.primary.hooks import CheckpointDevice, Hooks


class NicGroup(Hooks, CheckpointDevice):
    """Hooks runs each checkpoint hook on every NIC's buffer, in the guest's NIC order."""
    name = "nics"

    def __init__(self, buffers: list, nics):
        super().__init__(buffers)
        self.buffers = self.devices
        self.nics = tuple(nics)  # remus.common.nics.NicSpec, one per buffer

    @property
    def userspace(self) -> bool:
        """Frames can be handed straight into the guest's NIC streams (input replay)."""
        return all(hasattr(b, "to_guest") for b in self.buffers)

    @property
    def stats(self) -> dict:
        total: dict = {}
        for b in self.buffers:
            for key, value in b.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def set_inbound_listener(self, listener: Callable[[int, list[bytes]], None]) -> None:
        for index, b in enumerate(self.buffers):
            if hasattr(b, "inbound_listener"):
                b.inbound_listener = (lambda frames, i=index: listener(i, frames))

    def qemu_netdev_args(self) -> list[str]:
        return [arg for b, nic in zip(self.buffers, self.nics) for arg in b.qemu_netdev_args(nic.mac)]

    def to_guest(self, frames: list[tuple[int, bytes]]) -> int:
        """Hand each (NIC, frame) to that NIC of the guest; how many went."""
        sent = 0
        for index, frame in frames:
            if 0 <= index < len(self.buffers):
                sent += self.buffers[index].to_guest([frame])
        return sent

    async def start(self) -> None:
        for b in self.buffers:
            await b.start()

    async def attach(self) -> None:
        for b, nic in zip(self.buffers, self.nics):
            await b.attach(nic.bridge)

    async def close(self) -> None:
        for b in self.buffers:
            await b.close()
