"""The primary's acks: an ack the reader takes before the sender awaits it still
counts (no QEMU; the stream is a StreamReader and a stand-in writer)."""
from __future__ import annotations

import asyncio

import pytest

from remus.common.protocol import PROTOCOL_VERSION
from remus.common.wire import encode_frame
from remus.primary.replicator import Replicator, SessionLost

SESSION = "0123456789abcdef0123456789abcdef"


class Writer:
    def __init__(self):
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        pass


@pytest.fixture
def replicator(tmp_path):
    from remus.common.config import load
    path = tmp_path / "g.toml"
    path.write_text('[guest]\nname = "g"\nkernel = "k"\n[primary]\naddress = "127.0.0.1"\n'
                    '[backup]\naddress = "127.0.0.1:1"\n[tls]\ninsecure = true\n')
    rep = Replicator(load(path), None, None, None, None, generation=1, tls_context=None)
    yield rep
    rep.close()


def _ready(rep: Replicator):
    proto = rep.protocol(SESSION)
    proto.receive(encode_frame({"t": "welcome", "version": PROTOCOL_VERSION,
                                "session": SESSION, "generation": 1}))
    rep._writer = Writer()
    return proto


def _backup_says(*frames: dict) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for frame in frames:
        reader.feed_data(encode_frame(frame))
    reader.feed_eof()
    return reader


def test_acks_that_arrive_before_they_are_awaited_still_count(replicator):
    """Pipelined, the acks of epochs 1 and 2 may both be in before the commit of 1
    awaits its own; while the last frames drain, even stop-and-wait can see it."""
    async def run():
        proto = _ready(replicator)
        for epoch in (1, 2):
            await replicator._send(proto, epoch, iter([b"checkpoint %d" % epoch]), 0)
        await replicator._read_acks(_backup_says({"t": "ack", "epoch": 1},
                                                 {"t": "ack", "epoch": 2}), proto)
        return [await replicator._await_ack(epoch) for epoch in (1, 2)]
    first, second = asyncio.run(run())
    assert 0 < first <= second


def test_an_ack_never_sent_is_a_lost_session_not_a_crash(replicator):
    async def run():
        proto = _ready(replicator)
        await replicator._send(proto, 1, iter([b"checkpoint"]), 0)
        await replicator._read_acks(_backup_says(), proto)  # EOF: the backup is gone
        await replicator._await_ack(1)
    with pytest.raises(SessionLost, match="backup closed the stream"):
        asyncio.run(run())
