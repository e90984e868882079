"""The rpcproxy server as the bench runs it: a child process with its own RSS, fds and CPU.

``python -m bench.proxyproc --backend 127.0.0.1:PORT [--listen 127.0.0.1:0] ...`` starts
``rpcproxy.server.ProxyServer`` on loopback with the target ``bench:6001`` mapped to the
backend, prints ``LISTENING <host> <port>`` and serves until SIGTERM or until its stdin (a pipe
from the bench) closes, so it never outlives the bench.

Why a separate process rather than the bench's own event loop: the proxy's RSS, open fds and
CPU time must be measured apart from the load generator's, and the two must not share one
core's event loop (that would make the generator's work look like proxy latency).

Authentication: by default ``bench.auth.BenchAuthenticator`` (Basic with any password; no
Samba needed; with ``--local-ntlm`` also NTLM for ``BENCH\\bench``/``bench``, verified
locally by pyspnego). With ``--ntlm-helper COMMAND`` the real ``HttpAuthenticator`` is
used and NTLM (and Basic over plain HTTP) is judged by winbind through that ntlm_auth,
so set-up figures include real NTLM verification.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from bench.auth import BenchAuthenticator
from bench.limits import raise_nofile

BENCH_TARGET_NAME = "bench"
BENCH_TARGET_PORT = 6001
LOCAL_NTLM_USER = "bench"  # --local-ntlm account (domain BENCH), verified by pyspnego
LOCAL_NTLM_PASSWORD = "bench"


def _config(args: argparse.Namespace) -> Any:
    from rpcproxy import config as config_mod

    overrides: dict[str, object] = {
        "listen": args.listen,
        "backend": args.backend,
        "targets": [f"{BENCH_TARGET_NAME}:{BENCH_TARGET_PORT}={args.backend}"],
        "out_content_length": args.out_content_length,
        "receive_window": args.receive_window,
        "max_unauthenticated_connections": 100_000,
        "max_pending_handshakes": 4096,
        # Every bench VC belongs to the one bench user: the per-user bound of a real
        # deployment (default 100) would refuse the concurrency scenario's thousands.
        "max_connections_per_user": 1_000_000,
        "basic_over_http": True,
    }
    if args.ntlm_helper:
        overrides["ntlm_helper"] = args.ntlm_helper
        overrides["ntlm_helpers"] = args.ntlm_helpers
    if args.tls_cert:  # the proxy terminates TLS (rpcproxy-bench --tls)
        overrides["tls_cert"], overrides["tls_key"] = args.tls_cert, args.tls_key
        overrides["tls_transport"] = args.tls_transport
    return config_mod.load(None, overrides)


def _authenticator(args: argparse.Namespace) -> BenchAuthenticator | None:
    if args.ntlm_helper:
        return None  # the real HttpAuthenticator, verified by that Samba
    users = {("BENCH", LOCAL_NTLM_USER): LOCAL_NTLM_PASSWORD} if args.local_ntlm else None
    return BenchAuthenticator(ntlm_users=users)


async def _serve(args: argparse.Namespace, *, workers: Any = None,
                 listen_sockets: list[socket.socket] | None = None) -> None:
    from rpcproxy.server import ProxyServer

    cfg = _config(args)
    authenticator = _authenticator(args)
    server = ProxyServer(cfg, authenticator=authenticator, workers=workers,
                         listen_sockets=listen_sockets)
    bound = await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits: list[asyncio.Task[Any]] = [loop.create_task(stop.wait())]
    if workers is not None and workers.heartbeat is not None:
        # As rpcproxy serve's workers do: a worker silent for the stall timeout is killed.
        from rpcproxy.workers import beat_forever

        waits.append(loop.create_task(beat_forever(workers.heartbeat,
                                                   workers.heartbeat_interval)))
    if workers is None:  # single process: we talk to the bench ourselves
        host, port = bound[0]
        print(f"LISTENING {host} {port}", flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        waits.append(loop.create_task(reader.read()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    try:
        async with asyncio.timeout(10):
            await server.stop()
    except TimeoutError:
        pass
    if authenticator is not None:
        authenticator.close()


def _run(coro: Any, loop_name: str) -> None:
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def _serve_workers(args: argparse.Namespace) -> int:
    """``--workers N``: bind once, fork N workers (rpcproxy.workers.supervise)."""
    import threading

    from rpcproxy.http.handoff import WorkerSet
    from rpcproxy.workers import supervise

    host, _, port = args.listen.rpartition(":")
    sock = socket.create_server((host, int(port)), backlog=4096)
    bhost, bport = sock.getsockname()[:2]
    print(f"LISTENING {bhost} {bport}", flush=True)

    def watch_stdin() -> None:
        # The bench's pipe closing (even if it was killed) stops the supervisor.
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_stdin, daemon=True).start()

    def run_worker(ws: WorkerSet) -> int:
        _run(_serve(args, workers=ws, listen_sockets=[sock]), args.loop)
        return 0

    try:
        return supervise(args.workers, run_worker)
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxyproc")
    p.add_argument("--backend", required=True, metavar="HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--out-content-length", type=int, default=0x40000000)
    p.add_argument("--receive-window", type=int, default=0x40000)
    p.add_argument("--ntlm-helper", metavar="COMMAND")
    p.add_argument("--ntlm-helpers", type=int, default=32)
    p.add_argument("--local-ntlm", action="store_true",
                   help="also accept NTLM for BENCH\\bench (password bench), checked locally")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (rpcproxy's multi-worker mode)")
    p.add_argument("--tls-cert", metavar="PEM", help="terminate TLS with this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="... and this key")
    p.add_argument("--tls-transport", choices=["lean", "loop"], default="lean",
                   help="rpcproxy's own TLS transport (rpcproxy.tls) or the event loop's")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                   help="event loop (rpcproxy serve uses uvloop)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s proxy %(levelname)s %(message)s")
    raise_nofile(1 << 20)
    if args.workers > 1:
        return _serve_workers(args)
    _run(_serve(args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
