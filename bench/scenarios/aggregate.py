"""The ``aggregate`` scenario: many VCs streaming at once, proxy with 1 and 2 workers vs direct.

The VCs live in holder processes (bench.holder) so that the load generator is not one
saturated Python process; CPU is kept per process (``CpuMeter.per_process``) and
``limits_of`` names what bounded each path. With the C relay, HAProxy with 1 and with 2
threads are two more paths: the machine's own answer to "2 workers over 1".
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from bench.holder import Holder
from bench.measure import CpuMeter, limits_of, ratio
from bench.procs import ChildProcess, process_tree
from bench.scenarios.base import BIG, PDU, Bench, Figures, ProxyTarget, holder_specs, rounds_of
from rpcproxy.http.handoff import owner_of


class AggregateResult(Figures, total=False):
    """The fixed keys; next to them the keys named by a count: ``proxy_<N>w`` and
    ``ratio_<N>w`` per proxy worker count, ``ratio_<hi>w_<lo>w``, ``relay_<N>t`` per relay
    thread count (``run_aggregate`` returns both in one dict)."""

    workers_compared: list[int]
    workers_ratio: float | None  # the most workers over the fewest
    relay_threads_compared: list[int]
    relay_threads_ratio: float | None
    relay_skipped: str
    vcs: int
    load_processes: int
    depth: int
    pdu_bytes: int
    placement: str
    rounds: int
    slice_s: float
    paths: dict[str, dict[str, Any]]  # path -> mb_s, ratio_vs_direct, limited_by, costs
    cpu: dict[str, dict[str, Any]]  # path -> CpuMeter.per_process()
    bottleneck: str


@dataclass
class _AggPath:
    """One way to the backend in the aggregate scenario, and what was measured on it."""

    name: str  # "proxy-1w", "proxy-2w", "direct", "relay-1t", "relay-2t"; "proxy" (--url)
    workers: int | None  # proxy worker processes; None: direct, relay, or not known (--url)
    target: ProxyTarget | None  # None: direct or relay (plain ncacn_ip_tcp clients)
    proc: ChildProcess | None = None  # the proxy (its workers are its children) or relay
    own: bool = False  # started for this scenario, stopped at its end
    holders: list[Holder] = field(default_factory=list)
    relay: tuple[str, int] | None = None  # the C relay's address (a relay path)
    threads: int | None = None  # the C relay's threads (nbthread)
    nbytes: float = 0.0  # payload both ways over the measured slices
    seconds: float = 0.0  # the slowest holder's wall time, summed over the slices
    calls: int = 0
    split: list[int] | None = None  # VCs per proxy worker (several workers only)

    @property
    def mb_s(self) -> float | None:
        return round(self.nbytes / self.seconds / 1e6, 1) if self.seconds else None


async def run_aggregate(bench: Bench) -> dict[str, Any]:
    """Total payload MB/s of ``aggregate_vcs`` VCs each streaming 64 KiB PDUs both ways
    (``depth`` calls in flight per VC): through the proxy with 1 and with 2 workers
    (``aggregate_workers``) and directly, in one run.

    The VCs live in ``aggregate_procs`` holder processes (bench.holder; every response
    checked there as everywhere), so the load generator is not one saturated Python
    process. With several proxy workers the VCs are spread evenly over them
    (``aggregate_placement`` "balanced": each VC's cookie is chosen so that the proxy's
    cookie hash gives it to the next worker in turn; "random": random cookies, as real
    clients, so a few VCs may well land unevenly). In each slice every holder of one path
    streams for the same seconds; the figure
    is their bytes summed over the slowest holder's wall time. The paths alternate in slices
    (``rounds_of``, at most 3) after a warm-up. Self-contained, a proxy is started for each
    worker count that the bench's own proxy (--proxy-workers) is not, on the same backend;
    against a deployment (--url) there is one proxy path, of unknown worker count.

    With the C relay (``bench.relay``) two more paths, ``relay-1t`` and ``relay-2t``: the
    direct path's clients through HAProxy with 1 and with 2 threads (``nbthread``; the
    bench's relay serves for its own thread count, the other one is started for this
    scenario). What a C relay gains from a second thread here is what the machine leaves
    for a second proxy worker (``relay_threads_ratio`` next to ``workers_ratio``).

    CPU is kept per process (``CpuMeter.per_process``; the relay's also per thread) and
    ``limits_of`` names, per path, what was CPU-bound: a load-generator process, the
    backend stub, proxy processes, a relay thread, the machine."""
    n = max(1, bench.aggregate_vcs)
    nprocs = max(1, min(bench.aggregate_procs, n))
    rounds = min(3, rounds_of(bench))
    paths: list[_AggPath] = []
    relay_skipped: str | None = None
    try:
        await _proxy_paths(bench, paths)
        if bench.direct is not None:
            paths.append(_AggPath("direct", None, None))
            if bench.relay is not None:
                relay_skipped = await _relay_paths(bench, n, paths)
        await _start_holders(bench, paths, n, per_holder=-(-n // nprocs))
        has_relay = any(p.relay is not None for p in paths)
        meters = {path.name: _meter(bench, path, has_relay) for path in paths}
        for path in paths:
            if path.workers and path.workers > 1:
                cookies = [cookie for h in path.holders
                           for cookie in await h.cookies(bench.timeout)]
                path.split = [0] * path.workers
                for cookie in cookies:
                    path.split[owner_of(cookie, path.workers)] += 1
        per = max(0.1, bench.duration / (rounds * len(paths)))
        await _measure(bench, paths, meters, n, rounds, per)
        # Every VC must still work after streaming: one small call each.
        await asyncio.gather(*(h.check(bench.timeout) for p in paths for h in p.holders))
    finally:
        await asyncio.gather(*(h.stop() for p in paths for h in p.holders),
                             return_exceptions=True)
        for path in paths:
            if path.own and path.proc is not None:
                await path.proc.stop()
    exits = {p.name: p.proc.proc.returncode for p in paths
             if p.own and p.proc is not None and p.proc.proc is not None
             and p.proc.proc.returncode not in (0, None)}
    if exits:
        kinds = sorted({"relay" if p.relay is not None else "proxy" for p in paths
                        if p.name in exits})
        raise RuntimeError(f"aggregate: {' and '.join(kinds)} exited with {exits}")
    cpu = {name: m.per_process() for name, m in meters.items()}
    direct = next((p.mb_s for p in paths if p.name == "direct"), None)
    details: dict[str, Any] = {}
    notes = []
    for path in paths:
        details[path.name], lim = _path_details(path, cpu[path.name], direct)
        if lim:
            notes.append(f"{path.name} limited by " + "; ".join(lim))
        bench.progress(f"aggregate {path.name:>8}: {path.mb_s} MB/s"
                       + (f" ({details[path.name]['ratio_vs_direct']}x direct)"
                          if (path.target or path.relay) and direct else "")
                       + (f", VCs per worker {path.split}" if path.split else "")
                       + (f"; limited by {'; '.join(lim)}" if lim else ""))
    out, by_count = _figures(paths, n, direct)
    if relay_skipped:
        out["relay_skipped"] = relay_skipped
    out.update({
        "vcs": n, "load_processes": nprocs, "depth": bench.depth, "pdu_bytes": PDU,
        "placement": bench.aggregate_placement,
        "rounds": rounds, "slice_s": round(per, 3), "paths": details, "cpu": cpu,
        "bottleneck": " | ".join(notes) if notes else "no process CPU-bound",
    })
    return {**out, **by_count}


async def _proxy_paths(bench: Bench, paths: list[_AggPath]) -> None:
    """Append the proxy paths: self-contained, one per ``aggregate_workers`` count (the
    bench's own proxy for its count, another started on the same backend for each other);
    against a deployment (--url) the one proxy, of unknown worker count."""
    if bench.spawn_proxy is None or bench.proxy_proc is None:
        paths.append(_AggPath("proxy", None, bench.proxy, bench.proxy_proc))
        return
    for w in sorted(set(bench.aggregate_workers)):
        if w == bench.proxy_workers:
            paths.append(_AggPath(f"proxy-{w}w", w, bench.proxy, bench.proxy_proc))
            continue
        child = await bench.spawn_proxy(None, workers=w)
        target = ProxyTarget(child.host, child.port, bench.proxy.target,
                             bench.proxy.path, bench.proxy.auth, bench.proxy.ssl,
                             bench.proxy.server_hostname, bench.proxy.insecure)
        paths.append(_AggPath(f"proxy-{w}w", w, target, child, own=True))
        await asyncio.sleep(0.3 if w > 1 else 0)  # workers fork after LISTENING


async def _start_holders(bench: Bench, paths: list[_AggPath], n: int, *,
                         per_holder: int) -> None:
    """``n`` VCs per path in holder processes, placed on the workers as
    ``aggregate_placement`` says; returns once every VC is open."""
    for path in paths:
        kind = "direct" if path.target is None else "proxy"
        specs = holder_specs(bench, kind, n, per_holder=per_holder, proxy=path.target,
                             address=path.relay)
        if path.workers and path.workers > 1 and bench.aggregate_placement == "balanced":
            j = 0
            for spec in specs:  # VC j goes to worker j mod workers
                spec.owners = [(j + i) % path.workers for i in range(spec.count)]
                spec.owner_count = path.workers
                j += spec.count
        path.holders = [Holder(spec) for spec in specs]
        for h in path.holders:
            await h.start()
    await asyncio.gather(*(h.wait_ready(bench.timeout + n / 20)
                           for path in paths for h in path.holders))
    for path in paths:
        kind = ("proxy" if path.target is not None else
                "relay" if path.relay is not None else "direct")
        for h in path.holders:
            bench.tls_seen.setdefault(kind, set()).update(h.tls_seen)


def _meter(bench: Bench, path: _AggPath, has_relay: bool) -> CpuMeter:
    """The processes of one path, each kept apart (the relay's threads too)."""
    groups: dict[str, list[int]] = {
        "loadgen": [os.getpid(), *(h.pid for h in path.holders if h.pid is not None)],
        "proxy": process_tree(path.proc.pid) if path.proc is not None and
        path.target is not None else [],
        "backend": [bench.backend_proc.pid] if bench.backend_proc is not None else [],
    }
    threads: dict[str, int] = {}
    if has_relay:  # every path says what the relay used: nothing unless it is one
        groups["relay"] = []
        if path.relay is not None and path.proc is not None:
            groups["relay"] = [path.proc.pid]
            threads["relay"] = path.proc.pid
    return CpuMeter(groups, threads=threads)


async def _measure(bench: Bench, paths: list[_AggPath], meters: dict[str, CpuMeter],
                   n: int, rounds: int, per: float) -> None:
    """A warm-up slice per path, then ``rounds`` rounds of one slice per path (in turns)."""

    async def slice_(path: _AggPath, seconds: float) -> tuple[int, float, int]:
        res = await asyncio.gather(*(h.stream_stats(seconds, bench.timeout, length=BIG,
                                                    depth=bench.depth)
                                     for h in path.holders))
        return (sum(r.down + r.up for r in res), max(r.seconds for r in res),
                sum(r.calls for r in res))

    for path in paths:  # warm-up: TCP windows, the proxies' buffers, code paths
        await slice_(path, min(0.3, per))
    for r in range(rounds):
        k = r % len(paths)
        for path in paths[k:] + paths[:k]:
            meters[path.name].start()
            nbytes, secs, calls = await slice_(path, per)
            meters[path.name].pause()
            path.nbytes += nbytes
            path.seconds += secs
            path.calls += calls
        bench.progress(f"aggregate round {r + 1}/{rounds}: " + ", ".join(
            f"{p.name} {p.nbytes / p.seconds / 1e6:.0f}" for p in paths)
            + f" MB/s ({n} VCs both ways)")


def _path_details(path: _AggPath, c: dict[str, Any],
                  direct: float | None) -> tuple[dict[str, Any], list[str]]:
    """One path's entry of ``paths`` and what bounded it (``limits_of``)."""
    lim = limits_of(c)
    gb = path.nbytes / 1e9
    is_relay = path.relay is not None
    cost_groups = ("loadgen", "proxy", "backend", "irq") + (("relay",) if is_relay else ())
    d: dict[str, Any] = {
        "mb_s": path.mb_s, "workers": path.workers,
        "ratio_vs_direct": ratio(path.mb_s, direct) if path.target or is_relay else None,
        "calls": path.calls, "limited_by": lim or None,
        # CPU seconds each part spent per GB of payload: what a byte costs where
        "cpu_s_per_gb": {g: round((c.get(f"{g}_cpu") or 0.0) * c["wall_s"] / gb, 2)
                         for g in cost_groups} if gb else None,
    }
    if path.target is not None and c.get("proxy_cpu"):
        # Payload the proxy forwards per core-second of its own CPU: the figure it could
        # reach per worker with a core to itself, at this cost per byte.
        d["mb_s_per_proxy_core"] = round((path.mb_s or 0.0) / c["proxy_cpu"], 1)
    if is_relay:
        d["threads"] = path.threads
        if c.get("relay_cpu"):  # the same for the C relay
            d["mb_s_per_relay_core"] = round((path.mb_s or 0.0) / c["relay_cpu"], 1)
    if path.split is not None:
        d["vcs_per_worker"] = path.split
    return d, lim


def _figures(paths: list[_AggPath], n: int,
             direct: float | None) -> tuple[AggregateResult, dict[str, float | None]]:
    """The head figures (the proxy with the most workers vs direct), the worker and thread
    comparisons, and the keys named by a worker or thread count."""
    proxies = [p for p in paths if p.target is not None]
    head = proxies[-1]  # the most workers
    out: AggregateResult = {
        "metric": f"total MB/s, {n} VCs, 64 KiB PDUs both ways" + (
            f" (proxy: {head.workers} workers)" if head.workers else ""),
        "proxy": head.mb_s, "direct": direct, "ratio": ratio(head.mb_s, direct),
        "unit": "MB/s",
    }
    by_count: dict[str, float | None] = {}
    by_workers = {p.workers: p.mb_s for p in proxies if p.workers}
    for w, v in sorted(by_workers.items()):
        by_count[f"proxy_{w}w"] = v
        by_count[f"ratio_{w}w"] = ratio(v, direct)
    if len(by_workers) >= 2:
        lo, hi = min(by_workers), max(by_workers)
        out["workers_compared"] = [lo, hi]
        out["workers_ratio"] = ratio(by_workers[hi], by_workers[lo])
        by_count[f"ratio_{hi}w_{lo}w"] = out["workers_ratio"]
    by_threads = {p.threads: p.mb_s for p in paths if p.relay is not None and p.threads}
    for t, v in sorted(by_threads.items()):
        by_count[f"relay_{t}t"] = v
    if len(by_threads) >= 2:
        lo, hi = min(by_threads), max(by_threads)
        out["relay_threads_compared"] = [lo, hi]
        out["relay_threads_ratio"] = ratio(by_threads[hi], by_threads[lo])
    return out, by_count


async def _relay_paths(bench: Bench, n: int, paths: list[_AggPath]) -> str | None:
    """Append the aggregate scenario's C relay paths (``aggregate_relay_threads``) to
    ``paths``: the bench's relay for its own thread count, another HAProxy started
    (``spawn_relay``) for each other count. Returns why they were left out, or None."""
    need = n + 16
    if (bench.relay_maxconn or 0) < need:
        reason = (f"HAProxy's maxconn {bench.relay_maxconn} (from the hard RLIMIT_NOFILE) is "
                  f"below the {need} connections this needs")
        bench.progress(f"aggregate: C relay skipped: {reason}")
        return reason
    for t in sorted(set(bench.aggregate_relay_threads)):
        if t == bench.relay_threads:
            paths.append(_AggPath(f"relay-{t}t", None, None, bench.relay_proc,
                                  relay=bench.relay, threads=t))
            continue
        if bench.spawn_relay is None:
            continue
        try:
            child = await bench.spawn_relay(t)
        except RuntimeError as exc:
            reason = f"HAProxy with {t} threads did not start: {exc}"
            bench.progress(f"aggregate: C relay with {t} threads skipped: {reason}")
            return reason
        paths.append(_AggPath(f"relay-{t}t", None, None, child, own=True,
                              relay=(child.host, child.port), threads=t))
    return None
