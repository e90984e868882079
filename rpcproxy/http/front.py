"""The front of every connection: channel requests served without aiohttp's request path.

Theory of operation
-------------------
A virtual connection opens with two channel requests (and an NTLM login adds 401 rounds on
each connection); aiohttp's general request path (parser, request and response objects,
router, stream reader, handler tasks) was about a quarter of the proxy's CPU per VC. So a
connection starts in front mode: its bytes go to ``FrontConnection.data_received``, which
asks ``rpcproxy.http.request_head.parse`` about the buffered head:

* NEED_MORE: wait for more bytes;
* a ``RequestHead`` (ours): the request becomes a ``FrontRequest`` (a ``ChannelRequest``,
  the part of ``web.Request`` the server's handler reads) and the SAME handler that aiohttp
  calls (``ProxyServer.handle``) runs on it in one task; its ``web.Response`` is written
  here (``encode_response``: status, reason, headers, body, keep-alive as aiohttp writes
  them). A keep-alive connection then goes back to waiting for its next head;
* NOT_OURS (anything else, at the first such request): the connection and every byte
  buffered so far go to aiohttp (``fall_back``), which serves it as if it had had it from
  the start: every error answer and bound is aiohttp's own.

The body of a request of ours is a ``Body`` (Content-Length bytes, at most a high-water mark
buffered before the transport is paused). When the handler takes the transport over for a
channel (``take_over`` / ``hand_off`` in ``rpcproxy.http``), ``connection_lost(None)`` tells
this front it is done, and the handler's response is dropped, as aiohttp drops it.

Bounds as aiohttp's: the keep-alive timer (``keepalive_timeout``, from the connection's
start and after each response) closes an idle connection; a response that closes, a
request asking to close, or a body left unread closes the connection after the response
(aiohttp's ``lingering_time=0``). The connection guard's bounds do not depend on which of
the two serves it: the guard keys the connection by its one protocol object (the guarded
request handler that owns this front), and so does the per-connection NTLM state.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from rpcproxy.http.request_head import HeadLimits, RequestHead, Verdict, parse

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

BODY_HIGH_WATER = 1 << 17  # body bytes buffered (unread by the handler) before pausing


class BodyReader(Protocol):
    """The part of aiohttp's ``StreamReader`` the channel handler uses."""

    async def read(self, n: int = -1) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...

    def read_nowait(self, n: int = -1) -> bytes: ...


class BodyWriter(Protocol):
    async def write(self, chunk: bytes) -> None: ...


