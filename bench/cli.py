"""``rpcproxy-bench``: measure rpcproxy against the direct ncacn_ip_tcp path in one run.

Self-contained by default: starts the DCE/RPC backend stub (``python -m bench.backend``) and
the proxy (``python -m bench.proxyproc``, ProxyServer with a permissive Basic authenticator)
as child processes on 127.0.0.1, then runs each scenario over the proxy and directly against
the backend. With ``--ntlm-helper COMMAND --user U --password P [--domain D]`` the proxy
child uses the real authenticator (winbind through that ntlm_auth command) and the clients
authenticate with NTLM against that Samba.

The C relay reference (``--relay``, self-contained mode only): when HAProxy is installed the
bench also starts it (TCP mode, ``option splice-auto``, one thread, on 127.0.0.1) in front of
the same backend stub and runs the throughput, latency, concurrency and setup scenarios
through it with the direct path's clients. That is about the best any one-hop proxy can do
on this machine: its ratio to direct (``relay_ratio``) shows which proxy-vs-direct targets the
machine itself rules out, and ``proxy_vs_relay`` how close rpcproxy comes to a C relay. The
aggregate scenario runs it with 1 and with 2 threads (a second HAProxy, for that scenario
only): what a second thread gains a C relay on this machine, next to what a second worker
gains the proxy.

Against a real deployment::

    rpcproxy-bench --url https://host/rpc/rpcproxy.dll --target NAME:6001 \\
        --user U --password P [--auth ntlm|basic] [--direct HOST:PORT] [--insecure]

(the backend behind NAME:6001 must serve the bench interface, e.g. ``python -m bench.backend``
on that host, except for the ``setup`` scenario which works with any DCE/RPC server; the direct
figures need ``--direct``).

Exit status: 0 when every scenario ran and every byte checked out; 1 when a scenario failed
(data lost, reordered or corrupted, a stall, a protocol error); 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from bench import report
from bench.client import BasicAuth, NtlmAuth, RpchError
from bench.limits import raise_nofile
from bench.procs import ChildProcess
from bench.protocol import IntegrityError
from bench.proxyproc import LOCAL_NTLM_PASSWORD, LOCAL_NTLM_USER
from bench.relay import RelayProcess, find_haproxy, relay_maxconn
from bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, Bench, ProxyTarget
from bench.session import RpcFault
from bench.tls_client import client_context
from dcerpc.pdu import FramingError
from rpcproxy.rpch.rts import MAX_RECEIVE_WINDOW, MIN_RECEIVE_WINDOW


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpcproxy-bench",
        description="Load harness for rpcproxy: every figure as proxy vs direct, every byte "
                    "checked.")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--duration", type=float, default=5.0, metavar="SECONDS",
                   help="measuring time of each scenario, shared by the proxy and direct runs "
                        "(default 5)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--connections", type=int, default=1000,
                   help="idle virtual connections in the concurrency scenario (default 1000)")
    p.add_argument("--clients", type=int, default=32,
                   help="concurrent clients at the top latency level (default 32)")
    p.add_argument("--active", type=int, default=10,
                   help="measured VCs in the concurrency scenario (default 10)")
    p.add_argument("--streams", type=int, default=None,
                   help="streaming VCs in the concurrency scenario (default min(100, N/10))")
    p.add_argument("--stream-rate", type=float, default=0.0, metavar="MB/S",
                   help="pace each streaming VC of the concurrency scenario (default: as fast "
                        "as it goes)")
    p.add_argument("--depth", type=int, default=4,
                   help="calls in flight in the throughput scenario (default 4)")
    p.add_argument("--aggregate-vcs", type=int, default=8, metavar="N",
                   help="streaming VCs in the aggregate scenario (default 8)")
    p.add_argument("--aggregate-procs", type=int, default=0, metavar="N",
                   help="load-generator processes the aggregate scenario's VCs are spread "
                        "over (default: one per core, at most one per VC)")
    p.add_argument("--aggregate-workers", default="1,2", metavar="N,M",
                   help="proxy worker counts the aggregate scenario compares (default 1,2)")
    p.add_argument("--aggregate-placement", choices=["balanced", "random"], default="balanced",
                   help="aggregate scenario: spread the VCs evenly over the proxy's workers "
                        "(cookies chosen for its cookie hash; default) or use random cookies")
    p.add_argument("--setup-workers", type=int, default=8,
                   help="parallel openers in the setup scenario (default 8)")
    p.add_argument("--soak-connections", type=int, default=16)
    p.add_argument("--storm-vcs", type=int, default=1000,
                   help="VCs the storm scenario opens at once (default 1000)")
    p.add_argument("--storm-wrong-passwords", type=int, default=0,
                   help="storm: this many VCs use a wrong password (a harness self-check: "
                        "each must count as a failure)")
    p.add_argument("--ntlm-helpers", type=int, default=32,
                   help="ntlm_auth helpers of the proxy and of the Samba-alone baseline "
                        "(default 32)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds before any single wait counts as a stall (default 10)")
    p.add_argument("--out-content-length", type=_out_content_length, default=1 << 30,
                   help="the bench proxy's OUT channel Content-Length (default 1 GiB)")
    p.add_argument("--proxy-workers", type=int, default=1, metavar="N",
                   help="worker processes of the bench's proxy (rpcproxy's multi-worker mode; "
                        "RSS, fds and CPU are summed over them)")
    p.add_argument("--proxy-loop", choices=["uvloop", "asyncio"], default="uvloop",
                   help="event loop of the bench's proxy process (default uvloop, as "
                        "rpcproxy serve)")
    p.add_argument("--profile", metavar="DIR",
                   help="record py-spy flame graphs of the proxy and the load generator per "
                        "scenario into DIR (needs py-spy on PATH; root or ptrace rights)")
    p.add_argument("--profile-format", choices=["flamegraph", "raw", "speedscope"],
                   default="flamegraph", help="py-spy output format (raw = collapsed stacks)")
    p.add_argument("--relay", choices=["auto", "haproxy", "none"], default="auto",
                   help="the C relay reference path, self-contained mode only: HAProxy in TCP "
                        "mode (splice, 1 thread) between the direct clients and the backend "
                        "stub, measured in the throughput, latency, concurrency and setup "
                        "scenarios as the best a one-hop proxy does on this machine, and "
                        "with 1 and 2 threads in the aggregate scenario (auto: when haproxy "
                        "is installed; haproxy: required; none: off)")
    p.add_argument("--tls", action="store_true",
                   help="self-contained mode: the proxy terminates TLS (a throwaway "
                        "certificate made for the run), and so does the C relay (HAProxy, "
                        "bind ... ssl crt); the direct path stays plain ncacn_ip_tcp")
    p.add_argument("--tls-version", choices=["1.2", "1.3"], default="1.3",
                   help="with --tls: the highest TLS version the bench's clients offer "
                        "(default 1.3)")
    p.add_argument("--tls-transport", choices=["lean", "loop"], default="lean",
                   help="with --tls: the proxy's TLS transport, its own (rpcproxy.tls, the "
                        "default, as rpcproxy serve) or the event loop's (tls_transport)")
    p.add_argument("--client-window", type=_window, default=MAX_RECEIVE_WINDOW, metavar="BYTES",
                   help="OUT-channel receive window the bench's RPC-over-HTTP clients announce "
                        "in CONN/A1, 0x2000..0x40000, decimal or 0x hex (default 0x40000 = "
                        "256 KiB, as Samba and impacket; Outlook uses 0x10000 = 64 KiB)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    # Self-tests of the harness: make the backend stub damage or stall the stream.
    p.add_argument("--inject-corrupt", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--inject-stall", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the child processes' log files (their paths are printed)")
    g = p.add_argument_group("real deployment")
    g.add_argument("--url", help="https://host[:port]/rpc/rpcproxy.dll of an existing proxy")
    g.add_argument("--target", default="bench:6001", help="NAME:PORT for the URL query")
    g.add_argument("--user")
    g.add_argument("--password")
    g.add_argument("--domain", default="")
    g.add_argument("--auth", choices=["basic", "ntlm"], default=None,
                   help="HTTP authentication (default: ntlm with --url or --ntlm-helper; "
                        "self-contained: basic, or ntlm verified locally in the proxy child)")
    g.add_argument("--direct", metavar="HOST:PORT",
                   help="the backend's ncacn_ip_tcp address for the direct figures")
    g.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    g.add_argument("--ntlm-helper", metavar="COMMAND",
                   help="self-contained mode, but HTTP auth judged by winbind through this "
                        "ntlm_auth command (e.g. 'ntlm_auth --helper-protocol=squid-2.5-ntlmssp')")
    return p


def _window(text: str) -> int:
    """``--client-window``: an int (0x hex too) within MS-RPCH's receive window bounds."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if not MIN_RECEIVE_WINDOW <= value <= MAX_RECEIVE_WINDOW:
        raise argparse.ArgumentTypeError(
            f"{text} is outside 0x{MIN_RECEIVE_WINDOW:x}..0x{MAX_RECEIVE_WINDOW:x} "
            f"({MIN_RECEIVE_WINDOW // 1024}..{MAX_RECEIVE_WINDOW // 1024} KiB, MS-RPCH)")
    return value


