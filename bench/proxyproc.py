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
locally by pyspnego). With ``--ntlm-server HOST:PORT`` the real ``HttpAuthenticator`` is
used and NTLM (and Basic over plain HTTP) is verified by that Samba, so set-up figures
include NTLM pass-through.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from bench.limits import raise_nofile

BENCH_TARGET_NAME = "bench"
BENCH_TARGET_PORT = 6001
LOCAL_NTLM_USER = "bench"  # --local-ntlm account (domain BENCH), verified by pyspnego
LOCAL_NTLM_PASSWORD = "bench"


async def _serve(args: argparse.Namespace) -> None:
    from bench.auth import BenchAuthenticator
    from rpcproxy import config as config_mod
    from rpcproxy.server import ProxyServer

    overrides: dict[str, object] = {
        "listen": args.listen,
        "backend": args.backend,
        "targets": [f"{BENCH_TARGET_NAME}:{BENCH_TARGET_PORT}={args.backend}"],
        "out_content_length": args.out_content_length,
        "receive_window": args.receive_window,
        "max_unauthenticated_connections": 100_000,
        "max_pending_handshakes": 4096,
        "basic_over_http": True,
    }
    if args.ntlm_server:
        overrides["ntlm_server"] = args.ntlm_server
    cfg = config_mod.load(None, overrides)
    authenticator = None
    if not args.ntlm_server:
        users = {("BENCH", LOCAL_NTLM_USER): LOCAL_NTLM_PASSWORD} if args.local_ntlm else None
        authenticator = BenchAuthenticator(ntlm_users=users)
    server = ProxyServer(cfg, authenticator=authenticator)  # type: ignore[arg-type]
    bound = await server.start()
    host, port = bound[0]
    print(f"LISTENING {host} {port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    eof = loop.create_task(reader.read())
    stopper = loop.create_task(stop.wait())
    await asyncio.wait((eof, stopper), return_when=asyncio.FIRST_COMPLETED)
    eof.cancel()
    stopper.cancel()
    try:
        async with asyncio.timeout(10):
            await server.stop()
    except TimeoutError:
        pass
    if authenticator is not None:
        authenticator.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxyproc")
    p.add_argument("--backend", required=True, metavar="HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--out-content-length", type=int, default=0x40000000)
    p.add_argument("--receive-window", type=int, default=0x40000)
    p.add_argument("--ntlm-server", metavar="HOST:PORT")
    p.add_argument("--local-ntlm", action="store_true",
                   help="also accept NTLM for BENCH\\bench (password bench), checked locally")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                   help="event loop (rpcproxy serve uses uvloop)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s proxy %(levelname)s %(message)s")
    raise_nofile(1 << 20)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
