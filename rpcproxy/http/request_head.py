"""A strict, sans-IO parser of the one HTTP request head rpcproxy serves itself: a channel request.

Theory of operation
-------------------
Every channel of a virtual connection starts with one HTTP/1.x request (``RPC_IN_DATA`` or
``RPC_OUT_DATA``, [MS-RPCH] 2.1.2.1), and an NTLM login adds one or two more on the same
connection. Those heads are small and always look alike, so the connection's first protocol
(``rpcproxy.http.front``) parses them here instead of going through aiohttp's request path.

``parse(data, limits)`` looks at the bytes a connection has buffered and returns one of:

* a ``RequestHead`` (method, target, version, headers, Content-Length, keep-alive, and
  ``size``: the bytes of ``data`` the head took, its final empty line included);
* ``Verdict.NEED_MORE``: what is there could still become a channel request head;
* ``Verdict.NOT_OURS``: anything else. The caller then gives the connection, byte for byte,
  to aiohttp, which answers every error (400, 404, 405, 413, 431, 501 ...) and applies every
  bound exactly as it would without this module.

The rule is one-sided: a head is ours only if aiohttp's ``HttpRequestParserPy`` (as rpcproxy
configures it) would parse it to the same method, target, headers and length; any doubt is
NOT_OURS. So ours is a strict subset of what aiohttp accepts: the method exactly
``RPC_IN_DATA`` / ``RPC_OUT_DATA`` (no other letter case), one of the two rpcproxy.dll paths
with a query of plain target characters only (no ``%`` or ``+`` that decoding could change),
``HTTP/1.0`` or ``HTTP/1.1`` (1.1 with a Host), CRLF line ends only, token header names with
no whitespace before the colon, no obs-fold, values of printable ASCII and tabs only (no CR,
LF, NUL or other controls, no bytes over 0x7E), no header twice (so neither a duplicate nor
a conflicting Content-Length), at most one Content-Length of plain digits, no
Transfer-Encoding, Content-Encoding, Upgrade or Sec-WebSocket-Key1, a Connection header of
``keep-alive`` / ``close`` only, and every line, the header count and the whole head within
``HeadLimits`` (taken from aiohttp's own limits, never larger). A head that has not ended
within ``HeadLimits.max_head`` bytes is NOT_OURS: aiohttp then bounds it as today.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

METHODS = (b"RPC_IN_DATA", b"RPC_OUT_DATA")

_TARGET_RE = re.compile(
    rb"(?:/rpc/rpcproxy\.dll|/rpcwithcert/rpcproxy\.dll)(?:\?[A-Za-z0-9._:\[\]-]*)?")
_TOKEN_RE = re.compile(rb"[0-9A-Za-z!#$%&'*+.^_`|~-]+")
_VALUE_RE = re.compile(rb"[\t\x20-\x7e]*")
_DIGITS_RE = re.compile(rb"[0-9]{1,18}")
_REFUSED_NAMES = frozenset({"transfer-encoding", "content-encoding", "upgrade",
                            "sec-websocket-key1"})
_CONNECTION_TOKENS = frozenset({"keep-alive", "close"})
_CRLF = b"\r\n"
_END = b"\r\n\r\n"
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # (a CR that ends the data may still be)


class Verdict(enum.Enum):
    NEED_MORE = "need more"
    NOT_OURS = "not ours"


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Bounds of a head we parse; each no larger than aiohttp's for the same connection."""

    max_line: int = 8190  # the request line (aiohttp: max_line_size)
    max_field: int = 8190  # one header line (aiohttp: max_field_size)
    max_lines: int = 128  # request line + header lines + the empty line (aiohttp: max_headers)
    max_head: int = 32768  # the whole head, its final CRLF CRLF included

    @classmethod
    def within(cls, max_line_size: int, max_field_size: int, max_headers: int) -> HeadLimits:
        """Our limits inside aiohttp's (``RequestHandler.max_line_size`` and co.)."""
        ours = cls()
        return cls(min(ours.max_line, max_line_size), min(ours.max_field, max_field_size),
                   min(ours.max_lines, max_headers), ours.max_head)


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str  # RPC_IN_DATA or RPC_OUT_DATA
    target: str  # as sent: path, then ``?query`` if any
    path: str
    query: str
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]  # names as sent, values without surrounding blanks
    content_length: int | None
    keep_alive: bool  # what the request asks (HTTP/1.1: unless close; 1.0: only keep-alive)
    size: int  # bytes the head took, the empty line that ends it included


