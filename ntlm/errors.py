"""Exception hierarchy of the ntlm package.

Theory of operation: every failure inside ntlm/ surfaces as an ``NtlmError`` carrying a
``reason`` a log reader understands.  The HTTP layer maps the two subclasses to status codes in
one place:

* ``AuthenticationFailed`` -> 401: Samba gave a verdict other than "accepted", the client's
  token was malformed or anonymous, or the handshake was used out of order.
* ``NtlmServerUnavailable`` -> 503: no verdict could be obtained because the NTLM server
  (winbind) could not be asked, or every slot stayed busy.

Each carries a code (``Refusal`` / ``Unreachable``) that the HTTP layer and metrics act on;
the ``reason`` text is for people only.

A bare ``NtlmError`` is raised by the message parsers (ntlm.messages) for malformed input;
callers that take tokens from the network convert it into ``AuthenticationFailed``.
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """Why a login was refused (401); the values are metric labels."""

    BAD_CREDENTIALS = "bad_credentials"  # Samba's verdict: wrong password, unknown, disabled
    ANONYMOUS = "anonymous"
    BAD_NAME = "bad_name"  # NUL / control characters in a client-written name
    MALFORMED = "malformed"
    OUT_OF_ORDER = "out_of_order"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    BASIC_NOT_ALLOWED = "basic_not_allowed"


class Unreachable(enum.Enum):
    """Why no verdict could be had (503); the values are metric labels."""

    BUSY = "too_many_pending"  # our own bound: max_pending handshakes under way
    BUSY_PER_SOURCE = "too_many_pending_per_source"  # the same bound for one source
    HELPERS_BUSY = "helpers_busy"  # our own bound: no helper came free in time
    NTLM_SERVER = "ntlm_server_unavailable"  # winbind / the DC could not be asked

    @property
    def our_bound(self) -> bool:
        """A bound of the proxy's own (503 RPC Error 6BB), not a judge out of reach (6BA)."""
        return self is not Unreachable.NTLM_SERVER


class NtlmError(Exception):
    """Base class; ``reason`` is a short human-readable explanation for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthenticationFailed(NtlmError):
    """The credentials were not accepted (or could not be judged because they are invalid)."""

    def __init__(self, reason: str, code: Refusal = Refusal.MALFORMED) -> None:
        super().__init__(reason)
        self.code = code


class NtlmServerUnavailable(NtlmError):
    """The NTLM server could not be reached or gave no usable answer before a verdict."""

    def __init__(self, reason: str, code: Unreachable = Unreachable.NTLM_SERVER) -> None:
        super().__init__(reason)
        self.code = code
