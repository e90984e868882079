"""The proxy freezes long-lived objects at new highs of open VCs (rpcproxy.http.registry).

What makes that safe: a closed VC is freed by reference counting alone, frozen or not.
These tests fail if a VC's objects ever need the cyclic collector to go away.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator

import pytest

from bench.auth import BenchAuthenticator
from bench.backend import BenchBackend
from bench.client import BasicAuth, RpchClient
from bench.session import BenchSession
from rpcproxy import config as config_mod
from rpcproxy.http.registry import FREEZE_FIRST
from rpcproxy.server import ProxyServer

TARGET = "bench:6001"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ProxyServer, str, int]]:
    backend = BenchBackend()
    port = await backend.start()
    cfg = config_mod.load(None, {
        "listen": "127.0.0.1:0", "backend": f"127.0.0.1:{port}",
        "targets": [f"{TARGET}=127.0.0.1:{port}"]})
    auth = BenchAuthenticator()
    server = ProxyServer(cfg, authenticator=auth)
    (host, pport), *_ = await server.start()
    try:
        yield server, host, pport
    finally:
        await server.stop()
        await backend.stop()
        auth.close()
        gc.unfreeze()  # give the rest of the test session its collector back


async def _open(host: str, port: int, n: int) -> list[RpchClient]:
    conns = []
    for _ in range(n):
        conn = await RpchClient.connect(host, port, target=TARGET,
                                        auth=BasicAuth("alice", "pw"), timeout=5.0)
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        await session.call(1000, 100)
        conns.append(conn)
    return conns


async def _until(check: object, seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_freeze_at_a_new_high_then_closed_vcs_are_freed_without_the_collector(
        proxy: tuple[ProxyServer, str, int]) -> None:
    server, host, port = proxy
    server.registry.freeze_mark = 4  # the production mark is FREEZE_FIRST VCs
    frozen_before = gc.get_freeze_count()
    conns = await _open(host, port, 6)
    await _until(lambda: server.metrics.gc_freezes == 1)
    assert gc.get_freeze_count() > frozen_before
    assert server.registry.freeze_mark == FREEZE_FIRST  # the next one waits for a real high
    runtimes = [weakref.ref(rt) for rt in server.vcs.values()]
    assert len(runtimes) == 6
    gc.disable()  # from here on only reference counting may free anything
    try:
        for conn in conns:
            await conn.close()
        await _until(lambda: not server.vcs)
        await _until(lambda: all(ref() is None for ref in runtimes))
    finally:
        gc.enable()


async def test_no_freeze_below_the_mark(proxy: tuple[ProxyServer, str, int]) -> None:
    server, host, port = proxy
    server.registry.freeze_mark = 4
    conns = await _open(host, port, 3)
    await asyncio.sleep(0.05)
    assert server.metrics.gc_freezes == 0
    for conn in conns:
        await conn.close()
