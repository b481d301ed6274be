"""remus-backup: receive checkpoints, keep the replica, resume the VM when the primary is lost."""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from remus.backup.failover import FAILOVER, STALE, FailoverJudge, Verdict
from remus.backup.inputlog import InputLog
from remus.backup.replica import SYNCING, Replica, ReplicaError
from remus.backup.staging import StagedData
from remus.backup.standby import Launched, StandbyGuest, discard_launch, launch_guest
from remus.common import log, sdnotify, tls
from remus.common.capture import PAGE_SIZE
from remus.common.config import Config, ConfigError, load, read_only_media
from remus.common.node import Node
from remus.common.fencing import Fencer, fence_with_retry
from remus.common.heartbeat import HeartbeatError, LinkDown, LinkUp, PeerBack, PeerBeat, PeerLost
from remus.common.peering import PEER, grace_s, heartbeat_status
from remus.common.protocol import (BackupProtocol, CheckpointStaged, DiskWritten, DiskZeroed,
                                   InputReceived, PagesReceived, PeerBye, PeerHandover, Send,
                                   SessionOpened)
from remus.common.qemu import GuestError, QemuGuest
from remus.common.tap import send_to_guest
from remus.common.wire import ProtocolError

_log = log.get("remus.backup")

READ_CHUNK = 1 << 20
PROGRESS_EVERY_S = 0.5  # while a checkpoint streams in, tell the primary this often
HANDSHAKE_TIMEOUT = 10.0
INPUT_LOG_CAP = 16 << 20  # input held for replay; more is left to the clients' TCP
EXIT_ACTIVATION_REFUSED = 4
EXIT_STOOD_DOWN = 5  # as the primary's: a newer generation holds the guest


class Connection:
    """One inbound checkpoint stream."""

    def __init__(self, peer: str):
        self.peer = peer
        self.session: str | None = None
        self.superseded = False
        self.task: asyncio.Task | None = None
        self.staged: StagedData | None = None


