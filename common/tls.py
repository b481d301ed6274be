"""TLS for the checkpoint stream: mutual authentication with a private CA.

Layout of a TLS directory (`[tls] dir`, made by `remusctl keys generate`, the
same directory as the heartbeat keys):

    ca.crt                      the CA both nodes trust, and only it
    ca.key                      the CA's key (0600); needed only to make certificates
    primary.crt primary.tls.key the primary's certificate and key (0600)
    backup.crt  backup.tls.key  the backup's

(The TLS keys are NODE.tls.key because NODE.key is the heartbeat's CURVE
public key in the same directory.)

Each daemon presents its own node's certificate and requires the peer's: the
backup accepts only a certificate issued by ca.crt whose subject CN (or a DNS
SAN) is "primary", the primary only one that names "backup". Host names are
not checked (the nodes are named by their certificates, not their addresses);
the node name check replaces it.

Certificates are made with the `cryptography` library, since the stdlib `ssl`
module can use certificates but not create them.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from remus.common.peer_map import NODES, PEER

PEER_OF = PEER  # the name this module has always offered
CERT_VALIDITY = datetime.timedelta(days=3652)  # ten years


class TlsError(Exception):
    """TLS material that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class NodeFiles:
    ca: Path
    cert: Path
    key: Path


def node_files(directory: str | os.PathLike, node: str) -> NodeFiles:
    d = Path(directory)
    return NodeFiles(ca=d / "ca.crt", cert=d / f"{node}.crt", key=d / f"{node}.tls.key")


# ------------------------------------------------------------------- contexts


def server_context(directory: str | os.PathLike, node: str = "backup") -> ssl.SSLContext:
    """The listening side: presents `node`'s certificate, requires a client certificate."""
    return _context(ssl.PROTOCOL_TLS_SERVER, node_files(directory, node), node)


def client_context(directory: str | os.PathLike, node: str = "primary") -> ssl.SSLContext:
    """The connecting side: presents `node`'s certificate, requires the server's."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, node_files(directory, node), node)


def _context(protocol: int, files: NodeFiles, node: str) -> ssl.SSLContext:
    check_files(files, node)
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Peers are named by their certificate (checked with check_peer), not by address.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(files.ca))  # our CA only, never the system store
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"TLS CA file {files.ca} cannot be used: {_reason(exc)}") from None
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"TLS certificate {files.cert} with key {files.key} cannot be used: "
                       f"{_reason(exc)}") from None
    return ctx


def check_files(files: NodeFiles, node: str) -> None:
    """TlsError unless the files exist, parse, and the certificate is `node`'s, issued by the CA.

    ssl would accept a certificate from another CA or for another node and the
    mistake would only show as refused handshakes on the peer; this says which
    file is wrong, at start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise TlsError(f"TLS {what} {path} does not exist (make it with `remusctl keys "
                           f"generate --dir {path.parent} --node primary --node backup`)") from None
        except OSError as exc:
            raise TlsError(f"TLS {what} {path} cannot be read: {exc.strerror}") from None

    def load_cert(path: Path, what: str):
        try:
            return x509.load_pem_x509_certificate(read(path, what))
        except ValueError as exc:
            raise TlsError(f"TLS {what} {path} is not a PEM certificate: {exc}") from None

    ca = load_cert(files.ca, "CA certificate")
    cert = load_cert(files.cert, "certificate")
    try:
        key = serialization.load_pem_private_key(read(files.key, "key"), password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"TLS key {files.key} is not an unencrypted PEM private key: {exc}") from None
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise TlsError(f"TLS certificate {files.cert} was not issued by the CA in {files.ca} "
                       f"({detail})") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for path, c in ((files.ca, ca), (files.cert, cert)):
        end = _not_after(c)
        if end < now:
            raise TlsError(f"TLS certificate {path} expired on {end:%Y-%m-%d}; make new ones "
                           f"with `remusctl keys generate --force`")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
        raise TlsError(f"TLS key {files.key} does not belong to certificate {files.cert}")
    names = _names_of_x509(cert)
    if node not in names:
        raise TlsError(f"TLS certificate {files.cert} names {', '.join(names) or 'nobody'}, "
                       f"not this node {node!r}")


def _not_after(cert) -> datetime.datetime:
    end = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    if end is None:
        end = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return end


# ---------------------------------------------------------------- peer names


def peer_names(peercert: dict | None) -> list[str]:
    """Subject CN and DNS SANs of a certificate as ssl's getpeercert() returns it."""
    if not peercert:
        return []
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    return list(dict.fromkeys(names))


def check_peer(peercert: dict | None, expected: str) -> str | None:
    """None if the (already CA-verified) peer certificate names node `expected`, else why not."""
    if not peercert:
        return "the peer presented no certificate"
    names = peer_names(peercert)
    if expected in names:
        return None
    return (f"the peer's certificate names {', '.join(map(repr, names)) or 'nobody'}, "
            f"not {expected!r}")


def _names_of_x509(cert) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names += san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return list(dict.fromkeys(names))


# ------------------------------------------------------------- error reasons


