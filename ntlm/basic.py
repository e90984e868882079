"""HTTP Basic credentials checked by Samba, through NTLM.

Theory of operation: with Basic auth the proxy holds the clear-text password, so it plays the
NTLM *client* itself (pyspnego's built-in NTLM implementation): it produces a NEGOTIATE, relays
it through ``Verifier.begin`` to get Samba's CHALLENGE, computes the AUTHENTICATE (NTLMv2)
and lets Samba judge it exactly like a relayed browser handshake.  No password is stored or
compared locally.  Accepted user spellings: ``user``, ``DOMAIN\\user`` and ``user@realm``.
"""

from __future__ import annotations

import spnego
from spnego.exceptions import SpnegoError

from .errors import AuthenticationFailed
from .verifier import Identity, Verifier, check_client_name


async def verify_password(verifier: Verifier, user: str, password: str,
                          source: str | None = None) -> Identity:
    """Ask the NTLM server whether ``password`` is right for ``user``.

    Raises AuthenticationFailed (wrong password, unknown or disabled user, empty input) or
    NtlmServerUnavailable (the server could not be asked).
    """
    if not user or not user.strip("\\@ ") or not password:
        raise AuthenticationFailed("empty user name or password")
    check_client_name(user, "Basic user name")
    try:
        client = spnego.client(
            user,
            password,
            hostname="rpcproxy",
            protocol="ntlm",
            options=spnego.NegotiateOptions.use_ntlm,
        )
        negotiate = client.step()
    except SpnegoError as exc:
        raise AuthenticationFailed(f"cannot start NTLM for {user!r}: {exc}") from None
    if not negotiate:
        raise AuthenticationFailed("NTLM client produced no NEGOTIATE")
    handshake = await verifier.begin(negotiate, source)
    try:
        try:
            authenticate = client.step(handshake.challenge)
        except SpnegoError as exc:
            raise AuthenticationFailed(f"cannot answer the NTLM challenge: {exc}") from None
        if not authenticate:
            raise AuthenticationFailed("NTLM client produced no AUTHENTICATE")
        return await handshake.complete(authenticate)
    finally:
        handshake.close()
