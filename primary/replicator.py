"""The primary's checkpoint loop (the original Remus `Saver` with its hooks).

Per epoch: stop the guest, run postsuspend hooks, capture dirty pages and
device state (concurrently), run preresume hooks, cont; then, with the guest
already running, encode and send the checkpoint, wait for the backup's ack,
and run the commit hooks. The backup is lost => run unprotected and keep
trying to reconnect; every new session starts with a full sync.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import dataclasses
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from remus.common import log, tls
from remus.common.capture import PAGE_SIZE, Captured
from remus.common.config import Config
from remus.common.protocol import (Acked, CheckpointEncoder, PrimaryProtocol, Progress, Rejected,
                                   Welcome)
from remus.common.qemu import QemuGuest
from remus.common.stats import EpochLog, EpochStats
from remus.common.wire import ProtocolError
from remus.common.hooks import Hooks
from remus.common.status import PrimaryState
from remus.common.takeover import output_hold_s
from remus.primary.output_hold import OutputHold
from remus.primary.trigger import next_due, pause_trigger, rate_floor

_log = log.get("remus.primary")

READ_CHUNK = 1 << 16
BATCH_PAGES = 1024  # pages per frame: 4 MiB before compression
DISK_FRAME_RAW = 4 << 20  # disk data per frame: copies in flight stay small
DRILL_EXIT = 137     # as if killed
CONNECT_TIMEOUT = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
SUMMARY_EVERY_S = 10.0
HANDOVER_CLOSE_S = 5.0  # how long a handing-over primary waits for the backup to hang up
PRECOPY_DONE_PAGES = 2048  # a pre-copy round this small (8 MiB) ends pre-copy
INPUT_BACKLOG_MAX = 4 << 20  # beyond this much unsent stream, input is not copied to the backup
RETRY_LOG_BURST, RETRY_LOG_INTERVAL_S = 3, 300.0  # backup-refused/-unreachable lines


class SessionLost(Exception):
    """The checkpoint stream to the backup is gone; the message says why."""


class BackupRefused(SessionLost):
    """The backup answered, but refused the session (wrong version, other guest)."""


class HandedOver(Exception):
    """The guest was handed over to the backup: this loop is done."""


class Superseded(Exception):
    """The backup knows of a newer generation holding the guest: this copy is stale."""

    def __init__(self, reason: str, generation: int):
        super().__init__(reason)
        self.generation = generation


@dataclass
class SyncProgress:
    """A session's initial sync, for status: what has gone, how fast, how long to go."""
    started: float = 0.0
    ram_total: int = 0
    disk_size: int = 0
    rounds: int = 0
    ram_bytes: int = 0        # pages sent by pre-copy rounds, as raw bytes
    disk_bytes: int = 0       # disk data sent (zeroed ranges travel without data)
    wire_bytes: int = 0
    disk_copy: tuple[int, int] | None = None  # the mirror's (done, total), while it runs
    done_at: float = 0.0

    def round_done(self, pages: int, disk_bytes: int) -> None:
        self.rounds += 1
        self.ram_bytes += pages * PAGE_SIZE
        self.disk_bytes += disk_bytes

    def describe(self, now: float) -> dict | None:
        if not self.started:
            return None
        elapsed = (self.done_at or now) - self.started
        rate = self.wire_bytes / elapsed if elapsed > 0 else 0.0
        out = {"done": bool(self.done_at), "seconds": round(elapsed, 1), "rounds": self.rounds,
               "ram_bytes_sent": self.ram_bytes, "ram_total": self.ram_total,
               "disk_bytes_sent": self.disk_bytes, "disk_size": self.disk_size,
               "wire_bytes": self.wire_bytes, "wire_rate_mib_s": round(rate / (1 << 20), 1),
               "eta_s": None}
        if self.disk_copy is not None and not self.done_at:
            done, total = self.disk_copy
            out["disk_copied"], out["disk_to_copy"] = done, total
            if done and total > done:
                out["eta_s"] = round((total - done) * elapsed / done, 1)
        return out


