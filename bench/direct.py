"""The direct path: the bench's client over plain ncacn_ip_tcp, without the proxy.

``DirectClient`` has the same ``send_pdu`` / ``recv_pdu`` / ``close`` API as
``bench.client.RpchClient`` and the same structure (one reader task framing PDUs into a
queue), so a scenario measured on both paths differs only by what the proxy adds. With an
``ssl`` context it speaks TLS: the C relay path of ``rpcproxy-bench --tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_mod
from collections import deque
from typing import Any

from bench.client import WRITE_HIGH_WATER, RpchClosed, RpchError, RpchProtocolError, RpchTimeout
from dcerpc.pdu import FramingError, PduFramer

READ_SIZE = 256 << 10


class DirectClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: RpchError | None = None
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 10.0,
                      ssl: ssl_mod.SSLContext | None = None) -> DirectClient:
        """``ssl``: speak TLS to ``host`` (the C relay terminating TLS, ``--tls``)."""
        kwargs: dict[str, Any] = {}
        if ssl is not None:
            kwargs = {"ssl": ssl, "server_hostname": host}
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, **kwargs)
        except TimeoutError:
            raise RpchTimeout(f"cannot connect to {host}:{port} within {timeout:g}s") from None
        except OSError as exc:
            raise RpchClosed(f"cannot connect to {host}:{port}: {exc}") from None
        return cls(reader, writer, timeout)

    @property
    def tls_version(self) -> str | None:
        """The negotiated TLS version ("TLSv1.3"), None over plain TCP."""
        obj = self.writer.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None

    @property
    def error(self) -> RpchError | None:
        return self._error

    def _fail(self, error: RpchError) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.writer.transport.abort()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RpchClosed("connection closed")

    async def _read_loop(self) -> None:
        framer = PduFramer()
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    if not self._closing:
                        self._fail(RpchClosed("backend closed the connection"))
                    return
                pdus = framer.feed(data)
                if pdus:
                    self._queue.extend(p.data for p in pdus)
                    waiter = self._waiter
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
        except FramingError as exc:
            self._fail(RpchProtocolError(f"backend stream: {exc.reason}"))
        except (ConnectionError, OSError) as exc:
            if not self._closing:
                self._fail(RpchClosed(f"backend connection: {exc}"))

    async def send_pdu(self, data: bytes, timeout: float | None = None) -> None:
        self._check()
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            wait = self.timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(wait):
                    await self.writer.drain()
            except TimeoutError:
                self._fail(RpchTimeout(f"backend did not read for {wait:g}s"))
            except ConnectionError as exc:
                self._fail(RpchClosed(f"backend connection: {exc}"))
            self._check()

    async def recv_pdu(self, timeout: float | None = None) -> bytes:
        queue = self._queue
        if not queue:
            self._check()
            wait = self.timeout if timeout is None else timeout
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                async with asyncio.timeout(wait):
                    await waiter
            except TimeoutError:
                self._fail(RpchTimeout(f"no PDU from the backend within {wait:g}s"))
            finally:
                self._waiter = None
            if not queue:
                self._check()
                raise RpchClosed("connection closed")
        return queue.popleft()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        self.writer.transport.abort()
