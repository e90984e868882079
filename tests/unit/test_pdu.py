"""Unit tests for dcerpc.pdu: the common header and the stream framer."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import dcerpc as bench_dcerpc
from dcerpc.pdu import (
    CLIENT_PTYPES,
    HEADER_LEN,
    SERVER_PTYPES,
    FramingError,
    Pdu,
    PduFramer,
    PduHeader,
    PType,
    parse_header,
    single_pdu_ptype,
)
from rpcproxy.errors import RPC_S_PROTOCOL_ERROR, ProtocolError, RpcProxyError, protocol_error


def header(
    *,
    ptype: int = PType.REQUEST,
    pfc: int = 0x03,
    little: bool = True,
    frag_length: int = HEADER_LEN,
    auth_length: int = 0,
    call_id: int = 1,
    vers: int = 5,
    minor: int = 0,
) -> bytes:
    drep = b"\x10\x00\x00\x00" if little else b"\x00\x00\x00\x00"
    fmt = "<HHI" if little else ">HHI"
    return bytes([vers, minor, ptype, pfc]) + drep + struct.pack(
        fmt, frag_length, auth_length, call_id
    )


def pdu(body_len: int = 8, *, ptype: int = PType.REQUEST, little: bool = True,
        call_id: int = 1, fill: int = 0xAB, auth_length: int = 0) -> bytes:
    return header(ptype=ptype, little=little, frag_length=HEADER_LEN + body_len,
                  call_id=call_id, auth_length=auth_length) + bytes([fill]) * body_len


# --- parse_header ---------------------------------------------------------------------------


def test_little_endian_header() -> None:
    data = header(ptype=PType.BIND, pfc=0x07, frag_length=0x1234, auth_length=0x10,
                  call_id=0xDEADBEEF)
    h = parse_header(data)
    assert h == PduHeader(PType.BIND, 0x07, True, 0x1234, 0x10, 0xDEADBEEF)


def test_little_endian_header_exact_bytes() -> None:
    raw = bytes.fromhex("05 00 00 03 10 00 00 00 20 00 04 00 07 00 00 00")
    assert parse_header(raw) == PduHeader(0, 3, True, 32, 4, 7)


def test_big_endian_header() -> None:
    raw = bytes.fromhex("05 00 02 03 00 00 00 00 01 20 00 08 00 00 00 2a")
    h = parse_header(raw)
    assert h == PduHeader(PType.RESPONSE, 3, False, 0x0120, 8, 42)


def test_big_endian_and_little_endian_differ() -> None:
    # The same bytes give a different frag_length depending on drep[0].
    le = header(frag_length=0x0118, little=True)
    be = bytearray(le)
    be[4] = 0x00
    assert parse_header(le).frag_length == 0x0118
    assert parse_header(bytes(be)).frag_length == 0x1801


def test_version_5_1_accepted() -> None:
    assert parse_header(header(minor=1)).frag_length == HEADER_LEN


@pytest.mark.parametrize(("vers", "minor"), [(4, 0), (5, 2), (6, 0), (0, 0), (5, 0xFF), (0x14, 5)])
def test_bad_version(vers: int, minor: int) -> None:
    with pytest.raises(FramingError, match="version"):
        parse_header(header(vers=vers, minor=minor))


@pytest.mark.parametrize("frag_length", [0, 1, 15])
@pytest.mark.parametrize("little", [True, False])
def test_frag_length_shorter_than_header(frag_length: int, little: bool) -> None:
    with pytest.raises(FramingError, match="shorter"):
        parse_header(header(frag_length=frag_length, little=little))


def test_frag_length_exactly_header_ok() -> None:
    assert parse_header(header(frag_length=16)).frag_length == 16


def test_max_frag_length() -> None:
    assert parse_header(header(frag_length=0xFFFF)).frag_length == 0xFFFF
    assert parse_header(header(frag_length=0xFFFF, little=False)).frag_length == 0xFFFF


@pytest.mark.parametrize("little", [True, False])
def test_auth_length_too_big(little: bool) -> None:
    with pytest.raises(FramingError, match="auth_length"):
        parse_header(header(frag_length=40, auth_length=25, little=little))
    with pytest.raises(FramingError, match="auth_length"):
        parse_header(header(frag_length=16, auth_length=1, little=little))


def test_auth_length_fills_body_ok() -> None:
    assert parse_header(header(frag_length=40, auth_length=24)).auth_length == 24


@pytest.mark.parametrize("n", range(HEADER_LEN))
def test_truncated_header(n: int) -> None:
    with pytest.raises(FramingError, match="truncated"):
        parse_header(header()[:n])


def test_offset_and_buffer_types() -> None:
    data = b"\xff" * 5 + header(frag_length=99, call_id=3)
    for buf in (data, bytearray(data), memoryview(data)):
        assert parse_header(buf, 5) == PduHeader(0, 3, True, 99, 0, 3)
    with pytest.raises(FramingError, match="truncated"):
        parse_header(data, 6)


def test_framing_error_is_the_codecs_own_and_protocol_error_derives_from_it() -> None:
    # The codec imports nothing of the proxy: its errors are FramingError, not RpcProxyError.
    with pytest.raises(FramingError) as info:
        parse_header(b"")
    assert not isinstance(info.value, RpcProxyError)
    assert info.value.reason == str(info.value) == "truncated PDU header: 0 of 16 bytes"
    # The proxy's ProtocolError is both: one `except FramingError` catches every layer's.
    err = ProtocolError("bad RTS")
    assert isinstance(err, FramingError) and isinstance(err, RpcProxyError)
    assert err.reason == str(err) == "bad RTS" and err.rpc_error == RPC_S_PROTOCOL_ERROR


def test_protocol_error_of_a_framing_error_keeps_the_reason_and_gets_the_rpc_code() -> None:
    bare = FramingError("frag_length 3 is shorter than the header")
    converted = protocol_error(bare)
    assert type(converted) is ProtocolError
    assert converted.reason == bare.reason and converted.rpc_error == RPC_S_PROTOCOL_ERROR
    already = ProtocolError("x")
    assert protocol_error(already) is already


def test_ptype_sets() -> None:
    assert PType.RTS not in CLIENT_PTYPES | SERVER_PTYPES
    assert not CLIENT_PTYPES & SERVER_PTYPES
    assert set(CLIENT_PTYPES) == {0, 11, 14, 16, 18, 19}
    assert set(SERVER_PTYPES) == {2, 3, 12, 13, 15, 17}
    # connectionless-only types are in neither set
    for cl in range(1, 11):
        if cl != 2 and cl != 3:
            assert cl not in CLIENT_PTYPES and cl not in SERVER_PTYPES


# --- PduFramer -------------------------------------------------------------------------------


STREAM = [
    pdu(0, call_id=1),
    pdu(8, call_id=2, ptype=PType.BIND),
    pdu(100, call_id=3, little=False, fill=0x05),
    pdu(4, call_id=4, ptype=PType.RTS),
    pdu(300, call_id=5, auth_length=16),
]
STREAM_BYTES = b"".join(STREAM)


def test_one_pdu() -> None:
    f = PduFramer()
    out = f.feed(STREAM[1])
    assert out == [Pdu(parse_header(STREAM[1]), STREAM[1])]
    assert isinstance(out[0].data, bytes)
    assert f.buffered == 0


def test_empty_feed() -> None:
    f = PduFramer()
    assert f.feed(b"") == []
    assert f.buffered == 0


def test_many_pdus_in_one_chunk() -> None:
    f = PduFramer()
    out = f.feed(STREAM_BYTES)
    assert [p.data for p in out] == STREAM
    assert [p.header.call_id for p in out] == [1, 2, 3, 4, 5]
    assert out[2].header.little_endian is False
    assert f.buffered == 0


def test_byte_at_a_time() -> None:
    f = PduFramer()
    got: list[bytes] = []
    ends = set()
    pos = 0
    for p in STREAM:
        pos += len(p)
        ends.add(pos)
    for i in range(len(STREAM_BYTES)):
        out = f.feed(STREAM_BYTES[i : i + 1])
        if i + 1 in ends:
            assert len(out) == 1
        else:
            assert out == []
        got.extend(p.data for p in out)
        assert f.buffered == (i + 1) - sum(len(g) for g in got)
    assert got == STREAM


def test_split_everywhere_two_chunks() -> None:
    for cut in range(len(STREAM_BYTES) + 1):
        f = PduFramer()
        got = [p.data for p in f.feed(STREAM_BYTES[:cut])]
        got += [p.data for p in f.feed(STREAM_BYTES[cut:])]
        assert got == STREAM, cut
        assert f.buffered == 0


def test_split_everywhere_three_chunks_small() -> None:
    data = b"".join(STREAM[:3])
    for a in range(0, len(data) + 1, 3):
        for b in range(a, len(data) + 1, 7):
            f = PduFramer()
            got = [p.data for p in f.feed(data[:a])]
            got += [p.data for p in f.feed(memoryview(data[a:b]))]
            got += [p.data for p in f.feed(bytearray(data[b:]))]
            assert got == STREAM[:3]


def test_partial_stays_buffered() -> None:
    f = PduFramer()
    assert f.feed(STREAM[2][:20]) == []
    assert f.buffered == 20
    assert [p.data for p in f.feed(STREAM[2][20:] + STREAM[0][:3])] == [STREAM[2]]
    assert f.buffered == 3


def test_broken_framer_stays_broken() -> None:
    f = PduFramer()
    with pytest.raises(FramingError):
        f.feed(header(vers=4))
    with pytest.raises(FramingError, match="already lost"):
        f.feed(STREAM[0])
    with pytest.raises(FramingError):
        f.feed(b"")


def test_bad_pdu_after_good_ones_raises() -> None:
    f = PduFramer()
    with pytest.raises(FramingError, match="shorter"):
        f.feed(STREAM[0] + header(frag_length=3))
    with pytest.raises(FramingError):
        f.feed(STREAM[1])


def test_bad_header_split_across_chunks() -> None:
    f = PduFramer()
    bad = header(frag_length=40, auth_length=30)
    assert f.feed(STREAM[0] + bad[:10]) == [Pdu(parse_header(STREAM[0]), STREAM[0])]
    with pytest.raises(FramingError, match="auth_length"):
        f.feed(bad[10:])


def test_garbage_never_frames() -> None:
    f = PduFramer()
    with pytest.raises(FramingError):
        f.feed(b"GET / HTTP/1.1\r\n\r\n")


# --- property tests ---------------------------------------------------------------------------


pdu_strategy = st.builds(
    pdu,
    st.integers(0, 600),
    ptype=st.sampled_from(list(PType)),
    little=st.booleans(),
    call_id=st.integers(0, 2**32 - 1),
    fill=st.integers(0, 255),
)


@settings(max_examples=150, deadline=None)
@given(pdus=st.lists(pdu_strategy, max_size=8), data=st.data())
def test_random_splits_give_same_pdus(pdus: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    f = PduFramer()
    got: list[Pdu] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got.extend(f.feed(stream[prev:cut]))
        prev = cut
    assert [p.data for p in got] == pdus
    assert [p.header for p in got] == [parse_header(p) for p in pdus]
    assert f.buffered == 0


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=80), max_size=6))
def test_random_bytes_only_protocol_error(chunks: list[bytes]) -> None:
    f = PduFramer()
    fed = b""
    out: list[Pdu] = []
    try:
        for c in chunks:
            fed += c
            out.extend(f.feed(c))
    except FramingError:
        return
    # Whatever came out is an exact prefix of the input, the rest is buffered.
    joined = b"".join(p.data for p in out)
    assert fed.startswith(joined)
    assert f.buffered == len(fed) - len(joined)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_random_header_only_protocol_error(raw: bytes) -> None:
    try:
        h = parse_header(raw)
    except FramingError:
        return
    assert raw[0] == 5 and raw[1] in (0, 1)
    assert HEADER_LEN <= h.frag_length <= 0xFFFF
    assert h.auth_length <= h.frag_length - HEADER_LEN


# --- single_pdu_ptype: the data paths' fast-path test --------------------------------------


@pytest.mark.parametrize("little", [True, False])
def test_single_pdu_ptype_of_exactly_one_pdu(little: bool) -> None:
    one = pdu(40, ptype=PType.RESPONSE, little=little)
    assert single_pdu_ptype(one) == PType.RESPONSE
    assert single_pdu_ptype(one + one) == -1  # two PDUs
    assert single_pdu_ptype(one[:-1]) == -1  # short of its frag_length
    assert single_pdu_ptype(one[:10]) == -1  # not even a header


@pytest.mark.parametrize("bad", [
    header(vers=4, frag_length=HEADER_LEN),
    header(minor=2, frag_length=HEADER_LEN),
    header(frag_length=HEADER_LEN, auth_length=1),
    header(frag_length=HEADER_LEN + 8, auth_length=9) + bytes(8),
])
def test_single_pdu_ptype_refuses_what_parse_header_refuses(bad: bytes) -> None:
    assert single_pdu_ptype(bad) == -1
    with pytest.raises(FramingError):
        parse_header(bad)


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=64))
def test_single_pdu_ptype_agrees_with_the_framer(data: bytes) -> None:
    """-1, or the PTYPE of the one PDU the framer cuts from exactly these bytes."""
    got = single_pdu_ptype(data)
    try:
        pdus = PduFramer().feed(data)
        framed = pdus[0].header.ptype if len(pdus) == 1 and len(pdus[0].data) == len(data) else -1
    except FramingError:
        framed = -1
    assert got == framed


# --- the bench's DCE/RPC toolkit parses headers through this codec --------------------------


def test_bench_has_no_header_codec_of_its_own() -> None:
    names = vars(bench_dcerpc)
    assert names["parse_header"] is parse_header
    assert names["FramingError"] is FramingError and names["PType"] is PType
    # no second error class, header type or PTYPE table
    for name in ("DceRpcError", "Header", "REQUEST", "RESPONSE", "FAULT", "BIND", "BIND_ACK",
                 "RTS", "MAX_FRAG"):
        assert not hasattr(bench_dcerpc, name), name


@pytest.mark.parametrize("parse", [bench_dcerpc.parse_request, bench_dcerpc.parse_response,
                                   bench_dcerpc.parse_bind, bench_dcerpc.parse_bind_ack,
                                   bench_dcerpc.parse_fault])
def test_bench_parsers_apply_the_codecs_header_checks(parse: Callable[[bytes], object]) -> None:
    with pytest.raises(FramingError, match="version"):
        parse(header(vers=4, frag_length=24) + bytes(8))
    with pytest.raises(FramingError, match="auth_length"):
        parse(header(frag_length=24, auth_length=9) + bytes(8))  # the bench's own parser let it by
    with pytest.raises(FramingError, match="big-endian"):
        parse(header(little=False, frag_length=24) + bytes(8))


def test_bench_builders_frame_through_the_codec() -> None:
    built = bench_dcerpc.build_request(7, 3, b"stub-bytes")
    (frame,) = PduFramer().feed(built)
    assert frame.header == PduHeader(PType.REQUEST, 0x03, True, len(built), 0, 7)
    fault = bench_dcerpc.build_fault(9, bench_dcerpc.NCA_S_UNK_IF)
    assert parse_header(fault).pfc_flags == 0x23 and bench_dcerpc.parse_fault(fault) == 0x1C010003
