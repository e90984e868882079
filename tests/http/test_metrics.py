"""rpcproxy.prometheus and rpcproxy.metrics in process: loop lag probe, /metrics, gauges."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from rpcproxy import config as config_mod
from rpcproxy.prometheus import LOOP_LAG_INTERVAL, MetricsListener, ProxyCollector
from rpcproxy.server import ProxyServer


def _server() -> ProxyServer:
    cfg = config_mod.load(None, {"backend": "127.0.0.1:1", "targets": ["mail:6001=127.0.0.1:1"]})
    return ProxyServer(cfg)


def _bucket(text: str, le: str) -> float:
    prefix = f'rpcproxy_event_loop_lag_seconds_bucket{{le="{le}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"no {prefix!r} in /metrics")


async def test_blocked_loop_shows_as_lag_on_metrics() -> None:
    server = _server()
    listener = MetricsListener(server, healthy=lambda: True)
    host, port = (await listener.start("127.0.0.1", 0))[0]
    try:
        await asyncio.sleep(3 * LOOP_LAG_INTERVAL)  # a few healthy probes
        healthy = server.metrics.loop_lag.count
        assert healthy >= 2
        time.sleep(0.4)  # noqa: ASYNC251  # a handler that blocks the loop, on purpose
        await asyncio.sleep(2 * LOOP_LAG_INTERVAL)
        lag = server.metrics.loop_lag
        assert lag.count > healthy
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
        # The blocked probe woke at least 150 ms late: above the 100 ms bucket.
        total = _bucket(text, "+Inf")
        assert total == lag.count
        assert total - _bucket(text, "0.1") >= 1
        assert lag.sum >= 0.1
    finally:
        await listener.stop()


async def test_probe_stops_with_the_listener() -> None:
    server = _server()
    listener = MetricsListener(server, healthy=lambda: True)
    await listener.start("127.0.0.1", 0)
    await asyncio.sleep(2 * LOOP_LAG_INTERVAL)
    await listener.stop()
    seen = server.metrics.loop_lag.count
    await asyncio.sleep(2 * LOOP_LAG_INTERVAL)
    assert server.metrics.loop_lag.count == seen


def test_recycling_out_channel_counted_once() -> None:
    """rpcproxy_channels{direction="out"} read 2 for one OUT channel while it recycled (the old
    channel is both ``out`` and ``old_out`` until the successor arrives)."""
    from types import SimpleNamespace

    from tests.support.vc_script import recycle_to_a2

    server = _server()
    vc, _ = recycle_to_a2()
    server.vcs[vc.cookie] = SimpleNamespace(vc=vc)  # type: ignore[assignment]
    (family,) = [f for f in ProxyCollector(server).collect() if f.name == "rpcproxy_channels"]
    counts = {s.labels["direction"]: s.value for s in family.samples}
    assert counts == {"in": 1, "out": 1}


def _channel_gauge(server: ProxyServer) -> dict[str, float]:
    (family,) = [f for f in ProxyCollector(server).collect() if f.name == "rpcproxy_channels"]
    return {s.labels["direction"]: s.value for s in family.samples}


def test_queued_in_successor_counted_while_the_out_channel_recycles() -> None:
    """The scrape side asks the core: an IN_R2/A1 that overtook the previous A5 waits as a
    third IN channel (its TCP connection is open) and counts, while the OUT channel that
    is both ``out`` and ``old_out`` still counts once (the gauge read in=2 here)."""
    from types import SimpleNamespace

    from tests.support.vc_script import (
        IN2,
        IN2_CK,
        IN3,
        IN3_CK,
        ME,
        in_a1,
        join,
        recycle_to_a2,
    )

    server = _server()
    vc, _ = recycle_to_a2()
    assert vc.old_out is vc.out
    join(vc, IN2, in_a1(), identity=ME, now=1.0)
    join(vc, IN3, in_a1(IN2_CK, IN3_CK), identity=ME, now=1.0)
    assert vc.in_queued is not None
    server.vcs[vc.cookie] = SimpleNamespace(vc=vc)  # type: ignore[assignment]
    assert _channel_gauge(server) == {"in": 3, "out": 1}
    assert vc.open_channels() == (3, 1)
