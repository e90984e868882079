"""NTLM authentication for rpcproxy: Samba's winbind gives the verdict and names the account.

Modules, one concept each:
* ``errors``      - NtlmError / AuthenticationFailed (401) / NtlmServerUnavailable (503)
* ``messages``    - parsing NTLM NEGOTIATE / CHALLENGE / AUTHENTICATE ([MS-NLMP] 2.2)
* ``verifier``    - Identity (the account Samba authenticated), the Verifier interface,
                    the refusal of client-written names with NUL or control characters
* ``helper_protocol`` - the squid-2.5-ntlmssp lines of Samba's ntlm_auth, as a pure codec
* ``winbind``     - WinbindVerifier / HelperPool: handshakes judged by winbind via ntlm_auth
* ``basic``       - verify_password: Basic credentials checked through NTLM
* ``http_auth``   - HttpAuthenticator: HTTP Authorization headers, state per TCP connection

Nothing here imports an HTTP framework or the proxy (rpcproxy imports ntlm, never the
reverse); the HTTP server maps outcomes to responses.
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
from .verifier import Handshake, Identity, Verifier
from .winbind import HelperPool, WinbindVerifier

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
    "Handshake",
    "HelperPool",
    "Verifier",
    "WinbindVerifier",
    "Unavailable",
    "verify_password",
]
