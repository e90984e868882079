"""A scripted virtual connection for tests: the cookies, channels and PDUs the core tests
feed ``VirtualConnection``, the adapter-style ``join`` (judged, then opened), a VC driven
to OPENED, and one driven to OUT_R2/A2 (``recycle_to_a2``) with its byte tally."""

from __future__ import annotations

import struct
from collections.abc import Hashable
from typing import Any

from dcerpc.pdu import PduFramer, PType
from rpcproxy.errors import RpcProxyError
from rpcproxy.rpch import rts
from rpcproxy.rpch.actions import (
    Action,
    CloseBackend,
    CloseChannel,
    ConnectBackend,
    PauseBackend,
    SendToClient,
    StartResponse,
    VcClosed,
)
from rpcproxy.rpch.channels import (
    IN_MIN_CONTENT_LENGTH,
    OUT_NEW_CONTENT_LENGTH,
    OUT_SUCCESSOR_CONTENT_LENGTH,
    Method,
    VcSettings,
    judge_opening,
)
from rpcproxy.rpch.connection import VirtualConnection
from rpcproxy.rpch.rts import ForwardDestination
from rpcproxy.rpch.states import Phase

VC = bytes.fromhex("40 1e 2b 6f 4a 8d 1b 4c 9a 3e 2f 1d 0c 5b 7a 91")
OUT_CK = b"O" * 16
OUT2_CK = b"P" * 16
OUT3_CK = b"Q" * 16
IN_CK = b"I" * 16
IN2_CK = b"J" * 16
AG = b"G" * 16
OUT, OUT2, OUT3, IN, IN2 = "out-1", "out-2", "out-3", "in-1", "in-2"
ME = "alice@EXAMPLE.COM"
TARGET = ("mbx01", 6001)
CL = 0x40000000

A3_DEFAULT = rts.conn_a3(120_000)
C2_DEFAULT = rts.conn_c2(rts.MAX_RECEIVE_WINDOW, 120_000)


# --- helpers --------------------------------------------------------------------------------------


def rpc(ptype: int, size: int = 64, call_id: int = 1, fill: int = 0) -> bytes:
    """A DCE/RPC PDU of ``size`` bytes (header + filler body)."""
    assert size >= 16
    return (
        bytes([5, 0, ptype, 3, 0x10, 0, 0, 0])
        + struct.pack("<HHI", size, 0, call_id)
        + bytes([fill & 0xFF]) * (size - 16)
    )


def a1(window: int = rts.MAX_RECEIVE_WINDOW, vc: bytes = VC, out: bytes = OUT_CK) -> rts.RtsPdu:
    return rts.decode_rts(rts.conn_a1(vc, out, window))


def b1(keepalive: int = 300_000, vc: bytes = VC, in_: bytes = IN_CK) -> rts.RtsPdu:
    return rts.decode_rts(rts.conn_b1(vc, in_, AG, keepalive_ms=keepalive))


def a3(pred: bytes = OUT_CK, succ: bytes = OUT2_CK, window: int = rts.MAX_RECEIVE_WINDOW,
       vc: bytes = VC) -> rts.RtsPdu:
    return rts.decode_rts(rts.out_r2_a3(vc, pred, succ, window))


def in_a1(pred: bytes = IN_CK, succ: bytes = IN2_CK, vc: bytes = VC) -> rts.RtsPdu:
    return rts.decode_rts(rts.in_r2_a1(vc, pred, succ))


def out_ack(received: int, window: int, cookie: bytes = OUT_CK) -> bytes:
    return rts.flow_control_ack(ForwardDestination.OUT_PROXY, received, window, cookie)


def err_name(error: RpcProxyError | None) -> str | None:
    return None if error is None else type(error).__name__


def norm(actions: list[Action]) -> list[Any]:
    """Actions with their exception objects replaced by the exception class name."""
    out: list[Any] = []
    for a in actions:
        if isinstance(a, CloseChannel):
            out.append(("close", a.channel, err_name(a.error)))
        elif isinstance(a, VcClosed):
            out.append(("vc_closed", err_name(a.error)))
        else:
            out.append(a)
    return out


def teardown(*channels: Hashable, error: str | None = "ProtocolError",
             backend: bool = True) -> list[Any]:
    acts: list[Any] = [("close", ch, error) for ch in channels]
    if backend:
        acts.append(CloseBackend())
    acts.append(("vc_closed", error))
    return acts


# The Content-Length each first PDU comes with (the adapter's request), for judge_opening.
_OPENING_REQUEST = {
    rts.Kind.CONN_A1: (Method.OUT, OUT_NEW_CONTENT_LENGTH),
    rts.Kind.OUT_R2_A3: (Method.OUT, OUT_SUCCESSOR_CONTENT_LENGTH),
    rts.Kind.CONN_B1: (Method.IN, IN_MIN_CONTENT_LENGTH),
    rts.Kind.IN_R2_A1: (Method.IN, IN_MIN_CONTENT_LENGTH),
}


