"""The counters the data path bumps: the one home of every event count of a proxy process.

Theory of operation: the data path pays nothing for metrics it is not asked for.
``ServerMetrics`` is a handful of plain integers and fixed-bucket histograms that the
adapter bumps as events happen (an authentication outcome, a virtual connection opened
or closed, a backend connect that failed, a refusal, a GC freeze). Gauges such as
"virtual connections open" are not counted at all: the scrape side (``rpcproxy.prometheus``)
reads them from the live VC registry when asked. Nothing here imports prometheus_client.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

from ntlm.http_auth import Authenticated, Challenge, Denied, Unavailable
from rpcproxy.rpch.actions import CloseKind

# Seconds. Auth goes to Samba and back (ms when healthy); a VC handshake additionally waits
# for the client's second channel and the backend connect.
AUTH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HANDSHAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# How late the loop ran a timer: healthy is well under a millisecond.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
        self.vcs_opened = 0  # first channel arrived, a VirtualConnection made
        self.backend_connect_failures = 0  # after all retries
        self.targets_refused = 0
        self.gc_freezes = 0  # gc.freeze() at a new high of open VCs

    @property
    def pairing_timeouts(self) -> int:
        return self.vcs_closed["pairing_timeout"]

    def auth_outcome(self, outcome: object, seconds: float, *, had_credentials: bool) -> None:
        """One HTTP request went through authentication (``ntlm.http_auth`` outcome)."""
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
