"""The asyncio/aiohttp adapter: HTTP channels, backend sockets, timers.

This is the only module that awaits. It turns HTTP requests into events for
``rpcproxy.connection.VirtualConnection`` and carries out the actions it
returns. Every action is carried out synchronously (bytes are queued on a
channel writer or written to a transport), so the order the state machine
chose is the order on the wire; the only awaits are the HTTP writes of each
OUT channel's own writer loop and back-pressure waits.

Per request (``handle``):
  method check -> HTTP authentication (ntlm.http_auth, bound to the TCP
  connection) -> echo (Content-Length <= 16) or channel: target allow-list ->
  ``100 Continue`` if asked -> first RTS PDU of the body -> attach to a VC by
  cookie -> IN: pump the body into the VC; OUT: run the channel's writer.

Bounds: unauthenticated connections are closed after ``handshake_timeout``
and their number is capped; a VC waits ``setup_timeout`` for its other
channel; backend connects time out and are retried a bounded number of times.
Authenticated channels have no body or idle timeout: they live for hours.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.http_parser
import aiohttp.web_protocol
from aiohttp import web

from ntlm.http_auth import Authenticated, Challenge, Denied, HttpAuthenticator, Unavailable
from ntlm.passthrough import Identity, NtlmVerifier
from rpcproxy import rts
from rpcproxy.config import Config
from rpcproxy.connection import (
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
    VcSettings,
    VirtualConnection,
)
from rpcproxy.errors import (
    RPC_S_SERVER_TOO_BUSY,
    RPC_S_SERVER_UNAVAILABLE,
    BackendUnavailable,
    ProtocolError,
    RpcProxyError,
    TargetRefused,
)
from rpcproxy.metrics import ServerMetrics
from rpcproxy.pdu import HEADER_LEN, parse_header
from rpcproxy.targets import AllowList, Endpoint, Target, parse_endpoint, parse_target_query

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
IN_MIN_CONTENT_LENGTH = 0x20000  # 128 KiB .. 2 GiB, rpch-notes 3.5
IN_MAX_CONTENT_LENGTH = 0x80000000
OUT_NEW_CONTENT_LENGTH = 76  # CONN/A1
OUT_SUCCESSOR_CONTENT_LENGTH = 120  # OUT_R2/A3 (96) + OUT_R2/C1 (24)
MAX_OPENING_PDU = 256  # the largest first PDU of a channel body is 104 bytes

OUT_QUEUE_HIGH = 1 << 20  # bytes queued on an OUT writer before the backend pauses
OUT_QUEUE_LOW = 256 << 10
BACKEND_READ_SIZE = 256 << 10


def rpc_error_response(error: RpcProxyError, *, close: bool = True) -> web.Response:
    """``503 RPC Error: <hex>`` ([MS-RPCH] 2.1.2.1.3) with the reason as body."""
    resp = web.Response(
        status=503,
        reason=f"RPC Error: {error.rpc_error:X}",
        text=f"RPC Error: {error.rpc_error:X}: {error.reason}\r\n",
    )
    if close:
        resp.force_close()
    return resp


# --- channel adapters ------------------------------------------------------------------------


class OutChannelWriter:
    """The HTTP response side of one OUT channel: an ordered queue and its writer loop."""

    def __init__(self, request: web.Request, label: str) -> None:
        self.request = request
        self.label = label
        self._items: deque[bytes | tuple[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self.queued = 0
        self._low = asyncio.Event()
        self._low.set()
        self.closed = False
        self.started = False

    def __repr__(self) -> str:
        return f"<OUT {self.label}>"

    def start(self, content_length: int) -> None:
        self._items.append(("start", content_length))
        self._wakeup.set()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self._items.append(data)
        self.queued += len(data)
        if self.queued > OUT_QUEUE_HIGH:
            self._low.clear()
        self._wakeup.set()

    def close(self, error: RpcProxyError | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._items.append(("close", error))
        self._wakeup.set()

    async def wait_low(self) -> None:
        await self._low.wait()

    async def run(self) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        items = self._items
        try:
            while True:
                if not items:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                item = items.popleft()
                if isinstance(item, bytes):
                    if resp is None:
                        continue  # nothing may precede the status line
                    self.queued -= len(item)
                    await resp.write(item)
                    if self.queued < OUT_QUEUE_LOW:
                        self._low.set()
                    continue
                verb, arg = item
                if verb == "start":
                    resp = web.StreamResponse(status=200, reason="Success")
                    resp.content_type = "application/rpc"
                    resp.content_length = int(arg)
                    resp.headers["Cache-Control"] = "private"
                    resp.force_close()
                    await resp.prepare(self.request)
                    self.started = True
                else:  # close
                    self._low.set()
                    if resp is None:
                        if isinstance(arg, RpcProxyError):
                            return rpc_error_response(arg)
                        return rpc_error_response(ProtocolError("channel closed"))
                    return resp
        except (ConnectionError, asyncio.CancelledError):
            self.closed = True
            self._low.set()
            raise


class InChannelReader:
    """The HTTP request side of one IN channel."""

    def __init__(self, request: web.Request, label: str) -> None:
        self.request = request
        self.label = label
        self.closed = False
        self.error: RpcProxyError | None = None

    def __repr__(self) -> str:
        return f"<IN {self.label}>"

    def close(self, error: RpcProxyError | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        # Wake the body pump; it then answers 503 (error) or just closes.
        self.request.content.set_exception(_ChannelClosedByProxy())


class _ChannelClosedByProxy(Exception):
    pass


class BackendProtocol(asyncio.Protocol):
    """The one backend TCP connection of a VC."""

    def __init__(self, runtime: VcRuntime) -> None:
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.runtime.on_backend_data(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        if not self.closing:
            self.runtime.on_backend_lost()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        await self._can_write.wait()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

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
    backend_read_throttled: bool = False  # by a full OUT writer queue
    closed: bool = False
    opened_at: float | None = None  # loop time CONN/A3 went out (metrics)

    @property
    def label(self) -> str:
        return str(uuid.UUID(bytes_le=self.vc.cookie))

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToClient):
                writer = action.channel
                assert isinstance(writer, OutChannelWriter)
                writer.send(action.data)
            elif isinstance(action, SendToBackend):
                if self.backend is not None:
                    self.backend.write(action.data)
            elif isinstance(action, StartResponse):
                writer = action.channel
                assert isinstance(writer, OutChannelWriter)
                writer.start(action.content_length)
                if self.opened_at is None:  # the first A3: the VC is open
                    self.opened_at = self.now()
                    self.server.metrics.vc_opened(self.opened_at - self.vc.created)
            elif isinstance(action, CloseChannel):
                ch = action.channel
                assert isinstance(ch, OutChannelWriter | InChannelReader)
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
        self._arm_timer()

    def _apply_backend_reading(self) -> None:
        backend = self.backend
        if backend is None or backend.transport is None or backend.closing:
            return
        if self.backend_read_paused or self.backend_read_throttled:
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
                self.now(),
            )
        )

    def on_backend_data(self, data: bytes) -> None:
        self.execute(self.vc.backend_data(data, self.now()))
        out = self.vc.out
        if out is not None and isinstance(out.channel, OutChannelWriter):
            writer = out.channel
            if writer.queued > OUT_QUEUE_HIGH and not self.backend_read_throttled:
                self.backend_read_throttled = True
                self._apply_backend_reading()
                asyncio.get_running_loop().create_task(self._unthrottle(writer))

    async def _unthrottle(self, writer: OutChannelWriter) -> None:
        await writer.wait_low()
        self.backend_read_throttled = False
        self._apply_backend_reading()

    def on_backend_lost(self) -> None:
        self.execute(self.vc.backend_closed(self.now()))

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
        self.timer = asyncio.get_running_loop().call_at(deadline + 0.001, self._on_timer)

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
        log.info(
            "vc=%s closed user=%s target=%s client=%s duration=%.1fs up=%d down=%d how=%s",
            self.label, user, vc.target, self.client, time.time() - self.started_wall,
            vc.traffic.client_to_backend, vc.traffic.backend_to_client, action.reason,
        )
        self.server.metrics.vc_closed(action.reason, action.error, vc.traffic.client_to_backend,
                                      vc.traffic.backend_to_client)


# --- the server ------------------------------------------------------------------------------


class ConnectionGuard:
    """Bounds TCP connections that have not authenticated yet.

    Each new connection gets ``timeout`` seconds to complete HTTP
    authentication; at most ``limit`` may be unauthenticated at once (beyond
    that a new connection is closed at once). This covers what aiohttp does
    not: a peer that connects and never sends (or never finishes) a request.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.pending: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self.trusted: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self.rejected = 0
        self.expired = 0
        self.on_lost: Callable[[asyncio.BaseTransport], None] | None = None

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that reports new connections here."""
        guard = self
        loop = asyncio.get_running_loop()
        kwargs = server._kwargs  # what web.Server.__call__ passes to its RequestHandler

        class GuardedRequestHandler(aiohttp.web_protocol.RequestHandler):
            __slots__ = ()

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                guard.admit(transport)

            def connection_lost(self, exc: BaseException | None) -> None:
                transport = self.transport
                super().connection_lost(exc)
                if transport is not None and guard.on_lost is not None:
                    guard.on_lost(transport)

        def make() -> asyncio.Protocol:
            return GuardedRequestHandler(server, loop=loop, **kwargs)

        return make

    def admit(self, transport: asyncio.BaseTransport) -> None:
        if len(self.pending) >= self.limit:
            self.rejected += 1
            log.warning("too many unauthenticated connections (%d): refusing one", self.limit)
            transport.close()
            return
        self.pending.add(transport)
        asyncio.get_running_loop().call_later(self.timeout, self._expire, weakref.ref(transport))

    def authenticated(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None and transport not in self.trusted:
            self.trusted.add(transport)
            self.pending.discard(transport)

    def _expire(self, ref: weakref.ref[asyncio.BaseTransport]) -> None:
        transport = ref()
        if transport is None or transport in self.trusted:
            return
        self.pending.discard(transport)
        if not transport.is_closing():
            self.expired += 1
            transport.close()


class ProxyServer:
    """Owns the configuration, the authenticator, the VC registry and the listeners."""

    def __init__(self, config: Config, *, authenticator: HttpAuthenticator | None = None) -> None:
        self.config = config
        self.settings: VcSettings = config.vc_settings()
        self.allow_list: AllowList = config.allow_list()
        ntlm_ep = config.ntlm_endpoint()
        self.verifier = NtlmVerifier((ntlm_ep.host, ntlm_ep.port))
        self.authenticator = authenticator or HttpAuthenticator(
            self.verifier,
            allow_basic=config.allow_basic,
            basic_requires_tls=not config.basic_over_http,
            max_pending=config.max_pending_handshakes,
            handshake_timeout=config.handshake_timeout,
        )
        self.guard = ConnectionGuard(config.max_unauthenticated_connections,
                                     config.handshake_timeout)
        # NTLM state is per TCP connection: drop it (and any Samba socket) on close.
        self.guard.on_lost = self.authenticator.forget
        self.vcs: dict[bytes, VcRuntime] = {}
        self.stats: dict[str, int] = {
            "backend_connect_failures": 0,
            "vcs_opened": 0,
            "auth_denied": 0,
            "targets_refused": 0,
        }
        self.runner: web.AppRunner | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.metrics = ServerMetrics()  # event counters; rpcproxy.metrics reads the rest

    # ---- lifecycle ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        for path in PATHS:
            app.router.add_route("*", path, self.handle, expect_handler=_no_expect_handler)
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
        factory = self.guard.protocol_factory(self.runner.server)
        bound: list[tuple[str, int]] = []
        listeners: list[tuple[str, ssl.SSLContext | None]] = []
        if self.config.tls_cert:
            self.ssl_context = self.make_ssl_context()
            listeners.append((self.config.listen, self.ssl_context))
            if self.config.http_listen:
                listeners.append((self.config.http_listen, None))
        else:
            listeners.append((self.config.listen, None))
        for address, ctx in listeners:
            ep = parse_endpoint(address, "listen", listen=True)
            server = await loop.create_server(factory, ep.host, ep.port, ssl=ctx, backlog=4096)
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append((host, port))
        return bound

    def make_ssl_context(self) -> ssl.SSLContext:
        from rpcproxy.certs import server_ssl_context  # TLS 1.2+, AEAD ciphers only

        assert self.config.tls_cert and self.config.tls_key
        return server_ssl_context(self.config.tls_cert, self.config.tls_key)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, close every VC cleanly, then stop the HTTP machinery."""
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        for rt in list(self.vcs.values()):
            rt.execute(rt.vc.close("server shutting down", loop.time()))
        if self.runner is not None:
            await self.runner.shutdown()
            await self.runner.cleanup()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), grace)
            except TimeoutError:
                pass
        self.servers.clear()

    def forget_vc(self, rt: VcRuntime) -> None:
        if self.vcs.get(rt.vc.cookie) is rt:
            del self.vcs[rt.vc.cookie]

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
            log.warning("refused target from %s user=%s: %s", _peer(request),
                        identity.principal, exc.reason)
            return rpc_error_response(exc)

        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        try:
            if method == RPC_IN_DATA:
                return await self._in_channel(request, identity, target, endpoint, length)
            return await self._out_channel(request, identity, target, endpoint, length)
        except RpcProxyError as exc:
            log.warning("%s from %s user=%s refused: %s", method, _peer(request),
                        identity.principal, exc.reason)
            return rpc_error_response(exc)

    async def _authenticate(self, request: web.Request) -> Identity | web.StreamResponse:
        tls = request.transport is not None and request.transport.get_extra_info(
            "sslcontext") is not None
        started = time.monotonic()
        outcome = await self.authenticator.authenticate(
            request.transport, request.headers.get("Authorization"), tls=tls
        )
        self.metrics.auth_outcome(outcome, time.monotonic() - started,
                                  had_credentials=bool(request.headers.get("Authorization")))
        if isinstance(outcome, Authenticated):
            self.guard.authenticated(request.transport)
            return outcome.identity
        if isinstance(outcome, Unavailable):
            log.warning("authentication unavailable for %s: %s", _peer(request), outcome.reason)
            return rpc_error_response(
                RpcProxyError(outcome.reason, rpc_error=RPC_S_SERVER_TOO_BUSY
                              if "too many" in outcome.reason else RPC_S_SERVER_UNAVAILABLE)
            )
        headers: list[tuple[str, str]] = [("WWW-Authenticate", v)
                                          for v in outcome.www_authenticate]
        if isinstance(outcome, Denied):
            self.stats["auth_denied"] += 1
            log.warning("authentication failed for %s: %s", _peer(request), outcome.reason)
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

    async def _read_opening_pdu(self, request: web.Request) -> tuple[rts.RtsPdu, rts.Kind]:
        try:
            head = await request.content.readexactly(HEADER_LEN)
            header = parse_header(head)
            if header.frag_length > MAX_OPENING_PDU:
                raise ProtocolError(f"first PDU of a channel is {header.frag_length} bytes long")
            rest = await request.content.readexactly(header.frag_length - HEADER_LEN)
        except asyncio.IncompleteReadError:
            raise ProtocolError("the channel body ended before its first RTS PDU") from None
        pdu = rts.decode_rts(head + rest)
        return pdu, rts.identify(pdu)

    def _runtime_for(self, cookie: bytes, identity: Identity, target: Target,
                     endpoint: Endpoint, request: web.Request) -> tuple[VcRuntime, bool]:
        rt = self.vcs.get(cookie)
        if rt is not None and not rt.closed:
            return rt, False
        vc = VirtualConnection(
            cookie, identity=identity, target=target, settings=self.settings,
            now=asyncio.get_running_loop().time(),
        )
        rt = VcRuntime(self, vc, endpoint, _peer(request))
        self.vcs[cookie] = rt
        self.stats["vcs_opened"] += 1
        return rt, True

    async def _out_channel(self, request: web.Request, identity: Identity, target: Target,
                           endpoint: Endpoint, length: int) -> web.StreamResponse:
        if length not in (OUT_NEW_CONTENT_LENGTH, OUT_SUCCESSOR_CONTENT_LENGTH):
            raise ProtocolError(f"RPC_OUT_DATA with Content-Length {length} (want 76 or 120)")
        pdu, kind = await self._read_opening_pdu(request)
        now = asyncio.get_running_loop().time()
        vc_cookie = rts.cookies(pdu)[0] if kind in (rts.Kind.CONN_A1, rts.Kind.OUT_R2_A3) else b""
        if kind is rts.Kind.CONN_A1 and length == OUT_NEW_CONTENT_LENGTH:
            rt, _ = self._runtime_for(vc_cookie, identity, target, endpoint, request)
            writer = OutChannelWriter(request, rt.label)
            rt.execute(rt.vc.open_out(writer, pdu, identity=identity, target=target, now=now))
            return await self._run_out(writer)
        if kind is rts.Kind.OUT_R2_A3 and length == OUT_SUCCESSOR_CONTENT_LENGTH:
            rt_or_none = self.vcs.get(vc_cookie)
            if rt_or_none is None:
                raise ProtocolError("OUT_R2/A3 for an unknown virtual connection "
                                    "(R1 recycling to another proxy is not supported)")
            rt = rt_or_none
            writer = OutChannelWriter(request, rt.label)
            rt.execute(rt.vc.open_out_successor(writer, pdu, identity=identity,
                                                target=target, now=now))
            if not writer.closed:
                asyncio.get_running_loop().create_task(self._read_c1(request, rt, writer))
            return await self._run_out(writer)
        raise ProtocolError(f"{kind.value} cannot open an OUT channel of Content-Length {length}")

    async def _read_c1(self, request: web.Request, rt: VcRuntime,
                       writer: OutChannelWriter) -> None:
        try:
            data = await request.content.readexactly(len(rts.OUT_R2_C1))
        except (asyncio.IncompleteReadError, ConnectionError, _ChannelClosedByProxy):
            if not writer.closed:
                rt.execute(rt.vc.channel_closed(writer, rt.now()))
            return
        except Exception:  # noqa: BLE001 - a closed request may raise anything aiohttp has
            return
        rt.execute(rt.vc.out_request_data(writer, data, rt.now()))

    async def _run_out(self, writer: OutChannelWriter) -> web.StreamResponse:
        try:
            return await writer.run()
        except (ConnectionError, asyncio.CancelledError):
            self._channel_gone(writer)
            raise

    def _channel_gone(self, channel: OutChannelWriter | InChannelReader) -> None:
        for rt in list(self.vcs.values()):
            if channel in rt.vc.channels():
                rt.execute(rt.vc.channel_closed(channel, rt.now()))
                return

    async def _in_channel(self, request: web.Request, identity: Identity, target: Target,
                          endpoint: Endpoint, length: int) -> web.StreamResponse:
        if not IN_MIN_CONTENT_LENGTH <= length <= IN_MAX_CONTENT_LENGTH:
            raise ProtocolError(f"RPC_IN_DATA with Content-Length {length} "
                                "(want 128 KiB..2 GiB)")
        pdu, kind = await self._read_opening_pdu(request)
        now = asyncio.get_running_loop().time()
        if kind is rts.Kind.CONN_B1:
            rt, _ = self._runtime_for(rts.cookies(pdu)[0], identity, target, endpoint, request)
            reader = InChannelReader(request, rt.label)
            rt.execute(rt.vc.open_in(reader, pdu, identity=identity, target=target, now=now))
        elif kind is rts.Kind.IN_R2_A1:
            rt_or_none = self.vcs.get(rts.cookies(pdu)[0])
            if rt_or_none is None:
                raise ProtocolError("IN_R2/A1 for an unknown virtual connection "
                                    "(R1 recycling to another proxy is not supported)")
            rt = rt_or_none
            reader = InChannelReader(request, rt.label)
            rt.execute(rt.vc.open_in_successor(reader, pdu, identity=identity,
                                               target=target, now=now))
        else:
            raise ProtocolError(f"{kind.value} cannot open an IN channel")
        return await self._pump_in(request, rt, reader)

    async def _pump_in(self, request: web.Request, rt: VcRuntime,
                       reader: InChannelReader) -> web.StreamResponse:
        content = request.content
        try:
            while not reader.closed:
                data = await content.readany()
                if not data:
                    rt.execute(rt.vc.channel_closed(reader, rt.now()))
                    break
                rt.execute(rt.vc.in_data(reader, data, rt.now()))
                backend = rt.backend
                if backend is not None and not backend._can_write.is_set():
                    await backend.drain()
        except _ChannelClosedByProxy:
            pass
        except ConnectionError:
            # The client went away: the VC decides what that means (teardown, or
            # nothing for a predecessor). There is nobody left to answer.
            if not reader.closed:
                rt.execute(rt.vc.channel_closed(reader, rt.now()))
            resp = web.Response(status=200, reason="Success")
            resp.force_close()
            return resp
        except asyncio.CancelledError:
            if not reader.closed:
                rt.execute(rt.vc.channel_closed(reader, rt.now()))
            raise
        if reader.error is not None:
            return rpc_error_response(reader.error)
        resp = web.Response(status=200, reason="Success")
        resp.force_close()
        return resp


async def _no_expect_handler(request: web.Request) -> None:
    """We send ``100 Continue`` ourselves, only after authentication succeeded."""
    return None


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"
