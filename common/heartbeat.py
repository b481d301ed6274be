"""Heartbeat between the primary and backup daemons, apart from the checkpoint stream.

In the style of ZeroMQ's Binary Star: each node publishes a small beat every
`interval_ms` on every link and subscribes to its peer's beats; the peer is
lost on a link after `miss` intervals without a beat there, and lost
altogether when it is lost on every link.

The beats are sent and watched by a process of their own (multiprocessing,
"spawn" start method), so nothing the daemon does (a long pause, a big copy,
garbage collection, a busy event loop holding the GIL) can delay a beat or a
loss detection. The daemon talks to it through two pipes:

    daemon (asyncio)                      heartbeat process
    Heartbeat.update()/mute_link()/stop  --ctl pipe-->  beat loop (zmq.Poller)
    Heartbeat.events()/view()/jitter()   <--event pipe--  outbox thread

Per link (local "host:port", peer "host:port") the node binds a PUB socket as
a CURVE server at its local address and connects a SUB socket, as a CURVE
client, to the peer's PUB. Both directions are authenticated:
- our SUB only completes the handshake with a server holding the secret key
  of the configured peer public key;
- our PUB runs a ZAP handler (zmq.auth ThreadAuthenticator, one ZAP domain
  per link) that admits only the configured peer public key; any other key is
  refused and logged (`peer-rejected link=... reason="unknown peer key"`).
A beat whose `node` is not the expected peer name is dropped and logged too.

A beat (msgpack map): node, role, session, generation, epoch, seq, sent_at
(wall clock, informative), and per link `echo` (the last seq we received on
that link) with `held_ms`, from which the peer measures the round trip.

Keys are CURVE key pairs in zmq.auth.create_certificates format (NAME.key,
NAME.key_secret), made by `remusctl keys generate`.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import gc
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import msgpack
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from remus.common import log

LOGGER = "remus.heartbeat"
_log = log.get(LOGGER)

MAX_BEAT_BYTES = 4096          # a beat is ~150 bytes; anything much larger is not one
_JITTER_WINDOW = 1000          # send intervals kept for the percentiles
_START_TIMEOUT_S = 30.0        # spawn + import on a loaded machine
_STOP_TIMEOUT_S = 3.0
_REJECT_LOG_PERIOD_S = 10.0    # a refused peer reconnects all the time: one line per period
_PEER_BEAT_PERIOD_S = 1.0      # PeerBeat at most this often unless role/session/generation change
_MAX_TEXT = 256                # role and session length
_RT_PRIORITY = 10              # SCHED_RR: above every normal task (QEMU, the daemons), below kernel threads


class HeartbeatError(RuntimeError):
    """The heartbeat cannot start (keys, addresses) or its process failed."""


# --------------------------------------------------------------------- config


def _endpoint(addr: str, what: str) -> tuple[str, bool]:
    """'host:port' -> ('tcp://host:port', is_ipv6)."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {addr!r}: expected HOST:PORT with a port from 1 to 65535")
    ipv6 = ":" in host
    return (f"tcp://[{host}]:{port}" if ipv6 else f"tcp://{host}:{port}"), ipv6


@dataclass
class Link:
    local: str   # our bind address, "host:port" (our PUB)
    peer: str    # the peer's bind address for this link (its PUB)

    @property
    def name(self) -> str:
        return f"{self.local}->{self.peer}"


@dataclass(kw_only=True)
class HeartbeatConfig:
    node: str                  # our name, carried in every beat
    peer_node: str             # the only name accepted in received beats
    links: list[Link]
    secret_key: Path           # our NAME.key_secret
    peer_public_key: Path      # the peer's NAME.key
    interval_ms: int = 100
    miss: int = 5
    realtime: bool = True      # run the heartbeat process SCHED_RR if allowed (as corosync does)

    def __post_init__(self) -> None:
        self.secret_key = Path(self.secret_key)
        self.peer_public_key = Path(self.peer_public_key)
        self.links = [lk if isinstance(lk, Link) else Link(*lk) for lk in self.links]
        if not self.node or not self.peer_node:
            raise ValueError("heartbeat: node and peer_node must be set")
        if self.node == self.peer_node:
            raise ValueError(f"heartbeat: node and peer_node are both {self.node!r}")
        if not self.links:
            raise ValueError("heartbeat: at least one link is needed")
        for lk in self.links:
            _endpoint(lk.local, "heartbeat link local address")
            _endpoint(lk.peer, "heartbeat link peer address")
        locals_ = [lk.local for lk in self.links]
        if len(set(locals_)) != len(locals_):
            raise ValueError("heartbeat: two links bind the same local address")
        if not isinstance(self.interval_ms, int) or not 1 <= self.interval_ms <= 60_000:
            raise ValueError("heartbeat: interval_ms must be an integer from 1 to 60000")
        if not isinstance(self.miss, int) or not 1 <= self.miss <= 1000:
            raise ValueError("heartbeat: miss must be an integer from 1 to 1000")


