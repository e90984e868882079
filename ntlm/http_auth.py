"""HTTP authentication (NTLM, Negotiate-wrapped NTLM, Basic) bound to TCP connections.

Theory of operation ([MS-NTHT], and what IIS does for RPC over HTTP): NTLM authenticates a
*connection*, not a request.  Per TCP connection (``conn``, any weak-referenceable object; the
server passes the asyncio transport) this module keeps a small state:

    no state / not authenticated --"NTLM <NEGOTIATE>"--> pending (helper held, timer armed)
    pending --"NTLM <AUTHENTICATE>"--> authenticated (Samba accepted) | not authenticated
    authenticated --request without Authorization--> authenticated (same identity)
    any --"NTLM <NEGOTIATE>"--> pending again (re-authentication restarts the handshake)

Each ``authenticate()`` call returns one outcome the HTTP layer turns into a response:
``Authenticated`` (serve the request), ``Challenge`` / ``Denied`` (401 with the given
WWW-Authenticate values, keep the connection) or ``Unavailable`` (503: Samba could not be
asked, or too many handshakes are in flight).

Basic credentials are checked per request (through ntlm.basic) and never cached on the
connection; they are refused on plain HTTP unless configured otherwise.  ``Negotiate`` is
accepted only when its token is raw NTLMSSP (what Windows sends when Kerberos is not possible);
the answer then uses the ``Negotiate`` scheme name.  Kerberos / SPNEGO tokens are denied.

Resources are bounded: at most ``max_pending`` handshakes wait for or hold a verifier slot
(between NEGOTIATE and verdict, Basic checks included), and at most ``max_pending_per_source``
of them for one ``source`` (the caller's key for the client's address, passed with each
request), so one address cannot take them all; a pending handshake expires after
``handshake_timeout``; when the server calls ``forget(conn)`` or ``conn`` is garbage-collected,
its pending handshake is given up (its helper goes back to the pool).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import weakref
from dataclasses import dataclass
from typing import Protocol

from . import messages
from .basic import verify_password
from .errors import AuthenticationFailed, NtlmError, NtlmServerUnavailable, Refusal, Unreachable
from .verifier import Handshake, Identity, Verifier, parse_safe_authenticate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Authenticated:
    identity: Identity


@dataclass(frozen=True)
class Challenge:
    www_authenticate: list[str]


@dataclass(frozen=True)
class Denied:
    reason: str
    www_authenticate: list[str]
    code: Refusal = Refusal.MALFORMED


@dataclass(frozen=True)
class Unavailable:
    reason: str
    code: Unreachable = Unreachable.NTLM_SERVER


AuthOutcome = Authenticated | Challenge | Denied | Unavailable


class Authenticator(Protocol):
    """What the proxy asks of HTTP authentication, per TCP connection ``conn``.

    ``HttpAuthenticator`` below is the product's (NTLM through winbind, Basic); the bench
    and the tests plug in table-driven ones (``bench.auth.BenchAuthenticator``).
    """

    async def authenticate(self, conn: object, authorization: str | None, *, tls: bool,
                           source: str | None = None) -> AuthOutcome: ...

    def forget(self, conn: object) -> None:
        """The TCP connection closed, or became a channel: drop what is kept for it."""

    def pending_count(self) -> int:
        """NTLM handshakes between CHALLENGE and AUTHENTICATE now."""


class _ConnState:
    """What is known about one TCP connection."""

    __slots__ = ("ref", "identity", "pending", "timer", "generation", "source")

    def __init__(self, ref: weakref.ref[object]) -> None:
        self.ref = ref
        self.identity: Identity | None = None
        self.pending: Handshake | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.generation = 0
        self.source: str | None = None  # what the pending handshake counts against


def _b64decode(param: str) -> bytes:
    try:
        return base64.b64decode(param.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("Authorization token is not valid base64") from None


class HttpAuthenticator:
    """Turns Authorization headers into outcomes, remembering NTLM state per connection."""

    def __init__(
        self,
        verifier: Verifier,
        *,
        allow_basic: bool = True,
        basic_requires_tls: bool = True,
        max_pending: int = 4096,
        max_pending_per_source: int | None = None,
        handshake_timeout: float = 30.0,
        challenge_timeout: float = 10.0,
        realm: str = "rpcproxy",
    ) -> None:
        self.verifier = verifier
        self.allow_basic = allow_basic
        self.basic_requires_tls = basic_requires_tls
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.handshake_timeout = handshake_timeout
        self.challenge_timeout = challenge_timeout
        self.realm = realm
        self._states: dict[int, _ConnState] = {}
        self._open = 0  # handshakes waiting for or holding a verifier slot (a helper)
        self._open_by_source: collections.Counter[str] = collections.Counter()

    # -- public ---------------------------------------------------------------------------

    def pending_count(self) -> int:
        """Handshakes currently waiting for or holding a helper (pending or in flight)."""
        return self._open

    def basic_allowed(self, *, tls: bool) -> bool:
        return self.allow_basic and (tls or not self.basic_requires_tls)

    def offers(self, *, tls: bool) -> list[str]:
        """WWW-Authenticate values for an unauthenticated request."""
        schemes = ["NTLM"]
        if self.basic_allowed(tls=tls):
            escaped = self.realm.replace("\\", "\\\\").replace('"', '\\"')
            schemes.append(f'Basic realm="{escaped}"')
        return schemes

    def forget(self, conn: object) -> None:
        """The TCP connection closed: drop its state and give up its pending handshake."""
        state = self._states.get(id(conn))
        if state is not None and state.ref() is conn:
            self._discard(id(conn), state)

    async def authenticate(
        self, conn: object, authorization: str | None, *, tls: bool, source: str | None = None
    ) -> AuthOutcome:
        key = id(conn)
        state = self._states.get(key)
        if state is not None and state.ref() is not conn:  # stale entry (should not happen)
            self._discard(key, state)
            state = None
        if authorization is None or not authorization.strip():
            if state is not None and state.identity is not None:
                return Authenticated(state.identity)
            return Challenge(self.offers(tls=tls))
        scheme, _, param = authorization.strip().partition(" ")
        kind = scheme.lower()
        try:
            if kind in ("ntlm", "negotiate"):
                return await self._ntlm(conn, scheme, param, tls, source)
            if kind == "basic":
                return await self._basic(param, tls, source)
        except AuthenticationFailed as exc:
            return self._denied(exc.reason, tls, exc.code)
        except NtlmServerUnavailable as exc:
            return Unavailable(exc.reason, exc.code)
        return self._denied(f"unsupported authentication scheme {scheme[:32]!r}", tls,
                            Refusal.UNSUPPORTED_SCHEME)

    # -- NTLM -----------------------------------------------------------------------------

    async def _ntlm(self, conn: object, scheme: str, param: str, tls: bool,
                    source: str | None) -> AuthOutcome:
        token = _b64decode(param)
        if not messages.looks_like_ntlm(token):
            if scheme.lower() == "negotiate":
                raise AuthenticationFailed(
                    "Negotiate token is not NTLMSSP (Kerberos/SPNEGO is not supported; use NTLM)",
                    Refusal.UNSUPPORTED_SCHEME,
                )
            raise AuthenticationFailed("NTLM token is not an NTLMSSP message")
        try:
            mtype = messages.message_type(token)
        except NtlmError as exc:
            raise AuthenticationFailed(f"malformed NTLM token: {exc.reason}") from None
        if mtype is messages.MessageType.NEGOTIATE:
            return await self._ntlm_negotiate(conn, scheme, token, source)
        if mtype is messages.MessageType.AUTHENTICATE:
            return await self._ntlm_authenticate(conn, token)
        raise AuthenticationFailed("client sent an NTLM CHALLENGE message", Refusal.OUT_OF_ORDER)

    async def _ntlm_negotiate(self, conn: object, scheme: str, token: bytes,
                              source: str | None) -> AuthOutcome:
        key = id(conn)
        state = self._states.get(key)
        if state is None:
            state = _ConnState(self._watch(conn, key))
            self._states[key] = state
        # A new NEGOTIATE restarts authentication on this connection.
        self._drop_pending(state)
        state.identity = None
        state.generation += 1
        generation = state.generation
        refused = self._take(source)
        if refused is not None:
            return refused
        state.source = source
        try:
            handshake = await self.verifier.begin(token, source)
        except BaseException:
            self._give(source)
            raise
        if self._states.get(key) is not state or state.generation != generation:
            # The connection went away (or restarted) while Samba was answering.
            handshake.close()
            self._give(source)
            raise AuthenticationFailed("handshake superseded or connection closed",
                                       Refusal.OUT_OF_ORDER)
        state.pending = handshake
        loop = asyncio.get_running_loop()
        # A handshake holds a verifier slot (an ntlm_auth helper) until the AUTHENTICATE:
        # a client that never sends it gives the slot back after challenge_timeout.
        state.timer = loop.call_later(min(self.handshake_timeout, self.challenge_timeout),
                                      self._expire, key, handshake)
        b64 = base64.b64encode(handshake.challenge).decode("ascii")
        return Challenge([f"{scheme} {b64}"])

    async def _ntlm_authenticate(self, conn: object, token: bytes) -> AuthOutcome:
        key = id(conn)
        state = self._states.get(key)
        if state is None or state.pending is None:
            raise AuthenticationFailed(
                "NTLM AUTHENTICATE without a pending handshake on this connection",
                Refusal.OUT_OF_ORDER,
            )
        handshake = state.pending
        state.pending = None
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        generation = state.generation
        try:
            # Anonymous logons and unsafe names never reach Samba.  The winbind verifier
            # checks this too; checking here keeps the rule whatever the verifier.
            parse_safe_authenticate(token)
            identity = await handshake.complete(token)
        finally:
            handshake.close()
            self._give(state.source)
        if self._states.get(key) is state and state.generation == generation:
            state.identity = identity
        log.debug("NTLM authenticated %s", identity)
        return Authenticated(identity)

    # -- Basic ----------------------------------------------------------------------------

    async def _basic(self, param: str, tls: bool, source: str | None) -> AuthOutcome:
        if not self.allow_basic:
            raise AuthenticationFailed("Basic authentication is disabled",
                                       Refusal.BASIC_NOT_ALLOWED)
        if not self.basic_allowed(tls=tls):
            raise AuthenticationFailed("Basic authentication refused without TLS",
                                       Refusal.BASIC_NOT_ALLOWED)
        raw = _b64decode(param)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        user, sep, password = text.partition(":")
        if not sep:
            raise AuthenticationFailed("Basic credentials lack a ':'")
        refused = self._take(source)
        if refused is not None:
            return refused
        try:
            identity = await verify_password(self.verifier, user, password, source)
        finally:
            self._give(source)
        return Authenticated(identity)

    # -- bookkeeping ----------------------------------------------------------------------

    def _take(self, source: str | None) -> Unavailable | None:
        """Count one more handshake under way, or say which bound refuses it."""
        limit = self.max_pending_per_source
        if source is not None and limit is not None and self._open_by_source[source] >= limit:
            return Unavailable("too many pending handshakes from this address",
                               Unreachable.BUSY_PER_SOURCE)
        if self._open >= self.max_pending:
            return Unavailable("too many pending handshakes", Unreachable.BUSY)
        if source is not None and limit is not None:
            self._open_by_source[source] += 1
        self._open += 1
        return None

    def _give(self, source: str | None) -> None:
        self._open -= 1
        if source is not None and source in self._open_by_source:
            left = self._open_by_source[source] - 1
            if left > 0:
                self._open_by_source[source] = left
            else:
                del self._open_by_source[source]

    def _denied(self, reason: str, tls: bool, code: Refusal) -> Denied:
        log.debug("HTTP authentication denied: %s", reason)
        return Denied(reason, self.offers(tls=tls), code)

    def _watch(self, conn: object, key: int) -> weakref.ref[object]:
        me = weakref.ref(self)

        def gone(ref: weakref.ref[object]) -> None:
            authenticator = me()
            if authenticator is None:
                return
            state = authenticator._states.get(key)
            if state is not None and state.ref is ref:
                authenticator._discard(key, state)

        return weakref.ref(conn, gone)

    def _drop_pending(self, state: _ConnState) -> None:
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if state.pending is not None:
            state.pending.close()
            state.pending = None
            self._give(state.source)

    def _discard(self, key: int, state: _ConnState) -> None:
        self._drop_pending(state)
        state.identity = None
        state.generation += 1
        if self._states.get(key) is state:
            del self._states[key]

    def _expire(self, key: int, handshake: Handshake) -> None:
        state = self._states.get(key)
        if state is not None and state.pending is handshake:
            state.timer = None
            self._drop_pending(state)
            log.debug("pending NTLM handshake expired")
