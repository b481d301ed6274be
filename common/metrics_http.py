"""The HTTP server behind a daemon's metrics endpoint: GET /metrics, with bounds.

prometheus_client's start_http_server gives each connection a thread of its
own and no timeout, so every idle connection holds a thread for good. This
server is one asyncio loop on one thread of its own (the daemon's loop never
waits for it, nor it for the daemon's loop):

- at most `max_connections` at once. A connection past that evicts the oldest
  one still waiting for its request (idle or slow), so a scrape gets through a
  flood of idle connections; if every slot is busy answering, the newcomer is
  closed at once;
- each connection has `timeout_s` in all to send its request (line and
  headers, at most MAX_REQUEST bytes) and take the reply; one request per
  connection (Connection: close).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Callable

from remus.common import log

_log = log.get("remus.metrics")

MAX_REQUEST = 8192
BACKLOG = 1024  # a burst of connections waits for accept rather than retrying its SYN
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATHS = ("/metrics", "/")


class MetricsServer:
    def __init__(self, render: Callable[[], bytes], host: str, port: int,
                 max_connections: int, timeout_s: float):
        """`render()`: the body of a scrape, called on the server's thread."""
        self.render = render
        self.host, self.port = host, port
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self._open: set[asyncio.Transport] = set()
        self._waiting: dict[asyncio.Transport, None] = {}  # no request yet, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()  # the server is up (or failed to come up)
        self._thread: threading.Thread | None = None
        self._limited = log.RateLimited(_log, burst=1, interval=60.0, source_field="endpoint")

    @property
    def connections(self) -> int:
        return len(self._open)

    def start(self) -> None:
        """Bind (an OSError here, in the caller's thread, if that fails), then serve
        from a thread of its own."""
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((self.host, self.port), family=family, backlog=BACKLOG)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(sock),),
                                        name="metrics", daemon=True)
        self._thread.start()

    async def _main(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST,
                                                backlog=BACKLOG)
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for transport in list(self._open):
                transport.abort()

    def close(self) -> None:
        """Stop serving and close every connection (waits up to 5 s for the thread)."""
        if self._thread is None:
            return
        if self._ready.wait(5) and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        self._thread = None

    def _admit(self, transport: asyncio.Transport) -> bool:
        if len(self._open) >= self.max_connections:
            if not self._waiting:
                return False
            oldest = next(iter(self._waiting))
            self._drop(oldest)
            oldest.abort()
        self._open.add(transport)
        self._waiting[transport] = None
        return True

    def _drop(self, transport: asyncio.Transport) -> None:
        self._open.discard(transport)
        self._waiting.pop(transport, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        if not self._admit(transport):
            transport.abort()
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                self._waiting.pop(transport, None)  # busy answering: not evicted
                writer.write(self._reply(head))
                writer.close()  # once the reply is out
                await writer.wait_closed()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, OSError):
            pass
        finally:
            self._drop(transport)
            transport.abort()  # still open: timed out, or the request was bad

    def _reply(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "Bad Request", b"bad request\n")
        method, path = parts[0], parts[1].split("?", 1)[0]
        if path not in PATHS:
            return _response(404, "Not Found", b"metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", b"GET only\n", "Allow: GET, HEAD\r\n")
        try:
            body = self.render()
        except Exception as exc:  # noqa: BLE001 - a collector's bug must not end the server
            self._limited.error("metrics-failed", f"{self.host}:{self.port}", error=repr(exc))
            return _response(500, "Internal Server Error", b"collecting the metrics failed\n")
        return _response(200, "OK", body, head_only=method == "HEAD")


def _response(code: int, reason: str, body: bytes, extra: str = "",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else body)
