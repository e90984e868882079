"""The ``soak`` scenario: VCs doing mixed calls for the duration, both recyclings all the time."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench.client import RpchClient
from bench.measure import CpuFigures, bottleneck, ratio
from bench.procs import ChildProcess
from bench.scenarios.base import BIG, Bench, Figures, ProxyTarget, close_all, phase_time
from bench.session import BenchSession


class SoakResult(Figures):
    details: dict[str, Any]  # path -> calls, mb_s, calls_per_s (proxy: recycles)
    samples: list[dict[str, float]]  # the proxy's RSS and fds over time
    rss_start_mib: float | None
    rss_end_mib: float | None
    rss_max_mib: float | None
    fds_start: float | None
    fds_end: float | None
    cpu: dict[str, CpuFigures]
    bottleneck: str


SOAK_SIZES = (16, 512, 4096, 30_000, BIG, 3 * BIG + 1000)  # last one spans fragments


async def _soak_worker(s: BenchSession, rng: random.Random, deadline: float,
                       totals: list[int]) -> None:
    while time.perf_counter() < deadline:
        want = rng.choice(SOAK_SIZES)
        length = rng.choice(SOAK_SIZES)
        await s.call(want, length)
        totals[0] += 1
        totals[1] += want + length


async def _sample_proxy(bench: Bench, measured: bool, t0: float, deadline: float,
                        interval: float, samples: list[dict[str, float]]) -> None:
    """Until ``deadline``, every ``interval``: the proxy's RSS and fds (when ``measured``)."""
    while time.perf_counter() < deadline:
        smp = bench.proc_sample("proxy") if measured else None
        if smp is not None:
            samples.append({"t": round(time.perf_counter() - t0, 2),
                            "rss_mib": round(smp.rss / 2**20, 2), "fds": smp.fds})
        await asyncio.sleep(interval)


async def run_soak(bench: Bench) -> SoakResult:
    """``soak_connections`` VCs doing mixed calls for the duration; RSS and fds sampled.

    In self-contained mode the soak gets its own proxy with a 1 MiB OUT Content-Length and
    clients with a 1 MiB IN Content-Length, so both channel recyclings happen all the time."""
    per = phase_time(bench, 2)
    own: ChildProcess | None = None
    proxy_target = bench.proxy
    if bench.spawn_proxy is not None:
        own = await bench.spawn_proxy(1 << 20)
        proxy_target = ProxyTarget(own.host, own.port, bench.proxy.target, bench.proxy.path,
                                   bench.proxy.auth, bench.proxy.ssl,
                                   bench.proxy.server_hostname, bench.proxy.insecure)
    saved = bench.proxy_proc
    if own is not None:
        bench.proxy_proc = own
    out: dict[str, Any] = {}
    samples: list[dict[str, float]] = []
    cpu: dict[str, CpuFigures] = {}
    try:
        for path in bench.base_paths:  # no relay here
            kw: dict[str, Any] = {}
            if path == "proxy":
                kw = {"proxy": proxy_target, "in_content_length": 1 << 20}
            sessions = await bench.sessions(path, bench.soak_connections, **kw)
            totals = [0, 0]
            meter = bench.cpu_meter(started=True)
            t0 = time.perf_counter()
            deadline = t0 + per
            try:
                await asyncio.gather(
                    *(_soak_worker(s, random.Random(bench.seed * 1000 + i), deadline, totals)
                      for i, s in enumerate(sessions)),
                    _sample_proxy(bench, path == "proxy", t0, deadline, max(0.1, per / 40),
                                  samples))
                wall = time.perf_counter() - t0
                cpu[path] = meter.stop()
                recycles = {"out": 0, "in": 0}
                for s in sessions:
                    if isinstance(s.t, RpchClient):
                        recycles["out"] += s.t.out_recycles
                        recycles["in"] += s.t.in_recycles
            finally:
                await close_all(sessions)
            out[path] = {"calls": totals[0], "mb_s": round(totals[1] / wall / 1e6, 1),
                         "calls_per_s": round(totals[0] / wall, 1)}
            if path == "proxy":
                out[path]["recycles"] = recycles
            bench.progress(f"soak {path:>6}: {out[path]['calls']} calls, "
                           f"{out[path]['mb_s']} MB/s" + (
                               f", recycles OUT {recycles['out']} IN {recycles['in']}"
                               if path == "proxy" else ""))
    finally:
        bench.proxy_proc = saved
        if own is not None:
            await own.stop()
            if own.proc is not None and own.proc.returncode not in (0, None):
                out["proxy_exit_code"] = own.proc.returncode
    rss = [x["rss_mib"] for x in samples]
    fds = [x["fds"] for x in samples]
    return {
        "metric": f"payload MB/s of {bench.soak_connections} VCs doing mixed calls",
        "proxy": out["proxy"]["mb_s"], "direct": out.get("direct", {}).get("mb_s"),
        "ratio": ratio(out["proxy"]["mb_s"], out.get("direct", {}).get("mb_s")),
        "unit": "MB/s", "details": out, "samples": samples,
        "rss_start_mib": rss[0] if rss else None, "rss_end_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "fds_start": fds[0] if fds else None, "fds_end": fds[-1] if fds else None,
        "cpu": cpu, "bottleneck": bottleneck(cpu),
    }
