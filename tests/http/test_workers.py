"""Multi-worker mode: the channels of one VC meet in the worker that owns its cookie.

Two ProxyServers in one event loop stand in for two worker processes: each
has its own listener and WorkerSet, and they share the inboxes, so a channel
accepted by the "wrong" one is really handed off (SCM_RIGHTS, or a TLS relay)
to its owner. The supervisor's fork/respawn path is exercised by running
``rpcproxy serve --workers 2`` in test_multiworker_process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.client import BasicAuth, RpchClient
from rpcproxy import config as config_mod
from rpcproxy.http.handoff import Handoff, WorkerSet, owner_of
from rpcproxy.rpch import rts
from rpcproxy.server import ProxyServer
from rpcproxy.workers import make_inboxes
from tests.support.bio_tls import BioTlsClient
from tests.support.fakes import EchoBackend, TableAuthenticator, basic, request_pdu
from tests.support.rpch_raw import RawChannel, open_vc

ALICE = basic("alice", "pw-alice")


def test_owner_is_stable_and_spread() -> None:
    cookies = [os.urandom(16) for _ in range(2000)]
    owners = [owner_of(c, 2) for c in cookies]
    assert owners == [owner_of(c, 2) for c in cookies]
    assert 800 < owners.count(0) < 1200
    assert all(owner_of(c, 1) == 0 for c in cookies[:10])


def test_supervisor_binds_the_listeners_the_server_opens() -> None:
    """The supervisor binds ``Config.listen_addresses()`` before forking; a worker's
    ProxyServer opens its listeners on those sockets in the same order (TLS first)."""
    plain = config_mod.load(None, {"backend": "127.0.0.1:1", "listen": "127.0.0.1:8443",
                                   "http_listen": "127.0.0.1:8080"})
    assert plain.listen_addresses() == [("127.0.0.1:8443", False)]  # no TLS: one listener
    tls = dataclasses.replace(plain, tls_cert="cert.pem", tls_key="key.pem")
    assert tls.listen_addresses() == [("127.0.0.1:8443", True), ("127.0.0.1:8080", False)]
    assert dataclasses.replace(tls, http_listen=None).listen_addresses() == [
        ("127.0.0.1:8443", True)]


def test_handoff_record_round_trip() -> None:
    h = Handoff("RPC_IN_DATA", b"\x05\x00pdu", 123, b"\x00left", "alice", "TEST", "srv",
                6001, "127.0.0.1", 1024, "127.0.0.1:5555")
    assert Handoff.decode(h.encode()) == h


async def make_pair(backend: EchoBackend, **extra: Any) -> list[ProxyServer]:
    inboxes = make_inboxes(2)
    servers = []
    for i in range(2):
        cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": backend.endpoint,
                                     "targets": ["srv:6001"], "basic_over_http": True,
                                     **extra})
        ws = WorkerSet(i, 2, [p[0] for p in inboxes], inboxes[i][1])
        server = ProxyServer(cfg, authenticator=TableAuthenticator(),
                             workers=ws)
        server.bound = await server.start()  # type: ignore[attr-defined]
        servers.append(server)
    return servers


@pytest.fixture
async def backend() -> AsyncIterator[EchoBackend]:
    b = await EchoBackend().start()
    yield b
    await b.stop()


async def exercise(inp: RawChannel, out: RawChannel, calls: int = 30) -> None:
    for call_id in range(1, calls + 1):
        stub = struct.pack("<I", call_id) * (call_id * 40)
        inp.send(request_pdu(call_id, stub))
        while True:
            pdu = await out.pdu()
            if pdu[2] != 20:
                break
        assert pdu[2] == 2 and pdu[3:] == request_pdu(call_id, stub)[3:]


async def split_vcs(port_pairs: tuple[tuple[int, int], ...], *, calls: int = 30,
                    ssl_ctx: ssl.SSLContext | None = None, timeout: float | None = None
                    ) -> None:
    """One VC after another, IN on the first port of a pair and OUT on the second, each
    ``exercise``d and closed (opening and exercising each within ``timeout``, if given)."""
    for in_port, out_port in port_pairs:
        vc = await asyncio.wait_for(
            open_vc(in_port, ALICE, out_port=out_port, ssl_ctx=ssl_ctx), timeout)
        await asyncio.wait_for(exercise(vc.inp, vc.out, calls=calls), timeout)
        vc.close()


async def test_channels_split_across_workers_meet(backend: EchoBackend) -> None:
    a, b = await make_pair(backend)
    pa, pb = a.bound[0][1], b.bound[0][1]  # type: ignore[attr-defined]
    try:
        await split_vcs(((pa, pb), (pb, pa), (pa, pa), (pb, pb)) * 3)
        assert a.workers is not None and b.workers is not None
        assert a.workers.sent + b.workers.sent > 0, "some channels must have been handed off"
        assert a.workers.received + b.workers.received == a.workers.sent + b.workers.sent
    finally:
        await a.stop()
        await b.stop()


async def test_recycling_with_full_client_across_workers(backend: EchoBackend) -> None:
    """RpchClient opens successors on whichever port; OUT_R2 and IN_R2 still work."""
    a, b = await make_pair(backend, out_content_length=80 * 1024)
    try:
        client = await RpchClient.connect(
            "127.0.0.1", a.bound[0][1], target="srv:6001",  # type: ignore[attr-defined]
            auth=BasicAuth("alice", "pw-alice"), in_content_length=0x20000, timeout=10)
        digest = hashlib.sha256()
        back = hashlib.sha256()
        for call_id in range(1, 150):
            pdu = request_pdu(call_id, bytes([call_id % 256]) * 3000)
            digest.update(pdu[3:])
            await client.send_pdu(pdu)
            back.update((await client.recv_pdu())[3:])
        assert back.digest() == digest.digest()
        assert client.out_recycles >= 2 and client.in_recycles >= 2
        await client.close()
    finally:
        await a.stop()
        await b.stop()


async def make_tls_pair(backend: EchoBackend, tmp_path: Path
                        ) -> tuple[ProxyServer, ProxyServer, ssl.SSLContext]:
    """Two TLS workers with a throwaway certificate, and a client context trusting it."""
    from rpcproxy.certs import create_self_signed

    create_self_signed("proxy.example.com", tmp_path)
    a, b = await make_pair(backend, tls_cert=str(tmp_path / "cert.pem"),
                           tls_key=str(tmp_path / "key.pem"), basic_over_http=False)
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    client_ctx.check_hostname = False
    return a, b, client_ctx


async def test_tls_channels_relayed_to_owner(backend: EchoBackend, tmp_path: Path) -> None:
    a, b, client_ctx = await make_tls_pair(backend, tmp_path)
    pa, pb = a.bound[0][1], b.bound[0][1]  # type: ignore[attr-defined]
    try:
        await split_vcs(((pa, pb), (pb, pa)) * 3, calls=10, ssl_ctx=client_ctx)
        assert a.workers is not None and b.workers is not None
        assert a.workers.sent + b.workers.sent > 0
    finally:
        await a.stop()
        await b.stop()


async def test_tls_relay_keeps_an_answer_that_comes_before_it_is_wired(
        backend: EchoBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner may answer a TLS channel handed to it (an OUT channel's 200 and CONN/A3)
    before the worker that holds the TLS connection has finished setting up its relay:
    those bytes must still reach the client (they were once dropped under load, and the
    VC never opened)."""
    from rpcproxy.http import handoff

    loop_type = type(asyncio.get_running_loop())
    original = loop_type.connect_accepted_socket

    async def slow_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = await original(self, *args, **kwargs)
        if isinstance(made[1], handoff._Relay):  # the TLS holder's end of the socketpair
            await asyncio.sleep(0.3)  # it is already being read; the owner answers
        return made

    monkeypatch.setattr(loop_type, "connect_accepted_socket", slow_connect)
    a, b, client_ctx = await make_tls_pair(backend, tmp_path)
    pa, pb = a.bound[0][1], b.bound[0][1]  # type: ignore[attr-defined]
    try:
        await split_vcs(((pa, pb), (pb, pa)), calls=3, ssl_ctx=client_ctx, timeout=10)
        assert a.workers is not None and b.workers is not None
        assert a.workers.sent + b.workers.sent > 0
    finally:
        await a.stop()
        await b.stop()


