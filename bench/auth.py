"""A permissive HTTP authenticator for bench runs without Samba. Never use it in a server.

It has the interface ``rpcproxy.server.ProxyServer`` expects of ``ntlm.http_auth.
HttpAuthenticator`` (``authenticate(conn, authorization, *, tls)`` and ``forget(conn)``):
``Basic`` with any user name and any password is accepted; anything else gets a ``401``
challenge offering Basic. Optionally (``password``) it checks the password, so tests can
exercise the ``401 Denied`` path.
"""

from __future__ import annotations

import base64
import binascii

from ntlm.http_auth import Authenticated, AuthOutcome, Challenge, Denied
from ntlm.passthrough import Identity, normalise_user

REALM = 'Basic realm="rpcproxy-bench"'


class BenchAuthenticator:
    """Accepts HTTP Basic with any (or one given) password; bench and tests only."""

    def __init__(self, *, password: str | None = None, domain: str = "BENCH") -> None:
        self.password = password
        self.domain = domain
        self.accepted = 0
        self.denied = 0

    def offers(self, *, tls: bool) -> list[str]:
        return [REALM]

    def forget(self, conn: object) -> None:
        return None

    def pending_count(self) -> int:
        return 0

    async def authenticate(self, conn: object, authorization: str | None, *,
                           tls: bool) -> AuthOutcome:
        if not authorization:
            return Challenge([REALM])
        scheme, _, param = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            self.denied += 1
            return Denied(f"{scheme} is not accepted by the bench authenticator", [REALM])
        try:
            user, sep, password = base64.b64decode(param.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            self.denied += 1
            return Denied("malformed Basic credentials", [REALM])
        if not sep or not normalise_user(user) or (
            self.password is not None and password != self.password
        ):
            self.denied += 1
            return Denied("bad Basic credentials", [REALM])
        self.accepted += 1
        return Authenticated(Identity(normalise_user(user), self.domain))
