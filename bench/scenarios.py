"""The bench scenarios. Each runs the same load over the proxy and directly against the backend.

A scenario is ``async def run_x(bench: Bench) -> dict``; the dict carries at least ``proxy``,
``direct``, ``ratio`` (always proxy / direct, ``None`` without a direct path) and ``unit``, plus
details and the CPU each process used while it was measured (``cpu``), from which
``bottleneck`` says whether the load generator itself was the limit.

With a relay (``bench.relay``: HAProxy in TCP mode between the direct clients and the
backend, self-contained mode only) ``throughput``, ``latency``, ``concurrency`` and ``setup``
measure it as a third path and add ``relay`` (same unit), ``relay_ratio`` (relay / direct)
and ``proxy_vs_relay`` (proxy / relay); ``soak`` stays proxy vs direct. ``aggregate`` keeps
its proxy-vs-direct figures and adds the relay with 1 and with 2 threads (``relay_1t``,
``relay_2t``, ``relay_threads_ratio``): the machine's own answer to "2 workers over 1".

Time: ``bench.duration`` is the measuring time of one scenario, shared between the paths (and
within a path between its phases); ramps, warm-ups and checks come on top but are bounded.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench import dcerpc
from bench.client import BasicAuth, NtlmAuth, RpchClient
from bench.direct import DirectClient
from bench.holder import Holder, HolderSpec
from bench.procs import ChildProcess, ProcSample
from bench.session import BenchSession, PduTransport

_CLK_TCK = os.sysconf("SC_CLK_TCK")
PDU = 0xFFF8  # "64 KiB PDUs": the largest 8-aligned fragment under 65535
BIG = PDU - dcerpc.REQUEST_HEADER_LEN - 24  # stub payload filling one fragment exactly
SMALL = 16

Progress = Callable[[str], None]


@dataclass
class ProxyTarget:
    host: str
    port: int
    target: str
    path: str = "/rpc/rpcproxy.dll"
    auth: BasicAuth | NtlmAuth | None = None
    ssl: Any = None
    server_hostname: str | None = None
    insecure: bool = False  # TLS certificate not verified (holders need to know)


@dataclass
class Bench:
    proxy: ProxyTarget
    direct: tuple[str, int] | None
    duration: float
    progress: Progress
    proxy_proc: ChildProcess | None = None
    backend_proc: ChildProcess | None = None
    # The C relay reference (bench.relay): HAProxy's address and process; None: no relay.
    relay: tuple[str, int] | None = None
    relay_proc: ChildProcess | None = None
    relay_maxconn: int | None = None
    relay_threads: int = 1  # HAProxy's nbthread of ``relay_proc``
    # ``--tls``: the client context for the relay path (HAProxy terminating TLS); None: plain.
    relay_ssl: Any = None
    # Set by the CLI when the relay runs: start another HAProxy on the bench's backend,
    # ``await spawn_relay(threads)``; stopped by whoever started it.
    spawn_relay: Callable[[int], Awaitable[ChildProcess]] | None = None
    aggregate_relay_threads: tuple[int, ...] = (1, 2)  # relay thread counts in aggregate
    timeout: float = 10.0
    # OUT-channel receive window every RpchClient of the bench (holders too) announces.
    client_window: int = 0x40000
    connections: int = 1000
    clients: int = 32
    active: int = 10
    streams: int | None = None
    depth: int = 4
    setup_workers: int = 8
    soak_connections: int = 16
    stream_rate: float = 0.0  # bytes/s per streaming VC in the concurrency scenario; 0 = max
    proxy_workers: int = 1  # worker processes of the bench's own proxy
    aggregate_vcs: int = 8  # streaming VCs in the aggregate scenario
    aggregate_procs: int = 2  # load-generator (holder) processes they are spread over
    aggregate_workers: tuple[int, ...] = (1, 2)  # proxy worker counts the aggregate compares
    aggregate_placement: str = "balanced"  # or "random": VC cookies vs the proxy's workers
    seed: int = 1
    # Set by the CLI (self-contained mode): start another proxy on the bench's backend,
    # ``await spawn_proxy(out_content_length, workers=None)`` (None: --proxy-workers).
    spawn_proxy: Callable[..., Awaitable[ChildProcess]] | None = None
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    # The storm scenario (bench.storm): real NTLM through this ntlm_auth command.
    ntlm_helper: list[str] | None = None
    ntlm_helpers: int = 32  # helpers of the proxy, and of the Samba-alone baseline
    storm_vcs: int = 1000
    storm_wrong_passwords: int = 0
    # path -> the TLS versions its connections negotiated ("plain": none), as opened by
    # ``open``: what ``rpcproxy-bench --tls`` reports as having really run over TLS.
    tls_seen: dict[str, set[str]] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """The paths the relay-aware scenarios measure: proxy, direct and the C relay."""
        paths = self.base_paths
        return [*paths, "relay"] if self.relay is not None and "direct" in paths else paths

    @property
    def base_paths(self) -> list[str]:
        """Proxy and direct only (soak; aggregate adds its own relay paths)."""
        return ["proxy", "direct"] if self.direct is not None else ["proxy"]

    def address(self, path: str) -> tuple[str, int]:
        """Where a plain ncacn_ip_tcp client of ``path`` ("direct" or "relay") connects."""
        addr = self.relay if path == "relay" else self.direct
        assert addr is not None, path
        return addr

    async def open(self, path: str, *, proxy: ProxyTarget | None = None,
                   in_content_length: int | None = None) -> PduTransport:
        t: DirectClient | RpchClient
        if path in ("direct", "relay"):
            t = await DirectClient.connect(
                *self.address(path), timeout=self.timeout,
                ssl=self.relay_ssl if path == "relay" else None)
        else:
            p = proxy or self.proxy
            kwargs: dict[str, Any] = {}
            if in_content_length is not None:
                kwargs["in_content_length"] = in_content_length
            t = await RpchClient.connect(
                p.host, p.port, target=p.target, path=p.path, auth=p.auth, ssl=p.ssl,
                server_hostname=p.server_hostname, timeout=self.timeout,
                receive_window=self.client_window, **kwargs)
        self.tls_seen.setdefault(path, set()).add(t.tls_version or "plain")
        return t

    async def session(self, path: str, **kw: Any) -> BenchSession:
        t = await self.open(path, **kw)
        s = BenchSession(t, timeout=self.timeout)
        try:
            await s.bind()
        except BaseException:
            await t.close()
            raise
        return s

    async def sessions(self, path: str, n: int, *, concurrency: int = 64,
                       label: str = "", **kw: Any) -> list[BenchSession]:
        """Open and bind ``n`` sessions, ``concurrency`` at a time, with progress."""
        out: list[BenchSession] = []
        sem = asyncio.Semaphore(concurrency)
        step = max(1, n // 10)

        async def one() -> None:
            async with sem:
                out.append(await self.session(path, **kw))
                if label and n >= 100 and len(out) % step == 0:
                    self.progress(f"{label}: {len(out)}/{n} {path} connections open")

        try:
            await asyncio.gather(*(one() for _ in range(n)))
        except BaseException:
            await close_all(out)
            raise
        return out

    def proc_sample(self, which: str) -> ProcSample | None:
        """RSS, fds and CPU of "proxy", "relay" or "backend" (None if not running)."""
        proc = {"proxy": self.proxy_proc, "relay": self.relay_proc}.get(which,
                                                                        self.backend_proc)
        if proc is None or not proc.alive():
            return None
        return proc.sample()


async def close_all(sessions: list[BenchSession], concurrency: int = 200) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(s: BenchSession) -> None:
        async with sem:
            await s.t.close()

    await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)


# --- measuring helpers ------------------------------------------------------------------------


class CpuMeter:
    """CPU used by the load generator, the proxy, the relay and the backend while measuring.

    ``start()`` / ``pause()`` may alternate (interleaved rounds); ``result()`` gives each
    part's CPU as a fraction of one core over the measured wall time, summed over its
    processes (the load generator's holders, the proxy's workers), and the busiest single
    process of each part, which is what says whether that part was CPU-bound."""

    def __init__(self, bench: Bench, *, started: bool = True) -> None:
        self.bench = bench
        self.wall = 0.0
        self.cpu = {"loadgen": 0.0, "proxy": 0.0, "relay": 0.0, "backend": 0.0, "machine": 0.0,
                    "irq": 0.0}
        self.seen = {"loadgen": True, "proxy": False, "relay": False, "backend": False,
                     "machine": False, "irq": False}
        self._t0: float | None = None
        self._c0: dict[str, float | None] = {}
        self._p0: dict[int, tuple[str, float | None]] = {}  # pid -> (part, CPU seconds)
        self.per_pid: dict[int, tuple[str, float]] = {}
        if started:
            self.start()

    def _not_loadgen(self) -> set[int]:
        """Our children that are not the load generator: the proxy, the relay, the backend."""
        b = self.bench
        return {p.pid for p in (b.proxy_proc, b.relay_proc, b.backend_proc)
                if p is not None and p.proc is not None}

    def _parts(self) -> dict[int, str]:
        """Every process of the load generator, of the proxy and of the relay, by pid."""
        from bench.procs import child_pids, process_name, process_tree

        out = {os.getpid(): "loadgen"}
        skip = self._not_loadgen()
        for pid in child_pids(os.getpid()):
            if pid not in skip and process_name(pid) != "py-spy":
                out[pid] = "loadgen"
        for part, proc in (("proxy", self.bench.proxy_proc), ("relay", self.bench.relay_proc)):
            if proc is not None and proc.alive():
                for pid in process_tree(proc.pid):
                    out[pid] = part
        return out

    def _now(self) -> dict[str, float | None]:
        machine = machine_cpu_seconds()
        out: dict[str, float | None] = {"loadgen": self._loadgen_cpu(),
                                        "machine": machine[0] if machine else None,
                                        "irq": machine[1] if machine else None}
        for name in ("proxy", "relay", "backend"):
            smp = self.bench.proc_sample(name)
            out[name] = smp.cpu if smp is not None else None
        return out

    def _loadgen_cpu(self) -> float:
        """Our CPU plus our holder processes' (the proxy, the backend and profilers aside)."""
        from bench.procs import child_pids, process_name, sample

        total = time.process_time()
        skip = self._not_loadgen()
        for pid in child_pids(os.getpid()):
            if pid in skip or process_name(pid) == "py-spy":
                continue
            total += sample(pid).cpu
        return total

    def start(self) -> None:
        from bench.procs import cpu_seconds

        self._t0 = time.perf_counter()
        self._c0 = self._now()
        self._p0 = {pid: (part, cpu_seconds(pid)) for pid, part in self._parts().items()}

    def pause(self) -> None:
        from bench.procs import cpu_seconds

        if self._t0 is None:
            return
        self.wall += time.perf_counter() - self._t0
        now = self._now()
        for name, v in now.items():
            first = self._c0.get(name)
            if v is not None and first is not None:
                self.cpu[name] += v - first
                self.seen[name] = True
        for pid, (part, c0) in self._p0.items():
            c1 = cpu_seconds(pid)
            if c0 is not None and c1 is not None:
                self.per_pid[pid] = (part, self.per_pid.get(pid, (part, 0.0))[1] + c1 - c0)
        self._t0 = None

    def stop(self) -> dict[str, float | None]:
        self.pause()
        return self.result()

    def result(self) -> dict[str, float | None]:
        """Cores used (1.0 = one core busy): per process, ``irq_cpu`` for the kernel's
        interrupt work (on loopback mostly TCP receive softirq, i.e. our own traffic) and
        ``other_cpu`` for everything else on the machine (other processes)."""
        out: dict[str, float | None] = {"wall_s": round(self.wall, 3)}
        for name in PARTS:
            if name == "relay" and self.bench.relay_proc is None:
                continue
            v = self.cpu[name]
            out[f"{name}_cpu"] = (round(v / self.wall, 3) if self.seen[name] and self.wall
                                  else None)
        for name in ("loadgen", "proxy"):
            each = [v for part, v in self.per_pid.values() if part == name]
            if each and self.wall:
                out[f"{name}_processes"] = len(each)
                out[f"{name}_busiest"] = round(max(each) / self.wall, 3)
        if self.seen["machine"] and self.wall:
            ours = sum(self.cpu[n] for n in PARTS)
            irq = self.cpu["irq"] if self.seen["irq"] else 0.0
            out["irq_cpu"] = round(irq / self.wall, 3)
            out["other_cpu"] = round(max(0.0, self.cpu["machine"] - irq - ours) / self.wall, 3)
        return out


