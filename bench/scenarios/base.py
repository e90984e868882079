"""What every scenario shares: the target, the ``Bench`` (configuration and paths), the sizes.

``Bench`` opens the transports of each path (``open``: an ``RpchClient`` through the proxy, a
``DirectClient`` to the backend or to the C relay), binds sessions, samples the child
processes and makes the ``CpuMeter`` that knows which process belongs to which part. The
holder-process specs (``holder_specs``) are here because two scenarios spread VCs over
holders (aggregate, concurrency).
"""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from bench import dcerpc, protocol
from bench.client import BasicAuth, NtlmAuth, RpchClient
from bench.direct import DirectClient
from bench.holder import HolderSpec
from bench.measure import PARTS, CpuMeter, Groups
from bench.procs import ChildProcess, ProcSample, child_pids, process_name, process_tree
from bench.session import BenchSession, PduTransport

PDU = 0xFFF8  # "64 KiB PDUs": the largest 8-aligned fragment under 65535
BIG = PDU - dcerpc.REQUEST_HEADER_LEN - 24  # stub payload filling one fragment exactly
SMALL = 16
HOLDER_MAX_VCS = 2500  # idle connections per holder process

Progress = Callable[[str], None]


class Figures(TypedDict):
    """What every scenario's result starts with: its figure through the proxy and directly
    (None without a direct path), ``ratio`` always proxy / direct, and the unit of both."""

    metric: str
    proxy: float | None
    direct: float | None
    ratio: float | None
    unit: str



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
    # The storm scenario (bench.scenarios.storm): real NTLM through this ntlm_auth command.
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

    def cpu_groups(self) -> Groups:
        """The processes of each part right now: the load generator (this process and its
        children, the holders; not profilers), the proxy's and the relay's process trees (a
        proxy's workers are its children) and the backend."""
        others = {p.pid for p in (self.proxy_proc, self.relay_proc, self.backend_proc)
                  if p is not None and p.proc is not None}
        me = os.getpid()
        groups: Groups = {"loadgen": [me, *(pid for pid in child_pids(me) if pid not in others
                                            and process_name(pid) != "py-spy")]}
        for part, proc in (("proxy", self.proxy_proc), ("relay", self.relay_proc),
                           ("backend", self.backend_proc)):
            groups[part] = process_tree(proc.pid) if proc is not None and proc.alive() else []
        return groups

    def cpu_meter(self, *, started: bool = False) -> CpuMeter:
        """A meter of every part of this bench (the relay only when it runs)."""
        shown = PARTS if self.relay_proc is not None else tuple(p for p in PARTS
                                                                 if p != "relay")
        return CpuMeter(self.cpu_groups, shown=shown, started=started)


async def close_all(sessions: list[BenchSession], concurrency: int = 200) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(s: BenchSession) -> None:
        async with sem:
            await s.t.close()

    await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)



def rounds_of(bench: Bench) -> int:
    """How many proxy/direct alternations a scenario makes (noise on a busy machine hits
    both paths alike)."""
    return max(1, min(6, int(bench.duration)))


def phase_time(bench: Bench, parts: int) -> float:
    return max(0.2, bench.duration / parts)


def bench_syntax() -> bytes:
    """The bench interface's syntax, for the BINDs of set-up-only scenarios."""
    return protocol.BENCH_SYNTAX


def holder_specs(bench: Bench, path: str, n: int, *, per_holder: int = HOLDER_MAX_VCS,
                  proxy: ProxyTarget | None = None,
                  address: tuple[str, int] | None = None) -> list[HolderSpec]:
    """Holder processes for ``n`` VCs of ``path``: "proxy", or "direct" / "relay" (plain
    ncacn_ip_tcp clients, to the backend or to the relay; to ``address`` when given)."""
    specs: list[HolderSpec] = []
    per_vc = 2 if path == "proxy" else 1
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
    if ctx is not None and getattr(ctx, "maximum_version", None) == ssl.TLSVersion.TLSv1_2:
        return "1.2"
    return ""