def load_keys(cfg: HeartbeatConfig) -> tuple[bytes, bytes, bytes]:
    """(own public, own secret, peer public) as z85 bytes; HeartbeatError naming the file."""

    def load(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
        what = "secret key" if want_secret else "peer public key"
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            if not path.exists():
                raise HeartbeatError(f"heartbeat {what} file {path} does not exist") from exc
            raise HeartbeatError(f"heartbeat {what} file {path} cannot be read: {exc}") from exc
        for label, key in (("public", public), ("secret", secret)):
            if key is None:
                continue
            try:
                ok = len(key) == 40 and len(z85.decode(key)) == 32
            except Exception:
                ok = False
            if not ok:
                raise HeartbeatError(f"heartbeat {what} file {path}: malformed {label} key")
        if want_secret and secret is None:
            raise HeartbeatError(f"heartbeat secret key file {path} holds no secret key "
                                 f"(is it the .key file instead of the .key_secret file?)")
        return public, secret

    own_public, own_secret = load(cfg.secret_key, True)
    peer_public, _ = load(cfg.peer_public_key, False)
    if peer_public == own_public:
        raise HeartbeatError(f"heartbeat peer public key {cfg.peer_public_key} is our own key")
    assert own_secret is not None
    return own_public, own_secret, peer_public


# --------------------------------------------------------------------- events


@dataclass(frozen=True)
class LinkUp:
    link: str


@dataclass(frozen=True)
class LinkDown:
    link: str
    missed: int = 0            # intervals without a beat when the link was declared down


@dataclass(frozen=True)
class PeerLost:
    """Down on every link (only after the peer was seen)."""
    silent_ms: float = 0.0     # age of the newest beat, on any link, at detection


@dataclass(frozen=True)
class PeerBack:
    """The peer is alive again (first=True: the first beat ever)."""
    beat: dict
    first: bool = False


@dataclass(frozen=True)
class PeerBeat:
    """A beat, when role/session/generation changed, else at most once a second."""
    beat: dict


Event = LinkUp | LinkDown | PeerLost | PeerBack | PeerBeat


@dataclass
class PeerView:
    links: list[dict]          # {"link", "up", "last_beat_age_ms" (None: never), "missed", "rtt_ms", "rejected"}
    peer_alive: bool           # up on at least one link
    last_beat: dict | None     # last beat from the peer: node, role, session, generation, epoch, seq, sent_at
    running: bool = True       # False once the heartbeat process has stopped or failed


_EVENT_TYPES = {cls.__name__: cls for cls in (LinkUp, LinkDown, PeerLost, PeerBack, PeerBeat)}
_BEAT_FIELDS = ("node", "role", "session", "generation", "epoch", "seq", "sent_at")


# ----------------------------------------------------------- daemon-side API


class Heartbeat:
    """The daemon's handle on its heartbeat process (use from one asyncio loop)."""

    def __init__(self, cfg: HeartbeatConfig):
        self.cfg = cfg
        self._state = ("", "", 0, 0)               # role, session, generation, epoch
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ctl = None                           # our end of the control pipe (write)
        self._ev = None                            # our end of the event pipe (read)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctl_pending: collections.deque = collections.deque()
        self._ctl_retry: asyncio.TimerHandle | None = None
        self._events: collections.deque = collections.deque(maxlen=10_000)
        self._wakeup: asyncio.Event | None = None
        self._ready: asyncio.Future | None = None
        self._stopping = False
        self._closed = False
        self._failure: str | None = None
        self._links = [{"link": lk.name, "up": False, "last_rx": None, "rtt_ms": None,
                        "rejected": 0} for lk in cfg.links]
        self._alive = False
        self._last_beat: dict | None = None
        self._jitter: dict = {}
        self._start_mono = time.monotonic()

    # -- lifecycle

    async def start(self) -> None:
        if self._proc is not None:
            raise HeartbeatError("heartbeat already started")
        load_keys(self.cfg)   # a clear error here, before any process exists
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._ready = self._loop.create_future()
        ctx = multiprocessing.get_context("spawn")
        ctl_r, ctl_w = ctx.Pipe(duplex=False)
        ev_r, ev_w = ctx.Pipe(duplex=False)
        level = logging.getLogger(LOGGER).getEffectiveLevel()
        self._proc = ctx.Process(
            target=_child_main, name=f"remus-heartbeat-{self.cfg.node}", daemon=True,
            args=(self.cfg, self._state, ctl_r, ev_w, os.getpid(), level))
        self._start_mono = time.monotonic()
        with _main_module_hidden():
            self._proc.start()
        ctl_r.close()
        ev_w.close()
        self._ctl, self._ev = ctl_w, ev_r
        # Writes of small messages to a pipe are atomic: with O_NONBLOCK a send
        # either goes through whole or raises BlockingIOError, so update()
        # never blocks the daemon even if the heartbeat process is stuck.
        os.set_blocking(ctl_w.fileno(), False)
        self._loop.add_reader(ev_r.fileno(), self._pump)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), _START_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._shutdown()
            raise HeartbeatError(f"heartbeat process did not start within {_START_TIMEOUT_S:.0f} s")
        except HeartbeatError:
            await self._shutdown()
            raise
        self._flush_ctl()

    async def stop(self) -> None:
        if self._proc is None or self._closed:
            return
        self._stopping = True
        self._send_ctl(("stop",))
        await self._shutdown()

    async def _shutdown(self) -> None:
        proc = self._proc
        assert proc is not None
        self._stopping = True
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while proc.exitcode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if proc.exitcode is None:
            proc.terminate()
            await asyncio.to_thread(proc.join, 1.0)
        if proc.exitcode is None:
            proc.kill()
            await asyncio.to_thread(proc.join, 1.0)
        self._pump()          # the last log lines
        self._close_pipes()
        self._closed = True
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        if self._wakeup is not None:
            self._wakeup.set()

    def _close_pipes(self) -> None:
        if self._ev is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ev.fileno())
            self._ev.close()
            self._ev = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._ctl_retry is not None:
            self._ctl_retry.cancel()
            self._ctl_retry = None

    # -- what we send

    def update(self, role: str, session: str, generation: int, epoch: int) -> None:
        """What our beats carry from now on. Never blocks."""
        if len(role) > _MAX_TEXT or len(session) > _MAX_TEXT:
            raise ValueError("heartbeat: role and session are limited to 256 characters")
        self._state = (str(role), str(session), int(generation), int(epoch))
        if self._proc is None:
            return     # sent with the start
        if self._ctl_pending and self._ctl_pending[-1][0] == "update":
            self._ctl_pending[-1] = ("update", *self._state)
        else:
            self._ctl_pending.append(("update", *self._state))
        self._flush_ctl()

    def mute_link(self, index: int, muted: bool = True) -> None:
        """Stop (or resume) sending beats on link `index`: a cut, for tests and drills."""
        if not 0 <= index < len(self.cfg.links):
            raise IndexError(f"heartbeat: no link {index}")
        self._send_ctl(("mute", index, bool(muted)))

    def reset_jitter(self) -> None:
        """Start a new jitter window (the next status, within an interval, shows it)."""
        self._send_ctl(("reset-jitter",))

    def _send_ctl(self, msg: tuple) -> None:
        self._ctl_pending.append(msg)
        self._flush_ctl()

    def _flush_ctl(self) -> None:
        while self._ctl_pending and self._ctl is not None:
            try:
                self._ctl.send(self._ctl_pending[0])
            except BlockingIOError:
                if self._ctl_retry is None and self._loop is not None:
                    self._ctl_retry = self._loop.call_later(0.05, self._retry_ctl)
                return
            except OSError:      # the process is gone; the event pipe reports it
                self._ctl_pending.clear()
                return
            self._ctl_pending.popleft()

    def _retry_ctl(self) -> None:
        self._ctl_retry = None
        self._flush_ctl()

    # -- what we learn

    async def events(self) -> AsyncIterator[Event]:
        """LinkUp, LinkDown, PeerLost, PeerBack, PeerBeat, in order.

        Ends after stop(); raises HeartbeatError if the heartbeat process dies.
        """
        assert self._wakeup is not None, "start() first"
        while True:
            self._pump()
            while self._events:
                yield self._events.popleft()
            if self._closed:
                if self._failure:
                    raise HeartbeatError(self._failure)
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def view(self) -> PeerView:
        self._pump()
        now = time.monotonic()
        interval = self.cfg.interval_ms / 1000
        links = []
        for lk in self._links:
            if lk["last_rx"] is None:
                age = None
                missed = int((now - self._start_mono) / interval)
            else:
                age = max(0.0, (now - lk["last_rx"]) * 1000)
                missed = int(age / self.cfg.interval_ms)
            links.append({"link": lk["link"], "up": lk["up"], "last_beat_age_ms": age,
                          "missed": missed, "rtt_ms": lk["rtt_ms"], "rejected": lk["rejected"]})
        return PeerView(links=links, peer_alive=self._alive,
                        last_beat=dict(self._last_beat) if self._last_beat else None,
                        running=self._proc is not None and not self._closed)

    def jitter(self) -> dict:
        """Send-interval deviation from interval_ms, measured in the heartbeat process.

        {"interval_ms", "count" (beats sent), "window" (intervals in the stats),
         "p50_ms", "p99_ms", "max_ms", "late_skips", "receive": {same, for the
         gaps between received beats, all links}}
        """
        self._pump()
        return dict(self._jitter)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- the event pipe

    def _pump(self) -> None:
        conn = self._ev
        if conn is None:
            return
        try:
            while conn.poll():
                self._handle(conn.recv())
        except (EOFError, OSError):
            self._on_eof()

    def _on_eof(self) -> None:
        proc = self._proc
        self._close_pipes()
        if not self._stopping:
            if proc is not None:
                proc.join(0.5)
            self._failure = self._failure or (
                f"heartbeat process exited unexpectedly (exit code "
                f"{proc.exitcode if proc is not None else None})")
            _log.error("heartbeat-failed", reason=self._failure, node=self.cfg.node)
            self._closed = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(HeartbeatError(self._failure or "heartbeat process exited"))
        if self._wakeup is not None:
            self._wakeup.set()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "log":
            _, name, level, text, created, path, lineno, func = msg
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                record = logging.makeLogRecord({
                    "name": name, "levelno": level, "levelname": logging.getLevelName(level),
                    "msg": text, "created": created, "msecs": (created % 1) * 1000,
                    "pathname": path, "filename": os.path.basename(path), "lineno": lineno,
                    "funcName": func, "module": os.path.splitext(os.path.basename(path))[0],
                    "process": self.pid, "processName": self._proc.name if self._proc else ""})
                logger.handle(record)
        elif kind == "event":
            _, name, fields, index, rx = msg
            self._apply(_EVENT_TYPES[name](**fields), index, rx)
        elif kind == "status":
            self._apply_status(msg[1])
        elif kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "error":
            self._failure = msg[1]
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(HeartbeatError(msg[1]))

    def _apply(self, ev: Event, index: int | None, rx: float | None) -> None:
        if isinstance(ev, (LinkUp, LinkDown)) and index is not None:
            self._links[index]["up"] = isinstance(ev, LinkUp)
            if rx is not None:
                self._links[index]["last_rx"] = rx
        elif isinstance(ev, PeerLost):
            self._alive = False
        elif isinstance(ev, (PeerBack, PeerBeat)):
            self._alive = True
            self._last_beat = ev.beat
        self._events.append(ev)
        if self._wakeup is not None:
            self._wakeup.set()

    def _apply_status(self, st: dict) -> None:
        # Events come first and in order, so the status agrees with them; if
        # events were ever dropped (a daemon that stopped reading for a very
        # long time), the differences are replayed as events here.
        for idx, (mine, theirs) in enumerate(zip(self._links, st["links"])):
            if mine["up"] != theirs["up"]:
                ev = LinkUp(mine["link"]) if theirs["up"] else LinkDown(mine["link"], 0)
                self._apply(ev, idx, None)
            mine["last_rx"] = theirs["last_rx"]
            mine["rtt_ms"] = theirs["rtt_ms"]
            mine["rejected"] = theirs["rejected"]
        if st["last_beat"] is not None:
            self._last_beat = st["last_beat"]
        if st["alive"] != self._alive:
            self._apply(PeerBack(st["last_beat"] or {}) if st["alive"] else PeerLost(), None, None)
        self._jitter = st["jitter"]


