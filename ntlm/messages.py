"""Parsing (and a little building) of NTLM messages, [MS-NLMP] section 2.2.

Theory of operation: the proxy never computes NTLM responses for HTTP clients; it only relays
their tokens to Samba.  It still has to *look* at them:

* NEGOTIATE (type 1): to check that an ``Authorization: NTLM`` token really starts a handshake;
* CHALLENGE (type 2, from Samba): to learn the NetBIOS domain name Samba announced
  (AV pair MsvAvNbDomainName), which becomes ``Identity.domain``;
* AUTHENTICATE (type 3): to refuse anonymous logons before Samba sees them (Samba accepts
  them) and to read the user name, trusted only after Samba accepted the message.

Every message starts with the 8-byte signature ``NTLMSSP\\0`` and a u32 MessageType; variable
fields are described by 8-byte "fields" structures (u16 Len, u16 MaxLen, u32 BufferOffset)
pointing into the message.  All integers are little-endian.  Every offset and length coming
from the wire is bounds-checked; any malformed input raises ``NtlmError`` with a reason and
nothing else.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import NtlmError

SIGNATURE = b"NTLMSSP\x00"  # MS-NLMP 2.2.1.1


class MessageType(enum.IntEnum):
    """MessageType field, MS-NLMP 2.2.1."""

    NEGOTIATE = 1
    CHALLENGE = 2
    AUTHENTICATE = 3


class Flag(enum.IntFlag):
    """The NegotiateFlags bits this package cares about, MS-NLMP 2.2.2.5."""

    NEGOTIATE_UNICODE = 0x00000001
    NEGOTIATE_OEM = 0x00000002
    REQUEST_TARGET = 0x00000004
    NEGOTIATE_SIGN = 0x00000010
    NEGOTIATE_SEAL = 0x00000020
    NEGOTIATE_NTLM = 0x00000200
    NEGOTIATE_ANONYMOUS = 0x00000800
    OEM_DOMAIN_SUPPLIED = 0x00001000
    OEM_WORKSTATION_SUPPLIED = 0x00002000
    NEGOTIATE_ALWAYS_SIGN = 0x00008000
    TARGET_TYPE_DOMAIN = 0x00010000
    NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000
    NEGOTIATE_TARGET_INFO = 0x00800000
    NEGOTIATE_VERSION = 0x02000000
    NEGOTIATE_128 = 0x20000000
    NEGOTIATE_KEY_EXCH = 0x40000000
    NEGOTIATE_56 = 0x80000000


class AvId(enum.IntEnum):
    """AV_PAIR identifiers, MS-NLMP 2.2.2.1."""

    EOL = 0
    NB_COMPUTER_NAME = 1
    NB_DOMAIN_NAME = 2
    DNS_COMPUTER_NAME = 3
    DNS_DOMAIN_NAME = 4
    DNS_TREE_NAME = 5
    FLAGS = 6
    TIMESTAMP = 7
    SINGLE_HOST = 8
    TARGET_NAME = 9
    CHANNEL_BINDINGS = 10


# Fixed header sizes (without the optional VERSION / MIC): MS-NLMP 2.2.1.1 - 2.2.1.3.
NEGOTIATE_MIN_LENGTH = 32
CHALLENGE_MIN_LENGTH = 48
AUTHENTICATE_MIN_LENGTH = 64

_FIELDS = struct.Struct("<HHI")  # Len, MaxLen, BufferOffset


def _read_field(data: bytes, at: int, name: str) -> bytes:
    """The bytes described by the 8-byte fields structure at offset ``at``."""
    length, _max_length, offset = _FIELDS.unpack_from(data, at)
    if length == 0:
        return b""
    if offset > len(data) or length > len(data) - offset:
        raise NtlmError(
            f"NTLM {name} field out of range (offset {offset}, length {length}, "
            f"message {len(data)} bytes)"
        )
    return bytes(data[offset : offset + length])


def _decode(raw: bytes, unicode: bool, name: str) -> str:
    if unicode:
        if len(raw) % 2:
            raise NtlmError(f"NTLM {name} has an odd number of bytes for UTF-16LE")
        try:
            return raw.decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise NtlmError(f"NTLM {name} is not valid UTF-16LE: {exc.reason}") from None
    # OEM character set: the code page is not on the wire; cp437 maps every byte.
    return raw.decode("cp437")


def _check_header(data: bytes, expected: MessageType | None, min_length: int) -> MessageType:
    if len(data) < 12:
        raise NtlmError(f"NTLM message too short ({len(data)} bytes)")
    if data[:8] != SIGNATURE:
        raise NtlmError("not an NTLM message (bad NTLMSSP signature)")
    (raw_type,) = struct.unpack_from("<I", data, 8)
    try:
        mtype = MessageType(raw_type)
    except ValueError:
        raise NtlmError(f"unknown NTLM message type {raw_type}") from None
    if expected is not None and mtype is not expected:
        raise NtlmError(f"expected NTLM {expected.name}, got {mtype.name}")
    if len(data) < min_length:
        raise NtlmError(f"NTLM {mtype.name} truncated ({len(data)} < {min_length} bytes)")
    return mtype


_MIN_LENGTH = {
    MessageType.NEGOTIATE: NEGOTIATE_MIN_LENGTH,
    MessageType.CHALLENGE: CHALLENGE_MIN_LENGTH,
    MessageType.AUTHENTICATE: AUTHENTICATE_MIN_LENGTH,
}


def message_type(data: bytes) -> MessageType:
    """The type of an NTLM message, after checking signature and minimum length."""
    mtype = _check_header(data, None, 12)
    _check_header(data, mtype, _MIN_LENGTH[mtype])
    return mtype


def looks_like_ntlm(data: bytes) -> bool:
    """True when ``data`` starts with the NTLMSSP signature (cheap sniffing, no validation)."""
    return data[:8] == SIGNATURE


@dataclass(frozen=True)
class Negotiate:
    """NEGOTIATE_MESSAGE, MS-NLMP 2.2.1.1."""

    flags: int
    domain: str
    workstation: str


@dataclass(frozen=True)
class Challenge:
    """CHALLENGE_MESSAGE, MS-NLMP 2.2.1.2."""

    flags: int
    target_name: str
    server_challenge: bytes
    target_info: Mapping[int, bytes] = field(default_factory=dict)

    def _av_string(self, av_id: AvId) -> str | None:
        raw = self.target_info.get(av_id)
        return None if raw is None else _decode(raw, True, f"AV pair {av_id.name}")

    @property
    def nb_domain_name(self) -> str | None:
        """MsvAvNbDomainName: the server's NetBIOS domain name, if announced."""
        return self._av_string(AvId.NB_DOMAIN_NAME)

    @property
    def nb_computer_name(self) -> str | None:
        return self._av_string(AvId.NB_COMPUTER_NAME)

    @property
    def dns_domain_name(self) -> str | None:
        return self._av_string(AvId.DNS_DOMAIN_NAME)


