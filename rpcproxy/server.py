"""The asyncio/aiohttp adapter: HTTP channels, backend sockets, timers.

This is the only module that awaits. It turns HTTP requests into events for
``rpcproxy.rpch.connection.VirtualConnection`` and carries out the actions it
returns. Every action is carried out synchronously (bytes are queued on a
channel writer or written to a transport), so the order the state machine
chose is the order on the wire; the only awaits are the HTTP writes of each
OUT channel's own writer loop and back-pressure waits.

Per request (``handle``):
  method check -> HTTP authentication (ntlm.http_auth, bound to the TCP
  connection) -> echo (Content-Length <= 16) or channel: target allow-list ->
  ``100 Continue`` if asked -> first RTS PDU of the body -> attach to a VC by
  cookie -> IN: pump the body into the VC; OUT: run the channel's writer.

Bounds: unauthenticated connections (from accept, TLS handshake included) are
closed after ``handshake_timeout`` and their number is capped, globally and per
source address (``ConnectionGuard``); a VC waits ``setup_timeout`` for its other
channel; backend connects time out and are retried a bounded number of times.
Authenticated channels have no body or idle timeout: they live for hours.

Whatever a client makes us refuse (a bound, a timeout, a malformed request, a
disconnect mid-request, a failed login) goes through ``ProxyServer.refuse``: a
``rpcproxy_refused{reason}`` count and, through ``rpcproxy.ratelimit``, a few
lines plus a periodic summary, never a traceback or one line per connection.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import logging
import os
import socket
import ssl
import time
import uuid
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp.http_exceptions
import aiohttp.http_parser
import aiohttp.web_protocol
from aiohttp import web

from dcerpc.pdu import HEADER_LEN, PduFramer
from ntlm.errors import Unreachable
from ntlm.http_auth import Authenticated, Challenge, Denied, HttpAuthenticator, Unavailable
from ntlm.verifier import Identity
from ntlm.winbind import HelperPool, WinbindVerifier
from rpcproxy import proxyproto
from rpcproxy.autodiscover.service import AutodiscoverService
from rpcproxy.config import Config
from rpcproxy.errors import (
    RPC_S_SERVER_TOO_BUSY,
    RPC_S_SERVER_UNAVAILABLE,
    BackendUnavailable,
    ProtocolError,
    RpcProxyError,
    TargetRefused,
)
from rpcproxy.metrics import ServerMetrics
from rpcproxy.proxyproto import ProxyHeader, ProxyHeaderError
from rpcproxy.ratelimit import Exemptions, Refusal, RefusalLog, source_key
from rpcproxy.rpch import channels, rts
from rpcproxy.rpch.actions import (
    Action,
    CloseBackend,
    CloseChannel,
    ConnectBackend,
    PauseBackend,
    ResumeBackend,
    SendToBackend,
    SendToClient,
    StartResponse,
    VcClosed,
)
from rpcproxy.rpch.channels import VcSettings
from rpcproxy.rpch.connection import VirtualConnection
from rpcproxy.targets import AllowList, Endpoint, Target, parse_endpoint, parse_target_query
from rpcproxy.tls import TlsConnection
from rpcproxy.workers import Handoff, HandoffError, WorkerSet

log = logging.getLogger("rpcproxy")

# aiohttp's C parser (llhttp) only knows the registered HTTP methods and rejects
# RPC_IN_DATA / RPC_OUT_DATA with "Invalid method". The pure-Python request
# parser accepts any RFC 9110 token; it only parses headers, the channel bodies
# pass through it in large chunks. tests/test_server_http.py guards this.
aiohttp.web_protocol.HttpRequestParser = aiohttp.http_parser.HttpRequestParserPy  # type: ignore[attr-defined]

RPC_IN_DATA = "RPC_IN_DATA"
RPC_OUT_DATA = "RPC_OUT_DATA"
RPC_CONNECT = "RPC_CONNECT"  # RPC over HTTP v1: not supported
PATHS = ("/rpc/rpcproxy.dll", "/rpcwithcert/rpcproxy.dll")

ECHO_MAX_BODY = 16  # [MS-RPCH] 2.1.2.1.6 / rpch-notes 3.2
FREEZE_FIRST = 512  # open VCs at the first gc.freeze() (see _tune_gc)
FREEZE_GROWTH = 1.25  # then at each new high this much above the previous one



def _error_status(error: RpcProxyError) -> str:
    return f"RPC Error: {error.rpc_error:X}"


def _error_body(error: RpcProxyError) -> str:
    return f"{_error_status(error)}: {error.reason}\r\n"


def rpc_error_response(error: RpcProxyError) -> web.Response:
    """``503 RPC Error: <hex>`` ([MS-RPCH] 2.1.2.1.3) with the reason as body; closes."""
    resp = web.Response(status=503, reason=_error_status(error), text=_error_body(error))
    resp.force_close()
    return resp


# --- channel adapters ------------------------------------------------------------------------


def raw_error_response(error: RpcProxyError) -> bytes:
    """``503 RPC Error`` written straight to a transport that aiohttp no longer owns."""
    body = _error_body(error).encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 503 {_error_status(error)}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ChannelProtocol(asyncio.Protocol):
    """One IN or OUT channel after its HTTP request was accepted.

    aiohttp parses the request line, headers and the first RTS PDU and runs
    authentication; then the connection's transport is switched to this
    protocol (``transport.set_protocol``), the way an HTTP upgrade hands a
    connection over, and aiohttp is told the connection is gone, so its request
    objects and handler task are freed at once (an idle channel costs only this
    object and its transport). From here on bytes go straight between the transport and
    the VC: the IN body into ``VirtualConnection.in_data`` (at most
    Content-Length bytes), the OUT response (status line, then PDUs) written
    synchronously in the order the VC chose. TCP back-pressure is plain
    asyncio flow control: an OUT transport that cannot keep up pauses the
    backend's reading; a backend that cannot keep up pauses IN reading.
    """

    __slots__ = ("kind", "transport", "body_left", "label", "runtime", "started", "closed",
                 "_out_body", "_early")

    def __init__(self, kind: str, transport: asyncio.Transport | None, body_left: int,
                 label: str) -> None:
        self.kind = kind  # "IN" or "OUT"
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.body_left = body_left  # request body bytes still allowed
        self.label = label
        self.runtime: VcRuntime | None = None
        self.started = False  # OUT: 200 Success written
        self.closed = False
        self._out_body = PduFramer() if kind == "OUT" else None
        self._early = b""  # bytes that came before the channel was joined to its VC

    def __repr__(self) -> str:
        return f"<{self.kind} {self.label}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only for a socket handed over by a sibling worker (connect_accepted_socket);
        # a taken-over transport is given to __init__.
        self.transport = transport  # type: ignore[assignment]

    # ---- from the VC (actions) -----------------------------------------------------------

    def start(self, content_length: int) -> None:
        self.started = True
        self.transport.write(
            b"HTTP/1.1 200 Success\r\nContent-Type: application/rpc\r\n"
            b"Content-Length: %d\r\nCache-Control: private\r\n\r\n" % content_length
        )

    def write_many(self, chunks: list[bytes]) -> None:
        if not self.closed:
            self.transport.writelines(chunks)

    def close(self, error: RpcProxyError | None) -> None:
        if self.closed:
            return
        self.closed = True
        if error is not None and not self.started:
            self.transport.write(raw_error_response(error))
        self.transport.close()  # after what was written is flushed

    # ---- from the transport --------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Body bytes, from aiohttp's buffer at hand-over or from the socket."""
        rt = self.runtime
        if rt is None:  # an adopted socket can speak before _attach ran: keep it
            if len(self._early) + len(data) <= self.body_left:
                self._early += data
            return
        if self.closed or not data:
            return
        if len(data) > self.body_left:
            rt.execute(rt.vc.channel_failed(
                self, ProtocolError(f"{self.kind} request body runs past its Content-Length")))
            return
        self.body_left -= len(data)
        if self._out_body is None:
            rt.on_in_data(self, data)
        else:
            for pdu in self._out_body.feed(data):
                rt.execute(rt.vc.out_request_data(self, pdu.data, rt.now()))

    def data_received(self, data: bytes) -> None:
        try:
            self.feed(data)
        except ProtocolError as exc:  # framing of the OUT body
            rt = self.runtime
            if rt is not None:
                rt.execute(rt.vc.channel_failed(self, exc))

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        rt = self.runtime
        if rt is not None and not was_closed:
            rt.execute(rt.vc.channel_closed(self))
        if rt is not None:
            rt.channel_lost(self)
        self.runtime = None  # no cycle left for the garbage collector to find

    def pause_writing(self) -> None:
        if self.runtime is not None:
            self.runtime.throttle_backend(self, True)

    def resume_writing(self) -> None:
        if self.runtime is not None:
            self.runtime.throttle_backend(self, False)


