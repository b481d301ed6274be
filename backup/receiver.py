"""The checkpoint stream's receiving end: sessions in, the replica kept.

Each inbound connection is a session of the primary; the newest supersedes
the others. Frames go into the replica while a session's first full
checkpoint syncs (nothing there is resumable yet) and are staged otherwise,
applied only at the checkpoint's end frame. The input the primary's guest
received is kept for replay after a failover. What the receiver learns (a
lost stream, a handover) goes to the failover judge.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

from remus.backup.admission import Admission, addresses_of, normalise
from remus.backup.failover import FailoverJudge
from remus.backup.inputlog import InputLog
from remus.backup.replica import SYNCING, Replica
from remus.backup.staging import StagedData
from remus.common import log, tls
from remus.common.capture import PAGE_SIZE
from remus.common.config import Config
from remus.common.protocol import (BackupProtocol, CheckpointStaged, DiskWritten, DiskZeroed,
                                   InputReceived, PagesReceived, PeerBye, PeerHandover, Send,
                                   SessionOpened)
from remus.common.wire import ProtocolError

_log = log.get("remus.backup")

READ_CHUNK = 1 << 20
PROGRESS_EVERY_S = 0.5  # while a checkpoint streams in, tell the primary this often
LOG_BURST, LOG_INTERVAL_S = 5, 60.0  # per event and source, for what a peer can provoke
HANDSHAKE_TIMEOUT = 10.0  # from accepting a connection to its hello checked (TLS included)
INPUT_LOG_CAP = 16 << 20  # input held for replay; more is left to the clients' TCP


class Connection:
    """One inbound checkpoint stream."""

    def __init__(self, peer: str, handshake_deadline: float = 0.0, source: str = "",
                 ticket=None):
        self.peer = peer
        self.source = source  # the peer's address without the port: whom a log line is about
        # monotonic time by which the handshake (TLS and hello) must be done
        self.handshake_deadline = handshake_deadline
        self.ticket = ticket  # its admission to the stream port
        self.session: str | None = None
        self.superseded = False
        self.task: asyncio.Task | None = None
        self.staged: StagedData | None = None


class Receiver:
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
        self.admission = Admission(addresses_of(cfg.primary_endpoint[0]))
        # What any peer can provoke, once per connection: a few lines per source and
        # minute, then a count.
        self.limited = log.RateLimited(_log, burst=LOG_BURST, interval=LOG_INTERVAL_S)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        ticket = self.admission.admit(writer.get_extra_info("peername")[0], task.cancel)
        if ticket is None:
            writer.transport.abort()
            return
        try:
            await self._handle(reader, writer, ticket)
        except asyncio.CancelledError:
            writer.transport.abort()  # evicted before it authenticated
        finally:
            self.admission.release(ticket)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ticket) -> None:
        peername = writer.get_extra_info("peername")
        conn = Connection("%s:%d" % peername[:2], time.monotonic() + HANDSHAKE_TIMEOUT,
                          normalise(peername[0]), ticket)
        # Nothing is awaited before the upgrade, so no byte of the client hello can
        # land in the plain reader.
        if self.tls_context is not None and not await self._authenticate(conn, writer):
            return
        ticket.authenticated = self.tls_context is not None
        conn.task = asyncio.current_task()
        try:
            reason = await self._serve(conn, reader, writer)
        except asyncio.CancelledError:
            reason = None  # superseded by a newer session
        except Exception as exc:  # noqa: BLE001 - the judge decides what a failure here means
            self.limited.error("session-failed", conn.source, peer=conn.peer, error=repr(exc),
                               action="dropping the connection; the replica is stale until "
                                      "a new session resynchronises it")
            if conn is self.current and not conn.superseded:
                self.judge.session_failed(time.monotonic(), f"the session failed here: {exc!r}")
                self.changed.set()
            reason = None
        finally:
            writer.close()
        if conn is self.current and not conn.superseded and reason:
            self.judge.stream_lost(time.monotonic(), reason)
            self.changed.set()

    async def _authenticate(self, conn: Connection, writer: asyncio.StreamWriter) -> bool:
        """TLS handshake, then the peer must be the other host; else log why and close.

        The server is plain TCP upgraded here, rather than start_server(ssl=...),
        because asyncio drops handshake failures silently: this way each one is logged."""
        try:
            await writer.start_tls(self.tls_context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - SSL errors, resets, the timeout: all logged
            self.limited.error("tls-handshake-failed", conn.source, peer=conn.peer,
                               reason=tls.describe(exc),
                               action="connection closed; replica and session untouched")
            writer.transport.abort()
            return False
        reason = tls.check_peer(writer.get_extra_info("peercert"), self.peer_node)
        if reason is not None:
            self.limited.error("stream-refused", conn.source, peer=conn.peer, reason=reason,
                               action="connection closed before reading; replica and "
                                      "session untouched")
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
                # Before the session, one deadline for the whole handshake: a peer
                # trickling its hello cannot hold the connection longer.
                timeout = stream_timeout if conn.session else \
                    conn.handshake_deadline - time.monotonic()
                try:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
                except asyncio.TimeoutError:
                    if not conn.session:
                        self.limited.warning("handshake-timeout", conn.source, peer=conn.peer)
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
            self.limited.warning("checkpoint-truncated", conn.source, peer=conn.peer,
                                 detail=str(exc))
            return "primary closed the stream in the middle of a checkpoint"
        self.limited.error("stream-rejected", conn.source, peer=conn.peer,
                           session=conn.session or "-", error=str(exc),
                           replica_epoch=self.replica.state.epoch,
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
            await self._io(self.replica.commit_staged, cp, conn.staged)
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
        if conn.ticket is not None:
            conn.ticket.authenticated = True  # a session: never evicted for a newcomer
        self.inputs.clear()
        self.judge.session_started()
        await self._io(self.replica.begin_session, session, self.fingerprint,
                       self.cfg.memory_bytes, PAGE_SIZE, disk_sizes)
        _log.info("session-start", session=session, peer=conn.peer,
                  detail="replica is stale until the full sync commits")
