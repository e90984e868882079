"""A tiny connection-oriented DCE/RPC toolkit for the bench (C706 ch. 12, [MS-RPCE] 2.2.2).

Builders for the PDUs a client sends (BIND, REQUEST) and a server sends (BIND_ACK, RESPONSE,
FAULT), and body parsers for all of them. The common header, the PTYPE and pfc_flags values and
``FramingError`` (raised for bytes that are not the PDU they should be) are ``dcerpc.pdu``'s.
Little-endian NDR only; no authentication verifiers are built (they are parsed past:
``auth_length`` is honoured when a stub is cut out).

Everything here is pure: bytes in, values out. Bodies are returned as ``memoryview`` slices so
a 64 KiB stub is not copied just to be looked at.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from dcerpc.pdu import (
    HEADER_LEN,
    MAX_FRAG_LENGTH,
    PFC_DID_NOT_EXECUTE,
    PFC_FIRST_FRAG,
    PFC_LAST_FRAG,
    PFC_OBJECT_UUID,
    FramingError,
    PduHeader,
    PType,
    parse_header,
)

REQUEST_HEADER_LEN = 24  # common header + alloc_hint, p_cont_id, opnum
RESPONSE_HEADER_LEN = 24  # common header + alloc_hint, p_cont_id, cancel_count, reserved

NDR_UUID = uuid.UUID("8a885d04-1ceb-11c9-9fe8-08002b104860")
NDR_VERSION = 2

# bind_ack result values ([MS-RPCE] 2.2.2.4 / C706 p_cont_def_result_t).
RESULT_ACCEPTANCE = 0
RESULT_USER_REJECTION = 1
RESULT_PROVIDER_REJECTION = 2
REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED = 1
REASON_TRANSFER_SYNTAXES_NOT_SUPPORTED = 2

# Fault status codes (C706 appendix E / [MS-RPCE] 2.2.2.8).
NCA_S_OP_RNG_ERROR = 0x1C010002
NCA_S_PROTO_ERROR = 0x1C01000B
NCA_S_UNK_IF = 0x1C010003

_DREP = b"\x10\x00\x00\x00"
_COMMON = struct.Struct("<BBBB4sHHI")
_REQ_FIXED = struct.Struct("<IHH")
_RESP_FIXED = struct.Struct("<IHBB")
_FAULT_FIXED = struct.Struct("<IHBBII")
_BIND_FIXED = struct.Struct("<HHIBBH")
_SYNTAX = struct.Struct("<16sI")


def _header(data: bytes | bytearray | memoryview) -> PduHeader:
    """The common header (``dcerpc.pdu``'s checks), refusing big-endian PDUs."""
    header = parse_header(data)
    if not header.little_endian:
        raise FramingError("big-endian PDUs are not supported by the bench")
    return header


def _common(ptype: int, flags: int, frag_length: int, call_id: int, auth_length: int = 0) -> bytes:
    return _COMMON.pack(5, 0, ptype, flags, _DREP, frag_length, auth_length, call_id)


def syntax(uid: uuid.UUID, major: int, minor: int = 0) -> bytes:
    """A presentation syntax id: UUID (wire order) + version (major in the low 16 bits)."""
    return _SYNTAX.pack(uid.bytes_le, major | (minor << 16))


NDR_SYNTAX = syntax(NDR_UUID, NDR_VERSION)


# --- client side ------------------------------------------------------------------------------


def build_bind(
    call_id: int,
    abstract_syntax: bytes,
    *,
    transfer_syntax: bytes = NDR_SYNTAX,
    context_id: int = 0,
    max_xmit: int = 0xFFF8,
    max_recv: int = 0xFFF8,
    assoc_group: int = 0,
    ptype: int = PType.BIND,
) -> bytes:
    """BIND (or ALTER_CONTEXT with ``ptype``) with one presentation context."""
    body = _BIND_FIXED.pack(max_xmit, max_recv, assoc_group, 1, 0, 0)
    body += struct.pack("<HBB", context_id, 1, 0) + abstract_syntax + transfer_syntax
    length = HEADER_LEN + len(body)
    return _common(ptype, PFC_FIRST_FRAG | PFC_LAST_FRAG, length, call_id) + body


def build_request(
    call_id: int,
    opnum: int,
    stub: bytes | bytearray | memoryview,
    *,
    context_id: int = 0,
    flags: int = PFC_FIRST_FRAG | PFC_LAST_FRAG,
    alloc_hint: int | None = None,
) -> bytes:
    """One REQUEST fragment carrying ``stub``."""
    length = REQUEST_HEADER_LEN + len(stub)
    if length > MAX_FRAG_LENGTH:
        raise ValueError(f"request fragment of {length} bytes exceeds 65535")
    hint = len(stub) if alloc_hint is None else alloc_hint
    return b"".join(
        (_common(PType.REQUEST, flags, length, call_id), _REQ_FIXED.pack(hint, context_id, opnum),
         stub)
    )


def fragment_request(
    call_id: int,
    opnum: int,
    stub: bytes | bytearray | memoryview,
    max_frag: int,
    *,
    context_id: int = 0,
) -> list[bytes]:
    """A REQUEST cut into fragments of at most ``max_frag`` bytes (stub pieces 8-aligned)."""
    view = memoryview(stub)
    room = (max_frag - REQUEST_HEADER_LEN) & ~7
    if room <= 0:
        raise ValueError(f"max_frag {max_frag} leaves no room for a stub")
    frags: list[bytes] = []
    pos = 0
    total = len(view)
    while True:
        piece = view[pos : pos + room]
        flags = (PFC_FIRST_FRAG if pos == 0 else 0) | (
            PFC_LAST_FRAG if pos + len(piece) >= total else 0
        )
        frags.append(
            build_request(call_id, opnum, piece, context_id=context_id, flags=flags,
                          alloc_hint=total - pos)
        )
        pos += len(piece)
        if pos >= total:
            return frags


@dataclass(frozen=True, slots=True)
class BindAck:
    call_id: int
    max_xmit: int
    max_recv: int
    assoc_group: int
    results: tuple[tuple[int, int], ...]  # (result, reason) per context

    @property
    def accepted(self) -> bool:
        return bool(self.results) and self.results[0][0] == RESULT_ACCEPTANCE


def parse_bind_ack(data: bytes | memoryview) -> BindAck:
    h = _header(data)
    if h.ptype not in (PType.BIND_ACK, PType.ALTER_CONTEXT_RESP):
        raise FramingError(f"expected BIND_ACK, got PTYPE {h.ptype}")
    if len(data) < HEADER_LEN + 10:
        raise FramingError("BIND_ACK truncated")
    max_xmit, max_recv, assoc = struct.unpack_from("<HHI", data, HEADER_LEN)
    (sec_len,) = struct.unpack_from("<H", data, HEADER_LEN + 8)
    pos = HEADER_LEN + 10 + sec_len
    pos = (pos + 3) & ~3
    if len(data) < pos + 4:
        raise FramingError("BIND_ACK truncated after the secondary address")
    n = data[pos]
    pos += 4
    results = []
    for _ in range(n):
        if len(data) < pos + 24:
            raise FramingError("BIND_ACK result list truncated")
        result, reason = struct.unpack_from("<HH", data, pos)
        results.append((result, reason))
        pos += 24
    return BindAck(h.call_id, max_xmit, max_recv, assoc, tuple(results))


@dataclass(frozen=True, slots=True)
class Response:
    header: PduHeader
    alloc_hint: int
    context_id: int
    stub: memoryview


def parse_response(data: bytes | memoryview) -> Response:
    h = _header(data)
    if h.ptype != PType.RESPONSE:
        raise FramingError(f"expected RESPONSE, got PTYPE {h.ptype}")
    if h.frag_length != len(data) or len(data) < RESPONSE_HEADER_LEN:
        raise FramingError("RESPONSE length does not match its frag_length")
    hint, ctx, _cancel, _res = _RESP_FIXED.unpack_from(data, HEADER_LEN)
    end = len(data) - (h.auth_length + 8 if h.auth_length else 0)
    return Response(h, hint, ctx, memoryview(data)[RESPONSE_HEADER_LEN:end])


def parse_fault(data: bytes | memoryview) -> int:
    """The status of a FAULT PDU."""
    h = _header(data)
    if h.ptype != PType.FAULT or len(data) < 32:
        raise FramingError("not a FAULT PDU")
    return int(_FAULT_FIXED.unpack_from(data, HEADER_LEN)[4])


# --- server side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bind:
    call_id: int
    max_xmit: int
    max_recv: int
    assoc_group: int
    contexts: tuple[tuple[int, bytes, tuple[bytes, ...]], ...]  # (id, abstract, transfers)


def parse_bind(data: bytes | memoryview) -> Bind:
    h = _header(data)
    if h.ptype not in (PType.BIND, PType.ALTER_CONTEXT):
        raise FramingError(f"expected BIND, got PTYPE {h.ptype}")
    if len(data) < HEADER_LEN + _BIND_FIXED.size:
        raise FramingError("BIND truncated")
    max_xmit, max_recv, assoc, n, _r, _r2 = _BIND_FIXED.unpack_from(data, HEADER_LEN)
    pos = HEADER_LEN + _BIND_FIXED.size
    contexts = []
    for _ in range(n):
        if len(data) < pos + 24:
            raise FramingError("BIND context list truncated")
        ctx_id, n_ts, _ = struct.unpack_from("<HBB", data, pos)
        abstract = bytes(data[pos + 4 : pos + 24])
        pos += 24
        if len(data) < pos + 20 * n_ts:
            raise FramingError("BIND transfer syntaxes truncated")
        transfers = tuple(bytes(data[pos + 20 * i : pos + 20 * i + 20]) for i in range(n_ts))
        pos += 20 * n_ts
        contexts.append((ctx_id, abstract, transfers))
    return Bind(h.call_id, max_xmit, max_recv, assoc, tuple(contexts))


def build_bind_ack(
    call_id: int,
    max_xmit: int,
    max_recv: int,
    assoc_group: int,
    results: list[tuple[int, int, bytes]],  # (result, reason, transfer syntax)
    *,
    secondary_address: bytes = b"",
    ptype: int = PType.BIND_ACK,
) -> bytes:
    sec = secondary_address + b"\x00" if secondary_address else b""
    body = struct.pack("<HHIH", max_xmit, max_recv, assoc_group, len(sec)) + sec
    body += bytes(-(HEADER_LEN + len(body)) % 4)
    body += struct.pack("<BBH", len(results), 0, 0)
    for result, reason, ts in results:
        body += struct.pack("<HH", result, reason) + (ts if result == 0 else bytes(20))
    return _common(ptype, PFC_FIRST_FRAG | PFC_LAST_FRAG, HEADER_LEN + len(body), call_id) + body


@dataclass(frozen=True, slots=True)
class Request:
    header: PduHeader
    alloc_hint: int
    context_id: int
    opnum: int
    stub: memoryview


def parse_request(data: bytes | memoryview) -> Request:
    h = _header(data)
    if h.ptype != PType.REQUEST:
        raise FramingError(f"expected REQUEST, got PTYPE {h.ptype}")
    if h.frag_length != len(data) or len(data) < REQUEST_HEADER_LEN:
        raise FramingError("REQUEST length does not match its frag_length")
    hint, ctx, opnum = _REQ_FIXED.unpack_from(data, HEADER_LEN)
    start = REQUEST_HEADER_LEN + (16 if h.pfc_flags & PFC_OBJECT_UUID else 0)
    end = len(data) - (h.auth_length + 8 if h.auth_length else 0)
    if end < start:
        raise FramingError("REQUEST auth verifier overlaps its header")
    return Request(h, hint, ctx, opnum, memoryview(data)[start:end])


def build_response(
    call_id: int,
    stub: bytes | bytearray | memoryview,
    *,
    context_id: int = 0,
    flags: int = PFC_FIRST_FRAG | PFC_LAST_FRAG,
    alloc_hint: int | None = None,
) -> bytes:
    length = RESPONSE_HEADER_LEN + len(stub)
    if length > MAX_FRAG_LENGTH:
        raise ValueError(f"response fragment of {length} bytes exceeds 65535")
    hint = len(stub) if alloc_hint is None else alloc_hint
    return b"".join(
        (_common(PType.RESPONSE, flags, length, call_id),
         _RESP_FIXED.pack(hint, context_id, 0, 0), stub)
    )


def build_fault(call_id: int, status: int, *, context_id: int = 0) -> bytes:
    flags = PFC_FIRST_FRAG | PFC_LAST_FRAG | PFC_DID_NOT_EXECUTE
    return _common(PType.FAULT, flags, 32, call_id) + _FAULT_FIXED.pack(
        0, context_id, 0, 0, status, 0
    )
