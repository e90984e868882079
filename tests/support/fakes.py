"""Stand-ins for unit and HTTP-level tests: a table authenticator and an echo backend.

Both are bench's (bench.auth, bench.backend) in the mode these tests want.

Never the only proof: the same paths run against real Samba in test_e2e_samba.py.
"""

from __future__ import annotations

import base64
import struct

from bench.auth import BenchAuthenticator
from bench.backend import BenchBackend
from dcerpc.pdu import PType


class TableAuthenticator(BenchAuthenticator):
    """bench's permissive authenticator with a user table: Basic only, the names exactly as
    given, domain TEST (``forgotten`` counts the server's ``forget`` calls)."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        super().__init__(users=users or {"alice": "pw-alice", "bob": "pw-bob"}, domain="TEST",
                         realm="test")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


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
    frag = 24 + len(stub)
    return struct.pack("<BBBB4sHHIIHH", 5, 0, PType.REQUEST, 0x03, b"\x10\x00\x00\x00",
                       frag, 0, call_id, len(stub), 0, opnum) + stub