def parse(data: bytes | bytearray, limits: HeadLimits,
          scanned: int = 0) -> RequestHead | Verdict:
    """The channel request head at the start of ``data``, or what to do (module docstring).

    ``scanned``: how many bytes of ``data`` an earlier call saw and answered NEED_MORE for;
    only what follows is searched again, so a head that arrives a byte at a time costs
    linear time, not quadratic."""
    end = data.find(_END, max(0, scanned - 3), limits.max_head)
    if end < 0:
        return _incomplete(data, limits, scanned)
    head = bytes(data[:end])
    lines = head.split(_CRLF)
    if len(lines) + 1 > limits.max_lines:
        return Verdict.NOT_OURS
    request_line = lines[0]
    if len(request_line) > limits.max_line:
        return Verdict.NOT_OURS
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return Verdict.NOT_OURS
    method, target, version = parts
    if method not in METHODS or not _TARGET_RE.fullmatch(target):
        return Verdict.NOT_OURS
    if version == b"HTTP/1.1":
        version_t = (1, 1)
    elif version == b"HTTP/1.0":
        version_t = (1, 0)
    else:
        return Verdict.NOT_OURS
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    content_length: int | None = None
    connection: str | None = None
    for line in lines[1:]:
        if len(line) > limits.max_field:
            return Verdict.NOT_OURS
        bname, colon, bvalue = line.partition(b":")
        if not colon or not _TOKEN_RE.fullmatch(bname):
            return Verdict.NOT_OURS  # (also: obs-fold, whitespace before the colon, bare CR/LF)
        bvalue = bvalue.strip(b" \t")
        if not _VALUE_RE.fullmatch(bvalue):
            return Verdict.NOT_OURS
        name = bname.decode("ascii")
        lower = name.lower()
        if lower in seen or lower in _REFUSED_NAMES:
            return Verdict.NOT_OURS
        seen.add(lower)
        value = bvalue.decode("ascii")
        if lower == "content-length":
            if not _DIGITS_RE.fullmatch(bvalue):
                return Verdict.NOT_OURS
            content_length = int(bvalue)
        elif lower == "connection":
            tokens = {t.strip(" \t") for t in value.lower().split(",")}
            if not tokens <= _CONNECTION_TOKENS:
                return Verdict.NOT_OURS
            connection = "close" if "close" in tokens else "keep-alive"
        headers.append((name, value))
    if version_t == (1, 1) and "host" not in seen:
        return Verdict.NOT_OURS
    if connection is None:
        keep_alive = version_t == (1, 1)
    else:
        keep_alive = connection == "keep-alive"
    target_s = target.decode("ascii")
    path, _, query = target_s.partition("?")
    return RequestHead(method.decode("ascii"), target_s, path, query, version_t,
                       tuple(headers), content_length, keep_alive, end + len(_END))


def _incomplete(data: bytes | bytearray, limits: HeadLimits, scanned: int) -> Verdict:
    """No end of head yet: NEED_MORE only while this can still become one of ours (the
    bytes before ``scanned`` were judged so already)."""
    if len(data) >= limits.max_head:
        return Verdict.NOT_OURS
    start = bytes(data[:13])  # "RPC_OUT_DATA " is the longest method and its space
    if not any((m + b" ").startswith(start) or start.startswith(m + b" ") for m in METHODS):
        return Verdict.NOT_OURS
    bare = _BARE_CR_OR_LF.search(data, max(0, scanned - 1))
    if bare is not None and not (bare.group() == b"\r" and bare.end() == len(data)):
        return Verdict.NOT_OURS  # a bare LF or CR: never ours, whatever follows
    if (len(data) > limits.max_line and scanned <= limits.max_line + 2
            and data.find(_CRLF, 0, limits.max_line + 2) < 0):
        return Verdict.NOT_OURS  # the request line is too long already (judged once)
    return Verdict.NEED_MORE
