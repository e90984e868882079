"""How the bench measures: one CPU meter, percentiles, ratios and what bounded a figure.

``CpuMeter`` is the one meter every scenario uses. It is given a function naming the
processes of each part ("loadgen", "proxy", "relay", "backend" -> pids), asked again at every
``start()`` so that a proxy's workers forked meanwhile are seen; ``start()`` / ``pause()`` may
alternate (interleaved rounds) and the CPU of each process is summed over the measured
slices, next to the machine's busy and interrupt time from /proc/stat. Two views of the same
figures: ``result()`` (each part summed, plus the busiest process of the load generator and
of the proxy: what ``bottleneck`` reads) and ``per_process()`` (every process apart, and the
threads of one process per part where asked: what ``limits_of`` reads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypedDict

from bench.procs import cpu_seconds, thread_cpu_seconds

_CLK_TCK = os.sysconf("SC_CLK_TCK")
PARTS = ("loadgen", "proxy", "relay", "backend")  # what CpuMeter tells apart
BUSY = 0.85  # a process using this much of a core is taken as CPU-bound

CpuFigures = dict[str, float | None]  # CpuMeter.result(): "<part>_cpu" etc., cores
Groups = dict[str, list[int]]  # part -> pids


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, irq + softirq) CPU seconds of the whole machine, from /proc/stat.

    Interrupt time is charged to no process: on loopback most of the kernel's TCP receive
    work runs as softirq, so it is our own traffic's cost, not other processes'."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(x) for x in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    irq = sum(values[5:7]) if len(values) > 6 else 0
    return busy / _CLK_TCK, irq / _CLK_TCK


class CpuMeter:
    """CPU of each part's processes while measuring; see the module docstring.

    ``groups`` names the processes (part -> pids, or a function giving them at each
    ``start()``; a part with no pids is shown as not measured); ``threads`` names, per part,
    one process whose threads are also kept apart (a multi-threaded relay: one busy thread is
    a bound even when the process's sum is below two cores);
    ``shown``: the parts ``result()`` reports."""

    def __init__(self, groups: Groups | Callable[[], Groups], *,
                 threads: dict[str, int] | None = None, shown: tuple[str, ...] = PARTS,
                 started: bool = False) -> None:
        self._groups = groups
        self.shown = shown
        self.threads = threads or {}
        self.parts: Groups = {}  # as of the last start(), in the order groups() gave them
        self.used: dict[int, float] = {}  # pid -> CPU seconds over the measured slices
        self.part_of: dict[int, str] = {}
        self.thread_used: dict[str, dict[int, float]] = {g: {} for g in self.threads}
        self.seen: set[str] = set()  # parts measured at both ends of at least one slice
        self.machine = 0.0
        self.irq = 0.0
        self.machine_seen = False
        self.wall = 0.0
        self._c0: dict[int, float | None] = {}
        self._tc0: dict[str, dict[int, float]] = {}
        self._m0: tuple[float, float] | None = None
        self._t0: float | None = None
        if started:
            self.start()

    def start(self) -> None:
        self.parts = self._groups() if callable(self._groups) else self._groups
        for part, pids in self.parts.items():
            for pid in pids:
                self.part_of.setdefault(pid, part)
        self._c0 = {pid: cpu_seconds(pid) for pids in self.parts.values() for pid in pids}
        self._tc0 = {g: thread_cpu_seconds(pid) for g, pid in self.threads.items()}
        self._m0 = machine_cpu_seconds()
        self._t0 = time.perf_counter()

    def pause(self) -> None:
        if self._t0 is None:
            return
        self.wall += time.perf_counter() - self._t0
        self._t0 = None
        for pid, c0 in self._c0.items():
            c1 = cpu_seconds(pid)
            if c0 is not None and c1 is not None:
                self.used[pid] = self.used.get(pid, 0.0) + c1 - c0
                self.seen.add(self.part_of[pid])
        for group, pid in self.threads.items():
            before = self._tc0.get(group, {})
            used = self.thread_used[group]
            for tid, t1 in thread_cpu_seconds(pid).items():
                if tid in before:
                    used[tid] = used.get(tid, 0.0) + t1 - before[tid]
        m1 = machine_cpu_seconds()
        if self._m0 is not None and m1 is not None:
            self.machine += m1[0] - self._m0[0]
            self.irq += m1[1] - self._m0[1]
            self.machine_seen = True

    def stop(self) -> CpuFigures:
        self.pause()
        return self.result()

    def _part_seconds(self, part: str) -> list[float]:
        return [v for pid, v in self.used.items() if self.part_of[pid] == part]

    def _other(self, ours: float) -> float:
        return max(0.0, self.machine - self.irq - ours)

    def result(self) -> CpuFigures:
        """Cores used (1.0 = one core busy) per part, summed over its processes, and
        ``<part>_processes`` / ``<part>_busiest`` for the load generator and the proxy;
        ``irq_cpu`` for the kernel's interrupt work (on loopback mostly TCP receive softirq,
        i.e. our own traffic) and ``other_cpu`` for everything else on the machine (other
        processes)."""
        out: CpuFigures = {"wall_s": round(self.wall, 3)}
        for name in self.shown:
            out[f"{name}_cpu"] = (round(sum(self._part_seconds(name)) / self.wall, 3)
                                  if name in self.seen and self.wall else None)
        for name in ("loadgen", "proxy"):
            each = self._part_seconds(name)
            if each and self.wall:
                out[f"{name}_processes"] = len(each)
                out[f"{name}_busiest"] = round(max(each) / self.wall, 3)
        if self.machine_seen and self.wall:
            ours = sum(sum(self._part_seconds(n)) for n in self.shown)
            out["irq_cpu"] = round(self.irq / self.wall, 3)
            out["other_cpu"] = round(self._other(ours) / self.wall, 3)
        return out

    def per_process(self) -> dict[str, Any]:
        """``<part>_cpu`` (cores, summed) and ``<part>_procs`` (each process, 1.0 = one
        core busy), ``<part>_threads`` (each thread of a part's process kept apart, by
        thread id); ``irq_cpu`` and ``other_cpu`` as in ``result()``."""
        wall = self.wall or 1.0
        out: dict[str, Any] = {"wall_s": round(self.wall, 3)}
        ours = 0.0
        for group, pids in self.parts.items():
            each = [round(self.used.get(pid, 0.0) / wall, 3) for pid in pids]
            out[f"{group}_cpu"] = round(sum(each), 3) if pids else None
            out[f"{group}_procs"] = each
            ours += sum(self.used.get(pid, 0.0) for pid in pids)
        for group, used in self.thread_used.items():
            out[f"{group}_threads"] = [round(used[tid] / wall, 3) for tid in sorted(used)]
        out["irq_cpu"] = round(self.irq / wall, 3)
        out["other_cpu"] = round(self._other(ours) / wall, 3)
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def ratio(proxy: float | None, direct: float | None) -> float | None:
    if proxy is None or direct is None or direct == 0:
        return None
    return round(proxy / direct, 3)


class RelayFigures(TypedDict, total=False):
    """The keys a scenario adds for the C relay (its figure in the scenario's unit)."""

    relay: float | None
    relay_ratio: float | None  # relay / direct
    proxy_vs_relay: float | None  # proxy / relay


def add_relay_figures(out: RelayFigures, proxy: float | None, direct: float | None,
                      relay: float | None) -> None:
    """Add the C relay's keys to a scenario's result: its figure, relay / direct, proxy /
    relay."""
    out["relay"] = relay
    out["relay_ratio"] = ratio(relay, direct)
    out["proxy_vs_relay"] = ratio(proxy, relay)


def lat_summary(values: list[float]) -> dict[str, float]:
    """Calls and the p50 / p99 / p99.9 of round trips given in seconds, in microseconds."""
    v = sorted(values)
    return {"calls": len(v), "p50_us": round(percentile(v, 50) * 1e6, 1),
            "p99_us": round(percentile(v, 99) * 1e6, 1),
            "p999_us": round(percentile(v, 99.9) * 1e6, 1)}


def bottleneck(cpu: dict[str, dict[str, float | None]]) -> str:
    """Which processes were (nearly) CPU-bound while each path was measured."""
    cores = os.cpu_count() or 1
    notes = []
    for path in ("proxy", "direct", "relay"):
        c = cpu.get(path)
        if not c:
            continue
        busy = []
        for name in PARTS:
            n = int(c.get(f"{name}_processes") or 1)
            if n > 1:  # several processes: CPU-bound when one of them is
                top = c.get(f"{name}_busiest") or 0.0
                if top >= BUSY:
                    busy.append(f"{name} {top:.0%} (the busiest of its {n} processes)")
            elif (c.get(f"{name}_cpu") or 0.0) >= BUSY:
                busy.append(f"{name} {c[f'{name}_cpu']:.0%}")
        total = sum(c.get(f"{name}_cpu") or 0.0 for name in PARTS)
        total += c.get("irq_cpu") or 0.0
        parts = []
        if busy:
            parts.append("CPU-bound: " + ", ".join(busy) + " of a core")
        if any(b.startswith("loadgen") for b in busy):
            parts.append("the load generator itself limits this figure")
        other = c.get("other_cpu") or 0.0
        if other >= 0.25:
            parts.append(f"other processes used {other:.2f} cores (a shared machine: figures "
                         "are noisy)")
        if total + other >= 0.9 * cores:
            parts.append(f"all {cores} cores busy ({total + other:.2f} used)")
        if parts:
            notes.append(f"{path} run: " + "; ".join(parts))
    return " | ".join(notes) if notes else "no process CPU-bound"




def limits_of(c: dict[str, Any], cores: int | None = None) -> list[str]:
    """What bounded one path's figure, from its ``CpuMeter.per_process()``."""
    cores = cores or os.cpu_count() or 1
    found = []
    loadgen = c.get("loadgen_procs") or []
    if loadgen and max(loadgen) >= BUSY:
        found.append(f"load generator (busiest of its {len(loadgen)} processes at "
                     f"{max(loadgen):.0%} of a core)")
    backend = c.get("backend_procs") or []
    if backend and max(backend) >= BUSY:
        found.append(f"backend stub ({max(backend):.0%} of a core, one process)")
    proxy = c.get("proxy_procs") or []
    hot = [x for x in proxy if x >= BUSY]
    if hot:
        found.append("proxy (" + ", ".join(f"{x:.0%}" for x in hot) + " of a core in "
                     f"{len(hot)} of its {len(proxy)} processes)")
    # The C relay is one process: bound when one of its threads is (or, threads not known,
    # when the process uses a core).
    relay = c.get("relay_threads") or c.get("relay_procs") or []
    hot = [x for x in relay if x >= BUSY]
    if hot and len(relay) == 1:
        found.append(f"C relay ({hot[0]:.0%} of a core, one "
                     + ("thread)" if c.get("relay_threads") else "process)"))
    elif hot:
        unit = "threads" if c.get("relay_threads") else "processes"
        found.append("C relay (" + ", ".join(f"{x:.0%}" for x in hot) + " of a core in "
                     f"{len(hot)} of its {len(relay)} {unit})")
    total = sum(c.get(f"{g}_cpu") or 0.0
                for g in ("loadgen", "proxy", "relay", "backend", "irq"))
    total += c.get("other_cpu") or 0.0
    if total >= 0.9 * cores:
        found.append(f"the machine: all {cores} cores busy ({total:.2f} used"
                     + (f", {c['other_cpu']:.2f} by other processes" if
                        (c.get("other_cpu") or 0.0) >= 0.25 else "") + ")")
    return found

