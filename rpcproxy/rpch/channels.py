"""The two HTTP channels of a virtual connection, and which first PDU may open which.

Theory of operation
-------------------
A client opens a channel with an ``RPC_IN_DATA`` or ``RPC_OUT_DATA`` request whose body
starts with one RTS PDU ([MS-RPCH] 2.1.2.1.1-2, 3.2.2.4). ``judge_opening`` decides, from
the method, the request's Content-Length and that PDU, whether this is a legal opening,
and returns an ``Opening``: the PDU's ``rts.Kind``, the virtual connection cookie and how
many request-body bytes may follow. The table ``_OPENINGS`` is the whole rule:

* ``RPC_IN_DATA``: CONN/B1 (a new VC) or IN_R1/R2/A1 (recycling), Content-Length
  128 KiB..2 GiB ([MS-RPCH] 2.1.2.1.1);
* ``RPC_OUT_DATA``: CONN/A1 with Content-Length 76 (just A1), or OUT_R1/R2/A3 with 120
  (A3 then OUT_R2/C1).

``check_content_length`` applies the length half before the first PDU is read, so a wrong
length is refused at once; ``first_pdu_length`` bounds that first PDU from its header.

Flow control (3.2.1.1.4, 3.2.1.5.1, protocol notes 4): only RPC PDUs count.
IN direction: the proxy is the receiver with window ``receive_window``
(announced in CONN/C2); PDUs are consumed as soon as they are handed to the
backend, and once more than half a window has arrived since the last ack a
FlowControlAckWithDestination(FDClient) naming the IN channel cookie goes out
on OUT (earlier when the client's fragments, max_xmit_frag of its BIND, would
no longer fit in what is left: it may hold one until it fits). OUT direction:
the proxy is the sender; the client's window comes from CONN/A1 (or
OUT_R2/A3); a PDU is sent if it fits, or if less than half the window is
unacknowledged (clients ack only past half, so waiting then would deadlock);
else it is queued and the backend is paused until a FlowControlAck(With
Destination FDOutProxy) for the OUT channel cookie reopens the window.

``OutChannel`` and ``InChannel`` are what the VC keeps per channel: the flow-control
window each way (3.2.1.1.4, 3.2.1.5.1), the OUT Content-Length budget we declared, and
the IN request body's framer; ``VcSettings`` sizes them. ``RequestBody`` is the rest of
one channel request's body after its first PDU: it holds the Content-Length budget both
kinds of request body are counted against (``Opening.body_left``), and frames an OUT
request body (which may carry only OUT_R2/C1) into whole PDUs for the VC. The adapter
passes every body byte through it; it decides nothing itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import final

from dcerpc.pdu import MAX_FRAG_LENGTH, FramingError, Pdu, PduFramer, parse_header
from rpcproxy.errors import ProtocolError, protocol_error
from rpcproxy.rpch import rts
from rpcproxy.rpch.actions import Channel

IN_MIN_CONTENT_LENGTH = 0x20000  # 128 KiB .. 2 GiB, [MS-RPCH] 2.1.2.1.1
IN_MAX_CONTENT_LENGTH = 0x80000000
OUT_NEW_CONTENT_LENGTH = 76  # CONN/A1
OUT_SUCCESSOR_CONTENT_LENGTH = 120  # OUT_R2/A3 (96) + OUT_R2/C1 (24)
MAX_OPENING_PDU = 256  # the largest first PDU of a channel body is 104 bytes
# Room an OUT channel needs for the proxy's own RTS written before its first RPC PDU:
# CONN/A3 + CONN/C2 (72 bytes) on the first, the IN acks and IN_R2/A4 held for it on a
# successor (a client within its window leaves at most a few, 28-56 bytes each).
OUT_RTS_HEADROOM = 1024


class Method(enum.Enum):
    """The two HTTP methods that open a channel."""

    IN = "RPC_IN_DATA"
    OUT = "RPC_OUT_DATA"


def _in_length(length: int) -> bool:
    return IN_MIN_CONTENT_LENGTH <= length <= IN_MAX_CONTENT_LENGTH


_LENGTHS: dict[Method, Callable[[int], bool]] = {
    Method.IN: _in_length,
    Method.OUT: lambda n: n in (OUT_NEW_CONTENT_LENGTH, OUT_SUCCESSOR_CONTENT_LENGTH),
}
_WANT = {Method.IN: "128 KiB..2 GiB", Method.OUT: "76 or 120"}

# (method, first PDU) -> the Content-Lengths it may come with
_OPENINGS: dict[tuple[Method, rts.Kind], Callable[[int], bool]] = {
    (Method.IN, rts.Kind.CONN_B1): _in_length,
    (Method.IN, rts.Kind.IN_R2_A1): _in_length,
    (Method.OUT, rts.Kind.CONN_A1): lambda n: n == OUT_NEW_CONTENT_LENGTH,
    (Method.OUT, rts.Kind.OUT_R2_A3): lambda n: n == OUT_SUCCESSOR_CONTENT_LENGTH,
}
# the first PDUs that create a virtual connection (the others join one: recycling)
NEW_VC_KINDS = frozenset({rts.Kind.CONN_A1, rts.Kind.CONN_B1})


@final
@dataclass(frozen=True, slots=True)
class Opening:
    """A legal channel opening, judged once."""

    method: Method
    kind: rts.Kind
    pdu: rts.RtsPdu
    vc_cookie: bytes
    body_left: int  # request-body bytes allowed after the first PDU

    @property
    def new_vc(self) -> bool:
        """CONN/A1 or CONN/B1 (may create the VC), not a recycling successor."""
        return self.kind in NEW_VC_KINDS


@final
class RequestBody:
    """What may still come in one channel request's body after its first PDU."""

    __slots__ = ("left", "_name", "_framer")

    def __init__(self, method: Method, left: int) -> None:
        self.left = left  # bytes the request's Content-Length still allows
        self._name = "IN" if method is Method.IN else "OUT"
        self._framer = PduFramer() if method is Method.OUT else None

    def take(self, data: bytes) -> None:
        """Count ``data`` against the budget; ProtocolError if it runs past Content-Length."""
        if len(data) > self.left:
            raise ProtocolError(f"{self._name} request body runs past its Content-Length")
        self.left -= len(data)

    def out_pdus(self, data: bytes) -> list[bytes]:
        """OUT request body bytes, counted, as the whole PDUs they complete."""
        assert self._framer is not None
        self.take(data)
        try:
            return [pdu.data for pdu in self._framer.feed(data)]
        except FramingError as exc:
            raise protocol_error(exc) from None


