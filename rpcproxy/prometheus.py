"""The scrape side: a Prometheus collector over the VC registry, /metrics and /health.

Theory of operation: nothing here runs on the data path. At scrape time ``ProxyCollector``
reads the counters of ``rpcproxy.metrics.ServerMetrics`` and walks the live VC registry
(``rpcproxy.http.registry``) for the gauges: VCs by phase, channels open (the core counts
its own, ``VirtualConnection.open_channels``), and bytes each way (the totals of closed VCs
plus the live ``vc.traffic`` counters). It sees the proxy only through ``Scraped``, never
the server object. prometheus_client is only imported when the metrics listener starts,
so it stays an optional dependency (``rpcproxy[metrics]``).

The listener (``metrics_listen`` / ``--metrics-listen``) is a separate plain-HTTP aiohttp
site serving:

* ``/metrics``  the Prometheus text format;
* ``/health``   ``200 ok`` while the proxy listens, ``503`` before that and while stopping
  (the container HEALTHCHECK and load balancers use it).

While the listener runs, a probe measures how late the event loop runs a timer every
``LOOP_LAG_INTERVAL`` seconds (``rpcproxy_event_loop_lag_seconds``): every channel of a
worker shares its one loop, so a lag that stays above ~10 ms means that worker is saturated
(its CPU, or the machine's) and every call through it waits that long; add workers or cores.

Bind it to loopback or a management network: it is unauthenticated.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from rpcproxy.http.aiohttp_glue import ConnectionGuard
from rpcproxy.http.registry import VcRegistry
from rpcproxy.metrics import FixedHistogram, ServerMetrics
from rpcproxy.ratelimit import Refusal

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

LOOP_LAG_INTERVAL = 0.25  # seconds between probes: 4 wake-ups a second, nothing on the data path


class _Pending(Protocol):
    def pending_count(self) -> int: ...


class Scraped(Protocol):
    """What the scrape side reads of a proxy (``rpcproxy.server.ProxyServer`` is one)."""

    @property
    def registry(self) -> VcRegistry: ...

    @property
    def metrics(self) -> ServerMetrics: ...

    @property
    def guard(self) -> ConnectionGuard: ...

    @property
    def authenticator(self) -> _Pending: ...


class ProxyCollector:
    """A prometheus_client collector reading one proxy's state at scrape time."""

    def __init__(self, source: Scraped) -> None:
        self.source = source

    def describe(self) -> list[Any]:
        return []  # no registration-time name checks; our registry is private

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        source = self.source
        m: ServerMetrics = source.metrics

        phases: Counter[str] = Counter()
        channels: Counter[str] = Counter()
        live_up = live_down = 0
        for rt in list(source.registry.vcs.values()):
            vc = rt.vc
            phases[vc.phase.name.lower()] += 1
            ins, outs = vc.open_channels()
            channels["in"] += ins
            channels["out"] += outs
            live_up += vc.traffic.client_to_backend
            live_down += vc.traffic.backend_to_client

        g = GaugeMetricFamily("rpcproxy_virtual_connections",
                              "Virtual connections currently open, by phase", labels=["phase"])
        for phase in ("wait_pair", "wait_backend", "opened"):
            g.add_metric([phase], phases.get(phase, 0))
        yield g

        g = GaugeMetricFamily("rpcproxy_channels", "HTTP channels currently attached to a "
                              "virtual connection", labels=["direction"])
        for direction in ("in", "out"):
            g.add_metric([direction], channels.get(direction, 0))
        yield g

        c = CounterMetricFamily("rpcproxy_bytes", "RPC bytes relayed", labels=["direction"])
        c.add_metric(["client_to_backend"], m.closed_bytes_client_to_backend + live_up)
        c.add_metric(["backend_to_client"], m.closed_bytes_backend_to_client + live_down)
        yield c

        c = CounterMetricFamily("rpcproxy_virtual_connections_opened",
                                "Virtual connections created (first channel arrived)")
        c.add_metric([], m.vcs_opened)
        yield c

        c = CounterMetricFamily("rpcproxy_virtual_connections_closed",
                                "Virtual connections ended, by how", labels=["how"])
        for how, n in sorted(m.vcs_closed.items()):
            c.add_metric([how], n)
        yield c

        c = CounterMetricFamily("rpcproxy_pairing_timeouts",
                                "Virtual connections whose second channel never arrived")
        c.add_metric([], m.pairing_timeouts)
        yield c

        c = CounterMetricFamily("rpcproxy_auth_results", "HTTP authentication outcomes",
                                labels=["result", "reason"])
        for (result, reason), n in sorted(m.auth_results.items()):
            c.add_metric([result, reason], n)
        yield c

        c = CounterMetricFamily("rpcproxy_backend_connect_failures",
                                "Backend connections that failed after all retries")
        c.add_metric([], m.backend_connect_failures)
        yield c

        c = CounterMetricFamily("rpcproxy_targets_refused",
                                "Channel requests for a server:port not on the allow-list")
        c.add_metric([], m.targets_refused)
        yield c

        c = CounterMetricFamily("rpcproxy_unauthenticated_connections_rejected",
                                "TCP connections closed at once: too many unauthenticated")
        c.add_metric([], source.guard.rejected)
        yield c

        c = CounterMetricFamily("rpcproxy_refused", "Clients refused or dropped, by reason "
                                "(one count per event; the log summarises them)",
                                labels=["reason"])
        for reason in Refusal:
            c.add_metric([reason.value], m.refused.get(reason.value, 0))
        yield c

        g = GaugeMetricFamily("rpcproxy_ntlm_handshakes_pending",
                              "NTLM handshakes waiting for or holding an ntlm_auth helper")
        g.add_metric([], source.authenticator.pending_count())
        yield g

        c = CounterMetricFamily("rpcproxy_config_reloads", "SIGHUP reloads", labels=["result"])
        for result in ("ok", "failed"):
            c.add_metric([result], m.reloads.get(result, 0))
        yield c

        yield _histogram(HistogramMetricFamily, "rpcproxy_vc_handshake_seconds",
                         "First channel to CONN/A3: pairing plus backend connect",
                         m.handshake_seconds)
        yield _histogram(HistogramMetricFamily, "rpcproxy_auth_seconds",
                         "Time to authenticate one HTTP request carrying credentials "
                         "(round trip to winbind)", m.auth_seconds)
        yield _histogram(HistogramMetricFamily, "rpcproxy_event_loop_lag_seconds",
                         "How late the event loop ran a timer (probed every "
                         f"{LOOP_LAG_INTERVAL:g} s); sustained lag = a saturated worker",
                         m.loop_lag)


