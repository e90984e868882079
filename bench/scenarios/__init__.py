"""The bench scenarios. Each runs the same load over the proxy and directly against the backend.

A scenario is ``async def run_x(bench: Bench) -> dict``; the dict carries at least ``proxy``,
``direct``, ``ratio`` (always proxy / direct, ``None`` without a direct path) and ``unit``, plus
details and the CPU each process used while it was measured (``cpu``, from
``bench.measure.CpuMeter``), from which ``bottleneck`` says whether the load generator itself
was the limit.

With a relay (``bench.relay``: HAProxy in TCP mode between the direct clients and the
backend, self-contained mode only) ``throughput``, ``latency``, ``concurrency`` and ``setup``
measure it as a third path and add ``relay`` (same unit), ``relay_ratio`` (relay / direct)
and ``proxy_vs_relay`` (proxy / relay); ``soak`` stays proxy vs direct. ``aggregate`` keeps
its proxy-vs-direct figures and adds the relay with 1 and with 2 threads (``relay_1t``,
``relay_2t``, ``relay_threads_ratio``): the machine's own answer to "2 workers over 1".
``storm`` (real NTLM through winbind) runs only on request.

Time: ``bench.duration`` is the measuring time of one scenario, shared between the paths (and
within a path between its phases); ramps, warm-ups and checks come on top but are bounded.

One module per scenario; what they share is in ``base`` (the bench, the target, the sizes)
and in ``bench.measure`` (the CPU meter, percentiles, ratios, bottleneck notes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bench.scenarios.aggregate import run_aggregate
from bench.scenarios.base import Bench, ProxyTarget
from bench.scenarios.concurrency import run_concurrency
from bench.scenarios.latency import run_latency
from bench.scenarios.setup import run_setup
from bench.scenarios.soak import run_soak
from bench.scenarios.storm import run_storm
from bench.scenarios.throughput import run_throughput

__all__ = ["DEFAULT_SCENARIOS", "SCENARIOS", "Bench", "ProxyTarget"]

# Each result is a TypedDict of its module (ThroughputResult, ...) starting with base.Figures.
SCENARIOS: dict[str, Callable[[Bench], Awaitable[Mapping[str, Any]]]] = {
    "throughput": run_throughput,
    "aggregate": run_aggregate,
    "latency": run_latency,
    "concurrency": run_concurrency,
    "setup": run_setup,
    "soak": run_soak,
    "storm": run_storm,
}
# storm needs real NTLM (--ntlm-helper): run on request, not by default.
DEFAULT_SCENARIOS = tuple(name for name in SCENARIOS if name != "storm")
