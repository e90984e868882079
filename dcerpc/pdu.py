"""DCE/RPC connection-oriented PDU header and stream framing.

Theory of operation
-------------------
Every connection-oriented DCE/RPC PDU (C706 chapter 12, [MS-RPCE] 2.2.2) and
every RTS PDU ([MS-RPCH] 2.2.3) starts with the same 16-byte common header::

    0 rpc_vers(5) 1 rpc_vers_minor 2 PTYPE 3 pfc_flags 4 packed_drep[4]
    8 frag_length u16 10 auth_length u16 12 call_id u32

The proxy only ever needs the header: RPC PDUs are forwarded byte for byte, so
``PduFramer`` cuts a byte stream into whole fragments by ``frag_length``
(decoded in the byte order announced by ``drep[0]``) and hands out each
fragment as ``bytes`` together with its parsed header. Bodies are never
decoded here. Anything that cannot be a PDU (wrong version, a length shorter
than the header, an ``auth_length`` that does not fit) raises ``FramingError``
with a reason; the caller closes the channel. The framer never holds more than
one partial fragment, so its buffer stays below ``MAX_FRAG_LENGTH`` bytes
(``frag_length`` is a u16): no separate bound is needed.

No I/O happens here: callers feed bytes and get PDUs back. Nothing here imports
the rest of the project; every package that speaks DCE/RPC (the proxy, the
bench, the tests) uses this one header codec and this one ``FramingError``.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER_LEN = 16
RPC_VERSION = 5
RPC_VERSION_MINORS = (0, 1)  # C706 says 0; [MS-RPCE] and Wireshark accept 1
MAX_FRAG_LENGTH = 0xFFFF  # frag_length is a u16 (C706 12.6.3.1)


class FramingError(Exception):
    """Bytes that cannot be a DCE/RPC PDU: the stream has lost its framing.

    ``reason`` says what was wrong, for one log line. ``rpcproxy.errors.ProtocolError``
    derives from this class, so ``except FramingError`` catches every "the peer's bytes
    break a wire rule" error of every layer.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class PType(enum.IntEnum):
    """PDU types (C706 12.6.3.1, [MS-RPCH] 2.2.3.1 for RTS)."""

    REQUEST = 0
    PING = 1
    RESPONSE = 2
    FAULT = 3
    WORKING = 4
    NOCALL = 5
    REJECT = 6
    ACK = 7
    CL_CANCEL = 8
    FACK = 9
    CANCEL_ACK = 10
    BIND = 11
    BIND_ACK = 12
    BIND_NAK = 13
    ALTER_CONTEXT = 14
    ALTER_CONTEXT_RESP = 15
    AUTH3 = 16
    SHUTDOWN = 17
    CO_CANCEL = 18
    ORPHANED = 19
    RTS = 20


# PDU types a client may send on a connection-oriented association.
CLIENT_PTYPES = frozenset(
    {PType.REQUEST, PType.BIND, PType.ALTER_CONTEXT, PType.AUTH3, PType.CO_CANCEL, PType.ORPHANED}
)
# PDU types a connection-oriented server may send.
SERVER_PTYPES = frozenset(
    {
        PType.RESPONSE,
        PType.FAULT,
        PType.BIND_ACK,
        PType.BIND_NAK,
        PType.ALTER_CONTEXT_RESP,
        PType.SHUTDOWN,
    }
)

# pfc_flags bits (C706 12.6.3.1).
PFC_FIRST_FRAG = 0x01
PFC_LAST_FRAG = 0x02
PFC_DID_NOT_EXECUTE = 0x20
PFC_OBJECT_UUID = 0x80


class PduHeader(NamedTuple):
    """The fields of the 16-byte common header the proxy cares about."""

    ptype: int
    pfc_flags: int
    little_endian: bool
    frag_length: int
    auth_length: int
    call_id: int


# The whole common header in one unpack: version, minor, ptype, flags, drep[0], then the
# three length/id fields in the byte order drep[0] declares.
_HEAD_LE = struct.Struct("<BBBBB3xHHI")
_HEAD_BE = struct.Struct(">BBBBB3xHHI")


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> PduHeader:
    """Parse and sanity-check a common header at ``data[offset:offset+16]``."""
    if len(data) - offset < HEADER_LEN:
        raise FramingError(f"truncated PDU header: {len(data) - offset} of {HEADER_LEN} bytes")
    vers, minor, ptype, flags, drep0, frag_length, auth_length, call_id = (
        _HEAD_LE.unpack_from(data, offset))
    little = bool(drep0 & 0xF0)
    if not little:
        _, _, _, _, _, frag_length, auth_length, call_id = _HEAD_BE.unpack_from(data, offset)
    if vers != RPC_VERSION or minor not in RPC_VERSION_MINORS:
        raise FramingError(f"not a DCE/RPC v5 PDU (version {vers}.{minor})")
    if frag_length < HEADER_LEN:
        raise FramingError(f"frag_length {frag_length} is shorter than the header")
    if auth_length > frag_length - HEADER_LEN:
        raise FramingError(f"auth_length {auth_length} does not fit in frag_length {frag_length}")
    return PduHeader(ptype, flags, little, frag_length, auth_length, call_id)


_BE_LENGTHS = struct.Struct(">HH")


def single_pdu_ptype(data: bytes) -> int:
    """The PTYPE of ``data`` when it is exactly one well-formed PDU, else -1.

    Never raises: the data paths' fast-path test (one read = one PDU is the common case);
    anything else goes through ``PduFramer``, which reports what is wrong.
    """
    if len(data) < HEADER_LEN:
        return -1
    vers, minor, ptype, _flags, drep0, frag_length, auth_length, _call_id = (
        _HEAD_LE.unpack_from(data))
    if not drep0 & 0xF0:
        frag_length, auth_length = _BE_LENGTHS.unpack_from(data, 8)
    if (vers != RPC_VERSION or minor not in RPC_VERSION_MINORS or frag_length != len(data)
            or auth_length > frag_length - HEADER_LEN):
        return -1
    return int(ptype)


class Pdu(NamedTuple):
    """One whole fragment: its parsed header and its exact bytes."""

    header: PduHeader
    data: bytes


class PduFramer:
    """Cuts a byte stream into whole PDUs by frag_length.

    ``feed()`` returns every PDU completed by the new bytes; a partial PDU
    stays buffered. After a ``FramingError`` the framer is unusable (the
    stream has lost its framing and the channel must close).
    """

    __slots__ = ("_buf", "_broken")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole PDU."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Pdu]:
        if self._broken:
            raise FramingError("stream framing already lost")
        buf = self._buf
        if buf:
            # Finish the PDU a previous read left partial; then continue on one bytes object.
            buf += data
            chunk = bytes(buf)
            buf.clear()
        else:
            chunk = data if isinstance(data, bytes) else bytes(data)
        out: list[Pdu] = []
        pos = 0
        end = len(chunk)
        try:
            while end - pos >= HEADER_LEN:
                header = parse_header(chunk, pos)
                flen = header.frag_length
                if end - pos < flen:
                    break
                # A read that is exactly one PDU (the common case) is passed on uncopied.
                out.append(Pdu(header, chunk if flen == end else chunk[pos : pos + flen]))
                pos += flen
        except FramingError:
            self._broken = True
            raise
        if pos < end:
            buf += memoryview(chunk)[pos:]
        return out