@dataclass(frozen=True)
class Authenticate:
    """AUTHENTICATE_MESSAGE, MS-NLMP 2.2.1.3."""

    flags: int
    lm_response: bytes
    nt_response: bytes
    domain: str
    user: str
    workstation: str

    @property
    def is_anonymous(self) -> bool:
        """Anonymous logon: the anonymous flag, no user name, or no NT response (3.2.5.1.2)."""
        return bool(self.flags & Flag.NEGOTIATE_ANONYMOUS) or not self.user or not self.nt_response


def parse_negotiate(data: bytes) -> Negotiate:
    _check_header(data, MessageType.NEGOTIATE, NEGOTIATE_MIN_LENGTH)
    (flags,) = struct.unpack_from("<I", data, 12)
    domain = _read_field(data, 16, "NEGOTIATE DomainName")
    workstation = _read_field(data, 24, "NEGOTIATE Workstation")
    # These two are always OEM, and only meaningful when the *_SUPPLIED flags are set.
    return Negotiate(
        flags=flags,
        domain=_decode(domain, False, "domain") if flags & Flag.OEM_DOMAIN_SUPPLIED else "",
        workstation=(
            _decode(workstation, False, "workstation")
            if flags & Flag.OEM_WORKSTATION_SUPPLIED
            else ""
        ),
    )


