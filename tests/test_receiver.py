"""The backup's stream port (Receiver) over plain TCP on 127.0.0.1, without QEMU:
what an unauthenticated peer can make it do before a session exists."""
from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

from remus.backup import receiver as receiver_mod
from remus.backup.failover import FailoverJudge
from remus.backup.receiver import Receiver
from remus.common.config import parse
from remus.common.protocol import CheckpointEncoder

SESSION = "0123456789abcdef0123456789abcdef"


def _receiver(tmp_path) -> Receiver:
    cfg = parse({"guest": {"name": "g", "kernel": "/k", "memory_mib": 16},
                 "primary": {"address": "127.0.0.1", "state_dir": str(tmp_path / "p")},
                 "backup": {"address": "127.0.0.1:1", "state_dir": str(tmp_path / "b")},
                 "tls": {"insecure": True}},
                tmp_path / "g.toml")
    replica = SimpleNamespace(state=SimpleNamespace(generation=0, epoch=0), dir=tmp_path)
    return Receiver(cfg, replica, FailoverJudge(heartbeat=False, grace_s=1.0))


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (reads all it sends)."""
    start = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), limit):
        pass
    return time.monotonic() - start


def test_a_trickled_hello_is_cut_off_at_the_handshake_deadline(tmp_path, monkeypatch):
    """One byte of a hello every 0.1 s: each read is well inside any per-read timeout,
    but the whole handshake is not; the deadline counts from the accept."""
    monkeypatch.setattr(receiver_mod, "HANDSHAKE_TIMEOUT", 1.0)
    rec = _receiver(tmp_path)
    hello = CheckpointEncoder(4096).hello(rec.fingerprint, SESSION, 16 << 20)

    async def scenario():
        server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = asyncio.create_task(_closed_after(reader, 5.0))
        try:
            for i in range(len(hello) - 1):
                if closed.done():
                    break
                writer.write(hello[i:i + 1])
                await asyncio.sleep(0.1)
            return await closed
        finally:
            writer.close()
            server.close()
            rec._replica_io.shutdown(wait=False)

    took = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert 0.8 <= took <= 3.0, took
    assert rec.current is None


@pytest.mark.parametrize("announce", [64 << 20, 1 << 20])
def test_a_big_first_frame_is_refused_before_its_payload(tmp_path, announce):
    """A frame announcing a big payload is answered with a reject and closed as soon
    as its header is in, although its payload never comes."""
    rec = _receiver(tmp_path)
    packed = CheckpointEncoder(4096).hello(rec.fingerprint, SESSION, 16 << 20)
    head = announce.to_bytes(4, "big")
    frame = packed[:4] + head + packed[8:]

    async def scenario():
        server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(frame)
            start = time.monotonic()
            reply = await asyncio.wait_for(reader.read(65536), 5)
            rest = await asyncio.wait_for(reader.read(65536), 5)
            return reply, rest, time.monotonic() - start
        finally:
            writer.close()
            server.close()
            rec._replica_io.shutdown(wait=False)

    reply, rest, took = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert b"reject" in reply and b"payload" in reply
    assert rest == b"" and took < 2.0


def test_a_flood_of_bad_peers_logs_a_few_lines_and_a_count(tmp_path, monkeypatch, caplog):
    """Fifty connections that each send garbage: the first few are logged with their
    reason, the rest only counted, in one summary line once the interval is over."""
    monkeypatch.setattr(receiver_mod, "LOG_BURST", 3, raising=False)
    monkeypatch.setattr(receiver_mod, "LOG_INTERVAL_S", 0.5, raising=False)
    caplog.set_level(logging.INFO, logger="remus.backup")
    rec = _receiver(tmp_path)

    async def scenario():
        server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for _ in range(50):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await _closed_after(reader, 5.0)
                writer.close()
            await asyncio.sleep(0.7)  # the interval is over: the summary is due
        finally:
            server.close()
            rec._replica_io.shutdown(wait=False)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    lines = [r.getMessage() for r in caplog.records if "stream-rejected" in r.getMessage()]
    assert len(lines) == 4, lines
    assert lines[-1].startswith("stream-rejected peer=127.0.0.1 suppressed=47 ")
    assert "suppressed 47 similar events in the last" in lines[-1]
