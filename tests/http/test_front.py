"""rpcproxy.http.front over real sockets: channel requests served without aiohttp's request
path, answered byte for byte as aiohttp answers them, and everything else handed to aiohttp.

The oracle for "as aiohttp answers": the same request with its method in lower case is not
ours (request_head takes the exact method only), so aiohttp parses it (upper-casing the
method) and calls the same handler; both answers must match but for the Date.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web_protocol
import pytest

from rpcproxy import config as config_mod
from rpcproxy.http import front
from rpcproxy.rpch import rts
from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend, TableAuthenticator, basic, request_pdu
from tests.support.proxy_env import Env
from tests.support.rpch_raw import GIB, open_vc

TIMEOUT = 5.0
ALICE = basic("alice", "pw-alice")


async def make_env(authenticator: TableAuthenticator | None = None, **overrides: Any) -> Env:
    backend = await EchoBackend().start()
    cfg: dict[str, Any] = {"listen": "127.0.0.1:0", "backend": backend.endpoint,
                           "targets": ["srv:6001"], "basic_over_http": True, **overrides}
    server = ProxyServer(config_mod.load(None, cfg),
                         authenticator=authenticator or TableAuthenticator())
    return Env(server, (await server.start())[0][1], backend)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await make_env()
    yield e
    await e.server.stop()
    await e.backend.stop()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Requests served, by who served them: "front" or "aiohttp"."""
    counts: collections.Counter[str] = collections.Counter()
    aiohttp_serve = aiohttp.web_protocol.RequestHandler._handle_request
    front_serve = front.FrontConnection._serve

    async def by_aiohttp(self: Any, *args: Any) -> Any:
        counts["aiohttp"] += 1
        return await aiohttp_serve(self, *args)

    async def by_front(self: front.FrontConnection, request: front.FrontRequest) -> None:
        counts["front"] += 1
        await front_serve(self, request)

    monkeypatch.setattr(aiohttp.web_protocol.RequestHandler, "_handle_request", by_aiohttp)
    monkeypatch.setattr(front.FrontConnection, "_serve", by_front)
    return counts


