"""The aiohttp adapter for Autodiscover: ``/autodiscover/autodiscover.xml`` and the
optional port-80 redirect listener. Protocol decisions live in ``pox`` and ``settings``.

Per request (any letter case in the path, as Outlook sends ``/Autodiscover/Autodiscover.xml``):

1. the body: refused unread (and the connection closed after the answer) when chunked or
   longer than ``max_body``; else read within ``body_timeout``;
2. authentication with the proxy's own ``HttpAuthenticator`` (NTLM passed through to
   Samba, Basic over TLS): anything but success is a 401 with the same offers as the
   channels, and nothing more happens: the directory is not asked;
3. only then: method POST, the POX request (``pox.parse_request``), the directory lookup,
   and the rule that a user discovers only their own mailbox: the entry found for the
   address must be the authenticated account (sAMAccountName and NetBIOS domain);
4. the settings response, or the protocol's error response (HTTP 200, ErrorCode
   500/600/601/603); one log line for each refusal, never a traceback.

An Autodiscover connection is never marked authenticated in the connection guard, so
the guard still closes it ``handshake_timeout`` after it was opened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import zlib
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from ntlm.http_auth import Authenticated, AuthOutcome, Unavailable
from ntlm.verifier import Identity
from rpcproxy.autodiscover import pox
from rpcproxy.autodiscover.directory import (
    Directory,
    DirectoryEntry,
    DirectoryUnavailable,
    LdapDirectory,
)
from rpcproxy.autodiscover.settings import (
    AutodiscoverTable,
    CertNames,
    common_name,
    derive,
    legacy_dn,
    parse_table,
)
from rpcproxy.http.aiohttp_glue import ConnectionGuard, peer_of
from rpcproxy.http.wire import unauthorized_response
from rpcproxy.ratelimit import Refusal

if TYPE_CHECKING:
    from rpcproxy.config import Config

log = logging.getLogger("rpcproxy.autodiscover")

ROUTE = r"/{_a:(?i:autodiscover)}/{_b:(?i:autodiscover\.xml)}"
PUBLIC_PATH = "/Autodiscover/Autodiscover.xml"


def cert_names(config: Config) -> CertNames | None:
    if not config.tls_cert:
        return None
    from rpcproxy.certs import CertificateError, inspect_certificate

    try:
        info = inspect_certificate(config.tls_cert)
    except CertificateError:
        return None
    return CertNames(common_name(info.subject), info.dns_names)


@dataclasses.dataclass(frozen=True)
class Resolved:
    table: AutodiscoverTable
    response: pox.ResponseSettings


def resolve(config: Config) -> Resolved:
    table = parse_table(config.autodiscover)
    return Resolved(table, derive(table, config.server_names, cert_names(config)))


class AutodiscoverHost(Protocol):
    """What the endpoint uses of the proxy it runs in (``rpcproxy.server.ProxyServer``)."""

    @property
    def config(self) -> Config: ...

    async def judge_login(self, request: web.Request, what: str = "") -> AuthOutcome:
        """Judge the request's Authorization, count it, log a refusal prefixed ``what``."""

    def refuse_request(self, reason: Refusal, request: web.Request, detail: str) -> None:
        """Count a refused client and log it through the rate-limited refusal log."""


