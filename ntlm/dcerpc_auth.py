"""The few connection-oriented DCE/RPC PDUs needed to carry NTLM to a server, [C706] ch. 12 and
[MS-RPCE] 2.2.2.

Theory of operation: to let Samba judge an NTLM handshake the proxy acts as a DCE/RPC client
that never makes a call.  It binds one presentation context (the ``mgmt`` interface, which every
Samba ncacn_ip_tcp endpoint serves) with an auth verifier of type NTLMSSP:

    BIND            (call_id 1, verifier = client's NEGOTIATE)   ->
                    <-  BIND_ACK        (verifier = server's CHALLENGE)
    ALTER_CONTEXT   (call_id 2, verifier = client's AUTHENTICATE) ->
                    <-  ALTER_CONTEXT_RESP (accepted)  = Samba accepted the credentials
                    <-  FAULT / BIND_NAK / close       = Samba rejected them

AUTH3 is deliberately not used: the server never answers it, so it yields no verdict.

This module is sans-IO: it builds PDUs as bytes and parses PDUs from bytes.  ``PduReader``
reassembles a byte stream into whole PDUs by ``frag_length`` with bounds checks.  Only
little-endian data representation is produced or accepted (Samba answers in the client's
representation).  Malformed input raises ``ProtocolError``.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

from rpcproxy.pdu import PType as PType  # the PDU types, shared with the proxy (re-exported)

from .errors import NtlmError

RPC_VERSION = 5  # C706 12.6.3.1 rpc_vers
RPC_VERSION_MINOR = 0
DREP_LITTLE_ENDIAN = b"\x10\x00\x00\x00"  # little-endian integers, ASCII, IEEE floats
HEADER = struct.Struct("<BBBB4sHHI")  # common header, C706 12.6.3.1
HEADER_LENGTH = HEADER.size  # 16
SEC_TRAILER = struct.Struct("<BBBBI")  # auth_type, level, pad length, reserved, context id
SEC_TRAILER_LENGTH = SEC_TRAILER.size  # 8
MAX_FRAG_LENGTH = 0xFFFF  # frag_length is a u16
MAX_XMIT_FRAG = 5840  # what Windows and Samba clients offer

PFC_FIRST_FRAG = 0x01  # C706 12.6.3.1 pfc_flags
PFC_LAST_FRAG = 0x02

RPC_C_AUTHN_WINNT = 0x0A  # NTLMSSP, MS-RPCE 2.2.1.1.7
AUTH_CONTEXT_ID = 0x00005A17  # any fixed value; one security context per connection


class AuthLevel(enum.IntEnum):
    """RPC_C_AUTHN_LEVEL_*, MS-RPCE 2.2.1.1.8."""

    NONE = 1
    CONNECT = 2
    CALL = 3
    PKT = 4
    PKT_INTEGRITY = 5
    PKT_PRIVACY = 6


class ContextResult(enum.IntEnum):
    """p_cont_def_result_t, C706 12.6.3.1."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    PROVIDER_REJECTION = 2
    NEGOTIATE_ACK = 3


@dataclass(frozen=True)
class SyntaxId:
    """An interface or transfer syntax: UUID and version (major, minor)."""

    uuid: uuid.UUID
    major: int
    minor: int

    def pack(self) -> bytes:
        return self.uuid.bytes_le + struct.pack("<HH", self.major, self.minor)


# The "mgmt" interface (C706 appendix Q), served by every DCE/RPC endpoint.
MGMT_INTERFACE = SyntaxId(uuid.UUID("afa8bd80-7d8a-11c9-bef4-08002b102989"), 1, 0)
# SAMR, a fallback if an endpoint does not serve mgmt.
SAMR_INTERFACE = SyntaxId(uuid.UUID("12345778-1234-abcd-ef00-0123456789ac"), 1, 0)
# NDR transfer syntax version 2, C706 appendix I.
NDR_SYNTAX = SyntaxId(uuid.UUID("8a885d04-1ceb-11c9-9fe8-08002b104860"), 2, 0)

# rpc_s_* / nca_s_* status codes seen in FAULT PDUs (MS-RPCE 2.2.2.8 / MS-ERREF)
FAULT_NAMES = {
    0x00000005: "rpc_s_access_denied",
    0x000006F7: "rpc_x_bad_stub_data",
    0x00000721: "rpc_s_sec_pkg_error",
    0x1C010002: "nca_s_op_rng_error",
    0x1C010003: "nca_s_unk_if",
    0x1C00001B: "nca_s_proto_error",
    0x1C010013: "nca_s_fault_access_denied",
}


