"""remus-backup: receive checkpoints, keep the replica, resume the VM when the primary is lost."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
import time
from pathlib import Path

from remus.backup.failover import FAILOVER, STALE, FailoverJudge, Verdict
from remus.backup.replica import Replica, ReplicaError
from remus.common import log, sdnotify, tls
from remus.common.capture import PAGE_SIZE
from remus.common.config import Config, ConfigError, load
from remus.common.fencing import Fencer, fence_with_retry
from remus.common.heartbeat import HeartbeatError, LinkDown, LinkUp, PeerBack, PeerBeat, PeerLost
from remus.common.control import ControlServer
from remus.common.metrics import Metrics
from remus.common.peering import grace_s, heartbeat_for, heartbeat_status
from remus.common.protocol import BackupProtocol, CheckpointStaged, PeerBye, Send, SessionOpened
from remus.common.qemu import GuestError, GuestPaths, QemuGuest, tap_fd_args
from remus.common.tap import TapError, attach, open_tap
from remus.common.wire import ProtocolError

_log = log.get("remus.backup")

READ_CHUNK = 1 << 20
HANDSHAKE_TIMEOUT = 10.0
EXIT_ACTIVATION_REFUSED = 4


class Connection:
    """One inbound checkpoint stream."""

    def __init__(self, peer: str):
        self.peer = peer
        self.session: str | None = None
        self.superseded = False
        self.task: asyncio.Task | None = None


class Backup:
    def __init__(self, cfg: Config, replica: Replica, judge: FailoverJudge,
                 tls_context: ssl.SSLContext | None = None):
        self.cfg = cfg
        self.tls_context = tls_context  # None: plain TCP ([tls] insecure = true)
        self.replica = replica
        self.judge = judge
        self.fingerprint = cfg.fingerprint()
        self.current: Connection | None = None
        self.changed = asyncio.Event()  # something the judge should look at
        self.peer_generation = 0        # the highest generation the peer's beats carried
        self.phase = "waiting"          # waiting | fencing | active (else derived from the replica)
        self.last_failover: dict | None = None
        self.last_fencing: str | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "%s:%d" % writer.get_extra_info("peername")[:2]
        # Nothing is awaited before the upgrade, so no byte of the client hello can
        # land in the plain reader.
        if self.tls_context is not None and not await self._authenticate(peer, writer):
            return
        conn = Connection(peer)
        conn.task = asyncio.current_task()
        try:
            reason = await self._serve(conn, reader, writer)
        except asyncio.CancelledError:
            reason = None  # superseded by a newer session
        except Exception as exc:  # noqa: BLE001 - a bug must not turn into an activation
            _log.error("session-failed", peer=peer, error=repr(exc), action="dropping the connection")
            reason = None
        finally:
            writer.close()
        if conn is self.current and not conn.superseded and reason:
            self.judge.stream_lost(time.monotonic(), reason)
            self.changed.set()

    async def _authenticate(self, peer: str, writer: asyncio.StreamWriter) -> bool:
        """TLS handshake, then the peer must be the primary; else log why and close.

        The server is plain TCP upgraded here, rather than start_server(ssl=...),
        because asyncio drops handshake failures silently: this way each one is logged."""
        try:
            await writer.start_tls(self.tls_context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - SSL errors, resets, the timeout: all logged
            _log.error("tls-handshake-failed", peer=peer, reason=tls.describe(exc),
                       action="connection closed; replica and session untouched")
            writer.transport.abort()
            return False
        reason = tls.check_peer(writer.get_extra_info("peercert"), "primary")
        if reason is not None:
            _log.error("stream-refused", peer=peer, reason=reason,
                       action="connection closed before reading; replica and session untouched")
            writer.transport.abort()
            return False
        return True

    async def _serve(self, conn: Connection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> str | None:
        """Returns why the primary is presumed lost, or None if it is not."""
        proto = BackupProtocol(self.fingerprint, self.cfg.memory_bytes, PAGE_SIZE,
                               self._read_previous, disk=bool(self.cfg.guest.disk))
        loop = asyncio.get_running_loop()
        stream_timeout = self.cfg.replication.stream_timeout_ms / 1000
        while True:
            timeout = stream_timeout if conn.session else HANDSHAKE_TIMEOUT
            try:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
            except asyncio.TimeoutError:
                if not conn.session:
                    _log.warning("handshake-timeout", peer=conn.peer)
                    return None
                return f"no checkpoint traffic for {self.cfg.replication.stream_timeout_ms} ms"
            except OSError as exc:
                return f"stream failed: {exc.strerror or exc}"
            try:
                if not data:
                    proto.close()
                    return "primary closed the stream"
                events = proto.receive(data)
            except ProtocolError as exc:
                reply = getattr(exc, "reply", None)
                if reply:
                    writer.write(reply)
                if not data:
                    # EOF in the middle of a checkpoint: the primary died sending it.
                    _log.warning("checkpoint-truncated", peer=conn.peer, detail=str(exc))
                    return "primary closed the stream in the middle of a checkpoint"
                _log.error("stream-rejected", peer=conn.peer, session=conn.session or "-",
                           error=str(exc), replica_epoch=self.replica.state.epoch,
                           action="dropping the connection; replica untouched")
                return None
            for event in events:
                if isinstance(event, Send):
                    writer.write(event.data)
                elif isinstance(event, SessionOpened):
                    self._open_session(conn, event.session, event.disk_size)
                elif isinstance(event, CheckpointStaged):
                    cp = event.checkpoint
                    t0 = time.monotonic()
                    await loop.run_in_executor(None, self.replica.commit, cp.epoch, cp.full,
                                               cp.taken_at, cp.indices, cp.pages, cp.device_state,
                                               cp.disk_extents, cp.disk_data, cp.disk_synced)
                    writer.write(proto.ack(cp.epoch))
                    if conn is self.current:
                        self.judge.committed()
                    _log.debug("committed", epoch=cp.epoch, pages=len(cp.indices),
                               apply_ms=(time.monotonic() - t0) * 1000)
                    if cp.full:
                        _log.info("standby", session=conn.session, epoch=cp.epoch,
                                  detail="full checkpoint committed; the replica is resumable")
                elif isinstance(event, PeerBye):
                    _log.info("primary-bye", session=conn.session, reason=event.reason,
                              action="not activating; waiting for a new session")
                    return None
            try:
                await writer.drain()
            except OSError as exc:
                return f"stream failed: {exc.strerror or exc}"

    def _read_previous(self, indices):
        return self.replica.read_pages(indices)

    def _open_session(self, conn: Connection, session: str, disk_size: int) -> None:
        old = self.current
        if old is not None and old is not conn:
            old.superseded = True
            if old.task is not None:
                old.task.cancel()
            _log.warning("session-superseded", old=old.session, new=session)
        conn.session = session
        self.current = conn
        self.judge.session_started()
        self.replica.begin_session(session, self.fingerprint, self.cfg.memory_bytes, PAGE_SIZE,
                                   disk_size)
        _log.info("session-start", session=session, peer=conn.peer,
                  detail="replica is stale until the full sync commits")


async def activate(cfg: Config, replica: Replica, reason: str, lost_at: float,
                   generation: int) -> QemuGuest:
    """Resume the VM from the last committed checkpoint, as holder of `generation`."""
    replica.check_activatable(cfg.fingerprint())
    s = replica.state
    _log.warning("activating", reason=reason, epoch=s.epoch, session=s.session,
                 generation=generation, checkpoint_age_s=time.time() - s.taken_at)
    replica.mark_activated(generation)  # before QEMU touches the file: never resume it twice
    guest = QemuGuest(cfg, GuestPaths(run_dir=Path(cfg.backup.state_dir) / "run",
                                      ram_file=replica.ram_file))
    t0 = time.monotonic()
    net_args, fds = None, ()
    if cfg.network.mode == "bridged":
        # Same NIC device as on the primary; its backend here is a TAP on this host's bridge.
        tap_fd = open_tap(cfg.network.tap)
        await asyncio.to_thread(attach, cfg.network.tap, cfg.network.bridge)
        net_args, fds = tap_fd_args(tap_fd, cfg.network.mac), (tap_fd,)
    try:
        await guest.launch(incoming=True, net_args=net_args, pass_fds=fds,
                           disk=str(replica.disk_file) if cfg.guest.disk else None)
    finally:
        for fd in fds:
            os.close(fd)  # QEMU holds its own copy
    t1 = time.monotonic()
    await guest.load_device_state(replica.device_file)
    t2 = time.monotonic()
    await guest.cont()
    t3 = time.monotonic()
    if cfg.network.mode != "none":
        await guest.announce()
    _log.warning("activated", epoch=s.epoch, qemu_pid=guest.pid,
                 detect_to_resume_ms=(t3 - lost_at) * 1000, launch_ms=(t1 - t0) * 1000,
                 load_ms=(t2 - t1) * 1000, cont_ms=(t3 - t2) * 1000)
    return guest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remus-backup",
        description="Receive checkpoints of the protected VM into a replica, and resume the "
                    "VM from the last committed checkpoint when the checkpoint stream from "
                    "the primary is lost (reset, EOF, or silence longer than "
                    "[replication] stream_timeout_ms). A primary that says goodbye is not "
                    "taken over.")
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the guest's TOML config (the same file as on the primary)")
    p.add_argument("--stream-timeout", type=int, metavar="MS",
                   help="override [replication] stream_timeout_ms")
    p.add_argument("--activate-now", action="store_true",
                   help="operator takeover: resume the VM from the replica at once, without "
                        "waiting for a session. Only after making sure the primary is off. "
                        "A torn, stale or already activated replica is refused.")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


async def run(args: argparse.Namespace) -> int:
    cfg = load(args.config).with_overrides(stream_timeout_ms=args.stream_timeout)
    tls_context = tls.context_for(cfg, "backup")  # a TlsError before anything is opened
    replica = Replica(Path(cfg.backup.state_dir))
    s = replica.state
    _log.info("backup-start", guest=cfg.guest.name, listen=cfg.backup.address,
              stream="insecure" if tls_context is None else "tls",
              replica_state=s.state, replica_epoch=s.epoch, generation=s.generation,
              detail="waiting for a session; an old replica is never resumed without one")
    hb = heartbeat_for(cfg, "backup")
    if hb is None:
        _log.warning("no-heartbeat", detail="no [heartbeat] links: the loss of the checkpoint "
                     "stream alone triggers activation, which cannot tell a dead primary from a "
                     "partition (unsafe)")
    fencer = Fencer(cfg.fencing, log.get("remus.fencing")) if cfg.fencing.configured else None
    if fencer is None:
        _log.warning("no-fencing", detail="no [fencing] levels: the backup will activate "
                     "without making sure the primary is off (unsafe)")
    if tls_context is None:
        _log.warning("insecure-stream", detail="[tls] insecure = true: the checkpoint stream is "
                     "plain TCP, unauthenticated and unencrypted; anyone who reaches "
                     f"{cfg.backup.address} can feed the replica (unsafe)")
    judge = FailoverJudge(hb is not None, grace_s(cfg))
    backup = Backup(cfg, replica, judge, tls_context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = cfg.backup_endpoint
    server = await asyncio.start_server(backup.handle, host, port, reuse_address=True)
    tasks: list[asyncio.Task] = []
    if hb is not None:
        await hb.start()
        hb.update("backup", "", s.generation, 0)
        tasks.append(asyncio.create_task(follow_heartbeat(hb, backup)))
    stopped = asyncio.create_task(stop.wait())
    tasks.append(stopped)
    def status() -> dict:
        r = replica.state
        phase = backup.phase
        if phase == "waiting":
            phase = ("stale" if judge.stale else "standby" if judge.resumable
                     else "syncing" if backup.current else "waiting")
        return {"role": "backup", "guest": cfg.guest.name, "state": phase, "pid": os.getpid(),
                "generation": r.generation, "session": r.session,
                "last_committed_epoch": r.epoch, "replica": r.as_dict(),
                "heartbeat": heartbeat_status(hb),
                "fencing": {"configured": cfg.fencing.configured,
                            "levels": len(cfg.fencing.levels), "last_failure": backup.last_fencing},
                "last_failover": backup.last_failover}
    control = ControlServer(Path(cfg.backup.state_dir), status)
    metrics = Metrics(status) if cfg.metrics.backup else None
    if metrics is not None:
        metrics.serve(cfg.metrics.backup)
        _log.info("metrics", address=cfg.metrics.backup)
    await control.start()
    sdnotify.notify("READY=1", f"STATUS=standing by on {cfg.backup.address}")
    tasks.append(asyncio.create_task(sdnotify.keep_alive(lambda: True)))
    try:
        if args.activate_now:
            verdict = Verdict(FAILOVER, "operator asked (--activate-now)")
            judge.lost_at = time.monotonic()
        else:
            verdict = await wait_for_failover(backup, hb, stop)
        server.close()
        if verdict is None:
            _log.info("backup-stop", reason="signal", replica_state=replica.state.state)
            return 0
        decided_at = time.monotonic()
        sdnotify.notify("STATUS=primary lost: fencing and activating")
        detect_ms = (decided_at - (judge.lost_at or decided_at)) * 1000
        _log.warning("primary-lost", reason=verdict.reason, last_epoch=replica.state.epoch,
                     detect_ms=detect_ms)
        fenced_ms = 0.0
        if fencer is not None and not args.activate_now:
            backup.phase = "fencing"
            result = await fence_primary(cfg, fencer, stop, backup, metrics)
            if result is None:
                return 0  # stopped while fencing
            fenced_ms = result.seconds * 1000
        generation = max(replica.state.generation, backup.peer_generation) + 1
        try:
            guest = await activate(cfg, replica, verdict.reason, decided_at, generation)
        except ReplicaError as exc:
            _log.error("activation-refused", reason=str(exc))
            return EXIT_ACTIVATION_REFUSED
        except (GuestError, TapError) as exc:
            _log.error("activation-failed", reason=str(exc),
                       detail="the replica was marked activated and will not be resumed again")
            return 1
        _log.warning("failover-complete", detect_ms=detect_ms, fence_ms=fenced_ms,
                     generation=generation)
        backup.phase = "active"
        if metrics is not None:
            metrics.failovers.inc()
        backup.last_failover = {"at": time.time(), "reason": verdict.reason, "detect_ms": detect_ms,
                                "fence_ms": fenced_ms, "epoch": replica.state.epoch,
                                "generation": generation}
        sdnotify.notify(f"STATUS=active: running the VM at generation {generation}")
        if hb is not None:
            hb.update("active", replica.state.session, generation, replica.state.epoch)
        exited = asyncio.create_task(guest.wait())
        await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            _log.info("backup-stop", reason="signal", action="quit the activated guest")
            await guest.quit()
            return 0
        _log.warning("guest-exit", status=exited.result(), reason=guest.shutdown_reason)
        return 0 if guest.shutdown_reason == "guest-shutdown" else 1
    finally:
        for task in tasks:
            task.cancel()
        if hb is not None:
            await hb.stop()
        await control.close()
        replica.close()


async def follow_heartbeat(hb, backup: Backup) -> None:
    """Feed the peer's liveness and generation to the judge, and log link changes."""
    try:
        async for event in hb.events():
            if isinstance(event, PeerLost):
                backup.judge.peer(alive=False)
                _log.warning("peer-lost", silent_ms=event.silent_ms)
            elif isinstance(event, (PeerBack, PeerBeat)):
                backup.judge.peer(alive=True)
                backup.peer_generation = max(backup.peer_generation,
                                             int(event.beat.get("generation", 0)))
            elif isinstance(event, LinkDown):
                _log.warning("link-down", link=event.link, missed=event.missed,
                             detail="no failover while another link answers")
            elif isinstance(event, LinkUp):
                _log.info("link-up", link=event.link)
            backup.changed.set()
    except HeartbeatError as exc:
        _log.error("heartbeat-failed", error=str(exc),
                   detail="peer state frozen at its last value; no failover on it")


