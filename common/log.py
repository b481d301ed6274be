"""One line per event, logfmt-style (`event key=value ...`), to stderr for journald."""
from __future__ import annotations

import logging
import sys


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