PARTS = ("loadgen", "proxy", "relay", "backend")  # what CpuMeter tells apart


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


def _rounds(bench: Bench) -> int:
    """How many proxy/direct alternations a scenario makes (noise on a busy machine hits
    both paths alike)."""
    return max(1, min(6, int(bench.duration)))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def ratio(proxy: float | None, direct: float | None) -> float | None:
    if proxy is None or direct is None or direct == 0:
        return None
    return round(proxy / direct, 3)


def relay_figures(proxy: float | None, direct: float | None,
                  relay: float | None) -> dict[str, float | None]:
    """The keys a scenario adds for the C relay: its figure, relay / direct, proxy / relay."""
    return {"relay": relay, "relay_ratio": ratio(relay, direct),
            "proxy_vs_relay": ratio(proxy, relay)}


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
                if top >= 0.85:
                    busy.append(f"{name} {top:.0%} (the busiest of its {n} processes)")
            elif (c.get(f"{name}_cpu") or 0.0) >= 0.85:
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


def _phase_time(bench: Bench, parts: int) -> float:
    return max(0.2, bench.duration / parts)


# --- throughput -------------------------------------------------------------------------------

THROUGHPUT_PHASES = (
    ("both", BIG, BIG),  # (name, request payload, response payload)
    ("down", SMALL, BIG),
    ("up", BIG, SMALL),
)