class Backup:
    def __init__(self, cfg: Config, replica: Replica, judge: FailoverJudge,
                 tls_context: ssl.SSLContext | None = None, peer_node: str = "primary"):
        self.cfg = cfg
        self.tls_context = tls_context  # None: plain TCP ([tls] insecure = true)
        self.peer_node = peer_node      # whose certificate the sender must present
        self.replica = replica
        self.judge = judge
        self.fingerprint = cfg.fingerprint()
        self.current: Connection | None = None
        self.changed = asyncio.Event()  # something the judge should look at
        self.peer_generation = 0        # the highest generation the peer's beats carried
        self.phase = "waiting"          # waiting | fencing (else derived from the judge)
        self.last_failover: dict | None = None
        self.last_fencing: str | None = None
        self.inputs = InputLog(INPUT_LOG_CAP)  # for the current session
        self._replica_io = ThreadPoolExecutor(1, thread_name_prefix="replica")
        self.media: list[tuple[str, str]] = []  # read-only media here: (file, "SIZE:SHA256")

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
        """TLS handshake, then the peer must be the other host; else log why and close.

        The server is plain TCP upgraded here, rather than start_server(ssl=...),
        because asyncio drops handshake failures silently: this way each one is logged."""
        try:
            await writer.start_tls(self.tls_context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - SSL errors, resets, the timeout: all logged
            _log.error("tls-handshake-failed", peer=peer, reason=tls.describe(exc),
                       action="connection closed; replica and session untouched")
            writer.transport.abort()
            return False
        reason = tls.check_peer(writer.get_extra_info("peercert"), self.peer_node)
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
                               self._read_previous, disks=len(self.cfg.mirrored_disks),
                               generation=self.replica.state.generation, stream=True,
                               media=self.media)
        stream_timeout = self.cfg.replication.stream_timeout_ms / 1000
        progress_every = min(PROGRESS_EVERY_S, self.cfg.replication.ack_timeout_ms / 4000)
        last_progress = time.monotonic()
        conn.staged = StagedData(self.replica.dir)
        try:
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
                    for event in proto.events(data):
                        done, reason = await self._on_event(conn, proto, writer, event)
                        if done:
                            return reason
                except ProtocolError as exc:
                    return self._rejected(conn, writer, exc, eof=not data)
                receiving = proto.receiving
                if receiving is not None and time.monotonic() - last_progress >= progress_every:
                    writer.write(proto.progress(*receiving))  # a big checkpoint is flowing in
                    last_progress = time.monotonic()
                try:
                    await writer.drain()
                except OSError as exc:
                    return f"stream failed: {exc.strerror or exc}"
        finally:
            conn.staged.discard()

    def _rejected(self, conn: Connection, writer: asyncio.StreamWriter, exc: ProtocolError,
                  eof: bool) -> str | None:
        reply = getattr(exc, "reply", None)
        if reply:
            writer.write(reply)
        if eof:
            # EOF in the middle of a checkpoint: the primary died sending it.
            _log.warning("checkpoint-truncated", peer=conn.peer, detail=str(exc))
            return "primary closed the stream in the middle of a checkpoint"
        _log.error("stream-rejected", peer=conn.peer, session=conn.session or "-",
                   error=str(exc), replica_epoch=self.replica.state.epoch,
                   action="dropping the connection; replica untouched")
        return None

    async def _io(self, fn, *args):
        """Replica work, in order, on one thread: a superseded session's last write
        finishes before the next session touches the replica."""
        return await asyncio.get_running_loop().run_in_executor(self._replica_io, fn, *args)

    async def _on_event(self, conn: Connection, proto: BackupProtocol,
                        writer: asyncio.StreamWriter, event) -> tuple[bool, str | None]:
        """Handle one event; (True, reason) ends the session."""
        streaming = self.replica.state.state == SYNCING
        if isinstance(event, (PagesReceived, DiskWritten, DiskZeroed)):
            await self._io(*self._destination(conn, event, streaming))
        elif isinstance(event, InputReceived):
            if conn is self.current:
                self.inputs.add(event.after_epoch, event.frames, event.nic)
        elif isinstance(event, Send):
            writer.write(event.data)
        elif isinstance(event, SessionOpened):
            await self._open_session(conn, event.session, event.disk_sizes)
        elif isinstance(event, CheckpointStaged):
            await self._commit(conn, proto, writer, event.checkpoint, streaming)
        elif isinstance(event, PeerBye):
            _log.info("primary-bye", session=conn.session, reason=event.reason,
                      action="not activating; waiting for a new session")
            return True, None
        elif isinstance(event, PeerHandover):
            _log.warning("primary-handover", session=conn.session, epoch=event.epoch,
                         reason=event.reason, action="taking the guest over now")
            if conn is self.current and not conn.superseded:
                self.judge.handed_over(time.monotonic(), event.reason)
                self.changed.set()
            return True, None
        return False, None

    def _destination(self, conn: Connection, event, streaming: bool) -> tuple:
        """Where a frame's data goes, with its arguments: into the replica while it syncs
        (nothing there is resumable yet), else staged until the checkpoint's end frame."""
        if isinstance(event, PagesReceived):
            into = self.replica.apply_pages if streaming else conn.staged.add_pages
            return into, event.indices, event.pages
        if isinstance(event, DiskWritten):
            into = self.replica.write_disk if streaming else conn.staged.add_disk
            return into, event.disk, event.extents, event.data
        into = self.replica.zero_disk if streaming else conn.staged.add_zeroes
        return into, event.disk, event.extents

    async def _commit(self, conn: Connection, proto: BackupProtocol, writer: asyncio.StreamWriter,
                      cp, streamed: bool) -> None:
        t0 = time.monotonic()
        if streamed and cp.precopy:
            await self._io(self.replica.round_applied, cp.epoch, cp.full)
        elif streamed:
            await self._io(self.replica.commit_streamed, cp.epoch, cp.full, cp.taken_at,
                           cp.device_state, cp.disk_synced)
        else:
            empty = np.empty(0, np.uint32), np.empty((0, PAGE_SIZE), np.uint8)
            await self._io(functools.partial(
                self.replica.commit, cp.epoch, cp.full, cp.taken_at, *empty, cp.device_state,
                disk_synced=cp.disk_synced, precopy=cp.precopy, staged=conn.staged))
        conn.staged.discard()
        writer.write(proto.ack(cp.epoch))
        first_consistent = False
        if conn is self.current and not cp.precopy:
            first_consistent = not self.judge.resumable
            self.judge.committed()
            self.inputs.committed(cp.epoch)
        _log.debug("committed", epoch=cp.epoch, pages=cp.pages_received, streamed=streamed,
                   apply_ms=(time.monotonic() - t0) * 1000)
        if cp.precopy:
            _log.info("precopy-round", session=conn.session, epoch=cp.epoch,
                      pages=cp.pages_received, detail="applied; not resumable yet")
        elif first_consistent:
            _log.info("standby", session=conn.session, epoch=cp.epoch,
                      detail="first consistent checkpoint committed; the replica "
                             "is resumable")

    def _read_previous(self, indices):
        return self.replica.read_pages(indices)

    async def _open_session(self, conn: Connection, session: str, disk_sizes) -> None:
        old = self.current
        if old is not None and old is not conn:
            old.superseded = True
            if old.task is not None:
                old.task.cancel()
            _log.warning("session-superseded", old=old.session, new=session)
        conn.session = session
        self.current = conn
        self.inputs.clear()
        self.judge.session_started()
        await self._io(self.replica.begin_session, session, self.fingerprint,
                       self.cfg.memory_bytes, PAGE_SIZE, disk_sizes)
        _log.info("session-start", session=session, peer=conn.peer,
                  detail="replica is stale until the full sync commits")


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remus-backup",
        description="Receive checkpoints of the protected VM into a replica, and resume the "
                    "VM from the last committed checkpoint when the primary is lost: the "
                    "checkpoint stream AND every heartbeat link silent, and the primary "
                    "fenced (without [heartbeat], the stream alone decides: reset, EOF, or "
                    "silence longer than [replication] stream_timeout_ms). A primary that "
                    "says goodbye is not taken over; one that hands the guest over is, at "
                    "once and without fencing. The taken-over guest runs here until "
                    "`remusctl reprotect` makes this host its primary.")
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
    # Both directions' contexts now (this host sends after a re-protection): a TlsError
    # at start, never with a taken-over guest running.
    tls.context_for(cfg, "backup", server=False)
    node = Node(cfg, "backup")
    await node.start("backup", Replica(Path(cfg.backup.state_dir)).state.generation)
    try:
        return await serve_as_backup(node, cfg, activate_now=args.activate_now)
    finally:
        await node.close()