def _out_content_length(text: str) -> int:
    """``--out-content-length``: what the proxy's own configuration check accepts."""
    from rpcproxy import config as config_mod
    from rpcproxy.errors import ConfigError

    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    try:
        config_mod.Config(out_content_length=value).validate()
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def window_text(value: int) -> str:
    """``0x10000 (64 KiB)``: how the progress lines name a receive window."""
    return f"0x{value:x} ({value / 1024:g} KiB)"


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"rpcproxy-bench: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class BenchTls:
    """``--tls``: a throwaway self-signed certificate for the run (removed with ``close``),
    the PEM files the proxy and HAProxy load, and the clients' context (no verification:
    the certificate is made here and now; ``max_version`` from ``--tls-version``)."""

    def __init__(self, max_version: str) -> None:
        import tempfile

        from rpcproxy.certs import create_self_signed

        self._dir = tempfile.TemporaryDirectory(prefix="rpcproxy-bench-tls-")
        made = create_self_signed("localhost", self._dir.name, extra_names=["127.0.0.1"])
        self.cert, self.key = str(made.cert_path), str(made.key_path)
        self.pem = os.path.join(self._dir.name, "haproxy.pem")  # HAProxy: both in one file
        with open(self.pem, "w") as out:
            for part in (self.cert, self.key):
                with open(part) as fh:
                    out.write(fh.read())
        os.chmod(self.pem, 0o600)
        self.client = client_context(verify=False, max_version=max_version)

    def close(self) -> None:
        self._dir.cleanup()