def join(vc: VirtualConnection, ch: Hashable, pdu: rts.RtsPdu, *, identity: Hashable = ME,
         target: Hashable = TARGET, now: float = 0.0) -> list[Action]:
    """A channel with this first PDU joins ``vc`` the adapter's way: judged, then opened."""
    method, length = _OPENING_REQUEST[rts.identify(pdu)]
    opening = judge_opening(method, length, pdu.encode())
    return vc.open_channel(ch, opening, identity=identity, target=target, now=now)


def new_vc(s: VcSettings | None = None, now: float = 0.0) -> VirtualConnection:
    return VirtualConnection(VC, identity=ME, target=TARGET, settings=s or VcSettings(), now=now)


def open_out(vc: VirtualConnection, ch: Hashable = OUT, pdu: rts.RtsPdu | None = None,
             now: float = 0.0, identity: Hashable = ME, target: Hashable = TARGET) -> list[Action]:
    return join(vc, ch, pdu or a1(), identity=identity, target=target, now=now)


def open_in(vc: VirtualConnection, ch: Hashable = IN, pdu: rts.RtsPdu | None = None,
            now: float = 0.0, identity: Hashable = ME, target: Hashable = TARGET) -> list[Action]:
    return join(vc, ch, pdu or b1(), identity=identity, target=target, now=now)


def opened(s: VcSettings | None = None, window: int = rts.MAX_RECEIVE_WINDOW,
           keepalive: int = 300_000, now: float = 0.0) -> VirtualConnection:
    vc = new_vc(s, now)
    assert open_out(vc, pdu=a1(window), now=now) == [ConnectBackend()]
    assert open_in(vc, pdu=b1(keepalive), now=now) == []
    acts = vc.backend_up(now)
    assert [type(a) for a in acts] == [StartResponse, SendToClient, SendToClient]
    assert vc.phase is Phase.OPENED
    return vc


def sent_to(actions: list[Action], ch: Hashable) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendToClient) and a.channel == ch]


SMALL = VcSettings(receive_window=0x2000, out_content_length=4096, out_reserve=256)
R500 = [rpc(PType.RESPONSE, 500, i) for i in range(200)]


class Tally:
    """Counts bytes written per OUT channel and checks the channel discipline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes: dict[Hashable, int] = {}
        self.started: set[Hashable] = set()
        self.closed: set[Hashable] = set()
        self.framers: dict[Hashable, PduFramer] = {}

    def feed(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, StartResponse):
                assert a.channel not in self.started
                self.started.add(a.channel)
            elif isinstance(a, SendToClient):
                assert a.channel in self.started, "bytes before the 200 header"
                assert a.channel not in self.closed, "bytes after CloseChannel"
                self.bytes[a.channel] = self.bytes.get(a.channel, 0) + len(a.data)
                assert self.bytes[a.channel] <= self.limit, "wrote past Content-Length"
                framer = self.framers.setdefault(a.channel, PduFramer())
                framer.feed(a.data)
                assert framer.buffered == 0, "partial PDU on an OUT channel"
            elif isinstance(a, CloseChannel):
                self.closed.add(a.channel)
        return actions


def recycle_to_a2(s: VcSettings = SMALL) -> tuple[VirtualConnection, Tally]:
    """Fill OUT with 500-byte PDUs until OUT_R2/A2; the PDU that did not fit and one more
    wait in the queue (R500[n], R500[n + 1]); with SMALL settings n is 7."""
    vc = opened(s)
    t = Tally(s.out_content_length)
    t.started.add(OUT)
    t.bytes[OUT] = len(A3_DEFAULT) + len(C2_DEFAULT)
    left = s.out_content_length - t.bytes[OUT]
    n = 0
    while left - 500 >= s.out_reserve:
        assert t.feed(vc.backend_data(R500[n], 1.0)) == [SendToClient(OUT, R500[n])]
        left -= 500
        n += 1
    # the next PDU would leave less than the reserve: A2 instead, and the PDU waits
    assert t.feed(vc.backend_data(R500[n], 2.0)) == [SendToClient(OUT, rts.OUT_R2_A2),
                                                     PauseBackend()]
    assert t.feed(vc.backend_data(R500[n + 1], 2.0)) == []
    if s is SMALL:
        assert n == 7  # 4096 - 72 - 7 * 500 = 524; 524 - 500 < 256
    return vc, t


IN3, IN3_CK = "in-3", b"K" * 16
