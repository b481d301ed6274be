"""The heartbeat process's way to the daemon: the event pipe, fed by a thread
(Outbox), which carries the process's log records too (LogForward)."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading


class Outbox:
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


class LogForward(logging.Handler):
    """The heartbeat process's log records, handed to the daemon to log as its own."""

    def __init__(self, outbox: Outbox):
        super().__init__()
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.outbox.put(("log", record.name, record.levelno, record.getMessage(),
                             record.created, record.pathname, record.lineno, record.funcName))
        except Exception:
            self.handleError(record)
