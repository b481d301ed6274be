"""Taking the guest over: fence the lost primary, then resume the replica.

Only within the takeover window (common/takeover.py): past it the lost primary
may have released output the replica does not have, so the backup stands by
with a stale replica instead, and says so.

QEMU is prepared on the replica (the standby guest's, or launched now) while
fencing runs: nothing in that lets the guest execute or send a frame. The
guest runs only once the primary is known off, as the holder of a new
generation, and is handed the input the lost primary's guest received after
the checkpoint it resumes from.
"""
from __future__ import annotations

import asyncio
import time

from remus.backup.active import Active
from remus.backup.failover import Verdict
from remus.backup.receiver import Receiver
from remus.backup.replica import Replica, ReplicaError
from remus.backup.standby import Launched, StandbyGuest, discard_launch, launch_guest
from remus.common import log, sdnotify
from remus.common.config import Config
from remus.common.exitcodes import EXIT_ACTIVATION_REFUSED, EXIT_FAILED, EXIT_OK
from remus.common.fencing import Fencer, fence_with_retry
from remus.common.qemu import GuestError, QemuGuest
from remus.common.roles import Role, RunningGuest
from remus.common.status import BackupState, BackupStatus, RoleName
from remus.common.takeover import takeover_window_s
from remus.common.tap import send_to_guest

_log = log.get("remus.backup")