def parse_av_pairs(raw: bytes) -> dict[int, bytes]:
    """Parse an AV_PAIR list (MS-NLMP 2.2.2.1); it must end with MsvAvEOL."""
    pairs: dict[int, bytes] = {}
    pos = 0
    while True:
        if len(raw) - pos < 4:
            raise NtlmError("NTLM target info truncated (no MsvAvEOL)")
        av_id, av_len = struct.unpack_from("<HH", raw, pos)
        pos += 4
        if av_len > len(raw) - pos:
            raise NtlmError(f"NTLM AV pair {av_id} runs past the end of the target info")
        if av_id == AvId.EOL:
            return pairs
        pairs.setdefault(av_id, bytes(raw[pos : pos + av_len]))
        pos += av_len


def parse_challenge(data: bytes) -> Challenge:
    _check_header(data, MessageType.CHALLENGE, CHALLENGE_MIN_LENGTH)
    (flags,) = struct.unpack_from("<I", data, 20)
    target_name = _read_field(data, 12, "CHALLENGE TargetName")
    target_info = _read_field(data, 40, "CHALLENGE TargetInfo")
    unicode = bool(flags & Flag.NEGOTIATE_UNICODE)
    return Challenge(
        flags=flags,
        target_name=_decode(target_name, unicode, "target name"),
        server_challenge=bytes(data[24:32]),
        target_info=parse_av_pairs(target_info) if target_info else {},
    )


def parse_authenticate(data: bytes) -> Authenticate:
    _check_header(data, MessageType.AUTHENTICATE, AUTHENTICATE_MIN_LENGTH)
    (flags,) = struct.unpack_from("<I", data, 60)
    unicode = bool(flags & Flag.NEGOTIATE_UNICODE)
    lm = _read_field(data, 12, "AUTHENTICATE LmChallengeResponse")
    nt = _read_field(data, 20, "AUTHENTICATE NtChallengeResponse")
    domain = _read_field(data, 28, "AUTHENTICATE DomainName")
    user = _read_field(data, 36, "AUTHENTICATE UserName")
    workstation = _read_field(data, 44, "AUTHENTICATE Workstation")
    _read_field(data, 52, "AUTHENTICATE EncryptedRandomSessionKey")
    return Authenticate(
        flags=flags,
        lm_response=lm,
        nt_response=nt,
        domain=_decode(domain, unicode, "domain name"),
        user=_decode(user, unicode, "user name"),
        workstation=_decode(workstation, unicode, "workstation"),
    )


def parse_message(data: bytes) -> Negotiate | Challenge | Authenticate:
    mtype = _check_header(data, None, 12)
    if mtype is MessageType.NEGOTIATE:
        return parse_negotiate(data)
    if mtype is MessageType.CHALLENGE:
        return parse_challenge(data)
    return parse_authenticate(data)


# Flags of the NEGOTIATE the proxy sends itself when probing the server (no credentials involved).
PROBE_NEGOTIATE_FLAGS = (
    Flag.NEGOTIATE_UNICODE
    | Flag.REQUEST_TARGET
    | Flag.NEGOTIATE_NTLM
    | Flag.NEGOTIATE_ALWAYS_SIGN
    | Flag.NEGOTIATE_EXTENDED_SESSIONSECURITY
    | Flag.NEGOTIATE_128
    | Flag.NEGOTIATE_56
)


def build_negotiate(flags: int = PROBE_NEGOTIATE_FLAGS) -> bytes:
    """A minimal NEGOTIATE_MESSAGE (no domain, no workstation, no version)."""
    return (
        SIGNATURE
        + struct.pack("<II", MessageType.NEGOTIATE, flags)
        + _FIELDS.pack(0, 0, NEGOTIATE_MIN_LENGTH)
        + _FIELDS.pack(0, 0, NEGOTIATE_MIN_LENGTH)
    )
