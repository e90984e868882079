"""NTLM pass-through authentication for rpcproxy: Samba gives the verdict.

Modules, one concept each:
* ``errors``      - NtlmError / AuthenticationFailed (401) / NtlmServerUnavailable (503)
* ``messages``    - parsing NTLM NEGOTIATE / CHALLENGE / AUTHENTICATE ([MS-NLMP] 2.2)
* ``dcerpc_auth`` - the DCE/RPC BIND / ALTER_CONTEXT PDUs that carry NTLM to Samba
* ``passthrough`` - NtlmVerifier / PendingHandshake / Identity: one handshake relayed to Samba
* ``basic``       - verify_password: Basic credentials checked through NTLM
* ``http_auth``   - HttpAuthenticator: HTTP Authorization headers, state per TCP connection

Nothing here imports an HTTP framework; the HTTP server maps outcomes to responses.
"""

from .basic import verify_password
from .errors import AuthenticationFailed, NtlmError, NtlmServerUnavailable
from .http_auth import (
    Authenticated,
    AuthOutcome,
    Challenge,
    Denied,
    HttpAuthenticator,
    Unavailable,
)
from .passthrough import Identity, NtlmVerifier, PendingHandshake

__all__ = [
    "AuthOutcome",
    "Authenticated",
    "AuthenticationFailed",
    "Challenge",
    "Denied",
    "HttpAuthenticator",
    "Identity",
    "NtlmError",
    "NtlmServerUnavailable",
    "NtlmVerifier",
    "PendingHandshake",
    "Unavailable",
    "verify_password",
]