async def serve_as_backup(node: Node, cfg: Config, activate_now: bool = False) -> int:
    """Keep the replica of the guest `cfg`'s primary runs; take the guest over when that
    host is lost (fence it, then resume), and run it until it ends or the operator
    stops us; re-protect it on request. Returns the exit code."""
    tls_context = tls.context_for(cfg, node.host, server=True)  # a TlsError before anything opens
    replica = Replica(Path(cfg.backup.state_dir))
    s = replica.state
    hb = node.hb
    _log.info("backup-start", guest=cfg.guest.name, listen=cfg.backup.address,
              stream="insecure" if tls_context is None else "tls",
              replica_state=s.state, replica_epoch=s.epoch, generation=s.generation,
              detail="waiting for a session; an old replica is never resumed without one")
    if hb is None:
        _log.warning("no-heartbeat", detail="no [heartbeat] links: the loss of the checkpoint "
                     "stream alone triggers activation, which cannot tell a dead primary from a "
                     "partition (unsafe)")
    plan = cfg.fence_plan
    fencer = Fencer(plan, log.get("remus.fencing")) if plan.configured else None
    if fencer is None:
        _log.warning("no-fencing", target="backup host" if cfg.reversed_roles else "primary host",
                     detail="no [fencing] device for the host that runs the VM: the backup "
                            "will activate without making sure it is off (unsafe)")
    if tls_context is None:
        _log.warning("insecure-stream", detail="[tls] insecure = true: the checkpoint stream is "
                     "plain TCP, unauthenticated and unencrypted; anyone who reaches "
                     f"{cfg.backup.address} can feed the replica (unsafe)")
    judge = FailoverJudge(hb is not None, grace_s(cfg))
    backup = Backup(cfg, replica, judge, tls_context, PEER[node.host])
    backup.media = await asyncio.to_thread(read_only_media, cfg)
    stop = node.stop
    metrics = node.metrics
    host, port = cfg.backup_endpoint
    server = await asyncio.start_server(backup.handle, host, port, reuse_address=True)
    standby = StandbyGuest(cfg, replica) if cfg.backup.standby_guest and not activate_now else None
    tasks: list[asyncio.Task] = []
    if hb is not None:
        hb.update("backup", "", s.generation, 0)
        tasks.append(asyncio.create_task(follow_heartbeat(hb, backup)))
    def status() -> dict:
        r = replica.state
        phase = backup.phase
        if phase == "waiting":
            phase = ("stale" if judge.stale else "standby" if judge.resumable
                     else "syncing" if backup.current else "waiting")
        return {"role": "backup", "host": node.host, "guest": cfg.guest.name, "state": phase,
                "pid": os.getpid(), "generation": max(r.generation, backup.peer_generation),
                "session": r.session,
                "last_committed_epoch": r.epoch, "replica": r.as_dict(),
                "heartbeat": heartbeat_status(hb),
                "fencing": {"configured": plan.configured,
                            "levels": len(plan.levels), "last_failure": backup.last_fencing},
                "last_failover": backup.last_failover,
                "standby_guest": standby.describe() if standby is not None else {"state": "off"}}
    node.status = status
    node.commands = {}
    sdnotify.notify("READY=1", f"STATUS=standing by on {cfg.backup.address}")
    try:
        if activate_now:
            verdict = Verdict(FAILOVER, "operator asked (--activate-now)")
            judge.lost_at = time.monotonic()
        else:
            verdict = await wait_for_failover(backup, hb, stop, standby)
        server.close()
        for task in tasks:
            task.cancel()
        if verdict is None:
            _log.info("backup-stop", reason="signal", replica_state=replica.state.state)
            return 0
        decided_at = time.monotonic()
        sdnotify.notify("STATUS=primary lost: fencing and activating")
        detect_ms = (decided_at - (judge.lost_at or decided_at)) * 1000
        _log.warning("primary-lost", reason=verdict.reason, last_epoch=replica.state.epoch,
                     detect_ms=detect_ms)
        try:
            replica.check_activatable(cfg.fingerprint())
        except ReplicaError as exc:
            _log.error("activation-refused", reason=str(exc))
            return EXIT_ACTIVATION_REFUSED
        prepared = asyncio.create_task(prepare_guest(cfg, replica, standby))
        fenced_ms = 0.0
        if fencer is not None and not activate_now and verdict.fence:
            backup.phase = "fencing"
            if hb is not None:
                hb.update("fencing", replica.state.session, replica.state.generation,
                          replica.state.epoch)
            result = await fence_primary(cfg, fencer, stop, backup, metrics)
            if result is None:
                await discard_launch(prepared)
                return 0  # stopped while fencing
            fenced_ms = result.seconds * 1000
        generation = max(replica.state.generation, backup.peer_generation) + 1
        try:
            launched = await prepared
        except ReplicaError as exc:
            _log.error("activation-refused", reason=str(exc))
            return EXIT_ACTIVATION_REFUSED
        except Exception as exc:  # noqa: BLE001 - QEMU, TAP or QMP: report it, nothing ran
            _log.error("activation-failed", reason=f"{type(exc).__name__}: {exc}",
                       detail="the guest never ran; the replica is still resumable")
            return 1
        guest, netbuf = launched.guest, launched.netbuf
        try:
            replay = backup.inputs.replay(replica.state.epoch) if backup.current else []
            try:  # only now: until the fence, the lost primary's QEMU may hold the ports
                await guest.add_host_forwards()
            except GuestError as exc:
                _log.error("activation-failed", reason=str(exc),
                           detail="the guest never ran; the replica is still resumable")
                return 1
            try:
                await resume_guest(cfg, replica, guest, netbuf, verdict.reason, decided_at, generation,
                                   replay)
            except GuestError as exc:
                _log.error("activation-failed", reason=str(exc),
                           detail="the replica was marked activated and will not be resumed again")
                return 1
            _log.warning("failover-complete", detect_ms=detect_ms, fence_ms=fenced_ms,
                         generation=generation)
            if metrics is not None:
                metrics.failovers.inc()
            backup.last_failover = {"at": time.time(), "reason": verdict.reason,
                                    "detect_ms": detect_ms, "fence_ms": fenced_ms,
                                    "epoch": replica.state.epoch, "generation": generation}
            return await run_active(node, cfg, replica, guest, netbuf, generation,
                                    backup.last_failover)
        finally:
            guest.kill()
            if netbuf is not None:
                await netbuf.close()
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        if standby is not None:
            await standby.close()
        replica.close()


