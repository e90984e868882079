"""The ``throughput`` scenario: one VC, 64 KiB PDUs pipelined, MB/s of payload per path."""

from __future__ import annotations

import time
from typing import Any

from bench.client import RpchClient
from bench.measure import CpuFigures, RelayFigures, add_relay_figures, bottleneck, ratio
from bench.scenarios.base import BIG, PDU, SMALL, Bench, Figures, rounds_of
from bench.session import BenchSession


class ThroughputResult(Figures, RelayFigures, total=False):
    phases: dict[str, Any]  # "both" / "down" / "up" -> path -> MB/s, ratios; "recycles"
    depth: int
    pdu_bytes: int
    rounds: int
    cpu: dict[str, CpuFigures]
    bottleneck: str


THROUGHPUT_PHASES = (
    ("both", BIG, BIG),  # (name, request payload, response payload)
    ("down", SMALL, BIG),
    ("up", BIG, SMALL),
)


async def run_throughput(bench: Bench) -> ThroughputResult:
    """One VC, 64 KiB PDUs, calls pipelined ``depth`` deep: MB/s of payload.

    The proxy, direct (and relay) runs alternate in short slices (``rounds_of``) on one VC per
    path."""
    rounds = rounds_of(bench)
    per = max(0.1, bench.duration / (rounds * len(bench.paths) * len(THROUGHPUT_PHASES)))
    moved: dict[tuple[str, str], list[float]] = {}
    meters = {path: bench.cpu_meter() for path in bench.paths}
    sessions: dict[str, BenchSession] = {}
    try:
        for path in bench.paths:
            sessions[path] = await bench.session(path)
            await sessions[path].stream(want=BIG, length=BIG, depth=bench.depth, count=8)
        for r in range(rounds):
            order = bench.paths if r % 2 == 0 else bench.paths[::-1]
            for name, length, want in THROUGHPUT_PHASES:
                for path in order:
                    meters[path].start()
                    res = await sessions[path].stream(want=want, length=length,
                                                      depth=bench.depth,
                                                      deadline=time.perf_counter() + per)
                    meters[path].pause()
                    acc = moved.setdefault((name, path), [0.0, 0.0, 0.0])
                    acc[0] += res.bytes_up + res.bytes_down
                    acc[1] += res.seconds
                    acc[2] += res.calls
            bench.progress("throughput round {}/{}: {}".format(r + 1, rounds, ", ".join(
                f"{path} {moved[('both', path)][0] / moved[('both', path)][1] / 1e6:.0f}"
                for path in bench.paths)) + " MB/s (both ways)")
        details: dict[str, Any] = {}
        for (name, path), (nbytes, secs, _calls) in moved.items():
            details.setdefault(name, {})[path] = round(nbytes / secs / 1e6, 1)
        for s in sessions.values():
            if isinstance(s.t, RpchClient):
                details["recycles"] = {"out": s.t.out_recycles, "in": s.t.in_recycles}
    finally:
        for s in sessions.values():
            await s.t.close()
    has_relay = "relay" in bench.paths
    for name, _, _ in THROUGHPUT_PHASES:
        d = details[name]
        d["ratio"] = ratio(d.get("proxy"), d.get("direct"))
        if has_relay:
            d["relay_ratio"] = ratio(d.get("relay"), d.get("direct"))
        bench.progress(f"throughput {name:>4}: proxy {d.get('proxy')} MB/s, direct "
                       f"{d.get('direct')} MB/s" + (f", relay {d.get('relay')} MB/s"
                                                    if has_relay else ""))
    cpu = {path: m.result() for path, m in meters.items()}
    both = details["both"]
    out: ThroughputResult = {
        "metric": "payload MB/s, one VC, 64 KiB PDUs both ways",
        "proxy": both.get("proxy"), "direct": both.get("direct"), "ratio": both["ratio"],
        "unit": "MB/s",
    }
    if has_relay:
        add_relay_figures(out, both.get("proxy"), both.get("direct"), both.get("relay"))
    out.update({"phases": details, "depth": bench.depth, "pdu_bytes": PDU, "rounds": rounds,
                "cpu": cpu, "bottleneck": bottleneck(cpu)})
    return out