def check_content_length(method: Method, content_length: int) -> None:
    """The length half of the rule, before the body is read (ProtocolError if wrong)."""
    if not _LENGTHS[method](content_length):
        raise ProtocolError(f"{method.value} with Content-Length {content_length} "
                            f"(want {_WANT[method]})")


def first_pdu_length(head: bytes) -> int:
    """The frag_length of a channel's first PDU from its 16-byte header, bounded."""
    try:
        length = parse_header(head).frag_length
    except FramingError as exc:
        raise protocol_error(exc) from None
    if length > MAX_OPENING_PDU:
        raise ProtocolError(f"first PDU of a channel is {length} bytes long")
    return length


def judge_opening(method: Method, content_length: int, data: bytes) -> Opening:
    """May this first PDU (``data``, one whole PDU) open a ``method`` channel of this
    Content-Length? The Opening if so, else ProtocolError."""
    check_content_length(method, content_length)
    pdu = rts.decode_rts(data)
    kind = rts.identify(pdu)
    rule = _OPENINGS.get((method, kind))
    if rule is None or not rule(content_length):
        raise ProtocolError(f"{kind.value} cannot open an {method.value} channel "
                            f"of Content-Length {content_length}")
    return Opening(method, kind, pdu, rts.cookies(pdu)[0], content_length - len(data))