class AutodiscoverService:
    def __init__(self, server: AutodiscoverHost, directory: Directory | None = None) -> None:
        self.server = server
        self._fixed_directory = directory
        self._directory: Directory | None = directory
        self._directory_table: AutodiscoverTable | None = None
        self._resolved: tuple[Config, Resolved] | None = None
        self._redirect_servers: list[asyncio.AbstractServer] = []
        self._redirect_http: web.Server | None = None
        self.redirect_bound: list[tuple[str, int]] = []

    # ---- settings follow the server's (reloadable) configuration ------------------------

    def resolved(self) -> Resolved:
        config = self.server.config
        if self._resolved is None or self._resolved[0] is not config:
            self._resolved = (config, resolve(config))
        return self._resolved[1]

    def directory(self, table: AutodiscoverTable) -> Directory:
        if self._fixed_directory is not None:
            return self._fixed_directory
        ldap_keys = [f.name for f in dataclasses.fields(AutodiscoverTable)
                     if f.name.startswith(("ldap_", "netbios", "realm", "max_concurrent"))]
        old = self._directory_table
        if self._directory is None or old is None or any(
                getattr(old, k) != getattr(table, k) for k in ldap_keys):
            if isinstance(self._directory, LdapDirectory):
                self._directory.close()  # a reload changed it: its threads go
            self._directory = LdapDirectory(table)
            self._directory_table = table
        return self._directory

    # ---- routes -------------------------------------------------------------------------

    def register(self, app: web.Application) -> None:
        app.router.add_route("*", ROUTE, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = peer_of(request)
        resolved = self.resolved()
        table = resolved.table
        if not table.enabled:
            return web.Response(status=404, text="Autodiscover is not enabled here\r\n")
        length = request.content_length or 0
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        oversized = chunked or length > table.max_body
        body = b""
        if not oversized and length:
            try:
                async with asyncio.timeout(table.body_timeout):
                    body = await request.content.readexactly(length)
            except TimeoutError:
                self.server.refuse_request(
                    Refusal.BAD_REQUEST, request,
                    f"autodiscover: request body not received within {table.body_timeout:g}s")
                return self._error(pox.ErrorCode.INVALID_REQUEST, close=True)
            except asyncio.IncompleteReadError:
                self.server.refuse_request(Refusal.CLIENT_GONE, request,
                                           "autodiscover: request body ended early")
                return self._error(pox.ErrorCode.INVALID_REQUEST, close=True)

        identity_or_response = await self._authenticate(request, close=oversized)
        if isinstance(identity_or_response, web.StreamResponse):
            return identity_or_response
        identity = identity_or_response

        if oversized:
            log.warning("autodiscover from %s user=%s: request body of %s bytes refused "
                        "(max_body %d)", peer, identity.principal,
                        "chunked" if chunked else length, table.max_body)
            return self._error(pox.ErrorCode.INVALID_REQUEST, close=True)
        if request.method != "POST":
            log.info("autodiscover from %s user=%s: %s is not a request", peer,
                     identity.principal, request.method)
            return self._error(pox.ErrorCode.INVALID_REQUEST)
        parsed = pox.parse_request(body)
        if isinstance(parsed, pox.PoxError):
            log.warning("autodiscover from %s user=%s refused (%d): %s", peer,
                        identity.principal, parsed.code, parsed.reason)
            return self._error(parsed.code)
        try:
            entry = await self.directory(table).find(parsed.email)
        except DirectoryUnavailable as exc:
            log.warning("autodiscover from %s user=%s for %s: directory unavailable: %s",
                        peer, identity.principal, parsed.email, exc.reason)
            return self._error(pox.ErrorCode.INTERNAL_ERROR)
        refusal = self._refusal(entry, identity)
        if refusal is not None:
            log.warning("autodiscover from %s user=%s for %s refused: %s", peer,
                        identity.principal, parsed.email, refusal)
            return self._error(pox.ErrorCode.ADDRESS_NOT_FOUND)
        assert entry is not None
        mailbox = pox.Mailbox(
            display_name=entry.display_name,
            legacy_dn=entry.legacy_dn or legacy_dn(table, entry.sam_account_name),
            smtp_address=entry.mail or parsed.email)
        log.info("autodiscover from %s user=%s for %s: settings for %s via %s", peer,
                 identity.principal, parsed.email, resolved.response.exch_server,
                 resolved.response.proxy_server)
        return web.Response(body=pox.render_response(resolved.response, mailbox),
                            content_type="text/xml", charset="utf-8")

    @staticmethod
    def _refusal(entry: DirectoryEntry | None, identity: Identity) -> str | None:
        """Why the entry is not the authenticated user's mailbox (None: it is)."""
        if entry is None:
            return "no account in the directory has this address"
        if entry.disabled:
            return f"the account {entry.domain}\\{entry.sam_account_name} is disabled"
        if (entry.sam_account_name.lower() != identity.user.lower()
                or entry.domain.upper() != identity.domain.upper()):
            return (f"the address belongs to {entry.domain}\\{entry.sam_account_name}, "
                    "not to the authenticated user")
        return None

    def _error(self, code: pox.ErrorCode, *, close: bool = False) -> web.Response:
        now = dt.datetime.now(dt.UTC)
        error_id = zlib.crc32(self.resolved().response.proxy_server.encode())
        resp = web.Response(body=pox.render_error(code, now, error_id),
                            content_type="text/xml", charset="utf-8")
        if close:
            resp.force_close()
        return resp

    async def _authenticate(self, request: web.Request, *,
                            close: bool) -> Identity | web.StreamResponse:
        outcome = await self.server.judge_login(request, "autodiscover: ")
        if isinstance(outcome, Authenticated):
            return outcome.identity
        if isinstance(outcome, Unavailable):
            resp = web.Response(status=503, text="authentication is unavailable\r\n")
            resp.force_close()
            return resp
        resp = unauthorized_response(outcome)
        if close:
            resp.force_close()
        return resp

    # ---- the port-80 redirect listener ----------------------------------------------------

    async def start(self) -> None:
        """Open ``redirect_listen`` when configured (every worker binds it: SO_REUSEPORT)."""
        from rpcproxy.targets import parse_endpoint

        resolved = self.resolved()
        table, r = resolved.table, resolved.response
        if not table.enabled:
            log.info("autodiscover: off (autodiscover.enabled = false)")
            return
        directory = self.directory(table)
        log.info("autodiscover: EXPR %s (%s, %s), EXCH %s:%d, directory %s", r.proxy_server,
                 r.auth_package, r.cert_principal_name, r.exch_server, r.port,
                 directory.describe())
        if not table.redirect_listen:
            return
        ep = parse_endpoint(table.redirect_listen, "autodiscover.redirect_listen", listen=True)
        config = self.server.config
        self._redirect_http = web.Server(self._redirect, access_log=None,
                                         keepalive_timeout=5.0, lingering_time=0)
        guard = ConnectionGuard(config.max_unauthenticated_connections,
                                config.handshake_timeout)
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(guard.protocol_factory(self._redirect_http), ep.host,
                                       ep.port, reuse_port=True, backlog=1024)
        self._redirect_servers.append(srv)
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            self.redirect_bound.append((host, port))
            log.info("autodiscover redirect listener on %s:%d (plain HTTP)", host, port)

    async def _redirect(self, request: web.BaseRequest) -> web.StreamResponse:
        """Outlook's HTTP redirect method: a plain GET, answered with a 302 to HTTPS."""
        if not request.path.lower().startswith("/autodiscover/"):
            return web.Response(status=404, text="only /autodiscover/ is served here\r\n")
        target = f"https://{self.resolved().response.proxy_server}{PUBLIC_PATH}"
        resp = web.Response(status=302, headers={"Location": target})
        if request.content_length:
            resp.force_close()  # the body is never read
        return resp

    async def stop(self) -> None:
        if isinstance(self._directory, LdapDirectory):
            self._directory.close()
        for srv in self._redirect_servers:
            srv.close()
        if self._redirect_http is not None:
            await self._redirect_http.shutdown(1.0)
        for srv in self._redirect_servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 2.0)
            except TimeoutError:
                pass
        self._redirect_servers.clear()