class BackendProtocol(asyncio.Protocol):
    """The one backend TCP connection of a VC."""

    def __init__(self, runtime: VcRuntime) -> None:
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport: no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.runtime.on_backend_data(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.runtime is not None:
            self.runtime.on_backend_lost()
        self.runtime = None  # type: ignore[assignment]  # break the runtime <-> backend cycle

    def pause_writing(self) -> None:
        self.runtime.pause_in_reading(True)

    def resume_writing(self) -> None:
        self.runtime.pause_in_reading(False)

    def write_many(self, chunks: list[bytes]) -> None:
        if self.transport is not None and not self.closing:
            self.transport.writelines(chunks)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


# --- per-VC runtime --------------------------------------------------------------------------


@dataclass
class VcRuntime:
    """A VirtualConnection plus the I/O objects its actions act on."""

    server: ProxyServer
    vc: VirtualConnection
    backend_endpoint: Endpoint
    client: str
    started_wall: float = field(default_factory=time.time)
    backend: BackendProtocol | None = None
    connect_task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    backend_read_paused: bool = False  # by the VC (flow control)
    throttled_by: set[ChannelProtocol] = field(default_factory=set)  # OUTs that can't keep up
    in_paused: bool = False  # IN reading paused because the backend can't keep up
    closed: bool = False
    opened_at: float | None = None  # loop time CONN/A3 went out (metrics)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    @functools.cached_property
    def label(self) -> str:
        """The VC cookie as a GUID: the correlation id in every log line."""
        return str(uuid.UUID(bytes_le=self.vc.cookie))

    def now(self) -> float:
        return self.loop.time()

    def execute(self, actions: list[Action]) -> None:
        # Consecutive writes to one destination go out as one writelines() call (one
        # writev syscall instead of one per PDU); any other action first flushes them,
        # so the order the VC chose is kept on every socket. This runs for every read of
        # every socket: exact type checks, no per-action allocation beyond the batch.
        batch: list[bytes] = []
        batch_to: ChannelProtocol | BackendProtocol | None = None
        for action in actions:
            kind = type(action)
            if kind is SendToBackend:
                dest: ChannelProtocol | BackendProtocol | None = self.backend
            elif kind is SendToClient:
                dest = action.channel  # type: ignore[union-attr,assignment]
            else:
                if batch_to is not None:
                    batch_to.write_many(batch)
                    batch, batch_to = [], None
                self._act(action)
                continue
            if dest is not batch_to:
                if batch_to is not None:
                    batch_to.write_many(batch)
                batch = []
                batch_to = dest
            batch.append(action.data)  # type: ignore[union-attr]
        if batch_to is not None:
            batch_to.write_many(batch)
        self._arm_timer()

    def _act(self, action: Action) -> None:
        """Every action but a write."""
        if isinstance(action, StartResponse):
            channel = action.channel
            assert isinstance(channel, ChannelProtocol)
            channel.start(action.content_length)
            if self.opened_at is None:  # the first A3: the VC is open
                self.opened_at = self.now()
                self.server.metrics.vc_opened(self.opened_at - self.vc.created)
        elif isinstance(action, CloseChannel):
            ch = action.channel
            assert isinstance(ch, ChannelProtocol)
            ch.close(action.error)
        elif isinstance(action, ConnectBackend):
            self.connect_task = asyncio.create_task(self._connect_backend())
        elif isinstance(action, PauseBackend):
            self.backend_read_paused = True
            self._apply_backend_reading()
        elif isinstance(action, ResumeBackend):
            self.backend_read_paused = False
            self._apply_backend_reading()
        elif isinstance(action, CloseBackend):
            if self.connect_task is not None and not self.connect_task.done():
                self.connect_task.cancel()
            if self.backend is not None:
                self.backend.close()
        elif isinstance(action, VcClosed):
            self._closed(action)

    def _apply_backend_reading(self) -> None:
        backend = self.backend
        if backend is None or backend.transport is None or backend.closing:
            return
        if self.backend_read_paused or self.throttled_by:
            backend.transport.pause_reading()
        else:
            backend.transport.resume_reading()

    async def _connect_backend(self) -> None:
        cfg = self.server.config
        ep = self.backend_endpoint
        loop = asyncio.get_running_loop()
        last: str = ""
        for attempt in range(cfg.backend_connect_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.2 * attempt, 1.0))
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: BackendProtocol(self), ep.host, ep.port),
                    cfg.backend_connect_timeout,
                )
            except (OSError, TimeoutError) as exc:
                last = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                continue
            self.backend = proto
            self.execute(self.vc.backend_up(self.now()))
            return
        self.server.stats["backend_connect_failures"] += 1
        log.warning("vc=%s backend %s unreachable: %s", self.label, ep, last)
        self.execute(
            self.vc.backend_failed(
                BackendUnavailable(f"backend {ep} unreachable: {last}",
                                   rpc_error=RPC_S_SERVER_UNAVAILABLE),
            )
        )

    def on_backend_data(self, data: bytes) -> None:
        self.execute(self.vc.backend_data(data, self.now()))

    def on_in_data(self, channel: ChannelProtocol, data: bytes) -> None:
        self.execute(self.vc.in_data(channel, data, self.now()))
        if self.in_paused and not channel.closed:
            channel.transport.pause_reading()

    def throttle_backend(self, channel: ChannelProtocol, paused: bool) -> None:
        """An OUT transport's write buffer crossed its high (low) water mark."""
        if paused:
            self.throttled_by.add(channel)
        else:
            self.throttled_by.discard(channel)
        self._apply_backend_reading()

    def pause_in_reading(self, paused: bool) -> None:
        """The backend's write buffer crossed its high (low) water mark."""
        self.in_paused = paused
        for ch in self.vc.channels():
            if isinstance(ch, ChannelProtocol) and ch.kind == "IN" and not ch.closed:
                if paused:
                    ch.transport.pause_reading()
                else:
                    ch.transport.resume_reading()

    def channel_lost(self, channel: ChannelProtocol) -> None:
        if channel in self.throttled_by:
            self.throttle_backend(channel, False)

    def on_backend_lost(self) -> None:
        self.execute(self.vc.backend_closed())

    def _arm_timer(self) -> None:
        deadline = self.vc.next_deadline()
        if deadline is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            return
        # Lazy re-arming: an early wake-up just re-arms; only move the timer earlier.
        if self.timer is not None and self.timer_at is not None and self.timer_at <= deadline:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        self.execute(self.vc.on_timer(self.now()))

    def _closed(self, action: VcClosed) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.forget_vc(self)
        vc = self.vc
        ident = vc.identity
        user = ident.principal if isinstance(ident, Identity) else str(ident)
        duration = time.time() - self.started_wall
        fields = {
            "event": "vc_closed", "vc": self.label, "user": user, "target": str(vc.target),
            "backend": str(self.backend_endpoint), "client": self.client,
            "duration_s": round(duration, 3), "bytes_up": vc.traffic.client_to_backend,
            "bytes_down": vc.traffic.backend_to_client, "how": action.reason,
            "error": action.error is not None,
        }
        log.info(
            "vc=%s closed user=%s target=%s client=%s duration=%.1fs up=%d down=%d how=%s",
            self.label, user, vc.target, self.client, duration,
            vc.traffic.client_to_backend, vc.traffic.backend_to_client, action.reason,
            extra={"fields": fields},
        )
        self.server.metrics.vc_closed(action.kind, vc.traffic.client_to_backend,
                                      vc.traffic.backend_to_client)


