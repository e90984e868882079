"""Every touch of aiohttp's internals, and the guard on connections that have not authenticated.

aiohttp (or, for a channel request, rpcproxy.http.front) serves the HTTP part of a channel
(request line, headers, authentication, the first RTS PDU); rpcproxy then takes the
connection's transport away from it. What that needs from aiohttp beyond its public API
lives here and nowhere else:

* the request parser swap at import (``HttpRequestParserPy``: llhttp rejects the
  RPC_IN_DATA / RPC_OUT_DATA methods);
* a ``RequestHandler`` subclass made with ``web.Server._kwargs``, so that every accepted
  connection is counted by ``ConnectionGuard`` and a client's malformed request is one
  refusal, not a traceback;
* the front: the handler starts each connection as a ``rpcproxy.http.front.FrontConnection``
  (channel requests parsed and answered by rpcproxy itself) and becomes aiohttp's own at its
  first request that is not ours;
* the hand-over: ``take_over`` drains what aiohttp buffered, gives the transport to a
  ``ChannelProtocol`` and fakes ``connection_lost`` so that aiohttp frees the request.

``ConnectionGuard`` is here because it is, at its core, that RequestHandler factory (plain,
TLS, lean TLS and PROXY-protocol listeners all make their handlers through it).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any, cast

import aiohttp.http_exceptions
import aiohttp.http_parser
import aiohttp.tcp_helpers
import aiohttp.web_protocol
from aiohttp import web

from rpcproxy import proxyproto
from rpcproxy.http.front import ChannelHandler, ChannelRequest, FrontConnection
from rpcproxy.http.request_head import HeadLimits
from rpcproxy.http.vc_io import ChannelProtocol
from rpcproxy.proxyproto import ProxyHeader, ProxyHeaderError
from rpcproxy.ratelimit import Exemptions, Refusal, source_key
from rpcproxy.tls import TlsConnection

# aiohttp's C parser (llhttp) only knows the registered HTTP methods and rejects
# RPC_IN_DATA / RPC_OUT_DATA with "Invalid method". The pure-Python request
# parser accepts any RFC 9110 token; it only parses headers, the channel bodies
# pass through it in large chunks. tests/http/test_server_http.py guards this.
aiohttp.web_protocol.HttpRequestParser = aiohttp.http_parser.HttpRequestParserPy  # type: ignore[attr-defined]


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
        # Serves the channel requests of a connection before aiohttp (rpcproxy.http.front);
        # None: aiohttp serves every request.
        self.front_handler: ChannelHandler | None = None
        self.on_refused: Callable[[Refusal, str, str, str], None] | None = None

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that reports new connections here."""
        guard = self
        loop = asyncio.get_running_loop()
        kwargs = server._kwargs  # what web.Server.__call__ passes to its RequestHandler
        limits: list[HeadLimits] = []  # the front's, within this server's aiohttp limits

        class GuardedRequestHandler(aiohttp.web_protocol.RequestHandler):
            """aiohttp's handler, counted by the guard; it starts as a ``FrontConnection``
            (``rpcproxy.http.front``) when the guard has a ``front_handler``, and becomes
            aiohttp's own at the connection's first request that is not ours."""

            __slots__ = ("__weakref__", "admitted", "front", "peer")

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                handler = guard.front_handler
                if handler is None:
                    self.front = None
                    super().connection_made(transport)
                else:
                    tr = cast(asyncio.Transport, transport)
                    aiohttp.tcp_helpers.tcp_nodelay(tr, True)
                    if self._tcp_keepalive:
                        aiohttp.tcp_helpers.tcp_keepalive(tr)
                    self.transport = tr
                    if self._manager is not None:  # server shutdown reaches it (shutdown)
                        self._manager.connection_made(self, tr)
                    if not limits:  # (the same for every handler of this server)
                        limits.append(HeadLimits.within(self.max_line_size, self.max_field_size,
                                                        self.max_headers))
                    self.front = FrontConnection(self, tr, handler, limits[0],
                                                 self._keepalive_timeout, self._to_aiohttp)
                if not getattr(self, "peer", None):  # (set already from a PROXY header)
                    self.peer = peer_name(transport)  # still known once the transport is gone
                if not getattr(self, "admitted", False):
                    self.admitted = True
                    guard.admit(self, transport)

            def _to_aiohttp(self, data: bytes, keepalive_at: float) -> None:
                """The front met a request that is not ours: aiohttp has the connection
                from here, with the bytes buffered so far and the same keep-alive deadline."""
                transport = self.transport
                self.front = None
                if transport is None or transport.is_closing():
                    return
                super().connection_made(transport)
                if self._keepalive_handle is not None and keepalive_at:
                    self._keepalive_handle.cancel()
                    self._next_keepalive_close_time = keepalive_at
                    self._keepalive_handle = loop.call_at(keepalive_at, self._process_keepalive)
                if data:
                    super().data_received(data)

            def data_received(self, data: bytes) -> None:
                front = self.front
                if front is not None:
                    front.data_received(data)
                else:
                    super().data_received(data)

            def connection_lost(self, exc: BaseException | None) -> None:
                front = self.front
                if front is not None:
                    front.connection_lost(exc)
                    self.transport = None
                    if self._manager is not None:
                        self._manager.connection_lost(self, exc)
                else:
                    super().connection_lost(exc)
                guard.lost(self)
                if guard.on_lost is not None:
                    guard.on_lost(self)

            def pause_writing(self) -> None:
                super().pause_writing()
                if self.front is not None:
                    self.front.pause_writing()

            def resume_writing(self) -> None:
                super().resume_writing()
                if self.front is not None:
                    self.front.resume_writing()

            def close(self) -> None:
                if self.front is not None:
                    self.front.close()
                else:
                    super().close()

            async def shutdown(self, timeout: float | None = 15.0) -> None:
                if self.front is not None:
                    await self.front.shutdown(timeout)
                else:
                    await super().shutdown(timeout)

            def log_exception(self, *args: Any, **kw: Any) -> None:
                exc = kw.get("exc_info")
                if isinstance(exc, BaseException) and guard.client_fault(self, exc):
                    return  # the client's doing: one aggregated line, no traceback
                super().log_exception(*args, **kw)

        def make() -> asyncio.Protocol:
            handler = GuardedRequestHandler(server, loop=loop, **kwargs)
            handler.front = None
            return handler

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
        """``tls_protocol_factory`` with rpcproxy.tls's lean transport: the accepted socket
        is taken from its first transport (counted here from accept, as for the loop's TLS)
        and runs TLS in a ``TlsConnection``, which makes the request handler's connection
        once the handshake is done; one that fails or times out is forgotten at once."""
        make_handler = self.protocol_factory(server)
        guard = self

        class LeanTlsAccept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                handler = make_handler()
                sock = guard.take_socket(handler, transport)
                if sock is not None:
                    guard.lean_tls(handler, sock, ctx)

        return LeanTlsAccept

    def lean_tls(self, handler: asyncio.BaseProtocol, sock: socket.socket,
                 ctx: ssl.SSLContext) -> None:
        """Run TLS on ``sock`` (already counted under ``handler``) in a ``TlsConnection``."""
        guard = self
        backstop = self.timeout + 5.0  # the guard's own timer ends a late handshake first

        class GuardedTls(TlsConnection):
            __slots__ = ()

            def handshake_timed_out(self) -> None:
                guard.tls_gave_up(handler, Refusal.TLS_TIMEOUT,
                                  f"TLS handshake not done within {backstop:g}s")

            def handshake_failed(self, reason: str) -> None:
                guard.tls_gave_up(handler, Refusal.TLS_FAILED, f"TLS handshake failed: {reason}")

            def tls_failed(self, what: str, reason: str) -> None:
                guard.refuse_peer(Refusal.TLS_ERROR, getattr(handler, "peer", None) or self._peer(),
                                  f"TLS {what} the client: {reason}")

            def closed(self) -> None:
                guard.handshakes.pop(handler, None)
                guard.lost(handler)  # (already gone if the handler saw the connection)

        def handshake_done() -> asyncio.BaseProtocol:
            guard.handshakes.pop(handler, None)
            return handler

        try:
            conn = GuardedTls(sock, ctx, handshake_done, backstop)
        except (OSError, ValueError) as exc:  # the client left before it could be wrapped
            sock.close()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            # (tls_gave_up also forgets the entry a PROXY header's wait left)
            self.tls_gave_up(handler, Refusal.TLS_FAILED, f"TLS handshake failed: {why}")
            return
        # Late: the guard ends it like a loop TLS handshake (cancel = abort).
        self.handshakes[handler] = (cast("asyncio.Task[None]", _Abort(conn)),
                                    cast(socket.socket, _NoSocket), Refusal.TLS_TIMEOUT)

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
                               otherwise: Callable[[], asyncio.Protocol], *,
                               lean_tls: bool = False) -> Callable[[], asyncio.Protocol]:
        """A listener that takes a PROXY protocol header (``rpcproxy.proxyproto``) from the
        ``trusted`` addresses, and serves every other address with ``otherwise``.

        From a trusted address the socket is taken from its first transport before a byte
        is read (as for TLS), the header is peeked at and exactly its bytes consumed, the
        connection is counted under the client's address it names, and then the loop gets
        the socket back (with TLS on a TLS listener): the request handler, the logs and
        the per-source bounds see the client's address, never the front proxy's. TLS after
        the header runs in rpcproxy.tls's ``TlsConnection`` with ``lean_tls``.
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
                    guard._proxied(handler, sock, ctx, lean_tls))
                guard.handshakes[handler] = (task, sock, Refusal.PROXY_HEADER)

        return ProxyAccept

    async def _proxied(self, handler: asyncio.BaseProtocol, sock: socket.socket,
                       ctx: ssl.SSLContext | None, lean_tls: bool) -> None:
        loop = asyncio.get_running_loop()
        entry = self.pending.get(handler)
        try:
            header = await read_proxy_header(sock)
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
        if ctx is not None and lean_tls:
            self.lean_tls(handler, sock, ctx)  # (its own entry replaces the header's)
            return
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
        self.refuse_peer(reason, getattr(protocol, "peer", None) or "?", detail)
        return True

    def refuse_peer(self, reason: Refusal, peer: str, detail: str) -> None:
        """One refusal of the client named ``host:port`` (aggregated, rate-limited)."""
        if self.on_refused is not None:
            self.on_refused(reason, source_of_peer(peer), peer, detail)

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


# ---- the hand-over of a request's transport ----------------------------------------------


def drain_body(request: ChannelRequest) -> bytes:
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


def detach_aiohttp(request: ChannelRequest, protocol: asyncio.BaseProtocol) -> None:
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


def take_over(request: ChannelRequest, kind: str, body_left: int) -> tuple[ChannelProtocol, bytes]:
    """Switch the request's transport to a ChannelProtocol (see its docstring);
    ConnectionResetError if the client has already left (its transport is gone)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client closed the connection")
    leftover = drain_body(request)
    channel = ChannelProtocol(kind, transport, body_left, "?")
    detach_aiohttp(request, channel)
    if transport.is_closing():
        channel.closed = True
    else:
        transport.resume_reading()
    return channel, leftover


# ---- small aiohttp hooks and peer names -----------------------------------------------------


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Name the product, not the Python and aiohttp versions (scanners read that header)."""
    response.headers["Server"] = "rpcproxy"


async def no_expect_handler(request: web.Request) -> None:
    """We send ``100 Continue`` ourselves, only after authentication succeeded."""
    return None


async def read_proxy_header(sock: socket.socket) -> ProxyHeader:
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


def _host_of_peer(peer: str) -> str:
    return peer.rpartition(":")[0] or peer


def host_of(request: ChannelRequest) -> str:
    return _host_of_peer(peer_of(request))


def source_of_peer(peer: str) -> str:
    """The key per-source bounds count a client named ``host:port`` against."""
    return source_key(_host_of_peer(peer))


def source_of(request: ChannelRequest) -> str:
    """The key per-source bounds count the request's client against."""
    return source_of_peer(peer_of(request))


def peer_name(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"


def peer_of(request: ChannelRequest) -> str:
    """host:port of the request's client (remembered by the protocol, so also after a loss)."""
    known = getattr(request.protocol, "peer", None)
    return known if isinstance(known, str) else peer_name(request.transport)