async def run_active(node: Node, cfg: Config, replica: Replica, guest: QemuGuest, netbuf,
                     generation: int, last_failover: dict) -> int:
    """Run the taken-over guest, unprotected, until it ends, the operator stops us, a
    newer generation holds it, or `remusctl reprotect` makes this host its primary."""
    from remus.primary.daemon import protect, watch_for_newer_holder
    hb = node.hb
    sdnotify.notify(f"STATUS=active: running the VM at generation {generation}, unprotected")
    if hb is not None:
        hb.update("active", replica.state.session, generation, replica.state.epoch)
    reprotect = asyncio.Event()

    def request_reprotect(_arg: str) -> dict:
        if reprotect.is_set():
            return {"ok": False, "error": "re-protection already requested"}
        reprotect.set()
        _log.warning("reprotect-requested", peer=cfg.reversed().backup.address,
                     detail="this host becomes the primary; the other host its backup")
        return {"ok": True, "backup": cfg.reversed().backup.address}
    def status() -> dict:
        return {"role": "active", "host": node.host, "guest": cfg.guest.name,
                "state": "reprotecting" if reprotect.is_set() else "active",
                "pid": os.getpid(), "qemu_pid": guest.pid, "generation": generation,
                "session": replica.state.session, "last_committed_epoch": replica.state.epoch,
                "heartbeat": heartbeat_status(hb), "last_failover": last_failover,
                **guest.usage()}
    node.status = status
    node.commands = {"reprotect": request_reprotect}
    node.healthy = lambda: guest.proc is not None and guest.proc.returncode is None
    exited = asyncio.create_task(guest.wait())
    stopped = asyncio.create_task(node.stop.wait())
    asked = asyncio.create_task(reprotect.wait())
    auto = None
    if cfg.replication.reprotect == "auto" and hb is not None:
        auto = asyncio.create_task(reprotect_when_peer_stands_by(hb, reprotect))
    newer = asyncio.create_task(watch_for_newer_holder(hb, None, generation, "active"))
    try:
        done, _ = await asyncio.wait({exited, stopped, asked, newer},
                                     return_when=asyncio.FIRST_COMPLETED)
        if newer in done:
            if netbuf is not None:
                netbuf.silence()
            guest.kill()
            holder = newer.result()
            _log.error("stood-down", my_generation=generation,
                       holder_generation=holder.get("generation"),
                       detail="another host holds the guest at a higher generation")
            return EXIT_STOOD_DOWN
        if stopped in done:
            _log.info("backup-stop", reason="signal", action="quit the activated guest")
            await guest.quit()
            return 0
        if asked in done:
            for task in (exited, stopped, newer):
                task.cancel()
            sender = cfg.reversed()
            replicas = replica.disk_files(len(cfg.mirrored_disks)) if cfg.mirrored_disks else []
            return await protect(node, sender, guest, netbuf, replica.ram_file,
                                 [str(p) for p in replicas], generation)
        _log.warning("guest-exit", status=exited.result(), reason=guest.shutdown_reason)
        return 0 if guest.shutdown_reason == "guest-shutdown" else 1
    finally:
        for task in (exited, stopped, asked, newer, auto):
            if task is not None:
                task.cancel()


async def reprotect_when_peer_stands_by(hb, reprotect: asyncio.Event) -> None:
    """[replication] reprotect = "auto": re-protect once the other host's beats say it
    waits as our backup."""
    while not reprotect.is_set():
        beat = hb.view().last_beat
        if beat is not None and beat.get("role") == "backup" and hb.view().peer_alive:
            _log.warning("reprotect-auto", peer_generation=beat.get("generation"),
                         detail="the other host stands by as the backup")
            reprotect.set()
            return
        await asyncio.sleep(0.2)


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


async def wait_for_failover(backup: Backup, hb, stop: asyncio.Event,
                            standby: StandbyGuest | None = None) -> Verdict | None:
    """Until the judge says fail over (None: stopped first). Keeps a standby guest
    for the session while the replica is resumable."""
    replica = backup.replica
    while not stop.is_set():
        v = backup.judge.verdict(time.monotonic())
        if v.action == FAILOVER:
            return v
        if standby is not None and backup.judge.resumable and not backup.judge.stale:
            standby.want(replica.state.session)
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