def _auth(args: argparse.Namespace) -> BasicAuth | NtlmAuth:
    if not args.user or args.password is None:
        raise SystemExit("rpcproxy-bench: --user and --password are required here")
    kind = args.auth or "ntlm"
    if kind == "ntlm":
        return NtlmAuth(args.user, args.password, args.domain)
    return BasicAuth(args.user, args.password, args.domain)


async def start_profilers(directory: str | None, scenario: str, bench: Bench,
                          progress: Progress, fmt: str = "flamegraph",
                          ) -> list[tuple[asyncio.subprocess.Process, str]]:
    """py-spy on the proxy process tree and on ourselves, until stop_profilers."""
    if not directory:
        return []
    import shutil

    spy = shutil.which("py-spy")
    if spy is None:
        progress("--profile: py-spy not found on PATH (pip install py-spy); not profiling")
        return []
    os.makedirs(directory, exist_ok=True)
    targets = [("loadgen", os.getpid())]
    if bench.proxy_proc is not None:
        targets.append(("proxy", bench.proxy_proc.pid))
    spies = []
    for label, pid in targets:
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[fmt]
        out = os.path.join(directory, f"{scenario}-{label}.{ext}")
        # The proxy's workers are its subprocesses; ours are the proxy and the backend.
        sub = ["--subprocesses"] if label == "proxy" else []
        proc = await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(pid), *sub, "--nonblocking", "--rate", "250",
            "--format", fmt, "--output", out,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        spies.append((proc, out))
    await asyncio.sleep(0.5)  # let py-spy attach before the load starts
    return spies


