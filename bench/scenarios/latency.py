"""The ``latency`` scenario: round trips of small calls, closed loop, at 1 and at many clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.measure import (
    CpuFigures,
    RelayFigures,
    add_relay_figures,
    bottleneck,
    lat_summary,
    ratio,
)
from bench.scenarios.base import SMALL, Bench, Figures, close_all, rounds_of
from bench.session import BenchSession


class LatencyResult(Figures, RelayFigures, total=False):
    added_us: float  # proxy p50 - direct p50 at 1 client
    relay_added_us: float
    levels: dict[str, dict[str, Any]]  # clients -> path -> lat_summary, and the differences
    cpu_at_max_clients: dict[str, CpuFigures]
    bottleneck: str


async def closed_loop(s: BenchSession, deadline: float, out: list[float]) -> None:
    while time.perf_counter() < deadline:
        out.append(await s.call(SMALL, SMALL))


async def run_latency(bench: Bench) -> LatencyResult:
    """Round trip of small calls, closed loop, at 1 client and at ``clients`` clients.

    At each level every path's sessions are open at once and measured in alternating slices
    (``relay_added_us`` / ``relay_ratio`` per level: the C relay against direct)."""
    many = max(2, bench.clients)
    levels = sorted({1, max(2, many // 4), many})
    rounds = rounds_of(bench)
    per = max(0.05, bench.duration / (len(levels) * rounds * len(bench.paths)))
    table: dict[str, dict[str, Any]] = {}
    cpu: dict[str, CpuFigures] = {}
    for n in levels:
        sessions: dict[str, list[BenchSession]] = {}
        lats: dict[str, list[float]] = {path: [] for path in bench.paths}
        meters = {path: bench.cpu_meter() for path in bench.paths}
        try:
            for path in bench.paths:
                sessions[path] = await bench.sessions(path, n, label=f"latency x{n}")
                for s in sessions[path]:  # warm-up
                    for _ in range(10):
                        await s.call(SMALL, SMALL)
            for r in range(rounds):
                for path in (bench.paths if r % 2 == 0 else bench.paths[::-1]):
                    deadline = time.perf_counter() + per
                    meters[path].start()
                    await asyncio.gather(*(closed_loop(s, deadline, lats[path])
                                           for s in sessions[path]))
                    meters[path].pause()
        finally:
            for group in sessions.values():
                await close_all(group)
        for path in bench.paths:
            summary = lat_summary(lats[path])
            summary["calls_per_s"] = round(summary["calls"] / (per * rounds), 1)
            table.setdefault(str(n), {})[path] = summary
            bench.progress(f"latency x{n:<4} {path:>6}: p50 {summary['p50_us']:8.1f} us  "
                           f"p99 {summary['p99_us']:8.1f} us  p99.9 {summary['p999_us']:8.1f} us"
                           f"  ({summary['calls']} calls)")
            if n == many:
                cpu[path] = meters[path].result()
    keys = ("p50_us", "p99_us", "p999_us")
    for row in table.values():
        p, d, c = row.get("proxy"), row.get("direct"), row.get("relay")
        if p and d:
            row["added_us"] = {k: round(p[k] - d[k], 1) for k in keys}
            row["ratio"] = {k: ratio(p[k], d[k]) for k in keys}
        if c and d:
            row["relay_added_us"] = {k: round(c[k] - d[k], 1) for k in keys}
            row["relay_ratio"] = {k: ratio(c[k], d[k]) for k in keys}
        if p and c:
            row["proxy_vs_relay"] = {k: ratio(p[k], c[k]) for k in keys}
    one = table["1"]
    direct_p50 = one.get("direct", {}).get("p50_us")
    out: LatencyResult = {
        "metric": "median round trip of a small call, 1 client",
        "proxy": one["proxy"]["p50_us"], "direct": direct_p50,
        "ratio": ratio(one["proxy"]["p50_us"], direct_p50), "unit": "us",
    }
    if direct_p50 is not None:
        out["added_us"] = round(one["proxy"]["p50_us"] - direct_p50, 1)
    if "relay" in one:
        add_relay_figures(out, one["proxy"]["p50_us"], direct_p50, one["relay"]["p50_us"])
        if direct_p50 is not None:
            out["relay_added_us"] = round(one["relay"]["p50_us"] - direct_p50, 1)
    out.update({"levels": table, "cpu_at_max_clients": cpu, "bottleneck": bottleneck(cpu)})
    return out
