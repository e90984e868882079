"""Observability: event counters the server updates, a Prometheus collector, /metrics, /health.

Theory of operation: the data path pays nothing for metrics it is not asked for.
``ServerMetrics`` is a handful of plain integers and two fixed-bucket histograms that
``rpcproxy.server`` bumps at four places (an authentication outcome, a virtual connection
opened, a virtual connection closed, plus its existing ``stats`` dict). Gauges such as
"virtual connections open" are not counted at all: ``ProxyCollector`` reads them from the
live registry ``server.vcs`` at scrape time, and bytes each way are the totals of closed
VCs plus the live ``vc.traffic`` counters. prometheus_client is only imported when the
metrics listener starts, so it stays an optional dependency (``rpcproxy[metrics]``).

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
import bisect
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rpcproxy.ratelimit import Refusal
from rpcproxy.rpch.actions import CloseKind

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from rpcproxy.server import ProxyServer

log = logging.getLogger("rpcproxy")

# Seconds. Auth goes to Samba and back (ms when healthy); a VC handshake additionally waits
# for the client's second channel and the backend connect.
AUTH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HANDSHAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How late the loop ran a timer: healthy is well under a millisecond.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_LAG_INTERVAL = 0.25  # seconds between probes: 4 wake-ups a second, nothing on the data path


class FixedHistogram:
    """Cumulative-bucket histogram without locks (the event loop is single-threaded)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_float_str(bound), running))
        out.append(("+Inf", self.count))
        return out


def _float_str(value: float) -> str:
    return repr(float(value))


CLOSE_KINDS = ("client_closed", "backend", "pairing_timeout", "timeout", "shutdown",
               "protocol_error")
# how="..." of rpcproxy_virtual_connections_closed_total for each way the core ends a VC
_CLOSE_LABELS: dict[CloseKind, str] = {
    CloseKind.CLIENT_CLOSED: "client_closed",
    CloseKind.SHUTDOWN: "shutdown",
    CloseKind.PAIRING_TIMEOUT: "pairing_timeout",
    CloseKind.BACKEND_TIMEOUT: "backend",
    CloseKind.BACKEND_UNREACHABLE: "backend",
    CloseKind.BACKEND_CLOSED: "backend",
    CloseKind.BACKEND_PROTOCOL_ERROR: "backend",
    CloseKind.PDU_TOO_LARGE: "backend",
    CloseKind.RECYCLE_TIMEOUT: "timeout",
    CloseKind.PROTOCOL_ERROR: "protocol_error",
}


def classify_close(kind: CloseKind) -> str:
    """How a VC ended, as one of CLOSE_KINDS (from the core's code, never its prose)."""
    return _CLOSE_LABELS[kind]


class ServerMetrics:
    """What the server counts as events happen; read by ``ProxyCollector`` at scrape time."""

    def __init__(self) -> None:
        self.auth_results: Counter[tuple[str, str]] = Counter(  # (result, reason)
            {("accepted", "ok"): 0, ("denied", "bad_credentials"): 0,
             ("unavailable", "ntlm_server_unavailable"): 0})
        self.auth_seconds = FixedHistogram(AUTH_BUCKETS)
        self.handshake_seconds = FixedHistogram(HANDSHAKE_BUCKETS)
        self.vcs_closed: Counter[str] = Counter({how: 0 for how in CLOSE_KINDS})
        self.closed_bytes_client_to_backend = 0
        self.closed_bytes_backend_to_client = 0
        self.reloads: Counter[str] = Counter()  # ok / failed
        # rpcproxy.ratelimit.Refusal value -> count (every refusal, logged or summarised)
        self.refused: Counter[str] = Counter()
        self.loop_lag = FixedHistogram(LOOP_LAG_BUCKETS)

    @property
    def pairing_timeouts(self) -> int:
        return self.vcs_closed["pairing_timeout"]

    def auth_outcome(self, outcome: object, seconds: float, *, had_credentials: bool) -> None:
        """One HTTP request went through authentication (``ntlm.http_auth`` outcome)."""
        from ntlm.http_auth import Authenticated, Challenge, Denied, Unavailable

        if isinstance(outcome, Authenticated):
            if not had_credentials:
                return  # a request on an already authenticated connection
            key = ("accepted", "ok")
        elif isinstance(outcome, Challenge):
            key = ("challenged", "ntlm_challenge" if had_credentials else "no_credentials")
        elif isinstance(outcome, Denied):
            key = ("denied", outcome.code.value)
        elif isinstance(outcome, Unavailable):
            key = ("unavailable", outcome.code.value)
        else:
            key = ("unknown", type(outcome).__name__)
        self.auth_results[key] += 1
        if had_credentials:
            self.auth_seconds.observe(seconds)

    def vc_opened(self, seconds: float) -> None:
        """CONN/A3 went out: both channels paired and the backend connected."""
        self.handshake_seconds.observe(seconds)

    def vc_closed(self, kind: CloseKind, client_to_backend: int,
                  backend_to_client: int) -> None:
        self.vcs_closed[classify_close(kind)] += 1
        self.closed_bytes_client_to_backend += client_to_backend
        self.closed_bytes_backend_to_client += backend_to_client


# --- Prometheus ------------------------------------------------------------------------------


class ProxyCollector:
    """A prometheus_client collector reading one ProxyServer's state at scrape time."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def describe(self) -> list[Any]:
        return []  # no registration-time name checks; our registry is private

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        server = self.server
        m: ServerMetrics = server.metrics
        stats = server.stats

        phases: Counter[str] = Counter()
        channels: Counter[str] = Counter()
        live_up = live_down = 0
        for rt in list(server.vcs.values()):
            vc = rt.vc
            phases[vc.phase.name.lower()] += 1
            ins, outs = vc.channel_counts()
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
        c.add_metric([], stats.get("vcs_opened", 0))
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
        c.add_metric([], stats.get("backend_connect_failures", 0))
        yield c

        c = CounterMetricFamily("rpcproxy_targets_refused",
                                "Channel requests for a server:port not on the allow-list")
        c.add_metric([], stats.get("targets_refused", 0))
        yield c

        c = CounterMetricFamily("rpcproxy_unauthenticated_connections_rejected",
                                "TCP connections closed at once: too many unauthenticated")
        c.add_metric([], getattr(server.guard, "rejected", 0))
        yield c

        c = CounterMetricFamily("rpcproxy_refused", "Clients refused or dropped, by reason "
                                "(one count per event; the log summarises them)",
                                labels=["reason"])
        for reason in Refusal:
            c.add_metric([reason.value], m.refused.get(reason.value, 0))
        yield c

        g = GaugeMetricFamily("rpcproxy_ntlm_handshakes_pending",
                              "NTLM handshakes waiting for or holding an ntlm_auth helper")
        g.add_metric([], server.authenticator.pending_count())
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


def make_registry(server: ProxyServer) -> CollectorRegistry:
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
    registry.register(ProxyCollector(server))
    ProcessCollector(registry=registry)
    return registry


class MetricsListener:
    """The /metrics + /health aiohttp site; ``healthy`` is decided by the caller."""

    def __init__(self, server: ProxyServer, healthy: Callable[[], bool]) -> None:
        self.server = server
        self.healthy = healthy
        self.registry = make_registry(server)
        self.runner: web.AppRunner | None = None
        self.bound: list[tuple[str, int]] = []
        self._srv: asyncio.AbstractServer | None = None
        self._probe: asyncio.Task[None] | None = None

    async def _probe_loop_lag(self) -> None:
        metrics = self.server.metrics
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