async def wait_for_failover(backup: Backup, hb, stop: asyncio.Event) -> Verdict | None:
    """Until the judge says fail over (None: stopped first)."""
    replica = backup.replica
    while not stop.is_set():
        v = backup.judge.verdict(time.monotonic())
        if v.action == FAILOVER:
            return v
        if v.action == STALE:
            _log.warning("replica-stale", reason=v.reason)
        if hb is not None and backup.current is not None:
            hb.update("backup", backup.current.session or "", replica.state.generation,
                      replica.state.epoch)
        backup.changed.clear()
        try:  # re-judge on news, and at least every 50 ms while a verdict is pending
            await asyncio.wait_for(backup.changed.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    return None


async def fence_primary(cfg: Config, fencer: Fencer, stop: asyncio.Event, backup: Backup,
                        metrics=None):
    """Fence until a level succeeds (or, explicitly unsafe, give up after one round)."""
    _log.warning("fencing", detail="making sure the primary is off before resuming the VM")

    def failed(result) -> None:
        backup.last_fencing = result.summary()
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup("backup", args.log_level)
    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        print(f"remus-backup: config error: {exc}", file=sys.stderr)
        return 2
    except tls.TlsError as exc:
        _log.error("tls-error", error=str(exc))
        print(f"remus-backup: TLS error: {exc}", file=sys.stderr)
        return 2
    except (GuestError, ReplicaError) as exc:
        _log.error("backup-failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
