"""Unit tests for rpcproxy.rpch.rts: commands, RTS PDU codec, identify(), builders.

Byte-exact oracles: hand-written worked examples and a reconstruction of Samba's client
(tests/support/rts_captures.py), and PDUs built by impacket's own client code.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from impacket.dcerpc.v5 import rpch

from dcerpc.pdu import HEADER_LEN, PType, parse_header
from rpcproxy.errors import ProtocolError
from rpcproxy.rpch import rts
from rpcproxy.rpch.rts import (
    ANCE,
    AssociationGroupId,
    ChannelLifetime,
    ClientAddress,
    ClientKeepalive,
    CommandType,
    ConnectionTimeout,
    Cookie,
    Destination,
    Empty,
    FlowControlAck,
    ForwardDestination,
    Kind,
    NegativeANCE,
    Padding,
    PingTrafficSentNotify,
    ReceiveWindowSize,
    RtsFlags,
    RtsPdu,
    Version,
    decode_rts,
    encode_command,
    identify,
)
from tests.support import rts_captures as cap

C1 = bytes(range(16))
C2 = bytes(range(16, 32))
C3 = bytes(range(32, 48))
C4 = bytes(range(0xF0, 0x100))


def rts_bytes(flags: int, ncmds: int, body: bytes, **over: int) -> bytes:
    """Hand-built RTS PDU with overridable header fields."""
    f = {
        "vers": 5, "minor": 0, "ptype": 20, "pfc": 3, "drep0": 0x10,
        "frag": 20 + len(body), "auth": 0, "call_id": 0,
    }
    f.update(over)
    return (
        bytes([f["vers"], f["minor"], f["ptype"], f["pfc"], f["drep0"], 0, 0, 0])
        + struct.pack("<HHIHH", f["frag"], f["auth"], f["call_id"], flags, ncmds)
        + body
    )


# --- commands: exact encoding and round trip ([MS-RPCH] 2.2.3.5) ------------------------------

V4 = ipaddress.IPv4Address("192.168.1.2")
V6 = ipaddress.IPv6Address("2001:db8::1")

COMMAND_CASES: list[tuple[rts.Command, str]] = [
    (ReceiveWindowSize(0x10000), "00000000 00000100"),
    (FlowControlAck(0x9000, 0x10000, C1), "01000000 00900000 00000100" + C1.hex()),
    (ConnectionTimeout(120_000), "02000000 c0d40100"),
    (Cookie(C2), "03000000" + C2.hex()),
    (ChannelLifetime(0x40000000), "04000000 00000040"),
    (ClientKeepalive(300_000), "05000000 e0930400"),
    (Version(), "06000000 01000000"),
    (Empty(), "07000000"),
    (Padding(3), "08000000 03000000 000000"),
    (Padding(0), "08000000 00000000"),
    (NegativeANCE(), "09000000"),
    (ANCE(), "0a000000"),
    (ClientAddress(V4), "0b000000 00000000 c0a80102" + "00" * 12),
    (ClientAddress(V6), "0b000000 01000000 20010db8000000000000000000000001" + "00" * 12),
    (AssociationGroupId(C3), "0c000000" + C3.hex()),
    (Destination(ForwardDestination.OUT_PROXY), "0d000000 03000000"),
    (PingTrafficSentNotify(1031), "0e000000 07040000"),
]

# Command sizes from the [MS-RPCH] 2.2.3.5 table (type included).
SIZES = {
    ReceiveWindowSize: 8, FlowControlAck: 28, ConnectionTimeout: 8, Cookie: 20,
    ChannelLifetime: 8, ClientKeepalive: 8, Version: 8, Empty: 4, NegativeANCE: 4, ANCE: 4,
    AssociationGroupId: 20, Destination: 8, PingTrafficSentNotify: 8,
}


def test_every_command_type_has_a_case() -> None:
    assert {c.TYPE for c, _ in COMMAND_CASES} == set(CommandType)
    assert [int(t) for t in CommandType] == list(range(15))


@pytest.mark.parametrize(("command", "hexdump"), COMMAND_CASES, ids=lambda x: repr(x)[:40])
def test_command_bytes_and_round_trip(command: rts.Command, hexdump: str) -> None:
    expected = bytes.fromhex(hexdump)
    assert encode_command(command) == expected
    if type(command) in SIZES:
        assert len(expected) == SIZES[type(command)]
    pdu = RtsPdu(RtsFlags.NONE, (command,))
    data = pdu.encode()
    assert data == rts_bytes(0, 1, expected)
    assert decode_rts(data) == pdu
    assert decode_rts(data).commands[0] == command


def test_client_address_sizes() -> None:
    assert len(encode_command(ClientAddress(V4))) == 24
    assert len(encode_command(ClientAddress(V6))) == 36


def test_many_commands_round_trip() -> None:
    cmds = tuple(c for c, _ in COMMAND_CASES)
    pdu = RtsPdu(0x7F, cmds)
    data = pdu.encode()
    assert len(data) == 20 + sum(len(encode_command(c)) for c in cmds)
    assert decode_rts(data) == pdu
    assert decode_rts(data).encode() == data


def test_padding_bytes_ignored_on_receipt() -> None:
    body = bytes.fromhex("08000000 02000000 abcd")
    assert decode_rts(rts_bytes(1, 1, body)).commands == (Padding(2),)


def test_client_address_pad_ignored_on_receipt() -> None:
    body = bytes.fromhex("0b000000 00000000 0a000001") + b"\xee" * 12
    assert decode_rts(rts_bytes(0, 1, body)).commands == (ClientAddress(
        ipaddress.IPv4Address("10.0.0.1")),)


def test_version_value_kept() -> None:
    # Version is sent as 1 and ignored on receipt: any value decodes.
    assert decode_rts(rts_bytes(0, 1, bytes.fromhex("06000000 07000000"))).commands == (
        Version(7),)


# --- value range checks -------------------------------------------------------------------------


def one(ctype: int, payload: bytes) -> bytes:
    return rts_bytes(0, 1, struct.pack("<I", ctype) + payload)


@pytest.mark.parametrize(
    ("ctype", "low", "high"),
    [
        (CommandType.RECEIVE_WINDOW_SIZE, 0x2000, 0x40000),
        (CommandType.CONNECTION_TIMEOUT, 120_000, 14_400_000),
        (CommandType.CHANNEL_LIFETIME, 0x20000, 0x80000000),
    ],
)
def test_u32_ranges(ctype: int, low: int, high: int) -> None:
    for ok in (low, low + 1, high - 1, high):
        decode_rts(one(ctype, struct.pack("<I", ok)))
    for bad in (0, low - 1, high + 1, 0xFFFFFFFF):
        with pytest.raises(ProtocolError, match="outside"):
            decode_rts(one(ctype, struct.pack("<I", bad)))


def test_client_keepalive_lenient() -> None:
    # Spec: 0 or 60000..0xFFFFFFFF, 0 meaning 300000; receivers are lenient (protocol notes 5).
    for value in (0, 1, 59_999, 60_000, 0xFFFFFFFF):
        assert decode_rts(one(CommandType.CLIENT_KEEPALIVE, struct.pack("<I", value))).commands \
            == (ClientKeepalive(value),)


def test_padding_range() -> None:
    pdu, end = Padding.parse(struct.pack("<I", 0xFFFF) + bytes(0xFFFF), 0)
    assert pdu == Padding(0xFFFF) and end == 4 + 0xFFFF
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_rts(one(CommandType.PADDING, struct.pack("<I", 0x10000)))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_rts(one(CommandType.PADDING, struct.pack("<I", 0xFFFFFFFF)))
    with pytest.raises(ProtocolError, match="truncated"):
        decode_rts(one(CommandType.PADDING, struct.pack("<I", 5) + bytes(4)))


@pytest.mark.parametrize("value", [4, 5, 0xFFFFFFFF])
def test_bad_destination(value: int) -> None:
    with pytest.raises(ProtocolError, match="forward destination"):
        decode_rts(one(CommandType.DESTINATION, struct.pack("<I", value)))


@pytest.mark.parametrize("kind", [2, 3, 0xFFFFFFFF])
def test_bad_client_address_type(kind: int) -> None:
    with pytest.raises(ProtocolError, match="neither"):
        decode_rts(one(CommandType.CLIENT_ADDRESS, struct.pack("<I", kind) + bytes(28)))


@pytest.mark.parametrize(
    ("ctype", "payload"),
    [
        (CommandType.RECEIVE_WINDOW_SIZE, b"\x00\x00"),
        (CommandType.FLOW_CONTROL_ACK, bytes(23)),
        (CommandType.CONNECTION_TIMEOUT, b""),
        (CommandType.COOKIE, bytes(15)),
        (CommandType.CHANNEL_LIFETIME, b"\x00"),
        (CommandType.CLIENT_KEEPALIVE, b"\x00\x00\x00"),
        (CommandType.VERSION, b""),
        (CommandType.PADDING, b"\x01\x00"),
        (CommandType.CLIENT_ADDRESS, b"\x00\x00\x00\x00" + bytes(15)),
        (CommandType.CLIENT_ADDRESS, b"\x01\x00\x00\x00" + bytes(27)),
        (CommandType.ASSOCIATION_GROUP_ID, bytes(8)),
        (CommandType.DESTINATION, b"\x00"),
        (CommandType.PING_TRAFFIC_SENT_NOTIFY, b""),
    ],
)
def test_truncated_command(ctype: int, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        decode_rts(one(ctype, payload))


# --- header checks in decode_rts ------------------------------------------------------------------

VALID = rts.conn_a1(C1, C2, 0x10000)


def test_valid_baseline() -> None:
    assert identify(decode_rts(VALID)) is Kind.CONN_A1
    assert decode_rts(rts_bytes(1, 0, b"")) == RtsPdu(1, ())


def test_minor_version_1_accepted() -> None:
    data = bytearray(VALID)
    data[1] = 1
    assert decode_rts(bytes(data)) == decode_rts(VALID)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"vers": 4}, "version"),
        ({"minor": 2}, "version"),
        ({"ptype": 0}, "not RTS"),
        ({"ptype": 2}, "not RTS"),
        ({"ptype": 21}, "not RTS"),
        ({"pfc": 0x01}, "pfc_flags"),
        ({"pfc": 0x02}, "pfc_flags"),
        ({"pfc": 0x07}, "pfc_flags"),
        ({"pfc": 0x83}, "pfc_flags"),
        ({"drep0": 0x00}, "little-endian"),
        ({"drep0": 0x11}, "little-endian"),
        ({"auth": 1}, "auth"),
        ({"call_id": 1}, "call_id"),
        ({"call_id": 0x80000000}, "call_id"),
        ({"frag": 75}, "frag_length"),
        ({"frag": 77}, "frag_length"),
        ({"frag": 0}, "frag_length"),
    ],
)
def test_header_checks(over: dict[str, int], match: str) -> None:
    body = VALID[20:]
    with pytest.raises(ProtocolError, match=match):
        decode_rts(rts_bytes(0, 4, body, **over))
    # the same body with a good header decodes
    decode_rts(rts_bytes(0, 4, body))


@pytest.mark.parametrize("n", [0, 1, 16, 19])
def test_shorter_than_rts_header(n: int) -> None:
    with pytest.raises(ProtocolError, match="shorter"):
        decode_rts(VALID[:n])


def test_truncated_pdu_is_frag_length_mismatch() -> None:
    with pytest.raises(ProtocolError, match="frag_length"):
        decode_rts(VALID[:-1])
    with pytest.raises(ProtocolError, match="frag_length"):
        decode_rts(VALID + b"\x00")


def test_stray_bytes_after_commands() -> None:
    body = VALID[20:] + b"\x00\x00\x00"
    with pytest.raises(ProtocolError, match="stray"):
        decode_rts(rts_bytes(0, 4, body))
    with pytest.raises(ProtocolError, match="stray"):
        decode_rts(rts_bytes(0, 3, VALID[20:]))
    with pytest.raises(ProtocolError, match="stray"):
        decode_rts(rts_bytes(0, 0, b"\x07\x00\x00\x00"))


def test_too_few_commands() -> None:
    with pytest.raises(ProtocolError, match="announces 5 commands but has 4"):
        decode_rts(rts_bytes(0, 5, VALID[20:]))
    with pytest.raises(ProtocolError, match="announces"):
        decode_rts(rts_bytes(0, 0xFFFF, b""))
    # a partial command type is not a command
    with pytest.raises(ProtocolError, match="announces"):
        decode_rts(rts_bytes(0, 1, b"\x07\x00"))


@pytest.mark.parametrize("ctype", [0xF, 0x10, 0x100, 0xFFFFFFFF])
def test_unknown_command_type(ctype: int) -> None:
    with pytest.raises(ProtocolError, match="unknown RTS command"):
        decode_rts(rts_bytes(0, 1, struct.pack("<II", ctype, 0)))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert decode_rts(bytearray(VALID)) == decode_rts(VALID)  # type: ignore[arg-type]
    assert decode_rts(memoryview(VALID)) == decode_rts(VALID)  # type: ignore[arg-type]
    assert isinstance(decode_rts(memoryview(VALID)).commands[1].cookie, bytes)  # type: ignore[arg-type,union-attr]


# --- RtsPdu helpers ------------------------------------------------------------------------------


def test_get_signature_cookies() -> None:
    pdu = decode_rts(rts.out_r2_a3(C1, C2, C3, 0x8000))
    assert pdu.get(Cookie) == Cookie(C1)
    assert pdu.get(Cookie, 2) == Cookie(C3)
    assert pdu.get(ReceiveWindowSize) == ReceiveWindowSize(0x8000)
    with pytest.raises(ProtocolError, match="lacks a Cookie"):
        pdu.get(Cookie, 3)
    with pytest.raises(ProtocolError, match="lacks a Destination"):
        pdu.get(Destination)
    assert rts.cookies(pdu) == [C1, C2, C3]
    assert pdu.signature == (
        RtsFlags.RECYCLE_CHANNEL,
        (CommandType.VERSION, CommandType.COOKIE, CommandType.COOKIE, CommandType.COOKIE,
         CommandType.RECEIVE_WINDOW_SIZE),
    )


# --- identify() ----------------------------------------------------------------------------------

OUT_R1_A7 = RtsPdu(
    RtsFlags.OUT_CHANNEL, (Destination(ForwardDestination.SERVER), Cookie(C2))
).encode()
PLAIN_ACK = RtsPdu(RtsFlags.OTHER_CMD, (FlowControlAck(10, 0x10000, C1),)).encode()
C1_PADDING = RtsPdu(RtsFlags.PING, (Padding(0),)).encode()

IDENTIFY_CASES: list[tuple[bytes, Kind, int]] = [
    (rts.conn_a1(C1, C2, 0x40000), Kind.CONN_A1, 76),
    (rts.conn_a3(120_000), Kind.CONN_A3, 28),
    (rts.conn_b1(C1, C3, C4), Kind.CONN_B1, 104),
    (rts.conn_c2(0x10000, 120_000), Kind.CONN_C2, 44),
    (rts.in_r2_a1(C1, C2, C3), Kind.IN_R2_A1, 88),
    (rts.IN_R2_A4, Kind.IN_R2_A4, 28),
    (rts.in_r2_a5(C3), Kind.IN_R2_A5, 40),
    (rts.OUT_R2_A2, Kind.OUT_R2_A2, 28),
    (rts.out_r2_a3(C1, C2, C3, 0x10000), Kind.OUT_R2_A3, 96),
    (rts.OUT_R2_A6, Kind.OUT_R2_A6, 32),
    (rts.out_r2_a7(C3), Kind.OUT_R2_A7, 56),
    (OUT_R1_A7, Kind.OUT_R1_A7, 48),
    (rts.OUT_R2_B3, Kind.OUT_R2_B3, 24),
    (rts.OUT_R2_C1, Kind.OUT_R2_C1, 24),
    (C1_PADDING, Kind.OUT_R2_C1, 28),
    (rts.keep_alive(60_000), Kind.KEEP_ALIVE, 28),
    (rts.PING, Kind.PING, 20),
    (rts.ECHO, Kind.ECHO, 20),
    (PLAIN_ACK, Kind.FLOW_CONTROL_ACK, 48),
    (rts.flow_control_ack(ForwardDestination.OUT_PROXY, 0, 0x10000, C1),
     Kind.FLOW_CONTROL_ACK_WITH_DESTINATION, 56),
]


def test_identify_covers_every_kind() -> None:
    assert {k for _, k, _ in IDENTIFY_CASES} == set(Kind)


@pytest.mark.parametrize(("data", "kind", "size"), IDENTIFY_CASES, ids=lambda x: str(x)[:30])
def test_identify(data: bytes, kind: Kind, size: int) -> None:
    assert len(data) == size
    pdu = decode_rts(data)
    assert identify(pdu) is kind
    assert pdu.encode() == data
    h = parse_header(data)
    assert (h.ptype, h.pfc_flags, h.little_endian, h.frag_length, h.auth_length, h.call_id) == (
        PType.RTS, 3, True, size, 0, 0)


UNKNOWN = [
    # CONN/A2 (internal): flags OUT_CHANNEL, Version, VC, OUT, ChannelLifetime, window
    RtsPdu(RtsFlags.OUT_CHANNEL, (Version(), Cookie(C1), Cookie(C2), ChannelLifetime(0x40000000),
                                  ReceiveWindowSize(0x10000))),
    # CONN/B3 (internal)
    RtsPdu(RtsFlags.NONE, (ReceiveWindowSize(0x10000), Version())),
    # IN_R1/A4: Destination, Version, window, timeout
    RtsPdu(RtsFlags.NONE, (Destination(ForwardDestination.CLIENT), Version(),
                           ReceiveWindowSize(0x10000), ConnectionTimeout(120_000))),
    # OUT_R2/B1 and B2 (internal)
    RtsPdu(RtsFlags.NONE, (ANCE(),)),
    RtsPdu(RtsFlags.NONE, (NegativeANCE(),)),
    # PingTrafficSentNotify (internal)
    RtsPdu(RtsFlags.OTHER_CMD, (PingTrafficSentNotify(2000),)),
    # right commands, wrong flags
    RtsPdu(RtsFlags.RECYCLE_CHANNEL, decode_rts(rts.conn_a1(C1, C2, 0x10000)).commands),
    RtsPdu(RtsFlags.NONE, ()),
    RtsPdu(RtsFlags.PING | RtsFlags.ECHO, ()),
    RtsPdu(RtsFlags.NONE, (ClientKeepalive(60_000),)),
    # right flags, commands out of order
    RtsPdu(RtsFlags.NONE, (ConnectionTimeout(120_000), ReceiveWindowSize(0x10000), Version())),
    RtsPdu(RtsFlags.OTHER_CMD, (FlowControlAck(0, 0x10000, C1),
                                Destination(ForwardDestination.CLIENT))),
    RtsPdu(RtsFlags.PING, (Empty(), Empty())),
]


@pytest.mark.parametrize("pdu", UNKNOWN, ids=lambda p: f"{p.flags:#x}-{len(p.commands)}")
def test_identify_unknown(pdu: RtsPdu) -> None:
    with pytest.raises(ProtocolError, match="unexpected RTS PDU"):
        identify(decode_rts(pdu.encode()))


# --- builders against the worked examples ---------------------------------------------------------


def test_notes_conn_a1() -> None:
    assert rts.conn_a1(cap.NOTES_VC, cap.NOTES_OUT, 0x10000) == cap.NOTES_CONN_A1
    pdu = decode_rts(cap.NOTES_CONN_A1)
    assert identify(pdu) is Kind.CONN_A1
    assert rts.cookies(pdu) == [cap.NOTES_VC, cap.NOTES_OUT]
    assert pdu.get(ReceiveWindowSize) == ReceiveWindowSize(0x10000)
    assert cap.NOTES_VC == uuid.UUID("6f2b1e40-8d4a-4c1b-9a3e-2f1d0c5b7a91").bytes_le


def test_notes_conn_b1() -> None:
    built = rts.conn_b1(cap.NOTES_VC, cap.NOTES_IN, cap.NOTES_AG)
    assert built == cap.NOTES_CONN_B1
    built = rts.conn_b1(cap.NOTES_VC, cap.NOTES_IN, cap.NOTES_AG,
                        channel_lifetime=0x40000000, keepalive_ms=300_000)
    assert built == cap.NOTES_CONN_B1
    pdu = decode_rts(cap.NOTES_CONN_B1)
    assert identify(pdu) is Kind.CONN_B1
    assert rts.cookies(pdu) == [cap.NOTES_VC, cap.NOTES_IN]
    assert pdu.get(ChannelLifetime) == ChannelLifetime(0x40000000)
    assert pdu.get(ClientKeepalive) == ClientKeepalive(300_000)
    assert pdu.get(AssociationGroupId) == AssociationGroupId(cap.NOTES_AG)


def test_notes_conn_a3_c2() -> None:
    assert rts.conn_a3(120_000) == cap.NOTES_CONN_A3
    assert rts.conn_c2(0x10000, 120_000) == cap.NOTES_CONN_C2
    assert identify(decode_rts(cap.NOTES_CONN_A3)) is Kind.CONN_A3
    c2 = decode_rts(cap.NOTES_CONN_C2)
    assert c2.commands == (Version(1), ReceiveWindowSize(0x10000), ConnectionTimeout(120_000))


def test_notes_flow_control_acks() -> None:
    assert rts.flow_control_ack(ForwardDestination.CLIENT, 0x8000, 0x10000, cap.NOTES_IN) \
        == cap.NOTES_IN_ACK
    assert rts.flow_control_ack(ForwardDestination.OUT_PROXY, 0x9000, 0x10000, cap.NOTES_OUT) \
        == cap.NOTES_OUT_ACK
    pdu = decode_rts(cap.NOTES_OUT_ACK)
    assert identify(pdu) is Kind.FLOW_CONTROL_ACK_WITH_DESTINATION
    assert pdu.commands == (Destination(ForwardDestination.OUT_PROXY),
                            FlowControlAck(0x9000, 0x10000, cap.NOTES_OUT))


@pytest.mark.parametrize(
    ("built", "captured", "kind"),
    [
        (rts.OUT_R2_A2, cap.NOTES_OUT_R2_A2, Kind.OUT_R2_A2),
        (rts.OUT_R2_A6, cap.NOTES_OUT_R2_A6, Kind.OUT_R2_A6),
        (rts.OUT_R2_B3, cap.NOTES_OUT_R2_B3, Kind.OUT_R2_B3),
        (rts.OUT_R2_C1, cap.NOTES_OUT_R2_C1, Kind.OUT_R2_C1),
        (rts.IN_R2_A4, cap.NOTES_IN_R2_A4, Kind.IN_R2_A4),
        (rts.ECHO, cap.NOTES_ECHO, Kind.ECHO),
    ],
)
def test_notes_constant_pdus(built: bytes, captured: bytes, kind: Kind) -> None:
    assert built == captured
    assert identify(decode_rts(captured)) is kind


def test_notes_recycling_pdu_contents() -> None:
    a2 = decode_rts(cap.NOTES_OUT_R2_A2)
    assert a2.flags == RtsFlags.RECYCLE_CHANNEL
    assert a2.commands == (Destination(ForwardDestination.CLIENT),)
    assert decode_rts(cap.NOTES_OUT_R2_A6).commands == (
        Destination(ForwardDestination.CLIENT), ANCE())
    assert decode_rts(cap.NOTES_OUT_R2_B3).flags == RtsFlags.EOF


def test_client_builders_exact() -> None:
    assert rts.in_r2_a1(C1, C2, C3) == rts_bytes(
        4, 4, bytes.fromhex("06000000 01000000") + b"".join(
            b"\x03\x00\x00\x00" + c for c in (C1, C2, C3)))
    assert rts.in_r2_a5(C3) == rts_bytes(0, 1, b"\x03\x00\x00\x00" + C3)
    assert rts.out_r2_a3(C1, C2, C3, 0x40000) == rts_bytes(
        4, 5, bytes.fromhex("06000000 01000000") + b"".join(
            b"\x03\x00\x00\x00" + c for c in (C1, C2, C3)) + bytes.fromhex("00000000 00000400"))
    assert rts.out_r2_a7(C3) == rts_bytes(
        0x10, 3, bytes.fromhex("0d000000 02000000 03000000") + C3
        + bytes.fromhex("06000000 01000000"))
    assert rts.keep_alive(60_000) == rts_bytes(2, 1, bytes.fromhex("05000000 60ea0000"))
    assert rts.PING == bytes.fromhex("05001403 10000000 14000000 00000000 01000000")


# --- Samba's client ------------------------------------------------------------------------------


def test_samba_cookies_are_ndr_guids() -> None:
    assert cap.SAMBA_VC == uuid.UUID("d2e5f0a1-3b4c-4d5e-8f60-718293a4b5c6").bytes_le
    assert cap.SAMBA_OUT == uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").bytes_le
    assert cap.SAMBA_IN == uuid.UUID("c0ffee00-1111-2222-3333-444455556666").bytes_le
    assert cap.SAMBA_AG == uuid.UUID("feedface-0102-0304-0506-0708090a0b0c").bytes_le


def test_samba_conn_a1() -> None:
    pdu = decode_rts(cap.SAMBA_CONN_A1)
    assert identify(pdu) is Kind.CONN_A1
    assert pdu.commands == (Version(1), Cookie(cap.SAMBA_VC), Cookie(cap.SAMBA_OUT),
                            ReceiveWindowSize(0x40000))
    assert rts.conn_a1(cap.SAMBA_VC, cap.SAMBA_OUT, 0x40000) == cap.SAMBA_CONN_A1
    assert pdu.encode() == cap.SAMBA_CONN_A1


def test_samba_conn_b1() -> None:
    pdu = decode_rts(cap.SAMBA_CONN_B1)
    assert identify(pdu) is Kind.CONN_B1
    assert pdu.commands == (
        Version(1), Cookie(cap.SAMBA_VC), Cookie(cap.SAMBA_IN), ChannelLifetime(0x40000000),
        ClientKeepalive(300_000), AssociationGroupId(cap.SAMBA_AG))
    assert rts.conn_b1(cap.SAMBA_VC, cap.SAMBA_IN, cap.SAMBA_AG) == cap.SAMBA_CONN_B1
    assert pdu.encode() == cap.SAMBA_CONN_B1


# --- impacket's client --------------------------------------------------------------------------


def impacket_rts(flags: int, *structs: object, ncmds: int | None = None) -> bytes:
    """Wrap impacket command structures in impacket's RTSHeader."""
    packet = rpch.RTSHeader()
    packet["Flags"] = flags
    packet["NumberOfCommands"] = len(structs) if ncmds is None else ncmds
    packet["pduData"] = b"".join(s.getData() for s in structs)  # type: ignore[attr-defined]
    return bytes(packet.getData())