def head(method: str = "RPC_IN_DATA", *, length: int | None = 0, version: str = "1.1",
         target: str = "/rpc/rpcproxy.dll?srv:6001", extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1", "User-Agent: MSRPC",
             "Connection: Keep-Alive"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status line, headers (Date dropped) and body of the next response."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status, *lines = raw.decode("latin-1").split("\r\n")[:-2]
        headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines)]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)
        return status, [(k, v) for k, v in headers if k != "Date"], body

    async def closed(self) -> bool:
        """Whether the server closed the connection (after what was read so far)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), 0.3) == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


async def test_a_virtual_connection_opens_without_aiohttp(
        env: Env, served: collections.Counter[str]) -> None:
    vc = await open_vc(env.port, ALICE)
    vc.inp.send(request_pdu(1, b"ping"))
    assert (await vc.rpc_pdu())[2] == 2
    vc.close()
    assert served == {"front": 2}


CASES: dict[str, Callable[[str], bytes]] = {
    "401 with schemes": lambda m: head(m),
    "401 and close (channel-sized)": lambda m: head(m, length=GIB),
    "401, body drained": lambda m: head(m, length=4) + b"abcd",
    "echo": lambda m: head(m, extra=(f"Authorization: {ALICE}",)),
    "echo with a body": lambda m: head(m, length=16, extra=(f"Authorization: {ALICE}",))
    + b"x" * 16,
    "echo over HTTP/1.0": lambda m: head(m, version="1.0", extra=(f"Authorization: {ALICE}",)),
    "echo, Connection: close": lambda m: head(m, extra=(f"Authorization: {ALICE}",
                                                         "Connection: close")).replace(
        b"Connection: Keep-Alive\r\n", b""),
    "401 denied": lambda m: head(m, length=4, extra=("Authorization: Basic Ym9iOndyb25n",))
    + b"abcd",
    "503 target refused": lambda m: head(m, length=GIB, target="/rpc/rpcproxy.dll?evil:6001",
                                         extra=(f"Authorization: {ALICE}",)),
    "503 no target": lambda m: head(m, length=GIB, target="/rpcwithcert/rpcproxy.dll",
                                    extra=(f"Authorization: {ALICE}",)),
    "503 bad length": lambda m: head(m, length=100, extra=(f"Authorization: {ALICE}",)),
    "100 Continue, then 503": lambda m: head(m, length=GIB, extra=(
        f"Authorization: {ALICE}", "Expect: 100-continue")) + b"\x05\x00\x14\x03" + b"\0" * 12,
}


@pytest.mark.parametrize("case", list(CASES))
async def test_answers_are_aiohttps(env: Env, served: collections.Counter[str],
                                    case: str) -> None:
    answers = []
    for method in ("RPC_IN_DATA", "rpc_in_data"):
        conn = await Conn.open(env.port)
        conn.send(CASES[case](method))
        first = await conn.response()
        second = await conn.response() if first[0].startswith("HTTP/1.1 100") else None
        answers.append((first, second, await conn.closed()))
        conn.close()
    assert served == {"front": 1, "aiohttp": 1}
    assert answers[0] == answers[1]


async def test_keep_alive_pipelining_and_fall_back_on_one_connection(
        env: Env, served: collections.Counter[str]) -> None:
    conn = await Conn.open(env.port)
    auth = (f"Authorization: {ALICE}",)
    # Two requests of ours and one for aiohttp in one write, then one more of each.
    conn.send(head(extra=auth) + head("RPC_OUT_DATA", length=3, extra=auth) + b"abc"
              + head("GET", length=None))
    assert (await conn.response())[0] == "HTTP/1.1 200 Success"
    assert (await conn.response())[0] == "HTTP/1.1 200 Success"
    assert (await conn.response())[0] == "HTTP/1.1 405 Method Not Allowed"
    conn.send(head(extra=auth))  # ours, but the connection is aiohttp's now
    assert (await conn.response())[0] == "HTTP/1.1 200 Success"
    assert not await conn.closed()
    conn.close()
    assert served == {"front": 2, "aiohttp": 2}


async def test_split_head_and_a_head_that_turns_out_not_ours(
        env: Env, served: collections.Counter[str]) -> None:
    conn = await Conn.open(env.port)
    data = head(extra=(f"Authorization: {ALICE}",))
    for i in range(0, len(data), 7):  # ours, a few bytes at a time
        conn.send(data[i:i + 7])
        await asyncio.sleep(0.005)
    assert (await conn.response())[0] == "HTTP/1.1 200 Success"
    conn.send(b"RPC_IN_DATA /rpc/rpcproxy.dll HTTP/1.1\r\nHost: a\r\nX-A: b\x00\r\n")
    await asyncio.sleep(0.05)
    conn.send(b"\r\n")  # aiohttp has every byte: its 400
    status, _headers, _body = await conn.response()
    assert " 400 " in status
    assert await conn.closed()
    assert served == {"front": 1, "aiohttp": 1}


async def test_idle_keep_alive_connection_is_closed_as_by_aiohttp() -> None:
    e = await make_env(handshake_timeout=0.5)
    try:
        conn = await Conn.open(e.port)
        conn.send(head(extra=(f"Authorization: {ALICE}",)))
        assert (await conn.response())[0] == "HTTP/1.1 200 Success"
        await asyncio.sleep(0.2)
        assert not await conn.closed()
        # then nothing (or half a head) for keepalive_timeout = handshake_timeout: closed
        conn.send(b"RPC_IN_DATA /rpc/")
        assert await asyncio.wait_for(conn.reader.read(1), 2.0) == b""
        conn.close()
    finally:
        await e.server.stop()
        await e.backend.stop()


async def test_client_leaving_mid_request_is_one_refusal_line(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    conn = await Conn.open(env.port)
    conn.send(head(length=GIB, extra=(f"Authorization: {ALICE}",)) + b"\x05\x00")
    await asyncio.sleep(0.05)
    conn.close()

    def gone() -> bool:
        return env.server.metrics.refused["client_disconnected"] >= 1

    await _until(gone)
    assert not [r for r in caplog.records if r.exc_info]


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


NOT_OURS: dict[str, bytes] = {
    "header line over aiohttp's limit": head(extra=("X-A: " + "b" * 9000,)),
    "too many headers": head(extra=tuple(f"X-{i}: v" for i in range(130))),
    "duplicate Content-Length": head(length=5, extra=("Content-Length: 6",)) + b"abcdef",
    "signed Content-Length": head(length=None, extra=("Content-Length: +5",)) + b"abcde",
    "Content-Length and Transfer-Encoding": head(
        length=5, extra=("Transfer-Encoding: chunked",)) + b"0\r\n\r\n",
    "chunked": head(length=None, extra=("Transfer-Encoding: chunked",)) + b"0\r\n\r\n",
    "obs-fold": head(extra=("X-A: b", " c")),
    "NUL in a value": head(extra=("X-A: b\x00c",)),
    "space before the colon": head(length=None, extra=("Content-Length : 5",)),
    "HTTP/1.1 without Host": head().replace(b"Host: 127.0.0.1\r\n", b""),
}


@pytest.mark.parametrize("case", list(NOT_OURS))
async def test_odd_channel_requests_are_aiohttps_to_answer(
        env: Env, served: collections.Counter[str], case: str) -> None:
    """Smuggling shapes and oversized heads never reach the front: aiohttp (or, for what it
    accepts, the handler through aiohttp) answers 400 and closes, as before the front."""
    conn = await Conn.open(env.port)
    conn.send(NOT_OURS[case])
    status, _headers, _body = await conn.response()
    assert " 400 " in status
    assert await conn.closed()
    conn.close()
    assert served["front"] == 0


async def test_a_dribbled_head_is_bounded() -> None:
    """Closed at keepalive_timeout (= handshake_timeout), as aiohttp closes it."""
    e = await make_env(handshake_timeout=0.5)
    try:
        conn = await Conn.open(e.port)
        started = asyncio.get_running_loop().time()
        conn.send(b"RPC_IN_DATA /rpc/rpcproxy.dll?srv:6001 HTTP/1.1\r\n")
        while not conn.reader.at_eof():
            conn.send(b"X-A: b\r\n")
            assert asyncio.get_running_loop().time() - started < 3.0
            try:
                await asyncio.wait_for(conn.reader.read(1), 0.1)
            except TimeoutError:
                pass
        assert asyncio.get_running_loop().time() - started > 0.4
        conn.close()
    finally:
        await e.server.stop()
        await e.backend.stop()


async def test_server_stop_closes_front_connections() -> None:
    e = await make_env()
    idle, partial = await Conn.open(e.port), await Conn.open(e.port)
    try:
        idle.send(head(extra=(f"Authorization: {ALICE}",)))
        assert (await idle.response())[0] == "HTTP/1.1 200 Success"
        partial.send(b"RPC_IN_DATA /rpc/rpcproxy.dll?srv:6001 HTTP/1.1\r\nHost: a\r\n")
        await asyncio.sleep(0.05)
        await asyncio.wait_for(e.server.stop(), TIMEOUT)
        assert await idle.closed() and await partial.closed()
    finally:
        idle.close()
        partial.close()
        await e.backend.stop()


async def test_a_client_that_does_not_read_its_answers_is_not_served_more(
        env: Env, served: collections.Counter[str]) -> None:
    """Pipelined requests from a client that never reads the answers: once the answers fill
    the connection's write buffer, the front serves no more and stops reading (as aiohttp's
    writer drains), so one connection cannot make the proxy buffer without bound."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", env.port))
    await _until(lambda: len(env.server.guard.pending) == 1)
    (handler,) = env.server.guard.pending  # the one connection, not yet authenticated
    transport = handler.transport  # type: ignore[attr-defined]
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setblocking(False)
    one = head(length=0)  # unauthenticated: a 401 each, at once
    burst = one * 1000
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    try:
        while loop.time() < deadline and sent < 40 * len(burst):
            try:
                sent += sock.send(burst)
            except BlockingIOError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        asked = sent // len(one)
        assert asked > 5000, asked  # the client did pipeline a lot
        assert served["front"] < 3000, (served, asked)  # answered only as far as it reads
        assert transport.get_write_buffer_size() < 1 << 20
    finally:
        sock.close()


