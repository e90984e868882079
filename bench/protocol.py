"""The bench's own DCE/RPC interface: what a call carries and how every byte is checked.

Interface ``rpcproxy-bench`` v1.0 (UUID ``BENCH_IFACE``), little-endian NDR, one operation:

opnum 0, ``exchange``. Request stub (24-byte header + payload)::

    u32 magic 'RBQ1'  u32 seq  u32 want  u32 payload_len  u32 payload_crc  u32 flags
    payload (payload_len bytes)

``seq`` numbers the calls of one DCE/RPC connection 1, 2, 3, ...; the backend rejects
(FAULT) any request whose seq is not the previous one plus one (loss or reordering upstream)
or whose payload differs from the one expected for its seq (corruption upstream). Response stub::

    u32 magic 'RBP1'  u32 seq  u32 request_crc  u32 payload_len  u32 payload_crc  u32 status
    payload (want bytes)

The client checks the echoed seq and request CRC, the response payload's length and content,
the call_id and fragment flags of every fragment: loss, reordering or a flipped byte in either
direction raise ``IntegrityError``.

Payloads are slices of one fixed pseudo-random block at a seq-dependent offset, so building
them costs a memcpy, and each side checks a received payload by comparing it byte for byte
with the one expected for its seq (a memcmp: cheaper than computing a CRC and exact). The CRC
fields (cached per offset and length) are checked too, as a cross-check of the headers.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from dataclasses import dataclass

from bench import dcerpc

BENCH_IFACE = uuid.UUID("7f1c5b2e-6a0d-4d3c-9e51-2b8a4c6f0d17")
BENCH_IFACE_VERSION = (1, 0)
BENCH_SYNTAX = dcerpc.syntax(BENCH_IFACE, *BENCH_IFACE_VERSION)
OPNUM_EXCHANGE = 0

REQ_MAGIC = 0x31515242  # 'RBQ1'
RESP_MAGIC = 0x31504252  # 'RBP1'
STUB_HEADER = struct.Struct("<IIIIII")
STUB_HEADER_LEN = STUB_HEADER.size  # 24

# Fault status codes the bench backend returns (private range).
FAULT_BAD_CRC = 0x42450001
FAULT_BAD_SEQ = 0x42450002
FAULT_BAD_STUB = 0x42450003
FAULT_TOO_BIG = 0x42450004

# Request flags.
FLAG_NONE = 0

MAX_WANT = 16 << 20  # bound on one response

_BLOCK_LEN = 1 << 20
_MAX_PAYLOAD = 16 << 20
_rng = random.Random(0x5EED)
BLOCK = _rng.randbytes(_BLOCK_LEN + _MAX_PAYLOAD)
_BLOCK_VIEW = memoryview(BLOCK)
_OFFSETS = 509  # distinct offsets: seq % 509 (prime), stride 2053 bytes
_crc_cache: dict[tuple[int, int], int] = {}


class IntegrityError(Exception):
    """Data arrived lost, reordered or corrupted: the run is invalid."""


def payload(seq: int, length: int) -> memoryview:
    """The payload for call ``seq`` of ``length`` bytes (a view; copy when building)."""
    if length > _MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds {_MAX_PAYLOAD}")
    off = (seq % _OFFSETS) * 2053
    return _BLOCK_VIEW[off : off + length]


def payload_crc(seq: int, length: int) -> int:
    off = (seq % _OFFSETS) * 2053
    key = (off, length)
    crc = _crc_cache.get(key)
    if crc is None:
        if len(_crc_cache) > 4096:
            _crc_cache.clear()
        crc = zlib.crc32(_BLOCK_VIEW[off : off + length])
        _crc_cache[key] = crc
    return crc


def build_request_stub(seq: int, want: int, length: int, flags: int = FLAG_NONE) -> bytes:
    head = STUB_HEADER.pack(REQ_MAGIC, seq, want, length, payload_crc(seq, length), flags)
    return head + payload(seq, length)


@dataclass(frozen=True, slots=True)
class RequestStub:
    seq: int
    want: int
    payload_len: int
    crc: int  # computed over the payload that arrived
    flags: int


def check_request_stub(stub: bytes | memoryview) -> tuple[RequestStub | None, int]:
    """(parsed request, 0) or (None, fault status) for a request the backend must refuse."""
    if len(stub) < STUB_HEADER_LEN:
        return None, FAULT_BAD_STUB
    magic, seq, want, length, crc, flags = STUB_HEADER.unpack_from(stub, 0)
    if magic != REQ_MAGIC or length != len(stub) - STUB_HEADER_LEN:
        return None, FAULT_BAD_STUB
    if want > MAX_WANT or length > _MAX_PAYLOAD:
        return None, FAULT_TOO_BIG
    if crc != payload_crc(seq, length) or not _is_payload(stub, seq, length):
        return None, FAULT_BAD_CRC
    return RequestStub(seq, want, length, crc, flags), 0


def _is_payload(stub: bytes | memoryview, seq: int, length: int) -> bool:
    """The payload after the stub header is exactly ``payload(seq, length)``.

    Comparing bytes (memcmp) is several times cheaper than a CRC of the same bytes and
    catches every changed byte, not just most."""
    off = (seq % _OFFSETS) * 2053
    got = stub[STUB_HEADER_LEN:]
    return bytes(got) == BLOCK[off : off + length]


def build_response_stub(seq: int, request_crc: int, want: int) -> tuple[bytes, memoryview]:
    """Header + payload as two pieces (the caller fragments them)."""
    head = STUB_HEADER.pack(RESP_MAGIC, seq, request_crc, want, payload_crc(seq, want), 0)
    return head, payload(seq, want)


def check_response_stub(stub: bytes | memoryview, seq: int, want: int,
                        request_crc: int) -> None:
    """Raise IntegrityError unless ``stub`` is the correct answer to call ``seq``."""
    if len(stub) < STUB_HEADER_LEN:
        raise IntegrityError(f"call {seq}: response stub of {len(stub)} bytes")
    magic, rseq, rcrc, length, crc, status = STUB_HEADER.unpack_from(stub, 0)
    if magic != RESP_MAGIC:
        raise IntegrityError(f"call {seq}: response stub magic 0x{magic:08x}")
    if rseq != seq:
        raise IntegrityError(f"call {seq}: response is for call {rseq} (lost or reordered)")
    if rcrc != request_crc:
        raise IntegrityError(f"call {seq}: the backend saw a request with another CRC")
    if length != want or len(stub) - STUB_HEADER_LEN != want:
        raise IntegrityError(
            f"call {seq}: response payload {len(stub) - STUB_HEADER_LEN} bytes, "
            f"announced {length}, wanted {want}")
    if crc != payload_crc(seq, want) or not _is_payload(stub, seq, want):
        raise IntegrityError(f"call {seq}: response payload corrupted (content mismatch)")