def test_impacket_conn_a1() -> None:
    data = rpch.hCONN_A1(C1, C2, 0x40000)
    assert data == rts.conn_a1(C1, C2, 0x40000)
    pdu = decode_rts(data)
    assert identify(pdu) is Kind.CONN_A1
    assert rts.cookies(pdu) == [C1, C2]
    data = rpch.hCONN_A1(cap.NOTES_VC, cap.NOTES_OUT, 0x10000)
    assert data == cap.NOTES_CONN_A1


def test_impacket_conn_b1() -> None:
    data = rpch.hCONN_B1(C1, C3, C4)
    assert data == rts.conn_b1(C1, C3, C4)
    pdu = decode_rts(data)
    assert identify(pdu) is Kind.CONN_B1
    assert pdu.get(AssociationGroupId) == AssociationGroupId(C4)
    assert rpch.hCONN_B1(cap.NOTES_VC, cap.NOTES_IN, cap.NOTES_AG) == cap.NOTES_CONN_B1


def test_impacket_flow_control_ack_and_ping() -> None:
    for dest in ForwardDestination:
        data = rpch.hFlowControlAckWithDestination(int(dest), 0x12345, 0x20000, C2)
        assert data == rts.flow_control_ack(dest, 0x12345, 0x20000, C2)
        assert identify(decode_rts(data)) is Kind.FLOW_CONTROL_ACK_WITH_DESTINATION
    assert rpch.hPing() == rts.PING
    assert identify(decode_rts(rpch.hPing())) is Kind.PING


