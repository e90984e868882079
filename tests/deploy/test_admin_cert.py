"""``rpcproxy cert`` and the TLS policy of the listener (real TLS clients, loopback)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rpcproxy import certs
from rpcproxy.cli import main
from rpcproxy.config import Config
from rpcproxy.config import load as config_load
from rpcproxy.errors import ConfigError
from rpcproxy.server import ProxyServer


def test_cert_command_writes_pair_with_autodiscover_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls"
    assert main(["cert", "--host", "Mail.Example.COM", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "autodiscover.example.com" in printed
    assert f'tls_key = "{out / "key.pem"}"' in printed

    key_path, cert_path = out / "key.pem", out / "cert.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.com",
                                                     "autodiscover.example.com"]
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=800)

    # A second run does not silently replace the key; --force does.
    assert main(["cert", "--host", "mail.example.com", "--out-dir", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    before = key_path.read_bytes()
    assert main(["cert", "--host", "mail.example.com", "--out-dir", str(out), "--force"]) == 0
    assert key_path.read_bytes() != before
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_cert_ec_key_and_extra_names(tmp_path: Path) -> None:
    assert main(["cert", "--host", "mail.example.org", "--out-dir", str(tmp_path),
                 "--key-type", "ec", "--name", "192.0.2.7", "--name", "mail"]) == 0
    info = certs.inspect_certificate(tmp_path / "cert.pem")
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert info.dns_names == ["mail.example.org", "autodiscover.example.org", "mail"]
    assert info.ip_addresses == ["192.0.2.7"]
    assert certs.name_covered(info, "AUTODISCOVER.example.org.")
    assert certs.name_covered(info, "192.0.2.7")
    assert not certs.name_covered(info, "www.example.org")


def test_autodiscover_name() -> None:
    assert certs.autodiscover_name("mail.example.com") == "autodiscover.example.com"
    assert certs.autodiscover_name("a.b.example.com.") == "autodiscover.b.example.com"
    assert certs.autodiscover_name("mail") is None
    assert certs.autodiscover_name("192.0.2.1") is None


def test_wildcard_coverage() -> None:
    info = certs.CertificateInfo("", "", True, dt.datetime.now(dt.UTC), dt.datetime.now(dt.UTC),
                                 ["*.example.com"], [], "")
    assert certs.name_covered(info, "mail.example.com")
    assert not certs.name_covered(info, "example.com")
    assert not certs.name_covered(info, "a.mail.example.com")


# --- the TLS listener --------------------------------------------------------------------------


@pytest.fixture
def tls_pair(tmp_path: Path) -> certs.CreatedCertificate:
    return certs.create_self_signed("mail.example.com", tmp_path)


async def _start_tls_server(pair: certs.CreatedCertificate,
                            **settings: Any) -> tuple[ProxyServer, int]:
    config = Config(listen="127.0.0.1:0", tls_cert=str(pair.cert_path),
                    tls_key=str(pair.key_path), server_names=["mail.example.com"], **settings)
    server = ProxyServer(config)
    bound = await server.start()
    return server, bound[0][1]


def _client_context(pair: certs.CreatedCertificate) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pair.cert_path))
    return ctx


async def _get(port: int, ctx: ssl.SSLContext, server_hostname: str) -> tuple[bytes, ssl.SSLObject]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname), 10)
    try:
        writer.write(b"GET /rpc/rpcproxy.dll HTTP/1.1\r\nHost: " + server_hostname.encode()
                     + b"\r\nConnection: close\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 10)
        sslobj = writer.get_extra_info("ssl_object")
        return status, sslobj
    finally:
        writer.close()


async def test_tls_client_verifies_both_names(tls_pair: certs.CreatedCertificate) -> None:
    server, port = await _start_tls_server(tls_pair)
    try:
        for name in ("mail.example.com", "autodiscover.example.com"):
            status, sslobj = await _get(port, _client_context(tls_pair), name)
            assert status.startswith(b"HTTP/1.1 405"), status  # GET is not a channel method
            assert sslobj.version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(ssl.SSLCertVerificationError):
            await _get(port, _client_context(tls_pair), "www.example.com")
    finally:
        await server.stop()


@pytest.mark.parametrize("tickets", [0, 1, None])
async def test_tls13_session_tickets_configurable(tls_pair: certs.CreatedCertificate,
                                                  tickets: int | None) -> None:
    """``tls_session_tickets = 0``: a TLS 1.3 handshake is followed by no NewSessionTicket
    (Samba's ncacn_http client hangs on one); by default OpenSSL's tickets are sent."""
    settings = {} if tickets is None else {"tls_session_tickets": tickets}
    server, port = await _start_tls_server(tls_pair, **settings)
    try:
        ctx = _client_context(tls_pair)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        status, sslobj = await _get(port, ctx, "mail.example.com")
        assert status.startswith(b"HTTP/1.1 405"), status  # the tickets came before it
        assert sslobj.version() == "TLSv1.3"
        session = sslobj.session
        assert session is not None
        assert session.has_ticket is (tickets != 0)
    finally:
        await server.stop()


def test_tls_session_tickets_bounds() -> None:
    with pytest.raises(ConfigError, match="tls_session_tickets"):
        config_load(None, {"tls_session_tickets": -1})
    assert config_load(None, {"tls_session_tickets": 0}).tls_session_tickets == 0


async def test_tls12_negotiates_aead_cipher(tls_pair: certs.CreatedCertificate) -> None:
    server, port = await _start_tls_server(tls_pair)
    try:
        ctx = _client_context(tls_pair)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        status, sslobj = await _get(port, ctx, "mail.example.com")
        assert sslobj.version() == "TLSv1.2"
        cipher = sslobj.cipher()
        assert cipher is not None
        assert "GCM" in cipher[0] or "CHACHA20" in cipher[0], cipher
        assert cipher[0].startswith(("ECDHE-", "DHE-")), cipher
    finally:
        await server.stop()


async def test_tls12_cbc_only_client_refused(tls_pair: certs.CreatedCertificate) -> None:
    server, port = await _start_tls_server(tls_pair)
    try:
        ctx = _client_context(tls_pair)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:AES128-SHA256")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _get(port, ctx, "mail.example.com")
    finally:
        await server.stop()


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
async def test_old_tls_versions_refused(tls_pair: certs.CreatedCertificate, version: str) -> None:
    assert certs.server_ssl_context(str(tls_pair.cert_path), str(tls_pair.key_path)) \
        .minimum_version == ssl.TLSVersion.TLSv1_2
    server, port = await _start_tls_server(tls_pair)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tls_version = getattr(ssl.TLSVersion, version)
            ctx.minimum_version = tls_version
            ctx.maximum_version = tls_version
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client really offer the old protocol
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _get(port, ctx, "mail.example.com")
    finally:
        await server.stop()


def test_mismatched_key_is_a_readable_error(tmp_path: Path) -> None:
    a = certs.create_self_signed("a.example.com", tmp_path / "a")
    b = certs.create_self_signed("b.example.com", tmp_path / "b")
    with pytest.raises(certs.CertificateError, match="cannot use certificate"):
        certs.server_ssl_context(str(a.cert_path), str(b.key_path))
    with pytest.raises(certs.CertificateError, match="no such file"):
        certs.server_ssl_context(str(tmp_path / "missing.pem"), str(a.key_path))
