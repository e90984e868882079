"""Process-level running of the proxy: event loop, signals, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from rpcproxy.config import Config

log = logging.getLogger("rpcproxy")

SHUTDOWN_GRACE = 10.0  # seconds to close live channels on SIGTERM


async def run_server(config: Config, stop: asyncio.Event | None = None) -> None:
    from rpcproxy.server import ProxyServer

    server = ProxyServer(config)
    bound = await server.start()
    for host, port in bound:
        log.info("listening on %s:%d (%s)", host, port, "TLS" if config.tls_cert else "HTTP")
    log.info("backend %s, NTLM server %s, %d target rule(s): %s", config.backend_endpoint(),
             config.ntlm_endpoint(), len(server.allow_list),
             ", ".join(str(r) for r in server.allow_list.rules))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: closing %d virtual connection(s)", len(server.vcs))
        await asyncio.wait_for(server.stop(), SHUTDOWN_GRACE)


def serve(config: Config, *, config_path: str | None = None,
          arg_overrides: argparse.Namespace | None = None) -> int:
    import uvloop

    uvloop.run(run_server(config))
    return 0
