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
from tests.fakes import EchoBackend, TableAuthenticator, request_pdu


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

    from rpcproxy import rts
    from tests.fakes import basic
    from tests.rpch_raw import GIB, RawChannel, open_vc

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
