"""Run a real ProxyServer on loopback in a background thread, for blocking clients.

impacket and Samba's client library are synchronous; the proxy runs on its own
event loop in a daemon thread so a test can drive those clients directly.
``SpyBackend`` is a loopback TCP listener that records every connection and
byte, to prove that nothing reaches a backend when it must not.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from rpcproxy import config as config_mod
from rpcproxy.server import ProxyServer

T = TypeVar("T")


class ProxyThread:
    def __init__(self, **overrides: Any) -> None:
        overrides.setdefault("listen", "127.0.0.1:0")
        self.config = config_mod.load(None, overrides)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make)
        bound = self.call(self.server.start)
        self.host, self.port = bound[0]

    async def _make(self) -> ProxyServer:
        return ProxyServer(self.config)

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a coroutine function on the proxy's loop and wait for its result."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(fn(), self.loop)
        return fut.result(timeout)

    def sync(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run a plain function on the proxy's loop (to read its state safely)."""

        async def wrapper() -> T:
            return fn()

        result: T = self.call(wrapper, timeout)
        return result

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rpc/rpcproxy.dll"

    def open_vcs(self) -> int:
        return self.sync(lambda: len(self.server.vcs))

    def stop(self) -> None:
        try:
            self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class SpyBackend:
    """A TCP listener on loopback that accepts, records, and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(0.2)
            with conn:
                while not self._stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    self.received += data

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
