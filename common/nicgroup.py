"""All the guest's NICs as one checkpoint device.

Each NIC has its own output buffer (userspace relay or plug qdisc) and TAP on
its own bridge. The group runs every hook on each of them in the guest's NIC
order, so the frames of an epoch leave on every NIC only once the backup holds
the checkpoint, and copies what each hands to the guest to the backup tagged
with the NIC's index, for replay on the same NIC after a failover.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from remus.common import log
from remus.common.hooks import CheckpointDevice, Hooks
from remus.common.netbuf import UserspaceNetBuffer
from remus.common.qemu import GuestError

_log = log.get("remus.netbuf")


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

    def set_output_listener(self, listener: Callable[[], None]) -> bool:
        """`listener` is called when a NIC holds the first frame of an epoch; False if
        no NIC can tell (the plug qdisc holds frames in the kernel, out of sight)."""
        able = [b for b in self.buffers if hasattr(b, "output_listener")]
        for b in able:
            b.output_listener = listener
        return bool(able)

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


def make_netbuf(cfg, run_dir: Path, buffering: bool) -> NicGroup | None:
    """The output buffers of the guest's NICs in bridged mode: plug where asked and
    possible, else userspace; one per NIC, each capped at buffer_cap_mib. The primary
    holds output in them; a taken-over guest passes it straight through until it is
    re-protected."""
    net = cfg.network
    if net.mode != "bridged":
        return None
    cap = net.buffer_cap_mib << 20
    plug = False
    if net.buffer in ("plug", "auto") and buffering:
        from remus.common.netbuf_plug import PlugNetBuffer, plug_supported
        plug, why = plug_supported()
        if not plug and net.buffer == "plug":
            raise GuestError(f"[network] buffer = \"plug\" but {why}; use \"userspace\" or \"auto\"")
        if not plug:
            _log.info("netbuf-mode", mode="userspace", reason=why)
    buffers = []
    for i, nic in enumerate(cfg.nics):
        if plug:
            buffers.append(PlugNetBuffer(nic.tap, "ifb-" + nic.tap[-11:], cap, netdev_id=f"n{i}"))
        else:
            sock = run_dir / ("net.sock" if i == 0 else f"net{i}.sock")
            buffers.append(UserspaceNetBuffer(nic.tap, sock, cap, buffering, netdev_id=f"n{i}"))
    return NicGroup(buffers, cfg.nics)