class Replicator:
    def __init__(self, cfg: Config, guest: QemuGuest, capture, hooks: Hooks, epochs: EpochLog,
                 disk=None, generation: int = 1, tls_context: ssl.SSLContext | None = None,
                 peer_node: str = "backup", media: list[tuple[str, str]] = ()):
        self.cfg = cfg
        self.generation = generation
        self.tls_context = tls_context  # None: plain TCP ([tls] insecure = true)
        self.peer_node = peer_node      # whose certificate the backup must present
        self.disk = disk  # MirroredDisks, or None without a writable disk
        self.media = list(media)  # (file, "SIZE:SHA256") of each read-only medium
        self.guest = guest
        self.capture = capture
        self.hooks = hooks
        self.epochs = epochs
        self.state = PrimaryState.CONNECTING
        self.paused_for_backup = False  # on_backup_loss = pause, and the backup is gone
        self.die_at: str | None = None  # a drill: die at this point of the next checkpoint
        self.partitioned = False        # a drill: the stream is cut and stays cut
        self.ever_protected = False     # a backup has held a checkpoint of this guest
        self.session = ""
        self.committed_epoch = 0
        self.barrier_epoch = 0          # the last checkpoint barrier of this session
        self.input_forwarded = self.input_skipped = 0
        self._writer: asyncio.StreamWriter | None = None
        self._encoder: CheckpointEncoder | None = None
        self._acks: dict[int, asyncio.Future] = {}      # until the ack comes (the reader's)
        self._unawaited: dict[int, asyncio.Future] = {}  # until awaited (the sender's)
        # One thread encodes while the loop thread talks to QEMU and the socket.
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._last_summary = time.monotonic()
        self._handover: tuple[asyncio.Future, str] | None = None
        self._wake = asyncio.Event()  # cuts the wait for the next checkpoint short
        self._output_waiting = False    # trigger = output: a held frame awaits a checkpoint
        self._in_flight: deque[asyncio.Task] = deque()  # checkpoints sent, not yet committed
        self._reader_task: asyncio.Task | None = None
        self._progress_at = 0.0         # when the backup last said a checkpoint is flowing
        self._handshake_eofs = 0        # handshakes in a row the backup closed
        self.sync = SyncProgress()
        self.last_sent_at = 0.0         # monotonic: the last bytes written to the backup
        # After losing a protected session: output held for the takeover window.
        self.hold = OutputHold(hooks, output_hold_s(cfg), lambda: False)
        self.hold.on_release = self._released
        # A backup that keeps refusing, or stays away, is retried every few seconds
        # for as long as it lasts: a few lines, then a count.
        self._limited = log.RateLimited(_log, burst=RETRY_LOG_BURST,
                                        interval=RETRY_LOG_INTERVAL_S, source_field="backup")
        if disk is not None:
            disk.set_on_full(self._wake.set)  # the epoch's disk writes reached the cap

    async def run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            while self.partitioned:
                await asyncio.sleep(1.0)
            lost_protected = False
            try:
                await self._session()
            except HandedOver:
                return
            except Superseded:
                raise
            except BackupRefused as exc:
                self._limited.error("backup-refused", self._backup, reason=str(exc))
                backoff = BACKOFF_MAX
            except (SessionLost, OSError, ProtocolError, asyncio.TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                lost_protected = self.state == PrimaryState.PROTECTING
                if lost_protected:
                    _log.warning("backup-lost", reason=reason, last_committed=self.committed_epoch,
                                 action=self._on_loss())
                else:
                    self._limited.info("backup-unreachable", self._backup, reason=reason,
                                       retry_s=backoff)
            self._fail_handover()
            # On cancellation the stream stays open, so that say_bye() can still use it.
            await self._close_stream()
            if self.state in (PrimaryState.PROTECTING, PrimaryState.SYNCING):
                backoff = BACKOFF_MIN
            if self.ever_protected and self.cfg.primary.on_backup_loss == "pause":
                await self._pause_for_backup()
            elif not self.paused_for_backup:
                await self._hold_or_release(lost_protected)
            self.state = (PrimaryState.PAUSED if self.paused_for_backup else
                          PrimaryState.HOLDING if self.hold.active else PrimaryState.DEGRADED)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _on_loss(self) -> str:
        if self.cfg.primary.on_backup_loss == "pause":
            return "pausing the guest, reconnecting"
        if self.hold.hold_s > 0:
            return "holding the output for the takeover window, reconnecting"
        return "running unprotected, reconnecting"

    async def _hold_or_release(self, lost_protected: bool) -> None:
        """The backup is gone: if it may hold a resumable checkpoint, hold the output for
        the takeover window; else (or already holding) let it flow as before."""
        if lost_protected and self.hold.hold_s > 0:
            self.hold.start(self.last_sent_at)
        elif not self.hold.active:
            await self.hooks.unprotected()

    def _released(self) -> None:
        if self.state == PrimaryState.HOLDING:
            self.state = PrimaryState.DEGRADED

    async def partition(self) -> None:
        """A drill: cut the checkpoint stream, as a network partition would."""
        self.partitioned = True
        writer = self._writer
        if writer is not None:
            writer.transport.abort()  # no bye: the backup must not think we left on purpose

    def output_waiting(self) -> None:
        """The NIC buffers hold the first frame of an epoch (trigger = output)."""
        if self.cfg.replication.trigger == "output":
            self._output_waiting = True
            self._wake.set()

    async def _until_next_pause(self, due: float, last: float, floor: float) -> str:
        """Wait for the next checkpoint (primary/trigger.py); why it is taken. `floor`:
        the earliest [replication] max_rate lets output bring it."""
        rep = self.cfg.replication
        gap = min(rep.min_interval_ms, rep.interval_ms) / 1000
        while True:
            now = time.monotonic()
            trigger, look_again = pause_trigger(now, due, last, gap, self._output_waiting,
                                                self._handover is not None, self._disk_full(),
                                                floor)
            if trigger is not None:
                return trigger
            if self._commit_failed():
                await self._settle(len(self._in_flight))  # raises the failed commit's error
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, look_again - now))
            except asyncio.TimeoutError:
                pass

    async def handover(self, reason: str) -> bool:
        """A planned switchover: take a last checkpoint with the guest left stopped, stop
        the guest for good, and tell the backup to take over without fencing. False if
        the guest is not protected or the session fails meanwhile (the guest may then
        be left stopped)."""
        if self.state != PrimaryState.PROTECTING or self._handover is not None:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._handover = (fut, reason)
        self._wake.set()
        return await fut

    def _fail_handover(self) -> None:
        if self._handover is not None and not self._handover[0].done():
            self._handover[0].set_result(False)

    async def _hand_over(self, proto: PrimaryProtocol, epoch: int) -> None:
        fut, reason = self._handover
        await self._checkpoint(proto, epoch, full=False, final=True)
        # The backup holds `epoch` and all output up to it is out; the guest never runs
        # here again.
        await self.guest.quit()
        self.state = PrimaryState.HANDED_OVER
        self._writer.write(self._encoder.handover(epoch, reason))
        await self._writer.drain()
        if self._reader_task is not None:  # the backup closes the stream as it takes over
            await asyncio.wait({self._reader_task}, timeout=HANDOVER_CLOSE_S)
        _log.warning("handed-over", epoch=epoch, reason=reason,
                     detail="the guest stopped here after the backup acknowledged its last "
                            "checkpoint; the backup resumes it without fencing")
        fut.set_result(True)
        raise HandedOver()

    def forward_input(self, nic: int, frames: list[bytes]) -> None:
        """Copy frames just handed to the guest to the backup, which replays them if it
        resumes the guest from a checkpoint taken before they arrived. Best effort:
        skipped while no session protects the guest or the stream is backed up."""
        writer, encoder = self._writer, self._encoder
        streaming = self.state in (PrimaryState.SYNCING, PrimaryState.PROTECTING)
        if (writer is None or encoder is None or not streaming
                or writer.transport.get_write_buffer_size() > INPUT_BACKLOG_MAX):
            self.input_skipped += len(frames)
            return
        writer.write(encoder.input(self.barrier_epoch, frames, nic))
        self.last_sent_at = time.monotonic()
        self.input_forwarded += len(frames)

    def drill_point(self, point: str) -> None:
        """The original Remus drill commands (s s2 r r2 c c2): the whole primary host
        dies here, with no goodbye and nothing released."""
        if self.die_at == point:
            _log.error("drill-die", point=point, epoch=self.committed_epoch,
                       hooks_ran=self.hooks.last_run)
            self.guest.kill()
            os._exit(DRILL_EXIT)

    async def _pause_for_backup(self) -> None:
        await self.guest.stop()
        self.hooks.carry_over()
        self.paused_for_backup = True
        _log.error("guest-paused", detail="backup lost and on_backup_loss = pause: the guest "
                   "stays stopped, its output held, until the backup returns (a new session "
                   "resumes it) or an operator resumes it unprotected (SIGUSR1)")

    async def operator_resume(self) -> None:
        if not self.paused_for_backup:
            _log.info("operator-resume", detail="nothing to resume: the guest is not paused")
            return
        self.paused_for_backup = False
        await self.hooks.unprotected()
        await self.guest.cont()
        _log.warning("operator-resume", detail="guest resumed unprotected, held output released")

    def close(self) -> None:
        self._encode_pool.shutdown(wait=True)

    async def say_bye(self, reason: str) -> None:
        """Tell the backup we are alive and ending on purpose, so it does not activate."""
        if self._writer is not None and self._encoder is not None:
            try:
                self._writer.write(self._encoder.bye(reason))
                await asyncio.wait_for(self._writer.drain(), 2.0)
                _log.info("bye-sent", reason=reason)
            except (OSError, asyncio.TimeoutError):
                pass
        await self._close_stream()

    async def _close_stream(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(SessionLost("stream closed"))
        self._acks.clear()
        self._unawaited.clear()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.cfg.backup_endpoint
        src_host, src_port = self.cfg.primary_endpoint
        local = (src_host, src_port) if src_host else None
        if self.tls_context is None:
            return await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=local), CONNECT_TIMEOUT)
        try:
            # server_hostname only fills SNI: the backup is named by its certificate
            # (check_peer below), not by its address.
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=local, ssl=self.tls_context,
                                        server_hostname=self.peer_node,
                                        ssl_handshake_timeout=CONNECT_TIMEOUT),
                CONNECT_TIMEOUT)
        except ssl.SSLError as exc:
            raise BackupRefused(f"TLS handshake with the backup failed: {tls.describe(exc)}") from None
        reason = tls.check_peer(writer.get_extra_info("peercert"), self.peer_node)
        if reason is not None:
            writer.transport.abort()
            raise BackupRefused(f"TLS: {reason} (is {host}:{port} our backup?)")
        return reader, writer

    @property
    def _backup(self) -> str:
        return "%s:%d" % self.cfg.backup_endpoint

    def protocol(self, session: str) -> PrimaryProtocol:
        """What the backup sends, checked; its reject can supersede this primary only
        if TLS authenticated the backup."""
        return PrimaryProtocol(session, generation=self.generation,
                               authenticated=self.tls_context is not None)

    async def _session(self) -> None:
        if not self.hold.active:  # while holding, the state says so until a session syncs
            self.state = PrimaryState.CONNECTING
        reader, writer = await self._connect()
        self._writer = writer
        session = secrets.token_hex(16)
        self.session = session
        self.barrier_epoch = 0
        rep = self.cfg.replication
        proto = self.protocol(session)
        self._encoder = CheckpointEncoder(PAGE_SIZE, rep.compression, rep.zstd_level)
        try:
            writer.write(self._encoder.hello(self.cfg.fingerprint(), session, self.cfg.memory_bytes,
                                             self.disk.sizes if self.disk else (), self.generation,
                                             [digest for _, digest in self.media]))
            await asyncio.wait_for(writer.drain(), CONNECT_TIMEOUT)
            backup_generation = await asyncio.wait_for(self._handshake(reader, proto),
                                                       CONNECT_TIMEOUT)
        except ssl.SSLError as exc:
            # With TLS 1.3 the backup checks our certificate after our side of the
            # handshake has completed: its verdict arrives as an alert on the first read.
            raise BackupRefused(f"the backup refused our TLS certificate: {tls.describe(exc)}") from None
        _log.info("session-start", session=session, backup="%s:%d" % self.cfg.backup_endpoint,
                  generation=self.generation, backup_generation=backup_generation)
        reader_task = self._reader_task = asyncio.create_task(self._read_acks(reader, proto))
        try:
            if self.disk is not None:
                await self.disk.session_start()
            await self._replicate(proto)
        finally:
            reader_task.cancel()
            if self.disk is not None:
                await self.disk.session_end()

    async def _handshake(self, reader: asyncio.StreamReader, proto: PrimaryProtocol) -> int:
        """The backup's generation once it welcomes the session."""
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                self._handshake_eofs += 1
                if self.tls_context is not None and self._handshake_eofs >= 3:
                    # A backup that refuses our certificate closes without an alert
                    # (asyncio drops it), so this is all we learn; its log says why.
                    raise BackupRefused(
                        f"backup closed the connection during the handshake "
                        f"{self._handshake_eofs} times in a row; over TLS that is how it "
                        f"refuses our certificate: see its tls-handshake-failed or "
                        f"stream-refused log line (a busy or restarting backup closes too)")
                raise SessionLost("backup closed the connection during the handshake")
            for event in proto.receive(data):
                if isinstance(event, Rejected):
                    if event.supersedes:
                        raise Superseded(event.reason, event.generation)
                    if event.generation > self.generation:
                        raise BackupRefused(
                            f"{event.reason} (over plain TCP the backup is not authenticated, "
                            f"so its claim of generation {event.generation} does not make "
                            f"this primary stand down; only the heartbeat may)")
                    raise BackupRefused(event.reason)
                if isinstance(event, Welcome):
                    self._handshake_eofs = 0
                    return event.generation

    async def _read_acks(self, reader: asyncio.StreamReader, proto: PrimaryProtocol) -> None:
        error: Exception
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    error = SessionLost("backup closed the stream")
                    break
                for event in proto.receive(data):
                    if isinstance(event, Progress):
                        self._progress_at = time.monotonic()
                    if isinstance(event, Acked):
                        fut = self._acks.pop(event.epoch, None)
                        if fut is not None and not fut.done():
                            fut.set_result(time.monotonic())
        except (OSError, ProtocolError) as exc:
            error = SessionLost(f"stream from backup failed: {exc}")
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(error)

    async def _replicate(self, proto: PrimaryProtocol) -> None:
        interval = self.cfg.replication.interval_ms / 1000
        self.state = PrimaryState.SYNCING
        sync_started = time.monotonic()
        self.sync = SyncProgress(started=sync_started, ram_total=self.cfg.memory_bytes,
                                 disk_size=self.disk.size if self.disk else 0)
        watcher = asyncio.create_task(self._watch_disk_copy())
        try:
            epoch = await self._precopy(proto) if self.cfg.replication.precopy_rounds else 0
        finally:
            watcher.cancel()
        try:
            await self._checkpoint_loop(proto, epoch + 1, interval, sync_started)
        finally:
            await self._abandon_in_flight()

    async def _checkpoint_loop(self, proto: PrimaryProtocol, first: int, interval: float,
                               sync_started: float) -> None:
        """Checkpoints from epoch `first` on, up to [replication] pipeline of them in
        flight: the next pause need not wait for the previous checkpoint's ack. They
        commit in order, each after the one before it."""
        window = self.cfg.replication.pipeline
        epoch = first - 1
        max_rate = self.cfg.replication.max_rate
        next_pause = last_pause = time.monotonic()
        recent = deque(maxlen=max(1, max_rate))  # the latest pauses' start times
        while True:
            trigger = await self._until_next_pause(next_pause, last_pause,
                                                   rate_floor(recent, max_rate))
            await self._settle(window - 1)  # a failed commit ends the session here
            last_pause = time.monotonic()
            recent.append(last_pause)
            next_pause = next_due(trigger, next_pause, last_pause, interval)
            self._output_waiting = False  # what is held now goes with this checkpoint
            epoch += 1
            if self._handover is not None and self.state == PrimaryState.PROTECTING:
                await self._settle(0)
                await self._hand_over(proto, epoch)
            stats, sent_at = await self._take(proto, epoch, epoch == 1, trigger=trigger)
            before = self._in_flight[-1] if self._in_flight else None
            task = asyncio.create_task(self._complete(stats, sent_at, before))
            task.add_done_callback(lambda _: self._wake.set())
            self._in_flight.append(task)
            await self._settle(0 if epoch == first else window - 1)
            if epoch == first:
                self.state = PrimaryState.PROTECTING
                await self.hold.end()  # this commit released what the lost session held
                st = self.epochs.recent[-1]
                # The output of the whole sync waited for this ack.
                _log.info("protecting", epoch=epoch, interval_ms=self.cfg.replication.interval_ms,
                          capture=self.capture.name, first_pause_ms=round(st.pause_ms, 1),
                          first_hold_ms=round(st.pause_ms + st.send_ms + st.ack_ms, 1),
                          sync_s=round(time.monotonic() - sync_started, 3),
                          sync_wire_bytes=self.sync.wire_bytes)
                self.sync.done_at = time.monotonic()
            self._maybe_summary()

    def _commit_failed(self) -> bool:
        return any(t.done() and not t.cancelled() and t.exception() is not None
                   for t in self._in_flight)

    @property
    def in_flight(self) -> int:
        """Checkpoints sent and not yet committed."""
        return len(self._in_flight)

    async def _settle(self, keep: int) -> None:
        """Wait until at most `keep` checkpoints are in flight; collect the committed
        ones, raising what the first failed one raised."""
        while self._in_flight and (len(self._in_flight) > keep or self._in_flight[0].done()):
            await self._in_flight.popleft()

    async def _abandon_in_flight(self) -> None:
        """The session ends: what was in flight is never committed (its output stays held)."""
        tasks = list(self._in_flight)
        self._in_flight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _precopy(self, proto: PrimaryProtocol) -> int:
        """Copy the guest's RAM to the backup while it runs: a full round, then rounds of
        what changed meanwhile, until little changes (and the disk's initial copy is
        done), so that the first checkpoint's pause and output hold stay short.
        Returns the last epoch used."""
        rep = self.cfg.replication
        interval = rep.interval_ms / 1000
        t0 = time.monotonic()
        epoch, pages = 1, await self._precopy_round(proto, 1, full=True)
        rounds_left = rep.precopy_rounds - 1
        small = max(PRECOPY_DONE_PAGES, self.capture.ram.npages // 100)
        while True:
            disk_pending = self.disk is not None and not self.disk.ready
            if (pages <= small or rounds_left <= 0) and not disk_pending:
                break
            await self._wait_or_wake(interval)  # let the guest dirty a bounded amount
            epoch += 1
            pages = await self._precopy_round(proto, epoch, full=False)
            rounds_left -= 1
        _log.info("precopy-done", rounds=epoch, last_round_pages=pages,
                  seconds=round(time.monotonic() - t0, 3))
        return epoch

    async def _wait_or_wake(self, delay: float) -> None:
        """Sleep `delay`, or less if the disk's writes reach their cap meanwhile."""
        if self._disk_full():
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def _disk_full(self) -> bool:
        return self.disk is not None and self.disk.over_cap

    async def _precopy_round(self, proto: PrimaryProtocol, epoch: int, full: bool) -> int:
        """One round, read from guest RAM batch by batch as it is sent."""
        started = time.time()
        writes = None
        if self.disk is not None:
            writes, _ = self.disk.seal()  # writes so far, in order
        pages = [0]

        def batches():
            for batch in self.capture.precopy_batches(full, BATCH_PAGES):
                pages[0] += len(batch[0])
                yield batch
        frames = self._encoder.precopy_round(epoch, full, started, batches(),
                                             writes.runs(DISK_FRAME_RAW) if writes is not None else (),
                                             batch_pages=BATCH_PAGES)
        wire = await self._send(proto, epoch, frames, self.capture.ram.npages if full else 0)
        if self.disk is not None:
            self.disk.sent()
        await self._await_ack(epoch)
        disk_bytes = writes.bytes if writes is not None else 0
        self.sync.round_done(pages[0], disk_bytes)
        _log.info("precopy-round", epoch=epoch, pages=pages[0], wire_bytes=wire,
                  disk_bytes=disk_bytes, disk_extents=len(writes) if writes is not None else 0)
        return pages[0]

    async def _watch_disk_copy(self) -> None:
        """For status, while the mirror's initial copy runs. Never awaited by the
        checkpoint loop: QEMU answers no QMP while it waits on a held disk write."""
        while self.state == PrimaryState.SYNCING and self.disk is not None and not self.disk.ready:
            if not self.disk.over_cap:
                try:
                    self.sync.disk_copy = await asyncio.wait_for(self.disk.copy_progress(), 2.0)
                except Exception as exc:  # noqa: BLE001 - progress is for show
                    _log.debug("disk-progress-unknown", error=repr(exc))
            await asyncio.sleep(1.0)
        self.sync.disk_copy = None

    async def _send(self, proto: PrimaryProtocol, epoch: int, frames, progress_of: int) -> int:
        """Queue the frames of checkpoint `epoch`; returns the bytes sent."""
        loop = asyncio.get_running_loop()
        assert self._writer is not None
        ack = loop.create_future()
        ack.add_done_callback(lambda f: f.cancelled() or f.exception())  # may end unawaited
        # The ack may come, and the reader pop it from _acks, before it is awaited:
        # while the last frames drain, or (pipelined) while earlier epochs commit.
        self._acks[epoch] = self._unawaited[epoch] = ack
        proto.sent(epoch)
        wire = frames_sent = shown = 0
        while True:
            frame = await loop.run_in_executor(self._encode_pool, next, frames, None)
            if frame is None:
                return wire
            self._writer.write(frame)
            self.last_sent_at = time.monotonic()
            wire += len(frame)
            self.sync.wire_bytes += len(frame) if self.state == PrimaryState.SYNCING else 0
            frames_sent += 1
            await self._drain()
            if progress_of:
                shown = self._sync_progress(min(progress_of, (frames_sent - 1) * BATCH_PAGES),
                                            progress_of, shown)

    async def _drain(self) -> None:
        """Wait for the stream to take more; a backup that takes nothing for
        ack_timeout_ms is lost."""
        timeout = self.cfg.replication.ack_timeout_ms / 1000
        try:
            await asyncio.wait_for(self._writer.drain(), timeout)
        except asyncio.TimeoutError:
            raise SessionLost(f"backup took no checkpoint data for "
                              f"{self.cfg.replication.ack_timeout_ms} ms") from None

    async def _await_ack(self, epoch: int) -> float:
        """The ack's arrival time. The deadline is ack_timeout_ms after the send, or
        after the backup's latest word that the checkpoint is still flowing in."""
        timeout = self.cfg.replication.ack_timeout_ms / 1000
        fut = self._unawaited.pop(epoch, None)
        if fut is None:
            raise SessionLost(f"stream closed before epoch {epoch} was acknowledged")
        start = time.monotonic()
        while True:
            left = max(start, self._progress_at) + timeout - time.monotonic()
            if left <= 0:
                raise SessionLost(f"backup did not acknowledge epoch {epoch} within "
                                  f"{self.cfg.replication.ack_timeout_ms} ms of its last "
                                  f"progress") from None
            try:
                return await asyncio.wait_for(asyncio.shield(fut), left)
            except asyncio.TimeoutError:
                continue

    async def _pause_and_capture(self, epoch: int, full: bool,
                                 resume: bool = True) -> tuple[Captured, bytes, tuple, dict]:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        if self.disk is not None:
            self.disk.lift_cap()  # `stop` waits for in-flight writes: let them land
        await self.guest.stop()
        self.barrier_epoch = epoch  # input handed to the guest from now on is not in `epoch`
        timings: dict = {"stop_ms": (time.monotonic() - t0) * 1000}
        resumed = False
        try:
            self.drill_point("postsuspend-before")
            await self.hooks.postsuspend(epoch)
            self.drill_point("postsuspend-after")
            disk = self.disk.take_sealed() if self.disk is not None else (None, False)
            tc = time.monotonic()
            capture_job = loop.run_in_executor(None, self.capture.full if full else self.capture.capture)
            capture_job.add_done_callback(
                lambda _: timings.__setitem__("capture_ms", (time.monotonic() - tc) * 1000))
            device_state = await self.guest.save_device_state()
            timings["device_ms"] = (time.monotonic() - tc) * 1000
            captured = await capture_job
            if not resume:  # a handover: the guest stays stopped for good
                resumed = True
                timings["pause_ms"] = (time.monotonic() - t0) * 1000
                return captured, device_state, disk, timings
            self.drill_point("preresume-before")
            tr = time.monotonic()
            await self.hooks.preresume(epoch)
            self.drill_point("preresume-after")
            await self.guest.cont()
            resumed = True
            timings["resume_ms"] = (time.monotonic() - tr) * 1000
            if self.paused_for_backup:
                self.paused_for_backup = False
                _log.warning("guest-resumed", detail="a new session took its first checkpoint")
        finally:
            if not resumed:
                # Never leave the guest stopped because a checkpoint failed.
                try:
                    await self.guest.cont()
                except Exception as exc:  # noqa: BLE001 - already failing; report both
                    _log.error("resume-after-failed-checkpoint-failed", error=str(exc))
        timings["pause_ms"] = (time.monotonic() - t0) * 1000
        return captured, device_state, disk, timings

    async def _checkpoint(self, proto: PrimaryProtocol, epoch: int, full: bool,
                          final: bool = False, trigger: str = "interval") -> None:
        """Take one checkpoint and wait until it is committed."""
        await self._complete(*await self._take(proto, epoch, full, final, trigger))

    async def _take(self, proto: PrimaryProtocol, epoch: int, full: bool,
                    final: bool = False, trigger: str = "interval") -> tuple[EpochStats, float]:
        """Pause, capture, resume and send a checkpoint: its figures but the ack's, and
        when its last byte went out."""
        loop = asyncio.get_running_loop()
        taken_at = time.time()
        captured, device_state, (writes, disk_synced), timings = \
            await self._pause_and_capture(epoch, full, resume=not final)
        t_send = time.monotonic()
        await loop.run_in_executor(self._encode_pool, self.capture.after_resume, captured)
        assert self._encoder is not None and self._writer is not None
        frames = self._encoder.checkpoint(epoch, full, taken_at, captured.indices, captured.new_pages,
                                          captured.previous_pages, device_state,
                                          batch_pages=BATCH_PAGES, disk_synced=disk_synced,
                                          disk_runs=writes.runs(DISK_FRAME_RAW) if writes is not None else ())
        total = len(captured.indices)
        wire = await self._send(proto, epoch, frames, total if full else 0)
        if self.disk is not None:
            self.disk.sent()
        sent_at = time.monotonic()
        stats = EpochStats(
            epoch=epoch, full=full, taken_at=taken_at, pause_ms=timings["pause_ms"],
            capture_ms=timings.get("capture_ms", 0.0), device_ms=timings["device_ms"],
            dirty_pages=total, device_bytes=len(device_state),
            disk_bytes=writes.bytes if writes is not None else 0,
            wire_bytes=wire, send_ms=(sent_at - t_send) * 1000, ack_ms=0.0, trigger=trigger,
            in_flight=len(self._in_flight), stop_ms=timings["stop_ms"],
            resume_ms=timings.get("resume_ms", 0.0))
        return stats, sent_at

    async def _complete(self, stats: EpochStats, sent_at: float,
                        before: asyncio.Task | None = None) -> None:
        """Once the checkpoint sent before it is committed: wait for this one's ack, then
        commit it (its held output leaves)."""
        if before is not None:
            await before
        acked_at = await self._await_ack(stats.epoch)
        self.committed_epoch = stats.epoch
        self.ever_protected = True
        self.drill_point("commit-before")
        await self.hooks.commit(stats.epoch)
        self.drill_point("commit-after")
        stats = dataclasses.replace(stats, ack_ms=(acked_at - sent_at) * 1000)
        self.epochs.add(stats)
        _log.debug("checkpoint", epoch=stats.epoch, pause_ms=stats.pause_ms,
                   dirty=stats.dirty_pages, wire=stats.wire_bytes, ack_ms=stats.ack_ms)
        if stats.full:
            _log.info("sync-complete", epoch=stats.epoch, pages=stats.dirty_pages,
                      wire_bytes=stats.wire_bytes,
                      seconds=(acked_at - sent_at) + stats.send_ms / 1000)

    @staticmethod
    def _sync_progress(pages_sent: int, total_pages: int, shown: int) -> int:
        """Log the initial sync every 10% of guest RAM."""
        percent = pages_sent * 100 // max(total_pages, 1)
        if percent >= shown + 10:
            _log.info("sync-progress", percent=percent, pages=pages_sent, of=total_pages)
            return percent - percent % 10
        return shown

    def _maybe_summary(self) -> None:
        now = time.monotonic()
        if now - self._last_summary < SUMMARY_EVERY_S:
            return
        self._last_summary = now
        s = self.epochs.summary()
        _log.info("protecting-summary", epoch=self.committed_epoch,
                  cps=s["checkpoints_per_s"], pause_p50_ms=s["pause_p50_ms"],
                  pause_p99_ms=s["pause_p99_ms"], dirty_p50=s["dirty_pages_p50"],
                  wire_p50=s["wire_bytes_p50"], ack_p50_ms=s["ack_p50_ms"], **self.guest.usage())