def test_impacket_conn_a3_c2() -> None:
    a3 = rpch.CONN_A3_RTS_PDU()
    a3["ConnectionTimeout"] = rpch.ConnectionTimeout()
    a3["ConnectionTimeout"]["ConnectionTimeout"] = 900_000
    assert impacket_rts(rpch.RTS_FLAG_NONE, a3, ncmds=len(a3.structure)) == rts.conn_a3(900_000)
    c2 = rpch.CONN_C2_RTS_PDU()
    c2["Version"] = rpch.Version()
    c2["ReceiveWindowSize"] = rpch.ReceiveWindowSize()
    c2["ReceiveWindowSize"]["ReceiveWindowSize"] = 0x8000
    c2["ConnectionTimeout"] = rpch.ConnectionTimeout()
    c2["ConnectionTimeout"]["ConnectionTimeout"] = 120_000
    assert impacket_rts(rpch.RTS_FLAG_NONE, c2, ncmds=len(c2.structure)) == rts.conn_c2(
        0x8000, 120_000)


def _impacket_commands() -> list[tuple[object, rts.Command]]:
    out: list[tuple[object, rts.Command]] = []
    s = rpch.ReceiveWindowSize()
    s["ReceiveWindowSize"] = 0x2000
    out.append((s, ReceiveWindowSize(0x2000)))
    s = rpch.FlowControlAck()
    ack = rpch.Ack()
    ack["BytesReceived"] = 7
    ack["AvailableWindow"] = 0x3000
    ack["ChannelCookie"] = rpch.RTSCookie()
    ack["ChannelCookie"]["Cookie"] = C3
    s["Ack"] = ack
    out.append((s, FlowControlAck(7, 0x3000, C3)))
    s = rpch.ConnectionTimeout()
    out.append((s, ConnectionTimeout(120_000)))
    s = rpch.Cookie()
    s["Cookie"] = rpch.RTSCookie()
    s["Cookie"]["Cookie"] = C4
    out.append((s, Cookie(C4)))
    s = rpch.ChannelLifetime()
    out.append((s, ChannelLifetime(0x40000000)))
    s = rpch.ClientKeepalive()
    out.append((s, ClientKeepalive(300_000)))
    out.append((rpch.Version(), Version()))
    out.append((rpch.Empty(), Empty()))
    # impacket's Padding structure ('*ConformanceCount') can neither pack nor unpack in the
    # installed impacket (struct.error), so Padding is covered by COMMAND_CASES only.
    out.append((rpch.NegativeANCE(), NegativeANCE()))
    out.append((rpch.ANCE(), ANCE()))
    for addr in (V4, V6):
        s = rpch.ClientAddress()
        enc = rpch.EncodedClientAddress()
        # impacket's default expression for AddressType does not evaluate; set it.
        enc["AddressType"] = 0 if addr.version == 4 else 1
        enc["ClientAddress"] = addr.packed
        s["ClientAddress"] = enc
        out.append((s, ClientAddress(addr)))
    s = rpch.AssociationGroupId()
    s["AssociationGroupId"] = rpch.RTSCookie()
    s["AssociationGroupId"]["Cookie"] = C1
    out.append((s, AssociationGroupId(C1)))
    s = rpch.Destination()
    s["Destination"] = rpch.FDServer
    out.append((s, Destination(ForwardDestination.SERVER)))
    s = rpch.PingTrafficSentNotify()
    s["PingTrafficSent"] = 4096
    out.append((s, PingTrafficSentNotify(4096)))
    return out


