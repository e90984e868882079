"""The ``concurrency`` scenario: N idle VCs, a few active ones measured while others stream.

The idle and the streaming VCs live in holder processes (bench.holder), so that the load
generator's own descriptor limit does not cap N; the proxy's RSS and descriptors are sampled
as the VCs open (``rss_curve``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.holder import Holder
from bench.measure import (
    CpuFigures,
    RelayFigures,
    add_relay_figures,
    bottleneck,
    lat_summary,
    ratio,
)
from bench.procs import ProcSample, process_tree
from bench.scenarios.base import Bench, Figures, close_all, holder_specs, phase_time
from bench.scenarios.latency import closed_loop
from bench.session import BenchSession

USED_CALL = 65536  # bytes each way of the one call every idle VC carries before the second sample


class ConcurrencyResult(Figures, RelayFigures, total=False):
    rss_mib: float | None  # the proxy's, with every VC open
    fds: int | None
    rss_per_vc_kib: float | None  # what one idle VC (2 channels + 1 backend socket) adds
    rss_per_used_vc_kib: float | None  # the same once each VC carried one 64 KiB call
    relay_rss_per_conn_kib: float | None  # the relay's, per connection (client + backend)
    rss_curve: list[dict[str, float]]  # the proxy's RSS and fds as the VCs opened
    details: dict[str, Any]  # connections, active, streams, per path: latency, RSS, ramp
    cpu: dict[str, CpuFigures]
    bottleneck: str


def _fd_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process (from /proc/PID/limits)."""
    try:
        with open(f"/proc/{pid}/limits") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None

def fds_per_vc(*, tls: bool, workers: int) -> float:
    """Descriptors one VC takes in the proxy, on average over its workers.

    2 channels + 1 backend socket. Over TLS with several workers, a channel that another
    worker accepted keeps its TLS connection there and is relayed to the owner over a
    socketpair: 2 more descriptors for each of the (w-1)/w such channels."""
    per_vc = 3.0
    if tls and workers > 1:
        per_vc += 2 * 2 * (workers - 1) / workers
    return per_vc


async def _proxy_fd_room(bench: Bench, pid: int, n: int, streams: int) -> dict[str, Any]:
    """Whether each proxy process may open the descriptors this needs (RuntimeError if not);
    its limit and process count."""
    workers = max(1, bench.proxy_workers)
    tree = process_tree(pid)
    for _ in range(50):  # workers fork after LISTENING: wait up to 5 s for them
        if workers == 1 or len(tree) > workers:
            break
        await asyncio.sleep(0.1)
        tree = process_tree(pid)
    limit = _fd_limit(tree[-1])
    per_vc = fds_per_vc(tls=bench.proxy.ssl is not None, workers=workers)
    # VCs are spread over workers by cookie hash: allow 20% imbalance.
    need = int(per_vc * (n + bench.active + streams) / workers
               * (1.2 if workers > 1 else 1)) + 64
    if limit is not None and limit < need:
        raise RuntimeError(
            f"each proxy process may open {limit} file descriptors but {n} idle + "
            f"{bench.active + streams} busy VCs over {workers} worker(s) need about {need} "
            f"each ({per_vc:g} per VC): raise the hard RLIMIT_NOFILE or use more workers "
            "(--proxy-workers)")
    return {"proxy_fd_limit": limit, "proxy_processes": len(tree)}


