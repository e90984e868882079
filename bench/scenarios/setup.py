"""The ``setup`` scenario: connections opened, bound and closed per second, per path."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import dcerpc
from bench.client import BasicAuth, NtlmAuth
from bench.measure import CpuFigures, RelayFigures, add_relay_figures, bottleneck, percentile, ratio
from bench.scenarios.base import Bench, Figures, bench_syntax, rounds_of
from bench.scenarios.storm import samba_baseline


class SetupResult(Figures, RelayFigures, total=False):
    details: dict[str, dict[str, float]]  # path -> per_s, count, p50_ms, p99_ms
    workers: int
    cpu: dict[str, CpuFigures]
    bottleneck: str
    samba: dict[str, Any]  # with real NTLM: the same Samba's logins/s alone


async def run_setup(bench: Bench) -> SetupResult:
    """Open, BIND, close, ``setup_workers`` at a time: connections per second.

    Proxy, direct (and relay) alternate in slices (``rounds_of``)."""
    rounds = rounds_of(bench)
    per = max(0.1, bench.duration / (rounds * len(bench.paths)))
    lats: dict[str, list[float]] = {path: [] for path in bench.paths}
    walls: dict[str, float] = {path: 0.0 for path in bench.paths}
    meters = {path: bench.cpu_meter() for path in bench.paths}

    async def worker(path: str, deadline: float, lat: list[float]) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            t = await bench.open(path)
            try:
                # Any BIND answer completes set-up (a real Samba rejects the bench
                # interface, which still proves the path works end to end).
                await t.send_pdu(dcerpc.build_bind(1, bench_syntax()))
                dcerpc.parse_bind_ack(await t.recv_pdu(bench.timeout))
            finally:
                await t.close()
            lat.append(time.perf_counter() - t0)

    for r in range(rounds):
        for path in (bench.paths if r % 2 == 0 else bench.paths[::-1]):
            meters[path].start()
            t0 = time.perf_counter()
            deadline = t0 + per
            await asyncio.gather(*(worker(path, deadline, lats[path])
                                   for _ in range(bench.setup_workers)))
            walls[path] += time.perf_counter() - t0
            meters[path].pause()
    out: dict[str, dict[str, float]] = {}
    for path in bench.paths:
        lat = sorted(lats[path])
        out[path] = {"per_s": round(len(lat) / walls[path], 1), "count": len(lat),
                     "p50_ms": round(percentile(lat, 50) * 1e3, 2),
                     "p99_ms": round(percentile(lat, 99) * 1e3, 2)}
        bench.progress(f"setup {path:>6}: {out[path]['per_s']:8.1f} connections/s "
                       f"(p50 {out[path]['p50_ms']} ms, p99 {out[path]['p99_ms']} ms, "
                       f"{bench.setup_workers} in parallel)")
    cpu = {path: m.result() for path, m in meters.items()}
    proxy, direct = out["proxy"]["per_s"], out.get("direct", {}).get("per_s")
    result: SetupResult = {
        "metric": "connections opened + bound + closed per second",
        "proxy": proxy, "direct": direct, "ratio": ratio(proxy, direct), "unit": "conn/s",
    }
    if "relay" in out:
        add_relay_figures(result, proxy, direct, out["relay"]["per_s"])
    result.update({"details": out, "workers": bench.setup_workers, "cpu": cpu,
                   "bottleneck": bottleneck(cpu)})
    auth = bench.proxy.auth
    if bench.ntlm_helper and proxy and isinstance(auth, (BasicAuth, NtlmAuth)):
        # With real NTLM: what the same Samba verifies alone, for comparison.
        result["samba"] = await samba_baseline(bench, auth, logins=500)
    return result
