"""HTTP response heads as the RPC over HTTP clients read them, and the errors they raise.

One reader for the bench's client and for the tests: ``parse_head`` turns the bytes of a
response head into an ``HttpHead`` (it is also what a blocking test client calls on the bytes
it read), ``read_head`` reads one from an asyncio stream, ``read_body`` a bounded body and
``status_error`` the ``HttpStatusError`` of a refused channel request. Every failure is an
``RpchError``: ``RpchClosed`` when the peer closed before answering, ``RpchProtocolError`` for
bytes that are not an HTTP response head.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass


class RpchError(Exception):
    """Any failure of an RPC over HTTP connection."""


class RpchProtocolError(RpchError):
    pass


class RpchClosed(RpchError):
    pass


class RpchTimeout(RpchError, TimeoutError):
    pass


class HttpStatusError(RpchError):
    """The proxy answered a channel request with something other than success."""

    def __init__(self, where: str, status: int, reason: str, body: bytes = b"") -> None:
        self.where = where
        self.status = status
        self.reason = reason
        self.body = body
        m = re.match(r"\s*RPC Error:\s*([0-9A-Fa-f]+)", reason)
        self.rpc_error: int | None = int(m.group(1), 16) if m else None
        code = f" (RPC error 0x{self.rpc_error:X})" if self.rpc_error is not None else ""
        # rpcproxy puts its reason in the body ("RPC Error: 6BB: alice already holds ...").
        said = body[:300].decode("utf-8", "replace").strip().split("\n", 1)[0].strip()
        detail = f" [{said}]" if said.isprintable() and said and self.rpc_error is not None else ""
        super().__init__(f"{where}: HTTP {status} {reason}{code}{detail}")


@dataclass
class HttpHead:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def content_length(self) -> int | None:
        value = self.get("content-length")
        if value is None:
            return None
        digits = value.strip()
        if not digits.isascii() or not digits.isdigit():  # int() would take "-5", "1_0", "٣"
            raise RpchProtocolError(f"bad Content-Length {value!r}")
        return int(digits)


def parse_head(raw: bytes, where: str) -> HttpHead:
    """Parse one HTTP response head: the status line and the header lines (``raw`` up to
    and including the empty line; header names lower-cased, values stripped)."""
    lines = raw.decode("latin-1").split("\r\n")
    m = re.match(r"(HTTP/\d\.\d) (\d{3})(?: (.*))?$", lines[0])
    if not m:
        raise RpchProtocolError(f"{where}: bad HTTP status line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise RpchProtocolError(f"{where}: bad HTTP header line {line!r}")
        headers.append((name.strip().lower(), value.strip()))
    return HttpHead(m.group(1), int(m.group(2)), m.group(3) or "", headers)


async def read_head(reader: asyncio.StreamReader, where: str) -> HttpHead:
    """Read and parse one HTTP response head (status line + headers)."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise RpchClosed(f"{where}: connection closed before an HTTP response") from None
        raise RpchProtocolError(f"{where}: truncated HTTP response head") from None
    except asyncio.LimitOverrunError:
        raise RpchProtocolError(f"{where}: HTTP response head too long") from None
    return parse_head(raw, where)


async def read_body(reader: asyncio.StreamReader, head: HttpHead) -> bytes:
    length = head.content_length
    if not length:
        return b""
    if length > 1 << 20:
        raise RpchProtocolError(f"error response body of {length} bytes")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        return exc.partial


async def status_error(where: str, reader: asyncio.StreamReader, head: HttpHead,
                        timeout: float) -> HttpStatusError:
    body = b""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(min(timeout, 2.0)):
            body = await read_body(reader, head)
    return HttpStatusError(where, head.status, head.reason, body)