# ----------------------------------------------------- the heartbeat process


@contextlib.contextmanager
def _main_module_hidden():
    """Start a spawn child without re-importing the daemon's __main__ in it.

    multiprocessing's spawn runs the parent's main script (or `-m` module)
    again in the child: slow (the daemon's imports), and a script without an
    `if __name__ == "__main__"` guard would start itself again. The child needs
    nothing from __main__ (its target and arguments live in importable
    modules), so the main module is hidden while the child is launched.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class _Outbox:
    """Messages to the daemon, sent by a thread so the beat loop never blocks on the pipe."""

    def __init__(self, conn, maxsize: int = 10_000):
        self.conn = conn
        self.q: queue.Queue = queue.Queue(maxsize)
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="heartbeat-outbox", daemon=True)
        self.thread.start()

    def put(self, msg: tuple) -> None:
        try:
            self.q.put_nowait(msg)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except (OSError, EOFError):
                return      # the daemon is gone; the beat loop notices by itself

    def close(self, timeout: float = 1.0) -> None:
        with contextlib.suppress(queue.Full):
            self.q.put(None, timeout=timeout)
        self.thread.join(timeout)


class _Forward(logging.Handler):
    def __init__(self, outbox: _Outbox):
        super().__init__()
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.outbox.put(("log", record.name, record.levelno, record.getMessage(),
                             record.created, record.pathname, record.lineno, record.funcName))
        except Exception:
            self.handleError(record)


class _Limiter:
    """At most one log line per key per period; counts what it held back."""

    def __init__(self, period: float):
        self.period = period
        self.lock = threading.Lock()
        self.last: dict[Any, tuple[float, int]] = {}

    def __call__(self, key: Any) -> int | None:
        """None: hold this one back; else the number held back since the last line."""
        now = time.monotonic()
        with self.lock:
            at, held = self.last.get(key, (-math.inf, 0))
            if now - at < self.period:
                self.last[key] = (at, held + 1)
                return None
            self.last[key] = (now, 0)
            return held


class _Stats:
    """Deviation from a nominal interval, over a sliding window."""

    def __init__(self, window: int):
        self.window: collections.deque = collections.deque()
        self.sorted: list[float] = []
        self.size = window
        self.count = 0

    def add(self, dev_ms: float) -> None:
        self.count += 1
        self.window.append(dev_ms)
        bisect.insort(self.sorted, dev_ms)
        if len(self.window) > self.size:
            old = self.window.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]

    def summary(self) -> dict:
        s, n = self.sorted, len(self.sorted)

        def pct(p: float) -> float | None:
            return round(s[min(n - 1, max(0, math.ceil(p * n) - 1))], 3) if n else None
        return {"window": n, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                "max_ms": round(s[-1], 3) if n else None}


class _LinkState:
    def __init__(self, link: Link):
        self.link = link
        self.name = link.name
        self.pub = None
        self.sub = None
        self.monitors: list = []
        self.up = False
        self.last_rx: float | None = None   # monotonic (system-wide on Linux)
        self.last_seq: int | None = None
        self.rtt_ms: float | None = None
        self.muted = False
        self.rejected = 0


class _Runner:
    def __init__(self, cfg: HeartbeatConfig, state: tuple, ctl, outbox: _Outbox, parent_pid: int):
        self.cfg = cfg
        self.interval = cfg.interval_ms / 1000
        self.expiry = cfg.miss * self.interval
        self.status_every = min(max(self.interval, 0.05), 0.25)
        self.role, self.session, self.generation, self.epoch = state
        self.ctl = ctl
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.links = [_LinkState(lk) for lk in cfg.links]
        self.seq = 0
        self.sent_at: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.send_stats = _Stats(_JITTER_WINDOW)
        self.recv_stats = _Stats(_JITTER_WINDOW)
        self.late_skips = 0
        self.last_send: float | None = None
        self.alive = False
        self.ever_alive = False
        self.last_beat: dict | None = None
        self.beat_key: tuple | None = None
        self.beat_event_at = -math.inf
        self.limit = _Limiter(_REJECT_LOG_PERIOD_S)
        self.ctx = None
        self.auth = None
        self.poller = None
        self.running = True

    # -- logging and messages to the daemon

    def log(self, level: str, event: str, **fields: Any) -> None:
        getattr(_log, level)(event, **fields, node=self.cfg.node)

    def event(self, ev: Event, index: int | None = None) -> None:
        fields = {k: getattr(ev, k) for k in ev.__dataclass_fields__}
        rx = self.links[index].last_rx if index is not None else None
        self.outbox.put(("event", type(ev).__name__, fields, index, rx))

    # -- set-up

    def setup(self) -> None:
        own_public, own_secret, peer_public = load_keys(self.cfg)
        runner = self

        class Zap(ThreadAuthenticator):
            address = ""

            async def handle_zap_message(self, msg: list[bytes]) -> None:
                if len(msg) >= 4:
                    self.address = msg[3].decode("ascii", "replace")
                await super().handle_zap_message(msg)

        class KeyCheck:
            def __init__(self, index: int):
                self.index = index

            def callback(self, domain: str, key: bytes) -> bool:
                if key == peer_public:
                    return True
                runner.rejected(self.index, "unknown peer key", key=key.decode("ascii", "replace"),
                                address=zap.address)
                return False

        self.ctx = zmq.Context()
        zap_log = logging.getLogger(LOGGER + ".zap")
        zap_log.setLevel(logging.WARNING)
        zap = Zap(self.ctx, log=zap_log)
        zap.start()
        self.auth = zap
        self.poller = zmq.Poller()
        for i, st in enumerate(self.links):
            zap.configure_curve_callback(domain=st.name, credentials_provider=KeyCheck(i))
            local, local6 = _endpoint(st.link.local, "local")
            peer, peer6 = _endpoint(st.link.peer, "peer")
            pub = self.ctx.socket(zmq.PUB)
            pub.linger = 0
            pub.sndhwm = 16
            pub.ipv6 = local6
            pub.curve_server = True
            pub.curve_publickey = own_public
            pub.curve_secretkey = own_secret
            pub.zap_domain = st.name.encode()
            mon = pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                         | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            try:
                pub.bind(local)
            except zmq.ZMQError as exc:
                raise HeartbeatError(f"heartbeat link {st.name}: cannot bind {st.link.local}: "
                                     f"{exc}") from exc
            sub = self.ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.rcvhwm = 64
            sub.ipv6 = peer6
            sub.reconnect_ivl = max(10, min(self.cfg.interval_ms, 100))
            sub.reconnect_ivl_max = 1000
            sub.curve_serverkey = peer_public
            sub.curve_publickey = own_public
            sub.curve_secretkey = own_secret
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            smon = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            sub.connect(peer)
            st.pub, st.sub, st.monitors = pub, sub, [(mon, "server"), (smon, "client")]
            self.poller.register(sub, zmq.POLLIN)
            self.poller.register(mon, zmq.POLLIN)
            self.poller.register(smon, zmq.POLLIN)
        self.poller.register(self.ctl.fileno(), zmq.POLLIN)
        self.socket_link = {st.sub: i for i, st in enumerate(self.links)}
        self.monitor_link = {m: (i, side) for i, st in enumerate(self.links) for m, side in st.monitors}

    def close(self) -> None:
        for st in self.links:
            for s in [st.pub, st.sub] + [m for m, _ in st.monitors]:
                if s is not None:
                    with contextlib.suppress(Exception):
                        s.close(linger=0)
        if self.auth is not None:
            with contextlib.suppress(Exception):
                self.auth.stop()
        if self.ctx is not None:
            with contextlib.suppress(Exception):
                self.ctx.destroy(linger=0)     # also any socket a failed set-up left behind

    # -- the loop

    def run(self) -> None:
        now = time.monotonic()
        next_beat = now
        next_status = now
        while self.running:
            now = time.monotonic()
            if now >= next_beat:
                self.send_beats(now)
                next_beat += self.interval
                if next_beat <= now:     # a whole interval late: skip, never burst
                    skipped = int((now - next_beat) / self.interval) + 1
                    self.late_skips += skipped
                    next_beat += skipped * self.interval
            self.check_links(now)
            if now >= next_status:
                self.post_status(now)
                next_status = now + self.status_every
            if os.getppid() != self.parent_pid:
                self.log("warning", "heartbeat-exit", reason="daemon gone")
                return
            deadline = min(next_beat, next_status, self.next_expiry())
            timeout = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            for sock, _ in self.poller.poll(timeout):
                if isinstance(sock, int):
                    self.read_ctl()
                elif sock in self.socket_link:
                    self.read_beats(self.socket_link[sock])
                else:
                    self.read_monitor(sock)

    def read_ctl(self) -> None:
        try:
            while self.ctl.poll():
                msg = self.ctl.recv()
                if msg[0] == "update":
                    _, self.role, self.session, self.generation, self.epoch = msg
                elif msg[0] == "mute":
                    _, index, muted = msg
                    if self.links[index].muted != muted:
                        self.links[index].muted = muted
                        self.log("warning" if muted else "info",
                                 "link-muted" if muted else "link-unmuted",
                                 link=self.links[index].name)
                elif msg[0] == "reset-jitter":
                    self.send_stats = _Stats(_JITTER_WINDOW)
                    self.recv_stats = _Stats(_JITTER_WINDOW)
                    self.late_skips = 0
                elif msg[0] == "stop":
                    self.running = False
                    return
        except (EOFError, OSError):
            self.log("warning", "heartbeat-exit", reason="daemon gone")
            self.running = False

    def send_beats(self, now: float) -> None:
        if self.last_send is not None:
            self.send_stats.add(abs((now - self.last_send) - self.interval) * 1000)
        self.last_send = now
        self.seq += 1
        self.sent_at[self.seq] = now
        while len(self.sent_at) > 256:
            self.sent_at.popitem(last=False)
        beat = {"node": self.cfg.node, "role": self.role, "session": self.session,
                "generation": self.generation, "epoch": self.epoch, "seq": self.seq,
                "sent_at": time.time()}
        for st in self.links:
            if st.muted:
                continue
            if st.last_seq is not None:
                beat["echo"] = st.last_seq
                beat["held_ms"] = round((now - st.last_rx) * 1000, 3)
            else:
                beat.pop("echo", None)
                beat.pop("held_ms", None)
            with contextlib.suppress(zmq.Again):
                st.pub.send(msgpack.packb(beat), zmq.NOBLOCK)

    def read_beats(self, index: int) -> None:
        st = self.links[index]
        while True:
            try:
                data = st.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_beat(index, data)

    def on_beat(self, index: int, data: bytes) -> None:
        st = self.links[index]
        now = time.monotonic()
        beat = None
        if len(data) <= MAX_BEAT_BYTES:
            with contextlib.suppress(Exception):
                beat = msgpack.unpackb(data, raw=False)
        if not _valid_beat(beat):
            self.rejected(index, "malformed beat")
            return
        if beat["node"] != self.cfg.peer_node:
            self.rejected(index, "unexpected node", peer_node=str(beat["node"])[:_MAX_TEXT])
            return
        if st.last_rx is not None and st.up:
            self.recv_stats.add(abs((now - st.last_rx) - self.interval) * 1000)
        st.last_rx = now
        st.last_seq = beat["seq"]
        echo = beat.get("echo")
        held = beat.get("held_ms")
        if isinstance(echo, int) and echo in self.sent_at and isinstance(held, (int, float)):
            st.rtt_ms = round(max(0.0, (now - self.sent_at[echo]) * 1000 - held), 3)
        peer = {k: beat[k] for k in _BEAT_FIELDS}
        self.last_beat = peer
        if not st.up:
            st.up = True
            self.log("info", "link-up", link=st.name)
            self.event(LinkUp(st.name), index)
        key = (peer["role"], peer["session"], peer["generation"])
        if not self.alive:
            self.alive = True
            first = not self.ever_alive
            self.ever_alive = True
            self.log("info", "peer-up" if first else "peer-back", peer_node=peer["node"],
                     role=peer["role"], session=peer["session"], generation=peer["generation"],
                     epoch=peer["epoch"])
            self.event(PeerBack(peer, first))
            self.beat_key, self.beat_event_at = key, now
        elif key != self.beat_key or now - self.beat_event_at >= _PEER_BEAT_PERIOD_S:
            if key != self.beat_key:
                self.log("info", "peer-state", role=peer["role"], session=peer["session"],
                         generation=peer["generation"], epoch=peer["epoch"])
            self.event(PeerBeat(peer))
            self.beat_key, self.beat_event_at = key, now

    def next_expiry(self) -> float:
        return min((st.last_rx + self.expiry for st in self.links if st.up), default=math.inf)

    def check_links(self, now: float) -> None:
        for i, st in enumerate(self.links):
            if st.up and now - st.last_rx >= self.expiry:
                st.up = False
                missed = max(self.cfg.miss, int((now - st.last_rx) / self.interval + 1e-9))
                self.log("warning", "beat-lost", link=st.name, missed=missed)
                self.event(LinkDown(st.name, missed), i)
        if self.alive and not any(st.up for st in self.links):
            self.alive = False
            silent = (now - max(st.last_rx for st in self.links if st.last_rx is not None)) * 1000
            self.log("warning", "peer-lost", silent_ms=silent, links=len(self.links))
            self.event(PeerLost(round(silent, 3)))

    def rejected(self, index: int, reason: str, **fields: Any) -> None:
        # Runs in the beat loop or in the ZAP thread.
        st = self.links[index]
        st.rejected += 1
        held = self.limit((index, reason))
        if held is not None:
            if held:
                fields["repeated"] = held
            self.log("warning", "peer-rejected", link=st.name, reason=reason, **fields)

    def read_monitor(self, sock) -> None:
        index, side = self.monitor_link[sock]
        while True:
            try:
                msg = recv_monitor_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            ev, value = msg["event"], msg["value"]
            error = _handshake_error(ev, value)
            if side == "server":
                # a client that does not use our public key (or does not speak CURVE)
                self.rejected(index, "handshake failed", error=error)
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.log_limited(index, "link-auth-failed", reason="the peer refused our key",
                                 status=value)
            else:
                self.log_limited(index, "link-handshake-failed",
                                 reason="the peer does not hold the configured peer key",
                                 error=error)

    def log_limited(self, index: int, event: str, **fields: Any) -> None:
        held = self.limit((index, event))
        if held is not None:
            if held:
                fields["repeated"] = held
            self.log("warning", event, link=self.links[index].name, **fields)

    def post_status(self, now: float) -> None:
        jitter = {"interval_ms": self.cfg.interval_ms, "count": self.seq,
                  "late_skips": self.late_skips, **self.send_stats.summary(),
                  "receive": {"count": self.recv_stats.count, **self.recv_stats.summary()},
                  "dropped_messages": self.outbox.dropped}
        self.outbox.put(("status", {
            "at": now, "alive": self.alive, "last_beat": self.last_beat, "jitter": jitter,
            "links": [{"up": st.up, "last_rx": st.last_rx, "rtt_ms": st.rtt_ms,
                       "rejected": st.rejected, "muted": st.muted} for st in self.links]}))


def _handshake_error(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        for name in dir(zmq):
            if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
                return name[len("PROTOCOL_ERROR_"):].lower()
        return f"protocol error {value:#x}"
    return zmq.strerror(value) if value else "no detail"


def _valid_beat(beat: Any) -> bool:
    if not isinstance(beat, dict):
        return False
    types = {"node": str, "role": str, "session": str, "generation": int, "epoch": int,
             "seq": int, "sent_at": (int, float)}
    return all(isinstance(beat.get(k), t) and not isinstance(beat.get(k), bool)
               for k, t in types.items())


def _child_main(cfg: HeartbeatConfig, state: tuple, ctl, out, parent_pid: int, level: int) -> None:
    # The daemon handles Ctrl-C and stops us through the control pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Before any thread exists, so the outbox, ZAP and zmq I/O threads inherit it.
    sched = "normal"
    if cfg.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(_RT_PRIORITY))
            sched = f"rr:{_RT_PRIORITY}"
        except (OSError, AttributeError) as exc:
            sched = f"normal ({exc})"
    outbox = _Outbox(out)
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [_Forward(outbox)]
    logger.setLevel(level)
    logger.propagate = False
    runner = _Runner(cfg, state, ctl, outbox, parent_pid)
    code = 0
    try:
        try:
            runner.setup()
        except HeartbeatError as exc:
            outbox.put(("error", str(exc)))
            code = 1
            return
        except Exception as exc:
            outbox.put(("error", f"heartbeat set-up failed: {type(exc).__name__}: {exc}"))
            code = 1
            return
        outbox.put(("ready", {"pid": os.getpid()}))
        runner.log("info", "heartbeat-started", links=len(cfg.links), interval_ms=cfg.interval_ms,
                   miss=cfg.miss, peer_node=cfg.peer_node, pid=os.getpid(), sched=sched)
        gc.collect()
        gc.freeze()      # nothing long-lived left for the collector to walk at each beat
        runner.run()
        runner.post_status(time.monotonic())
        runner.log("info", "heartbeat-stopped", beats=runner.seq)
    finally:
        runner.close()
        outbox.close()
        ctl.close()
        out.close()
        sys.exit(code)


# ------------------------------------------------------------------- keys


def generate_keys(directory: Path, nodes: list[str], force: bool = False) -> list[tuple[Path, Path]]:
    """CURVE key pairs NAME.key (public, 0644) and NAME.key_secret (0600) in `directory`."""
    directory = Path(directory).absolute()
    for name in nodes:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad node name {name!r}")
        if not force:
            for suffix in (".key", ".key_secret"):
                if (directory / f"{name}{suffix}").exists():
                    raise FileExistsError(f"{directory / (name + suffix)} exists (use --force to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    old = os.umask(0o077)      # the secret file is never readable by others, not even briefly
    try:
        for name in nodes:
            for suffix in (".key", ".key_secret"):
                with contextlib.suppress(FileNotFoundError):
                    (directory / f"{name}{suffix}").unlink()
            public, secret = zmq.auth.create_certificates(directory, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            made.append((Path(public), Path(secret)))
    finally:
        os.umask(old)
    return made
