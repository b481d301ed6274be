"""One line per event, logfmt-style (`event key=value ...`), to stderr for journald."""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable


def _fmt_value(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:.3f}"
    else:
        text = str(value)
    if not text or any(c in text for c in ' "=\t\n'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class EventLogger:
    """`log.info("checkpoint", epoch=3, pause_ms=12.1)` -> `checkpoint epoch=3 pause_ms=12.100`."""

    def __init__(self, name: str):
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, fields: dict) -> None:
        if self._log.isEnabledFor(level):
            parts = [event] + [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
            self._log.log(level, " ".join(parts))

    def debug(self, event: str, **fields: object) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self._emit(logging.ERROR, event, fields)


@dataclass
class _Window:
    start: float
    level: str = "info"
    logged: int = 0
    suppressed: int = 0


def _call_later(delay: float, fn: Callable[[], None]) -> None:
    """Run `fn` after `delay` s on the running event loop; without one, never (the
    summary then comes with the next event of its kind)."""
    try:
        asyncio.get_running_loop().call_later(delay, fn)
    except RuntimeError:
        pass


class RateLimited:
    """Lines that a peer can provoke at will (failed handshakes, refused connections),
    kept from flooding the journal: per event and source, the first `burst` of each
    `interval` seconds are logged; the rest are counted, and one summary line of the
    same event says how many (`suppressed=K seconds=X detail="suppressed K similar
    events in the last X s"`) when the interval is over: at the next such event, or
    from a timer on the running event loop. Sources past `max_sources` at once share
    one window ("other")."""

    def __init__(self, logger: EventLogger, burst: int = 5, interval: float = 60.0,
                 source_field: str = "peer", max_sources: int = 256,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], None] = _call_later):
        if burst < 1 or interval <= 0:
            raise ValueError("burst must be >= 1 and interval > 0")
        self._log = logger
        self.burst, self.interval = burst, interval
        self.source_field = source_field
        self.max_sources = max_sources
        self._clock, self._schedule = clock, schedule
        self._windows: dict[tuple[str, str], _Window] = {}

    def error(self, event: str, source: str, **fields: object) -> bool:
        return self.log("error", event, source, **fields)

    def warning(self, event: str, source: str, **fields: object) -> bool:
        return self.log("warning", event, source, **fields)

    def info(self, event: str, source: str, **fields: object) -> bool:
        return self.log("info", event, source, **fields)

    def log(self, level: str, event: str, source: str, **fields: object) -> bool:
        """Log `event` with `fields` unless its window is spent; True if logged.
        `source` says who caused it (e.g. the peer's IP address, without the port)."""
        now = self._clock()
        window = self._window(event, str(source), now)
        if window.logged < self.burst:
            window.logged += 1
            getattr(self._log, level)(event, **fields)
            return True
        window.suppressed += 1
        window.level = level
        if window.suppressed == 1:
            self._schedule(window.start + self.interval - now + 0.01, self.flush)
        return False

    def flush(self) -> None:
        """Summarise and forget every window whose interval is over."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._close(key, now)

    def _window(self, event: str, source: str, now: float) -> _Window:
        key = (event, source)
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval:
            self._close(key, now)
            window = None
        if window is None and len(self._windows) >= self.max_sources:
            self.flush()
            if len(self._windows) >= self.max_sources:
                key = (event, "other")  # too many sources at once: they share a window
                window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(now)
        return window

    def _close(self, key: tuple[str, str], now: float) -> None:
        window = self._windows.pop(key)
        if window.suppressed:
            seconds = round(now - window.start, 1)
            getattr(self._log, window.level)(
                key[0], **{self.source_field: key[1]}, suppressed=window.suppressed,
                seconds=seconds, detail=f"suppressed {window.suppressed} similar events "
                                        f"in the last {seconds:g} s")


def setup(role: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s.%(msecs)03d {role} %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # qemu.qmp logs every message at DEBUG; keep it out of our event stream.
    logging.getLogger("qemu").setLevel(logging.WARNING)


def get(name: str) -> EventLogger:
    return EventLogger(name)
