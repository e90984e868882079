"""RTS PDUs of RPC over HTTP v2: commands, PDUs, identification, builders.

Theory of operation
-------------------
An RTS PDU ([MS-RPCH] 2.2.3.6) is a common header with PTYPE 20, pfc_flags
0x03, little-endian drep, auth_length 0 and call_id 0, followed by ``Flags``
(u16), ``NumberOfCommands`` (u16) and that many commands back to back. Each
command ([MS-RPCH] 2.2.3.5) is a u32 ``CommandType`` and a payload whose size
the type fixes (Padding and ClientAddress are the two variable ones).

``decode_rts`` turns bytes into an ``RtsPdu`` (flags + a tuple of typed
command objects), checking every header field, every length and the value
ranges 2.2.3.5 gives. ``RtsPdu.encode`` is its inverse. ``identify`` names a
decoded PDU by its (Flags, command-type list) signature, the same way
Wireshark's RTS dissector does ([MS-RPCH] 2.2.4), since flags alone are
ambiguous. The builders at the bottom produce the exact PDUs a translating
proxy sends (CONN/A3, CONN/C2, pings, echo, flow-control acks, recycling
PDUs) and, for the bench client and tests, the ones a client sends.

No I/O here.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar, final

from dcerpc.pdu import RPC_VERSION, RPC_VERSION_MINORS, PType
from rpcproxy.errors import ProtocolError

RTS_HEADER_LEN = 20  # common header + Flags + NumberOfCommands
RTS_PFC_FLAGS = 0x03  # PFC_FIRST_FRAG | PFC_LAST_FRAG, 2.2.3.6.1
RTS_VERSION = 1  # Version command value, 2.2.3.5.7

# Value ranges, [MS-RPCH] 2.2.3.5.
MIN_RECEIVE_WINDOW = 0x2000
MAX_RECEIVE_WINDOW = 0x40000
MIN_CONNECTION_TIMEOUT = 120_000
MAX_CONNECTION_TIMEOUT = 14_400_000
MIN_CHANNEL_LIFETIME = 0x20000
MAX_CHANNEL_LIFETIME = 0x80000000
MAX_PADDING = 0xFFFF
COOKIE_LEN = 16


class RtsFlags(enum.IntFlag):
    """RTS header Flags, 2.2.3.6.1."""

    NONE = 0x0000
    PING = 0x0001
    OTHER_CMD = 0x0002
    RECYCLE_CHANNEL = 0x0004
    IN_CHANNEL = 0x0008
    OUT_CHANNEL = 0x0010
    EOF = 0x0020
    ECHO = 0x0040


class CommandType(enum.IntEnum):
    """RTS command types, 2.2.3.5."""

    RECEIVE_WINDOW_SIZE = 0x0
    FLOW_CONTROL_ACK = 0x1
    CONNECTION_TIMEOUT = 0x2
    COOKIE = 0x3
    CHANNEL_LIFETIME = 0x4
    CLIENT_KEEPALIVE = 0x5
    VERSION = 0x6
    EMPTY = 0x7
    PADDING = 0x8
    NEGATIVE_ANCE = 0x9
    ANCE = 0xA
    CLIENT_ADDRESS = 0xB
    ASSOCIATION_GROUP_ID = 0xC
    DESTINATION = 0xD
    PING_TRAFFIC_SENT_NOTIFY = 0xE


class ForwardDestination(enum.IntEnum):
    """Forward destinations, 2.2.3.3."""

    CLIENT = 0
    IN_PROXY = 1
    SERVER = 2
    OUT_PROXY = 3


_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")
_CMD_HDR = struct.Struct("<I")


def _u32(data: bytes, pos: int) -> int:
    return int(_U32.unpack_from(data, pos)[0])


def _need(data: bytes, pos: int, size: int, what: str) -> None:
    if len(data) - pos < size:
        raise ProtocolError(f"RTS command {what} truncated")


# --- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _U32Command:
    """The shape of most commands: one u32 ``value`` after the type, maybe range-checked."""

    value: int
    TYPE: ClassVar[CommandType]
    RANGE: ClassVar[tuple[int, int, str] | None] = None  # (least, most, how errors say it)

    def payload(self) -> bytes:
        return _U32.pack(self.value)

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[Self, int]:
        _need(data, pos, 4, cls.__name__)
        value = _u32(data, pos)
        if cls.RANGE is not None and not cls.RANGE[0] <= value <= cls.RANGE[1]:
            raise ProtocolError(f"{cls.__name__} {value}{cls.RANGE[2]}")
        return cls(value), pos + 4


@dataclass(frozen=True, slots=True)
class _EmptyCommand:
    """A command that is just its type."""

    TYPE: ClassVar[CommandType]

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[Self, int]:
        return cls(), pos


@dataclass(frozen=True, slots=True)
class _CookieCommand:
    """A command carrying one 16-byte cookie."""

    cookie: bytes
    TYPE: ClassVar[CommandType]

    def payload(self) -> bytes:
        return self.cookie

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[Self, int]:
        _need(data, pos, COOKIE_LEN, cls.__name__)
        return cls(bytes(data[pos : pos + COOKIE_LEN])), pos + COOKIE_LEN


@final
@dataclass(frozen=True, slots=True)
class ReceiveWindowSize(_U32Command):
    TYPE: ClassVar[CommandType] = CommandType.RECEIVE_WINDOW_SIZE
    RANGE = (MIN_RECEIVE_WINDOW, MAX_RECEIVE_WINDOW, " outside 8 KiB..256 KiB")


@final
@dataclass(frozen=True, slots=True)
class FlowControlAck:
    bytes_received: int
    available_window: int
    channel_cookie: bytes
    TYPE: ClassVar[CommandType] = CommandType.FLOW_CONTROL_ACK

    def payload(self) -> bytes:
        return _U32x2.pack(self.bytes_received, self.available_window) + self.channel_cookie

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[FlowControlAck, int]:
        _need(data, pos, 24, "FlowControlAck")
        received, available = _U32x2.unpack_from(data, pos)
        return cls(received, available, bytes(data[pos + 8 : pos + 24])), pos + 24


@final
@dataclass(frozen=True, slots=True)
class ConnectionTimeout(_U32Command):  # value in milliseconds
    TYPE: ClassVar[CommandType] = CommandType.CONNECTION_TIMEOUT
    RANGE = (MIN_CONNECTION_TIMEOUT, MAX_CONNECTION_TIMEOUT, " ms outside 120000..14400000")


@final
@dataclass(frozen=True, slots=True)
class Cookie(_CookieCommand):
    TYPE: ClassVar[CommandType] = CommandType.COOKIE


@final
@dataclass(frozen=True, slots=True)
class ChannelLifetime(_U32Command):
    TYPE: ClassVar[CommandType] = CommandType.CHANNEL_LIFETIME
    RANGE = (MIN_CHANNEL_LIFETIME, MAX_CHANNEL_LIFETIME, " outside 128 KiB..2 GiB")


@final
@dataclass(frozen=True, slots=True)
class ClientKeepalive(_U32Command):
    """value: milliseconds; 0 means 300000 (2.2.3.5.6); receivers are lenient."""

    TYPE: ClassVar[CommandType] = CommandType.CLIENT_KEEPALIVE


@final
@dataclass(frozen=True, slots=True)
class Version(_U32Command):
    value: int = RTS_VERSION  # sent as 1, ignored on receipt (2.2.3.5.7)
    TYPE: ClassVar[CommandType] = CommandType.VERSION


@final
@dataclass(frozen=True, slots=True)
class Empty(_EmptyCommand):
    TYPE: ClassVar[CommandType] = CommandType.EMPTY


@final
@dataclass(frozen=True, slots=True)
class Padding:
    count: int
    TYPE: ClassVar[CommandType] = CommandType.PADDING

    def payload(self) -> bytes:
        return _U32.pack(self.count) + bytes(self.count)

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[Padding, int]:
        _need(data, pos, 4, "Padding")
        count = _u32(data, pos)
        if count > MAX_PADDING:
            raise ProtocolError(f"Padding ConformanceCount {count} exceeds 0xFFFF")
        _need(data, pos + 4, count, "Padding")
        return cls(count), pos + 4 + count


@final
@dataclass(frozen=True, slots=True)
class NegativeANCE(_EmptyCommand):
    TYPE: ClassVar[CommandType] = CommandType.NEGATIVE_ANCE


@final
@dataclass(frozen=True, slots=True)
class ANCE(_EmptyCommand):
    TYPE: ClassVar[CommandType] = CommandType.ANCE


_ADDRESS_TYPE_IPV4 = 0
_ADDRESS_TYPE_IPV6 = 1
_CLIENT_ADDRESS_PAD = 12


@final
@dataclass(frozen=True, slots=True)
class ClientAddress:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    TYPE: ClassVar[CommandType] = CommandType.CLIENT_ADDRESS

    def payload(self) -> bytes:
        kind = _ADDRESS_TYPE_IPV4 if self.address.version == 4 else _ADDRESS_TYPE_IPV6
        return _U32.pack(kind) + self.address.packed + bytes(_CLIENT_ADDRESS_PAD)

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[ClientAddress, int]:
        _need(data, pos, 4, "ClientAddress")
        kind = _u32(data, pos)
        if kind == _ADDRESS_TYPE_IPV4:
            size = 4
        elif kind == _ADDRESS_TYPE_IPV6:
            size = 16
        else:
            raise ProtocolError(f"ClientAddress type {kind} is neither IPv4 nor IPv6")
        _need(data, pos + 4, size + _CLIENT_ADDRESS_PAD, "ClientAddress")
        raw = bytes(data[pos + 4 : pos + 4 + size])
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address
        addr = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
        return cls(addr), pos + 4 + size + _CLIENT_ADDRESS_PAD


@final
@dataclass(frozen=True, slots=True)
class AssociationGroupId(_CookieCommand):
    TYPE: ClassVar[CommandType] = CommandType.ASSOCIATION_GROUP_ID


@final
@dataclass(frozen=True, slots=True)
class Destination:
    destination: ForwardDestination
    TYPE: ClassVar[CommandType] = CommandType.DESTINATION

    def payload(self) -> bytes:
        return _U32.pack(self.destination)

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[Destination, int]:
        _need(data, pos, 4, "Destination")
        value = _u32(data, pos)
        try:
            dest = ForwardDestination(value)
        except ValueError:
            raise ProtocolError(f"Destination {value} is not a forward destination") from None
        return cls(dest), pos + 4


@final
@dataclass(frozen=True, slots=True)
class PingTrafficSentNotify(_U32Command):
    TYPE: ClassVar[CommandType] = CommandType.PING_TRAFFIC_SENT_NOTIFY


Command = (
    ReceiveWindowSize
    | FlowControlAck
    | ConnectionTimeout
    | Cookie
    | ChannelLifetime
    | ClientKeepalive
    | Version
    | Empty
    | Padding
    | NegativeANCE
    | ANCE
    | ClientAddress
    | AssociationGroupId
    | Destination
    | PingTrafficSentNotify
)

_PARSERS: dict[int, Callable[[bytes, int], tuple[Command, int]]] = {
    cls.TYPE: cls.parse
    for cls in (
        ReceiveWindowSize,
        FlowControlAck,
        ConnectionTimeout,
        Cookie,
        ChannelLifetime,
        ClientKeepalive,
        Version,
        Empty,
        Padding,
        NegativeANCE,
        ANCE,
        ClientAddress,
        AssociationGroupId,
        Destination,
        PingTrafficSentNotify,
    )
}


def encode_command(command: Command) -> bytes:
    return _CMD_HDR.pack(command.TYPE) + command.payload()


# --- PDUs -------------------------------------------------------------------------------------

_RTS_HEAD = struct.Struct("<BBBB4sHHIHH")
_DREP_LE = b"\x10\x00\x00\x00"


_CommandT = TypeVar("_CommandT", bound=Command)


@dataclass(frozen=True, slots=True)
class RtsPdu:
    flags: int
    commands: tuple[Command, ...]

    def encode(self) -> bytes:
        body = b"".join(encode_command(c) for c in self.commands)
        frag_length = RTS_HEADER_LEN + len(body)
        head = _RTS_HEAD.pack(
            5, 0, PType.RTS, RTS_PFC_FLAGS, _DREP_LE, frag_length, 0, 0,
            self.flags, len(self.commands),
        )
        return head + body

    @property
    def signature(self) -> tuple[int, tuple[CommandType, ...]]:
        return (self.flags, tuple(c.TYPE for c in self.commands))

    def get(self, kind: type[_CommandT], index: int = 0) -> _CommandT:
        """The ``index``-th command of class ``kind`` (ProtocolError if absent)."""
        seen = 0
        for c in self.commands:
            if isinstance(c, kind):
                if seen == index:
                    return c
                seen += 1
        raise ProtocolError(f"RTS PDU lacks a {kind.__name__} command")


def decode_rts(data: bytes) -> RtsPdu:
    """Decode one whole RTS PDU, validating header, lengths and value ranges."""
    if len(data) < RTS_HEADER_LEN:
        raise ProtocolError(f"RTS PDU of {len(data)} bytes is shorter than its 20-byte header")
    (vers, minor, ptype, pfc, drep, frag_length, auth_length, call_id, flags, ncmds) = (
        _RTS_HEAD.unpack_from(data, 0)
    )
    if vers != RPC_VERSION or minor not in RPC_VERSION_MINORS:
        raise ProtocolError(f"RTS PDU has version {vers}.{minor}")
    if ptype != PType.RTS:
        raise ProtocolError(f"PTYPE {ptype} is not RTS")
    if pfc != RTS_PFC_FLAGS:
        raise ProtocolError(f"RTS pfc_flags 0x{pfc:02x}, must be 0x03")
    if drep[0] != 0x10:
        raise ProtocolError("RTS PDU is not little-endian")
    if auth_length != 0:
        raise ProtocolError("RTS PDU carries an auth verifier")
    if call_id != 0:
        raise ProtocolError(f"RTS call_id {call_id}, must be 0")
    if frag_length != len(data):
        raise ProtocolError(f"RTS frag_length {frag_length} but {len(data)} bytes")
    pos = RTS_HEADER_LEN
    commands: list[Command] = []
    for _ in range(ncmds):
        if len(data) - pos < 4:
            raise ProtocolError(f"RTS PDU announces {ncmds} commands but has {len(commands)}")
        ctype = _u32(data, pos)
        parser = _PARSERS.get(ctype)
        if parser is None:
            raise ProtocolError(f"unknown RTS command type {ctype}")
        command, pos = parser(data, pos + 4)
        commands.append(command)
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} stray bytes after the RTS commands")
    return RtsPdu(flags, tuple(commands))


# --- identification ([MS-RPCH] 2.2.4) ---------------------------------------------------------


class Kind(enum.Enum):
    """The RTS PDUs a translating proxy sends or receives.

    ``IN_R2_A1``, ``IN_R2_A5`` and ``OUT_R2_A3`` also stand for their R1 twins: the bytes
    are the same (the values say so), and this proxy always recycles as R2."""

    CONN_A1 = "CONN/A1"
    CONN_A3 = "CONN/A3"
    CONN_B1 = "CONN/B1"
    CONN_C2 = "CONN/C2"
    IN_R2_A1 = "IN_R1/A1 or IN_R2/A1"
    IN_R2_A4 = "IN_R2/A4"
    IN_R2_A5 = "IN_R1/A5 or IN_R2/A5"
    OUT_R2_A2 = "OUT_R2/A2"
    OUT_R2_A3 = "OUT_R1/A3 or OUT_R2/A3"
    OUT_R2_A6 = "OUT_R2/A6"
    OUT_R2_A7 = "OUT_R2/A7"
    OUT_R1_A7 = "OUT_R1/A7"
    OUT_R2_B3 = "OUT_R2/B3"
    OUT_R2_C1 = "OUT_R2/C1"
    KEEP_ALIVE = "Keep-Alive"
    PING = "Ping"
    ECHO = "Echo"
    FLOW_CONTROL_ACK = "FlowControlAck"
    FLOW_CONTROL_ACK_WITH_DESTINATION = "FlowControlAckWithDestination"


_C = CommandType
_F = RtsFlags
_SIGNATURES: dict[tuple[int, tuple[CommandType, ...]], Kind] = {
    (_F.NONE, (_C.VERSION, _C.COOKIE, _C.COOKIE, _C.RECEIVE_WINDOW_SIZE)): Kind.CONN_A1,
    (_F.NONE, (_C.CONNECTION_TIMEOUT,)): Kind.CONN_A3,
    (
        _F.NONE,
        (_C.VERSION, _C.COOKIE, _C.COOKIE, _C.CHANNEL_LIFETIME, _C.CLIENT_KEEPALIVE,
         _C.ASSOCIATION_GROUP_ID),
    ): Kind.CONN_B1,
    (_F.NONE, (_C.VERSION, _C.RECEIVE_WINDOW_SIZE, _C.CONNECTION_TIMEOUT)): Kind.CONN_C2,
    (_F.RECYCLE_CHANNEL, (_C.VERSION, _C.COOKIE, _C.COOKIE, _C.COOKIE)): Kind.IN_R2_A1,
    (_F.NONE, (_C.DESTINATION,)): Kind.IN_R2_A4,
    (_F.NONE, (_C.COOKIE,)): Kind.IN_R2_A5,
    (_F.RECYCLE_CHANNEL, (_C.DESTINATION,)): Kind.OUT_R2_A2,
    (
        _F.RECYCLE_CHANNEL,
        (_C.VERSION, _C.COOKIE, _C.COOKIE, _C.COOKIE, _C.RECEIVE_WINDOW_SIZE),
    ): Kind.OUT_R2_A3,
    (_F.NONE, (_C.DESTINATION, _C.ANCE)): Kind.OUT_R2_A6,
    (_F.OUT_CHANNEL, (_C.DESTINATION, _C.COOKIE, _C.VERSION)): Kind.OUT_R2_A7,
    (_F.OUT_CHANNEL, (_C.DESTINATION, _C.COOKIE)): Kind.OUT_R1_A7,
    (_F.EOF, (_C.ANCE,)): Kind.OUT_R2_B3,
    (_F.PING, (_C.EMPTY,)): Kind.OUT_R2_C1,
    (_F.PING, (_C.PADDING,)): Kind.OUT_R2_C1,
    (_F.OTHER_CMD, (_C.CLIENT_KEEPALIVE,)): Kind.KEEP_ALIVE,
    (_F.PING, ()): Kind.PING,
    (_F.ECHO, ()): Kind.ECHO,
    (_F.OTHER_CMD, (_C.FLOW_CONTROL_ACK,)): Kind.FLOW_CONTROL_ACK,
    (_F.OTHER_CMD, (_C.DESTINATION, _C.FLOW_CONTROL_ACK)): Kind.FLOW_CONTROL_ACK_WITH_DESTINATION,
}


def identify(pdu: RtsPdu) -> Kind:
    """Name an RTS PDU by its flags and command list, or raise ProtocolError."""
    kind = _SIGNATURES.get(pdu.signature)
    if kind is None:
        types = ",".join(t.name for t in pdu.signature[1])
        raise ProtocolError(f"unexpected RTS PDU (flags 0x{pdu.flags:04x}, commands [{types}])")
    return kind


def cookies(pdu: RtsPdu) -> list[bytes]:
    """All Cookie command values in order."""
    return [c.cookie for c in pdu.commands if isinstance(c, Cookie)]


# --- builders: what the proxy sends -----------------------------------------------------------


def _build(flags: int, *commands: Command) -> bytes:
    return RtsPdu(flags, commands).encode()


ECHO = _build(_F.ECHO)
PING = _build(_F.PING)
OUT_R2_A2 = _build(_F.RECYCLE_CHANNEL, Destination(ForwardDestination.CLIENT))
OUT_R2_A6 = _build(_F.NONE, Destination(ForwardDestination.CLIENT), ANCE())
OUT_R2_B3 = _build(_F.EOF, ANCE())
IN_R2_A4 = _build(_F.NONE, Destination(ForwardDestination.CLIENT))


def conn_a3(connection_timeout_ms: int) -> bytes:
    return _build(_F.NONE, ConnectionTimeout(connection_timeout_ms))


def conn_c2(receive_window: int, connection_timeout_ms: int) -> bytes:
    return _build(
        _F.NONE, Version(), ReceiveWindowSize(receive_window),
        ConnectionTimeout(connection_timeout_ms),
    )


def flow_control_ack(
    destination: ForwardDestination, bytes_received: int, available_window: int, cookie: bytes
) -> bytes:
    """FlowControlAckWithDestination (2.2.4.50)."""
    return _build(
        _F.OTHER_CMD, Destination(destination),
        FlowControlAck(bytes_received, available_window, cookie),
    )


# --- builders: what a client sends (bench client, tests) --------------------------------------


def conn_a1(vc_cookie: bytes, out_cookie: bytes, receive_window: int) -> bytes:
    return _build(
        _F.NONE, Version(), Cookie(vc_cookie), Cookie(out_cookie), ReceiveWindowSize(receive_window)
    )


def conn_b1(
    vc_cookie: bytes,
    in_cookie: bytes,
    association_group: bytes,
    *,
    channel_lifetime: int = 0x40000000,
    keepalive_ms: int = 300_000,
) -> bytes:
    return _build(
        _F.NONE, Version(), Cookie(vc_cookie), Cookie(in_cookie), ChannelLifetime(channel_lifetime),
        ClientKeepalive(keepalive_ms), AssociationGroupId(association_group),
    )


def in_r2_a1(vc_cookie: bytes, predecessor: bytes, successor: bytes) -> bytes:
    return _build(
        _F.RECYCLE_CHANNEL, Version(), Cookie(vc_cookie), Cookie(predecessor), Cookie(successor)
    )


def in_r2_a5(successor: bytes) -> bytes:
    return _build(_F.NONE, Cookie(successor))


def out_r2_a3(vc_cookie: bytes, predecessor: bytes, successor: bytes, receive_window: int) -> bytes:
    return _build(
        _F.RECYCLE_CHANNEL, Version(), Cookie(vc_cookie), Cookie(predecessor), Cookie(successor),
        ReceiveWindowSize(receive_window),
    )


def out_r2_a7(successor: bytes) -> bytes:
    return _build(
        _F.OUT_CHANNEL, Destination(ForwardDestination.SERVER), Cookie(successor), Version()
    )


OUT_R2_C1 = _build(_F.PING, Empty())


def keep_alive(keepalive_ms: int) -> bytes:
    return _build(_F.OTHER_CMD, ClientKeepalive(keepalive_ms))

