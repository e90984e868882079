"""An asyncio RPC over HTTP v2 client ([MS-RPCH] client role), for the bench and for tests.

API
---
::

    conn = await RpchClient.connect(
        host, port, target="srv:6001", path="/rpc/rpcproxy.dll",
        auth=BasicAuth(user, pw) | NtlmAuth(user, pw, domain) | None,
        receive_window=0x40000, ssl=None, http_version="1.1",
        expect_continue=False, timeout=10.0,
        in_content_length=1 << 30)
    await conn.send_pdu(pdu_bytes)      # one whole DCE/RPC PDU up the IN channel
    pdu = await conn.recv_pdu()         # the next non-RTS PDU from the OUT channel
    await conn.recycle_in()             # IN_R2 channel recycling, on demand
    await conn.close()

``DirectClient.connect(host, port)`` (bench.direct) has the same ``send_pdu`` / ``recv_pdu`` /
``close`` over plain ncacn_ip_tcp, so a scenario can run unchanged on both paths.

Errors: every failure raises an ``RpchError`` subclass: ``HttpStatusError`` for a ``401`` or
``503 RPC Error: <hex>`` answer (``.status``, ``.reason``, ``.rpc_error``), ``RpchTimeout``
when something does not happen within ``timeout`` (the OUT stream stalls, the IN window never
reopens, a recycle does not complete), ``RpchProtocolError`` for bytes that break the protocol,
``RpchClosed`` when a channel ends under us. After the first error the connection is dead:
every later call raises the same error.

Theory of operation
-------------------
Opening (3.2.2.4.1, echo-free): the IN request (``RPC_IN_DATA``, Content-Length 1 GiB) and the
OUT request (``RPC_OUT_DATA``, Content-Length 76) are opened in parallel, each on its own TCP
connection with its own HTTP authentication (NTLM: a Content-Length 0 request carrying the
NEGOTIATE, a ``401`` with the CHALLENGE, then the real request with the AUTHENTICATE on the same
connection; Basic: credentials on the request). CONN/A1 goes on OUT and CONN/B1 on IN; then the
OUT response must be ``200`` followed by exactly CONN/A3 and CONN/C2 (anything else before C2
is a protocol error, as for a strict client, 3.2.2.5.2-4).

After C2 one reader task owns the OUT stream. It frames PDUs, hands RPC PDUs to
``recv_pdu`` through a queue and consumes RTS itself:

* Ping: ignored (it only keeps intermediaries awake).
* FlowControlAck(WithDestination) for our IN channel cookie: reopens the IN sender window
  (``available = AvailableWindow - (BytesSent - BytesReceived)``, 3.2.1.5.1).
* OUT_R2/A2 (OUT recycling, 3.2.2.5.6): a successor OUT request (Content-Length 120) is opened
  and gets OUT_R2/A3; on OUT_R2/A6 (old channel) OUT_R2/A7 goes on IN and OUT_R2/C1 on the
  successor; the old channel is read until OUT_R2/B3, then the successor's ``200`` header is
  read and it becomes the OUT channel (bytes after B3 on the old one are discarded).
* IN_R2/A4: completes ``recycle_in``.

Flow control, OUT direction (client is the receiver): per OUT channel instance we count
BytesReceived; a PDU is *consumed* when ``recv_pdu`` returns it, and once half the receive
window has been consumed since the last ack a FlowControlAckWithDestination(FDOutProxy,
OUT cookie) goes on IN. IN direction (client is the sender): ``send_pdu`` sends a PDU only when
it fits in the window announced by C2 (a PDU larger than the window only when nothing is
outstanding) and waits at most ``timeout`` for an ack to reopen it.

IN channel lifetime: every byte written on IN is counted against its Content-Length; when the
next PDU would leave less than ``IN_RESERVE`` bytes, ``send_pdu`` first recycles the IN channel
(IN_R2/A1 on a new IN request, wait for IN_R2/A4 on OUT, IN_R2/A5 as the last PDU on the old
one, switch; the new channel starts fresh flow-control counters as the spec's per-instance
model says). A Ping goes on IN when nothing was written for half the ConnectionTimeout of C2.

All sockets are plain asyncio streams; nothing here blocks for longer than ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl as ssl_mod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bench.client_auth import Auth, BasicAuth, NtlmAuth, ntlm_authorization
from bench.http_head import (
    HttpStatusError,
    RpchClosed,
    RpchError,
    RpchProtocolError,
    RpchTimeout,
    read_head,
    status_error,
)
from dcerpc.pdu import FramingError, PduFramer, PType
from rpcproxy.rpch import rts

DEFAULT_IN_CONTENT_LENGTH = 1 << 30
OUT_NEW_CONTENT_LENGTH = 76
OUT_SUCCESSOR_CONTENT_LENGTH = 120
IN_RESERVE = 4096  # bytes kept on an IN channel for RTS (acks, A7, A5) during recycling
READ_SIZE = 256 << 10
MAX_HEAD = 16 << 10
WRITE_HIGH_WATER = 1 << 20

# The errors (bench.http_head) and the credentials (bench.client_auth) are part of this API.
__all__ = ["DEFAULT_IN_CONTENT_LENGTH", "OUT_NEW_CONTENT_LENGTH", "Auth", "BasicAuth",
           "HttpStatusError", "NtlmAuth", "RpchClient", "RpchClosed", "RpchError",
           "RpchProtocolError", "RpchTimeout"]


def _cookie() -> bytes:
    return os.urandom(16)


@dataclass(slots=True, eq=False)
class _OutChannel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    cookie: bytes
    window: int
    label: str
    body_left: int = 0  # of the response's Content-Length
    bytes_received: int = 0  # RPC bytes (flow-control BytesReceived)
    queued: int = 0  # RPC bytes received but not yet consumed by recv_pdu
    consumed: int = 0  # consumed since the last ack we sent
    framer: PduFramer = field(default_factory=PduFramer)


@dataclass(slots=True, eq=False)
class _InChannel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    cookie: bytes
    body_left: int  # of the request's Content-Length
    label: str
    peer_window: int = 0
    bytes_sent: int = 0
    available: int = 0
    watcher: asyncio.Task[None] | None = None
    retired: bool = False


class RpchClient:
    """One RPC over HTTP v2 virtual connection, client side. See the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        target: str,
        path: str,
        auth: Auth,
        receive_window: int,
        ssl: ssl_mod.SSLContext | None,
        server_hostname: str | None,
        http_version: str,
        expect_continue: bool,
        timeout: float,
        in_content_length: int,
        extra_headers: dict[str, str] | None,
        vc_cookie: bytes | None = None,
    ) -> None:
        if http_version not in ("1.0", "1.1"):
            raise ValueError("http_version must be '1.0' or '1.1'")
        if not rts.MIN_RECEIVE_WINDOW <= receive_window <= rts.MAX_RECEIVE_WINDOW:
            raise ValueError("receive_window must be 8 KiB..256 KiB")
        self.host = host
        self.port = port
        self.target = target
        self.path = path
        self.auth = auth
        self.receive_window = receive_window
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.http_version = http_version
        self.expect_continue = expect_continue
        self.timeout = timeout
        self.in_content_length = in_content_length
        self.extra_headers = dict(extra_headers or {})
        self.vc_cookie = vc_cookie if vc_cookie is not None else _cookie()
        self.association_group = _cookie()
        self.connection_timeout_ms = 0
        self._in: _InChannel | None = None
        self._out: _OutChannel | None = None
        self._queue: deque[tuple[bytes, _OutChannel]] = deque()
        self._queue_waiter: asyncio.Future[None] | None = None
        self._window_event = asyncio.Event()
        self._in_lock = asyncio.Lock()
        self._error: RpchError | None = None
        self._closing = False
        self._reader_task: asyncio.Task[None] | None = None
        self._a4: asyncio.Future[None] | None = None
        self._successor: asyncio.Task[_OutChannel] | None = None
        self._successor_cookie: bytes | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ping_handle: asyncio.TimerHandle | None = None
        self._last_in_write = 0.0
        self._channel_seq = 0
        self.a7_before_c1 = False  # OUT recycling: send OUT_R2/A7 before OUT_R2/C1
        # statistics
        self.out_recycles = 0
        self.in_recycles = 0
        self.pings_received = 0
        self.acks_sent = 0
        self.acks_received = 0

    @property
    def tls_version(self) -> str | None:
        """The TLS version both channels negotiated ("TLSv1.3"; "TLSv1.2/TLSv1.3" if they
        differ), None over plain HTTP or before the VC is open."""
        found: set[str | None] = set()
        for ch in (self._out, self._in):
            obj = ch.writer.get_extra_info("ssl_object") if ch is not None else None
            found.add(obj.version() if obj is not None else None)
        if found == {None}:
            return None
        return "/".join(sorted(str(v) for v in found))

    # ---- opening --------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        target: str = "localhost:6001",
        path: str = "/rpc/rpcproxy.dll",
        auth: Auth = None,
        receive_window: int = 0x40000,
        ssl: ssl_mod.SSLContext | None = None,
        server_hostname: str | None = None,
        http_version: str = "1.1",
        expect_continue: bool = False,
        timeout: float = 10.0,
        in_content_length: int = DEFAULT_IN_CONTENT_LENGTH,
        extra_headers: dict[str, str] | None = None,
        vc_cookie: bytes | None = None,
    ) -> RpchClient:
        """Open a virtual connection; returns once CONN/C2 has been received.

        ``vc_cookie`` (16 bytes) replaces the random virtual connection cookie: the bench
        uses it to place VCs on chosen workers of a multi-worker proxy."""
        if vc_cookie is not None and len(vc_cookie) != 16:
            raise ValueError("vc_cookie must be 16 bytes")
        self = cls(
            host, port, target=target, path=path, auth=auth, receive_window=receive_window,
            ssl=ssl, server_hostname=server_hostname, http_version=http_version,
            expect_continue=expect_continue, timeout=timeout,
            in_content_length=in_content_length, extra_headers=extra_headers,
            vc_cookie=vc_cookie,
        )
        try:
            async with asyncio.timeout(timeout):
                await self._open()
        except TimeoutError:
            self._abort_all()
            raise RpchTimeout(f"virtual connection not open after {timeout:g}s") from None
        except BaseException:
            self._abort_all()
            raise
        return self

    def _label(self, kind: str) -> str:
        self._channel_seq += 1
        return f"{kind}#{self._channel_seq}"

    async def _open(self) -> None:
        in_cookie, out_cookie = _cookie(), _cookie()
        loop = asyncio.get_running_loop()
        in_task = loop.create_task(
            self._open_request("RPC_IN_DATA", self.in_content_length, "IN"))
        out_task = loop.create_task(
            self._open_request("RPC_OUT_DATA", OUT_NEW_CONTENT_LENGTH, "OUT"))
        try:
            await asyncio.wait((in_task, out_task), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failed = not (in_task.done() and out_task.done()) or any(
                t.cancelled() or t.exception() is not None for t in (in_task, out_task))
            if failed:
                for t in (in_task, out_task):
                    if not t.done():
                        t.cancel()
                    elif not t.cancelled() and t.exception() is None:
                        t.result()[1].transport.abort()
        for t in (in_task, out_task):
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        (in_r, in_w), (out_r, out_w) = in_task.result(), out_task.result()
        out = _OutChannel(out_r, out_w, out_cookie, self.receive_window, self._label("OUT"))
        inc = _InChannel(in_r, in_w, in_cookie, self.in_content_length, self._label("IN"))
        self._out, self._in = out, inc
        out_w.write(rts.conn_a1(self.vc_cookie, out_cookie, self.receive_window))
        self._write_in(inc, rts.conn_b1(self.vc_cookie, in_cookie, self.association_group))
        inc.watcher = self._spawn(self._watch_in(inc))
        head = await read_head(out_r, "OUT channel")
        if head.status != 200:
            raise await status_error("OUT channel", out_r, head, self.timeout)
        length = head.content_length
        if length is None:
            raise RpchProtocolError("OUT channel response has no Content-Length")
        out.body_left = length
        a3 = await self._read_opening_rts(out)
        if rts.identify(a3) is not rts.Kind.CONN_A3:
            raise RpchProtocolError(f"expected CONN/A3, got {rts.identify(a3).value}")
        c2 = await self._read_opening_rts(out)
        if rts.identify(c2) is not rts.Kind.CONN_C2:
            raise RpchProtocolError(f"expected CONN/C2, got {rts.identify(c2).value}")
        window = c2.get(rts.ReceiveWindowSize)
        timeout_cmd = c2.get(rts.ConnectionTimeout)
        assert isinstance(window, rts.ReceiveWindowSize)
        assert isinstance(timeout_cmd, rts.ConnectionTimeout)
        inc.peer_window = inc.available = window.value
        self.connection_timeout_ms = timeout_cmd.value
        self._reader_task = self._spawn(self._out_loop())
        self._arm_ping()

    async def _read_opening_rts(self, out: _OutChannel) -> rts.RtsPdu:
        try:
            head = await out.reader.readexactly(16)
            flen = int.from_bytes(head[8:10], "little")
            if head[2] != PType.RTS or flen < 20 or flen > 1024:
                raise RpchProtocolError(
                    f"PDU type {head[2]} of {flen} bytes on OUT before CONN/C2 (expected RTS)")
            rest = await out.reader.readexactly(flen - 16)
        except asyncio.IncompleteReadError:
            raise RpchClosed("OUT channel ended before CONN/C2") from None
        out.body_left -= flen
        try:
            pdu = rts.decode_rts(head + rest)
            rts.identify(pdu)
        except FramingError as exc:
            raise RpchProtocolError(f"OUT channel before CONN/C2: {exc.reason}") from None
        return pdu

    def _request_head(self, method: str, content_length: int, authorization: str | None) -> bytes:
        lines = [
            f"{method} {self.path}?{self.target} HTTP/{self.http_version}",
            f"Host: {self.server_hostname or self.host}",
            "Accept: application/rpc",
            "User-Agent: MSRPC",
            "Cache-Control: no-cache",
            "Pragma: No-cache",
            "Connection: Keep-Alive",
            f"Content-Length: {content_length}",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        if self.expect_continue and content_length:
            lines.append("Expect: 100-continue")
        lines.extend(f"{k}: {v}" for k, v in self.extra_headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open_request(
        self, method: str, content_length: int, where: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """TCP connect, HTTP-authenticate and send the channel request's head."""
        kwargs: dict[str, Any] = {"limit": MAX_HEAD}
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
            kwargs["server_hostname"] = self.server_hostname or self.host
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, **kwargs)
        except OSError as exc:
            raise RpchClosed(f"{where}: cannot connect to {self.host}:{self.port}: {exc}") from exc
        try:
            authorization: str | None = None
            if isinstance(self.auth, BasicAuth):
                authorization = self.auth.header()
            elif isinstance(self.auth, NtlmAuth):
                authorization = await ntlm_authorization(
                    reader, writer, self.auth, hostname=self.server_hostname or self.host,
                    where=where, head=lambda value: self._request_head(method, 0, value))
            writer.write(self._request_head(method, content_length, authorization))
            if self.expect_continue:
                head = await read_head(reader, where)
                if head.status != 100:
                    raise await status_error(where, reader, head, self.timeout)
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    # ---- task helpers -------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fail(self, error: RpchError) -> None:
        if self._error is None:
            self._error = error
        self._window_event.set()
        waiter = self._queue_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._a4 is not None and not self._a4.done():
            self._a4.set_exception(error)
        self._abort_all()

    def _abort_all(self) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        for ch in (self._in, self._out):
            if ch is not None:
                ch.writer.transport.abort()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RpchClosed("connection closed")

    @property
    def error(self) -> RpchError | None:
        return self._error

    # ---- IN side ------------------------------------------------------------------------

    def _write_in(self, ch: _InChannel, data: bytes) -> None:
        ch.body_left -= len(data)
        if ch.body_left < 0:
            raise RpchProtocolError(f"{ch.label}: would write past its Content-Length")
        ch.writer.write(data)
        self._last_in_write = asyncio.get_running_loop().time()

    def _write_rts_in(self, data: bytes) -> None:
        ch = self._in
        assert ch is not None
        self._write_in(ch, data)

    async def _watch_in(self, ch: _InChannel) -> None:
        """The proxy only answers an IN request when the channel ends (error or recycle)."""
        try:
            head = await read_head(ch.reader, ch.label)
        except RpchClosed:
            head = None
        except (RpchError, ConnectionError):
            head = None
        if ch.retired or self._closing:
            return
        if head is None:
            self._fail(RpchClosed(f"{ch.label}: IN channel connection closed by the proxy"))
        else:
            self._fail(await status_error(f"IN channel {ch.label}", ch.reader, head,
                                           self.timeout))

    async def send_pdu(self, data: bytes, timeout: float | None = None) -> None:
        """Send one whole RPC PDU on the IN channel, within the proxy's flow-control window."""
        self._check()
        size = len(data)
        wait = self.timeout if timeout is None else timeout
        async with self._in_lock:
            self._check()
            ch = self._in
            assert ch is not None
            if ch.body_left - size < IN_RESERVE:
                await self._recycle_in_locked()
                ch = self._in
                assert ch is not None
            if not (size <= ch.available or ch.available >= ch.peer_window):
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait
                while True:
                    self._window_event.clear()
                    self._check()
                    ch = self._in
                    assert ch is not None
                    if size <= ch.available or ch.available >= ch.peer_window:
                        break
                    left = deadline - loop.time()
                    if left <= 0:
                        self._fail(RpchTimeout(
                            f"IN flow-control window did not reopen within {wait:g}s "
                            f"({ch.available} of {ch.peer_window} bytes available, "
                            f"{ch.bytes_sent} sent)"))
                        self._check()
                    try:
                        async with asyncio.timeout(left):
                            await self._window_event.wait()
                    except TimeoutError:
                        continue
            ch.available -= size
            ch.bytes_sent += size
            self._write_in(ch, data)
            transport = ch.writer.transport
            if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                try:
                    async with asyncio.timeout(wait):
                        await ch.writer.drain()
                except TimeoutError:
                    self._fail(RpchTimeout(f"IN channel did not drain within {wait:g}s"))
                except ConnectionError as exc:
                    self._fail(RpchClosed(f"{ch.label}: {exc}"))
                self._check()

    def _on_in_ack(self, ack: rts.FlowControlAck) -> None:
        ch = self._in
        if ch is None or ack.channel_cookie != ch.cookie:
            return  # a predecessor's ack: discard (3.2.1.5.1.1)
        self.acks_received += 1
        outstanding = ch.bytes_sent - ack.bytes_received
        if outstanding < 0 or ack.available_window > ch.peer_window:
            raise RpchProtocolError(
                f"IN ack for {ack.bytes_received} of {ch.bytes_sent} bytes, "
                f"window {ack.available_window} (max {ch.peer_window})")
        ch.available = max(0, ack.available_window - outstanding)
        self._window_event.set()

    async def recycle_in(self) -> None:
        """Replace the IN channel (IN_R2: A1 on a new request, A4 on OUT, A5 on the old)."""
        self._check()
        async with self._in_lock:
            self._check()
            await self._recycle_in_locked()

    async def _recycle_in_locked(self) -> None:
        old = self._in
        assert old is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._open_request(
                    "RPC_IN_DATA", self.in_content_length, "IN successor")
                new = _InChannel(reader, writer, _cookie(), self.in_content_length,
                                 self._label("IN"))
                self._a4 = loop.create_future()
                self._write_in(new, rts.in_r2_a1(self.vc_cookie, old.cookie, new.cookie))
                new.watcher = self._spawn(self._watch_in(new))
                await self._a4
        except TimeoutError:
            self._fail(RpchTimeout(f"IN channel recycling did not complete in {self.timeout:g}s"))
            self._check()
        except RpchError as exc:
            self._fail(exc)
            raise
        finally:
            self._a4 = None
        # A4 seen: the successor is the default; A5 is the last PDU on the old channel.
        self._write_in(old, rts.in_r2_a5(new.cookie))
        old.retired = True
        new.peer_window = new.available = old.peer_window
        self._in = new
        self.in_recycles += 1
        self._spawn(self._retire_in(old))

    async def _retire_in(self, ch: _InChannel) -> None:
        """Let the proxy read A5 and answer the old IN request, then drop it."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await ch.writer.drain()
                if ch.watcher is not None:
                    await ch.watcher
        ch.writer.transport.abort()

    def _arm_ping(self) -> None:
        if not self.connection_timeout_ms or self._closing or self._error is not None:
            return
        interval = self.connection_timeout_ms / 2000.0
        loop = asyncio.get_running_loop()
        self._ping_handle = loop.call_at(self._last_in_write + interval, self._ping_due)

    def _ping_due(self) -> None:
        self._ping_handle = None
        if self._closing or self._error is not None or self._in is None:
            return
        interval = self.connection_timeout_ms / 2000.0
        if asyncio.get_running_loop().time() - self._last_in_write >= interval * 0.99:
            try:
                self._write_rts_in(rts.PING)
            except RpchError as exc:
                self._fail(exc)
                return
        self._arm_ping()

    async def ping(self) -> None:
        """Send a Ping RTS PDU on the IN channel (not flow-controlled)."""
        self._check()
        self._write_rts_in(rts.PING)

    # ---- OUT side -----------------------------------------------------------------------

    async def recv_pdu(self, timeout: float | None = None) -> bytes:
        """The next RPC (non-RTS) PDU from the OUT channel."""
        queue = self._queue
        if not queue:
            self._check()
            wait = self.timeout if timeout is None else timeout
            waiter = asyncio.get_running_loop().create_future()
            self._queue_waiter = waiter
            try:
                async with asyncio.timeout(wait):
                    await waiter
            except TimeoutError:
                self._fail(RpchTimeout(f"no PDU on the OUT channel within {wait:g}s"))
            finally:
                self._queue_waiter = None
            if not queue:
                self._check()
                raise RpchClosed("connection closed")
        data, ch = queue.popleft()
        size = len(data)
        ch.queued -= size
        ch.consumed += size
        if ch.consumed >= ch.window // 2 and ch is self._out and self._error is None:
            ch.consumed = 0
            self.acks_sent += 1
            try:
                self._write_rts_in(rts.flow_control_ack(
                    rts.ForwardDestination.OUT_PROXY, ch.bytes_received,
                    ch.window - ch.queued, ch.cookie))
            except RpchError as exc:
                self._fail(exc)
            inc = self._in
            if inc is not None and inc.body_left < 2 * IN_RESERVE and not self._in_lock.locked():
                self._spawn(self._auto_recycle_in())
        return data

    async def _auto_recycle_in(self) -> None:
        """Acks alone are using up the IN channel (a download-only workload): recycle it."""
        with contextlib.suppress(RpchError):
            async with self._in_lock:
                inc = self._in
                if self._error is None and inc is not None and inc.body_left < 2 * IN_RESERVE:
                    await self._recycle_in_locked()

    def _deliver(self, ch: _OutChannel, data: bytes) -> None:
        size = len(data)
        ch.bytes_received += size
        ch.queued += size
        self._queue.append((data, ch))
        waiter = self._queue_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _out_loop(self) -> None:
        try:
            ch = self._out
            assert ch is not None
            while True:
                switch = False
                data = await ch.reader.read(READ_SIZE)
                if not data:
                    if self._closing:
                        return
                    raise RpchClosed(f"{ch.label}: OUT channel closed by the proxy")
                ch.body_left -= len(data)
                if ch.body_left < 0:
                    raise RpchProtocolError(f"{ch.label}: proxy wrote past Content-Length")
                for pdu in ch.framer.feed(data):
                    if pdu.header.ptype != PType.RTS:
                        self._deliver(ch, pdu.data)
                    elif await self._out_rts(ch, pdu.data):
                        switch = True
                        break  # OUT_R2/B3: whatever follows on the old channel is discarded
                if switch:
                    ch = await self._switch_out(ch)
        except asyncio.CancelledError:
            raise
        except RpchError as exc:
            self._fail(exc)
        except FramingError as exc:
            self._fail(RpchProtocolError(f"OUT channel: {exc.reason}"))
        except (ConnectionError, OSError) as exc:
            if not self._closing:
                self._fail(RpchClosed(f"OUT channel: {exc}"))

    async def _out_rts(self, ch: _OutChannel, data: bytes) -> bool:
        """Handle one RTS PDU from OUT; True when it was OUT_R2/B3 (switch channels)."""
        pdu = rts.decode_rts(data)
        kind = rts.identify(pdu)
        if kind is rts.Kind.PING:
            self.pings_received += 1
        elif kind in (rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION, rts.Kind.FLOW_CONTROL_ACK):
            if kind is rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION:
                dest = pdu.get(rts.Destination)
                assert isinstance(dest, rts.Destination)
                if dest.destination is not rts.ForwardDestination.CLIENT:
                    raise RpchProtocolError(f"flow-control ack for {dest.destination.name} on OUT")
            ack = pdu.get(rts.FlowControlAck)
            assert isinstance(ack, rts.FlowControlAck)
            self._on_in_ack(ack)
        elif kind is rts.Kind.IN_R2_A4:
            if self._a4 is None or self._a4.done():
                raise RpchProtocolError("IN_R2/A4 without an IN channel recycle in progress")
            self._a4.set_result(None)
        elif kind is rts.Kind.OUT_R2_A2:
            if self._successor is not None or ch is not self._out:
                raise RpchProtocolError("OUT_R2/A2 while an OUT recycle is already running")
            self._successor_cookie = _cookie()
            self._successor = self._spawn(self._open_out_successor(ch, self._successor_cookie))
        elif kind is rts.Kind.OUT_R2_A6:
            if self._successor is None:
                raise RpchProtocolError("OUT_R2/A6 without an OUT recycle in progress")
            try:
                async with asyncio.timeout(self.timeout):
                    succ = await asyncio.shield(self._successor)
            except TimeoutError:
                raise RpchTimeout("successor OUT channel not opened in time") from None
            assert self._successor_cookie is not None
            # The spec leaves the order of these two open (they go on different TCP
            # connections); a proxy must accept either arrival order.
            if self.a7_before_c1:
                self._write_rts_in(rts.out_r2_a7(self._successor_cookie))
                succ.writer.write(rts.OUT_R2_C1)
            else:
                succ.writer.write(rts.OUT_R2_C1)
                self._write_rts_in(rts.out_r2_a7(self._successor_cookie))
        elif kind is rts.Kind.OUT_R2_B3:
            if self._successor is None or not self._successor.done():
                raise RpchProtocolError("OUT_R2/B3 before OUT_R2/A6")
            return True
        else:
            raise RpchProtocolError(f"unexpected {kind.value} on the OUT channel")
        return False

    async def _open_out_successor(self, old: _OutChannel, cookie: bytes) -> _OutChannel:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._open_request(
                    "RPC_OUT_DATA", OUT_SUCCESSOR_CONTENT_LENGTH, "OUT successor")
        except TimeoutError:
            raise RpchTimeout("successor OUT channel not opened in time") from None
        succ = _OutChannel(reader, writer, cookie, self.receive_window, self._label("OUT"))
        writer.write(rts.out_r2_a3(self.vc_cookie, old.cookie, cookie, self.receive_window))
        return succ

    async def _switch_out(self, old: _OutChannel) -> _OutChannel:
        assert self._successor is not None
        succ = self._successor.result()
        self._successor = None
        self._successor_cookie = None
        old.writer.transport.abort()
        self._out = succ
        try:
            async with asyncio.timeout(self.timeout):
                head = await read_head(succ.reader, succ.label)
        except TimeoutError:
            raise RpchTimeout("successor OUT channel sent no response header in time") from None
        if head.status != 200:
            raise await status_error(f"OUT successor {succ.label}", succ.reader, head,
                                      self.timeout)
        length = head.content_length
        if length is None:
            raise RpchProtocolError("successor OUT response has no Content-Length")
        succ.body_left = length
        self.out_recycles += 1
        return succ

    # ---- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Close both channels (the proxy then tears the VC down)."""
        if self._closing:
            return
        self._closing = True
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        for task in list(self._tasks):
            task.cancel()
        writers = [ch.writer for ch in (self._in, self._out) if ch is not None]
        for w in writers:
            w.close()
        for w in writers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await w.wait_closed()
        for w in writers:
            w.transport.abort()

    async def detach_out(self) -> asyncio.StreamReader:
        """Stop the client's own work (the OUT reader, the IN watcher, pings) and hand over
        the OUT channel's stream: for a test that watches how the proxy ends it. Afterwards
        only ``abort`` is of use (``close`` sees the client already closing)."""
        self._check()
        self._closing = True
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert self._out is not None
        if self._out.framer.buffered:
            raise RpchProtocolError(f"{self._out.label}: part of a PDU read when detached")
        return self._out.reader

    def abort(self) -> None:
        """Drop both channels at once (a TCP reset, nothing awaited): the proxy then tears
        the VC down. For clean-up where nothing can be awaited."""
        self._closing = True
        self._abort_all()

    async def __aenter__(self) -> RpchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