def _histogram(family: Callable[..., Any], name: str, doc: str, h: FixedHistogram) -> Any:
    return family(name, doc, buckets=h.cumulative(), sum_value=h.sum)


def make_registry(source: Scraped) -> CollectorRegistry:
    """A private registry (several servers may live in one test process)."""
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector
    except ModuleNotFoundError:
        raise RuntimeError(
            "metrics_listen needs the prometheus-client package "
            "(pip install 'rpcproxy[metrics]')"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(source))
    ProcessCollector(registry=registry)
    return registry


class MetricsListener:
    """The /metrics + /health aiohttp site; ``healthy`` is decided by the caller."""

    def __init__(self, source: Scraped, healthy: Callable[[], bool]) -> None:
        self.source = source
        self.healthy = healthy
        self.registry = make_registry(source)
        self.runner: web.AppRunner | None = None
        self.bound: list[tuple[str, int]] = []
        self._srv: asyncio.AbstractServer | None = None
        self._probe: asyncio.Task[None] | None = None

    async def _probe_loop_lag(self) -> None:
        metrics = self.source.metrics
        while True:
            asked = time.monotonic()
            await asyncio.sleep(LOOP_LAG_INTERVAL)
            lag = max(0.0, time.monotonic() - asked - LOOP_LAG_INTERVAL)
            metrics.loop_lag.observe(lag)

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _health(self, request: web.Request) -> web.Response:
        if self.healthy():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving\n")

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(self.runner.server, host, port)  # type: ignore[arg-type]
        self._srv = srv
        self.bound = [(s.getsockname()[0], s.getsockname()[1]) for s in srv.sockets]
        self._probe = loop.create_task(self._probe_loop_lag())
        return self.bound

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self._srv is not None:
            self._srv.close()
            self._srv = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
