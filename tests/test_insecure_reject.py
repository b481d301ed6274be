"""The primary's handshake over plain TCP: a reject claiming a newer generation makes
it retry, not stand down and stop its guest (no QEMU; the stream is a StreamReader)."""
from __future__ import annotations

import asyncio
import ssl

import pytest

from remus.common.protocol import PrimaryProtocol
from remus.common.wire import encode_frame
from remus.primary.replicator import BackupRefused, Replicator, Superseded

SESSION = "0123456789abcdef0123456789abcdef"


def _handshake(rep: Replicator, proto: PrimaryProtocol, claimed: int):
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame({"t": "reject", "reason": "stale primary: ...",
                                       "generation": claimed}))
        reader.feed_eof()
        return await rep._handshake(reader, proto)
    return asyncio.run(run())


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from remus.common.config import load
    path = tmp_path_factory.mktemp("cfg") / "g.toml"
    path.write_text('[guest]\nname = "g"\nkernel = "k"\n[primary]\naddress = "127.0.0.1"\n'
                    '[backup]\naddress = "127.0.0.1:1"\n[tls]\ninsecure = true\n')
    return load(path)


def _replicator(config, tls_context) -> Replicator:
    return Replicator(config, None, None, None, None, generation=1, tls_context=tls_context)


def test_an_unauthenticated_reject_with_a_newer_generation_is_only_a_refusal(config):
    rep = _replicator(config, None)
    try:
        with pytest.raises(BackupRefused, match="only the heartbeat may"):
            _handshake(rep, PrimaryProtocol(SESSION), claimed=7)
    finally:
        rep.close()


@pytest.mark.parametrize("tls, superseded", [(False, False), (True, True)])
def test_the_replicators_protocol_trusts_the_backup_only_over_tls(config, tls, superseded):
    rep = _replicator(config, ssl.create_default_context() if tls else None)
    try:
        expected = Superseded if superseded else BackupRefused
        with pytest.raises(expected):
            _handshake(rep, rep.protocol(SESSION), claimed=7)
        with pytest.raises(BackupRefused):  # not newer: a refusal either way
            _handshake(rep, rep.protocol(SESSION), claimed=1)
    finally:
        rep.close()