class ProtocolError(NtlmError):
    """A PDU from the server was malformed or unexpected."""


@dataclass(frozen=True)
class Pdu:
    """One complete PDU: the parsed common header and the whole fragment."""

    ptype: int
    flags: int
    call_id: int
    auth_length: int
    data: bytes

    @property
    def body(self) -> bytes:
        """Bytes between the common header and the auth verifier (if any)."""
        end = len(self.data) - (self.auth_length + SEC_TRAILER_LENGTH if self.auth_length else 0)
        return self.data[HEADER_LENGTH:end]

    @property
    def auth_token(self) -> bytes:
        """The auth token carried after the sec_trailer (empty when there is none)."""
        if not self.auth_length:
            return b""
        return self.data[len(self.data) - self.auth_length :]

    def sec_trailer(self) -> tuple[int, int, int]:
        """(auth_type, auth_level, auth_context_id) of the verifier."""
        if not self.auth_length:
            raise ProtocolError("PDU has no auth verifier")
        at = len(self.data) - self.auth_length - SEC_TRAILER_LENGTH
        auth_type, level, _pad, _res, ctx = SEC_TRAILER.unpack_from(self.data, at)
        return auth_type, level, ctx


def parse_header(data: bytes) -> tuple[int, int, int, int, int]:
    """Validate a common header: returns (ptype, flags, frag_length, auth_length, call_id)."""
    if len(data) < HEADER_LENGTH:
        raise ProtocolError(f"PDU header truncated ({len(data)} bytes)")
    vers, minor, ptype, flags, drep, frag_length, auth_length, call_id = HEADER.unpack_from(data)
    if vers != RPC_VERSION or minor not in (0, 1):
        raise ProtocolError(f"not a DCE/RPC v5 PDU (version {vers}.{minor})")
    if drep[0] & 0xF0 != 0x10:
        raise ProtocolError("big-endian data representation is not supported")
    if frag_length < HEADER_LENGTH:
        raise ProtocolError(f"frag_length {frag_length} shorter than the header")
    if auth_length and auth_length + SEC_TRAILER_LENGTH > frag_length - HEADER_LENGTH:
        raise ProtocolError(f"auth_length {auth_length} does not fit in frag_length {frag_length}")
    return ptype, flags, frag_length, auth_length, call_id


def parse_pdu(data: bytes) -> Pdu:
    """Parse exactly one whole PDU."""
    ptype, flags, frag_length, auth_length, call_id = parse_header(data)
    if frag_length != len(data):
        raise ProtocolError(f"frag_length {frag_length} != {len(data)} bytes received")
    return Pdu(ptype, flags, call_id, auth_length, bytes(data))


