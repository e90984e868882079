"""Channel recycling over real sockets: OUT_R2 and IN_R2 many times in one connection.

The proxy's OUT channels are made tiny (``out_content_length``) and the
client's IN channels too, so a few hundred KiB of traffic recycles both
directions repeatedly; every byte must come back in order, through one
backend connection that is never reconnected.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import AsyncIterator

import pytest

from bench.client import BasicAuth, RpchClient
from rpcproxy import config as config_mod
from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend, TableAuthenticator, request_pdu


@pytest.fixture
async def small_channels() -> AsyncIterator[tuple[ProxyServer, int, EchoBackend]]:
    backend = await EchoBackend().start()
    cfg = config_mod.load(None, {
        "listen": "127.0.0.1:0", "backend": backend.endpoint, "targets": ["srv:6001"],
        "out_content_length": 96 * 1024, "basic_over_http": True,
    })
    server = ProxyServer(cfg, authenticator=TableAuthenticator())
    port = (await server.start())[0][1]
    yield server, port, backend
    await server.stop()
    await backend.stop()


@pytest.mark.parametrize("a7_before_c1", [False, True])
async def test_out_and_in_recycling_keep_every_byte_in_order(
    small_channels: tuple[ProxyServer, int, EchoBackend], a7_before_c1: bool
) -> None:
    server, port, backend = small_channels
    client = await RpchClient.connect(
        "127.0.0.1", port, target="srv:6001", auth=BasicAuth("alice", "pw-alice"),
        in_content_length=0x20000, timeout=10,
    )
    client.a7_before_c1 = a7_before_c1
    try:
        digest_sent = hashlib.sha256()
        digest_back = hashlib.sha256()
        for call_id in range(1, 201):
            stub = struct.pack("<I", call_id) + bytes([call_id % 251]) * (call_id * 37 % 6000)
            pdu = request_pdu(call_id, stub)
            digest_sent.update(pdu[3:])
            await client.send_pdu(pdu)
            back = await client.recv_pdu()
            assert back[2] == 2 and struct.unpack_from("<I", back, 12)[0] == call_id
            digest_back.update(back[3:])
        assert digest_back.digest() == digest_sent.digest()
        assert client.out_recycles >= 3, client.out_recycles
        assert client.in_recycles >= 3, client.in_recycles
        assert backend.connections == 1, "recycling must never reconnect the backend"
        assert len(server.vcs) == 1
    finally:
        await client.close()


async def test_out_recycle_with_data_in_flight(
    small_channels: tuple[ProxyServer, int, EchoBackend],
) -> None:
    """Many calls outstanding while the OUT channel is replaced."""
    _, port, _ = small_channels
    client = await RpchClient.connect(
        "127.0.0.1", port, target="srv:6001", auth=BasicAuth("alice", "pw-alice"), timeout=10,
    )
    try:
        for round_ in range(4):
            ids = list(range(round_ * 20 + 1, round_ * 20 + 21))
            for call_id in ids:
                await client.send_pdu(request_pdu(call_id, b"p" * 4000))
            got = [struct.unpack_from("<I", await client.recv_pdu(), 12)[0] for _ in ids]
            assert got == ids
        assert client.out_recycles >= 2
    finally:
        await client.close()


async def test_successor_of_another_user_is_refused(
    small_channels: tuple[ProxyServer, int, EchoBackend],
) -> None:
    """Cookies are bearer tokens: a successor channel must bring the same identity."""
    import os

    from rpcproxy.rpch import rts
    from tests.support.fakes import basic
    from tests.support.rpch_raw import GIB, RawChannel, open_vc

    server, port, _ = small_channels
    vc = await open_vc(port, basic("alice", "pw-alice"))
    intruder = await RawChannel.connect(port)
    intruder.request("RPC_IN_DATA", "/rpc/rpcproxy.dll?srv:6001", content_length=GIB,
                     headers={"Authorization": basic("bob", "pw-bob")},
                     body=rts.in_r2_a1(vc.vc_cookie, vc.in_cookie, os.urandom(16)))
    head = await intruder.head()
    assert head.status == 503 and head.reason == "RPC Error: 5"
    # the owner's connection is untouched
    vc.inp.send(request_pdu(9, b"still mine"))
    assert (await vc.rpc_pdu())[2] == 2
    assert len(server.vcs) == 1
    vc.close()


async def test_in_r2_a1_that_overtakes_the_pending_a5_waits_for_it(
    small_channels: tuple[ProxyServer, int, EchoBackend],
) -> None:
    """IN#3's IN_R2/A1 (naming IN#2) arrives before IN#1's IN_R2/A5, as it can when the
    client recycles IN#2 quickly: IN#3 is queued, not refused, and every call reaches the
    backend in the order the client sent it (IN#1's, then IN#2's, then IN#3's)."""
    import asyncio
    import os

    from rpcproxy.rpch import rts
    from tests.support.fakes import basic
    from tests.support.rpch_raw import GIB, RawChannel, open_vc

    server, port, backend = small_channels
    auth = {"Authorization": basic("alice", "pw-alice")}
    path = "/rpc/rpcproxy.dll?srv:6001"
    vc = await open_vc(port, auth["Authorization"])
    in2_ck, in3_ck = os.urandom(16), os.urandom(16)

    async def next_rts() -> rts.Kind:
        return rts.identify(rts.decode_rts(await vc.out.pdu()))

    in2 = await RawChannel.connect(port)
    in2.request("RPC_IN_DATA", path, content_length=GIB, headers=auth,
                body=rts.in_r2_a1(vc.vc_cookie, vc.in_cookie, in2_ck))
    assert await next_rts() is rts.Kind.IN_R2_A4
    in2.send(request_pdu(2, b"second, on IN#2 before the switch"))
    in3 = await RawChannel.connect(port)
    in3.request("RPC_IN_DATA", path, content_length=GIB, headers=auth,
                body=rts.in_r2_a1(vc.vc_cookie, in2_ck, in3_ck))
    in3.send(request_pdu(4, b"fourth, on IN#3 before its A4"))
    rt = server.vcs[vc.vc_cookie]
    async with asyncio.timeout(5):  # IN#3 has joined, IN#1's A5 not sent yet
        while len(rt.vc.channels()) < 4:  # OUT, IN#1, IN#2, IN#3
            assert not rt.closed, rt.vc.close_reason
            await asyncio.sleep(0.01)
    vc.inp.send(request_pdu(1, b"first, on IN#1") + rts.in_r2_a5(in2_ck))
    in2.send(request_pdu(3, b"third, on IN#2 after the switch"))
    got: list[int] = []
    a4_for_in3 = False
    async with asyncio.timeout(10):
        while len(got) < 3 or not a4_for_in3:
            pdu = await vc.out.pdu()
            if pdu[2] == 20:
                a4_for_in3 |= rts.identify(rts.decode_rts(pdu)) is rts.Kind.IN_R2_A4
            else:
                got.append(struct.unpack_from("<I", pdu, 12)[0])
    in2.send(rts.in_r2_a5(in3_ck))
    in3.send(request_pdu(5, b"fifth, on IN#3"))
    while len(got) < 5:
        got.append(struct.unpack_from("<I", await vc.rpc_pdu(), 12)[0])
    assert got == [1, 2, 3, 4, 5]
    assert await vc.inp.closed(5) and await in2.closed(5)
    assert not rt.closed and len(server.vcs) == 1 and backend.connections == 1
    for ch in (in3, vc.out):
        ch.close()
