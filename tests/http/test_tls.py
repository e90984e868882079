"""rpcproxy.tls: the proxy's own TLS transport, TLS 1.2 and 1.3, on real TLS clients (loopback)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from rpcproxy import certs
from rpcproxy import config as config_mod
from rpcproxy.http.vc_io import ChannelProtocol
from rpcproxy.server import ProxyServer
from rpcproxy.tls import TlsConnection
from tests.support.bio_tls import BioTlsClient
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


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize(("offered", "chosen"), [
    ("X25519:P-256", "X25519"),  # what current clients offer first is taken
    ("P-256", "ECDH, prime256v1"),  # clients without X25519 (older Windows) still connect
    ("P-384", "ECDH, secp384r1"),
])
async def test_key_exchange_groups(backend: EchoBackend, pair: certs.CreatedCertificate,
                                   version: str, offered: str, chosen: str) -> None:
    """The proxy's TLS takes the key exchange group a client offers from OpenSSL's default
    list instead of one fixed curve (a real TLS client, openssl s_client, shows the group)."""
    server, port = await start(backend, pair)
    try:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief",
            "-groups", offered, "-tls" + version.replace(".", "_"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(b"Q\n"), 20)
        text = out.decode(errors="replace")
        assert f"Protocol version: TLSv{version}" in text, text
        assert f"Server Temp Key: {chosen}," in text, text
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


class _Listener:
    """One loopback listening socket whose accepted connections get a TlsConnection."""

    def __init__(self, pair: certs.CreatedCertificate) -> None:
        self.ctx = certs.server_ssl_context(str(pair.cert_path), str(pair.key_path))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()

    async def accept(self, make: Any, sndbuf: int | None = None) -> TlsConnection:
        sock, _ = await asyncio.get_running_loop().sock_accept(self.sock)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        return TlsConnection(sock, self.ctx, make, 5.0)

    def close(self) -> None:
        self.sock.close()


class _Lost(asyncio.Protocol):
    """Notes connection_lost; ``on_made`` / ``on_data`` run at those callbacks."""

    def __init__(self, on_made: Any = None, on_data: Any = None) -> None:
        self.on_made, self.on_data = on_made, on_data
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.on_made is not None:
            self.on_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class _Writer(asyncio.Protocol):
    """Writes ``total`` bytes of a counting pattern as fast as it is let, noting flow control."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.paused = 0
        self.resumed = 0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._more()

    def _more(self) -> None:
        assert self.transport is not None
        while self.sent < self.total and not self.paused > self.resumed:
            chunk = bytes((self.sent // 65536 + i) % 251 for i in range(65536))
            self.sent += len(chunk)
            self.transport.write(chunk)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1
        self._more()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def test_lean_transport_write_flow_control(pair: certs.CreatedCertificate) -> None:
    """A client that does not read: the lean transport's writes wait in its queue (OpenSSL is
    given the same write again once the socket drains), the application is paused above the
    high-water mark and resumed below it, and every byte arrives in order."""
    total = 8 * 1024 * 1024
    apps: list[_Writer] = []

    def make() -> asyncio.BaseProtocol:
        apps.append(_Writer(total))
        return apps[-1]

    listener = _Listener(pair)
    accepted = asyncio.create_task(listener.accept(make, sndbuf=32768))
    csock = socket.socket()
    csock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    csock.connect(listener.address)
    csock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=csock, ssl=client_context(pair, "1.3"),
                                                   server_hostname="localhost")
    conns = [await accepted]
    try:
        for _ in range(100):  # the client reads nothing until the server stays paused
            await asyncio.sleep(0.02)
            if apps and apps[0].paused > apps[0].resumed:
                break
        (app,) = apps
        assert app.paused == app.resumed + 1 and app.sent < total  # paused now
        assert conns[0].get_write_buffer_size() > 0
        got = 0
        while got < total:
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data, f"connection ended after {got} bytes"
            want = bytes((p // 65536 + p % 65536) % 251 for p in range(got, got + len(data)))
            assert data == want, f"bytes differ at {got}"
            got += len(data)
        assert app.resumed >= 1 and app.sent == total
        assert conns[0].get_write_buffer_size() == 0
    finally:
        writer.close()
        for conn in conns:
            conn.abort()
        listener.close()


async def test_bad_record_after_handshake_is_one_refusal(
        backend: EchoBackend, pair: certs.CreatedCertificate,
        caplog: pytest.LogCaptureFixture) -> None:
    """A record that fails to decrypt after the handshake: the channel is closed and the
    proxy says so in one refusal line (counted, rate-limited), without a traceback."""
    server, port = await start(backend, pair)
    try:
        def client() -> None:  # blocking, in a thread: the proxy runs on this loop
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            tls = client_context(pair, "1.3").wrap_socket(raw, server_hostname="localhost")
            # An application-data record of garbage, below TLS: its tag cannot verify.
            socket.socket.sendall(tls, b"\x17\x03\x03\x00\x20" + b"\x55" * 32)
            try:
                assert tls.recv(100) == b""
            except (ssl.SSLError, OSError):
                pass  # the proxy's alert, or its close
            tls.close()

        with caplog.at_level(logging.INFO, logger="rpcproxy"):
            await asyncio.wait_for(asyncio.to_thread(client), 20)
            for _ in range(100):
                if server.metrics.refused.get("tls_error"):
                    break
                await asyncio.sleep(0.02)
        lines = [rec.getMessage() for rec in caplog.records if "tls_error" in rec.getMessage()]
        assert len(lines) == 1, [rec.getMessage() for rec in caplog.records]
        assert "127.0.0.1:" in lines[0]
        assert all(rec.exc_info is None for rec in caplog.records)
    finally:
        await server.stop()


class _Echo(asyncio.Protocol):
    """Echoes every line back, upper-cased (a stand-in application on a TlsConnection)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.got = b""
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.got += data
        self.transport.write(data.upper())

    def eof_received(self) -> bool | None:
        if not self.eof.done():
            self.eof.set_result(True)
        return None


async def test_lean_transport_key_update_and_close_notify(pair: certs.CreatedCertificate) -> None:
    """TLS 1.3 KeyUpdate from the client, with an update requested back (as long-lived
    Windows clients send): the channel goes on in both directions; the client's close_notify
    is the application's end of data (a real client: openssl s_client)."""
    apps: list[_Echo] = []

    def make() -> asyncio.BaseProtocol:
        apps.append(_Echo())
        return apps[-1]

    listener = _Listener(pair)
    conns: list[TlsConnection] = []

    async def accept() -> None:
        conns.append(await listener.accept(make))

    acceptor = asyncio.create_task(accept())
    port = listener.address[1]
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-brief",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await asyncio.wait_for(acceptor, 10)
        for line in (b"first\n", b"K\n", b"second\n", b"k\n", b"third\n"):
            proc.stdin.write(line)  # "K"/"k": s_client sends a KeyUpdate (requested/not)
            await proc.stdin.drain()
            if line.strip() in (b"K", b"k"):
                await asyncio.sleep(0.5)  # s_client takes a command only as a read of its own
            else:
                assert await asyncio.wait_for(proc.stdout.readline(), 10) == line.upper()
        (app,) = apps
        assert app.got == b"first\nsecond\nthird\n"
        proc.stdin.close()  # s_client sends close_notify and leaves
        assert await asyncio.wait_for(app.eof, 10) is True
        await asyncio.wait_for(proc.wait(), 10)
        for _ in range(100):
            if conns[0].is_closing():
                break
            await asyncio.sleep(0.02)
        assert conns[0].is_closing()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for conn in conns:
            conn.abort()
        listener.close()


async def test_lean_transport_tiny_records_share_the_loop(pair: certs.CreatedCertificate) -> None:
    """A client sending a burst of 1-byte TLS records: one readable event decrypts at most
    READ_RECORDS of them before other connections get the loop; every byte arrives."""
    from rpcproxy.tls import READ_RECORDS

    deliveries: list[bytes] = []

    class Count(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            deliveries.append(data)

    listener = _Listener(pair)
    count = 1000

    def client() -> None:  # every record leaves in one send
        c = BioTlsClient(listener.address, client_context(pair, "1.3"), "localhost")
        c.raw.sendall(c.records(*(bytes([i % 256]) for i in range(count))))
        c.raw.recv(1)  # until the server closes
        c.raw.close()

    worker = asyncio.create_task(asyncio.to_thread(client))
    conn = await listener.accept(Count)
    try:
        for _ in range(250):
            if sum(map(len, deliveries)) >= count:
                break
            await asyncio.sleep(0.02)
        assert b"".join(deliveries) == bytes(i % 256 for i in range(count))
        assert max(map(len, deliveries)) <= READ_RECORDS
    finally:
        conn.abort()
        await asyncio.wait_for(worker, 10)
        listener.close()


async def test_client_gone_before_its_basic_login_is_not_a_refusal_without_tls(
        backend: EchoBackend, pair: certs.CreatedCertificate,
        caplog: pytest.LogCaptureFixture) -> None:
    """A TLS client that sends its request with Basic credentials and at once its
    close_notify: one client_disconnected line, never 'Basic authentication refused without
    TLS' (the connection was TLS; it is only gone)."""
    server, port = await start(backend, pair)

    def client() -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = client_context(pair, "1.3").wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"RPC_OUT_DATA /rpc/rpcproxy.dll?srv:6001 HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 76\r\nAuthorization: Basic YWxpY2U6cHctYWxpY2U=\r\n\r\n")
        tls.unwrap()
        raw.close()

    try:
        with caplog.at_level(logging.INFO, logger="rpcproxy"):
            await asyncio.wait_for(asyncio.to_thread(client), 20)
            for _ in range(100):
                if server.metrics.refused:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            server._flush_refusals(final=True)
        assert "without TLS" not in caplog.text, caplog.text
        assert "auth_denied" not in caplog.text
        assert server.metrics.refused["client_disconnected"] == 1, server.metrics.refused
        assert all(rec.exc_info is None for rec in caplog.records)
    finally:
        await server.stop()


async def test_lean_transport_close_gives_up_on_a_client_that_never_reads(
        pair: certs.CreatedCertificate, monkeypatch: pytest.MonkeyPatch) -> None:
    """``close`` with megabytes queued for a client that never reads: after CLOSE_TIMEOUT
    the connection is aborted (descriptor, OpenSSL state and queue freed) instead of held."""
    from rpcproxy import tls as tls_mod

    monkeypatch.setattr(tls_mod, "CLOSE_TIMEOUT", 0.5)

    def write_and_close(transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"x" * (4 << 20))
        transport.close()

    app = _Lost(on_made=write_and_close)
    listener = _Listener(pair)
    csock = socket.socket()
    csock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    csock.connect(listener.address)
    csock.setblocking(False)
    accepted = asyncio.create_task(listener.accept(lambda: app, sndbuf=32768))
    _, writer = await asyncio.open_connection(sock=csock, ssl=client_context(pair, "1.3"),
                                              server_hostname="localhost")
    conn = await accepted
    try:
        cast(asyncio.Transport, writer.transport).pause_reading()  # the client reads no more
        assert await asyncio.wait_for(app.lost, 10) is None
        assert conn.is_closing() and conn.get_extra_info("socket") is None
        assert conn.get_write_buffer_size() == 0
    finally:
        writer.transport.abort()
        conn.abort()
        listener.close()


async def test_lean_transport_application_failure_aborts(
        pair: certs.CreatedCertificate, caplog: pytest.LogCaptureFixture) -> None:
    """An application callback that raises (our defect, never the client's input alone):
    logged with its traceback, and the connection aborted, not left half-alive."""
    def boom(data: bytes) -> None:
        raise RuntimeError("a defect in the application")

    app = _Lost(on_data=boom)
    listener = _Listener(pair)
    accepted = asyncio.create_task(listener.accept(lambda: app))
    reader, writer = await asyncio.open_connection(
        *listener.address, ssl=client_context(pair, "1.3"), server_hostname="localhost")
    conn = await accepted
    try:
        with caplog.at_level(logging.ERROR, logger="rpcproxy"):
            writer.write(b"hello")
            assert await asyncio.wait_for(app.lost, 10) is None
            assert await asyncio.wait_for(reader.read(), 10) == b""
        (rec,) = [r for r in caplog.records if "data_received failed" in r.getMessage()]
        assert rec.exc_info is not None and conn.is_closing()
    finally:
        writer.close()
        conn.abort()
        listener.close()


async def test_lean_tls_wrap_failure_forgets_the_connection(
        pair: certs.CreatedCertificate) -> None:
    """A socket that cannot be wrapped (the client reset it while a PROXY header was
    awaited): the guard forgets the connection and its handshake entry, and counts it."""
    from rpcproxy.http.aiohttp_glue import ConnectionGuard
    from rpcproxy.ratelimit import Refusal

    guard = ConnectionGuard(10, 5.0)
    refused: list[Refusal] = []
    guard.on_refused = lambda reason, *rest: refused.append(reason)
    class Handler(asyncio.Protocol):  # (the guard keeps weak references to handlers)
        pass

    handler = Handler()
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))

    class Accepted(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 4242) if name == "peername" else default

        def close(self) -> None:
            pass

    assert guard.admit(handler, Accepted())
    waiting: Any = asyncio.get_running_loop().create_future()  # the header's wait, done
    guard.handshakes[handler] = (waiting, raw, Refusal.PROXY_HEADER)
    raw.close()  # gone: wrapping it fails
    guard.lean_tls(handler, raw, certs.server_ssl_context(str(pair.cert_path),
                                                          str(pair.key_path)))
    assert not guard.pending and not guard.handshakes and not guard.per_source
    assert guard.tls_failed == 1 and refused == [Refusal.TLS_FAILED]