def describe(exc: BaseException) -> str:
    """An operator's reading of a handshake failure."""
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError)
                                         and "taking longer" in str(exc)):
        return f"no TLS handshake in time (a silent or plain-TCP peer?): {exc}"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)) or (
            isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"):
        return "the peer closed the connection during the TLS handshake"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        # unable to get (local) issuer certificate, self-signed (in chain), leaf unverifiable
        if exc.verify_code in (2, 18, 19, 20, 21):
            return f"the peer's certificate is not from our CA ({why})"
        return f"the peer's certificate failed verification ({why})"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "the peer presented no certificate"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL",
                      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return f"not a TLS 1.3 client hello ({exc.reason}: plain TCP or an old TLS version?)"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
            return f"the peer rejected our certificate ({exc.reason}: not from its CA?)"
        return _reason(exc)
    return _reason(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ----------------------------------------------------------------- generation


def existing_files(directory: str | os.PathLike, nodes: list[str]) -> list[Path]:
    """The node files `generate` would refuse to replace without force. An existing
    CA (both ca.crt and ca.key) is reused, so adding a node needs no force."""
    d = Path(directory)
    return [d / f"{n}{s}" for n in nodes for s in (".crt", ".tls.key") if (d / f"{n}{s}").exists()]


def preflight(directory: str | os.PathLike, nodes: list[str], force: bool = False) -> None:
    """Raise (ValueError, FileExistsError) if `generate` would refuse, before anything is written."""
    d = Path(directory)
    for name in nodes:
        if not name or "/" in name or name.startswith(".") or name == "ca":
            raise ValueError(f"bad node name {name!r}")
    if force:
        return
    present = existing_files(d, nodes)
    if present:
        raise FileExistsError(f"{present[0]} exists (use --force to replace it)")
    ca_crt, ca_key = d / "ca.crt", d / "ca.key"
    if ca_crt.exists() != ca_key.exists():
        have = ca_crt if ca_crt.exists() else ca_key
        raise FileExistsError(f"{have} exists without its pair (use --force to make a new CA)")


def generate(directory: str | os.PathLike, nodes: list[str], force: bool = False) -> list[Path]:
    """A CA (unless the directory holds one and not `force`) and a certificate per node.

    EC P-256 keys, ten years of validity, key files 0600, certificates 0644.
    Returns the files written."""
    from cryptography.hazmat.primitives import serialization

    d = Path(directory).absolute()
    preflight(d, nodes, force)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(minutes=5)  # tolerate small clock differences
    written: list[Path] = []
    ca_crt, ca_key_path = d / "ca.crt", d / "ca.key"
    if ca_crt.exists() and ca_key_path.exists() and not force:
        ca_cert, ca_key = _load_ca(ca_crt, ca_key_path)
    else:
        ca_cert, ca_key = _new_ca(d.name, start, now)
        written.append(_write(ca_key_path, _pem_key(ca_key), 0o600))
        written.append(_write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644))
    for node in nodes:
        cert, key = _node_cert(node, ca_cert, ca_key, start, now)
        written.append(_write(d / f"{node}.tls.key", _pem_key(key), 0o600))
        written.append(_write(d / f"{node}.crt", cert.public_bytes(serialization.Encoding.PEM),
                              0o644))
    return written


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Put `data` in `path` with `mode`, through a temporary file: `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # whatever the umask
    os.replace(tmp, path)
    return path


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(ca_crt: Path, ca_key_path: Path) -> tuple:
    """(certificate, key) of the CA already in the directory, to issue more certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise ValueError(f"the existing CA in {ca_crt.parent} cannot be used ({exc}); "
                         f"use --force to make a new one") from None
    return ca_cert, ca_key


def _new_ca(dir_name: str, start: datetime.datetime, now: datetime.datetime) -> tuple:
    """(certificate, key) of a new self-signed CA that may sign node certificates only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"remus CA {dir_name}"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "remus")])
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(now + CERT_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    return ca_cert, ca_key


def _node_cert(node: str, ca_cert, ca_key, start: datetime.datetime,
               now: datetime.datetime) -> tuple:
    """(certificate, key) of `node`, issued by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "remus")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
            # Each node is a server (backup) or a client (primary); one cert serves both.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


# ------------------------------------------------------------------- config


def context_for(cfg, node: str, server: bool | None = None) -> ssl.SSLContext | None:
    """Host `node`'s context from [tls], with its own certificate: the receiving
    (server) side or the sending (client) side of the stream, by default the usual
    one for that host (server for the backup). Roles move after a failover, so
    either host may need either side. None when the config says insecure."""
    if cfg.tls.insecure:
        return None
    if server is None:
        server = node == "backup"
    return server_context(cfg.tls.dir, node) if server else client_context(cfg.tls.dir, node)


def ensure(directory: str | os.PathLike, nodes: tuple[str, ...] = NODES) -> list[Path]:
    """Make the CA and the certificates of `nodes` that are missing; keep what exists."""
    d = Path(directory)
    missing = [n for n in nodes if not (d / f"{n}.crt").exists() and not (d / f"{n}.tls.key").exists()]
    return generate(d, missing) if missing else []