class ActivationFailed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class TakingOver(Role):
    """The primary is lost (or handed the guest over): fence it, resume the guest here."""
    name = RoleName.BACKUP

    def __init__(self, cfg: Config, standing_by, verdict: Verdict, activate_now: bool):
        self.cfg, self.verdict, self.activate_now = cfg, verdict, activate_now
        self.standing_by = standing_by  # the Standby role it follows: replica, receiver, ...
        self.state = BackupState.ACTIVATING
        self.window_s = takeover_window_s(cfg)
        self.deadline: float | None = None  # monotonic; None: no window (handover, operator)

    def beat_role(self) -> RoleName:
        return RoleName.FENCING  # a starting peer must not boot the guest from now on

    def status(self, node) -> BackupStatus:
        s = self.standing_by.status(node)
        s.state = self.state.value
        return s

    async def run(self, node) -> Role | int:
        standby = self.standing_by.standby
        try:
            return await self._take_over(node)
        finally:
            if standby is not None:
                await standby.close()
            # QEMU has the replica's files open itself; the role that follows needs
            # only their paths.
            self.standing_by.replica.close()

    async def _take_over(self, node) -> Role | int:
        sb, cfg = self.standing_by, self.cfg
        replica, receiver = sb.replica, sb.receiver
        decided_at = time.monotonic()
        sdnotify.notify("STATUS=primary lost: fencing and activating")
        lost_at = sb.judge.lost_at or decided_at
        detect_ms = (decided_at - lost_at) * 1000
        self.deadline = (lost_at + self.window_s
                         if self.verdict.fence and not self.activate_now else None)
        _log.warning("primary-lost", reason=self.verdict.reason, last_epoch=replica.state.epoch,
                     detect_ms=detect_ms, takeover_window_s=round(self.window_s, 3)
                     if self.deadline is not None else None)
        try:
            replica.check_activatable(cfg.fingerprint())
        except ReplicaError as exc:
            _log.error("activation-refused", reason=str(exc))
            return EXIT_ACTIVATION_REFUSED
        prepared = asyncio.create_task(prepare_guest(cfg, replica, sb.standby))
        fenced_ms = await self._fence(node, prepared)
        if not isinstance(fenced_ms, float):
            return fenced_ms
        generation = max(replica.state.generation, receiver.peer_generation) + 1
        running = await self._launched(prepared, generation)
        if isinstance(running, int):
            return running
        if self._window_passed():  # the last moment: nothing has run yet
            await running.close()
            return self._give_up("the guest was ready only after the takeover window")
        try:
            await self._resume(running, decided_at)
        except ActivationFailed as exc:
            await running.close()
            _log.error("activation-failed", reason=exc.reason, detail=exc.detail)
            return EXIT_FAILED
        _log.warning("failover-complete", detect_ms=detect_ms, fence_ms=fenced_ms,
                     generation=generation)
        if node.metrics is not None:
            node.metrics.failovers.inc()
        receiver.last_failover = {"at": time.time(), "reason": self.verdict.reason,
                                  "detect_ms": detect_ms, "fence_ms": fenced_ms,
                                  "epoch": replica.state.epoch, "generation": generation}
        return Active(cfg, running, replica.state.session, replica.state.epoch,
                      receiver.last_failover)

    async def _fence(self, node, prepared: asyncio.Task) -> float | Role | int:
        """Fence the primary within the window: the time it took (ms), or what follows if
        it did not succeed in time (a stale standby) or the daemon was stopped."""
        sb = self.standing_by
        if sb.fencer is None or not self.verdict.fence or self.activate_now:
            return 0.0
        self.state = BackupState.FENCING
        node.publish(sb.replica.state.session, sb.replica.state.epoch)
        fencing = fence_primary(self.cfg, sb.fencer, node.stop, sb.receiver, node.metrics)
        try:
            result = await asyncio.wait_for(fencing, max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await discard_launch(prepared)
            return self._give_up("fencing did not succeed within the takeover window")
        if result is None:
            await discard_launch(prepared)
            return EXIT_OK  # stopped while fencing
        self.state = BackupState.ACTIVATING
        if self._window_passed():
            await discard_launch(prepared)
            return self._give_up("fencing succeeded only after the takeover window")
        return result.seconds * 1000

    def _window_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _give_up(self, why: str) -> Role:
        """Past the window the primary may have released output the replica does not
        have: resuming it could take back replies clients saw. Stand by, stale."""
        reason = (f"{why} ({self.window_s:.1f} s after the stream was lost): the primary may "
                  "have released output since the last checkpoint; the replica is stale")
        _log.error("takeover-window-passed", reason=reason,
                   action="not activating; standing by until a new session resynchronises the "
                          "replica",
                   hint="if the primary host is known to be off and its output never left, "
                        "remus-backup --activate-now resumes this replica anyway")
        return self.standing_by.after_missed_window(reason)

    async def _launched(self, prepared: asyncio.Task, generation: int) -> RunningGuest | int:
        replica = self.standing_by.replica
        try:
            launched = await prepared
        except ReplicaError as exc:
            _log.error("activation-refused", reason=str(exc))
            return EXIT_ACTIVATION_REFUSED
        except Exception as exc:  # noqa: BLE001 - QEMU, TAP or QMP: report it, nothing ran
            _log.error("activation-failed", reason=f"{type(exc).__name__}: {exc}",
                       detail="the guest never ran; the replica is still resumable")
            return EXIT_FAILED
        disks = replica.disk_files(len(self.cfg.mirrored_disks)) if self.cfg.mirrored_disks else []
        return RunningGuest(launched.guest, launched.netbuf, replica.ram_file,
                            [str(p) for p in disks], generation)

    async def _resume(self, running: RunningGuest, decided_at: float) -> None:
        """Run the prepared guest; ActivationFailed says whether it ran."""
        sb = self.standing_by
        replica, receiver, guest = sb.replica, sb.receiver, running.guest
        replay = receiver.inputs.replay(replica.state.epoch) if receiver.current else []
        try:  # only now: until the fence, the lost primary's QEMU may hold the ports
            await guest.add_host_forwards()
        except GuestError as exc:
            raise ActivationFailed(str(exc), "the guest never ran; the replica is still "
                                             "resumable") from exc
        try:
            await resume_guest(self.cfg, replica, guest, running.netbuf, self.verdict.reason,
                               decided_at, running.generation, replay)
        except GuestError as exc:
            raise ActivationFailed(str(exc), "the replica was marked activated and will not "
                                             "be resumed again") from exc


async def prepare_guest(cfg: Config, replica: Replica,
                        standby: StandbyGuest | None = None) -> Launched:
    """QEMU on the replica with the device state loaded, not yet running, and its
    network (netbuf None outside bridged mode).

    Runs while the primary is being fenced: nothing here lets the guest execute
    or send a frame, so it is safe before fencing has succeeded. QEMU is the
    standby's if one is ready for this session, else launched now. In bridged mode
    the NIC goes through the same output buffer as on a primary, passing frames
    straight through until `remusctl reprotect` makes this host a primary."""
    replica.check_activatable(cfg.fingerprint())
    launched = await standby.take(replica.state.session) if standby is not None else None
    from_standby = launched is not None
    if launched is None:
        launched = await launch_guest(cfg, replica)
    guest, netbuf = launched.guest, launched.netbuf
    t1 = time.monotonic()
    try:
        if netbuf is not None:
            await netbuf.attach()
        await guest.load_device_state(replica.device_file)
    except BaseException:
        await launched.discard()
        raise
    _log.info("guest-prepared", epoch=replica.state.epoch, qemu_pid=guest.pid,
              standby=from_standby, launch_ms=0.0 if from_standby else launched.launch_ms,
              load_ms=(time.monotonic() - t1) * 1000,
              detail="device state loaded; the guest runs only once the primary is fenced")
    return launched


async def resume_guest(cfg: Config, replica: Replica, guest: QemuGuest, netbuf, reason: str,
                       lost_at: float, generation: int, replay: list[bytes] = ()) -> None:
    """Run the prepared guest as holder of `generation`, and hand it `replay`: what the
    lost primary's guest received after the checkpoint it resumes from."""
    s = replica.state
    _log.warning("activating", reason=reason, epoch=s.epoch, session=s.session,
                 generation=generation, checkpoint_age_s=time.time() - s.taken_at)
    t0 = time.monotonic()
    replica.mark_activated(generation)  # before the guest runs: never resume it twice
    t1 = time.monotonic()
    await guest.cont()
    resumed = time.monotonic()
    replayed = 0
    if replay and netbuf is not None and netbuf.userspace:
        replayed = netbuf.to_guest(replay)  # straight into QEMU's NIC streams
    elif replay and netbuf is not None:
        for index, nic in enumerate(cfg.nics):
            frames = [frame for i, frame in replay if i == index]
            replayed += await asyncio.to_thread(send_to_guest, nic.tap, frames) if frames else 0
    t3 = time.monotonic()
    if cfg.network.mode != "none":
        await guest.announce()
    _log.warning("activated", epoch=s.epoch, qemu_pid=guest.pid,
                 detect_to_resume_ms=(resumed - lost_at) * 1000,
                 record_ms=(t1 - t0) * 1000, cont_ms=(resumed - t1) * 1000,
                 replay_ms=(t3 - resumed) * 1000, announce_ms=(time.monotonic() - t3) * 1000,
                 input_replayed=replayed, input_logged=len(replay))


async def fence_primary(cfg: Config, fencer: Fencer, stop: asyncio.Event, receiver: Receiver,
                        metrics=None):
    """Fence until a level succeeds (or, explicitly unsafe, give up after one round)."""
    _log.warning("fencing", detail="making sure the primary is off before resuming the VM")

    def failed(result) -> None:
        receiver.last_fencing = result.summary()
        if metrics is not None:
            metrics.fencing.labels("failure").inc()
        _log.error("fencing-failed", detail=result.summary(), action="staying passive; retrying",
                   hint="check the fence devices (remusctl fence-test); the VM is down until "
                        "fencing succeeds or an operator intervenes")

    if cfg.fencing.on_fence_failure == "activate":
        result = await fencer.fence()
        if not result.ok:
            _log.error("fencing-failed-activating-anyway", detail=result.summary(),
                       reason="on_fence_failure = activate (unsafe opt-in)")
        return result
    result = await fence_with_retry(fencer, stop, failed)
    if not result.ok:
        return None
    _log.warning("fenced", seconds=result.seconds, level=result.level)
    if metrics is not None:
        metrics.fencing.labels("success").inc()
    return result

