"""TLS material, contexts and peer checks for the checkpoint stream (no daemons)."""
import asyncio
import datetime
import shutil
import ssl
import stat
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from remus.common import ctl, tls
from remus.common.config import ConfigError, load
from remus.primary.replicator import BackupRefused, Replicator


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    tls.generate(d, ["primary", "backup", "mallory"])
    return d


def copy_of(keys: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(keys, d)
    return d


# ------------------------------------------------------------------ generation


def test_generate_makes_a_ca_and_node_certificates(keys):
    for name in ("ca.crt", "primary.crt", "backup.crt"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o644
    for name in ("ca.key", "primary.tls.key", "backup.tls.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name
    ca = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for node in ("primary", "backup"):
        cert = x509.load_pem_x509_certificate((keys / f"{node}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert tls._names_of_x509(cert) == [node]
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert life > datetime.timedelta(days=3650)
        tls.check_files(tls.node_files(keys, node), node)


def test_generate_keeps_existing_files_unless_forced(tmp_path):
    d = tmp_path / "k"
    tls.generate(d, ["primary", "backup"])
    before = (d / "primary.crt").read_bytes()
    with pytest.raises(FileExistsError, match="primary.crt exists .*--force"):
        tls.generate(d, ["primary"])
    assert (d / "primary.crt").read_bytes() == before
    ca = (d / "ca.crt").read_bytes()
    tls.generate(d, ["extra"])                      # a new node: the CA is reused
    assert (d / "ca.crt").read_bytes() == ca
    tls.check_files(tls.node_files(d, "extra"), "extra")
    tls.generate(d, ["primary", "backup"], force=True)
    assert (d / "primary.crt").read_bytes() != before
    assert (d / "ca.crt").read_bytes() != ca        # force makes a new CA
    with pytest.raises(ValueError, match="bad node name"):
        tls.generate(d, ["../x"])


def test_remusctl_keys_generate_makes_both_kinds_and_refuses_before_writing(tmp_path, capsys):
    d = tmp_path / "keys"
    assert ctl.main(["keys", "generate", "--dir", str(d), "--node", "primary", "--node", "backup"]) == 0
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["ca.crt", "ca.key", "primary.crt", "primary.tls.key", "backup.crt",
                            "backup.tls.key", "primary.key", "primary.key_secret", "backup.key",
                            "backup.key_secret"])
    assert "tls:" in capsys.readouterr().out
    # A node whose TLS certificate exists: refused before its heartbeat keys are written.
    (d / "third.crt").write_text("placeholder")
    assert ctl.main(["keys", "generate", "--dir", str(d), "--node", "third"]) == 1
    assert "third.crt exists" in capsys.readouterr().err
    assert not (d / "third.key").exists()
    text = ctl.build_parser()._subparsers._group_actions[0].choices["keys"] \
        ._subparsers._group_actions[0].choices["generate"].format_help()
    assert "ca.crt" in text and "tls.key" in text


# -------------------------------------------------------------------- contexts


def test_contexts_require_tls13_and_a_peer_certificate(keys):
    for ctx in (tls.server_context(keys, "backup"), tls.client_context(keys, "primary")):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname


def test_missing_or_mismatched_files_are_named(keys, tmp_path):
    d = copy_of(keys, tmp_path)
    (d / "backup.tls.key").unlink()
    with pytest.raises(tls.TlsError, match=r"backup.tls.key does not exist .*remusctl keys generate"):
        tls.server_context(d, "backup")
    shutil.copy(d / "primary.tls.key", d / "backup.tls.key")
    with pytest.raises(tls.TlsError, match="does not belong to certificate"):
        tls.server_context(d, "backup")
    shutil.copy(keys / "backup.tls.key", d / "backup.tls.key")
    other = tmp_path / "other"
    tls.generate(other, ["backup"])
    shutil.copy(other / "ca.crt", d / "ca.crt")
    with pytest.raises(tls.TlsError, match="was not issued by the CA"):
        tls.server_context(d, "backup")
    shutil.copy(keys / "ca.crt", d / "ca.crt")
    shutil.copy(keys / "mallory.crt", d / "backup.crt")
    shutil.copy(keys / "mallory.tls.key", d / "backup.tls.key")
    with pytest.raises(tls.TlsError, match="names mallory, not this node 'backup'"):
        tls.server_context(d, "backup")
    (d / "ca.crt").write_text("not a certificate")
    with pytest.raises(tls.TlsError, match="ca.crt is not a PEM certificate"):
        tls.server_context(d, "backup")


def test_check_peer():
    assert tls.check_peer(None, "primary") == "the peer presented no certificate"
    cert = {"subject": ((("organizationName", "remus"),), (("commonName", "primary"),)),
            "subjectAltName": (("DNS", "primary"),)}
    assert tls.check_peer(cert, "primary") is None
    assert "names 'primary', not 'backup'" in tls.check_peer(cert, "backup")
    san_only = {"subject": (), "subjectAltName": (("DNS", "backup"), ("IP Address", "10.0.0.2"))}
    assert tls.check_peer(san_only, "backup") is None


async def _serve_once(server_ctx: ssl.SSLContext, expected: str):
    """A backup-like listener: upgrade, check the peer; returns (port, results list, server)."""
    results: list[str] = []

    async def handle(reader, writer):
        try:
            await writer.start_tls(server_ctx, ssl_handshake_timeout=5)
        except (OSError, asyncio.TimeoutError) as exc:
            results.append("handshake: " + tls.describe(exc))
            writer.transport.abort()
            return
        results.append(tls.check_peer(writer.get_extra_info("peercert"), expected) or "ok")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], results, server


def test_mutual_handshake_and_refusals(keys, tmp_path):
    other = tmp_path / "other"
    tls.generate(other, ["primary"])

    async def run():
        port, results, server = await _serve_once(tls.server_context(keys, "backup"), "primary")
        for d, node in ((keys, "primary"), (keys, "mallory"), (other, "primary")):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls.client_context(d, node) if d is keys else
                _loose_client(d, node), server_hostname="backup")
            if d is keys:  # a verifying client sees the backup's name (the loose one sees none)
                assert tls.check_peer(writer.get_extra_info("peercert"), "backup") is None
            await reader.read()  # until the backup closes
            writer.close()
        server.close()
        return results

    results = asyncio.run(run())
    assert results[0] == "ok"
    assert results[1] == "the peer's certificate names 'mallory', not 'primary'"
    assert results[2].startswith("handshake: the peer's certificate is not from our CA")


def _loose_client(d: Path, node: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(d / f"{node}.crt", d / f"{node}.tls.key")
    return ctx


@pytest.mark.parametrize("backup_dir, backup_node, reason", [
    ("other", "backup", "TLS handshake with the backup failed: the peer's certificate is not from our CA"),
    ("keys", "mallory", "TLS: the peer's certificate names 'mallory', not 'backup'"),
])
def test_primary_refuses_a_backup_that_is_not_ours(keys, tmp_path, backup_dir, backup_node, reason):
    other = tmp_path / "other"
    tls.generate(other, ["backup"])
    server_dir = other if backup_dir == "other" else keys

    async def run():
        port, _, server = await _serve_once(tls.server_context(server_dir, backup_node), "primary")
        cfg = SimpleNamespace(backup_endpoint=("127.0.0.1", port), primary_endpoint=("", 0))
        fake = SimpleNamespace(cfg=cfg, tls_context=tls.client_context(keys, "primary"),
                               peer_node="backup")
        try:
            with pytest.raises(BackupRefused) as err:
                await Replicator._connect(fake)
        finally:
            server.close()
        return str(err.value)

    assert asyncio.run(run()).startswith(reason)


# ---------------------------------------------------------------------- config

BASE = """
[guest]
name = "demo"
kernel = "vmlinuz"
[primary]
address = "127.0.0.1"
[backup]
address = "127.0.0.1:7788"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "guest.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_config_without_tls_material_says_what_to_add(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, BASE))
    assert "[tls] dir" in str(err.value) and "remusctl keys generate" in str(err.value)
    assert "insecure = true" in str(err.value)


@pytest.mark.parametrize("section, named", [
    ("[tls]\ndri = 'keys'\n", "[tls] dri: unknown key"),
    ("[tls]\ninsecure = 'yes'\n", "[tls] insecure: expected bool"),
    ("[tls]\ndir = 'keys'\ninsecure = true\n", "[tls] insecure: true together with [tls] dir"),
])
def test_tls_config_errors_name_the_key(tmp_path, section, named):
    with pytest.raises(ConfigError, match=re_escape(named)):
        load(write(tmp_path, BASE + section))


def re_escape(text: str) -> str:
    import re
    return re.escape(text)


def test_tls_config_relative_dir_and_insecure(tmp_path, keys):
    cfg = load(write(tmp_path, BASE + "[tls]\ndir = 'keys'\n"))
    assert cfg.tls.dir == str(tmp_path / "keys") and not cfg.tls.insecure
    cfg = load(write(tmp_path, BASE + "[tls]\ninsecure = true\n"))
    assert tls.context_for(cfg, "backup") is None and tls.context_for(cfg, "primary") is None
    cfg = load(write(tmp_path, BASE + f"[tls]\ndir = '{keys}'\n"))
    assert tls.context_for(cfg, "backup").verify_mode == ssl.CERT_REQUIRED
    # A config survives with_overrides with its [tls] section.
    assert cfg.with_overrides(interval_ms=50).tls.dir == str(keys)


def test_describe_handshake_failures():
    assert tls.describe(ConnectionAbortedError(
        "SSL handshake is taking longer than 10.0 seconds: aborting the connection")) \
        .startswith("no TLS handshake in time")
    assert tls.describe(ConnectionResetError()) == "the peer closed the connection during the TLS handshake"
    assert tls.describe(RuntimeError("odd")) == "RuntimeError: odd"
