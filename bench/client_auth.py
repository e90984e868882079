"""How the bench's client authenticates a channel request: the credentials and NTLM's round.

``BasicAuth`` is one header on the channel request. ``NtlmAuth`` takes a round on the same
connection before it: a Content-Length 0 request carrying the NEGOTIATE, a ``401`` carrying
the CHALLENGE, then the real request carries the AUTHENTICATE (``ntlm_authorization`` returns
that header value). A proxy that answers the NEGOTIATE with anything but a ``401`` with an NTLM
challenge, or closes the connection in between, fails the channel with an ``RpchError``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass

from bench.http_head import HttpStatusError, RpchProtocolError, read_body, read_head


@dataclass(frozen=True)
class BasicAuth:
    user: str
    password: str
    domain: str = ""

    def header(self) -> str:
        name = f"{self.domain}\\{self.user}" if self.domain else self.user
        return "Basic " + base64.b64encode(f"{name}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class NtlmAuth:
    user: str
    password: str
    domain: str = ""


Auth = BasicAuth | NtlmAuth | None


async def ntlm_authorization(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             auth: NtlmAuth, *, hostname: str, where: str,
                             head: Callable[[str], bytes]) -> str:
    """Run NTLM's NEGOTIATE / CHALLENGE round on this connection; the Authorization value
    (the AUTHENTICATE) for the real request. ``head(authorization)`` is the head of the
    Content-Length 0 request that carries the NEGOTIATE."""
    import spnego  # start-up: pyspnego is imported only by runs that use NTLM

    user = f"{auth.domain}\\{auth.user}" if auth.domain else auth.user
    ctx = spnego.client(user, auth.password, hostname=hostname, service="HTTP",
                        protocol="ntlm")
    negotiate = ctx.step()
    assert negotiate is not None
    writer.write(head("NTLM " + base64.b64encode(negotiate).decode()))
    answer = await read_head(reader, where)
    body = await read_body(reader, answer)
    if answer.status != 401:
        raise HttpStatusError(f"{where} (NTLM negotiate)", answer.status, answer.reason, body)
    challenge: bytes | None = None
    for value in answer.get_all("www-authenticate"):
        scheme, _, param = value.partition(" ")
        if scheme.lower() == "ntlm" and param.strip():
            challenge = base64.b64decode(param.strip())
    if challenge is None:
        raise HttpStatusError(f"{where} (no NTLM challenge)", answer.status, answer.reason,
                              body)
    if (answer.get("connection") or "").lower() == "close":
        raise RpchProtocolError(f"{where}: proxy closed the connection during NTLM")
    authenticate = ctx.step(challenge)
    assert authenticate is not None
    return "NTLM " + base64.b64encode(authenticate).decode()
