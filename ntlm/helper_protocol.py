"""The squid-2.5-ntlmssp helper protocol spoken by Samba's ``ntlm_auth``, as a pure codec.

Theory of operation: ``ntlm_auth --helper-protocol=squid-2.5-ntlmssp`` is a long-lived process
that plays the NTLM *server* for one handshake at a time and asks winbindd (hence the domain
controller) for the verdict.  Requests and replies are single lines::

    proxy -> helper   YR <base64 NEGOTIATE>        start a new handshake (resets any old one)
    helper -> proxy   TT <base64 CHALLENGE>        the CHALLENGE to send to the client
    proxy -> helper   KK <base64 AUTHENTICATE>
    helper -> proxy   AF <DOMAIN>\\<account>       accepted: the account as winbind resolved it
                      NA <NT_STATUS_...>           rejected (wrong password, unknown, disabled)
                      BH <reason>                  broken: no verdict could be had

The account in ``AF`` is the one Samba authenticated (a UPN or any other spelling the client
used is already resolved to its sAMAccountName), so it is the only name the proxy trusts.
This module only encodes requests and decodes replies; ``ntlm.winbind`` runs the processes.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass

# Longest reply line read from a helper (tokens are a few hundred bytes; ntlm_auth's own limit
# is larger, but nothing legitimate comes close to this).
MAX_LINE = 64 * 1024

# Characters that separate domain and account in an AF reply: winbind's separator is '\\' by
# default and configurable; none of these may appear in an AD account name.
_SEPARATORS = "\\/+"

# NA statuses that mean "no verdict could be had" rather than "these credentials are wrong":
# the domain controller or winbind could not be asked.  They answer 503, never 401.
UNAVAILABLE_STATUSES = frozenset(
    {
        "NT_STATUS_NO_LOGON_SERVERS",
        "NT_STATUS_DOMAIN_CONTROLLER_NOT_FOUND",
        "NT_STATUS_NETLOGON_NOT_STARTED",
        "NT_STATUS_IO_TIMEOUT",
        "NT_STATUS_TRUSTED_RELATIONSHIP_FAILURE",
        "NT_STATUS_TRUSTED_DOMAIN_FAILURE",
        "NT_STATUS_CONNECTION_REFUSED",
        "NT_STATUS_CONNECTION_RESET",
        "NT_STATUS_CONNECTION_DISCONNECTED",
        "NT_STATUS_UNSUCCESSFUL",
        "NT_STATUS_INTERNAL_ERROR",
    }
)


class Request(enum.Enum):
    NEGOTIATE = "YR"
    AUTHENTICATE = "KK"


class ReplyKind(enum.Enum):
    CHALLENGE = "TT"
    ACCEPTED = "AF"
    REJECTED = "NA"
    BROKEN = "BH"


class HelperProtocolError(Exception):
    """A reply line that is not of the protocol (the helper is then replaced)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Reply:
    kind: ReplyKind
    token: bytes = b""  # CHALLENGE
    text: str = ""  # ACCEPTED: the account; REJECTED / BROKEN: the status or reason


def encode_request(request: Request, token: bytes) -> bytes:
    return f"{request.value} {base64.b64encode(token).decode('ascii')}\n".encode("ascii")


def parse_reply(line: bytes) -> Reply:
    """Decode one reply line (with or without its newline)."""
    text_line = line.rstrip(b"\r\n")
    if len(text_line) > MAX_LINE:
        raise HelperProtocolError("reply line too long")
    try:
        text = text_line.decode("utf-8")
    except UnicodeDecodeError:
        raise HelperProtocolError("reply is not UTF-8") from None
    code, _, rest = text.partition(" ")
    try:
        kind = ReplyKind(code)
    except ValueError:
        raise HelperProtocolError(f"unknown reply code {code[:16]!r}") from None
    if kind is ReplyKind.CHALLENGE:
        try:
            token = base64.b64decode(rest.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise HelperProtocolError("TT reply is not base64") from None
        if not token:
            raise HelperProtocolError("TT reply without a CHALLENGE")
        return Reply(kind, token=token)
    return Reply(kind, text=rest.strip())


def split_account(account: str, default_domain: str) -> tuple[str, str]:
    """``EXAMPLE\\testuser`` -> ("EXAMPLE", "testuser"); without a separator (winbind's
    ``use default domain``) the domain is ``default_domain``.  Raises HelperProtocolError for
    an empty or unprintable account."""
    if not account or not account.isprintable():
        raise HelperProtocolError("AF reply without a printable account name")
    cut = min((i for i in (account.find(s) for s in _SEPARATORS) if i >= 0), default=-1)
    if cut < 0:
        domain, user = default_domain, account
    else:
        domain, user = account[:cut], account[cut + 1 :]
    if not user or not domain:
        raise HelperProtocolError(f"AF reply {account!r} lacks a domain or an account")
    return domain.upper(), user.lower()
