"""Hand-made NTLM AUTHENTICATE messages for the identity attacks: a forged user name and an
anonymous AUTHENTICATE (MS-NLMP 3.1.5.1.2)."""

from __future__ import annotations

import struct

from ntlm import messages


def replace_user_field(authenticate: bytes, user: str) -> bytes:
    """The AUTHENTICATE with its UserName field pointing at ``user`` (UTF-16LE, appended)."""
    raw = user.encode("utf-16-le")
    offset = len(authenticate)
    return authenticate[:36] + struct.pack("<HHI", len(raw), len(raw), offset) + \
        authenticate[44:] + raw


def anonymous_authenticate() -> bytes:
    """An anonymous AUTHENTICATE as MS-NLMP 3.1.5.1.2 describes it: LM = Z(1), rest empty."""
    flags = messages.Flag.NEGOTIATE_UNICODE | messages.Flag.NEGOTIATE_NTLM
    flags |= messages.Flag.NEGOTIATE_ANONYMOUS
    head = messages.SIGNATURE + struct.pack("<I", messages.MessageType.AUTHENTICATE)
    head += struct.pack("<HHI", 1, 1, 64)  # LmChallengeResponse: one zero byte
    for _ in range(5):  # NT response, domain, user, workstation, session key: empty
        head += struct.pack("<HHI", 0, 0, 65)
    return head + struct.pack("<I", flags) + b"\x00"