async def stop_profilers(spies: list[tuple[asyncio.subprocess.Process, str]],
                         progress: Progress) -> None:
    import contextlib
    import signal

    for proc, _ in spies:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    for proc, out in spies:
        try:
            async with asyncio.timeout(20):
                await proc.wait()
            progress(f"profile written to {out}")
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def start_relay(exe: str, backend: tuple[str, int], required: bool,
                      children: list[ChildProcess], progress: Progress,
                      tls_pem: str | None = None) -> RelayProcess | None:
    """HAProxy in front of the backend stub, or None (with a progress line) when it does not
    start and was not asked for explicitly (``--relay haproxy``: the run fails)."""
    relay = RelayProcess(exe, backend, maxconn=relay_maxconn(), tls_pem=tls_pem)
    children.append(relay)
    try:
        await relay.start()
    except RuntimeError as exc:
        if required:
            raise SystemExit(f"rpcproxy-bench: the C relay did not start: {exc}") from None
        progress(f"C relay reference skipped: haproxy did not start: {exc}")
        children.remove(relay)  # its exit status is no failure of the run
        await relay.stop()
        relay.remove_log()
        return None
    return relay


def scenario_limit(name: str, args: argparse.Namespace, relay: bool = False) -> float:
    base = 3 * args.duration + 60 + 4 * args.timeout
    if name == "concurrency":  # a ramp per path
        base += ((args.connections + args.active + (args.streams or 100)) * (3 if relay else 2)
                 / 50)
    if name == "latency":
        base += args.clients * 0.2
    if name == "aggregate":  # proxies to start, holders to open
        base += 20 + args.aggregate_vcs * 3 / 20
    if name == "storm":  # all at once, then the Samba-alone baseline
        base += args.storm_vcs / 5
    return float(base)