class PduReader:
    """Reassembles a byte stream into PDUs (sans-IO): ``feed`` bytes, ``next_pdu`` returns one."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def needed(self) -> int:
        """How many more bytes are needed before ``next_pdu`` can return a PDU (>= 1)."""
        if len(self._buf) < HEADER_LENGTH:
            return HEADER_LENGTH - len(self._buf)
        _, _, frag_length, _, _ = parse_header(bytes(self._buf[:HEADER_LENGTH]))
        return max(frag_length - len(self._buf), 0)

    def next_pdu(self) -> Pdu | None:
        if len(self._buf) < HEADER_LENGTH:
            return None
        _, _, frag_length, _, _ = parse_header(bytes(self._buf[:HEADER_LENGTH]))
        if len(self._buf) < frag_length:
            return None
        data = bytes(self._buf[:frag_length])
        del self._buf[:frag_length]
        return parse_pdu(data)


def _header(ptype: PType, frag_length: int, auth_length: int, call_id: int) -> bytes:
    return HEADER.pack(
        RPC_VERSION,
        RPC_VERSION_MINOR,
        ptype,
        PFC_FIRST_FRAG | PFC_LAST_FRAG,
        DREP_LITTLE_ENDIAN,
        frag_length,
        auth_length,
        call_id,
    )


def _bind_like(
    ptype: PType,
    call_id: int,
    interface: SyntaxId,
    auth_token: bytes | None,
    auth_level: AuthLevel,
    assoc_group_id: int = 0,
) -> bytes:
    """BIND or ALTER_CONTEXT with one presentation context (id 0, NDR) and an optional verifier."""
    body = struct.pack("<HHIBBH", MAX_XMIT_FRAG, MAX_XMIT_FRAG, assoc_group_id, 1, 0, 0)
    body += struct.pack("<HBB", 0, 1, 0) + interface.pack() + NDR_SYNTAX.pack()
    auth = b""
    if auth_token is not None:
        pad = -(HEADER_LENGTH + len(body)) % 4
        body += b"\x00" * pad
        auth = SEC_TRAILER.pack(RPC_C_AUTHN_WINNT, auth_level, pad, 0, AUTH_CONTEXT_ID)
        auth += auth_token
    frag_length = HEADER_LENGTH + len(body) + len(auth)
    if frag_length > MAX_FRAG_LENGTH:
        raise ProtocolError(f"auth token too large for one PDU ({len(auth_token or b'')} bytes)")
    auth_length = len(auth_token) if auth_token is not None else 0
    return _header(ptype, frag_length, auth_length, call_id) + body + auth


def build_bind(
    call_id: int,
    interface: SyntaxId,
    auth_token: bytes | None = None,
    auth_level: AuthLevel = AuthLevel.CONNECT,
) -> bytes:
    return _bind_like(PType.BIND, call_id, interface, auth_token, auth_level)


def build_alter_context(
    call_id: int,
    interface: SyntaxId,
    auth_token: bytes,
    auth_level: AuthLevel = AuthLevel.CONNECT,
    assoc_group_id: int = 0,
) -> bytes:
    return _bind_like(
        PType.ALTER_CONTEXT, call_id, interface, auth_token, auth_level, assoc_group_id
    )


@dataclass(frozen=True)
class BindAck:
    """The parts of a BIND_ACK / ALTER_CONTEXT_RESP the proxy needs."""

    assoc_group_id: int
    results: tuple[tuple[int, int], ...]  # (result, reason) per presentation context
    auth_token: bytes


def parse_bind_ack(pdu: Pdu) -> BindAck:
    """Parse a BIND_ACK or ALTER_CONTEXT_RESP body, C706 12.6.4.4 (bounds-checked)."""
    if pdu.ptype not in (PType.BIND_ACK, PType.ALTER_CONTEXT_RESP):
        raise ProtocolError(f"expected BIND_ACK/ALTER_CONTEXT_RESP, got ptype {pdu.ptype}")
    body = pdu.body
    if len(body) < 10:
        raise ProtocolError("BIND_ACK body truncated")
    _xmit, _recv, assoc_group_id, sec_addr_len = struct.unpack_from("<HHIH", body, 0)
    pos = 10 + sec_addr_len
    pos += -(HEADER_LENGTH + pos) % 4  # pad to 4 relative to the PDU start
    if pos + 4 > len(body):
        raise ProtocolError("BIND_ACK secondary address runs past the body")
    n_results = body[pos]
    pos += 4
    if pos + 24 * n_results > len(body):
        raise ProtocolError(f"BIND_ACK announces {n_results} results that do not fit")
    results = []
    for _ in range(n_results):
        result, reason = struct.unpack_from("<HH", body, pos)
        results.append((result, reason))
        pos += 24
    return BindAck(assoc_group_id, tuple(results), pdu.auth_token)


def parse_fault_status(pdu: Pdu) -> int:
    """The status code of a FAULT PDU, C706 12.6.4.7."""
    body = pdu.body
    if pdu.ptype != PType.FAULT or len(body) < 12:
        raise ProtocolError("not a well-formed FAULT PDU")
    (status,) = struct.unpack_from("<I", body, 8)
    return int(status)


def parse_bind_nak_reason(pdu: Pdu) -> int:
    """provider_reject_reason of a BIND_NAK, C706 12.6.4.6."""
    body = pdu.body
    if pdu.ptype != PType.BIND_NAK or len(body) < 2:
        raise ProtocolError("not a well-formed BIND_NAK PDU")
    (reason,) = struct.unpack_from("<H", body, 0)
    return int(reason)


def describe_status(status: int) -> str:
    name = FAULT_NAMES.get(status)
    return f"0x{status:08x} ({name})" if name else f"0x{status:08x}"
