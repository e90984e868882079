"""Stand-ins for unit and HTTP-level tests: a table authenticator and an echo backend.

Never the only proof: the same paths run against real Samba in test_e2e_samba.py.
"""

from __future__ import annotations

import asyncio
import base64
import struct

from dcerpc.pdu import PduFramer, PType
from ntlm.http_auth import Authenticated, AuthOutcome, Challenge, Denied
from ntlm.verifier import Identity


class TableAuthenticator:
    """Basic credentials checked against a dict; same interface as HttpAuthenticator."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = users or {"alice": "pw-alice", "bob": "pw-bob"}
        self.forgotten = 0

    async def authenticate(self, conn: object, authorization: str | None, *,
                           tls: bool, source: str | None = None) -> AuthOutcome:
        offers = ['Basic realm="test"']
        if not authorization:
            return Challenge(offers)
        scheme, _, param = authorization.partition(" ")
        if scheme.lower() != "basic":
            return Denied("only Basic here", offers)
        user, _, pw = base64.b64decode(param).decode().partition(":")
        if self.users.get(user) != pw:
            return Denied("bad password", offers)
        return Authenticated(Identity(user=user, domain="TEST"))

    def forget(self, conn: object) -> None:
        self.forgotten += 1

    def pending_count(self) -> int:
        return 0


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class EchoBackend:
    """A DCE/RPC-shaped backend on loopback: each REQUEST comes back as a RESPONSE.

    BIND gets a BIND_ACK-typed echo. Every byte received is recorded.
    """

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.received = bytearray()
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> EchoBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        framer = PduFramer()
        try:
            while data := await reader.read(65536):
                self.received += data
                for pdu in framer.feed(data):
                    out = bytearray(pdu.data)
                    reply = {PType.REQUEST: PType.RESPONSE, PType.BIND: PType.BIND_ACK,
                             PType.ALTER_CONTEXT: PType.ALTER_CONTEXT_RESP}.get(
                        PType(out[2]), None)
                    if reply is None:
                        continue
                    out[2] = reply
                    writer.write(bytes(out))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def kill_connections(self) -> None:
        for w in self.writers:
            w.transport.abort()

    async def stop(self) -> None:
        self.kill_connections()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def request_pdu(call_id: int, stub: bytes, opnum: int = 0) -> bytes:
    """A connection-oriented REQUEST PDU (C706 12.6.4.9) with the given stub."""
    frag = 24 + len(stub)
    return struct.pack("<BBBB4sHHIIHH", 5, 0, PType.REQUEST, 0x03, b"\x10\x00\x00\x00",
                       frag, 0, call_id, len(stub), 0, opnum) + stub
