"""Stand-ins for unit and HTTP-level tests: a table authenticator and an echo backend.

Both are bench's (bench.auth, bench.backend) in the mode these tests want.

Never the only proof: the same paths run against real Samba in test_e2e_samba.py.
"""

from __future__ import annotations

from bench.auth import BenchAuthenticator
from bench.backend import BenchBackend
from bench.client_auth import BasicAuth
from bench.dcerpc import build_request


class TableAuthenticator(BenchAuthenticator):
    """bench's permissive authenticator with a user table: Basic only, the names exactly as
    given, domain TEST (``forgotten`` counts the server's ``forget`` calls)."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        super().__init__(users=users or {"alice": "pw-alice", "bob": "pw-bob"}, domain="TEST",
                         realm="test")


def basic(user: str, password: str) -> str:
    """The Basic Authorization header value (bench's client writes it)."""
    return BasicAuth(user, password).header()


class EchoBackend:
    """bench's backend stub in echo mode (``BenchBackend(echo=True)``): each REQUEST comes
    back as a RESPONSE, a BIND as a BIND_ACK-typed echo; every byte received is recorded.
    ``await EchoBackend().start()`` returns it; ``connections`` counts accepted connections."""

    def __init__(self) -> None:
        self.stub = BenchBackend(echo=True)

    async def start(self) -> EchoBackend:
        await self.stub.start()
        return self

    @property
    def endpoint(self) -> str:
        return self.stub.endpoint

    @property
    def port(self) -> int:
        return self.stub.port

    @property
    def received(self) -> bytearray:
        return self.stub.received

    @property
    def connections(self) -> int:
        return self.stub.accepted

    def kill_connections(self) -> None:
        self.stub.kill_connections()

    async def stop(self) -> None:
        await self.stub.stop()


def request_pdu(call_id: int, stub: bytes, opnum: int = 0) -> bytes:
    """A connection-oriented REQUEST PDU (C706 12.6.4.9) with the given stub."""
    return build_request(call_id, opnum, stub)