@dataclass(frozen=True, slots=True)
class VcSettings:
    """Tunables of one VC; defaults are what ``rpcproxy serve`` uses."""

    receive_window: int = rts.MAX_RECEIVE_WINDOW  # IN window announced in CONN/C2
    connection_timeout_ms: int = 120_000  # announced in CONN/A3 and CONN/C2
    out_content_length: int = 0x40000000  # Content-Length of each OUT response (1 GiB)
    setup_timeout: float = 30.0  # seconds for the other channel of a pair to arrive
    recycle_timeout: float = 60.0  # seconds for a recycling sequence to complete
    out_reserve: int = 4096  # bytes of an OUT channel kept for pings and A6/B3
    max_ping_interval: float = 60.0  # ping at least this often while idle
    # The data paths' fast paths (one read = one PDU) give exactly what the general paths
    # give; tests turn them off to compare the two on the same random event sequences.
    fast_paths: bool = True

    def __post_init__(self) -> None:
        if not rts.MIN_RECEIVE_WINDOW <= self.receive_window <= rts.MAX_RECEIVE_WINDOW:
            raise ValueError("receive_window must be 8 KiB..256 KiB")
        timeout = self.connection_timeout_ms
        if not rts.MIN_CONNECTION_TIMEOUT <= timeout <= rts.MAX_CONNECTION_TIMEOUT:
            raise ValueError("connection_timeout_ms must be 120000..14400000")
        if self.out_content_length < 8 * self.out_reserve:
            raise ValueError("out_content_length is too small")
        if self.out_reserve < 128:  # A2 + A6 + B3 (84 bytes) and a ping must always fit
            raise ValueError("out_reserve must be at least 128 bytes")


def min_out_content_length(out_reserve: int) -> int:
    """The smallest OUT Content-Length that always carries the largest fragment an
    endpoint may send (frag_length is a u16, whatever max_recv_frag was negotiated),
    with the reserve and our own RTS beside it."""
    return MAX_FRAG_LENGTH + out_reserve + OUT_RTS_HEADROOM


@dataclass(slots=True)
class OutChannel:
    channel: Channel
    cookie: bytes
    peer_window: int  # client's ReceiveWindowSize for this channel
    bytes_left: int  # of the Content-Length we declared
    bytes_sent: int = 0  # RPC bytes (flow-control BytesSent)
    available: int = 0  # sender AvailableWindow
    started: bool = False  # 200 Success written

    def __post_init__(self) -> None:
        self.available = self.peer_window

    def admits(self, size: int) -> bool:
        """May an RPC PDU of ``size`` bytes go out now (3.2.1.5.1)?

        Yes when it fits in the window the client left us. Also when it does not fit but
        less than half of the client's window is unacknowledged: clients acknowledge only
        once more than half of their window has been used (W's rule, note <27>; impacket
        and Samba do the same), so holding the PDU would wait for an ack that never comes
        (a 64 KiB fragment after a small PDU in a 64 KiB window). The overrun is at most
        one PDU, which the client can always take: it is the whole window when nothing is
        outstanding."""
        return size <= self.available or 2 * (self.peer_window - self.available) < self.peer_window

    def sent(self, size: int) -> None:
        """An RPC PDU of ``size`` bytes went out: it uses window and Content-Length."""
        self.available -= size
        self.bytes_sent += size
        self.bytes_left -= size

    def acked(self, ack: rts.FlowControlAck) -> None:
        """The client's FlowControlAck for this channel reopens the window (3.2.1.5.1.1)."""
        outstanding = self.bytes_sent - ack.bytes_received
        if outstanding < 0 or ack.available_window > self.peer_window:
            raise ProtocolError(
                f"flow-control ack acknowledges {ack.bytes_received} of {self.bytes_sent} "
                f"bytes with window {ack.available_window} (max {self.peer_window})"
            )
        self.available = max(0, ack.available_window - outstanding)


@dataclass(slots=True)
class InChannel:
    channel: Channel
    cookie: bytes
    framer: PduFramer = field(default_factory=PduFramer)
    bytes_received: int = 0  # RPC bytes (flow-control BytesReceived)
    unacked: int = 0  # RPC bytes since the last ack we sent
    plugged: list[Pdu] = field(default_factory=list)  # successor PDUs held until the switch

    def received(self, size: int, ack_after: int) -> bool:
        """An RPC PDU of ``size`` bytes was consumed; is an ack due (more than ``ack_after``
        bytes unacknowledged)? Then the count starts again."""
        self.bytes_received += size
        self.unacked += size
        if self.unacked > ack_after:
            self.unacked = 0
            return True
        return False
