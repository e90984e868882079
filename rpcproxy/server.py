"""The request handler and the listeners: one HTTP request becomes an RPC-over-HTTP channel.

``ProxyServer`` owns the configuration, the authenticator, the VC registry and the
listeners; the rooms it uses are in ``rpcproxy.http``: ``wire`` (the bytes we write
ourselves), ``front`` and ``request_head`` (channel requests parsed and answered without
aiohttp's request path; ``handle`` takes a ``front.ChannelRequest``, which a
``web.Request`` is too), ``aiohttp_glue`` (every touch of aiohttp's internals and the guard
on unauthenticated connections), ``vc_io`` (a VC's channel and backend I/O), ``registry``
(open VCs, the GC freeze) and ``handoff`` (channels that belong to a sibling worker).

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
import logging
import socket
import ssl
import time
from collections.abc import Callable, Hashable

from aiohttp import web

from dcerpc.pdu import HEADER_LEN
from ntlm.http_auth import (
    Authenticated,
    Authenticator,
    AuthOutcome,
    Denied,
    HttpAuthenticator,
    Unavailable,
)
from ntlm.verifier import Identity
from ntlm.winbind import HelperPool, WinbindVerifier
from rpcproxy.autodiscover.service import AutodiscoverService
from rpcproxy.certs import load_cert_chain, server_ssl_context
from rpcproxy.config import Config
from rpcproxy.errors import (
    RPC_S_SERVER_TOO_BUSY,
    RPC_S_SERVER_UNAVAILABLE,
    ProtocolError,
    RpcProxyError,
    TargetRefused,
)
from rpcproxy.http import handoff
from rpcproxy.http.aiohttp_glue import (
    ConnectionGuard,
    host_of,
    no_expect_handler,
    server_header,
    source_of_peer,
    take_over,
)
from rpcproxy.http.aiohttp_glue import peer_of as _peer
from rpcproxy.http.aiohttp_glue import source_of as _source
from rpcproxy.http.front import ChannelRequest
from rpcproxy.http.handoff import Handoff, WorkerSet
from rpcproxy.http.registry import VcRegistry, tune_gc
from rpcproxy.http.vc_io import BackendConnect, ChannelProtocol, VcRuntime
from rpcproxy.http.wire import (
    ECHO_MAX_BODY,
    PATHS,
    RPC_CONNECT,
    RPC_IN_DATA,
    RPC_OUT_DATA,
    rpc_error_response,
    unauthorized_response,
)
from rpcproxy.metrics import ServerMetrics
from rpcproxy.ratelimit import Exemptions, Refusal, RefusalLog, unavailable_refusal
from rpcproxy.rpch import channels, rts
from rpcproxy.rpch.actions import Action, CloseChannel, VcClosed
from rpcproxy.rpch.channels import VcSettings
from rpcproxy.targets import AllowList, Endpoint, Target, parse_endpoint, parse_target_query

log = logging.getLogger("rpcproxy")


# How an authentication that could not be judged is counted among refusals.
def helper_pool(config: Config) -> HelperPool:
    """The pool of ntlm_auth helpers the configuration asks for."""
    return HelperPool(config.ntlm_helper, size=config.ntlm_helpers,
                      queue_timeout=config.auth_queue_timeout,
                      per_source=config.ntlm_helpers_per_source)


class ProxyServer:
    """Owns the configuration, the authenticator, the VC registry and the listeners."""

    def __init__(self, config: Config, *, authenticator: Authenticator | None = None,
                 workers: WorkerSet | None = None,
                 listen_sockets: list[socket.socket] | None = None) -> None:
        self.config = config
        self.workers = workers  # set in --workers mode: VCs are owned by cookie hash
        self.listen_sockets = listen_sockets  # pre-bound by the supervisor
        self.settings: VcSettings = config.vc_settings()
        self.allow_list: AllowList = config.allow_list()
        self.verifier = WinbindVerifier(helper_pool(config))
        self.authenticator: Authenticator = authenticator or HttpAuthenticator(self.verifier)
        self.guard = ConnectionGuard(config.max_unauthenticated_connections,
                                     config.handshake_timeout)
        self.guard.on_refused = self.refuse
        self.guard.front_handler = self.handle  # channel requests: rpcproxy.http.front
        self.refusals = RefusalLog()
        self._follow_bounds(config)
        self._refusal_timer: asyncio.TimerHandle | None = None
        # NTLM state is per TCP connection: drop it (and give back its helper) on close.
        self.guard.on_lost = self.authenticator.forget
        self.metrics = ServerMetrics()  # every event counter; rpcproxy.prometheus reads them
        self.registry = VcRegistry(self.metrics, _backend_connect(config))
        self.runner: web.AppRunner | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.bound_tls: list[bool] = []  # of each address start() returned: TLS or plain
        self.autodiscover = AutodiscoverService(self)  # /autodiscover/autodiscover.xml

    @property
    def vcs(self) -> dict[bytes, VcRuntime]:
        """Open VCs by cookie (the registry's)."""
        return self.registry.vcs

    @property
    def vcs_per_user(self) -> collections.Counter[Hashable]:
        """Open VCs per identity (the registry's)."""
        return self.registry.per_user

    # ---- lifecycle ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        for path in PATHS:
            app.router.add_route("*", path, self.handle, expect_handler=no_expect_handler)
        self.autodiscover.register(app)
        app.on_response_prepare.append(server_header)
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
        if self.config.tls_cert:
            self.ssl_context = self.make_ssl_context()
        for i, (address, tls) in enumerate(self.config.listen_addresses()):
            ctx = self.ssl_context if tls else None
            # TLS handshakes run under the guard: the connection is counted from accept.
            factory: Callable[[], asyncio.BaseProtocol]
            if ctx is None:
                factory = plain_factory
            elif self.config.tls_transport == "lean":
                # rpcproxy.tls: OpenSSL on the socket, no buffers that grow with traffic.
                factory = self.guard.lean_tls_protocol_factory(self.runner.server, ctx)
            else:
                factory = self.guard.tls_protocol_factory(self.runner.server, ctx)
            if self.config.proxy_protocol_from:
                factory = self.guard.proxy_protocol_factory(
                    self.runner.server, ctx, Exemptions(self.config.proxy_protocol_from),
                    factory, lean_tls=self.config.tls_transport == "lean")
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
                self.bound_tls.append(tls)
        if self.workers is not None:
            self.workers.start_receiving(loop, self._on_handoff)
        await self.autodiscover.start()
        tune_gc()
        return bound

    def make_ssl_context(self) -> ssl.SSLContext:
        assert self.config.tls_cert and self.config.tls_key
        return server_ssl_context(self.config.tls_cert, self.config.tls_key,
                                  session_tickets=self.config.tls_session_tickets)

    def apply(self, config: Config) -> None:
        """A reloaded configuration: new requests, VCs and connections follow it; live VCs
        keep their settings. Raises ConfigError or rpcproxy.certs.CertificateError (the
        key pair is checked first) before anything changes."""
        allow_list = config.allow_list()
        settings = config.vc_settings()
        if config.tls_cert and config.tls_key:
            server_ssl_context(config.tls_cert, config.tls_key)  # check the pair first
            if self.ssl_context is not None:  # else (not started yet) start() loads it
                load_cert_chain(self.ssl_context, config.tls_cert, config.tls_key)
                self.ssl_context.num_tickets = config.tls_session_tickets
        old, self.config = self.config, config
        self.allow_list = allow_list
        self.settings = settings
        self.registry.backend_connect = _backend_connect(config)
        if config.ntlm_helper != old.ntlm_helper:
            old_pool = self.verifier.pool
            self.verifier.pool = helper_pool(config)
            old_pool.close()  # handshakes under way finish on their helpers
        else:
            self.verifier.pool.size = config.ntlm_helpers
            self.verifier.pool.per_source = config.ntlm_helpers_per_source
            self.verifier.pool.queue_timeout = config.auth_queue_timeout
        self._follow_bounds(config)

    def _follow_bounds(self, config: Config) -> None:
        """The authentication and unauthenticated-connection bounds of ``config`` (at start
        and at each reload: the one place they are mapped)."""
        auth = self.authenticator
        if isinstance(auth, HttpAuthenticator):  # a plugged-in one keeps its own settings
            auth.allow_basic = config.allow_basic
            auth.basic_requires_tls = not config.basic_over_http
            auth.max_pending = config.max_pending_handshakes
            auth.max_pending_per_source = config.max_pending_handshakes_per_source
            auth.handshake_timeout = config.handshake_timeout
            auth.challenge_timeout = config.ntlm_challenge_timeout
        self.guard.limit = config.max_unauthenticated_connections
        self.guard.per_source_limit = config.max_unauthenticated_per_source
        self.guard.exempt = Exemptions(config.per_source_exempt)
        self.guard.timeout = config.handshake_timeout
        self.refusals.interval = config.refusal_log_interval

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

    def refuse_request(self, reason: Refusal, request: ChannelRequest, detail: str) -> None:
        """``refuse`` for a request's client (Autodiscover's too)."""
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

    # ---- request handling ---------------------------------------------------------------

    async def handle(self, request: ChannelRequest) -> web.StreamResponse:
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
            self.refuse_request(Refusal.CLIENT_GONE, request,
                                 f"{method}: client went away mid-request ({type(exc).__name__})")
            resp = web.Response(status=400)
            resp.force_close()
            return resp

    async def _handle_rpc(self, request: ChannelRequest) -> web.StreamResponse:
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
            self.metrics.targets_refused += 1
            self.refuse_request(Refusal.TARGET_REFUSED, request,
                                 f"target refused, user={identity.principal}: {exc.reason}")
            return rpc_error_response(exc)

        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        try:
            return await self._channel(request, identity, target, endpoint, length)
        except RpcProxyError as exc:
            self.refuse_request(Refusal.CHANNEL_REFUSED, request,
                                 f"{method} user={identity.principal}: {exc.reason}")
            return rpc_error_response(exc)

    def auth_source(self, request: ChannelRequest) -> str | None:
        """What a request's authentication counts against per source (None: exempt)."""
        return None if host_of(request) in self.guard.exempt else _source(request)

    async def judge_login(self, request: ChannelRequest, what: str = "") -> AuthOutcome:
        """The request's Authorization judged (over TLS or not, counted per source), timed and
        counted in the metrics; a refusal (unavailable, denied) goes to the refusal log as
        ``<what>authentication ...: reason``. Channel requests and Autodiscover are judged here."""
        authorization = request.headers.get("Authorization")
        if request.transport is None:  # the client left before its login could be judged
            # (not a refusal of its credentials; over TLS it would read "without TLS")
            raise ConnectionResetError("the client closed the connection")
        tls = request.transport.get_extra_info("sslcontext") is not None
        started = time.monotonic()
        outcome = await self.authenticator.authenticate(
            request.protocol, authorization, tls=tls, source=self.auth_source(request))
        self.metrics.auth_outcome(outcome, time.monotonic() - started,
                                  had_credentials=bool(authorization))
        if isinstance(outcome, Unavailable):
            self.refuse_request(unavailable_refusal(outcome.code), request,
                                f"{what}authentication unavailable: {outcome.reason}")
        elif isinstance(outcome, Denied):
            self.refuse_request(Refusal.AUTH_DENIED, request,
                                f"{what}authentication failed: {outcome.reason}")
        return outcome

    async def _authenticate(self, request: ChannelRequest) -> Identity | web.StreamResponse:
        outcome = await self.judge_login(request)
        if isinstance(outcome, Authenticated):
            self.guard.authenticated(request.protocol)
            return outcome.identity
        if isinstance(outcome, Unavailable):
            return rpc_error_response(
                RpcProxyError(outcome.reason, rpc_error=RPC_S_SERVER_TOO_BUSY
                              if outcome.code.our_bound else RPC_S_SERVER_UNAVAILABLE)
            )
        resp = unauthorized_response(outcome)
        length = request.content_length or 0
        if length > ECHO_MAX_BODY or isinstance(outcome, Denied) and length:
            # A channel-sized body cannot be drained: answer and close (protocol notes 3).
            resp.force_close()
        elif length:
            await request.content.read(length)
        return resp

    async def _echo(self, request: ChannelRequest, length: int) -> web.Response:
        if length:
            await request.content.readexactly(length)
        resp = web.Response(status=200, reason="Success", body=rts.ECHO,
                            content_type="application/rpc")
        return resp

    async def _read_opening_pdu(self, request: ChannelRequest, method: channels.Method,
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
        except RuntimeError:  # aiohttp's reader once the client has closed the connection
            if request.transport is not None and not request.transport.is_closing():
                raise
            raise ConnectionResetError("closed before its first RTS PDU") from None
        except TimeoutError:
            raise ProtocolError(
                f"no RTS PDU within {timeout:g}s of the channel request") from None
        return channels.judge_opening(method, length, head + rest)

    async def _channel(self, request: ChannelRequest, identity: Identity, target: Target,
                       endpoint: Endpoint, length: int) -> web.StreamResponse:
        """Open an IN or OUT channel (the core judges it), hand its transport over, serve it."""
        method = channels.Method(request.method)
        channels.check_content_length(method, length)  # refused before reading the body
        opening = await self._read_opening_pdu(request, method, length)
        self.authenticator.forget(request.protocol)  # no more requests on this connection
        if self.workers is not None and not self.workers.is_mine(opening.vc_cookie):
            failed = await handoff.hand_off(self.workers, request, opening, identity, target,
                                            endpoint)
            if failed is not None:
                self.refuse_request(Refusal.CHANNEL_REFUSED, request,
                                    f"{method.value} user={identity.principal}: hand-off to the "
                                    f"VC's worker failed: {failed}")
        else:
            kind_name = "IN" if method is channels.Method.IN else "OUT"
            channel, leftover = take_over(request, kind_name, opening.body_left)
            self._attach(channel, opening, identity, target, endpoint, _peer(request), leftover)
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
                self.refuse(Refusal.CHANNEL_REFUSED, source_of_peer(peer), peer,
                            f"{channel.kind} channel: {error.reason}")
                channel.close(error)
                return
            rt = self.registry.runtime_for(vc_cookie, identity, target, endpoint, peer,
                                           self.settings)
        else:
            found = self.vcs.get(vc_cookie)
            if found is None or found.closed:
                error = ProtocolError(f"{opening.kind.value} for an unknown virtual connection "
                                      "(R1 recycling to another proxy is not supported)")
                self.refuse(Refusal.CHANNEL_REFUSED, source_of_peer(peer), peer,
                            f"{channel.kind} channel user={identity.principal}: {error.reason}")
                channel.close(error)
                return
            rt = found
        channel.label = rt.label
        actions = rt.vc.open_channel(channel, opening, identity=identity, target=target,
                                     now=rt.now())
        refused = _refused_alone(actions, channel)
        if refused is not None:  # e.g. another user's VC cookie: the VC goes on, this is said
            self.refuse(Refusal.CHANNEL_REFUSED, source_of_peer(peer), peer,
                        f"{channel.kind} channel user={identity.principal} vc={rt.label}: "
                        f"{refused.reason}")
        channel.runtime = rt
        rt.execute(actions)
        early, channel._early = channel._early, b""
        if leftover or early:
            channel.data_received(leftover + early)

    def _on_handoff(self, sock: socket.socket, record: Handoff) -> None:
        asyncio.get_running_loop().create_task(self._adopt(sock, record))

    async def _adopt(self, sock: socket.socket, record: Handoff) -> None:
        """A sibling worker handed us a channel of a VC we own."""
        adopted = await handoff.adopt(sock, record)
        if adopted is not None:
            channel, opening = adopted
            self._attach(channel, opening, record.identity(), record.target(),
                         record.endpoint(), record.peer, record.leftover)


def _refused_alone(actions: list[Action], channel: ChannelProtocol) -> RpcProxyError | None:
    """Why the core refused ``channel`` on its own while its VC goes on (None if it did not:
    a VC that ends says why in its own log line)."""
    if any(isinstance(a, VcClosed) for a in actions):
        return None
    for action in actions:
        if isinstance(action, CloseChannel) and action.channel is channel and action.error:
            return action.error
    return None


def _backend_connect(config: Config) -> BackendConnect:
    return BackendConnect(config.backend_connect_timeout, config.backend_connect_retries)
