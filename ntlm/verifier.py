"""What an NTLM verifier gives the HTTP layer: the account Samba authenticated.

Theory of operation: an HTTP client's NTLM handshake has three legs (NEGOTIATE, CHALLENGE,
AUTHENTICATE) over two requests on one TCP connection.  A *verifier* relays them to something
that can judge them (Samba's winbind, through ``ntlm.winbind``):

    handshake = await verifier.begin(negotiate)     # -> handshake.challenge goes in the 401
    identity  = await handshake.complete(authenticate)

``complete`` returns an ``Identity`` only when Samba accepted the AUTHENTICATE, and the identity
is the account *as Samba resolved it* (its NetBIOS domain and sAMAccountName), never the user or
domain string the client wrote into its AUTHENTICATE: those may carry a UPN that belongs to
another account, or a NUL that Samba stops reading at.  Client-written names are still
checked here before anything is sent (``check_client_names``): NUL and control characters are
refused outright, whatever the verifier.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Protocol

from . import messages
from .errors import AuthenticationFailed, NtlmError, Refusal
from .messages import Authenticate

# Longest user or domain name accepted from a client (sAMAccountName is at most 20, a UPN at most
# 1024 characters in AD; the NTLM fields are bounded by the HTTP header size anyway).
MAX_NAME_LENGTH = 1024


@dataclass(frozen=True)
class Identity:
    """An account Samba authenticated: ``user`` its account name (lower-case, as account names
    compare in AD), ``domain`` its upper-case NetBIOS domain."""

    user: str
    domain: str

    @property
    def principal(self) -> str:
        return f"{self.domain}\\{self.user}"

    def __str__(self) -> str:
        return self.principal


def has_control_characters(text: str) -> bool:
    """True when ``text`` holds NUL, a C0/C1 control, DEL, or a Unicode format/separator
    character that is not a plain space (line and paragraph separators included)."""
    for ch in text:
        if ch == " ":
            continue
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            return True
    return False


def check_client_name(value: str, what: str) -> None:
    """Refuse a client-written name that must never reach Samba (AuthenticationFailed)."""
    if len(value) > MAX_NAME_LENGTH:
        raise AuthenticationFailed(f"{what} is longer than {MAX_NAME_LENGTH} characters",
                                   Refusal.BAD_NAME)
    if has_control_characters(value):
        raise AuthenticationFailed(f"{what} contains NUL or control characters", Refusal.BAD_NAME)


def check_client_names(auth: Authenticate) -> None:
    """The user, domain and workstation names of an AUTHENTICATE, checked before relaying."""
    check_client_name(auth.user, "NTLM user name")
    check_client_name(auth.domain, "NTLM domain name")
    check_client_name(auth.workstation, "NTLM workstation name")


def parse_safe_authenticate(token: bytes) -> Authenticate:
    """The AUTHENTICATE a client sent, if it may be relayed at all: well formed, not
    anonymous (Samba accepts anonymous logons), and its names free of NUL and control
    characters.  AuthenticationFailed otherwise; nothing has been sent anywhere then."""
    try:
        auth = messages.parse_authenticate(token)
    except NtlmError as exc:
        raise AuthenticationFailed(f"malformed NTLM AUTHENTICATE: {exc.reason}") from None
    if auth.is_anonymous:
        raise AuthenticationFailed("anonymous NTLM logon refused", Refusal.ANONYMOUS)
    check_client_names(auth)
    return auth


class Handshake(Protocol):
    """One handshake between CHALLENGE and AUTHENTICATE."""

    @property
    def challenge(self) -> bytes: ...

    @property
    def closed(self) -> bool: ...

    def close(self) -> None:
        """Give up the handshake (idempotent); its resources go back at once."""

    async def complete(self, authenticate: bytes) -> Identity:
        """The identity Samba accepted; AuthenticationFailed (401) or
        NtlmServerUnavailable (503, no verdict could be had)."""
        ...


class Verifier(Protocol):
    """Starts handshakes; ``probe`` proves that the judge answers (NtlmServerUnavailable)."""

    async def begin(self, negotiate: bytes, source: str | None = None) -> Handshake:
        """``source``: the client's address key, for per-source bounds (None: none)."""
        ...

    async def probe(self) -> None: ...