async def run_concurrency(bench: Bench) -> ConcurrencyResult:
    """``connections`` idle VCs, then ``active`` ones measured while ``streams`` stream.

    The idle connections live in holder processes (bench.holder), at most
    ``HOLDER_MAX_VCS`` each, so the load generator's own descriptor limit does not cap N;
    the streaming ones in two more holders; only the measured active VCs are the load
    generator's own. The relay path is left out (``relay_skipped``) when HAProxy's maxconn,
    bounded by the descriptor limit, cannot hold them all."""
    n = bench.connections
    streams = bench.streams if bench.streams is not None else min(100, max(1, n // 10))
    result: dict[str, Any] = {"connections": n, "active": bench.active, "streams": streams,
                              "stream_rate_mb_s": bench.stream_rate / 1e6 or None}
    paths = bench.paths
    relay_need = n + bench.active + streams + 16
    if "relay" in paths and (bench.relay_maxconn or 0) < relay_need:
        paths = [p for p in paths if p != "relay"]
        result["relay_skipped"] = (
            f"the relay's maxconn {bench.relay_maxconn} (from the hard RLIMIT_NOFILE) is "
            f"below the {relay_need} connections this needs")
        bench.progress(f"concurrency: relay skipped: {result['relay_skipped']}")
    per = phase_time(bench, len(paths))
    cpu: dict[str, CpuFigures] = {}
    rss_curve: list[dict[str, float]] = []
    if bench.proxy_proc is not None:
        result.update(await _proxy_fd_room(bench, bench.proxy_proc.pid, n, streams))
    for path in paths:
        result[path], cpu[path] = await _one_path(bench, path, n, streams, per, rss_curve)
    p99 = {path: round(result[path]["active_latency"]["p99_us"] / 1000, 3)
           for path in paths}
    out: ConcurrencyResult = {
        "metric": f"p99 round trip (ms) of {bench.active} active VCs among {n} idle "
                  f"while {streams} stream" + (f" at {bench.stream_rate / 1e6:g} MB/s each"
                                               if bench.stream_rate else ""),
        "proxy": p99["proxy"], "direct": p99.get("direct") or None,
        "ratio": ratio(p99["proxy"], p99.get("direct")), "unit": "ms",
    }
    if "relay" in p99:
        add_relay_figures(out, p99["proxy"], p99.get("direct"), p99["relay"])
    out.update({
        "rss_mib": result["proxy"].get("rss_mib"), "fds": result["proxy"].get("fds"),
        "rss_per_vc_kib": result["proxy"].get("rss_per_vc_kib"),
        "rss_per_used_vc_kib": result["proxy"].get("rss_per_used_vc_kib"),
        "relay_rss_per_conn_kib": (result["relay"].get("rss_per_vc_kib")
                                   if "relay" in result else None),
        "rss_curve": rss_curve, "details": result, "cpu": cpu, "bottleneck": bottleneck(cpu),
    })
    return out


async def _one_path(bench: Bench, path: str, n: int, streams: int, per: float,
                    rss_curve: list[dict[str, float]]) -> tuple[dict[str, Any], CpuFigures]:
    """One path of the scenario: ``n`` idle VCs in holders, ``streams`` streaming in two more
    holders, ``bench.active`` measured here; its entry of ``details`` and its CPU."""
    measured = path if path in ("proxy", "relay") else None  # whose RSS and fds to sample
    base = bench.proc_sample(measured) if measured else None
    holders = [Holder(spec) for spec in holder_specs(bench, path, n)]
    busy: list[BenchSession] = []
    try:
        t_ramp = time.perf_counter()
        next_mark = max(1, n // 10)

        def progress_hook() -> None:
            nonlocal next_mark
            opened = sum(h.opened for h in holders)
            if opened < next_mark:
                return
            next_mark = (opened // max(1, n // 10) + 1) * max(1, n // 10)
            smp = bench.proc_sample("proxy") if path == "proxy" else None
            if smp is not None:
                rss_curve.append({"vcs": opened, "rss_mib": round(smp.rss / 2**20, 1),
                                  "fds": smp.fds})
            bench.progress(f"concurrency {path:>6}: {opened}/{n} idle connections")

        for h in holders:
            await h.start()
        ramp_timeout = bench.timeout + n / 20
        await asyncio.gather(*(h.wait_ready(ramp_timeout, progress_hook) for h in holders))
        for h in holders:
            bench.tls_seen.setdefault(path, set()).update(h.tls_seen)
        ramp_s = time.perf_counter() - t_ramp
        if path == "proxy":
            smp = bench.proc_sample("proxy")
            if smp is not None:
                rss_curve.append({"vcs": n, "rss_mib": round(smp.rss / 2**20, 1),
                                  "fds": smp.fds})
        at_n = bench.proc_sample(measured) if measured else None
        # Then every idle VC carries one 64 KiB call each way, as a real client's channels
        # do, and is idle again: what a VC holds once it has carried traffic.
        await asyncio.gather(*(h.check(bench.timeout + n / 100, USED_CALL) for h in holders))
        after_use = bench.proc_sample(measured) if measured else None
        # The streaming VCs live in holder processes too, so that the process measuring
        # the active VCs' round trips is not also busy with 100 streams.
        stream_holders = [Holder(spec) for spec in holder_specs(
            bench, path, streams, per_holder=max(1, (streams + 1) // 2))]
        holders.extend(stream_holders)
        for h in stream_holders:
            await h.start()
        await asyncio.gather(*(h.wait_ready(bench.timeout + streams / 20)
                               for h in stream_holders))
        busy = await bench.sessions(path, bench.active, concurrency=100)
        actives = busy
        lats: list[list[float]] = [[] for _ in actives]
        moved: list[int] = []
        meter = bench.cpu_meter(started=True)
        deadline = time.perf_counter() + per
        peak: ProcSample | None = None

        async def sampler() -> None:
            nonlocal peak
            while time.perf_counter() < deadline:
                await asyncio.sleep(min(0.25, per / 4))
                smp = bench.proc_sample(measured) if measured else None
                if smp is not None and (peak is None or smp.rss > peak.rss):
                    peak = smp

        async def streamer(h: Holder) -> None:
            moved.append(await h.stream(per, bench.timeout, bench.stream_rate))

        await asyncio.gather(
            *(closed_loop(s, deadline, lat) for s, lat in zip(actives, lats, strict=True)),
            *(streamer(h) for h in stream_holders),
            sampler(),
        )
        cpu = meter.stop()
        # Every idle (and streaming) VC must still work: one small call each.
        await asyncio.gather(*(h.check(bench.timeout + n / 200) for h in holders))
        summary = lat_summary([x for lat in lats for x in lat])
        entry: dict[str, Any] = {
            "active_latency": summary,
            "stream_mb_s": round(sum(moved) / per / 1e6, 1),
            "ramp_s": round(ramp_s, 2),
            "ramp_per_s": round(n / ramp_s, 1) if ramp_s else None,
            "holders": len(holders),
        }
        if base is not None and at_n is not None:
            entry["rss_mib"] = round(at_n.rss / 2**20, 1)
            entry["rss_peak_mib"] = round(max(at_n.rss, peak.rss if peak else 0) / 2**20, 1)
            entry["rss_base_mib"] = round(base.rss / 2**20, 1)
            entry["rss_per_vc_kib"] = round((at_n.rss - base.rss) / n / 1024, 1)
            if after_use is not None:
                entry["rss_per_used_vc_kib"] = round((after_use.rss - base.rss) / n / 1024, 1)
            entry["fds"] = at_n.fds
        bench.progress(
            f"concurrency {path:>6}: {n} idle + {streams} streaming "
            f"({entry['stream_mb_s']} MB/s): active p50 {summary['p50_us']:.0f} us, "
            f"p99 {summary['p99_us']:.0f} us" + (
                f"; {path} RSS {entry['rss_mib']} MiB, {entry['fds']} fds"
                if "rss_mib" in entry else ""))
        return entry, cpu
    finally:
        await close_all(busy)
        await asyncio.gather(*(h.stop() for h in holders), return_exceptions=True)
