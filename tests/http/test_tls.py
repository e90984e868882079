"""rpcproxy.tls: the proxy's own TLS transport, TLS 1.2 and 1.3, on real TLS clients (loopback)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rpcproxy import certs
from rpcproxy import config as config_mod
from rpcproxy.http.vc_io import ChannelProtocol
from rpcproxy.server import ProxyServer
from rpcproxy.tls import TlsConnection
from tests.support.fakes import EchoBackend, TableAuthenticator, basic, request_pdu
from tests.support.rpch_raw import open_vc

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture
async def backend() -> AsyncIterator[EchoBackend]:
    b = await EchoBackend().start()
    yield b
    await b.stop()


@pytest.fixture
def pair(tmp_path: Path) -> certs.CreatedCertificate:
    return certs.create_self_signed("localhost", tmp_path, extra_names=["127.0.0.1"])


async def start(backend: EchoBackend, pair: certs.CreatedCertificate,
                **extra: Any) -> tuple[ProxyServer, int]:
    cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": backend.endpoint,
                                 "targets": ["srv:6001"], "tls_cert": str(pair.cert_path),
                                 "tls_key": str(pair.key_path), **extra})
    server = ProxyServer(cfg, authenticator=TableAuthenticator())
    bound = await server.start()
    return server, bound[0][1]


def client_context(pair: certs.CreatedCertificate, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pair.cert_path))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


@pytest.mark.parametrize("transport", ["lean", "loop"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_vc_over_tls(backend: EchoBackend, pair: certs.CreatedCertificate,
                           version: str, transport: str) -> None:
    """A VC over TLS 1.2 and 1.3 carries PDUs larger than a TLS record both ways, byte for
    byte; with the default transport both channels run on rpcproxy.tls once handed over."""
    server, port = await start(backend, pair, tls_transport=transport)
    try:
        vc = await open_vc(port, basic("alice", "pw-alice"),
                           ssl_ctx=client_context(pair, version))
        inp, out = vc.inp, vc.out
        assert inp.writer.get_extra_info("ssl_object").version() == f"TLSv{version}"
        for call_id, size in enumerate((16, 16_000, 16_385, 40_000, 65_000, 7), start=1):
            stub = struct.pack("<I", call_id) * (size // 4)
            inp.send(request_pdu(call_id, stub))
            while True:
                pdu = await asyncio.wait_for(out.pdu(), 10)
                if pdu[2] != 20:  # flow-control RTS in between
                    break
            assert pdu[2] == 2 and pdu[3:] == request_pdu(call_id, stub)[3:]
        (rt,) = server.vcs.values()
        channels = rt.vc.channels()
        assert len(channels) == 2
        for ch in channels:
            assert isinstance(ch, ChannelProtocol)
            assert isinstance(ch.transport, TlsConnection) is (transport == "lean")
            assert ch.transport.get_extra_info("ssl_object").version() == f"TLSv{version}"
        inp.writer.close()
        out.writer.close()
    finally:
        await server.stop()


async def test_silent_tls_client_closed_after_handshake_timeout(
        backend: EchoBackend, pair: certs.CreatedCertificate) -> None:
    """A connection that never finishes its TLS handshake is closed after
    ``handshake_timeout`` (the event loop's own default is 60 s)."""
    server, port = await start(backend, pair, handshake_timeout=0.5)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(100), 10) == b""
        w.close()
    finally:
        await server.stop()


async def test_plain_http_to_tls_port_is_one_log_line(
        backend: EchoBackend, pair: certs.CreatedCertificate,
        caplog: pytest.LogCaptureFixture) -> None:
    server, port = await start(backend, pair)
    try:
        with caplog.at_level(logging.INFO, logger="rpcproxy"):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"RPC_IN_DATA /rpc/rpcproxy.dll?srv:6001 HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await asyncio.wait_for(r.read(1000), 10)
            assert b"HTTP" not in data  # at most a TLS alert, never a plaintext answer
            w.close()
        lines = [rec for rec in caplog.records if "TLS handshake" in rec.getMessage()]
        assert len(lines) == 1, caplog.records  # one refusal line, with the peer
        assert "127.0.0.1:" in lines[0].getMessage() and "failed" in lines[0].getMessage()
        assert all(rec.exc_info is None for rec in caplog.records)
    finally:
        await server.stop()


def test_tls_transport_setting_checked() -> None:
    from rpcproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="tls_transport"):
        config_mod.load(None, {"tls_transport": "fast"})
