"""The standby role: keep the replica of the guest the primary runs.

Serves the checkpoint stream into the replica, follows the primary's beats,
keeps a standby QEMU ready once the replica is resumable, and asks the
failover judge after every change. When the judge says the primary is lost,
the role that follows (TakingOver) fences it and resumes the guest.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from remus.backup.activation import TakingOver
from remus.backup.failover import FAILOVER, STALE, FailoverJudge, Verdict
from remus.backup.promotion import PromotionGate
from remus.backup.receiver import Receiver
from remus.backup.replica import Replica
from remus.backup.standby import StandbyGuest
from remus.common import log, sdnotify, tls
from remus.common.config import Config, read_only_media
from remus.common.exitcodes import EXIT_OK
from remus.common.fencing import Fencer
from remus.common.heartbeat import HeartbeatError, LinkDown, LinkUp, PeerBack, PeerBeat, PeerLost
from remus.common.peering import PEER, grace_s, heartbeat_status
from remus.common.roles import Role
from remus.common.status import BackupState, BackupStatus, RoleName
from remus.common.takeover import takeover_window_s

_log = log.get("remus.backup")


class Standby(Role):
    name = RoleName.BACKUP

    def __init__(self, cfg: Config, activate_now: bool = False, stale_reason: str | None = None):
        """`activate_now`: the operator's takeover (--activate-now), without a session;
        `stale_reason`: why the replica may not be resumed (a takeover that missed its
        window), until a new session."""
        self.cfg, self.activate_now, self.stale_reason = cfg, activate_now, stale_reason
        self.replica: Replica | None = None
        self.receiver: Receiver | None = None
        self.standby: StandbyGuest | None = None
        self.judge: FailoverJudge | None = None
        self.gate: PromotionGate | None = None  # under Pacemaker: wait to be promoted

    async def run(self, node) -> Role | int:
        tls_context = tls.context_for(self.cfg, node.host, server=True)  # fails before opening
        self.replica = Replica(Path(self.cfg.backup.state_dir))
        node.generation = self.replica.state.generation
        self._warn_unsafe(node, tls_context)
        self.judge = FailoverJudge(node.hb is not None, grace_s(self.cfg))
        if self.stale_reason is not None:
            self.judge.mark_stale(self.stale_reason)
        if self.cfg.pacemaker:
            self.gate = PromotionGate(self.judge, takeover_window_s(self.cfg))
        self.receiver = Receiver(self.cfg, self.replica, self.judge, tls_context,
                                 PEER[node.host])
        self.receiver.media = await asyncio.to_thread(read_only_media, self.cfg)
        host, port = self.cfg.backup_endpoint
        server = await asyncio.start_server(self.receiver.handle, host, port, reuse_address=True)
        if self.cfg.backup.standby_guest and not self.activate_now:
            self.standby = StandbyGuest(self.cfg, self.replica)
        follower = (asyncio.create_task(follow_heartbeat(node.hb, self.receiver))
                    if node.hb is not None else None)
        node.publish()
        sdnotify.notify("READY=1", f"STATUS=standing by on {self.cfg.backup.address}")
        taking_over = False
        try:
            verdict = await self._verdict(node)
            if verdict is None:
                _log.info("backup-stop", reason="signal", replica_state=self.replica.state.state)
                await self._say_stale(node, "the backup is stopping")
                return EXIT_OK
            taking_over = True
            return TakingOver(self.cfg, self, verdict, self.activate_now)
        finally:
            server.close()
            if follower is not None:
                follower.cancel()
            if not taking_over:  # else TakingOver owns them
                if self.standby is not None:
                    await self.standby.close()
                self.replica.close()

    async def _verdict(self, node) -> Verdict | None:
        if self.activate_now:
            self.judge.lost_at = time.monotonic()
            return Verdict(FAILOVER, "operator asked (--activate-now)")
        return await wait_for_failover(self.receiver, node, self.standby, self.gate)

    async def _say_stale(self, node, reason: str) -> None:
        """Leaving: beat that this replica will not be resumed, so a primary holding its
        output for the takeover window releases it now instead of waiting."""
        if node.hb is None:
            return
        self.judge.mark_stale(reason)
        node.publish()
        await asyncio.sleep(3 * self.cfg.heartbeat.interval_ms / 1000)  # a few beats carry it

    def _warn_unsafe(self, node, tls_context) -> None:
        cfg, s = self.cfg, self.replica.state
        _log.info("backup-start", guest=cfg.guest.name, listen=cfg.backup.address,
                  stream="insecure" if tls_context is None else "tls",
                  replica_state=s.state, replica_epoch=s.epoch, generation=s.generation,
                  detail="waiting for a session; an old replica is never resumed without one")
        if node.hb is None:
            _log.warning("no-heartbeat", detail="no [heartbeat] links: the loss of the "
                         "checkpoint stream alone triggers activation, which cannot tell a "
                         "dead primary from a partition (unsafe)")
        plan = cfg.fence_plan
        self.fencer = (Fencer(plan, log.get("remus.fencing"))
                       if plan.configured and not cfg.pacemaker else None)
        if cfg.pacemaker:
            _log.info("cluster-manager", manager="pacemaker",
                      detail="Pacemaker fences and promotes: this backup resumes the guest "
                             "only when promoted, within the takeover window")
        elif self.fencer is None:
            _log.warning("no-fencing",
                         target="backup host" if cfg.reversed_roles else "primary host",
                         detail="no [fencing] device for the host that runs the VM: the backup "
                                "will activate without making sure it is off (unsafe)")
        if tls_context is None:
            _log.warning("insecure-stream", detail="[tls] insecure = true: the checkpoint "
                         "stream is plain TCP, unauthenticated and unencrypted; anyone who "
                         f"reaches {cfg.backup.address} can feed the replica (unsafe)")

    def commands(self) -> dict:
        return {"promote": self._promote} if self.cfg.pacemaker else {}

    def _promote(self, _arg: str) -> dict:
        if self.gate is None:
            return {"ok": False, "error": "the backup is still starting"}
        current = self.receiver.current
        live = current is not None and self.judge.lost_at is None
        refused = self.gate.promote(time.monotonic(), live)
        if refused is not None:
            _log.warning("promote-refused", reason=refused)
            return {"ok": False, "error": refused}
        _log.warning("promoted", reason=self.gate.promoted.reason,
                     epoch=self.replica.state.epoch)
        self.receiver.changed.set()
        return {"ok": True, "epoch": self.replica.state.epoch}

    def beat_role(self) -> RoleName:
        # A backup that will not resume its replica says so: a primary holding its output
        # for the takeover window may then release it at once.
        stale = self.judge is not None and self.judge.stale
        return RoleName.STALE if stale else RoleName.BACKUP

    def after_missed_window(self, reason: str) -> "Standby":
        """The role after a takeover that missed its window: standing by, stale."""
        return Standby(self.cfg, stale_reason=reason)

    def status(self, node) -> BackupStatus:
        if self.receiver is None:
            return super().status(node)
        r, receiver, judge = self.replica.state, self.receiver, self.judge
        plan = self.cfg.fence_plan
        state = (BackupState.STALE if judge.stale else BackupState.STANDBY if judge.resumable
                 else BackupState.SYNCING if receiver.current else BackupState.WAITING)
        standby = self.standby.describe() if self.standby is not None else {"state": "off"}
        return BackupStatus(
            self.name, node.host, self.cfg.guest.name, state.value, node.pid,
            max(r.generation, receiver.peer_generation), r.session, r.epoch,
            heartbeat_status(node.hb), replica=r.as_dict(),
            fencing={"configured": plan.configured, "levels": len(plan.levels),
                     "last_failure": receiver.last_fencing},
            last_failover=receiver.last_failover, standby_guest=standby,
            stale_reason=judge.stale_reason if judge.stale else None)


def link_down_detail(hb, link: str) -> str:
    """What a link going down means now, from the heartbeat's view of every link."""
    others = [lk["link"] for lk in hb.view().links if lk["up"] and lk["link"] != link]
    if others:
        return f"no failover while another link answers ({', '.join(others)} up)"
    return "every heartbeat link is down"


