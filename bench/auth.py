"""A permissive HTTP authenticator for bench runs without Samba. Never use it in a server.

It has the interface ``rpcproxy.server.ProxyServer`` expects of ``ntlm.http_auth.
HttpAuthenticator`` (``authenticate(conn, authorization, *, tls)`` and ``forget(conn)``):

* ``Basic`` with any user name and any password is accepted (or only ``password`` when given,
  so tests can exercise the ``401`` path); with ``users`` only the names and passwords of
  that table, exactly as written (the HTTP-level tests' table, tests/fakes.py);
* with ``ntlm_users`` it also runs real NTLM handshakes, verified locally by pyspnego's NTLM
  acceptor against that user table (no Samba): ``NTLM <NEGOTIATE>`` gets a ``401`` with the
  CHALLENGE, ``NTLM <AUTHENTICATE>`` on the same connection is accepted or denied, and the
  connection stays authenticated. pyspnego reads the table from the file named by the
  ``NTLM_USER_FILE`` environment variable, so this sets that variable for the whole process.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import weakref
from typing import Any

from ntlm.http_auth import Authenticated, AuthOutcome, Challenge, Denied
from ntlm.verifier import Identity


def normalise_user(user: str) -> str:
    """``TestUser`` / ``bench@BENCH`` / ``BENCH\\bench`` -> ``bench`` (bench only: a real
    server takes the account name from winbind, never from the client)."""
    user = user.strip()
    if "\\" in user:
        user = user.rsplit("\\", 1)[1]
    if "@" in user:
        user = user.split("@", 1)[0]
    return user.lower()


class _State:
    __slots__ = ("ref", "ctx", "identity")

    def __init__(self, ref: weakref.ref[object]) -> None:
        self.ref = ref
        self.ctx: Any = None
        self.identity: Identity | None = None


class BenchAuthenticator:
    """Accepts HTTP Basic (any or one password) and optionally local NTLM; bench/tests only."""

    def __init__(self, *, password: str | None = None, domain: str = "BENCH",
                 ntlm_users: dict[tuple[str, str], str] | None = None,
                 users: dict[str, str] | None = None, realm: str = "rpcproxy-bench") -> None:
        self.password = password
        self.users = users
        self.domain = domain
        self.realm = f'Basic realm="{realm}"'
        self.accepted = 0
        self.denied = 0
        self.forgotten = 0  # forget() calls: the server dropping a connection's state
        self.ntlm = bool(ntlm_users)
        self._states: dict[int, _State] = {}
        if ntlm_users:
            fh = tempfile.NamedTemporaryFile("w", prefix="rpcproxy-bench-ntlm-", delete=False)
            with fh:
                for (dom, user), pw in ntlm_users.items():
                    fh.write(f"{dom}:{user}:{pw}\n")
            os.environ["NTLM_USER_FILE"] = fh.name
            self.user_file: str | None = fh.name
        else:
            self.user_file = None

    def offers(self, *, tls: bool) -> list[str]:
        return ["NTLM", self.realm] if self.ntlm else [self.realm]

    def forget(self, conn: object) -> None:
        self.forgotten += 1
        self._states.pop(id(conn), None)

    def pending_count(self) -> int:
        return sum(1 for s in self._states.values() if s.ctx is not None)

    def close(self) -> None:
        if self.user_file:
            try:
                os.unlink(self.user_file)
            except OSError:
                pass
            self.user_file = None

    def _state(self, conn: object) -> _State:
        key = id(conn)
        st = self._states.get(key)
        if st is None or st.ref() is not conn:
            states = self._states

            def gone(_ref: weakref.ref[object], key: int = key) -> None:
                states.pop(key, None)

            st = _State(weakref.ref(conn, gone))
            self._states[key] = st
        return st

    async def authenticate(self, conn: object, authorization: str | None, *,
                           tls: bool, source: str | None = None) -> AuthOutcome:
        st = self._states.get(id(conn))
        if st is not None and st.ref() is not conn:
            st = None
        if not authorization:
            if st is not None and st.identity is not None:
                return Authenticated(st.identity)
            return Challenge(self.offers(tls=tls))
        scheme, _, param = authorization.strip().partition(" ")
        kind = scheme.lower()
        if kind == "ntlm" and self.ntlm:
            return self._ntlm(self._state(conn), param.strip(), tls)
        if kind != "basic":
            self.denied += 1
            return Denied(f"{scheme} is not accepted by the bench authenticator",
                          self.offers(tls=tls))
        try:
            user, sep, password = base64.b64decode(param.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            self.denied += 1
            return Denied("malformed Basic credentials", self.offers(tls=tls))
        if self.users is not None:  # a table: its names exactly, nothing normalised
            if not sep or self.users.get(user) != password:
                self.denied += 1
                return Denied("bad password", self.offers(tls=tls))
            self.accepted += 1
            return Authenticated(Identity(user, self.domain))
        if not sep or not normalise_user(user) or (
            self.password is not None and password != self.password
        ):
            self.denied += 1
            return Denied("bad Basic credentials", self.offers(tls=tls))
        self.accepted += 1
        return Authenticated(Identity(normalise_user(user), self.domain))

    def _ntlm(self, st: _State, param: str, tls: bool) -> AuthOutcome:
        import spnego
        import spnego.exceptions

        try:
            token = base64.b64decode(param, validate=True)
        except (binascii.Error, ValueError):
            self.denied += 1
            return Denied("NTLM token is not base64", self.offers(tls=tls))
        if token[8:12] == b"\x01\x00\x00\x00":  # NEGOTIATE: (re)start the handshake
            st.identity = None
            st.ctx = spnego.server(protocol="ntlm")
            try:
                challenge = st.ctx.step(token)
            except spnego.exceptions.SpnegoError as exc:
                st.ctx = None
                self.denied += 1
                return Denied(f"bad NTLM NEGOTIATE: {exc}", self.offers(tls=tls))
            return Challenge(["NTLM " + base64.b64encode(challenge).decode()])
        ctx, st.ctx = st.ctx, None
        if ctx is None:
            self.denied += 1
            return Denied("NTLM AUTHENTICATE without a NEGOTIATE on this connection",
                          self.offers(tls=tls))
        try:
            ctx.step(token)
        except spnego.exceptions.SpnegoError as exc:
            self.denied += 1
            return Denied(f"NTLM authentication failed: {exc}", self.offers(tls=tls))
        if not ctx.complete:
            self.denied += 1
            return Denied("NTLM handshake incomplete", self.offers(tls=tls))
        principal = str(ctx.client_principal or "")
        dom, _, user = principal.rpartition("\\")
        st.identity = Identity(normalise_user(user), (dom or self.domain).upper())
        self.accepted += 1
        return Authenticated(st.identity)