class ChannelRequest(Protocol):
    """The part of ``web.Request`` the channel handler (``ProxyServer.handle``) reads;
    ``web.Request`` and ``FrontRequest`` both are one."""

    @property
    def method(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def query_string(self) -> str: ...

    @property
    def content(self) -> BodyReader: ...

    @property
    def writer(self) -> BodyWriter: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def protocol(self) -> RequestHandler: ...


ChannelHandler = Callable[[ChannelRequest], Awaitable[web.StreamResponse]]


class Body:
    """A request body of Content-Length bytes, fed by the connection, read by the handler."""

    __slots__ = ("_buffer", "_eof", "_exc", "_left", "_on_read", "_waiter")

    def __init__(self, length: int, on_read: Callable[[], None]) -> None:
        self._buffer = bytearray()
        self._left = length  # not yet received
        self._eof = length == 0
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_read = on_read

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def is_eof(self) -> bool:
        """All of the body received and read (as aiohttp's ``StreamReader.is_eof``)."""
        return self._eof and not self._buffer

    def feed(self, data: bytes | bytearray) -> bytes:
        """Take the body's part of ``data``; returns what follows the body."""
        take = min(len(data), self._left)
        if take:
            self._buffer += data[:take]
            self._left -= take
            if not self._left:
                self._eof = True
            self._wake()
        return bytes(data[take:])

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        _wake(waiter)

    async def _wait(self) -> None:
        if self._exc is not None:
            raise self._exc
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._exc is not None:
            raise self._exc

    def _take(self, n: int) -> bytes:
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        if data:
            self._on_read()
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes as soon as any are there (all of the body if ``n < 0``);
        b"" at its end. Once the connection is lost every read raises, buffered bytes or
        not (as aiohttp's reader does)."""
        if self._exc is not None:
            raise self._exc
        if n < 0:
            while not self._eof:
                await self._wait()
            return self._take(-1)
        while not self._buffer and not self._eof:
            await self._wait()
        if self._exc is not None and not self._buffer:
            raise self._exc
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        if self._exc is not None:
            raise self._exc
        while len(self._buffer) < n and not self._eof:
            await self._wait()
        if len(self._buffer) < n:
            partial = self._take(-1)
            raise asyncio.IncompleteReadError(partial, n)
        return self._take(n)

    def read_nowait(self, n: int = -1) -> bytes:
        if self._exc is not None:
            raise self._exc
        return self._take(n)


class _Writer:
    __slots__ = ("transport",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    async def write(self, chunk: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(chunk)


class FrontRequest:
    """One channel request of ours: a ``ChannelRequest`` for the handler."""

    __slots__ = ("content", "head", "headers", "protocol", "transport", "writer")

    def __init__(self, head: RequestHead, body: Body, protocol: RequestHandler,
                 transport: asyncio.Transport) -> None:
        self.head = head
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(head.headers))
        self.content = body
        self.protocol = protocol
        self.transport: asyncio.Transport | None = transport
        self.writer = _Writer(transport)

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def content_length(self) -> int | None:
        return self.head.content_length

    @property
    def query_string(self) -> str:
        return self.head.query


class FrontConnection:
    """Serves a connection's channel requests until its first request that is not ours."""

    __slots__ = ("_drained", "_keepalive_at", "_keepalive_handle", "_loop", "_paused",
                 "_scanned", "_write_paused", "buffer", "closed", "closing", "fall_back",
                 "handler", "keepalive_timeout", "limits", "owner", "request", "task",
                 "transport")

    def __init__(self, owner: RequestHandler, transport: asyncio.Transport,
                 handler: ChannelHandler, limits: HeadLimits, keepalive_timeout: float,
                 fall_back: Callable[[bytes, float], None]) -> None:
        self.owner = owner  # the connection's key (guard, NTLM state), logger and peer name
        self.transport = transport
        self.handler = handler
        self.limits = limits
        self.keepalive_timeout = keepalive_timeout
        self.fall_back = fall_back  # (buffered bytes, keep-alive close time): to aiohttp
        self.buffer = bytearray()
        self.request: FrontRequest | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False  # lost, closing, or given to aiohttp or to a channel
        self.closing = False  # close once the request under way is answered
        self._paused = False
        self._write_paused = False  # the transport's write buffer is over its high-water mark
        self._drained: asyncio.Future[None] | None = None  # an answer waits for resume_writing
        self._scanned = 0  # bytes of ``buffer`` the parser has seen without a whole head
        self._loop = asyncio.get_running_loop()
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._keepalive_at = 0.0
        if keepalive_timeout > 0:
            self._keepalive_at = self._loop.time() + keepalive_timeout
            self._keepalive_handle = self._loop.call_at(self._keepalive_at, self._keepalive)

    # ---- transport events ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        request = self.request
        if request is not None:
            rest = request.content.feed(data) if data else b""
            if rest:
                self.buffer += rest
            self._flow()
            return
        self.buffer += data
        self._next_request()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drained()

    def _wake_drained(self) -> None:
        drained, self._drained = self._drained, None
        _wake(drained)

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection ended, or its transport was given to a channel (``exc`` None)."""
        self.closed = True
        self._wake_drained()
        self._stop_keepalive()
        request = self.request
        if request is not None:
            request.transport = None
            request.content.set_exception(ConnectionResetError("Connection lost"))

    def close(self) -> None:
        """Stop serving: close now if idle, else once the request under way is answered."""
        self.closing = True
        if self.request is None:
            self._close_transport()

    async def shutdown(self, timeout: float | None) -> None:
        """Server shutdown: let the request under way finish (up to ``timeout``), then close."""
        self.closing = True
        task = self.task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
        self._close_transport()

    # ---- requests ----------------------------------------------------------------------

    def _next_request(self) -> None:
        if self.closed or self.request is not None or not self.buffer:
            return
        if self.closing:
            self._close_transport()
            return
        result = parse(self.buffer, self.limits, self._scanned)
        if result is Verdict.NEED_MORE:
            self._scanned = len(self.buffer)  # the next bytes are looked at from here
            return
        self._scanned = 0
        if isinstance(result, Verdict):  # NOT_OURS: aiohttp serves the connection from here
            self.closed = True
            self._stop_keepalive()
            if self._paused:
                self._paused = False
                self.transport.resume_reading()
            data, self.buffer = bytes(self.buffer), bytearray()
            self.fall_back(data, self._keepalive_at)
            return
        del self.buffer[:result.size]
        body = Body(result.content_length or 0, self._flow)
        if self.buffer and not body.is_eof():
            self.buffer = bytearray(body.feed(self.buffer))
        self.request = FrontRequest(result, body, self.owner, self.transport)
        self.task = self._loop.create_task(self._serve(self.request))
        self._flow()

    async def _serve(self, request: FrontRequest) -> None:
        try:
            response = await self.handler(request)
        except TimeoutError:
            response = _error(504, "Gateway Timeout")
        except Exception as exc:  # noqa: BLE001 (as aiohttp: logged through the guard, 500)
            self.owner.log_exception("Error handling request", exc_info=exc)
            response = _error(500, "Internal Server Error")
        finally:
            self.task = None
        if self.closed:  # taken over, handed off or lost: nothing to answer on
            return
        head = request.head
        keep_alive = response.keep_alive is not False and head.keep_alive
        try:
            data = encode_response(response, head.version, keep_alive)
        except ValueError as exc:
            self.owner.log_exception("Error handling request", exc_info=exc)
            data = encode_response(_error(500, "Internal Server Error"), head.version, False)
            keep_alive = False
        self.transport.write(data)
        if not keep_alive or not request.content.is_eof() or self.closing:
            self._close_transport()  # (an unread body: aiohttp's lingering_time=0)
            return
        if self._write_paused:  # a client that does not read its answers: no more requests
            # until it does (meanwhile what it sends stays bounded by _flow, the request
            # being still under way), as aiohttp's writer drains
            self._drained = self._loop.create_future()
            await self._drained
            if self.closed:
                return
        self.request = None
        if self.keepalive_timeout > 0:
            self._keepalive_at = self._loop.time() + self.keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(self._keepalive_at,
                                                            self._keepalive)
        self._flow()
        self._next_request()

    # ---- helpers -----------------------------------------------------------------------

    def _flow(self) -> None:
        """Pause reading while too much is buffered for the handler, resume once read."""
        request = self.request
        held = len(self.buffer) + (request.content.buffered if request is not None else 0)
        high = request is not None and (held > BODY_HIGH_WATER
                                        or len(self.buffer) > self.limits.max_head)
        if high and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        elif not high and self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def _keepalive(self) -> None:
        self._keepalive_handle = None
        if self.closed:
            return
        if self._loop.time() < self._keepalive_at:
            self._keepalive_handle = self._loop.call_at(self._keepalive_at, self._keepalive)
            return
        if self.request is None:  # idle (a head may be under way): as aiohttp, close
            self._close_transport()

    def _stop_keepalive(self) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _close_transport(self) -> None:
        self.closed = True
        self._stop_keepalive()
        if not self.transport.is_closing():
            self.transport.close()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    """Let whoever awaits ``waiter`` go on (if anyone still does)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _error(status: int, reason: str) -> web.Response:
    response = web.Response(status=status, text=f"{status}: {reason}")
    response.force_close()
    return response


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


_OWN_HEADERS = frozenset({"content-length", "date", "server", "connection",
                          "transfer-encoding"})


def encode_response(response: web.StreamResponse, version: tuple[int, int],
                    keep_alive: bool) -> bytes:
    """The bytes of the handler's response as aiohttp writes them (a ``web.Response`` with
    a bytes body); ValueError for anything else or a header that would break the head."""
    if not isinstance(response, web.Response):
        raise ValueError(f"cannot write a {type(response).__name__} here")
    body = response.body
    if body is None:
        body = b""
    if not isinstance(body, bytes):
        raise ValueError("only bytes response bodies are written here")
    lines = [f"HTTP/{version[0]}.{version[1]} {response.status} {response.reason}"]
    for name, value in response.headers.items():
        if name.lower() not in _OWN_HEADERS:
            lines.append(f"{name}: {value}")
    if response.status not in (204, 304) and response.status >= 200:
        lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Date: {_http_date()}")
    lines.append("Server: rpcproxy")
    if keep_alive:
        if version == (1, 0):
            lines.append("Connection: keep-alive")
    elif version == (1, 1):
        lines.append("Connection: close")
    if any("\r" in line or "\n" in line for line in lines):
        raise ValueError("a newline in the response's status line or headers")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body
