"""The beat loop of the heartbeat process (Runner).

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
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import math
import os
import threading
import time
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from remus.common import log
from remus.common.heartbeat.auth import KeyCheck, Zap
from remus.common.heartbeat.events import Event, LinkDown, LinkUp, PeerBack, PeerBeat, PeerLost
from remus.common.heartbeat.keys import load_keys
from remus.common.heartbeat.outbox import Outbox
from remus.common.heartbeat.settings import (LOGGER, MAX_TEXT, HeartbeatConfig, HeartbeatError,
                                             Link, endpoint)
from remus.common.wire import ProtocolError, unpack_map

_log = log.get(LOGGER)

MAX_BEAT_BYTES = 4096          # a beat is ~150 bytes; anything much larger is not one
_JITTER_WINDOW = 1000          # send intervals kept for the percentiles
_REJECT_LOG_PERIOD_S = 10.0    # a refused peer reconnects all the time: one line per period
_PEER_BEAT_PERIOD_S = 1.0      # PeerBeat at most this often unless role/session/generation change
_BEAT_DEPTH = 2                # a beat is a map of scalars; one level to spare
_BEAT_FIELDS = ("node", "role", "session", "generation", "epoch", "seq", "sent_at")


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


class Runner:
    def __init__(self, cfg: HeartbeatConfig, state: tuple, ctl, outbox: Outbox, parent_pid: int):
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
        self.ctx = zmq.Context()
        zap_log = logging.getLogger(LOGGER + ".zap")
        zap_log.setLevel(logging.WARNING)
        zap = Zap(self.ctx, log=zap_log)
        zap.start()
        self.auth = zap
        self.poller = zmq.Poller()
        for i, st in enumerate(self.links):
            zap.configure_curve_callback(domain=st.name, credentials_provider=KeyCheck(
                i, peer_public, zap, self.rejected))
            self.open_link(st, own_public, own_secret, peer_public)
        self.poller.register(self.ctl.fileno(), zmq.POLLIN)
        self.socket_link = {st.sub: i for i, st in enumerate(self.links)}
        self.monitor_link = {m: (i, side) for i, st in enumerate(self.links) for m, side in st.monitors}

    def open_link(self, st: _LinkState, own_public: bytes, own_secret: bytes,
                  peer_public: bytes) -> None:
        """Bind the link's PUB (a CURVE server), connect its SUB (a CURVE client) to the
        peer's PUB, and watch both for failed handshakes."""
        local, local6 = endpoint(st.link.local, "local")
        peer, peer6 = endpoint(st.link.peer, "peer")
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
        beat = decode_beat(data)
        if not _valid_beat(beat):
            self.rejected(index, "malformed beat")
            return
        if beat["node"] != self.cfg.peer_node:
            self.rejected(index, "unexpected node", peer_node=str(beat["node"])[:MAX_TEXT])
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


def decode_beat(data: bytes) -> dict | None:
    """The map a beat carries, or None if it is not one: too long, not msgpack, not a
    map, or nesting lists or maps (a beat is flat: a deep one is never ours)."""
    if len(data) > MAX_BEAT_BYTES:
        return None
    try:
        return unpack_map(data, "beat", max_depth=_BEAT_DEPTH)
    except ProtocolError:
        return None


def _valid_beat(beat: Any) -> bool:
    if not isinstance(beat, dict):
        return False
    types = {"node": str, "role": str, "session": str, "generation": int, "epoch": int,
             "seq": int, "sent_at": (int, float)}
    return all(isinstance(beat.get(k), t) and not isinstance(beat.get(k), bool)
               for k, t in types.items())