# --- the server ------------------------------------------------------------------------------


class ConnectionGuard:
    """Bounds TCP connections that have not authenticated yet.

    A connection counts from the moment it is accepted, TLS handshake included,
    until it authenticates. Each gets ``timeout`` seconds for that; at most
    ``limit`` may be unauthenticated at once, and at most ``per_source_limit`` from
    one source (``rpcproxy.ratelimit.source_key``: an IPv4 address or an IPv6 /64),
    so one address cannot take every slot. A connection over either bound is closed
    at once. This covers what aiohttp does not: a peer that connects and never
    sends (or never finishes) a TLS handshake or a request. Every refusal and
    expiry is reported to ``on_refused`` (the server counts and aggregates them).

    Connections are named by their aiohttp protocol object, not by the transport:
    uvloop's TLS transport cannot be weakly referenced. The same object keys the
    per-connection NTLM state. On a TLS listener the protocol object is made at
    accept and the TLS handshake runs under the guard (see ``tls_protocol_factory``);
    aiohttp sees the connection only once it is done.
    """

    def __init__(self, limit: int, timeout: float, per_source_limit: int | None = None,
                 exempt: Exemptions | None = None) -> None:
        self.limit = limit
        self.exempt = exempt if exempt is not None else Exemptions([])
        self.timeout = timeout
        self.per_source_limit = per_source_limit if per_source_limit is not None else limit
        # protocol -> (source, transport it was accepted on); removed on auth, loss, expiry
        self.pending: dict[asyncio.BaseProtocol, tuple[str, asyncio.BaseTransport]] = {}
        self.per_source: collections.Counter[str] = collections.Counter()
        self.trusted: weakref.WeakSet[asyncio.BaseProtocol] = weakref.WeakSet()
        self.rejected = 0
        self.expired = 0
        self.tls_failed = 0
        # TLS handshakes and PROXY headers under way: their task, socket, and refusal if late
        self.handshakes: dict[asyncio.BaseProtocol,
                              tuple[asyncio.Task[None], socket.socket, Refusal]] = {}
        self.on_lost: Callable[[object], None] | None = None
        self.on_refused: Callable[[Refusal, str, str, str], None] | None = None

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that reports new connections here."""
        guard = self
        loop = asyncio.get_running_loop()
        kwargs = server._kwargs  # what web.Server.__call__ passes to its RequestHandler

        class GuardedRequestHandler(aiohttp.web_protocol.RequestHandler):
            __slots__ = ("__weakref__", "admitted", "peer")

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                if not getattr(self, "peer", None):  # (set already from a PROXY header)
                    self.peer = _peer_name(transport)  # still known once the transport is gone
                if not getattr(self, "admitted", False):
                    self.admitted = True
                    guard.admit(self, transport)

            def connection_lost(self, exc: BaseException | None) -> None:
                super().connection_lost(exc)
                guard.lost(self)
                if guard.on_lost is not None:
                    guard.on_lost(self)

            def log_exception(self, *args: Any, **kw: Any) -> None:
                exc = kw.get("exc_info")
                if isinstance(exc, BaseException) and guard.client_fault(self, exc):
                    return  # the client's doing: one aggregated line, no traceback
                super().log_exception(*args, **kw)

        def make() -> asyncio.Protocol:
            return GuardedRequestHandler(server, loop=loop, **kwargs)

        return make

    def take_socket(self, handler: asyncio.BaseProtocol,
                    transport: asyncio.BaseTransport) -> socket.socket | None:
        """Count ``handler``'s connection, then take its socket from its first transport
        before a byte is read (a duplicate descriptor; the transport is aborted, which
        closes only its own). None: refused or lost, and the connection is closed."""
        handler.admitted = True  # type: ignore[attr-defined]
        if not self.admit(handler, transport):
            return None
        raw = transport.get_extra_info("socket")
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            self.lost(handler)
            transport.abort()  # type: ignore[attr-defined]
            return None
        transport.abort()  # type: ignore[attr-defined]
        return sock

    def tls_protocol_factory(self, server: web.Server,
                             ctx: ssl.SSLContext) -> Callable[[], asyncio.Protocol]:
        """Like ``protocol_factory`` for a TLS listener: the handshake runs under the guard.

        The listener accepts plain TCP; before the loop reads a byte, the accepted socket
        is duplicated and its first transport dropped, and the duplicate is given back to
        the loop with TLS (``connect_accepted_socket``, timeout ``self.timeout``), its
        request handler already counted here (the TLS transport then calls the handler's
        ``connection_made`` once the handshake is done).
        """
        make_handler = self.protocol_factory(server)
        guard = self

        class TlsAccept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                handler = make_handler()
                sock = guard.take_socket(handler, transport)
                if sock is None:
                    return
                task = asyncio.get_running_loop().create_task(
                    guard._tls_handshake(handler, sock, ctx))
                guard.handshakes[handler] = (task, sock, Refusal.TLS_TIMEOUT)

        return TlsAccept

    def lean_tls_protocol_factory(self, server: web.Server,
                                  ctx: ssl.SSLContext) -> Callable[[], asyncio.Protocol]:
        """``tls_protocol_factory`` with rpcproxy.tls's lean transport: the TLS connection is
        counted here from accept (the request handler is made at once and handed to it when
        the handshake is done); a handshake that fails or times out is forgotten at once."""
        make_handler = self.protocol_factory(server)
        guard = self
        backstop = self.timeout + 5.0  # the guard's own timer ends a late handshake first

        class GuardedTls(TlsConnection):
            __slots__ = ("handler",)

            def __init__(self) -> None:
                self.handler = make_handler()
                self.handler.admitted = True  # type: ignore[attr-defined]
                super().__init__(ctx, self._handshake_done, backstop)

            def _handshake_done(self) -> asyncio.BaseProtocol:
                guard.handshakes.pop(self.handler, None)
                return self.handler

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if guard.admit(self.handler, transport):
                    super().connection_made(transport)
                    # Late: the guard ends it like a loop TLS handshake (cancel = abort).
                    guard.handshakes[self.handler] = (
                        cast("asyncio.Task[None]", _Abort(self)),
                        cast(socket.socket, _NoSocket), Refusal.TLS_TIMEOUT)

            def handshake_timed_out(self) -> None:
                guard.tls_gave_up(self.handler, Refusal.TLS_TIMEOUT, "TLS handshake not done "
                                  f"within {backstop:g}s")

            def handshake_failed(self, reason: str) -> None:
                guard.tls_gave_up(self.handler, Refusal.TLS_FAILED,
                                  f"TLS handshake failed: {reason}")

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                guard.handshakes.pop(self.handler, None)
                guard.lost(self.handler)  # (already gone if the handler saw the connection)

        return GuardedTls

    def tls_gave_up(self, handler: asyncio.BaseProtocol, reason: Refusal, detail: str) -> None:
        """A lean TLS handshake failed or ran out of time: one refusal, counted."""
        self.handshakes.pop(handler, None)
        entry = self.pending.get(handler)
        if self._remove(handler) and entry is not None:
            if reason is Refusal.TLS_FAILED:
                self.tls_failed += 1
            else:
                self.expired += 1
            self._refused(reason, entry, detail)

    def proxy_protocol_factory(self, server: web.Server, ctx: ssl.SSLContext | None,
                               trusted: Exemptions,
                               otherwise: Callable[[], asyncio.Protocol]
                               ) -> Callable[[], asyncio.Protocol]:
        """A listener that takes a PROXY protocol header (``rpcproxy.proxyproto``) from the
        ``trusted`` addresses, and serves every other address with ``otherwise``.

        From a trusted address the socket is taken from its first transport before a byte
        is read (as for TLS), the header is peeked at and exactly its bytes consumed, the
        connection is counted under the client's address it names, and then the loop gets
        the socket back (with TLS on a TLS listener): the request handler, the logs and
        the per-source bounds see the client's address, never the front proxy's.
        """
        make_handler = self.protocol_factory(server)
        guard = self

        class ProxyAccept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                peer = transport.get_extra_info("peername")
                host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
                if host not in trusted:
                    inner = otherwise()
                    transport.set_protocol(inner)
                    inner.connection_made(transport)
                    return
                handler = make_handler()
                sock = guard.take_socket(handler, transport)
                if sock is None:
                    return
                sock.setblocking(False)
                task = asyncio.get_running_loop().create_task(
                    guard._proxied(handler, sock, ctx))
                guard.handshakes[handler] = (task, sock, Refusal.PROXY_HEADER)

        return ProxyAccept

    async def _proxied(self, handler: asyncio.BaseProtocol, sock: socket.socket,
                       ctx: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        entry = self.pending.get(handler)
        try:
            header = await _read_proxy_header(sock)
        except asyncio.CancelledError:
            sock.close()  # _expire counted it
            return
        except (OSError, ProxyHeaderError) as exc:
            self.handshakes.pop(handler, None)
            if self._remove(handler) and entry is not None:
                self._refused(Refusal.PROXY_HEADER, entry, f"bad PROXY protocol header: {exc}")
            sock.close()
            return
        if header.source is not None:
            host, port = header.source
            if not self.rekey(handler, host, port):
                self.handshakes.pop(handler, None)
                sock.close()
                return
            handler.peer = f"{host}:{port}"  # type: ignore[attr-defined]
        if ctx is not None:
            self.handshakes[handler] = (self.handshakes[handler][0], sock, Refusal.TLS_TIMEOUT)
            await self._tls_handshake(handler, sock, ctx)
            return
        self.handshakes.pop(handler, None)
        try:
            await loop.connect_accepted_socket(lambda: handler, sock)
        except OSError:
            self._remove(handler)
            sock.close()

    async def _tls_handshake(self, handler: asyncio.BaseProtocol, sock: socket.socket,
                             ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: handler, sock, ssl=ctx,
                                               ssl_handshake_timeout=self.timeout)
            # (connection_made of handler ran: aiohttp has the TLS connection)
        except asyncio.CancelledError:
            pass  # _expire counted it; the loop closes the socket it was given
        except Exception as exc:  # noqa: BLE001 (every failure is the client's or the network's)
            entry = self.pending.get(handler)
            if self._remove(handler) and entry is not None:
                self.tls_failed += 1
                what = str(exc) or type(exc).__name__
                self._refused(Refusal.TLS_FAILED, entry, f"TLS handshake failed: {what}")
        finally:
            self.handshakes.pop(handler, None)

    def admit(self, protocol: asyncio.BaseProtocol, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection, or close it at once over a bound; False if closed."""
        peer = transport.get_extra_info("peername")
        host, port = (str(peer[0]), peer[1]) if isinstance(peer, tuple) and peer else ("?", 0)
        source = source_key(host)
        reason: Refusal | None = None
        if host not in self.exempt and self.per_source[source] >= self.per_source_limit:
            reason = Refusal.UNAUTH_PER_SOURCE
            detail = (f"{self.per_source_limit} unauthenticated connections from this source "
                      "(max_unauthenticated_per_source)")
        elif len(self.pending) >= self.limit:
            reason = Refusal.UNAUTH_LIMIT
            detail = f"{self.limit} unauthenticated connections (max_unauthenticated_connections)"
        if reason is not None:
            self.rejected += 1
            self._refused(reason, (source, transport), detail, f"{host}:{port}")
            transport.close()
            return False
        self.pending[protocol] = (source, transport)
        self.per_source[source] += 1
        asyncio.get_running_loop().call_later(self.timeout, self._expire, weakref.ref(protocol))
        return True

    def rekey(self, protocol: asyncio.BaseProtocol, host: str, port: int) -> bool:
        """A PROXY header named the client: count the connection under its address
        instead of the front proxy's; False (closed, counted) if that source is full."""
        entry = self.pending.get(protocol)
        if entry is None:
            return False
        source = source_key(host)
        if host not in self.exempt and self.per_source[source] >= self.per_source_limit:
            self._remove(protocol)
            self.rejected += 1
            self._refused(Refusal.UNAUTH_PER_SOURCE, (source, entry[1]),
                          f"{self.per_source_limit} unauthenticated connections from this "
                          "source (max_unauthenticated_per_source)", f"{host}:{port}")
            return False
        self._remove(protocol)
        self.pending[protocol] = (source, entry[1])
        self.per_source[source] += 1
        return True

    def source_of(self, protocol: asyncio.BaseProtocol) -> str | None:
        entry = self.pending.get(protocol)
        return entry[0] if entry is not None else None

    def authenticated(self, protocol: asyncio.BaseProtocol) -> None:
        if protocol not in self.trusted:
            self.trusted.add(protocol)
            self._remove(protocol)

    def lost(self, protocol: asyncio.BaseProtocol) -> None:
        self._remove(protocol)

    def client_fault(self, protocol: asyncio.BaseProtocol, exc: BaseException) -> bool:
        """aiohttp is about to log ``exc`` with a traceback: report it instead if the client
        caused it (a malformed request, a disconnect); False for anything else."""
        if isinstance(exc, aiohttp.http_exceptions.HttpProcessingError):
            reason = Refusal.BAD_REQUEST
            text = exc.message if isinstance(exc.message, str) else str(exc)
            detail = f"malformed HTTP request ({type(exc).__name__}): {' '.join(text.split())}"
        elif isinstance(exc, ConnectionError | asyncio.IncompleteReadError):
            reason = Refusal.CLIENT_GONE
            detail = f"client went away mid-request ({type(exc).__name__})"
        else:
            return False
        peer = getattr(protocol, "peer", None) or "?"
        if self.on_refused is not None:
            self.on_refused(reason, source_key(peer.rpartition(":")[0] or peer), peer, detail)
        return True

    def _remove(self, protocol: asyncio.BaseProtocol) -> bool:
        entry = self.pending.pop(protocol, None)
        if entry is None:
            return False
        source = entry[0]
        left = self.per_source[source] - 1
        if left > 0:
            self.per_source[source] = left
        else:
            del self.per_source[source]
        return True

    def _refused(self, reason: Refusal, entry: tuple[str, asyncio.BaseTransport], detail: str,
                 peer: str | None = None) -> None:
        if self.on_refused is None:
            return
        source, transport = entry
        if peer is None:
            name = transport.get_extra_info("peername")
            peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else source
        self.on_refused(reason, source, peer, detail)

    def _expire(self, ref: weakref.ref[asyncio.BaseProtocol]) -> None:
        protocol = ref()
        if protocol is None or protocol in self.trusted:
            return
        entry = self.pending.get(protocol)
        if entry is None:
            return
        self._remove(protocol)
        handshake = self.handshakes.pop(protocol, None)
        if handshake is not None:  # still in its TLS handshake: end the TCP connection
            self.expired += 1
            task, sock, reason = handshake
            what = "TLS handshake" if reason is Refusal.TLS_TIMEOUT else "PROXY header"
            self._refused(reason, entry,
                          f"{what} not done within {self.timeout:g}s (handshake_timeout)")
            task.cancel()
            try:  # the loop's TLS transport owns the descriptor; this makes it see the end
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        transport = getattr(protocol, "transport", None)
        if transport is not None and not transport.is_closing():
            self.expired += 1
            self._refused(Refusal.HANDSHAKE_TIMEOUT, entry,
                          f"not authenticated within {self.timeout:g}s (handshake_timeout)")
            transport.close()