async def amain(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        print(f"rpcproxy-bench: unknown scenario(s) {', '.join(unknown)}; "
              f"choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.duration <= 0 or args.connections < 1 or args.clients < 1 or args.depth < 1:
        print("rpcproxy-bench: --duration, --connections, --clients, --depth must be positive",
              file=sys.stderr)
        return 2
    try:
        aggregate_workers = tuple(int(x) for x in args.aggregate_workers.split(",") if x.strip())
    except ValueError:
        aggregate_workers = ()
    if (not aggregate_workers or min(aggregate_workers) < 1 or args.aggregate_vcs < 1
            or args.aggregate_procs < 0):
        print("rpcproxy-bench: --aggregate-vcs, --aggregate-procs and --aggregate-workers "
              "(e.g. 1,2) must be positive", file=sys.stderr)
        return 2
    if args.tls and args.url:
        print("rpcproxy-bench: --tls is for the self-contained mode; against a deployment "
              "give an https:// --url", file=sys.stderr)
        return 2
    streams = args.streams if args.streams is not None else 100
    # Idle VCs of the concurrency scenario live in holder processes (bench.holder).
    need = 2 * (args.active + streams) + 4 * args.clients + 2 * args.soak_connections + 1024
    limit = raise_nofile(need)
    if limit < need:
        progress(f"warning: only {limit} file descriptors allowed, {need} wanted")
    haproxy: str | None = None
    if args.relay != "none":
        haproxy = find_haproxy()
        if args.url:
            if args.relay == "haproxy":
                print("rpcproxy-bench: --relay haproxy needs the self-contained mode (no --url)",
                      file=sys.stderr)
                return 2
            haproxy = None
        elif haproxy is None:
            if args.relay == "haproxy":
                print("rpcproxy-bench: --relay haproxy: haproxy not found in /usr/sbin, "
                      "/usr/bin, /sbin or /bin (Debian package haproxy)", file=sys.stderr)
                return 2
            progress("C relay reference skipped: haproxy not installed (Debian package "
                     "haproxy; --relay none silences this)")
        else:
            # HAProxy inherits our hard limit: 2.5 descriptors per connection (bench.relay).
            raise_nofile(5 * (args.connections + args.active + streams) // 2 + 1024)

    children: list[ChildProcess] = []
    doc: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {**{k: v for k, v in vars(args).items() if k not in ("password",)},
                   "relay_ran": False},
        "machine": report.machine_info(),
        "scenarios": {},
        "errors": [],
        "ok": True,
    }
    doc["machine"]["relay"] = None  # the C relay that ran: kind, version, settings
    tls = BenchTls(args.tls_version) if args.tls else None
    tls_seen: dict[str, set[str]] = {}  # the Bench's, once it exists

    async def spawn_proxy(out_cl: int, backend: str, workers: int | None = None) -> ChildProcess:
        workers = workers or args.proxy_workers
        argv = ["-m", "bench.proxyproc", "--backend", backend,
                "--out-content-length", str(out_cl), "--loop", args.proxy_loop,
                "--workers", str(workers)]
        if args.ntlm_helper:
            argv += ["--ntlm-helper", args.ntlm_helper, "--ntlm-helpers", str(args.ntlm_helpers)]
        elif args.auth == "ntlm":
            argv += ["--local-ntlm"]
        if tls is not None:
            argv += ["--tls-cert", tls.cert, "--tls-key", tls.key,
                     "--tls-transport", args.tls_transport]
        name = "proxy" if workers == args.proxy_workers else f"proxy-{workers}w"
        child = ChildProcess(name, argv)
        children.append(child)
        await child.start()
        return child

    try:
        if args.url:
            u = urllib.parse.urlsplit(args.url)
            if u.scheme not in ("http", "https") or not u.hostname:
                print("rpcproxy-bench: --url must be http(s)://host[:port]/path", file=sys.stderr)
                return 2
            ctx = None
            if u.scheme == "https":
                ctx = client_context(verify=not args.insecure)
            proxy = ProxyTarget(u.hostname, u.port or (443 if ctx else 80), args.target,
                                u.path or "/rpc/rpcproxy.dll", _auth(args), ctx, u.hostname,
                                insecure=args.insecure)
            direct = _endpoint(args.direct) if args.direct else None
            bench = Bench(proxy, direct, args.duration, progress, timeout=args.timeout,
                          client_window=args.client_window)
            progress(f"driving {args.url}?{args.target}" + (
                f", direct {args.direct}" if direct else ", no direct path (--direct)")
                + f", client receive window {window_text(args.client_window)}")
        else:
            argv = ["-m", "bench.backend"]
            if args.inject_corrupt is not None:
                argv += ["--corrupt-response", str(args.inject_corrupt)]
            if args.inject_stall is not None:
                argv += ["--stall-after", str(args.inject_stall)]
            backend = ChildProcess("backend", argv)
            children.append(backend)
            bhost, bport = await backend.start()
            backend_addr = f"{bhost}:{bport}"
            proxy_proc = await spawn_proxy(args.out_content_length, backend_addr)
            auth: BasicAuth | NtlmAuth
            if args.ntlm_helper:
                auth = _auth(args)
            elif args.auth == "ntlm":  # NTLM handshakes verified locally in the proxy child
                auth = NtlmAuth(LOCAL_NTLM_USER, LOCAL_NTLM_PASSWORD, "BENCH")
            else:
                auth = BasicAuth("bench", "bench")
            proxy = ProxyTarget(proxy_proc.host, proxy_proc.port, "bench:6001", auth=auth,
                                ssl=tls.client if tls else None, insecure=tls is not None)
            bench = Bench(proxy, (bhost, bport), args.duration, progress,
                          proxy_proc=proxy_proc, backend_proc=backend, timeout=args.timeout,
                          client_window=args.client_window)
            relay = (await start_relay(haproxy, (bhost, bport), args.relay == "haproxy",
                                       children, progress, tls.pem if tls else None)
                     if haproxy else None)
            if relay is not None:
                bench.relay = (relay.host, relay.port)
                bench.relay_ssl = tls.client if tls else None
                bench.relay_proc = relay
                bench.relay_maxconn = relay.maxconn
                doc["config"]["relay_ran"] = True
                doc["machine"]["relay"] = {"kind": "haproxy", "version": relay.version,
                                           "mode": "tcp, option splice-auto, nbthread 1"
                                                   + (", bind ... ssl crt (TLS)" if tls
                                                      else ""),
                                           "maxconn": relay.maxconn,
                                           "aggregate_threads": list(
                                               bench.aggregate_relay_threads)}
                progress(f"C relay: {relay.version or 'haproxy'}, pid {relay.pid} on "
                         f"{relay.host}:{relay.port} -> {backend_addr} (maxconn {relay.maxconn})")
                assert haproxy is not None
                exe = haproxy

                async def spawn_relay(threads: int) -> ChildProcess:
                    """Another HAProxy on the backend stub (the aggregate scenario's
                    2-thread relay); RuntimeError when it does not start."""
                    more = RelayProcess(exe, (bhost, bport), maxconn=relay_maxconn(),
                                        threads=threads, tls_pem=tls.pem if tls else None)
                    children.append(more)
                    try:
                        await more.start()
                    except RuntimeError:
                        children.remove(more)  # the scenario reports it; no failed child
                        await more.stop()
                        more.remove_log()
                        raise
                    progress(f"C relay with {threads} threads: pid {more.pid} on "
                             f"{more.host}:{more.port} -> {backend_addr}")
                    return more

                bench.spawn_relay = spawn_relay

            async def spawn_more_proxy(out_cl: int | None = None,
                                       workers: int | None = None) -> ChildProcess:
                return await spawn_proxy(out_cl or args.out_content_length, backend_addr,
                                         workers)

            bench.spawn_proxy = spawn_more_proxy
            progress(f"backend stub pid {backend.pid} on {backend_addr}, proxy pid "
                     f"{proxy_proc.pid} on {proxy_proc.host}:{proxy_proc.port}"
                + (" (TLS)" if tls else "") + ", client "
                     f"receive window {window_text(args.client_window)}")
        tls_seen = bench.tls_seen
        bench.connections = args.connections
        bench.clients = args.clients
        bench.active = args.active
        bench.streams = args.streams
        bench.depth = args.depth
        bench.setup_workers = args.setup_workers
        bench.soak_connections = args.soak_connections
        bench.stream_rate = args.stream_rate * 1e6
        bench.proxy_workers = args.proxy_workers if not args.url else 1
        bench.aggregate_vcs = args.aggregate_vcs
        bench.aggregate_procs = args.aggregate_procs or os.cpu_count() or 1
        bench.aggregate_workers = aggregate_workers
        bench.aggregate_placement = args.aggregate_placement
        if args.ntlm_helper:
            bench.ntlm_helper = shlex.split(args.ntlm_helper)
        bench.ntlm_helpers = args.ntlm_helpers
        bench.storm_vcs = args.storm_vcs
        bench.storm_wrong_passwords = args.storm_wrong_passwords

        for name in names:
            progress(f"--- {name}")
            spies = await start_profilers(args.profile, name, bench, progress,
                                          args.profile_format)
            try:
                async with asyncio.timeout(scenario_limit(name, args,
                                                          relay=bench.relay is not None)):
                    result = dict(await SCENARIOS[name](bench))
            except (IntegrityError, RpchError, RpcFault, FramingError, TimeoutError, OSError,
                    RuntimeError) as exc:
                kind = type(exc).__name__
                msg = f"{name}: {kind}: {exc}" if str(exc) else f"{name}: {kind} (time limit)"
                progress(f"FAILED {msg}")
                doc["errors"].append(msg)
                doc["ok"] = False
                result = {"error": msg, "proxy": None, "direct": None, "ratio": None}
            finally:
                await stop_profilers(spies, progress)
            for child in children:
                if child.proc is not None and child.proc.returncode not in (None, 0):
                    msg = (f"{child.name} process exited with {child.proc.returncode}:\n"
                           f"{child.log_tail()}")
                    if msg not in doc["errors"]:
                        doc["errors"].append(msg)
                        doc["ok"] = False
            if result.get("failures"):
                doc["errors"].append(f"{name}: {result['failures']} of {result['vcs']} VCs "
                                     f"failed: {result.get('failure_kinds')}")
                doc["ok"] = False
            doc["scenarios"][name] = result
            if not bench.proxy_proc or bench.proxy_proc.alive():
                continue
            doc["errors"].append("the proxy process died; remaining scenarios skipped")
            doc["ok"] = False
            break
    finally:
        # What every path's connections really negotiated ("plain": no TLS).
        doc["tls"] = {path: sorted(versions) for path, versions in tls_seen.items()}
        for child in reversed(children):
            await child.stop()
        if tls is not None:
            tls.close()
        for child in children:
            if args.keep_logs or not doc["ok"]:
                progress(f"{child.name} log: {child.log_path}")
            else:
                child.remove_log()

    print(report.table(doc))
    if args.json:
        report.write_json(doc, args.json)
        progress(f"JSON written to {args.json}")
    if args.html:
        report.write_html(doc, args.html)
        progress(f"HTML report written to {args.html}")
    if not doc["ok"]:
        print("rpcproxy-bench: FAILED:\n  " + "\n  ".join(doc["errors"]), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        return uvloop.run(amain(args))
    except ImportError:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
