"""Byte-level RPC over HTTP v2 client pieces for HTTP-level tests (asyncio streams).

Deliberately low level: tests use it to send exactly the bytes they want,
including wrong ones. The full client with recycling lives in bench/client.py; response
heads are read by its reader (bench.http_head), here only seen with the headers as a dict.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field

from bench.http_head import HttpHead, read_head
from dcerpc.pdu import HEADER_LEN, parse_header
from rpcproxy.rpch import rts

GIB = 1 << 30
TIMEOUT = 10.0


@dataclass
class Head:
    """An ``HttpHead`` with its headers as a dict (lower-case names; the last one wins)."""

    version: str
    status: int
    reason: str
    headers: dict[str, str]

    @classmethod
    def of(cls, head: HttpHead) -> Head:
        return cls(head.version, head.status, head.reason, dict(head.headers))


class RawChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, source: str | None = None,
                      ssl_ctx: ssl.SSLContext | None = None) -> RawChannel:
        """Connect to the proxy on 127.0.0.1, from ``source`` (another 127/8 address) if given,
        over TLS if ``ssl_ctx``."""
        local = (source, 0) if source else None
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=local, ssl=ssl_ctx), TIMEOUT)
        return cls(r, w)

    def request(self, method: str, path: str, *, content_length: int,
                headers: dict[str, str] | None = None, version: str = "1.1",
                body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1",
                 f"Content-Length: {content_length}", "Accept: application/rpc",
                 "User-Agent: MSRPC", "Cache-Control: no-cache", "Connection: Keep-Alive"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def head(self) -> Head:
        return Head.of(await asyncio.wait_for(read_head(self.reader, "test channel"), TIMEOUT))

    async def body(self, head: Head) -> bytes:
        n = int(head.headers.get("content-length", "0"))
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def pdu(self) -> bytes:
        first = await asyncio.wait_for(self.reader.readexactly(HEADER_LEN), TIMEOUT)
        rest = await asyncio.wait_for(
            self.reader.readexactly(parse_header(first).frag_length - HEADER_LEN), TIMEOUT)
        return first + rest

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """True if the peer closes (EOF/reset) within timeout; drains whatever comes."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


@dataclass
class RawVc:
    inp: RawChannel
    out: RawChannel
    vc_cookie: bytes
    in_cookie: bytes
    out_cookie: bytes
    c2: rts.RtsPdu | None = None
    extra: list[bytes] = field(default_factory=list)

    async def rpc_pdu(self) -> bytes:
        """Next non-RTS PDU on OUT (RTS ones are kept in ``extra``)."""
        while True:
            data = await self.out.pdu()
            if data[2] != 20:
                return data
            self.extra.append(data)

    def close(self) -> None:
        self.inp.close()
        self.out.close()


async def open_vc(port: int, auth: str, *, path: str = "/rpc/rpcproxy.dll?srv:6001",
                  window: int = 0x40000, in_first: bool = True,
                  source: str | None = None, out_port: int | None = None,
                  ssl_ctx: ssl.SSLContext | None = None) -> RawVc:
    """A VC with ``auth`` on both channels, returned once CONN/C2 arrived. IN goes to ``port``,
    OUT to ``out_port`` if given (a VC split across workers), both over TLS if ``ssl_ctx``."""
    vc, in_c, out_c, group = (os.urandom(16) for _ in range(4))
    hdr = {"Authorization": auth}
    inp = await RawChannel.connect(port, source, ssl_ctx)
    out = await RawChannel.connect(port if out_port is None else out_port, source, ssl_ctx)
    raw = RawVc(inp, out, vc, in_c, out_c)
    def in_req() -> None:
        inp.request("RPC_IN_DATA", path, content_length=GIB, headers=hdr,
                    body=rts.conn_b1(vc, in_c, group))

    def out_req() -> None:
        out.request("RPC_OUT_DATA", path, content_length=76, headers=hdr,
                    body=rts.conn_a1(vc, out_c, window))

    for step in ((in_req, out_req) if in_first else (out_req, in_req)):
        step()
    head = await out.head()
    if head.status != 200:
        raise AssertionError(f"OUT channel got {head.status} {head.reason}")
    a3 = rts.decode_rts(await out.pdu())
    assert rts.identify(a3) is rts.Kind.CONN_A3
    c2 = rts.decode_rts(await out.pdu())
    assert rts.identify(c2) is rts.Kind.CONN_C2
    raw.c2 = c2
    return raw