async def run_throughput(bench: Bench) -> dict[str, Any]:
    """One VC, 64 KiB PDUs, calls pipelined ``depth`` deep: MB/s of payload.

    The proxy, direct (and relay) runs alternate in short slices (``_rounds``) on one VC per
    path."""
    rounds = _rounds(bench)
    per = max(0.1, bench.duration / (rounds * len(bench.paths) * len(THROUGHPUT_PHASES)))
    moved: dict[tuple[str, str], list[float]] = {}
    meters = {path: CpuMeter(bench, started=False) for path in bench.paths}
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
    out: dict[str, Any] = {
        "metric": "payload MB/s, one VC, 64 KiB PDUs both ways",
        "proxy": both.get("proxy"), "direct": both.get("direct"), "ratio": both["ratio"],
        "unit": "MB/s",
    }
    if has_relay:
        out.update(relay_figures(both.get("proxy"), both.get("direct"), both.get("relay")))
    out.update({"phases": details, "depth": bench.depth, "pdu_bytes": PDU, "rounds": rounds,
                "cpu": cpu, "bottleneck": bottleneck(cpu)})
    return out


# --- aggregate throughput of many VCs --------------------------------------------------------


@dataclass
class _AggPath:
    """One way to the backend in the aggregate scenario."""

    name: str  # "proxy-1w", "proxy-2w", "direct", "relay-1t", "relay-2t"; "proxy" (--url)
    workers: int | None  # proxy worker processes; None: direct, relay, or not known (--url)
    target: ProxyTarget | None  # None: direct or relay (plain ncacn_ip_tcp clients)
    proc: ChildProcess | None = None  # the proxy (its workers are its children) or relay
    own: bool = False  # started for this scenario, stopped at its end
    holders: list[Holder] = field(default_factory=list)
    relay: tuple[str, int] | None = None  # the C relay's address (a relay path)
    threads: int | None = None  # the C relay's threads (nbthread)


