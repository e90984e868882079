"""The aiohttp adapter over real sockets: HTTP rules, pairing, data path, bad input.

Authentication is a table authenticator and the backend an echo server here;
the same paths against real Samba live in test_e2e_samba.py.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rpcproxy import config as config_mod
from rpcproxy.rpch import rts
from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend, TableAuthenticator, basic, request_pdu
from tests.support.proxy_env import Env
from tests.support.rpch_raw import GIB, RawChannel, open_vc

ALICE = basic("alice", "pw-alice")
BOB = basic("bob", "pw-bob")
PATH = "/rpc/rpcproxy.dll?srv:6001"


async def make_env(**overrides: Any) -> Env:
    backend = await EchoBackend().start()
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "backend": backend.endpoint,
        "targets": ["srv:6001-6002", "SRV.example.com:6004", "down:6001=127.0.0.1:9"],
        "basic_over_http": True,
    }
    cfg.update(overrides)
    server = ProxyServer(config_mod.load(None, cfg),
                         authenticator=TableAuthenticator())
    bound = await server.start()
    return Env(server, bound[0][1], backend)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await make_env()
    yield e
    await e.server.stop()
    await e.backend.stop()


async def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- HTTP surface ----------------------------------------------------------------------------


async def test_echo_on_both_methods_keeps_connection(env: Env) -> None:
    ch = await RawChannel.connect(env.port)
    for method in ("RPC_IN_DATA", "RPC_OUT_DATA"):
        ch.request(method, "/rpc/rpcproxy.dll?srv:6001", content_length=4,
                   headers={"Authorization": ALICE}, body=b"\xf8\xe8\x18\x08")
        head = await ch.head()
        assert (head.status, head.reason) == (200, "Success")
        assert head.headers["content-type"] == "application/rpc"
        assert await ch.body(head) == rts.ECHO
    ch.close()


async def test_rpcwithcert_path_served(env: Env) -> None:
    ch = await RawChannel.connect(env.port)
    ch.request("RPC_IN_DATA", "/rpcwithcert/rpcproxy.dll?srv:6001", content_length=0,
               headers={"Authorization": ALICE})
    assert (await ch.head()).status == 200
    ch.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("RPC_CONNECT", PATH, 501), ("GET", PATH, 405), ("POST", PATH, 405),
     ("RPC_IN_DATA", "/other.dll", 404)],
)
async def test_other_methods_and_paths(env: Env, method: str, path: str, status: int) -> None:
    ch = await RawChannel.connect(env.port)
    ch.request(method, path, content_length=0, headers={"Authorization": ALICE})
    head = await ch.head()
    assert head.status == status
    body = await ch.body(head)
    assert b"Traceback" not in body
    if status == 501:
        assert b"v1" in body
    ch.close()


async def test_unauthenticated_gets_401_with_schemes(env: Env) -> None:
    ch = await RawChannel.connect(env.port)
    ch.request("RPC_IN_DATA", PATH, content_length=0)
    head = await ch.head()
    assert head.status == 401
    assert "basic" in head.headers["www-authenticate"].lower()
    assert head.headers["server"] == "rpcproxy"  # no Python/aiohttp versions
    await ch.body(head)
    # the connection stays usable for the authenticated retry
    ch.request("RPC_IN_DATA", PATH, content_length=0, headers={"Authorization": ALICE})
    assert (await ch.head()).status == 200
    ch.close()


async def test_unauthenticated_channel_sized_request_is_closed(env: Env) -> None:
    ch = await RawChannel.connect(env.port)
    ch.request("RPC_IN_DATA", PATH, content_length=GIB, headers={"Authorization": BOB[:-4]})
    head = await ch.head()
    assert head.status == 401
    await ch.body(head)
    assert await ch.closed()


async def test_100_continue_only_when_asked(env: Env) -> None:
    vc, out_c, in_c, grp = (os.urandom(16) for _ in range(4))
    out = await RawChannel.connect(env.port)
    out.request("RPC_OUT_DATA", PATH, content_length=76,
                headers={"Authorization": ALICE, "Expect": "100-continue"})
    head = await out.head()
    assert head.status == 100
    out.send(rts.conn_a1(vc, out_c, 0x10000))
    inp = await RawChannel.connect(env.port)
    inp.request("RPC_IN_DATA", PATH, content_length=GIB, version="1.0",
                headers={"Authorization": ALICE}, body=rts.conn_b1(vc, in_c, grp))
    head = await out.head()
    assert (head.status, head.reason) == (200, "Success")
    assert head.headers["content-length"] == str(GIB)
    assert head.headers["content-type"] == "application/rpc"
    # no 100 on the IN channel, which did not ask: the first thing it could ever
    # read would be an error response, and there is none
    assert not await inp.closed(timeout=0.3)
    out.close()
    inp.close()


# --- the data path ---------------------------------------------------------------------------


@pytest.mark.parametrize("in_first", [True, False])
async def test_virtual_connection_round_trip(env: Env, in_first: bool) -> None:
    vc = await open_vc(env.port, ALICE, in_first=in_first)
    assert vc.c2 is not None
    for call_id in range(1, 20):
        stub = struct.pack("<I", call_id) * (call_id * 50)
        vc.inp.send(request_pdu(call_id, stub))
        resp = await vc.rpc_pdu()
        assert resp[2] == 2  # RESPONSE
        assert resp[3:] == request_pdu(call_id, stub)[3:]
    assert len(env.server.vcs) == 1
    vc.close()
    assert await wait_for(lambda: not env.server.vcs)


async def test_http10_channels(env: Env) -> None:
    vcookie, out_c, in_c, grp = (os.urandom(16) for _ in range(4))
    inp = await RawChannel.connect(env.port)
    out = await RawChannel.connect(env.port)
    inp.request("RPC_IN_DATA", PATH, content_length=GIB, version="1.0",
                headers={"Authorization": ALICE}, body=rts.conn_b1(vcookie, in_c, grp))
    out.request("RPC_OUT_DATA", PATH, content_length=76, version="1.0",
                headers={"Authorization": ALICE}, body=rts.conn_a1(vcookie, out_c, 0x10000))
    head = await out.head()
    assert head.status == 200
    assert rts.identify(rts.decode_rts(await out.pdu())) is rts.Kind.CONN_A3
    assert rts.identify(rts.decode_rts(await out.pdu())) is rts.Kind.CONN_C2
    inp.send(request_pdu(7, b"x" * 100))
    assert (await out.pdu())[2] == 2
    inp.close()
    out.close()


async def test_in_flow_control_ack_on_out(env: Env) -> None:
    vc = await open_vc(env.port, ALICE)
    assert vc.c2 is not None
    window = vc.c2.get(rts.ReceiveWindowSize).value
    sent = 0
    call_id = 0
    while sent <= window // 2 + 1:
        call_id += 1
        pdu = request_pdu(call_id, b"z" * 8000)
        vc.inp.send(pdu)
        sent += len(pdu)
        await vc.rpc_pdu()
    acks = [rts.decode_rts(x) for x in vc.extra]
    acks = [a for a in acks if rts.identify(a) is rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION]
    assert acks, "the proxy must acknowledge the IN channel's bytes"
    ack = acks[0].get(rts.FlowControlAck)
    assert isinstance(ack, rts.FlowControlAck)
    assert ack.channel_cookie == vc.in_cookie
    assert ack.available_window == window
    assert window // 2 < ack.bytes_received <= sent
    vc.close()


# --- refusals and bad input ------------------------------------------------------------------


@pytest.mark.parametrize("query", ["srv:6003", "other:6001", "", "srv", "srv:99999",
                                   "a" * 2000 + ":6001", "srv:60x1"])
async def test_target_refused_before_backend(env: Env, query: str) -> None:
    ch = await RawChannel.connect(env.port)
    ch.request("RPC_OUT_DATA", f"/rpc/rpcproxy.dll?{query}", content_length=76,
               headers={"Authorization": ALICE})
    head = await ch.head()
    assert head.status == 503
    assert head.reason.startswith("RPC Error: ")
    assert b"Traceback" not in await ch.body(head)
    assert env.backend.connections == 0
    ch.close()


async def test_target_match_is_case_insensitive_and_ranges(env: Env) -> None:
    for query in ("SRV:6002", "srv.EXAMPLE.com:6004"):
        vc = await open_vc(env.port, ALICE, path=f"/rpc/rpcproxy.dll?{query}")
        vc.close()


@pytest.mark.parametrize(
    ("method", "length", "body"),
    [
        ("RPC_OUT_DATA", 76, b"\x00" * 76),  # not a PDU
        ("RPC_OUT_DATA", 76, request_pdu(1, b"q" * 52)),  # RPC PDU on OUT
        ("RPC_OUT_DATA", 100, b""),  # wrong OUT length
        ("RPC_IN_DATA", 1000, b""),  # IN length below 128 KiB
        ("RPC_IN_DATA", GIB, rts.conn_a1(b"a" * 16, b"b" * 16, 0x10000)),  # A1 on IN
        ("RPC_IN_DATA", GIB, rts.PING),  # RTS that cannot open a channel
        ("RPC_OUT_DATA", 120, rts.out_r2_a3(b"a" * 16, b"b" * 16, b"c" * 16, 0x10000)
         + rts.OUT_R2_C1),  # recycle of an unknown VC
    ],
)
async def test_bad_channel_openings(env: Env, method: str, length: int, body: bytes) -> None:
    ch = await RawChannel.connect(env.port)
    ch.request(method, PATH, content_length=length, headers={"Authorization": ALICE}, body=body)
    head = await ch.head()
    assert head.status == 503
    assert head.reason.startswith("RPC Error: ")
    assert b"Traceback" not in await ch.body(head)
    assert await ch.closed()
    assert env.backend.connections == 0
    assert not env.server.vcs


async def test_garbage_mid_stream_closes_everything(env: Env) -> None:
    vc = await open_vc(env.port, ALICE)
    vc.inp.send(request_pdu(1, b"ok"))
    await vc.rpc_pdu()
    before = bytes(env.backend.received)
    vc.inp.send(b"\x04" + b"\x00" * 40)  # not DCE/RPC v5
    assert await vc.out.closed()
    assert await vc.inp.closed()
    assert await wait_for(lambda: not env.server.vcs)
    assert bytes(env.backend.received) == before


async def test_server_ptype_from_client_not_forwarded(env: Env) -> None:
    vc = await open_vc(env.port, ALICE)
    pdu = bytearray(request_pdu(1, b"evil"))
    pdu[2] = 2  # RESPONSE: a client never sends one
    vc.inp.send(bytes(pdu))
    assert await vc.out.closed()
    assert b"evil" not in env.backend.received


async def test_client_closing_in_ends_vc_and_backend(env: Env) -> None:
    vc = await open_vc(env.port, ALICE)
    vc.inp.send(request_pdu(1, b"x"))
    await vc.rpc_pdu()
    vc.inp.close()
    assert await vc.out.closed()
    assert await wait_for(lambda: not env.server.vcs)


async def test_backend_closing_ends_vc(env: Env) -> None:
    vc = await open_vc(env.port, ALICE)
    vc.inp.send(request_pdu(1, b"x"))
    await vc.rpc_pdu()
    env.backend.kill_connections()
    assert await vc.out.closed()
    assert await vc.inp.closed()
    assert await wait_for(lambda: not env.server.vcs)


async def test_backend_down_gives_503(env: Env) -> None:
    with pytest.raises(AssertionError, match="503"):
        await open_vc(env.port, ALICE, path="/rpc/rpcproxy.dll?down:6001")
    assert await wait_for(lambda: not env.server.vcs)


async def test_channels_of_different_users_do_not_pair(env: Env) -> None:
    vcookie, out_c, in_c, grp = (os.urandom(16) for _ in range(4))
    inp = await RawChannel.connect(env.port)
    inp.request("RPC_IN_DATA", PATH, content_length=GIB, headers={"Authorization": ALICE},
                body=rts.conn_b1(vcookie, in_c, grp))
    out = await RawChannel.connect(env.port)
    out.request("RPC_OUT_DATA", PATH, content_length=76, headers={"Authorization": BOB},
                body=rts.conn_a1(vcookie, out_c, 0x10000))
    head = await out.head()
    assert head.status == 503
    assert head.reason == "RPC Error: 5"  # ERROR_ACCESS_DENIED
    inp.close()


async def test_a_channel_with_another_users_cookie_is_one_refusal_line(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Bob's channel carrying the cookie of Alice's VC: refused alone (Alice's VC goes on)
    and said in one channel_refused line naming Bob and the VC, so that an admin sees the
    attempt."""
    with caplog.at_level("INFO", logger="rpcproxy"):
        vc = await open_vc(env.port, ALICE)
        out = await RawChannel.connect(env.port)
        out.request("RPC_OUT_DATA", PATH, content_length=76, headers={"Authorization": BOB},
                    body=rts.conn_a1(vc.vc_cookie, os.urandom(16), 0x10000))
        assert (await out.head()).status == 503
        env.server._flush_refusals(final=True)
        vc.inp.send(request_pdu(1, b"still Alice's"))
        assert (await vc.rpc_pdu())[2] == 2  # her VC goes on
    lines = [r.getMessage() for r in caplog.records if "channel_refused" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "user=TEST\\bob" in lines[0] and "another user" in lines[0], lines
    assert env.server.metrics.refused["channel_refused"] == 1
    vc.close()


async def test_pairing_timeout() -> None:
    e = await make_env(setup_timeout=0.3)
    try:
        vcookie, out_c = os.urandom(16), os.urandom(16)
        out = await RawChannel.connect(e.port)
        out.request("RPC_OUT_DATA", PATH, content_length=76, headers={"Authorization": ALICE},
                    body=rts.conn_a1(vcookie, out_c, 0x10000))
        head = await out.head()
        assert head.status == 503
        assert b"waiting for the other channel" in await out.body(head)
        assert await wait_for(lambda: not e.server.vcs)
    finally:
        await e.server.stop()
        await e.backend.stop()


async def test_silent_connections_are_bounded() -> None:
    e = await make_env(handshake_timeout=0.3, max_unauthenticated_connections=2)
    try:
        silent = [await RawChannel.connect(e.port) for _ in range(2)]
        extra = await RawChannel.connect(e.port)
        assert await extra.closed(timeout=2), "over the limit: closed at once"
        for ch in silent:
            assert await ch.closed(timeout=3), "unauthenticated past the timeout: closed"
        # an authenticated channel outlives the handshake timeout
        vc = await open_vc(e.port, ALICE)
        await asyncio.sleep(0.6)
        vc.inp.send(request_pdu(1, b"still here"))
        assert (await vc.rpc_pdu())[2] == 2
        vc.close()
    finally:
        await e.server.stop()
        await e.backend.stop()


async def test_closed_connection_forgets_its_auth_state(env: Env) -> None:
    auth = env.server.authenticator
    assert isinstance(auth, TableAuthenticator)
    before = auth.forgotten
    ch = await RawChannel.connect(env.port)
    ch.request("RPC_IN_DATA", PATH, content_length=0, headers={"Authorization": ALICE})
    assert (await ch.head()).status == 200
    ch.close()
    assert await wait_for(lambda: auth.forgotten > before)


async def test_one_structured_log_line_per_vc(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from rpcproxy.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="rpcproxy")
    vc = await open_vc(env.port, ALICE)
    vc.inp.send(request_pdu(1, b"12345"))
    await vc.rpc_pdu()
    vc.close()
    assert await wait_for(lambda: not env.server.vcs)
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "vc_closed"]
    assert len(lines) == 1
    data = json.loads(JsonFormatter().format(lines[0]))
    assert data["user"] == "TEST\\alice" and data["target"] == "srv:6001"
    assert data["bytes_up"] == data["bytes_down"] == len(request_pdu(1, b"12345"))
    assert data["how"].startswith("client closed") and data["error"] is False
    assert data["client"].startswith("127.0.0.1:")