# How an authentication that could not be judged is counted among refusals.
_UNAVAILABLE_REFUSALS = {Unreachable.BUSY: Refusal.PENDING_LIMIT,
                         Unreachable.BUSY_PER_SOURCE: Refusal.PENDING_PER_SOURCE}


class _Abort:
    """Stands in for the handshake task of a lean TLS connection: cancelling aborts it."""

    __slots__ = ("conn",)

    def __init__(self, conn: TlsConnection) -> None:
        self.conn = conn

    def cancel(self) -> None:
        self.conn.abort()


class _NoSocket:
    """The lean TLS connection owns its socket through its transport: nothing to shut."""

    @staticmethod
    def shutdown(how: int) -> None:
        pass


def helper_pool(config: Config) -> HelperPool:
    """The pool of ntlm_auth helpers the configuration asks for."""
    return HelperPool(config.ntlm_helper, size=config.ntlm_helpers,
                      queue_timeout=config.auth_queue_timeout,
                      per_source=config.ntlm_helpers_per_source)


class ProxyServer:
    """Owns the configuration, the authenticator, the VC registry and the listeners."""

    def __init__(self, config: Config, *, authenticator: HttpAuthenticator | None = None,
                 workers: WorkerSet | None = None,
                 listen_sockets: list[socket.socket] | None = None) -> None:
        self.config = config
        self.workers = workers  # set in --workers mode: VCs are owned by cookie hash
        self.listen_sockets = listen_sockets  # pre-bound by the supervisor
        self.settings: VcSettings = config.vc_settings()
        self.allow_list: AllowList = config.allow_list()
        self.verifier = WinbindVerifier(helper_pool(config))
        self.authenticator = authenticator or HttpAuthenticator(
            self.verifier,
            allow_basic=config.allow_basic,
            basic_requires_tls=not config.basic_over_http,
            max_pending=config.max_pending_handshakes,
            max_pending_per_source=config.max_pending_handshakes_per_source,
            handshake_timeout=config.handshake_timeout,
            challenge_timeout=config.ntlm_challenge_timeout,
        )
        self.guard = ConnectionGuard(config.max_unauthenticated_connections,
                                     config.handshake_timeout,
                                     config.max_unauthenticated_per_source,
                                     Exemptions(config.per_source_exempt))
        self.guard.on_refused = self.refuse
        self.refusals = RefusalLog(config.refusal_log_interval)
        self._refusal_timer: asyncio.TimerHandle | None = None
        # NTLM state is per TCP connection: drop it (and give back its helper) on close.
        self.guard.on_lost = self.authenticator.forget
        self.vcs: dict[bytes, VcRuntime] = {}
        self.freeze_mark = FREEZE_FIRST  # VC count at which the next gc.freeze() runs
        self._freeze_pending = False
        self.vcs_per_user: collections.Counter[Hashable] = collections.Counter()
        self.stats: dict[str, int] = {
            "backend_connect_failures": 0,
            "vcs_opened": 0,
            "auth_denied": 0,
            "targets_refused": 0,
            "gc_freezes": 0,
        }
        self.runner: web.AppRunner | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.metrics = ServerMetrics()  # event counters; rpcproxy.metrics reads the rest
        self.autodiscover = AutodiscoverService(self)  # /autodiscover/autodiscover.xml

    # ---- lifecycle ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        for path in PATHS:
            app.router.add_route("*", path, self.handle, expect_handler=_no_expect_handler)
        self.autodiscover.register(app)
        app.on_response_prepare.append(_server_header)
        return app

    async def start(self) -> list[tuple[str, int]]:
        """Listen on the configured address(es); returns the bound (host, port) pairs."""
        self.runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False,
            keepalive_timeout=self.config.handshake_timeout,
            lingering_time=0,  # an unread channel-sized body: answer, then close at once
        )
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        assert self.runner.server is not None
        plain_factory = self.guard.protocol_factory(self.runner.server)
        bound: list[tuple[str, int]] = []
        listeners: list[tuple[str, ssl.SSLContext | None]] = []
        if self.config.tls_cert:
            self.ssl_context = self.make_ssl_context()
            listeners.append((self.config.listen, self.ssl_context))
            if self.config.http_listen:
                listeners.append((self.config.http_listen, None))
        else:
            listeners.append((self.config.listen, None))
        for i, (address, ctx) in enumerate(listeners):
            # TLS handshakes run under the guard: the connection is counted from accept.
            factory: Callable[[], asyncio.BaseProtocol]
            if ctx is None:
                factory = plain_factory
            elif self.config.tls_transport == "lean":
                # rpcproxy.tls: TLS on plain TCP transports, about 20 KiB less per channel.
                factory = self.guard.lean_tls_protocol_factory(self.runner.server, ctx)
            else:
                factory = self.guard.tls_protocol_factory(self.runner.server, ctx)
            if self.config.proxy_protocol_from:
                factory = self.guard.proxy_protocol_factory(
                    self.runner.server, ctx, Exemptions(self.config.proxy_protocol_from),
                    factory)
            if self.listen_sockets is not None:
                server = await loop.create_server(factory, sock=self.listen_sockets[i],
                                                  backlog=4096)
            else:
                ep = parse_endpoint(address, "listen", listen=True)
                server = await loop.create_server(factory, ep.host, ep.port, backlog=4096)
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append((host, port))
        if self.workers is not None:
            self.workers.start_receiving(loop, self._on_handoff)
        await self.autodiscover.start()
        _tune_gc()
        return bound

    def listen_addresses(self) -> list[tuple[str, bool]]:
        """(address, tls) of every listener ``start`` opens, in order."""
        if self.config.tls_cert:
            out = [(self.config.listen, True)]
            if self.config.http_listen:
                out.append((self.config.http_listen, False))
            return out
        return [(self.config.listen, False)]

    def make_ssl_context(self) -> ssl.SSLContext:
        from rpcproxy.certs import server_ssl_context  # TLS 1.2+, AEAD ciphers only

        assert self.config.tls_cert and self.config.tls_key
        return server_ssl_context(self.config.tls_cert, self.config.tls_key,
                                  session_tickets=self.config.tls_session_tickets)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, close every VC cleanly, then stop the HTTP machinery."""
        for server in self.servers:
            server.close()
        await self.autodiscover.stop()
        loop = asyncio.get_running_loop()
        self._flush_refusals(final=True)
        if self.workers is not None:
            self.workers.stop_receiving(loop)
        for rt in list(self.vcs.values()):
            rt.execute(rt.vc.close("server shutting down"))
        if self.runner is not None:
            await self.runner.shutdown()
            await self.runner.cleanup()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), grace)
            except TimeoutError:
                pass
        self.servers.clear()
        await self.verifier.aclose()

    def refuse(self, reason: Refusal, source: str, peer: str, detail: str) -> None:
        """A client was refused or dropped: count it; log it or fold it into a summary."""
        self.metrics.refused[reason.value] += 1
        loop = asyncio.get_running_loop()
        for line in self.refusals.note(reason, source, detail, loop.time(), peer):
            log.warning("%s", line)
        due = self.refusals.due()
        if due is not None and self._refusal_timer is None:
            self._refusal_timer = loop.call_at(due + 0.001, self._flush_refusals)

    def _refuse_request(self, reason: Refusal, request: web.Request, detail: str) -> None:
        self.refuse(reason, _source(request), _peer(request), detail)

    def _flush_refusals(self, final: bool = False) -> None:
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None
        loop = asyncio.get_running_loop()
        line = self.refusals.flush(float("inf") if final else loop.time())
        if line is not None:
            log.warning("%s", line)
        due = self.refusals.due()
        if due is not None and not final:
            self._refusal_timer = loop.call_at(due + 0.001, self._flush_refusals)

    def forget_vc(self, rt: VcRuntime) -> None:
        if self.vcs.get(rt.vc.cookie) is rt:
            del self.vcs[rt.vc.cookie]
            left = self.vcs_per_user[rt.vc.identity] - 1
            if left > 0:
                self.vcs_per_user[rt.vc.identity] = left
            else:
                del self.vcs_per_user[rt.vc.identity]

    # ---- request handling ---------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        if method == RPC_CONNECT:
            return web.Response(
                status=501, text="RPC over HTTP v1 (RPC_CONNECT) is not supported; use v2\r\n"
            )
        if method not in (RPC_IN_DATA, RPC_OUT_DATA):
            return web.Response(
                status=405, headers={"Allow": f"{RPC_IN_DATA}, {RPC_OUT_DATA}"},
                text="only RPC_IN_DATA and RPC_OUT_DATA are served here\r\n",
            )
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            resp = web.Response(status=400, text="chunked request bodies are not RPC over HTTP\r\n")
            resp.force_close()
            return resp
        try:
            return await self._handle_rpc(request)
        except ConnectionError as exc:  # the client went away while we read or wrote
            self._refuse_request(Refusal.CLIENT_GONE, request,
                                 f"{method}: client went away mid-request ({type(exc).__name__})")
            resp = web.Response(status=400)
            resp.force_close()
            return resp

    async def _handle_rpc(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        identity_or_response = await self._authenticate(request)
        if isinstance(identity_or_response, web.StreamResponse):
            return identity_or_response
        identity = identity_or_response

        length = request.content_length or 0
        if length <= ECHO_MAX_BODY:
            return await self._echo(request, length)

        try:
            target = parse_target_query(request.query_string)
            endpoint = self.allow_list.resolve(target)
        except TargetRefused as exc:
            self.stats["targets_refused"] += 1
            self._refuse_request(Refusal.TARGET_REFUSED, request,
                                 f"target refused, user={identity.principal}: {exc.reason}")
            return rpc_error_response(exc)

        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        try:
            return await self._channel(request, identity, target, endpoint, length)
        except RpcProxyError as exc:
            self._refuse_request(Refusal.CHANNEL_REFUSED, request,
                                 f"{method} user={identity.principal}: {exc.reason}")
            return rpc_error_response(exc)

    def auth_source(self, request: web.Request) -> str | None:
        """What a request's authentication counts against per source (None: exempt)."""
        return None if _host(request) in self.guard.exempt else _source(request)

    async def _authenticate(self, request: web.Request) -> Identity | web.StreamResponse:
        tls = request.transport is not None and request.transport.get_extra_info(
            "sslcontext") is not None
        started = time.monotonic()
        outcome = await self.authenticator.authenticate(
            request.protocol, request.headers.get("Authorization"), tls=tls,
            source=self.auth_source(request),
        )
        self.metrics.auth_outcome(outcome, time.monotonic() - started,
                                  had_credentials=bool(request.headers.get("Authorization")))
        if isinstance(outcome, Authenticated):
            self.guard.authenticated(request.protocol)
            return outcome.identity
        if isinstance(outcome, Unavailable):
            self._refuse_request(_UNAVAILABLE_REFUSALS.get(outcome.code,
                                                           Refusal.AUTH_UNAVAILABLE),
                                 request, f"authentication unavailable: {outcome.reason}")
            return rpc_error_response(
                RpcProxyError(outcome.reason, rpc_error=RPC_S_SERVER_TOO_BUSY
                              if outcome.code.our_bound else RPC_S_SERVER_UNAVAILABLE)
            )
        headers: list[tuple[str, str]] = [("WWW-Authenticate", v)
                                          for v in outcome.www_authenticate]
        if isinstance(outcome, Denied):
            self.stats["auth_denied"] += 1
            self._refuse_request(Refusal.AUTH_DENIED, request,
                                 f"authentication failed: {outcome.reason}")
            body = "authentication failed\r\n"
        else:
            assert isinstance(outcome, Challenge)
            body = "authentication required\r\n"
        resp = web.Response(status=401, text=body)
        for name, value in headers:
            resp.headers.add(name, value)
        length = request.content_length or 0
        if length > ECHO_MAX_BODY or isinstance(outcome, Denied) and length:
            # A channel-sized body cannot be drained: answer and close (rpch-notes 3.6).
            resp.force_close()
        elif length:
            await request.content.read(length)
        return resp

    async def _echo(self, request: web.Request, length: int) -> web.Response:
        if length:
            await request.content.readexactly(length)
        resp = web.Response(status=200, reason="Success", body=rts.ECHO,
                            content_type="application/rpc")
        return resp

    async def _read_opening_pdu(self, request: web.Request, method: channels.Method,
                                length: int) -> channels.Opening:
        """The channel's first RTS PDU, within ``handshake_timeout``, judged by the core.

        Until it arrives the request is half-open (authenticated, but no channel
        yet): bounded like an unauthenticated connection.
        """
        timeout = self.config.handshake_timeout
        try:
            async with asyncio.timeout(timeout):
                head = await request.content.readexactly(HEADER_LEN)
                rest = await request.content.readexactly(
                    channels.first_pdu_length(head) - HEADER_LEN)
        except asyncio.IncompleteReadError:
            raise ProtocolError("the channel body ended before its first RTS PDU") from None
        except TimeoutError:
            raise ProtocolError(
                f"no RTS PDU within {timeout:g}s of the channel request") from None
        return channels.judge_opening(method, length, head + rest)

    def _runtime_for(self, cookie: bytes, identity: Identity, target: Target,
                     endpoint: Endpoint, peer: str) -> VcRuntime:
        rt = self.vcs.get(cookie)
        if rt is not None and not rt.closed:
            return rt
        vc = VirtualConnection(
            cookie, identity=identity, target=target, settings=self.settings,
            now=asyncio.get_running_loop().time(),
        )
        rt = VcRuntime(self, vc, endpoint, peer)
        self.vcs[cookie] = rt
        self.vcs_per_user[identity] += 1
        self.stats["vcs_opened"] += 1
        if len(self.vcs) >= self.freeze_mark and not self._freeze_pending:
            self._freeze_pending = True
            asyncio.get_running_loop().call_soon(self._freeze_long_lived)
        return rt

    def _freeze_long_lived(self) -> None:
        """A new high of open VCs: move what is alive out of the collector's way (see
        ``_tune_gc``); the next freeze comes at FREEZE_GROWTH times this many VCs."""
        self._freeze_pending = False
        gc.collect(1)  # young garbage first, so that it is not frozen with the VCs
        gc.freeze()
        self.freeze_mark = max(FREEZE_FIRST, int(len(self.vcs) * FREEZE_GROWTH))
        self.stats["gc_freezes"] += 1

    async def _channel(self, request: web.Request, identity: Identity, target: Target,
                       endpoint: Endpoint, length: int) -> web.StreamResponse:
        """Open an IN or OUT channel (the core judges it), hand its transport over, serve it."""
        method = channels.Method(request.method)
        channels.check_content_length(method, length)  # refused before reading the body
        opening = await self._read_opening_pdu(request, method, length)
        self.authenticator.forget(request.protocol)  # no more requests on this connection
        if self.workers is not None and not self.workers.is_mine(opening.vc_cookie):
            await self._hand_off(request, opening.pdu, opening.body_left, identity, target,
                                 endpoint)
        else:
            kind_name = "IN" if method is channels.Method.IN else "OUT"
            peer = _peer(request)
            channel, leftover = self._take_over(request, kind_name, opening.body_left)
            self._attach(channel, opening, identity, target, endpoint, peer, leftover)
        # aiohttp no longer has a transport for this request: this response is dropped.
        return web.Response(status=204)

    def _attach(self, channel: ChannelProtocol, opening: channels.Opening, identity: Identity,
                target: Target, endpoint: Endpoint, peer: str, leftover: bytes) -> None:
        """Join a channel (taken over here or handed off by a sibling) to its VC."""
        if channel.closed:  # the client went away before the channel could join
            return
        vc_cookie = opening.vc_cookie
        if opening.new_vc:
            if vc_cookie not in self.vcs and (
                self.vcs_per_user[identity] >= self.config.max_connections_per_user
            ):
                error = RpcProxyError(
                    f"{identity.principal} already holds {self.vcs_per_user[identity]} "
                    "virtual connections (max_connections_per_user)",
                    rpc_error=RPC_S_SERVER_TOO_BUSY)
                self.refuse(Refusal.CHANNEL_REFUSED, source_key(peer.rpartition(":")[0]), peer,
                            f"{channel.kind} channel: {error.reason}")
                channel.close(error)
                return
            rt = self._runtime_for(vc_cookie, identity, target, endpoint, peer)
        else:
            found = self.vcs.get(vc_cookie)
            if found is None or found.closed:
                error = ProtocolError(f"{opening.kind.value} for an unknown virtual connection "
                                      "(R1 recycling to another proxy is not supported)")
                self.refuse(Refusal.CHANNEL_REFUSED, source_key(peer.rpartition(":")[0]), peer,
                            f"{channel.kind} channel user={identity.principal}: {error.reason}")
                channel.close(error)
                return
            rt = found
        channel.label = rt.label
        actions = rt.vc.open_channel(channel, opening, identity=identity, target=target,
                                     now=rt.now())
        channel.runtime = rt
        rt.execute(actions)
        early, channel._early = channel._early, b""
        if leftover or early:
            channel.data_received(leftover + early)

    @staticmethod
    def _drain_body(request: web.Request) -> bytes:
        """The body bytes aiohttp has already buffered past what we read."""
        leftover = b""
        while True:
            try:
                chunk = request.content.read_nowait(-1)
            except RuntimeError:
                break
            if not chunk:
                break
            leftover += chunk
        return leftover

    @staticmethod
    def _detach_aiohttp(request: web.Request, protocol: asyncio.BaseProtocol) -> None:
        """Give the request's transport to ``protocol`` and make aiohttp forget it.

        Without a transport aiohttp can neither write to nor close it, and
        connection_lost makes it drop the request, its timers and its handler task.
        """
        transport = request.transport
        http_protocol = request.protocol
        assert transport is not None
        transport.set_protocol(protocol)
        http_protocol.transport = None
        http_protocol.connection_lost(None)

    def _take_over(self, request: web.Request, kind: str,
                   body_left: int) -> tuple[ChannelProtocol, bytes]:
        """Switch the request's transport to a ChannelProtocol (see its docstring)."""
        transport = request.transport
        assert transport is not None
        leftover = self._drain_body(request)
        channel = ChannelProtocol(kind, transport, body_left, "?")
        self._detach_aiohttp(request, channel)
        if transport.is_closing():
            channel.closed = True
        else:
            transport.resume_reading()
        return channel, leftover

    async def _hand_off(self, request: web.Request, pdu: rts.RtsPdu, body_left: int,
                        identity: Identity, target: Target, endpoint: Endpoint) -> None:
        """Give a channel whose VC belongs to another worker to that worker."""
        workers = self.workers
        assert workers is not None
        transport = request.transport
        assert transport is not None
        transport.pause_reading()
        leftover = self._drain_body(request)
        owner = workers.owner(rts.cookies(pdu)[0])
        record = Handoff(
            method=request.method, pdu=pdu.encode(), body_left=body_left - len(leftover),
            leftover=leftover, user=identity.user, domain=identity.domain,
            server=target.server, port=target.port, backend_host=endpoint.host,
            backend_port=endpoint.port, peer=_peer(request),
        )
        loop = asyncio.get_running_loop()
        if transport.get_extra_info("sslcontext") is None:
            # Plain TCP: the socket itself moves; our copy closes without a shutdown.
            sock = transport.get_extra_info("socket")
            try:
                workers.send(owner, sock.fileno(), record)
            except HandoffError as exc:
                self._detach_aiohttp(request, _Discard())
                transport.write(raw_error_response(
                    RpcProxyError(f"hand-off failed: {exc}", rpc_error=RPC_S_SERVER_TOO_BUSY)))
                transport.close()
                return
            self._detach_aiohttp(request, _Discard())
            transport.abort()
            return
        # TLS: keep the TLS connection here and relay its plaintext over a socketpair.
        ours, theirs = socket.socketpair()
        try:
            workers.send(owner, theirs.fileno(), record)
        finally:
            theirs.close()
        # Both ends know each other before the socketpair is read: the owner may answer
        # (an OUT channel's 200 and CONN/A3) before connect_accepted_socket returns here.
        client_side, pair_side = _Relay(), _Relay()
        client_side.transport = transport
        client_side.peer, pair_side.peer = pair_side, client_side
        await loop.connect_accepted_socket(lambda: pair_side, ours)
        self._detach_aiohttp(request, client_side)
        transport.resume_reading()

    def _on_handoff(self, sock: socket.socket, record: Handoff) -> None:
        asyncio.get_running_loop().create_task(self._adopt(sock, record))

    async def _adopt(self, sock: socket.socket, record: Handoff) -> None:
        """A sibling worker handed us a channel of a VC we own."""
        loop = asyncio.get_running_loop()
        kind_name = "IN" if record.method == RPC_IN_DATA else "OUT"
        try:
            transport, channel = await loop.connect_accepted_socket(
                lambda: ChannelProtocol(kind_name, None, record.body_left, "?"), sock)
            opening = channels.judge_opening(  # judged again: the record came over a socket
                channels.Method(record.method),
                len(record.pdu) + len(record.leftover) + record.body_left, record.pdu)
        except (OSError, ProtocolError, ValueError) as exc:
            log.warning("could not adopt a handed-off channel: %s", exc)
            sock.close()
            return
        self._attach(channel, opening, Identity(user=record.user, domain=record.domain),
                     Target(record.server, record.port),
                     Endpoint(record.backend_host, record.backend_port), record.peer,
                     record.leftover)


