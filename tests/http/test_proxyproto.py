"""The PROXY protocol: the sans-IO parser, the listener with hand-made headers, real HAProxy.

Only the addresses in ``proxy_protocol_from`` may send a header, and from them one is
required; the client address it names is what logs, metrics and per-source bounds see.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rpcproxy import certs
from rpcproxy import config as config_mod
from rpcproxy.proxyproto import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse
from rpcproxy.server import ProxyServer
from rpcproxy.tls import TlsConnection
from tests.support.fakes import EchoBackend, TableAuthenticator, basic
from tests.support.haproxy import haproxy_binary
from tests.support.rpch_raw import RawChannel, open_vc

PATH = "/rpc/rpcproxy.dll?srv:6001"
ALICE = basic("alice", "pw-alice")


def v1(src: str, sport: int) -> bytes:
    fam = "TCP4" if ipaddress.ip_address(src).version == 4 else "TCP6"
    dst = "127.0.0.1" if fam == "TCP4" else "::1"
    return f"PROXY {fam} {src} {dst} {sport} 443\r\n".encode()


def v2(src: str, sport: int, *, local: bool = False, tlv: bytes = b"") -> bytes:
    addr = ipaddress.ip_address(src)
    if addr.version == 4:
        body = addr.packed + bytes([127, 0, 0, 1]) + struct.pack("!HH", sport, 443)
        fam = 0x11
    else:
        body = addr.packed + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", sport, 443)
        fam = 0x21
    body += tlv
    head = bytes([0x20 if local else 0x21, fam]) + struct.pack("!H", len(body))
    return V2_SIGNATURE + head + body


# --- parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [v1, v2])
@pytest.mark.parametrize("src", ["203.0.113.9", "2001:db8::7"])
def test_parse_both_versions(make: Any, src: str) -> None:
    header = make(src, 5555)
    assert parse(header + b"GET / HTTP/1.1\r\n") == ProxyHeader(len(header), (src, 5555))
    for cut in range(len(header)):  # any prefix: need more bytes
        assert parse(header[:cut]) is None


def test_parse_local_unknown_and_tlvs() -> None:
    assert parse(v2("203.0.113.9", 1, local=True)).source is None  # type: ignore[union-attr]
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(15, None)
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP, skipped
    header = v2("203.0.113.9", 7, tlv=tlv)
    assert parse(header + b"\x16\x03") == ProxyHeader(len(header), ("203.0.113.9", 7))


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00",
    b"PROXY TCP4 203.0.113.9 127.0.0.1 5555\r\n",
    b"PROXY TCP4 2001:db8::1 127.0.0.1 5555 443\r\n",
    b"PROXY TCP4 203.0.113.999 127.0.0.1 5555 443\r\n",
    b"PROXY TCP4 203.0.113.9 127.0.0.1 99999 443\r\n",
    b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443" + b" " * 80 + b"\r\n",
    b"PROXY " + b"x" * 120,
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # truncated addresses
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # too long
    b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00",
])
def test_parse_refuses_bad_headers(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


# --- the listener ----------------------------------------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[EchoBackend]:
    b = await EchoBackend().start()
    yield b
    await b.stop()


async def start(backend: EchoBackend, **overrides: Any) -> tuple[ProxyServer, int]:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0", "backend": backend.endpoint, "targets": ["srv:6001"],
        "basic_over_http": True, "per_source_exempt": [],
        "proxy_protocol_from": ["127.0.0.1"],
    }
    cfg.update(overrides)
    server = ProxyServer(config_mod.load(None, cfg),
                         authenticator=TableAuthenticator())
    bound = await server.start()
    return server, bound[0][1]


async def proxied(port: int, header: bytes, source: str | None = None) -> RawChannel:
    ch = await RawChannel.connect(port, source)
    ch.send(header)
    return ch


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "rpcproxy" and r.levelno >= logging.WARNING]


async def test_header_names_the_client_in_logs_and_bounds(
        backend: EchoBackend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server, port = await start(backend, max_unauthenticated_per_source=3)
    held = []
    try:
        for make, src in ((v1, "203.0.113.9"), (v2, "2001:db8::7")):
            ch = await proxied(port, make(src, 4242))
            ch.request("RPC_IN_DATA", PATH, content_length=0,
                       headers={"Authorization": basic("alice", "wrong")})
            assert (await ch.head()).status == 401
            ch.close()
        lines = warnings(caplog)
        assert any(line.startswith("refused 203.0.113.9:4242 (auth_denied)") for line in lines)
        assert any(line.startswith("refused 2001:db8::7:4242 (auth_denied)") for line in lines)
        # per-source bounds count the named client, not the front proxy's 127.0.0.1
        for i in range(5):
            held.append(await proxied(port, v2("198.51.100.1", 1000 + i)))
        assert await asyncio.wait_for(held[-1].closed(), 5)
        assert server.guard.rejected == 2
        ok = await proxied(port, v1("198.51.100.2", 1))
        ok.request("RPC_IN_DATA", PATH, content_length=0, headers={"Authorization": ALICE})
        assert (await ok.head()).status == 200
        ok.close()
    finally:
        for ch in held:
            ch.close()
        await server.stop()


async def test_virtual_connection_through_a_header(backend: EchoBackend,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server, port = await start(backend)
    try:
        original = RawChannel.connect
        count = iter(range(2))

        async def connect(cls_port: int, source: str | None = None,
                          ssl_ctx: ssl.SSLContext | None = None) -> RawChannel:
            ch = await original(cls_port, source, ssl_ctx)
            ch.send(v2("192.0.2.50", 6000 + next(count)))
            return ch

        RawChannel.connect = connect  # type: ignore[method-assign,assignment]
        try:
            vc = await open_vc(port, ALICE)
        finally:
            RawChannel.connect = original  # type: ignore[method-assign]
        vc.close()
        deadline = time.monotonic() + 5
        while server.vcs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await server.stop()
    closed = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "vc_closed"]
    assert len(closed) == 1 and closed[0].fields["client"].startswith("192.0.2.50:600")  # type: ignore[attr-defined]


async def test_header_only_from_configured_addresses(backend: EchoBackend,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server, port = await start(backend)
    try:
        # from 127.0.0.2 (not configured) a header is just bad HTTP: not honoured
        ch = await proxied(port, v1("203.0.113.9", 1), source="127.0.0.2")
        ch.request("RPC_IN_DATA", PATH, content_length=0, headers={"Authorization": ALICE})
        assert await ch.closed()
        # a configured front proxy must send one
        bare = await RawChannel.connect(port)
        bare.request("RPC_IN_DATA", PATH, content_length=0, headers={"Authorization": ALICE})
        assert await bare.closed()
        # and plain HTTP from elsewhere is served as usual
        other = await RawChannel.connect(port, "127.0.0.3")
        other.request("RPC_IN_DATA", PATH, content_length=0, headers={"Authorization": ALICE})
        assert (await other.head()).status == 200
        other.close()
        await asyncio.sleep(0.1)
    finally:
        await server.stop()
    lines = warnings(caplog)
    assert not any(line.startswith("refused 203.0.113.9") for line in lines)  # not honoured
    assert any(line.startswith("refused 127.0.0.1:") and "(proxy_header)" in line
               for line in lines)
    assert any(line.startswith("refused 127.0.0.2:") and "(bad_request)" in line
               for line in lines)


async def test_late_header_is_closed_at_handshake_timeout(backend: EchoBackend) -> None:
    server, port = await start(backend, handshake_timeout=0.5)
    try:
        ch = await proxied(port, b"PROXY TCP4 203.0.")  # and nothing more
        started = time.monotonic()
        assert await ch.closed(timeout=3)
        assert 0.4 < time.monotonic() - started < 2
        assert server.metrics.refused["proxy_header"] == 1 and not server.guard.pending
    finally:
        await server.stop()


@pytest.mark.parametrize("transport", ["lean", "loop"])
async def test_header_before_tls(backend: EchoBackend, tmp_path: Path, transport: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """TLS after a PROXY header runs on rpcproxy.tls's transport too (with the default
    ``tls_transport``), and the client's address from the header is what the logs name."""
    caplog.set_level(logging.INFO)
    pair = certs.create_self_signed("mail.example.com", tmp_path)
    server, port = await start(backend, tls_cert=str(pair.cert_path),
                               tls_key=str(pair.key_path), tls_transport=transport)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(v2("203.0.113.77", 999))
        ctx = ssl.create_default_context(cafile=str(pair.cert_path))
        r, w = await asyncio.wait_for(asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="mail.example.com"), 5)
        w.write(f"RPC_IN_DATA {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                "Authorization: Basic eDp5\r\n\r\n".encode())
        assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"HTTP/1.1 401")
        (handler,) = server.guard.pending  # not authenticated: still counted by the guard
        lean = isinstance(getattr(handler, "transport", None), TlsConnection)
        assert lean is (transport == "lean")
        w.close()
    finally:
        await server.stop()
    assert any(line.startswith("refused 203.0.113.77:999 (auth_denied)")
               for line in warnings(caplog))


# --- Debian's HAProxy with send-proxy-v2 -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy"])
async def test_haproxy_send_proxy(backend: EchoBackend, tmp_path: Path, send: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    tool = haproxy_binary()
    server, port = await start(backend)
    front = _free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 100\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n"
        f"frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n"
        f"backend b\n  server s1 127.0.0.1:{port} {send}\n")
    proc = subprocess.Popen([tool, "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "haproxy did not start"
                await asyncio.sleep(0.05)
        vc = await open_vc(front, ALICE, source="127.0.0.9")
        vc.close()
        bad = await RawChannel.connect(front, "127.0.0.8")
        bad.request("RPC_IN_DATA", PATH, content_length=0,
                    headers={"Authorization": basic("alice", "nope")})
        assert (await bad.head()).status == 401
        bad.close()
        deadline = time.monotonic() + 5
        while server.vcs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        await server.stop()
    closed = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "vc_closed"]
    assert len(closed) == 1
    assert closed[0].fields["client"].startswith("127.0.0.9:")  # type: ignore[attr-defined]
    assert any(line.startswith("refused 127.0.0.8:") for line in warnings(caplog))