class PerProcessCpu:
    """CPU of each process taking part in one path's run, over the slices it was measured.

    Unlike ``CpuMeter`` (which sums a process tree) this keeps every process apart, so a
    saturated load-generator process, backend or proxy worker shows as one process near 1.0
    even when the sum over several processes says little."""

    def __init__(self, groups: dict[str, list[int]],
                 threads: dict[str, int] | None = None) -> None:
        self.groups = groups  # "loadgen" / "proxy" / "relay" / "backend" -> pids
        self.used: dict[int, float] = {pid: 0.0 for pids in groups.values() for pid in pids}
        # group -> the one process whose threads are also kept apart (a multi-threaded relay:
        # one busy thread is a bound even when the process's sum is below two cores)
        self.threads = threads or {}
        self.thread_used: dict[str, dict[int, float]] = {g: {} for g in self.threads}
        self._tc0: dict[str, dict[int, float]] = {}
        self.machine = 0.0
        self.irq = 0.0
        self.wall = 0.0
        self._c0: dict[int, float | None] = {}
        self._m0: tuple[float, float] | None = None
        self._t0: float | None = None

    def start(self) -> None:
        from bench.procs import cpu_seconds, thread_cpu_seconds

        self._c0 = {pid: cpu_seconds(pid) for pid in self.used}
        self._tc0 = {g: thread_cpu_seconds(pid) for g, pid in self.threads.items()}
        self._m0 = machine_cpu_seconds()
        self._t0 = time.perf_counter()

    def pause(self) -> None:
        from bench.procs import cpu_seconds, thread_cpu_seconds

        if self._t0 is None:
            return
        self.wall += time.perf_counter() - self._t0
        self._t0 = None
        for pid, c0 in self._c0.items():
            c1 = cpu_seconds(pid)
            if c0 is not None and c1 is not None:
                self.used[pid] += c1 - c0
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

    def result(self) -> dict[str, Any]:
        """``<group>_cpu`` (cores, summed) and ``<group>_procs`` (each process, 1.0 = one
        core busy), ``<group>_threads`` (each thread of a group's process kept apart, by
        thread id); ``irq_cpu`` for interrupt work (loopback TCP's softirq, mostly ours) and
        ``other_cpu`` for the rest of the machine (other processes)."""
        wall = self.wall or 1.0
        out: dict[str, Any] = {"wall_s": round(self.wall, 3)}
        ours = 0.0
        for group, pids in self.groups.items():
            each = [round(self.used[pid] / wall, 3) for pid in pids]
            out[f"{group}_cpu"] = round(sum(each), 3) if pids else None
            out[f"{group}_procs"] = each
            ours += sum(self.used[pid] for pid in pids)
        for group, used in self.thread_used.items():
            out[f"{group}_threads"] = [round(used[tid] / wall, 3) for tid in sorted(used)]
        out["irq_cpu"] = round(self.irq / wall, 3)
        out["other_cpu"] = round(max(0.0, self.machine - self.irq - ours) / wall, 3)
        return out


BUSY = 0.85  # a process using this much of a core is taken as CPU-bound