class _SlowAuthenticator(TableAuthenticator):
    """Judges like TableAuthenticator, 0.2 s late (as while waiting for an NTLM helper)."""

    async def authenticate(self, *args: Any, **kw: Any) -> Any:
        await asyncio.sleep(0.2)
        return await super().authenticate(*args, **kw)


@pytest.mark.parametrize("method", ["RPC_IN_DATA", "RPC_OUT_DATA"])
async def test_client_gone_while_judged_with_its_first_pdu_sent(
        method: str, caplog: pytest.LogCaptureFixture) -> None:
    """The head and the first RTS PDU in one write, then the client leaves while its login is
    judged: one client_disconnected line, counted, no traceback (the buffered PDU must not be
    read as if the connection were still there)."""
    e = await make_env(_SlowAuthenticator())
    try:
        pdu = (rts.conn_b1(os.urandom(16), os.urandom(16), os.urandom(16))
               if method == "RPC_IN_DATA" else rts.conn_a1(os.urandom(16), os.urandom(16),
                                                            0x40000))
        conn = await Conn.open(e.port)
        conn.send(head(method, length=GIB if method == "RPC_IN_DATA" else 76,
                       extra=(f"Authorization: {ALICE}",)) + pdu)
        await asyncio.sleep(0.05)  # being judged
        conn.close()
        await _until(lambda: e.server.metrics.refused["client_disconnected"] >= 1)
        assert not [r for r in caplog.records if r.exc_info], caplog.text
        assert "Error handling request" not in caplog.text
    finally:
        await e.server.stop()
        await e.backend.stop()