async def test_authenticated_request_without_first_pdu_is_bounded() -> None:
    e = await make_env(handshake_timeout=0.3)
    try:
        ch = await RawChannel.connect(e.port)
        ch.request("RPC_OUT_DATA", PATH, content_length=76, headers={"Authorization": ALICE})
        head = await ch.head()  # nothing sent after the headers
        assert head.status == 503
        assert b"no RTS PDU within" in await ch.body(head)
        assert await ch.closed()
        assert not e.server.vcs
    finally:
        await e.server.stop()
        await e.backend.stop()


class _ClosedBody:
    """aiohttp's body reader once its connection is gone: it raises RuntimeError."""

    async def readexactly(self, n: int) -> bytes:
        raise RuntimeError("Connection closed.")


class _GoneRequest:
    content = _ClosedBody()
    transport = None  # aiohttp drops it at connection_lost


async def test_client_gone_before_first_pdu_is_a_connection_error(env: Env) -> None:
    """A client that left before its channel's first RTS PDU was read: aiohttp's reader says
    so with a RuntimeError, which the server turns into a ConnectionError (handle() makes
    that one client_disconnected line, never an 'Error handling request' traceback)."""
    from rpcproxy.rpch import channels

    with pytest.raises(ConnectionResetError):
        gone: Any = _GoneRequest()
        await env.server._read_opening_pdu(gone, channels.Method.IN, GIB)


async def test_virtual_connections_per_user_are_bounded() -> None:
    e = await make_env(max_connections_per_user=2)
    try:
        first = await open_vc(e.port, ALICE)
        second = await open_vc(e.port, ALICE)
        with pytest.raises(AssertionError, match="503 RPC Error: 6BB"):
            await open_vc(e.port, ALICE)
        other = await open_vc(e.port, BOB)  # another user is not affected
        first.close()
        assert await wait_for(lambda: len(e.server.vcs) == 2)
        again = await open_vc(e.port, ALICE)  # room again once one has closed
        for vc in (second, other, again):
            vc.close()
        assert await wait_for(lambda: not e.server.vcs and not e.server.vcs_per_user)
    finally:
        await e.server.stop()
        await e.backend.stop()