async def follow_heartbeat(hb, receiver: Receiver) -> None:
    """Feed the peer's liveness and generation to the judge, and log link changes."""
    try:
        async for event in hb.events():
            if isinstance(event, PeerLost):
                receiver.judge.peer(alive=False)
                _log.warning("peer-lost", silent_ms=event.silent_ms)
            elif isinstance(event, (PeerBack, PeerBeat)):
                receiver.judge.peer(alive=True)
                receiver.peer_generation = max(receiver.peer_generation,
                                               int(event.beat.get("generation", 0)))
            elif isinstance(event, LinkDown):
                _log.warning("link-down", link=event.link, missed=event.missed,
                             detail=link_down_detail(hb, event.link))
            elif isinstance(event, LinkUp):
                _log.info("link-up", link=event.link)
            receiver.changed.set()
    except HeartbeatError as exc:
        _log.error("heartbeat-failed", error=str(exc),
                   detail="peer state frozen at its last value; no failover on it")


async def wait_for_failover(receiver: Receiver, node, standby: StandbyGuest | None = None,
                            gate: PromotionGate | None = None) -> Verdict | None:
    """Until the judge says fail over (None: stopped first), or under Pacemaker until
    promoted. Keeps a standby guest for the session while the replica is resumable."""
    replica, judge = receiver.replica, receiver.judge
    waiting = ""
    while not node.stop.is_set():
        v = judge.verdict(time.monotonic())
        if gate is not None:
            v, waiting = gate.decide(v, time.monotonic()), _log_wait(v, waiting)
        if v.action == FAILOVER:
            return v
        if standby is not None and judge.resumable and not judge.stale:
            standby.want(replica.state.session)
        if v.action == STALE:
            _log.warning("replica-stale", reason=v.reason)
        node.generation = replica.state.generation
        session = receiver.current.session if receiver.current is not None else None
        node.publish(session or "", replica.state.epoch)
        receiver.changed.clear()
        try:  # re-judge on news, and at least every 50 ms while a verdict is pending
            await asyncio.wait_for(receiver.changed.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    return None


def _log_wait(judged: Verdict, logged: str) -> str:
    """Under Pacemaker: say once per loss that the primary is lost and the backup waits."""
    if judged.action != FAILOVER:
        return ""
    if judged.reason != logged:
        _log.warning("primary-lost", reason=judged.reason,
                     detail="waiting for Pacemaker to fence it and promote this node")
    return judged.reason
