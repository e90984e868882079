"""TCP_NODELAY on every socket of a virtual connection, however the listener was made.

The proxy writes each PDU whole; with Nagle on, a small PDU written while the previous one
is unacknowledged would wait for that ACK, which the peer may delay (40 ms Linux, 200 ms
Windows) or lose (a retransmission timeout): a tail-latency cliff on a lossy WAN. Nothing
in rpcproxy sets the option: aiohttp does on every accepted connection (so also on a
listener pre-bound with ``socket.create_server``, the ``--workers`` layout, for which
asyncio itself would not), a sibling worker's handed-off socket keeps it, and the event
loop does on the backend connection. This guards those three against a change of layers.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from rpcproxy import config as config_mod
from rpcproxy.http.vc_io import ChannelProtocol
from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend, TableAuthenticator, basic, request_pdu
from tests.support.rpch_raw import open_vc


def _nodelay(sock: object) -> int:
    assert sock is not None
    value: int = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # type: ignore[attr-defined]
    return value


@pytest.fixture
async def backend() -> AsyncIterator[EchoBackend]:
    b = await EchoBackend().start()
    yield b
    await b.stop()


@pytest.mark.parametrize("prebound", [False, True], ids=["listen", "prebound-listener"])
async def test_listener_channels_and_backend_have_tcp_nodelay(backend: EchoBackend,
                                                             prebound: bool) -> None:
    cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": backend.endpoint,
                                 "targets": ["srv:6001"], "basic_over_http": True})
    socks = [socket.create_server(("127.0.0.1", 0))] if prebound else None
    server = ProxyServer(cfg, authenticator=TableAuthenticator(),
                         listen_sockets=socks)
    port = (await server.start())[0][1]
    try:
        vc = await open_vc(port, basic("alice", "pw-alice"))
        vc.inp.send(request_pdu(1, b"ping"))
        assert (await vc.rpc_pdu())[2] == 2
        rt = server.vcs[vc.vc_cookie]
        channels = rt.vc.channels()
        assert len(channels) == 2
        for ch in channels:
            assert isinstance(ch, ChannelProtocol)
            assert _nodelay(ch.transport.get_extra_info("socket")) == 1, ch
        assert rt.backend is not None and rt.backend.transport is not None
        assert _nodelay(rt.backend.transport.get_extra_info("socket")) == 1
        vc.close()
    finally:
        await server.stop()
        for s in socks or ():
            s.close()