def limits_of(c: dict[str, Any], cores: int | None = None) -> list[str]:
    """What bounded one path's figure, from its ``PerProcessCpu.result()``."""
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
    (``_rounds``, at most 3) after a warm-up. Self-contained, a proxy is started for each
    worker count that the bench's own proxy (--proxy-workers) is not, on the same backend;
    against a deployment (--url) there is one proxy path, of unknown worker count.

    With the C relay (``bench.relay``) two more paths, ``relay-1t`` and ``relay-2t``: the
    direct path's clients through HAProxy with 1 and with 2 threads (``nbthread``; the
    bench's relay serves for its own thread count, the other one is started for this
    scenario). What a C relay gains from a second thread here is what the machine leaves
    for a second proxy worker (``relay_threads_ratio`` next to ``workers_ratio``).

    CPU is kept per process (``PerProcessCpu``; the relay's also per thread) and
    ``limits_of`` names, per path, what was CPU-bound: a load-generator process, the
    backend stub, proxy processes, a relay thread, the machine."""
    from bench.procs import process_tree
    from rpcproxy.http.handoff import owner_of

    n = max(1, bench.aggregate_vcs)
    nprocs = max(1, min(bench.aggregate_procs, n))
    per_holder = -(-n // nprocs)
    rounds = min(3, _rounds(bench))
    paths: list[_AggPath] = []
    totals: dict[str, list[float]] = {}
    meters: dict[str, PerProcessCpu] = {}
    split: dict[str, list[int]] = {}
    relay_skipped: str | None = None
    try:
        if bench.spawn_proxy is not None and bench.proxy_proc is not None:
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
        else:
            paths.append(_AggPath("proxy", None, bench.proxy, bench.proxy_proc))
        if bench.direct is not None:
            paths.append(_AggPath("direct", None, None))
            if bench.relay is not None:
                relay_skipped = await _relay_paths(bench, n, paths)
        for path in paths:
            kind = "direct" if path.target is None else "proxy"
            specs = _holder_specs(bench, kind, n, per_holder=per_holder, proxy=path.target,
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
        has_relay = any(p.relay is not None for p in paths)
        for path in paths:
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
            meters[path.name] = PerProcessCpu(groups, threads)
            totals[path.name] = [0.0, 0.0, 0.0]  # bytes, seconds, calls
            if path.workers and path.workers > 1:
                cookies = [cookie for h in path.holders
                           for cookie in await h.cookies(bench.timeout)]
                counts = [0] * path.workers
                for cookie in cookies:
                    counts[owner_of(cookie, path.workers)] += 1
                split[path.name] = counts
        per = max(0.1, bench.duration / (rounds * len(paths)))

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
                acc = totals[path.name]
                acc[0] += nbytes
                acc[1] += secs
                acc[2] += calls
            bench.progress(f"aggregate round {r + 1}/{rounds}: " + ", ".join(
                f"{p.name} {totals[p.name][0] / totals[p.name][1] / 1e6:.0f}" for p in paths)
                + f" MB/s ({n} VCs both ways)")
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
    mb = {name: round(t[0] / t[1] / 1e6, 1) for name, t in totals.items() if t[1]}
    direct = mb.get("direct")
    cpu = {name: m.result() for name, m in meters.items()}
    details: dict[str, Any] = {}
    notes = []
    for path in paths:
        lim = limits_of(cpu[path.name])
        c = cpu[path.name]
        gb = totals[path.name][0] / 1e9
        is_relay = path.relay is not None
        cost_groups = ("loadgen", "proxy", "backend", "irq") + (("relay",) if is_relay else ())
        details[path.name] = {
            "mb_s": mb.get(path.name), "workers": path.workers,
            "ratio_vs_direct": (ratio(mb.get(path.name), direct) if path.target or is_relay
                                else None),
            "calls": int(totals[path.name][2]), "limited_by": lim or None,
            # CPU seconds each part spent per GB of payload: what a byte costs where
            "cpu_s_per_gb": {g: round((c.get(f"{g}_cpu") or 0.0) * c["wall_s"] / gb, 2)
                             for g in cost_groups} if gb else None,
        }
        if path.target is not None and c.get("proxy_cpu"):
            # Payload the proxy forwards per core-second of its own CPU: the figure it could
            # reach per worker with a core to itself, at this cost per byte.
            details[path.name]["mb_s_per_proxy_core"] = round(
                (mb.get(path.name) or 0.0) / c["proxy_cpu"], 1)
        if is_relay:
            details[path.name]["threads"] = path.threads
            if c.get("relay_cpu"):  # the same for the C relay
                details[path.name]["mb_s_per_relay_core"] = round(
                    (mb.get(path.name) or 0.0) / c["relay_cpu"], 1)
        if path.name in split:
            details[path.name]["vcs_per_worker"] = split[path.name]
        if lim:
            notes.append(f"{path.name} limited by " + "; ".join(lim))
        bench.progress(f"aggregate {path.name:>8}: {mb.get(path.name)} MB/s"
                       + (f" ({details[path.name]['ratio_vs_direct']}x direct)"
                          if (path.target or is_relay) and direct else "")
                       + (f", VCs per worker {split[path.name]}" if path.name in split else "")
                       + (f"; limited by {'; '.join(lim)}" if lim else ""))
    proxies = [p for p in paths if p.target is not None]
    head = proxies[-1]  # the most workers
    out: dict[str, Any] = {
        "metric": f"total MB/s, {n} VCs, 64 KiB PDUs both ways" + (
            f" (proxy: {head.workers} workers)" if head.workers else ""),
        "proxy": mb.get(head.name), "direct": direct, "ratio": ratio(mb.get(head.name), direct),
        "unit": "MB/s",
    }
    by_workers = {p.workers: mb.get(p.name) for p in proxies if p.workers}
    for w, v in sorted(by_workers.items()):
        out[f"proxy_{w}w"] = v
        out[f"ratio_{w}w"] = ratio(v, direct)
    if len(by_workers) >= 2:
        lo, hi = min(by_workers), max(by_workers)
        out["workers_compared"] = [lo, hi]
        out["workers_ratio"] = ratio(by_workers[hi], by_workers[lo])
        out[f"ratio_{hi}w_{lo}w"] = out["workers_ratio"]
    by_threads = {p.threads: mb.get(p.name) for p in paths if p.relay is not None and p.threads}
    for t, v in sorted(by_threads.items()):
        out[f"relay_{t}t"] = v
    if len(by_threads) >= 2:
        lo, hi = min(by_threads), max(by_threads)
        out["relay_threads_compared"] = [lo, hi]
        out["relay_threads_ratio"] = ratio(by_threads[hi], by_threads[lo])
    if relay_skipped:
        out["relay_skipped"] = relay_skipped
    out.update({
        "vcs": n, "load_processes": nprocs, "depth": bench.depth, "pdu_bytes": PDU,
        "placement": bench.aggregate_placement,
        "rounds": rounds, "slice_s": round(per, 3), "paths": details, "cpu": cpu,
        "bottleneck": " | ".join(notes) if notes else "no process CPU-bound",
    })
    return out


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


# --- latency ----------------------------------------------------------------------------------


async def _closed_loop(s: BenchSession, deadline: float, out: list[float]) -> None:
    while time.perf_counter() < deadline:
        out.append(await s.call(SMALL, SMALL))


def _lat_summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"calls": len(v), "p50_us": round(percentile(v, 50) * 1e6, 1),
            "p99_us": round(percentile(v, 99) * 1e6, 1),
            "p999_us": round(percentile(v, 99.9) * 1e6, 1)}


async def run_latency(bench: Bench) -> dict[str, Any]:
    """Round trip of small calls, closed loop, at 1 client and at ``clients`` clients.

    At each level every path's sessions are open at once and measured in alternating slices
    (``relay_added_us`` / ``relay_ratio`` per level: the C relay against direct)."""
    many = max(2, bench.clients)
    levels = sorted({1, max(2, many // 4), many})
    rounds = _rounds(bench)
    per = max(0.05, bench.duration / (len(levels) * rounds * len(bench.paths)))
    table: dict[str, dict[str, Any]] = {}
    cpu: dict[str, dict[str, float | None]] = {}
    for n in levels:
        sessions: dict[str, list[BenchSession]] = {}
        lats: dict[str, list[float]] = {path: [] for path in bench.paths}
        meters = {path: CpuMeter(bench, started=False) for path in bench.paths}
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
                    await asyncio.gather(*(_closed_loop(s, deadline, lats[path])
                                           for s in sessions[path]))
                    meters[path].pause()
        finally:
            for group in sessions.values():
                await close_all(group)
        for path in bench.paths:
            summary = _lat_summary(lats[path])
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
    out: dict[str, Any] = {
        "metric": "median round trip of a small call, 1 client",
        "proxy": one["proxy"]["p50_us"], "direct": direct_p50,
        "ratio": ratio(one["proxy"]["p50_us"], direct_p50), "unit": "us",
    }
    if direct_p50 is not None:
        out["added_us"] = round(one["proxy"]["p50_us"] - direct_p50, 1)
    if "relay" in one:
        out.update(relay_figures(one["proxy"]["p50_us"], direct_p50, one["relay"]["p50_us"]))
        if direct_p50 is not None:
            out["relay_added_us"] = round(one["relay"]["p50_us"] - direct_p50, 1)
    out.update({"levels": table, "cpu_at_max_clients": cpu, "bottleneck": bottleneck(cpu)})
    return out


# --- concurrency ------------------------------------------------------------------------------


HOLDER_MAX_VCS = 2500  # idle connections per holder process


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


def _holder_specs(bench: Bench, path: str, n: int, *, per_holder: int = HOLDER_MAX_VCS,
                  proxy: ProxyTarget | None = None,
                  address: tuple[str, int] | None = None) -> list[HolderSpec]:
    """Holder processes for ``n`` VCs of ``path``: "proxy", or "direct" / "relay" (plain
    ncacn_ip_tcp clients, to the backend or to the relay; to ``address`` when given)."""
    specs: list[HolderSpec] = []
    per_vc = 2 if path == "proxy" else 1
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = per_holder
    if hard != resource.RLIM_INFINITY:
        cap = max(1, min(cap, (hard - 512) // per_vc))
    left = n
    while left > 0:
        count = min(cap, left)
        left -= count
        if path in ("direct", "relay"):
            host, port = address or bench.address(path)
            # The relay terminates TLS under --tls (bench.relay_ssl); the backend never does.
            tls = bench.relay_ssl is not None and (path == "relay" or (
                address is not None and address != bench.direct))
            specs.append(HolderSpec("direct", host, port, count, timeout=bench.timeout,
                                    tls=tls, insecure=tls,
                                    tls_max=_tls_max(bench.relay_ssl) if tls else ""))
            continue
        p = proxy or bench.proxy
        auth, user, password, domain = "none", "", "", ""
        if isinstance(p.auth, BasicAuth | NtlmAuth):
            auth = "basic" if isinstance(p.auth, BasicAuth) else "ntlm"
            user, password, domain = p.auth.user, p.auth.password, p.auth.domain
        specs.append(HolderSpec("proxy", p.host, p.port, count, target=p.target,
                                url_path=p.path, auth=auth, user=user, password=password,
                                domain=domain, tls=p.ssl is not None, insecure=p.insecure,
                                tls_max=_tls_max(p.ssl),
                                server_hostname=p.server_hostname, timeout=bench.timeout,
                                receive_window=bench.client_window))
    return specs


def _tls_max(ctx: Any) -> str:
    """"1.2" when a client context offers TLS 1.2 at most (what holders are told), else ""."""
    import ssl

    if ctx is not None and getattr(ctx, "maximum_version", None) == ssl.TLSVersion.TLSv1_2:
        return "1.2"
    return ""


async def run_concurrency(bench: Bench) -> dict[str, Any]:
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
    per = _phase_time(bench, len(paths))
    cpu: dict[str, dict[str, float | None]] = {}
    rss_curve: list[dict[str, float]] = []
    if bench.proxy_proc is not None:
        from bench.procs import process_tree

        pid = bench.proxy_proc.pid
        workers = max(1, bench.proxy_workers)
        tree = process_tree(pid)
        for _ in range(50):  # workers fork after LISTENING: wait up to 5 s for them
            if workers == 1 or len(tree) > workers:
                break
            await asyncio.sleep(0.1)
            tree = process_tree(pid)
        limit = _fd_limit(tree[-1])
        # VCs are spread over workers by cookie hash: allow 20% imbalance.
        need = int(3 * (n + bench.active + streams) / workers * (1.2 if workers > 1 else 1)) + 64
        result["proxy_fd_limit"] = limit
        result["proxy_processes"] = len(tree)
        if limit is not None and limit < need:
            raise RuntimeError(
                f"each proxy process may open {limit} file descriptors but {n} idle + "
                f"{bench.active + streams} busy VCs over {workers} worker(s) need about {need} "
                "each (2 channels + 1 backend socket per VC): raise the hard RLIMIT_NOFILE or "
                "use more workers (--proxy-workers)")
    for path in paths:
        measured = path if path in ("proxy", "relay") else None  # whose RSS and fds to sample
        base = bench.proc_sample(measured) if measured else None
        holders = [Holder(spec) for spec in _holder_specs(bench, path, n)]
        busy: list[BenchSession] = []
        try:
            t_ramp = time.perf_counter()
            next_mark = max(1, n // 10)

            def progress_hook(path: str = path, holders: list[Holder] = holders) -> None:
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
            # The streaming VCs live in holder processes too, so that the process measuring
            # the active VCs' round trips is not also busy with 100 streams.
            stream_holders = [Holder(spec) for spec in _holder_specs(
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
            meter = CpuMeter(bench)
            deadline = time.perf_counter() + per
            peak: ProcSample | None = None

            async def sampler(deadline: float = deadline,
                              measured: str | None = measured) -> None:
                nonlocal peak
                while time.perf_counter() < deadline:
                    await asyncio.sleep(min(0.25, per / 4))
                    smp = bench.proc_sample(measured) if measured else None
                    if smp is not None and (peak is None or smp.rss > peak.rss):
                        peak = smp

            async def streamer(h: Holder, moved: list[int] = moved) -> None:
                moved.append(await h.stream(per, bench.timeout, bench.stream_rate))

            await asyncio.gather(
                *(_closed_loop(s, deadline, lat) for s, lat in zip(actives, lats, strict=True)),
                *(streamer(h) for h in stream_holders),
                sampler(),
            )
            cpu[path] = meter.stop()
            # Every idle (and streaming) VC must still work: one small call each.
            await asyncio.gather(*(h.check(bench.timeout + n / 200) for h in holders))
            summary = _lat_summary([x for lat in lats for x in lat])
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
                entry["fds"] = at_n.fds
            result[path] = entry
            bench.progress(
                f"concurrency {path:>6}: {n} idle + {streams} streaming "
                f"({entry['stream_mb_s']} MB/s): active p50 {summary['p50_us']:.0f} us, "
                f"p99 {summary['p99_us']:.0f} us" + (
                    f"; {path} RSS {entry['rss_mib']} MiB, {entry['fds']} fds"
                    if "rss_mib" in entry else ""))
        finally:
            await close_all(busy)
            await asyncio.gather(*(h.stop() for h in holders), return_exceptions=True)
    p99 = {path: round(result[path]["active_latency"]["p99_us"] / 1000, 3)
           for path in paths}
    out: dict[str, Any] = {
        "metric": f"p99 round trip (ms) of {bench.active} active VCs among {n} idle "
                  f"while {streams} stream" + (f" at {bench.stream_rate / 1e6:g} MB/s each"
                                               if bench.stream_rate else ""),
        "proxy": p99["proxy"], "direct": p99.get("direct") or None,
        "ratio": ratio(p99["proxy"], p99.get("direct")), "unit": "ms",
    }
    if "relay" in p99:
        out.update(relay_figures(p99["proxy"], p99.get("direct"), p99["relay"]))
    out.update({
        "rss_mib": result["proxy"].get("rss_mib"), "fds": result["proxy"].get("fds"),
        # What one idle VC (2 channels + 1 backend socket) adds to the proxy's RSS; the
        # relay's figure is per connection (1 client + 1 backend socket).
        "rss_per_vc_kib": result["proxy"].get("rss_per_vc_kib"),
        "relay_rss_per_conn_kib": (result["relay"].get("rss_per_vc_kib")
                                   if "relay" in result else None),
        "rss_curve": rss_curve, "details": result, "cpu": cpu, "bottleneck": bottleneck(cpu),
    })
    return out


# --- set-up rate ------------------------------------------------------------------------------


async def run_setup(bench: Bench) -> dict[str, Any]:
    """Open, BIND, close, ``setup_workers`` at a time: connections per second.

    Proxy, direct (and relay) alternate in slices (``_rounds``)."""
    rounds = _rounds(bench)
    per = max(0.1, bench.duration / (rounds * len(bench.paths)))
    lats: dict[str, list[float]] = {path: [] for path in bench.paths}
    walls: dict[str, float] = {path: 0.0 for path in bench.paths}
    meters = {path: CpuMeter(bench, started=False) for path in bench.paths}

    async def worker(path: str, deadline: float, lat: list[float]) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            t = await bench.open(path)
            try:
                # Any BIND answer completes set-up (a real Samba rejects the bench
                # interface, which still proves the path works end to end).
                await t.send_pdu(dcerpc.build_bind(1, _bench_syntax()))
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
    out: dict[str, Any] = {}
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
    result: dict[str, Any] = {
        "metric": "connections opened + bound + closed per second",
        "proxy": proxy, "direct": direct, "ratio": ratio(proxy, direct), "unit": "conn/s",
    }
    if "relay" in out:
        result.update(relay_figures(proxy, direct, out["relay"]["per_s"]))
    result.update({"details": out, "workers": bench.setup_workers, "cpu": cpu,
                   "bottleneck": bottleneck(cpu)})
    return result


def _bench_syntax() -> bytes:
    from bench import protocol

    return protocol.BENCH_SYNTAX


# --- soak -------------------------------------------------------------------------------------

SOAK_SIZES = (16, 512, 4096, 30_000, BIG, 3 * BIG + 1000)  # last one spans fragments


async def _soak_worker(s: BenchSession, rng: random.Random, deadline: float,
                       totals: list[int]) -> None:
    while time.perf_counter() < deadline:
        want = rng.choice(SOAK_SIZES)
        length = rng.choice(SOAK_SIZES)
        await s.call(want, length)
        totals[0] += 1
        totals[1] += want + length


async def run_soak(bench: Bench) -> dict[str, Any]:
    """``soak_connections`` VCs doing mixed calls for the duration; RSS and fds sampled.

    In self-contained mode the soak gets its own proxy with a 1 MiB OUT Content-Length and
    clients with a 1 MiB IN Content-Length, so both channel recyclings happen all the time."""
    per = _phase_time(bench, 2)
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
    cpu: dict[str, dict[str, float | None]] = {}
    try:
        for path in bench.base_paths:  # no relay here
            kw: dict[str, Any] = {}
            if path == "proxy":
                kw = {"proxy": proxy_target, "in_content_length": 1 << 20}
            sessions = await bench.sessions(path, bench.soak_connections, **kw)
            totals = [0, 0]
            meter = CpuMeter(bench)
            t0 = time.perf_counter()
            deadline = t0 + per
            interval = max(0.1, per / 40)

            async def sampler(path: str = path, t0: float = t0, deadline: float = deadline,
                              interval: float = interval) -> None:
                while time.perf_counter() < deadline:
                    smp = bench.proc_sample("proxy") if path == "proxy" else None
                    if smp is not None:
                        samples.append({"t": round(time.perf_counter() - t0, 2),
                                        "rss_mib": round(smp.rss / 2**20, 2), "fds": smp.fds})
                    await asyncio.sleep(interval)

            try:
                await asyncio.gather(
                    *(_soak_worker(s, random.Random(bench.seed * 1000 + i), deadline, totals)
                      for i, s in enumerate(sessions)),
                    sampler())
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
    summary = {
        "rss_start_mib": rss[0] if rss else None, "rss_end_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "fds_start": fds[0] if fds else None, "fds_end": fds[-1] if fds else None,
    }
    return {
        "metric": f"payload MB/s of {bench.soak_connections} VCs doing mixed calls",
        "proxy": out["proxy"]["mb_s"], "direct": out.get("direct", {}).get("mb_s"),
        "ratio": ratio(out["proxy"]["mb_s"], out.get("direct", {}).get("mb_s")),
        "unit": "MB/s", "details": out, "samples": samples, **summary, "cpu": cpu,
        "bottleneck": bottleneck(cpu),
    }


SCENARIOS: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
    "throughput": run_throughput,
    "aggregate": run_aggregate,
    "latency": run_latency,
    "concurrency": run_concurrency,
    "setup": run_setup,
    "soak": run_soak,
}
