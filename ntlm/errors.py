"""Exception hierarchy of the ntlm package.

Theory of operation: every failure inside ntlm/ surfaces as an ``NtlmError`` carrying a
``reason`` a log reader understands.  The HTTP layer maps the two subclasses to status codes in
one place:

* ``AuthenticationFailed`` -> 401: Samba gave a verdict other than "accepted", the client's
  token was malformed or anonymous, or the handshake was used out of order.
* ``NtlmServerUnavailable`` -> 503: no verdict could be obtained because the NTLM server
  (Samba) could not be reached or did not produce a CHALLENGE.

A bare ``NtlmError`` is raised by the message parsers (ntlm.messages) for malformed input;
callers that take tokens from the network convert it into ``AuthenticationFailed``.
"""

from __future__ import annotations


class NtlmError(Exception):
    """Base class; ``reason`` is a short human-readable explanation for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthenticationFailed(NtlmError):
    """The credentials were not accepted (or could not be judged because they are invalid)."""


class NtlmServerUnavailable(NtlmError):
    """The NTLM server could not be reached or gave no usable answer before a verdict."""