async def test_tls_hand_off_out_of_descriptors_is_a_503(
        backend: EchoBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A TLS channel that reaches the worker not owning its VC while that worker is out of
    descriptors (no socketpair for the relay): the client gets a 503 (server too busy) and
    the proxy one refusal line naming the reason, not a traceback."""
    import errno

    def no_pair(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    a, b, client_ctx = await make_tls_pair(backend, tmp_path)
    pa, pb = a.bound[0][1], b.bound[0][1]  # type: ignore[attr-defined]
    try:
        monkeypatch.setattr(socket, "socketpair", no_pair)  # (what handoff calls)
        caplog.set_level(logging.INFO, logger="rpcproxy")
        statuses: list[int | None] = []
        for port, other in ((pa, 1), (pb, 0)):  # each time a VC the other worker owns
            cookie = next(c for c in iter(lambda: os.urandom(16), b"") if owner_of(c, 2) == other)
            ch = await RawChannel.connect(port, ssl_ctx=client_ctx)
            ch.request("RPC_OUT_DATA", "/rpc/rpcproxy.dll?srv:6001", content_length=76,
                       headers={"Authorization": ALICE})
            ch.send(rts.conn_a1(cookie, os.urandom(16), 0x40000))
            statuses.append((await asyncio.wait_for(ch.head(), 10)).status)
            ch.writer.close()
        assert statuses == [503, 503], statuses
        for server in (a, b):
            server._flush_refusals(final=True)
        assert all(rec.exc_info is None for rec in caplog.records), caplog.text
        assert "Too many open files" in caplog.text and "hand-off" in caplog.text
    finally:
        await a.stop()
        await b.stop()


async def test_tls_client_leaving_with_its_first_pdu_is_not_handed_off(
        backend: EchoBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A TLS channel whose first RTS PDU arrives together with the client's close_notify and
    FIN, for a VC the other worker owns: it is not handed off (no channel adopted for a
    client that is gone) and the proxy says client_disconnected once, with no traceback."""
    a, b, _ = await make_tls_pair(backend, tmp_path)
    pa = a.bound[0][1]  # type: ignore[attr-defined]
    cookie = next(c for c in iter(lambda: os.urandom(16), b"") if owner_of(c, 2) == 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def client() -> None:  # the PDU and close_notify in one send
        c = BioTlsClient(("127.0.0.1", pa), ctx, "proxy.example.com")
        c.raw.sendall(c.records(
            f"RPC_OUT_DATA /rpc/rpcproxy.dll?srv:6001 HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: 76\r\nAuthorization: {ALICE}\r\n\r\n".encode()))
        time.sleep(0.3)  # the request is judged; the proxy waits for the first PDU
        c.raw.sendall(c.records(rts.conn_a1(cookie, os.urandom(16), 0x40000))
                      + c.close_notify())
        c.raw.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        c.raw.close()

    try:
        caplog.set_level(logging.INFO, logger="rpcproxy")
        await asyncio.wait_for(asyncio.to_thread(client), 20)
        await asyncio.sleep(0.5)
        a._flush_refusals(final=True)
        assert all(rec.exc_info is None for rec in caplog.records), caplog.text
        assert "Error handling request" not in caplog.text
        assert b.workers is not None and b.workers.received == 0
        assert a.metrics.refused["client_disconnected"] == 1, a.metrics.refused
    finally:
        await a.stop()
        await b.stop()
