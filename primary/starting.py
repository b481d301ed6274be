"""The first role of remus-primary: decide whether this host boots the guest.

If the other host already runs the guest (a failover or a handover happened
while this host was down), booting here would make a second copy: this host
stands by as that host's backup instead. If the other host is silent and this
host's last guest was never seen to end, nobody can tell, and the daemon
refuses to guess.
"""
from __future__ import annotations

from pathlib import Path

from remus.common import log
from remus.common.durable import private_dir
from remus.common.exitcodes import EXIT_UNDECIDED
from remus.common.nicgroup import make_netbuf
from remus.common.peering import grace_s
from remus.common.qemu import GuestError, GuestPaths, QemuGuest
from remus.common.ramfile import RamFileError, create_ram_file
from remus.common.roles import Role, RunningGuest
from remus.common.status import HOLDING_ROLES, RoleName
from remus.primary.protecting import Protecting
from remus.primary.record import was_running

_log = log.get("remus.primary")


class Starting(Role):
    name = RoleName.PRIMARY

    def __init__(self, cfg, force: bool = False, no_net: bool = False,
                 stats: Path | None = None):
        self.cfg, self.force, self.no_net, self.stats = cfg, force, no_net, stats

    async def run(self, node) -> Role | int:
        holder = await self._holder_of_the_guest(node)
        if isinstance(holder, int):
            return holder
        if holder is not None:
            _log.warning("peer-holds-the-guest", peer_role=holder.get("role"),
                         peer_generation=holder.get("generation"),
                         action="not starting the guest here; standing by as the backup "
                                "of the host that runs it (remusctl reprotect there)")
            return node.roles.standby(self.cfg.reversed())
        running = await boot(self.cfg, node.generation, self.no_net)
        return Protecting(self.cfg, running, self.stats)

    async def _holder_of_the_guest(self, node) -> dict | int | None:
        """Who runs the VM now, as far as this host can tell at start: the peer's beat if
        it holds (or is taking over) the guest, None if this host should boot it, or an
        exit code if that cannot be decided safely."""
        beat = await node.peer_beat(grace_s(node.cfg) * 2) if node.hb is not None else None
        if beat is not None and beat.get("role") in {r.value for r in HOLDING_ROLES}:
            return beat
        if beat is None and was_running(node.state_dir) and not self.force:
            _log.error("peer-unknown",
                       detail=("no [heartbeat] to ask the peer" if node.hb is None else
                               "the peer is silent on every heartbeat link")
                              + ", and the guest this host last ran was never seen to end (a "
                                "crash, a handover or a failover): it may run on the other "
                                "host. Not starting a second copy.",
                       hint="check the backup host; if it does not run the guest, start with "
                            "--force-start")
            return EXIT_UNDECIDED
        return None


async def boot(cfg, generation: int, no_net: bool) -> RunningGuest:
    """The guest booted fresh on this host, its output held by the NICs' buffers
    (unless `no_net`)."""
    run_dir = Path(cfg.primary.state_dir) / "run"
    try:
        ram_file = create_ram_file(Path(cfg.guest.ram_dir), cfg.guest.name)
    except (RamFileError, OSError) as exc:
        raise GuestError(f"guest RAM file: {exc}") from None
    guest = QemuGuest(cfg, GuestPaths(run_dir=run_dir, ram_file=ram_file))
    private_dir(run_dir)
    netbuf = make_netbuf(cfg, run_dir, buffering=not no_net)
    running = RunningGuest(guest, netbuf, ram_file, [d.path for d in cfg.mirrored_disks],
                           generation, cleanup=[lambda: ram_file.unlink(missing_ok=True)])
    try:
        net_args = None
        if netbuf is not None:
            await netbuf.start()
            await netbuf.attach()
            net_args = netbuf.qemu_netdev_args()
        if no_net:
            _log.warning("output-buffering-disabled", detail="--no-net: guest output leaves at "
                         "once; a failover can take back replies that clients saw (unsafe)")
        await guest.launch(net_args=net_args)
    except BaseException:
        await running.close()
        raise
    return running
