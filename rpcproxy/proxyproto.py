"""The PROXY protocol (HAProxy's, versions 1 and 2), receiving side, sans-IO.

Theory of operation: a front proxy (HAProxy with ``send-proxy`` / ``send-proxy-v2``, a
load balancer) opens its TCP connection to us with one header naming the client's
address, then relays the client's bytes (TLS or HTTP) unchanged. ``parse`` is given the
bytes at the start of such a connection (the server peeks at them without consuming) and
answers ``None`` (need more bytes), a ``ProxyHeader`` (how many bytes the header takes and
the client's address, or None for a LOCAL / UNKNOWN header: the proxy's own health check,
the connection's own address stands), or raises ``ProxyHeaderError``. The server accepts a
header only from the addresses in ``proxy_protocol_from`` and then requires one; from any
other address the bytes are plain HTTP or TLS, so no client can claim another address.

Version 1 is one text line of at most 107 bytes (``PROXY TCP4 src dst sport dport``);
version 2 a 16-byte binary header (signature, version/command, family, length) followed by
the addresses and optional TLVs, which are skipped.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_BODY = 4096  # addresses + TLVs we accept (HAProxy sends far less)
PEEK = 16 + V2_MAX_BODY  # enough bytes to decide on any header we accept


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    length: int  # bytes of the stream the header takes
    source: tuple[str, int] | None  # the client's (address, port); None: LOCAL / UNKNOWN


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None when more bytes are needed."""
    if not data:
        return None
    if V2_SIGNATURE.startswith(data[:12]):
        return _parse_v2(data)
    if V1_PREFIX.startswith(data[:6]):
        return _parse_v1(data)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    _, family, src, _dst, sport, _dport = fields
    try:
        addr = ipaddress.ip_address(src)
        ipaddress.ip_address(_dst)
    except ValueError:
        raise ProxyHeaderError("PROXY v1 line has an invalid address") from None
    if (addr.version == 4) != (family == "TCP4"):
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    return ProxyHeader(end + 2, (str(addr), _port(sport)))


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535 or (
            len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError("PROXY v1 line has an invalid port")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad PROXY v2 signature")
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {ver_cmd >> 4} is not supported")
    if length > V2_MAX_BODY:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes is too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the proxy's own connection (health check)
        return ProxyHeader(total, None)
    if command != 1:
        raise ProxyHeaderError(f"PROXY v2 command {command} is not supported")
    body = data[16:total]
    if family == 0x11:  # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("PROXY v2 IPv4 addresses are truncated")
        src4 = ipaddress.IPv4Address(body[:4])
        return ProxyHeader(total, (str(src4), struct.unpack("!H", body[8:10])[0]))
    if family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("PROXY v2 IPv6 addresses are truncated")
        src6 = ipaddress.IPv6Address(body[:16])
        return ProxyHeader(total, (str(src6), struct.unpack("!H", body[32:34])[0]))
    if family == 0x00:  # UNSPEC
        return ProxyHeader(total, None)
    raise ProxyHeaderError(f"PROXY v2 address family 0x{family:02x} is not TCP")
