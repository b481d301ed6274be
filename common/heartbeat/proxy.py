"""Heartbeat: the daemon's handle on its heartbeat process.

The beats are sent and watched by a process of their own (multiprocessing,
"spawn" start method), so nothing the daemon does (a long pause, a big copy,
garbage collection, a busy event loop holding the GIL) can delay a beat or a
loss detection. The daemon talks to it through two pipes:

    daemon (asyncio)                      heartbeat process
    Heartbeat.update()/mute_link()/stop  --ctl pipe-->  beat loop (zmq.Poller)
    Heartbeat.events()/view()/jitter()   <--event pipe--  outbox thread
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import sys
import time
import types
from typing import AsyncIterator

from remus.common import log
from remus.common.heartbeat.child import child_main
from remus.common.heartbeat.events import (EVENT_TYPES, Event, LinkDown, LinkUp, PeerBack, PeerBeat,
                                           PeerLost, PeerView)
from remus.common.heartbeat.keys import load_keys
from remus.common.heartbeat.settings import LOGGER, MAX_TEXT, HeartbeatConfig, HeartbeatError

_log = log.get(LOGGER)

_START_TIMEOUT_S = 30.0        # spawn + import on a loaded machine
_STOP_TIMEOUT_S = 3.0


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
            target=child_main, name=f"remus-heartbeat-{self.cfg.node}", daemon=True,
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
        if len(role) > MAX_TEXT or len(session) > MAX_TEXT:
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
            self._apply(EVENT_TYPES[name](**fields), index, rx)
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
