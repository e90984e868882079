"""TLS material: self-signed certificates, the server SSL context, certificate inspection.

* ``create_self_signed`` writes a key (mode 0600) and a certificate whose subjectAltName
  holds the host name and its ``autodiscover.`` name: what Outlook asks for on a first
  install, before a real certificate (ACME, company CA) replaces it.
* ``server_ssl_context`` is the one place that decides protocol versions and ciphers:
  TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE/DHE key exchange with AEAD ciphers
  (AES-GCM, ChaCha20-Poly1305). Outlook 2010 and later on Windows 7+ negotiate these.
  ``session_tickets`` sets how many TLS 1.3 session tickets follow a handshake (0 for
  Samba's ncacn_http client, which hangs on them). Loading the same files again into the
  context (``reload_cert_chain``) changes the certificate for new connections only;
  established TLS sessions keep theirs.
* ``inspect_certificate`` / ``names_covered`` serve ``rpcproxy check``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644
DEFAULT_DAYS = 825  # the longest validity clients still accept for a leaf certificate
CERT_FILE_NAME = "cert.pem"
KEY_FILE_NAME = "key.pem"

# TLS 1.2 suites: forward-secret key exchange, AEAD only. TLS 1.3 suites are OpenSSL's
# defaults (all AEAD) and are not affected by set_ciphers().
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)


class CertificateError(Exception):
    """A certificate or key file is missing, unreadable or unusable (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- names -----------------------------------------------------------------------------------


def autodiscover_name(host: str) -> str | None:
    """``mail.example.com`` -> ``autodiscover.example.com``; None for a single-label name."""
    host = host.strip().rstrip(".").lower()
    if _is_ip(host) or "." not in host:
        return None
    domain = host.split(".", 1)[1]
    return f"autodiscover.{domain}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        if _is_ip(name):
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        else:
            entries.append(x509.DNSName(name))
    return entries


# --- creation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedCertificate:
    cert_path: Path
    key_path: Path
    names: list[str]
    not_after: dt.datetime


def create_self_signed(
    host: str,
    out_dir: str | Path,
    *,
    key_type: str = "rsa",
    days: int = DEFAULT_DAYS,
    extra_names: list[str] | None = None,
    not_before: dt.datetime | None = None,
    overwrite: bool = False,
) -> CreatedCertificate:
    """Write ``cert.pem`` and ``key.pem`` (0600) for ``host`` + its autodiscover name."""
    host = host.strip().rstrip(".").lower()
    if not host:
        raise CertificateError("the host name is empty")
    names = [host]
    auto = autodiscover_name(host)
    if auto:
        names.append(auto)
    for extra in extra_names or []:
        extra = extra.strip().rstrip(".").lower()
        if extra and extra not in names:
            names.append(extra)

    out = Path(out_dir)
    cert_path = out / CERT_FILE_NAME
    key_path = out / KEY_FILE_NAME
    if not overwrite:
        for path in (cert_path, key_path):
            if path.exists():
                raise CertificateError(f"{path} already exists (use --force to replace it)")

    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ec":
        private_key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise CertificateError(f"unknown key type {key_type!r} (want rsa or ec)")

    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=days)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, host),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rpcproxy self-signed"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=key_type == "rsa",
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    cert = builder.sign(private_key, hashes.SHA256())

    out.mkdir(parents=True, exist_ok=True)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_pem, KEY_FILE_MODE)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_FILE_MODE)
    return CreatedCertificate(cert_path, key_path, names, end)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Create the file with its final mode from the start (no window with a wider mode)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed it; we want exactly this mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- server context --------------------------------------------------------------------------


DEFAULT_SESSION_TICKETS = 2  # OpenSSL's own default


def server_ssl_context(cert_file: str, key_file: str, *,
                       session_tickets: int = DEFAULT_SESSION_TICKETS) -> ssl.SSLContext:
    """TLS 1.2+ server context with forward-secret AEAD ciphers, loaded with the pair.

    ``session_tickets``: TLS 1.3 NewSessionTicket messages sent after each handshake
    (``tls_session_tickets``). 0 sends none: Samba's ncacn_http client hangs on them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = session_tickets
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # Key exchange groups: OpenSSL's defaults (X25519 first, then P-256, X448, P-521, P-384),
    # never one fixed curve: a client gets the group it offers first among them. X25519 also
    # keeps a held TLS channel smaller: OpenSSL keeps the handshake's ephemeral key for the
    # connection's life, about 0.4 KiB for X25519 against 3 KiB for P-256 (heaptrack).
    load_cert_chain(ctx, cert_file, key_file)
    return ctx


def load_cert_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load the pair into ``ctx`` (new connections use it); CertificateError if unusable."""
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise CertificateError(f"{exc.filename or cert_file}: no such file") from None
    except PermissionError as exc:
        raise CertificateError(_unreadable(exc.filename, cert_file, key_file)) from None
    except ssl.SSLError as exc:
        raise CertificateError(
            f"cannot use certificate {cert_file} with key {key_file}: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise CertificateError(f"cannot read {cert_file} / {key_file}: {exc}") from None


def _unreadable(filename: str | None, cert_file: str, key_file: str) -> str:
    """Which file this user cannot read, and what to do about it."""
    if not filename:
        filename = next((f for f in (key_file, cert_file) if not os.access(f, os.R_OK)),
                        key_file)
    uid = os.geteuid()
    try:
        import pwd

        who = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        who = f"uid {uid}"
    return (f"{filename}: permission denied: rpcproxy runs as {who}, which cannot read it. "
            f"Make the file readable by that user, e.g. chown {uid} {filename} && "
            f"chmod 0600 {filename} (the container image runs as uid 10001; the systemd "
            "unit as user rpcproxy)")


# --- inspection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    self_signed: bool
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: list[str]
    ip_addresses: list[str]
    sha256: str

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400


def inspect_certificate(cert_file: str | Path) -> CertificateInfo:
    """Read the first certificate of a PEM file; CertificateError if it is not one."""
    try:
        data = Path(cert_file).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{cert_file}: no such file") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {cert_file}: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{cert_file} does not hold a PEM certificate") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        self_signed=cert.issuer == cert.subject,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns_names,
        ip_addresses=ips,
        sha256=cert.fingerprint(hashes.SHA256()).hex(":"),
    )


def name_covered(info: CertificateInfo, name: str) -> bool:
    """Does the certificate's subjectAltName cover ``name`` (RFC 6125 left-label wildcard)?"""
    name = name.strip().rstrip(".").lower()
    if _is_ip(name):
        return str(ipaddress.ip_address(name)) in info.ip_addresses
    for pattern in info.dns_names:
        pattern = pattern.rstrip(".")
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name:
            first, rest = name.split(".", 1)
            if first and rest == pattern[2:]:
                return True
    return False