class _Discard(asyncio.Protocol):
    """Placeholder protocol for a transport that is about to be dropped."""


class _Relay(asyncio.Protocol):
    """One side of a byte pump between two transports (TLS hand-off to a sibling)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def _tune_gc() -> None:
    """Keep start-up objects out of the cyclic garbage collector's way.

    Everything alive once the listeners are up (modules, configuration) is
    frozen out of collection, so full collections walk only the virtual
    connections. The thresholds stay CPython's: measured with 5,000 VCs, a
    young generation of 20,000 objects made second-generation passes take up to
    190 ms, the default keeps them under 20 ms. Channels and backend protocols
    drop their runtime when their connection ends, so a closed VC is freed by
    reference counting, not by the collector.

    That is also why the VCs themselves can be frozen: CPython runs a full
    collection each time a quarter more objects have survived into the old
    generation, and it walks every VC: measured with 4,200 VCs in a worker, 190 ms
    of CPU and 600 ms of wall time in which no channel moved, again and again
    while clients connect. ``ProxyServer`` therefore freezes what is alive
    whenever the number of open VCs reaches a new high (FREEZE_FIRST, then
    FREEZE_GROWTH times the previous freeze): full collections then walk only
    what came since. Frozen objects are still freed by reference counting;
    only garbage in a reference cycle at the moment of a freeze would stay.
    """
    gc.collect()
    gc.freeze()


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Name the product, not the Python and aiohttp versions (scanners read that header)."""
    response.headers["Server"] = "rpcproxy"


async def _no_expect_handler(request: web.Request) -> None:
    """We send ``100 Continue`` ourselves, only after authentication succeeded."""
    return None


async def _read_proxy_header(sock: socket.socket) -> ProxyHeader:
    """Peek until a whole PROXY header is there, then consume exactly its bytes."""
    loop = asyncio.get_running_loop()
    while True:
        ready: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = ready) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())
        try:
            data = sock.recv(proxyproto.PEEK, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not data:
            raise ProxyHeaderError("connection closed before its PROXY header ended")
        header = proxyproto.parse(data)
        if header is None:
            await asyncio.sleep(0.01)  # a partial header stays readable: do not spin
            continue
        sock.recv(header.length)
        return header


def _host(request: web.Request) -> str:
    peer = _peer(request)
    return peer.rpartition(":")[0] or peer


def _source(request: web.Request) -> str:
    """The key per-source bounds count the request's client against."""
    return source_key(_host(request))


def _peer_name(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"


def _peer(request: web.Request) -> str:
    """host:port of the request's client (remembered by the protocol, so also after a loss)."""
    known = getattr(request.protocol, "peer", None)
    return known if isinstance(known, str) else _peer_name(request.transport)