def test_impacket_every_command() -> None:
    pairs = _impacket_commands()
    assert {c.TYPE for _, c in pairs} == set(CommandType) - {CommandType.PADDING}
    for struct_, ours in pairs:
        theirs = struct_.getData()  # type: ignore[attr-defined]
        assert theirs == encode_command(ours), ours
        assert decode_rts(impacket_rts(0, struct_)).commands == (ours,)
    # and all of them in one PDU
    data = impacket_rts(0x02, *(s for s, _ in pairs))
    assert decode_rts(data) == RtsPdu(0x02, tuple(c for _, c in pairs))
    assert decode_rts(data).encode() == data


def test_impacket_parses_our_pdus() -> None:
    hdr = rpch.RTSHeader(rts.conn_c2(0x10000, 120_000))
    assert hdr["type"] == rpch.MSRPC_RTS
    assert hdr["frag_len"] == 44
    assert hdr["Flags"] == 0 and hdr["NumberOfCommands"] == 3
    assert hdr["flags"] == rpch.PFC_FIRST_FRAG | rpch.PFC_LAST_FRAG


# --- property tests ---------------------------------------------------------------------------

cookie_st = st.binary(min_size=16, max_size=16)
command_st = st.one_of(
    st.builds(ReceiveWindowSize, st.integers(rts.MIN_RECEIVE_WINDOW, rts.MAX_RECEIVE_WINDOW)),
    st.builds(FlowControlAck, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), cookie_st),
    st.builds(ConnectionTimeout,
              st.integers(rts.MIN_CONNECTION_TIMEOUT, rts.MAX_CONNECTION_TIMEOUT)),
    st.builds(Cookie, cookie_st),
    st.builds(ChannelLifetime, st.integers(rts.MIN_CHANNEL_LIFETIME, rts.MAX_CHANNEL_LIFETIME)),
    st.builds(ClientKeepalive, st.integers(0, 2**32 - 1)),
    st.builds(Version, st.integers(0, 2**32 - 1)),
    st.just(Empty()),
    st.builds(Padding, st.integers(0, 64)),
    st.just(NegativeANCE()),
    st.just(ANCE()),
    st.builds(ClientAddress, st.ip_addresses()),
    st.builds(AssociationGroupId, cookie_st),
    st.builds(Destination, st.sampled_from(list(ForwardDestination))),
    st.builds(PingTrafficSentNotify, st.integers(0, 2**32 - 1)),
)
pdu_st = st.builds(RtsPdu, st.integers(0, 0xFFFF),
                   st.lists(command_st, max_size=10).map(tuple))


