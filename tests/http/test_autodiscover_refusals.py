"""Autodiscover's refused logins go through the proxy's one refusal log: counted in
``rpcproxy_refused{reason}`` and rate-limited, so a flood of bad credentials from one
address writes a few lines and a summary, not one line per request."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rpcproxy import config as config_mod
from rpcproxy.server import ProxyServer
from tests.support.fakes import TableAuthenticator, basic

REQUEST = (b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
           b"Authorization: " + basic("alice", "wrong").encode() + b"\r\n"
           b"Content-Type: text/xml\r\nContent-Length: 0\r\n\r\n")


async def test_a_flood_of_bad_autodiscover_logins_is_counted_and_summarised(
        caplog: pytest.LogCaptureFixture) -> None:
    server = ProxyServer(config_mod.load(None, {"listen": "127.0.0.1:0",
                                                "server_names": ["mail.example.com"]}),
                         authenticator=TableAuthenticator())
    port = (await server.start())[0][1]
    try:
        with caplog.at_level(logging.WARNING, logger="rpcproxy"):
            for _ in range(40):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(REQUEST)
                status = await asyncio.wait_for(r.readline(), 5)
                assert status.startswith(b"HTTP/1.1 401"), status
                w.close()
        assert server.metrics.refused["auth_denied"] == 40
        lines = [rec.getMessage() for rec in caplog.records
                 if "autodiscover: authentication failed" in rec.getMessage()]
        assert 0 < len(lines) <= server.refusals.burst
    finally:
        await server.stop()
