"""What one hostile client can do to the log and to everyone else (issue 12, items 3-7).

Flooding clients connect from 127.0.0.1; well-behaved ones bind their sockets to other
loopback addresses (127.0.0.2, ...), so per-source bounds see them as other sources
(loopback is exempt from them by default, as a front proxy's address: not here).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import spnego

from rpcproxy import certs
from rpcproxy import config as config_mod
from rpcproxy.logs import JsonFormatter, TextFormatter
from rpcproxy.prometheus import ProxyCollector
from rpcproxy.ratelimit import Exemptions, Refusal, RefusalLog, source_key
from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend, TableAuthenticator, basic
from tests.support.rpch_raw import RawChannel, open_vc
from tests.support.samba_dc import SambaDC

PATH = "/rpc/rpcproxy.dll?srv:6001"
ALICE = basic("alice", "pw-alice")
FORGED = "alice\0\n2026-01-01 00.00.00 INFO rpcproxy vc=x closed user=administrator"
GOOD_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


async def start(backend: EchoBackend, authenticator: Any = None, **overrides: Any) -> ProxyServer:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0", "backend": backend.endpoint, "targets": ["srv:6001"],
        "basic_over_http": True,
        "per_source_exempt": [],  # the flood comes from loopback here
    }
    cfg.update(overrides)
    server = ProxyServer(config_mod.load(None, cfg),
                         authenticator=authenticator
                         or TableAuthenticator())
    await server.start()
    return server


def port_of(server: ProxyServer) -> int:
    listener = server.servers[0]
    assert isinstance(listener, asyncio.Server)
    return int(listener.sockets[0].getsockname()[1])


@pytest.fixture
async def backend() -> AsyncIterator[EchoBackend]:
    b = await EchoBackend().start()
    yield b
    await b.stop()


def refused_metric(server: ProxyServer) -> dict[str, float]:
    for family in ProxyCollector(server).collect():
        if family.name == "rpcproxy_refused":
            return {s.labels["reason"]: s.value for s in family.samples
                    if s.name == "rpcproxy_refused_total"}
    raise AssertionError("no rpcproxy_refused metric")


def proxy_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith(("rpcproxy", "aiohttp")) and r.levelno >= logging.WARNING]


async def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- item 3: log injection -------------------------------------------------------------------


async def test_client_text_cannot_forge_log_lines(backend: EchoBackend,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    auth = TableAuthenticator({FORGED: "pw"})
    server = await start(backend, auth)
    try:
        ch = await RawChannel.connect(port_of(server))  # a refused target logs the user name
        ch.request("RPC_IN_DATA", "/rpc/rpcproxy.dll?other:6001", content_length=1 << 30,
                   headers={"Authorization": basic(FORGED, "pw")})
        assert (await ch.head()).status == 503
        ch.close()
        vc = await open_vc(port_of(server), basic(FORGED, "pw"))  # and the closing VC's line
        vc.close()
        raw = await RawChannel.connect(port_of(server))  # a request line with NUL
        raw.send(b"RPC_IN_DATA /rpc\x00x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await raw.closed()
        assert await wait_for(lambda: not server.vcs and len(
            [r for r in caplog.records if r.name == "rpcproxy"]) >= 3)
    finally:
        await server.stop()
    records = [r for r in caplog.records if r.name == "rpcproxy"]
    assert any(FORGED in r.getMessage() for r in records)
    text, js = io.StringIO(), io.StringIO()
    for fmt, out in ((TextFormatter("%(levelname)s %(name)s: %(message)s"), text),
                     (JsonFormatter(), js)):
        handler = logging.StreamHandler(out)
        handler.setFormatter(fmt)
        for record in records:
            handler.emit(record)
    lines = text.getvalue().splitlines()
    assert len(lines) == len(records)  # one line per record, whatever the client wrote
    assert not any("\0" in line or line.startswith("2026-01-01") for line in lines)
    assert any("alice\\x00\\x0a2026-01-01" in line for line in lines)
    decoded = [json.loads(line) for line in js.getvalue().splitlines()]
    assert len(decoded) == len(records)
    assert any(FORGED in d["msg"] for d in decoded)  # a plain JSON string, unchanged
    assert any(d.get("user") == f"TEST\\{FORGED}" for d in decoded)


# --- item 6: aggregated refusals -------------------------------------------------------------


async def test_refusal_flood_gives_a_summary_and_counts(backend: EchoBackend,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await start(backend, max_unauthenticated_per_source=5, refusal_log_interval=0.5)
    flood = 300
    socks = []
    try:
        for _ in range(flood):
            s = socket.create_connection(("127.0.0.1", port_of(server)))
            socks.append(s)
        assert await wait_for(lambda: server.guard.rejected == flood - 5)
        await asyncio.sleep(0.7)  # the window ends: its summary is written
        lines = proxy_lines(caplog)
        assert 2 <= len(lines) <= 7, [r.getMessage() for r in lines]  # O(1), not `flood`
        summary = lines[-1].getMessage()
        assert f"refused {flood - 5 - (len(lines) - 1)} more" in summary
        assert "unauthenticated_per_source=" in summary and "127.0.0.1=" in summary
        assert refused_metric(server)["unauthenticated_per_source"] == flood - 5
    finally:
        for s in socks:
            s.close()
        await server.stop()


# --- item 7: no tracebacks from client behaviour ---------------------------------------------

AUTH = f"Authorization: {ALICE}\r\n"
CLIENT_FAULTS = {
    "gone_in_first_pdu": (f"RPC_OUT_DATA {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 76\r\n"
                          f"{AUTH}\r\n").encode() + b"\x05\x00\x14",
    "gone_in_echo_body": (f"RPC_IN_DATA {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                          f"{AUTH}\r\n").encode() + b"\x05",
    "gone_after_100_continue": (f"RPC_IN_DATA {PATH} HTTP/1.1\r\nHost: x\r\n"
                                f"Content-Length: 1073741824\r\nExpect: 100-continue\r\n"
                                f"{AUTH}\r\n").encode(),
    "bad_url": b"RPC_IN_DATA /x\x00y HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid_header": b"RPC_IN_DATA / HTTP/1.1\r\nFoo\x01: b\r\n\r\n",
    "line_too_long": b"RPC_IN_DATA /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    "bare_lf": b"RPC_IN_DATA / HTTP/1.1\nHost: x\n\n",
    "bad_status_line": b"RPC_IN_DATA / HTTP/9.9x\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(CLIENT_FAULTS))
async def test_client_faults_give_one_short_line(backend: EchoBackend, case: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await start(backend)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port_of(server))
        w.write(CLIENT_FAULTS[case])
        await w.drain()
        await asyncio.sleep(0.2)
        w.close()
        assert await wait_for(lambda: proxy_lines(caplog), 3)
        await asyncio.sleep(0.2)
    finally:
        await server.stop()
    lines = proxy_lines(caplog)
    assert "Traceback" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert "\n" not in message and len(message) < 300
    assert message.startswith("refused 127.0.0.1:")


# --- item 4: fair bounds ---------------------------------------------------------------------


async def _logins(port: int, seconds: float) -> tuple[int, int]:
    """Well-behaved clients from other addresses open and close VCs: (ok, failed)."""
    ok = failed = 0
    deadline = time.monotonic() + seconds

    async def one(source: str) -> None:
        nonlocal ok, failed
        while time.monotonic() < deadline:
            try:
                vc = await open_vc(port, ALICE, source=source)
            except (AssertionError, OSError, asyncio.IncompleteReadError, TimeoutError):
                failed += 1
                await asyncio.sleep(0.05)
                continue
            vc.close()
            ok += 1

    await asyncio.gather(*(one(s) for s in GOOD_SOURCES))
    return ok, failed


async def _slowloris(port: int, n: int, stop: asyncio.Event) -> None:
    writers = []
    for _ in range(n):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            continue
        w.write(b"RPC_IN_DATA /rpc/rpcproxy.dll?srv:6001 HTTP/1.1\r\n")
        writers.append(w)
    while not stop.is_set():
        for w in writers:
            if not w.is_closing():
                w.write(b"X-a: b\r\n")
        await asyncio.sleep(0.2)
    for w in writers:
        w.close()


async def test_one_address_cannot_lock_out_the_others(backend: EchoBackend) -> None:
    server = await start(backend, max_unauthenticated_connections=200,
                         max_unauthenticated_per_source=20)
    port = port_of(server)
    idle: list[socket.socket] = []
    stop = asyncio.Event()
    try:
        before, failed = await _logins(port, 1.0)
        assert before and not failed
        for _ in range(300):  # idle sockets from one address, more than the global bound
            idle.append(socket.create_connection(("127.0.0.1", port)))
        loris = asyncio.create_task(_slowloris(port, 300, stop))
        await asyncio.sleep(0.3)
        assert len(server.guard.pending) <= 20
        during, failed = await _logins(port, 1.0)
        stop.set()
        await loris
        print(f"VC logins/s from other addresses: {before:.0f} before, {during:.0f} during "
              "the flood")
        assert failed == 0 and during >= before / 3, (before, during, failed)
        assert refused_metric(server)["unauthenticated_per_source"] >= 500
    finally:
        stop.set()
        for s in idle:
            s.close()
        await server.stop()


async def _ntlm_echo(port: int, source: str, user: str, password: str) -> int:
    ch = await RawChannel.connect(port, source)
    try:
        client = spnego.client(user, password, protocol="ntlm")
        t1 = client.step()
        assert t1 is not None
        ch.request("RPC_IN_DATA", PATH, content_length=0,
                   headers={"Authorization": "NTLM " + base64.b64encode(t1).decode()})
        head = await ch.head()
        await ch.body(head)
        if head.status != 401:
            return head.status
        t3 = client.step(base64.b64decode(head.headers["www-authenticate"].split()[1]))
        assert t3 is not None
        ch.request("RPC_IN_DATA", PATH, content_length=0,
                   headers={"Authorization": "NTLM " + base64.b64encode(t3).decode()})
        return (await ch.head()).status
    finally:
        ch.close()


async def _half_done_ntlm(port: int, n: int) -> list[RawChannel]:
    held = []
    for _ in range(n):
        ch = await RawChannel.connect(port)
        t1 = spnego.client("x", "y", protocol="ntlm").step()
        assert t1 is not None
        ch.request("RPC_IN_DATA", PATH, content_length=0,
                   headers={"Authorization": "NTLM " + base64.b64encode(t1).decode()})
        await ch.head()
        held.append(ch)
    return held


@pytest.mark.samba
async def test_half_done_ntlm_handshakes_from_one_address(samba_dc: SambaDC) -> None:
    endpoint = f"{samba_dc.host}:{samba_dc.port}"
    cfg = config_mod.load(None, {
        "listen": "127.0.0.1:0", "backend": endpoint, "server_names": ["srv"],
        "max_pending_handshakes": 24, "max_pending_handshakes_per_source": 4,
        "per_source_exempt": [], "ntlm_helper": samba_dc.ntlm_helper()})
    server = ProxyServer(cfg)
    await server.start()
    port = port_of(server)
    try:
        held = await _half_done_ntlm(port, 40)  # 4 hold a Samba socket, 36 get 503
        assert server.authenticator.pending_count() == 4
        statuses = [await _ntlm_echo(port, src, "testuser", "Test1234")
                    for src in GOOD_SOURCES for _ in range(3)]
        assert statuses == [200] * len(statuses)
        assert refused_metric(server)["pending_handshakes_per_source"] == 36
        for ch in held:
            ch.close()
    finally:
        await server.stop()


async def test_front_proxy_addresses_are_bounded_only_globally(backend: EchoBackend) -> None:
    """The default exempts loopback (a TLS terminator or HAProxy on this host)."""
    server = await start(backend, max_unauthenticated_per_source=5,
                         per_source_exempt=["127.0.0.0/8"])
    socks = []
    try:
        for _ in range(20):
            socks.append(socket.create_connection(("127.0.0.1", port_of(server))))
        assert await wait_for(lambda: len(server.guard.pending) == 20)
        assert server.guard.rejected == 0
    finally:
        for s in socks:
            s.close()
        await server.stop()
    assert config_mod.Config().per_source_exempt == ["127.0.0.0/8", "::1/128"]


# --- item 5: TLS handshakes inside the guard -------------------------------------------------


@pytest.fixture
def tls_pair(tmp_path: Path) -> certs.CreatedCertificate:
    return certs.create_self_signed("mail.example.com", tmp_path)


async def _tls_get(port: int, pair: certs.CreatedCertificate, source: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(pair.cert_path))
    r, w = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="mail.example.com",
        local_addr=(source, 0)), 5)
    try:
        w.write(b"RPC_IN_DATA /rpc/rpcproxy.dll HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")
        return await asyncio.wait_for(r.readline(), 5)
    finally:
        w.close()


def _closed(s: socket.socket) -> bool:
    s.settimeout(3)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_stalled_tls_handshakes_are_bounded(backend: EchoBackend,
                                                  tls_pair: certs.CreatedCertificate,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await start(backend, tls_cert=str(tls_pair.cert_path),
                         tls_key=str(tls_pair.key_path), handshake_timeout=1.0,
                         max_unauthenticated_connections=40, max_unauthenticated_per_source=10)
    port = port_of(server)
    stalled = []
    try:
        started = time.monotonic()
        for i in range(60):  # never a ClientHello, or half of one
            s = socket.create_connection(("127.0.0.1", port))
            if i % 2:
                s.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            stalled.append(s)
        assert await wait_for(lambda: server.guard.rejected == 50)
        assert len(server.guard.pending) == 10  # counted while their handshakes run
        for source in GOOD_SOURCES:  # a real TLS client is not locked out
            assert (await _tls_get(port, tls_pair, source)).startswith(b"HTTP/1.1 401")
        for s in stalled:
            assert await asyncio.to_thread(_closed, s)  # closed by the proxy...
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 5, elapsed  # ...at handshake_timeout (1 s), not at 60 s
        assert refused_metric(server)["tls_handshake_timeout"] == 10
        assert await wait_for(lambda: not server.guard.pending and not server.guard.handshakes)
    finally:
        for s in stalled:
            s.close()
        await server.stop()
    lines = proxy_lines(caplog)
    assert len(lines) <= 6 and "Traceback" not in caplog.text
    assert "tls_handshake_timeout=" in lines[-1].getMessage()


# --- the sans-IO parts -----------------------------------------------------------------------


def test_source_key_groups_ipv6_by_64() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("fe80::1%eth0") == "fe80::/64"
    exempt = Exemptions(["127.0.0.0/8", "::1/128"])
    assert "127.0.0.9" in exempt and "::1" in exempt and "::ffff:127.0.0.1" in exempt
    assert "192.0.2.7" not in exempt and "?" not in exempt


def test_refusal_log_windows() -> None:
    rl = RefusalLog(interval=10.0, burst=2, top=2)
    lines = [rl.note(Refusal.AUTH_DENIED, f"10.0.0.{i % 3}", "bad password", 100.0 + i * 0.01)
             for i in range(1000)]
    assert sum(len(x) for x in lines) == 2  # the burst, then only counting
    assert rl.due() == 110.0 and rl.flush(105.0) is None
    summary = rl.flush(110.0)
    assert summary is not None and "refused 998 more in the last 10s: auth_denied=998" in summary
    assert "top sources: 10.0.0." in summary and summary.count("=") == 3  # reason + 2 sources
    assert rl.due() is None and rl.flush(200.0) is None
    # a late timer: the next refusal first closes the old window
    for _ in range(3):
        rl.note(Refusal.BAD_REQUEST, "a", "x" * 1000, 300.0)
    out = rl.note(Refusal.BAD_REQUEST, "a", "y", 400.0)
    assert out[0].startswith("refused 1 more") and out[1].startswith("refused a (bad_request)")
    assert len(rl.note(Refusal.BAD_REQUEST, "a", "x" * 1000, 400.0)[0]) < 300  # truncated