@settings(max_examples=200, deadline=None)
@given(pdu_st)
def test_round_trip_generated(pdu: RtsPdu) -> None:
    data = pdu.encode()
    assert decode_rts(data) == pdu
    assert decode_rts(data).encode() == data
    assert parse_header(data).frag_length == len(data)


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_only_protocol_error(data: bytes) -> None:
    try:
        pdu = decode_rts(data)
    except ProtocolError:
        return
    assert pdu.encode()[2:] == data[2:]  # only the minor version may differ


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=100))
def test_random_body_behind_valid_header_only_protocol_error(body: bytes) -> None:
    for ncmds in (0, 1, 3, len(body) // 4):
        try:
            pdu = decode_rts(rts_bytes(0, ncmds, body))
        except ProtocolError:
            continue
        assert pdu.encode() == rts_bytes(0, ncmds, body) or any(
            isinstance(c, Padding | ClientAddress) for c in pdu.commands)
        try:
            identify(pdu)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(pdu_st, st.data())
def test_mutated_valid_pdu_only_protocol_error(pdu: RtsPdu, data: st.DataObject) -> None:
    raw = bytearray(pdu.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            decode_rts(candidate)
        except ProtocolError:
            pass


def test_header_len_constant() -> None:
    assert rts.RTS_HEADER_LEN == HEADER_LEN + 4
