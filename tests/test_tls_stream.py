"""The checkpoint stream over TLS with real daemons: peers that are not the primary
are refused at the TLS layer, the backup says why, and the real session and its
replica are untouched."""
import re
import socket
import ssl
import time
from pathlib import Path

import pytest

from remus.common import tls
from remus.common.protocol import CheckpointEncoder

pytestmark = pytest.mark.integration

ACTIVATING = re.compile(r"\bWARNING activating ")


def _client_context(cert_dir: Path | None = None, node: str = "") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker does not care who the backup is
    if cert_dir is not None:
        ctx.load_cert_chain(cert_dir / f"{node}.crt", cert_dir / f"{node}.tls.key")
    return ctx


def _try_session(pair, ctx: ssl.SSLContext | None) -> bytes:
    """Connect, send a hello as a primary would, read whatever comes back until the
    backup closes. Returns the bytes received (must be none: nothing got through)."""
    hello = CheckpointEncoder(4096).hello("0" * 32, "ab" * 16, 128 << 20)
    got = b""
    raw = socket.create_connection(("127.0.0.1", pair.stream_port), 5)
    raw.settimeout(15)
    try:
        s = raw if ctx is None else ctx.wrap_socket(raw, server_hostname="backup")
        s.sendall(hello if ctx is not None else b"\x00\x00\x00\x10\xff\xff\xff\xffGET / HTTP/1.0\r\n\r\n" * 4)
        while data := s.recv(4096):
            got += data
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass  # the refusal, as an alert or a reset
    finally:
        raw.close()
    return got


def test_peers_without_the_primarys_certificate_are_refused(make_pair, tmp_path):
    pair = make_pair(interval_ms=100)
    pair.start_backup()
    pair.start_primary()
    pair.primary.wait_for(r"protecting epoch=\d+", 60)
    assert re.search(r"backup-start .*stream=tls", pair.backup.log())
    before = pair.committed_after(0)

    other_ca = tmp_path / "other-ca"
    tls.generate(other_ca, ["primary"])     # a "primary" certificate from another CA
    tls.generate(pair.keys, ["mallory"])    # our CA, but another node

    cases = [
        ("plain TCP", None, r"tls-handshake-failed .*reason=\"not a TLS 1.3 client hello"),
        ("no client certificate", _client_context(),
         r"tls-handshake-failed .*reason=\"the peer presented no certificate"),
        ("another CA", _client_context(other_ca, "primary"),
         r"tls-handshake-failed .*reason=\"the peer's certificate is not from our CA"),
        ("another node", _client_context(pair.keys, "mallory"),
         r"stream-refused .*reason=\"the peer's certificate names 'mallory', not 'primary'"),
    ]
    for what, ctx, logged in cases:
        start = len(pair.backup.log())
        assert _try_session(pair, ctx) == b"", f"{what}: the backup answered"
        pair.backup.wait_for(logged, 15, start)

    # The real session carried on, untouched: same session, epochs still advancing.
    after = pair.committed_after(time.time())
    assert after["session"] == before["session"]
    assert after["epoch"] > before["epoch"]
    log = pair.backup.log()
    assert not ACTIVATING.search(log)
    assert len(re.findall(r"session-start ", log)) == 1, "a refused peer opened a session"
    assert pair.primary.proc.poll() is None and pair.backup.proc.poll() is None


def test_primary_refuses_a_backup_of_another_ca(make_pair, tmp_path):
    """The primary's side: a backup whose certificate is not from our CA is refused with
    the reason, and the guest runs on unprotected."""
    pair = make_pair(interval_ms=100)
    impostor = tmp_path / "impostor"
    tls.generate(impostor, ["backup", "primary"])
    pair.write_config({"tls": {"dir": str(impostor)}})
    pair.start_backup()
    pair.write_config()  # the primary reads the genuine material
    pair.start_primary()
    pair.primary.wait_for(r"backup-refused reason=\"TLS handshake with the backup failed: "
                          r"the peer's certificate is not from our CA", 60)
    pair.backup.wait_for(r"tls-handshake-failed", 15)
    assert "session-start" not in pair.backup.log()
    assert not pair.replica_record().get("session")
