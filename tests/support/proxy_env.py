"""``Env``: a ProxyServer started in the test's own event loop, the port it listens on, and the
echo backend behind it (tests/http/test_server_http.py and tests/samba/test_identity_samba.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend


@dataclass
class Env:
    server: ProxyServer
    port: int
    backend: EchoBackend
