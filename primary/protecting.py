"""The protecting role: checkpoint the running guest to the other host.

Taken by a freshly booted primary and by a host that re-protects the guest it
took over. The role owns the running guest from then on and ends the daemon:
when the guest ends, the operator stops it, or a newer generation holds the
guest on the other host.
"""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from remus.common import log, sdnotify, tls
from remus.common.capture import RamView, make_capture
from remus.common.config import read_only_media
from remus.common.exitcodes import EXIT_GUEST_FAILED, EXIT_OK
from remus.common.holder import watch_for_newer_holder
from remus.common.hooks import DRILL_POINTS, Hooks
from remus.common.peering import PEER, heartbeat_status
from remus.common.roles import Role, RunningGuest, StoodDown
from remus.common.stats import EpochLog
from remus.common.status import PrimaryState, PrimaryStatus, RoleName
from remus.common.waiting import cancel_and_wait
from remus.primary.diskrep import MirroredDisks
from remus.primary.record import write_running
from remus.primary.replicator import Replicator, Superseded

_log = log.get("remus.primary")


class Protecting(Role):
    name = RoleName.PRIMARY

    def __init__(self, cfg, running: RunningGuest, stats: Path | None = None):
        self.cfg, self.running, self.stats = cfg, running, stats
        self.generation = running.generation
        self.state_dir = Path(cfg.primary.state_dir)
        self.replicator: Replicator | None = None
        self.trigger = "interval"  # "output" once the NIC buffers report held output
        self._node_hb = None
        self._commands = {"drill": self._drill, "partition": self._partition}

    async def run(self, node) -> Role | int:
        node.generation = self.generation
        self._node_hb = node.hb
        try:
            await self._start(node)
            return await self._supervise(node)
        finally:
            await self._stop()
            await self.running.close()

    async def _start(self, node) -> None:
        cfg, guest = self.cfg, self.running.guest
        tls_context = tls.context_for(cfg, node.host, server=False)
        if tls_context is None:
            _log.warning("insecure-stream", detail="[tls] insecure = true: the checkpoint stream "
                         "is plain TCP, unauthenticated and unencrypted; guest memory crosses the "
                         "network in clear and the backup is not authenticated (unsafe)")
        # Until the guest is seen to end, it may run on (here, or on the peer after a
        # handover or failover): a later start must not boot it blindly.
        write_running(self.state_dir, self.generation, True)
        self.epochs = EpochLog(self.stats)
        self.disk = None
        if self.running.disk_paths:
            self.disk = await MirroredDisks.create(guest, cfg, self.running.disk_paths,
                                                   self.state_dir / "run",
                                                   cfg.replication.disk_epoch_cap_mib << 20)
        media = await asyncio.to_thread(read_only_media, cfg)
        self.ram = RamView(self.running.ram_file, cfg.memory_bytes)
        self.capture = make_capture(cfg.replication.capture, self.ram, guest.pid,
                                    cfg.replication.compare_threads)
        _log.info("primary-start", guest=cfg.guest.name, memory_mib=cfg.guest.memory_mib,
                  interval_ms=cfg.replication.interval_ms, capture=self.capture.name,
                  backup=cfg.backup.address, stream="insecure" if tls_context is None else "tls",
                  qemu_pid=guest.pid, generation=self.generation)
        netbuf = self.running.netbuf
        # Disks before the network: output leaves only once the writes behind it are safe.
        self.hooks = Hooks([d for d in (self.disk, netbuf) if d is not None])
        self.replicator = Replicator(cfg, guest, self.capture, self.hooks, self.epochs,
                                     self.disk, self.generation, tls_context, PEER[node.host],
                                     media)
        self.replicator.hold.backup_gave_up = lambda: backup_gave_up(node.hb)
        if netbuf is not None:
            netbuf.set_inbound_listener(self.replicator.forward_input)
        self._wire_output_trigger(netbuf)
        if node.metrics is not None:
            self.epochs.listeners.append(node.metrics.observe_epoch)

    def _wire_output_trigger(self, netbuf) -> None:
        """trigger = output needs a buffer that sees the guest's frames."""
        if self.cfg.replication.trigger != "output":
            return
        if netbuf is None:  # user networking or --no-net: no output is held to wait
            _log.info("trigger-interval-only", detail="no output buffer here, so no output "
                      "waits for a checkpoint: checkpoints stay on the interval")
            return
        if netbuf.set_output_listener(self.replicator.output_waiting):
            self.trigger = "output"
            return
        _log.warning("trigger-unavailable", trigger="output",
                     detail="the plug qdisc holds the guest's output in the kernel, out of "
                            "the daemon's sight: checkpoints stay on the interval, and each "
                            "reply waits for the end of its interval ([network] buffer = "
                            "\"userspace\" brings them forward)")

    async def _supervise(self, node) -> Role | int:
        """Run the replicator until something ends this role; what ends it decides."""
        rep = self.replicator
        resume_requested = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, resume_requested.set)
        tasks = {name: asyncio.create_task(coro, name=name) for name, coro in (
            ("replicator", rep.run()), ("qemu", self.running.guest.wait()),
            ("signal", node.stop.wait()),
            ("heartbeat", watch_for_newer_holder(node, self.generation,
                                                 lambda: (rep.session, rep.committed_epoch))))}
        helpers = [asyncio.create_task(_resume_on_request(resume_requested, rep)),
                   asyncio.create_task(report_to_systemd(rep))]
        try:
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            return await self._outcome(node, tasks, {t.get_name() for t in done})
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
            for task in [*tasks.values(), *helpers]:
                await cancel_and_wait(task)

    async def _outcome(self, node, tasks: dict, done: set[str]) -> Role | int:
        holder = None
        if "replicator" in done:
            exc = tasks["replicator"].exception()
            if not isinstance(exc, Superseded):
                tasks["replicator"].result()  # re-raise: it only ends on a bug or a stale generation
            holder = {"node": "backup (said in the handshake)", "generation": exc.generation,
                      "reason": str(exc)}
        if "heartbeat" in done:
            holder = tasks["heartbeat"].result()
        if holder is not None:
            # Split-brain guard: never let this copy's output out again.
            self.hooks.silence()
            self.running.guest.kill()
            return StoodDown(self.generation, holder, _log)
        if "signal" in done:
            return await self._stopped(tasks["replicator"])
        return await self._guest_ended(tasks["qemu"].result(), tasks["replicator"])

    async def _stopped(self, rep_task: asyncio.Task) -> int:
        rep = self.replicator
        if self.cfg.primary.on_stop == "handover" and rep.state == PrimaryState.PROTECTING:
            _log.warning("primary-stop", reason="signal",
                         action="handing the guest over to the backup (on_stop = handover)")
            if await rep.handover("primary stopped by operator"):
                await cancel_and_wait(rep_task)
                return EXIT_OK
            _log.error("handover-failed", detail="the session failed during the handover",
                       action="bye to backup, quit guest")
        else:
            _log.info("primary-stop", reason="signal", action="bye to backup, quit guest")
        await cancel_and_wait(rep_task)
        await rep.say_bye("primary stopped by operator")
        await self.running.guest.quit()
        write_running(self.state_dir, self.generation, False)
        return EXIT_OK

    async def _guest_ended(self, status, rep_task: asyncio.Task) -> int:
        guest = self.running.guest
        await cancel_and_wait(rep_task)
        if guest.shutdown_reason in ("guest-shutdown", "host-qmp-quit"):
            _log.info("guest-exit", reason=guest.shutdown_reason, action="bye to backup")
            await self.replicator.say_bye(f"guest ended: {guest.shutdown_reason}")
            write_running(self.state_dir, self.generation, False)
            return EXIT_OK
        # QEMU died under us: say nothing, so the backup takes over.
        _log.error("guest-died", status=status, reason=guest.shutdown_reason or "killed or crashed",
                   action="leaving the backup to activate")
        return EXIT_GUEST_FAILED

    async def _stop(self) -> None:
        self.running.guest.kill()
        if self.replicator is None:
            return
        # Worker threads read guest RAM through raw pointers: let them finish
        # before the mapping goes away.
        self.replicator.close()
        await asyncio.get_running_loop().shutdown_default_executor()  # always the last role
        self.capture.close()
        self.ram.close()
        self.epochs.close()
        if self.disk is not None:
            await self.disk.close()

    def healthy(self) -> bool:
        proc = self.running.guest.proc
        return proc is not None and proc.returncode is None

    def commands(self) -> dict:
        return self._commands

    def status(self, node) -> PrimaryStatus:
        rep, guest = self.replicator, self.running.guest
        if rep is None:
            return super().status(node)
        s = self.epochs.summary()
        return PrimaryStatus(
            self.name, node.host, self.cfg.guest.name, rep.state, node.pid, self.generation,
            rep.session, rep.committed_epoch, heartbeat_status(node.hb),
            qemu_pid=guest.pid, interval_ms=self.cfg.replication.interval_ms,
            trigger=self.trigger, output_triggered=s["output_triggered"],
            in_flight=rep.in_flight, pipeline=self.cfg.replication.pipeline,
            capture=self.capture.name, checkpoints_per_s=s["checkpoints_per_s"],
            pause_p50_ms=s["pause_p50_ms"], pause_p99_ms=s["pause_p99_ms"],
            bytes_per_s=s["bytes_per_s"], ack_p50_ms=s["ack_p50_ms"],
            held_output=getattr(self.running.netbuf, "stats", None),
            input_copied={"forwarded": rep.input_forwarded, "skipped": rep.input_skipped},
            sync=rep.sync.describe(time.monotonic()),
            disk_throttled_s=round(self.disk.throttled_s, 3) if self.disk is not None else None,
            output_hold_s_left=rep.hold.left_s(), usage=guest.usage())

    def _drill(self, phase: str) -> dict:
        point = DRILL_POINTS.get(phase, phase)
        if point not in DRILL_POINTS.values():
            return {"ok": False, "error": f"unknown drill phase {phase!r} "
                                          f"(one of {', '.join(DRILL_POINTS.values())})"}
        if self.replicator is None:
            return {"ok": False, "error": "not protecting yet"}
        self.replicator.die_at = point
        _log.warning("drill-armed", point=point,
                     detail="this primary dies there at the next checkpoint")
        return {"ok": True, "armed": point}

    def _partition(self, _arg: str) -> dict:
        hb = self._node_hb
        if hb is None:
            return {"ok": False, "error": "a partition drill needs [heartbeat] links"}
        for index in range(len(self.cfg.heartbeat.links)):
            hb.mute_link(index)
        asyncio.get_running_loop().create_task(self.replicator.partition())
        _log.warning("drill-partition", detail="heartbeat muted and checkpoint stream cut")
        return {"ok": True}


def backup_gave_up(hb) -> bool:
    """The backup is alive and beats that its replica is stale: it will not resume."""
    if hb is None:
        return False
    view = hb.view()
    beat = view.last_beat
    return view.peer_alive and beat is not None and beat.get("role") == RoleName.STALE.value


async def _resume_on_request(requested: asyncio.Event, replicator: Replicator) -> None:
    """SIGUSR1: the operator resumes a guest paused for a lost backup."""
    while True:
        await requested.wait()
        requested.clear()
        await replicator.operator_resume()


async def report_to_systemd(replicator: Replicator) -> None:
    """READY=1 once the guest runs protected or degraded; STATUS= on every change.
    (The node feeds the watchdog while the loop turns and QEMU lives.)"""
    shown, ready = "", False
    while True:
        state = replicator.state
        if not ready and state in (PrimaryState.PROTECTING, PrimaryState.DEGRADED, PrimaryState.PAUSED,
                                   PrimaryState.HOLDING):
            sdnotify.notify("READY=1")
            ready = True
        text = f"{state}, epoch {replicator.committed_epoch}" if state == PrimaryState.PROTECTING else state
        if text != shown:
            sdnotify.notify(f"STATUS={text}")
            shown = text
        await asyncio.sleep(1.0)
