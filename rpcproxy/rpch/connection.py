"""The virtual connection: [MS-RPCH] v2 from the proxy's side, as a pure state machine.

Theory of operation
-------------------
A translating proxy plays three roles of the four-party model at once: inbound
proxy, outbound proxy and the RTS half of the RPC server ([MS-RPCH] 1.3,
3.2.3-3.2.5). The backend is a plain ncacn_ip_tcp DCE/RPC server that never
sees an RTS PDU. A ``VirtualConnection`` owns everything about one virtual
connection (VC) and nothing about sockets or clocks:

* the adapter feeds it *events* (a method call each: an OUT or IN channel
  opened with its first RTS PDU, bytes read from a channel, bytes read from
  the backend, a channel or the backend closed, the clock ticked), passing the
  current time as a number;
* each call returns a list of *actions* for the adapter to carry out, in
  order: write bytes to a client OUT channel (``SendToClient``, whole PDUs
  only), start an OUT channel's ``200 Success`` response, write bytes to the
  backend, connect/close the backend, pause/resume reading the backend, close
  a channel (with the error to report if its response has not started).

Phases (``Phase``), mapped to the spec:

``WAIT_PAIR``      only one of CONN/A1 (OUT, 3.2.4.5.1 Open_Start->C1W) and
                   CONN/B1 (IN, 3.2.3.5.1) has arrived; bounded by
                   ``setup_timeout``. The backend connection starts at once.
``WAIT_BACKEND``   both arrived, the backend TCP connection is not up yet.
``OPENED``         CONN/A3 (with the ``200 Success`` header) and CONN/C2 sent
                   (4.1: the translator synthesises A3/C2 instead of relaying
                   A2/B2/B3/C1); RPC PDUs flow both ways.
``CLOSED``         torn down: every channel and the backend are closed
                   (3.2.3.5.10, 3.2.4.5.14: any error ends the whole VC).

Inside ``OPENED`` two independent sub-machines run channel recycling, both as
the R2 variants because the successor always lands on this same VC object
(protocol notes 6, in docs/protocol-notes.md):

* IN (3.2.3.5.5): a new IN request starting with IN_R2/A1 -> successor
  recorded and *plugged* (its PDUs buffered), IN_R2/A4 sent on OUT; IN_R2/A5
  on the old IN -> switch to the successor, replay its buffer, close the old.
  A client that got IN_R2/A4 sends A5 on the old channel and may then fill the
  successor and recycle it too; its next IN_R2/A1 (naming the pending
  successor as predecessor) travels on another TCP connection and can arrive
  before that A5. It is *queued*: plugged like a successor, its IN_R2/A4
  withheld until A5 completes the pending recycle; then it becomes the pending
  successor. So each channel's PDUs reach the backend in channel order.
* OUT (3.2.4.5.4-.7): when the next write would not fit in what is left of
  the OUT channel's Content-Length, OUT_R2/A2 goes on the old channel and RPC
  PDUs wait in the send queue (as gromox does); a new OUT request with
  OUT_R2/A3 -> OUT_R2/A6 on the old channel; OUT_R2/A7 on IN -> OUT_R2/B3 as
  the last PDU on the old channel, which is then closed; OUT_R2/C1 on the
  successor; once both happened the successor's ``200 Success`` is written and
  the queue drains onto it.
  A recycle is started only if it makes progress: a PDU that could not fit in
  a fresh channel either (Content-Length less the reserve and the RTS waiting
  to go first) ends the VC with that reason instead of recycling forever; the
  configuration refuses Content-Lengths below ``min_out_content_length`` (one
  largest fragment plus reserve plus room for our RTS), so only a VcSettings
  built by hand can get there.

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

The data paths have fast paths for the common read (one read = one whole RPC
PDU, nothing held or due) that give exactly the general paths' result; the
tests compare the two on random event sequences.

Keep-alive (3.2.4.2, protocol notes 5): after CONN/C2 a Ping goes on OUT whenever
nothing was written for ``ping_interval``.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from dcerpc.pdu import (
    CLIENT_PTYPES,
    HEADER_LEN,
    MAX_FRAG_LENGTH,
    SERVER_PTYPES,
    FramingError,
    Pdu,
    PduFramer,
    PType,
    single_pdu_ptype,
)
from rpcproxy.errors import (
    ERROR_ACCESS_DENIED,
    RPC_S_SERVER_UNAVAILABLE,
    BackendUnavailable,
    ProtocolError,
    RpcProxyError,
    protocol_error,
)
from rpcproxy.rpch import rts

Channel = Hashable  # whatever the adapter uses to name one HTTP channel
# Room an OUT channel needs for the proxy's own RTS written before its first RPC PDU:
# CONN/A3 + CONN/C2 (72 bytes) on the first, the IN acks and IN_R2/A4 held for it on a
# successor (a client within its window leaves at most a few, 28-56 bytes each).
OUT_RTS_HEADROOM = 1024
_BINDS = frozenset({PType.BIND, PType.ALTER_CONTEXT})  # carry the client's max_xmit_frag


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Write these bytes (whole PDUs) on an OUT channel's response body."""

    channel: Channel
    data: bytes


@dataclass(frozen=True, slots=True)
class StartResponse:
    """Write the OUT channel's ``200 Success`` status line and headers."""

    channel: Channel
    content_length: int


@dataclass(frozen=True, slots=True)
class SendToBackend:
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectBackend:
    pass


@dataclass(frozen=True, slots=True)
class PauseBackend:
    pass


@dataclass(frozen=True, slots=True)
class ResumeBackend:
    pass


@dataclass(frozen=True, slots=True)
class CloseChannel:
    """Close one HTTP channel after what was already queued for it is written.

    ``error`` is set when the channel ends because of a failure; an adapter
    answers ``503 RPC Error`` with it if the channel's response has not
    started yet.
    """

    channel: Channel
    error: RpcProxyError | None = None


@dataclass(frozen=True, slots=True)
class CloseBackend:
    pass


@dataclass(frozen=True, slots=True)
class VcClosed:
    """The VC is finished; the adapter drops it from its registry."""

    reason: str
    error: RpcProxyError | None


Action = (
    SendToClient
    | StartResponse
    | SendToBackend
    | ConnectBackend
    | PauseBackend
    | ResumeBackend
    | CloseChannel
    | CloseBackend
    | VcClosed
)


# --- settings and state ----------------------------------------------------------------------


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


class Phase(enum.Enum):
    WAIT_PAIR = "waiting for the other channel"
    WAIT_BACKEND = "connecting to the backend"
    OPENED = "opened"
    CLOSED = "closed"


class OutRecycle(enum.Enum):
    """OUT_R2 progress (3.2.4.5.4-.7 outbound proxy + server roles)."""

    NONE = "none"
    A3W = "sent OUT_R2/A2, waiting for the successor's OUT_R2/A3"
    A7_C1W = "sent OUT_R2/A6, waiting for OUT_R2/A7 and OUT_R2/C1"


@dataclass(slots=True)
class OutChannel:
    channel: Channel
    cookie: bytes
    peer_window: int  # client's ReceiveWindowSize for this channel
    bytes_left: int  # of the Content-Length we declared
    bytes_sent: int = 0  # RPC bytes (flow-control BytesSent)
    available: int = 0  # sender AvailableWindow
    started: bool = False  # 200 Success written
    c1_seen: bool = False  # successor only: OUT_R2/C1 arrived

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


@dataclass(slots=True)
class InChannel:
    channel: Channel
    cookie: bytes
    framer: PduFramer = field(default_factory=PduFramer)
    bytes_received: int = 0  # RPC bytes (flow-control BytesReceived)
    unacked: int = 0  # RPC bytes since the last ack we sent
    plugged: list[Pdu] = field(default_factory=list)  # successor PDUs held until the switch


@dataclass(slots=True)
class Traffic:
    """Counters for the end-of-VC log line and metrics."""

    client_to_backend: int = 0
    backend_to_client: int = 0


class VirtualConnection:
    """One virtual connection; see the module docstring."""

    # The data paths' fast paths (one read = one PDU) give exactly what the general paths
    # give; tests turn them off to compare the two on the same random event sequences.
    fast_paths = True

    def __init__(
        self,
        cookie: bytes,
        *,
        identity: Hashable,
        target: Hashable,
        settings: VcSettings,
        now: float,
    ) -> None:
        self.cookie = cookie
        self.identity = identity
        self.target = target
        self.settings = settings
        self.phase = Phase.WAIT_PAIR
        self.created = now
        self.traffic = Traffic()
        self.close_reason: str | None = None
        self.keepalive_ms = 300_000
        self._ping_s = self._ping_interval_for(self.keepalive_ms)
        # IN flow control: ack once this many bytes are unacknowledged. Half the window, as
        # W does; less when the client's fragments (max_xmit_frag of its BIND) would not
        # fit in what is left, else a client holding such a fragment for our ack waits
        # forever (seen with a 64 KiB window and 64 KiB fragments).
        self.in_ack_after = settings.receive_window // 2
        self._client_max_frag = 0
        self.backend_connected = False
        self.backend_requested = False
        self.backend_paused = False
        self.out: OutChannel | None = None
        self.in_: InChannel | None = None
        self.out_successor: OutChannel | None = None
        self.in_successor: InChannel | None = None
        # an IN_R2/A1 naming in_successor as predecessor, waiting for the pending A5
        self.in_queued: InChannel | None = None
        self.out_recycle = OutRecycle.NONE
        self.in_recycle_started: float | None = None
        self.out_recycle_started: float | None = None
        self.old_out: OutChannel | None = None  # predecessor still writing, before B3
        self.send_queue: deque[bytes] = deque()  # RPC PDUs waiting for an OUT window
        self.pending_rts: list[bytes] = []  # RTS for the client while no OUT is writable
        self.last_out_write = now
        self._backend_framer = PduFramer()
        self._out: list[Action] = []

    # ---- helpers ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def channels(self) -> list[Channel]:
        found = []
        for ch in (self.out, self.old_out, self.out_successor, self.in_, self.in_successor,
                   self.in_queued):
            if ch is not None and ch.channel not in found:  # out is old_out before B3
                found.append(ch.channel)
        return found

    def channel_counts(self) -> tuple[int, int]:
        """(IN, OUT) channels attached now, each counted once: while an OUT channel recycles,
        the old one is both ``out`` and ``old_out``."""
        outs = {id(c) for c in (self.out, self.old_out, self.out_successor) if c is not None}
        ins = {id(c) for c in (self.in_, self.in_successor) if c is not None}
        return len(ins), len(outs)

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _run(self, fn: object, *args: object) -> list[Action]:
        """Run one event handler; a ProtocolError tears the VC down."""
        if self.phase is Phase.CLOSED:
            return []
        try:
            fn(*args)  # type: ignore[operator]
        except RpcProxyError as exc:
            self._teardown(exc.reason, exc)
        except FramingError as exc:  # a framer's: the stream lost its DCE/RPC framing
            self._teardown(exc.reason, protocol_error(exc))
        return self._flush()

    def _run_opening(self, channel: Channel, fn: object, *args: object) -> list[Action]:
        """``_run`` for a channel's first PDU: if the VC ends, that channel must close too,
        even though the VC had not adopted it yet (else its request would hang)."""
        actions = self._run(fn, *args)
        if self.phase is Phase.CLOSED and not any(
            isinstance(a, CloseChannel) and a.channel == channel for a in actions
        ):
            error = next((a.error for a in actions if isinstance(a, VcClosed)), None)
            actions.insert(0, CloseChannel(
                channel, error or ProtocolError("virtual connection is closed")))
        return actions

    def ping_interval(self) -> float:
        return self._ping_s

    def _ping_interval_for(self, keepalive_ms: int) -> float:
        # Ping before any intermediary's idle timer (our own ConnectionTimeout, the
        # client's keep-alive) can fire: half of the smaller, capped.
        half = min(self.settings.connection_timeout_ms, keepalive_ms) / 2000.0
        return min(half, self.settings.max_ping_interval)

    # ---- channel opening ----------------------------------------------------------------

    def open_out(self, channel: Channel, a1: rts.RtsPdu, *, identity: Hashable,
                 target: Hashable, now: float) -> list[Action]:
        """A new OUT channel request whose body started with CONN/A1."""
        return self._run_opening(channel, self._open_out, channel, a1, identity, target, now)

    def open_in(self, channel: Channel, b1: rts.RtsPdu, *, identity: Hashable,
                target: Hashable, now: float) -> list[Action]:
        """A new IN channel request whose body started with CONN/B1."""
        return self._run_opening(channel, self._open_in, channel, b1, identity, target, now)

    def open_out_successor(self, channel: Channel, a3: rts.RtsPdu, *, identity: Hashable,
                           target: Hashable, now: float) -> list[Action]:
        """A replacement OUT channel request whose body started with OUT_R2/A3."""
        return self._open_successor(channel, self._open_out_successor, a3, identity, target,
                                    now)

    def open_in_successor(self, channel: Channel, a1: rts.RtsPdu, *, identity: Hashable,
                          target: Hashable, now: float) -> list[Action]:
        """A replacement IN channel request whose body started with IN_R2/A1."""
        return self._open_successor(channel, self._open_in_successor, a1, identity, target,
                                    now)

    def _open_successor(self, channel: Channel, handler: object, pdu: rts.RtsPdu,
                        identity: Hashable, target: Hashable, now: float) -> list[Action]:
        """A recycling channel joins only an open VC, and only for its user and target."""
        if self.phase is Phase.CLOSED:
            return [CloseChannel(channel, ProtocolError("virtual connection is closed"))]
        refusal = self._refuse_foreign(channel, identity, target)
        if refusal:
            return refusal
        return self._run_opening(channel, handler, channel, pdu, now)

    def _refuse_foreign(self, channel: Channel, identity: Hashable,
                        target: Hashable) -> list[Action] | None:
        """A channel of another user or for another target may not join this VC.

        Only the intruding channel is refused: the cookie is a bearer token and the
        rightful owner's channels stay up.
        """
        if identity != self.identity:
            return [CloseChannel(channel, ProtocolError(
                "channel belongs to another user than its virtual connection",
                rpc_error=ERROR_ACCESS_DENIED))]
        if target != self.target:
            return [CloseChannel(channel, ProtocolError(
                "channel asks for another target than its virtual connection"))]
        return None

    def _join_check(self, channel: Channel, identity: Hashable, target: Hashable) -> bool:
        refusal = self._refuse_foreign(channel, identity, target)
        if refusal:
            self._out.extend(refusal)
            return False
        return True

    def _channel_cookie(self, channel: Channel, pdu: rts.RtsPdu, name: str, taken: bool,
                        identity: Hashable, target: Hashable) -> bytes | None:
        """Checks CONN/A1 and CONN/B1 share; the new channel's cookie, or None if refused."""
        if not self._join_check(channel, identity, target):
            return None
        if taken or self.phase is not Phase.WAIT_PAIR:
            self._emit(CloseChannel(channel, ProtocolError(f"a second {name} for one connection")))
            return None
        vc_cookie, channel_cookie = rts.cookies(pdu)
        if vc_cookie != self.cookie:
            raise ProtocolError(f"{name} virtual connection cookie mismatch")
        return channel_cookie

    def _open_out(self, channel: Channel, a1: rts.RtsPdu, identity: Hashable,
                  target: Hashable, now: float) -> None:
        out_cookie = self._channel_cookie(channel, a1, "CONN/A1", self.out is not None,
                                          identity, target)
        if out_cookie is None:
            return
        window = a1.get(rts.ReceiveWindowSize)
        assert isinstance(window, rts.ReceiveWindowSize)
        self.out = OutChannel(channel, out_cookie, window.value, self.settings.out_content_length)
        self._request_backend()
        self._maybe_open(now)

    def _open_in(self, channel: Channel, b1: rts.RtsPdu, identity: Hashable,
                 target: Hashable, now: float) -> None:
        in_cookie = self._channel_cookie(channel, b1, "CONN/B1", self.in_ is not None,
                                         identity, target)
        if in_cookie is None:
            return
        keepalive = b1.get(rts.ClientKeepalive)
        assert isinstance(keepalive, rts.ClientKeepalive)
        self._set_keepalive(keepalive.value)
        self.in_ = InChannel(channel, in_cookie)
        self._request_backend()
        self._maybe_open(now)

    def _set_keepalive(self, value: int) -> None:
        # 0 means 300 000 ms (2.2.3.5.6); clamp silly small values like gromox does.
        self.keepalive_ms = 300_000 if value == 0 else max(value, 60_000)
        self._ping_s = self._ping_interval_for(self.keepalive_ms)

    def _request_backend(self) -> None:
        if not self.backend_requested:
            self.backend_requested = True
            self._emit(ConnectBackend())

    def _maybe_open(self, now: float) -> None:
        if self.out is None or self.in_ is None:
            return
        if not self.backend_connected:
            self.phase = Phase.WAIT_BACKEND
            return
        out = self.out
        self.phase = Phase.OPENED
        self._start(out)
        self._write_rts(out, rts.conn_a3(self.settings.connection_timeout_ms), now)
        self._write_rts(
            out,
            rts.conn_c2(self.settings.receive_window, self.settings.connection_timeout_ms),
            now,
        )
        # Anything that came from the backend before the client could take it.
        self._drain(now)

    def _start(self, out: OutChannel) -> None:
        out.started = True
        self._emit(StartResponse(out.channel, self.settings.out_content_length))

    # ---- backend events -----------------------------------------------------------------

    def backend_up(self, now: float) -> list[Action]:
        return self._run(self._backend_up, now)

    def _backend_up(self, now: float) -> None:
        self.backend_connected = True
        self._maybe_open(now)

    def backend_failed(self, error: RpcProxyError, now: float) -> list[Action]:
        """The backend could not be connected (after the adapter's retries)."""
        return self._run(self._raise, error)

    @staticmethod
    def _raise(error: RpcProxyError) -> None:
        raise error

    def backend_data(self, data: bytes, now: float) -> list[Action]:
        # Fast path, same result as the general one: an open VC, nothing queued or held,
        # and the read is exactly one server PDU that the client's window and the OUT
        # channel's Content-Length take now. It goes straight out on the OUT channel.
        out = self.out
        if (self.fast_paths and self.phase is Phase.OPENED and not self.send_queue
                and out is not None and out.started and self.out_recycle is OutRecycle.NONE
                and not self.backend_paused and type(data) is bytes
                and not self._backend_framer.buffered
                and single_pdu_ptype(data) in SERVER_PTYPES):
            size = len(data)
            if out.bytes_left - size >= self.settings.out_reserve and out.admits(size):
                self.traffic.backend_to_client += size
                out.available -= size
                out.bytes_sent += size
                out.bytes_left -= size
                self.last_out_write = now
                return [SendToClient(out.channel, data)]
        return self._run(self._backend_data, data, now)

    def _backend_data(self, data: bytes, now: float) -> None:
        for pdu in self._backend_framer.feed(data):
            ptype = pdu.header.ptype
            if ptype not in SERVER_PTYPES:
                name = PType(ptype).name if ptype in PType._value2member_map_ else str(ptype)
                raise ProtocolError(f"backend sent a {name} PDU, which a server never sends")
            self.traffic.backend_to_client += len(pdu.data)
            self.send_queue.append(pdu.data)
        self._drain(now)

    def backend_closed(self, now: float) -> list[Action]:
        return self._run(self._backend_closed)

    def _backend_closed(self) -> None:
        raise BackendUnavailable("the backend closed the connection",
                                 rpc_error=RPC_S_SERVER_UNAVAILABLE)

    # ---- OUT direction: sending to the client --------------------------------------------

    def _writable_out(self) -> OutChannel | None:
        """The channel RPC PDUs may go on now, if any."""
        if self.phase is not Phase.OPENED or self.out_recycle is not OutRecycle.NONE:
            return None
        out = self.out
        if out is None or not out.started:
            return None
        return out

    def _write_rts(self, out: OutChannel, data: bytes, now: float) -> None:
        out.bytes_left -= len(data)
        self.last_out_write = now
        self._emit(SendToClient(out.channel, data))

    # Room an OUT channel keeps for the recycling PDUs still due on it (A2, A6, B3).
    _CLOSING_ROOM = len(rts.OUT_R2_A2) + len(rts.OUT_R2_A6) + len(rts.OUT_R2_B3)

    def _send_rts_to_client(self, data: bytes, now: float) -> None:
        """RTS for the client: on the channel the client reads now, or held for the next
        (also when it would eat the room that channel's own A2/A6/B3 need)."""
        target = self.old_out if self.old_out is not None else self.out
        if target is not None and target.started and (
            target.bytes_left - len(data) >= self._CLOSING_ROOM
        ):
            self._write_rts(target, data, now)
        else:
            self.pending_rts.append(data)

    def _drain(self, now: float) -> None:
        out = self._writable_out()
        queue = self.send_queue
        while out is not None and queue:
            pdu = queue[0]
            size = len(pdu)
            if out.bytes_left - size < self.settings.out_reserve:
                self._recycle_for(out, size, now)
                break
            if not out.admits(size):
                break
            queue.popleft()
            out.available -= size
            out.bytes_sent += size
            out.bytes_left -= size
            self.last_out_write = now
            self._emit(SendToClient(out.channel, pdu))
        self._update_backend_pause()

    def _update_backend_pause(self) -> None:
        # Stop reading the backend while PDUs wait for the client's window, so TCP
        # back-pressure reaches the backend instead of our memory.
        want_pause = bool(self.send_queue)
        if want_pause and not self.backend_paused:
            self.backend_paused = True
            self._emit(PauseBackend())
        elif not want_pause and self.backend_paused:
            self.backend_paused = False
            self._emit(ResumeBackend())

    def _flow_control_ack(self, ack: rts.FlowControlAck, now: float) -> None:
        for out in (self.out, self.out_successor):
            if out is not None and out.cookie == ack.channel_cookie:
                break
        else:
            return  # unknown cookie (e.g. a predecessor's): discard, 3.2.1.5.1.1
        outstanding = out.bytes_sent - ack.bytes_received
        if outstanding < 0 or ack.available_window > out.peer_window:
            raise ProtocolError(
                f"flow-control ack acknowledges {ack.bytes_received} of {out.bytes_sent} bytes "
                f"with window {ack.available_window} (max {out.peer_window})"
            )
        out.available = max(0, ack.available_window - outstanding)
        self._drain(now)

    # ---- OUT channel recycling (OUT_R2) -------------------------------------------------

    def _begin_out_recycle(self, out: OutChannel, now: float) -> None:
        self.out_recycle = OutRecycle.A3W
        self.out_recycle_started = now
        self.old_out = out
        self._write_rts(out, rts.OUT_R2_A2, now)

    def _recycle_for(self, out: OutChannel, size: int, now: float) -> None:
        """The next PDU (``size`` bytes) does not fit in what ``out`` has left: recycle,
        unless a fresh channel could not take it either, which would recycle forever
        without ever sending it. A PDU cannot span two channels, so that ends the VC."""
        s = self.settings
        waiting = sum(map(len, self.pending_rts))
        budget = s.out_content_length - s.out_reserve - waiting
        if size > budget:
            raise ProtocolError(
                f"a {size}-byte PDU from the backend cannot fit in any OUT channel: "
                f"out_content_length {s.out_content_length} less the {s.out_reserve}-byte "
                f"reserve and {waiting} bytes of RTS leaves {budget}")
        self._begin_out_recycle(out, now)

    def _open_out_successor(self, channel: Channel, a3: rts.RtsPdu, now: float) -> None:
        if self.phase is not Phase.OPENED or self.out_recycle is not OutRecycle.A3W:
            raise ProtocolError("OUT_R2/A3 without a pending OUT channel recycle")
        vc_cookie, predecessor, successor = rts.cookies(a3)
        old = self.old_out
        assert old is not None
        if vc_cookie != self.cookie or predecessor != old.cookie:
            raise ProtocolError("OUT_R2/A3 cookies do not match the current OUT channel")
        window = a3.get(rts.ReceiveWindowSize)
        assert isinstance(window, rts.ReceiveWindowSize)
        self.out_successor = OutChannel(
            channel, successor, window.value, self.settings.out_content_length
        )
        self.out_recycle = OutRecycle.A7_C1W
        self._write_rts(old, rts.OUT_R2_A6, now)

    def out_request_data(self, channel: Channel, data: bytes, now: float) -> list[Action]:
        """More bytes of an OUT request body after its first PDU (only OUT_R2/C1 is legal)."""
        return self._run(self._out_request_data, channel, data, now)

    def _out_request_data(self, channel: Channel, data: bytes, now: float) -> None:
        succ = self.out_successor
        if succ is None and self.out_recycle is OutRecycle.A7_C1W and self.old_out is None:
            succ = self.out  # OUT_R2/A7 came first and already made the successor default
        if succ is None or succ.channel != channel or succ.c1_seen:
            raise ProtocolError("unexpected bytes in an OUT channel request body")
        pdu = rts.decode_rts(data)
        if rts.identify(pdu) is not rts.Kind.OUT_R2_C1:
            raise ProtocolError("an OUT channel request body may only carry OUT_R2/C1 here")
        succ.c1_seen = True
        self._maybe_finish_out_recycle(now)

    def _out_r2_a7(self, pdu: rts.RtsPdu, now: float) -> None:
        succ = self.out_successor
        old = self.old_out
        if self.out_recycle is not OutRecycle.A7_C1W or succ is None or old is None:
            raise ProtocolError("OUT_R2/A7 without a pending OUT channel recycle")
        dest = pdu.get(rts.Destination)
        assert isinstance(dest, rts.Destination)
        if dest.destination is not rts.ForwardDestination.SERVER:
            raise ProtocolError("OUT_R2/A7 not addressed to the server")
        (cookie,) = rts.cookies(pdu)
        if cookie != succ.cookie:
            raise ProtocolError("OUT_R2/A7 names another successor OUT channel")
        # B3 is the last PDU on the old channel; the client then switches.
        self._write_rts(old, rts.OUT_R2_B3, now)
        self._emit(CloseChannel(old.channel))
        self.old_out = None
        self.out = succ
        self.out_successor = None
        self._maybe_finish_out_recycle(now)

    def _maybe_finish_out_recycle(self, now: float) -> None:
        out = self.out
        if (
            self.out_recycle is not OutRecycle.A7_C1W
            or self.old_out is not None
            or out is None
            or not out.c1_seen
        ):
            return
        self.out_recycle = OutRecycle.NONE
        self.out_recycle_started = None
        self._start(out)
        for data in self.pending_rts:
            self._write_rts(out, data, now)
        self.pending_rts.clear()
        self._drain(now)

    # ---- IN direction -------------------------------------------------------------------

    def in_data(self, channel: Channel, data: bytes, now: float) -> list[Action]:
        """Bytes of an IN request body after its first PDU."""
        # Fast path, same result as the general one: the open VC's current IN channel, no
        # partial PDU held, and the read is exactly one REQUEST PDU after which no
        # flow-control ack is due yet. It goes straight to the backend.
        cur = self.in_
        if (self.fast_paths and cur is not None and self.phase is Phase.OPENED
                and type(data) is bytes and channel == cur.channel
                and not cur.framer.buffered
                and cur.unacked + len(data) <= self.in_ack_after
                and single_pdu_ptype(data) == PType.REQUEST):
            size = len(data)
            self.traffic.client_to_backend += size
            cur.bytes_received += size
            cur.unacked += size
            return [SendToBackend(data)]
        return self._run(self._in_data, channel, data, now)

    def _in_data(self, channel: Channel, data: bytes, now: float) -> None:
        cur = self.in_
        succ = self.in_successor
        if cur is not None and channel == cur.channel:
            for pdu in cur.framer.feed(data):
                self._in_pdu(cur, pdu, now)
                if self.phase is Phase.CLOSED or self.in_ is not cur:
                    break  # switched to the successor by IN_R2/A5, or torn down
        elif succ is not None and channel == succ.channel:
            succ.plugged.extend(succ.framer.feed(data))
        elif self.in_queued is not None and channel == self.in_queued.channel:
            self.in_queued.plugged.extend(self.in_queued.framer.feed(data))
        # else: a predecessor IN channel after the switch: ignore what is left.

    def _in_pdu(self, ch: InChannel, pdu: Pdu, now: float) -> None:
        if pdu.header.ptype == PType.RTS:
            self._in_rts(ch, rts.decode_rts(pdu.data), now)
            return
        if pdu.header.ptype not in CLIENT_PTYPES:
            raise ProtocolError(f"PDU type {pdu.header.ptype} may not be sent by a client")
        if self.phase is not Phase.OPENED:
            raise ProtocolError("RPC PDU on the IN channel before the connection was opened")
        size = len(pdu.data)
        if pdu.header.ptype in _BINDS and size >= HEADER_LEN + 2:
            self._note_client_max_frag(pdu)
        self.traffic.client_to_backend += size
        self._emit(SendToBackend(pdu.data))
        ch.bytes_received += size
        ch.unacked += size
        if ch.unacked > self.in_ack_after:
            ch.unacked = 0
            self._send_rts_to_client(
                rts.flow_control_ack(
                    rts.ForwardDestination.CLIENT, ch.bytes_received,
                    self.settings.receive_window, ch.cookie,
                ),
                now,
            )

    def _note_client_max_frag(self, pdu: Pdu) -> None:
        """A BIND or ALTER_CONTEXT: its max_xmit_frag bounds the client's fragments."""
        fmt = "<H" if pdu.header.little_endian else ">H"
        (max_xmit,) = struct.unpack_from(fmt, pdu.data, HEADER_LEN)
        if max_xmit > self._client_max_frag:
            self._client_max_frag = max_xmit
            window = self.settings.receive_window
            self.in_ack_after = max(0, min(window // 2, window - max_xmit))

    def _in_rts(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        kind = rts.identify(pdu)
        if kind is rts.Kind.PING:
            return
        if kind is rts.Kind.KEEP_ALIVE:
            value = pdu.get(rts.ClientKeepalive)
            assert isinstance(value, rts.ClientKeepalive)
            self._set_keepalive(value.value)
            return
        if kind in (rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION, rts.Kind.FLOW_CONTROL_ACK):
            if kind is rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION:
                dest = pdu.get(rts.Destination)
                assert isinstance(dest, rts.Destination)
                if dest.destination is not rts.ForwardDestination.OUT_PROXY:
                    raise ProtocolError(
                        f"flow-control ack on IN for {dest.destination.name}, not the OUT proxy"
                    )
            ack = pdu.get(rts.FlowControlAck)
            assert isinstance(ack, rts.FlowControlAck)
            if self.phase is Phase.OPENED:
                self._flow_control_ack(ack, now)
            return
        if self.phase is not Phase.OPENED:
            raise ProtocolError(f"{kind.value} before the connection was opened")
        if kind in (rts.Kind.OUT_R2_A7, rts.Kind.OUT_R1_A7):
            self._out_r2_a7(pdu, now)
        elif kind is rts.Kind.IN_R2_A5:
            self._in_r2_a5(ch, pdu, now)
        else:
            raise ProtocolError(f"{kind.value} is not valid on an IN channel")

    # ---- IN channel recycling (IN_R2) ---------------------------------------------------

    def _open_in_successor(self, channel: Channel, a1: rts.RtsPdu, now: float) -> None:
        if self.phase is not Phase.OPENED:
            raise ProtocolError("IN_R2/A1 before the connection was opened")
        cur = self.in_
        assert cur is not None
        vc_cookie, predecessor, successor = rts.cookies(a1)
        pending = self.in_successor
        if pending is not None:
            # The client got IN_R2/A4, sent A5 on the old channel (still in flight on its
            # TCP connection) and is recycling the successor already: queue this one.
            if (self.in_queued is not None or vc_cookie != self.cookie
                    or predecessor != pending.cookie):
                raise ProtocolError("IN_R2/A1 while another IN channel recycle is pending")
            self.in_queued = InChannel(channel, successor)
            return  # its IN_R2/A4 goes out when A5 completes the pending recycle
        if vc_cookie != self.cookie or predecessor != cur.cookie:
            raise ProtocolError("IN_R2/A1 cookies do not match the current IN channel")
        self.in_successor = InChannel(channel, successor)
        self.in_recycle_started = now
        self._send_rts_to_client(rts.IN_R2_A4, now)

    def _in_r2_a5(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        succ = self.in_successor
        if succ is None or ch is not self.in_:
            raise ProtocolError("IN_R2/A5 without a pending IN channel recycle")
        (cookie,) = rts.cookies(pdu)
        if cookie != succ.cookie:
            raise ProtocolError("IN_R2/A5 names another successor IN channel")
        old = ch
        self.in_ = succ
        self.in_successor = None
        self.in_recycle_started = None
        self._emit(CloseChannel(old.channel))
        held, succ.plugged = succ.plugged, []
        for held_pdu in held:
            self._in_pdu(succ, held_pdu, now)
            if self.phase is Phase.CLOSED:
                return
        queued, self.in_queued = self.in_queued, None
        if queued is not None:  # the next recycle, which overtook this A5
            self.in_successor = queued
            self.in_recycle_started = now
            self._send_rts_to_client(rts.IN_R2_A4, now)

    # ---- closing and time ---------------------------------------------------------------

    def channel_closed(self, channel: Channel, now: float) -> list[Action]:
        """The client side of one channel went away (EOF, reset, end of body)."""
        return self._run(self._channel_closed, channel)

    def _channel_closed(self, channel: Channel) -> None:
        roles = (
            (self.out, "OUT channel"),
            (self.in_, "IN channel"),
            (self.out_successor, "successor OUT channel"),
            (self.in_successor, "successor IN channel"),
            (self.in_queued, "queued successor IN channel"),
            (self.old_out, "predecessor OUT channel before OUT_R2/B3"),
        )
        for ch, role in roles:
            if ch is not None and ch.channel == channel:
                # The client ending a live channel ends the VC (3.2.3.5.10): a normal
                # close, not an error to report on the other channels.
                self._teardown(f"client closed its {role}", None)
                return
        # A predecessor closing after a completed recycle is normal.

    def channel_failed(self, channel: Channel, error: RpcProxyError, now: float) -> list[Action]:
        """A channel's own transport saw bad input (e.g. a body past its Content-Length)."""
        return self._run(self._raise, error)

    def on_timer(self, now: float) -> list[Action]:
        return self._run(self._on_timer, now)

    def _on_timer(self, now: float) -> None:
        s = self.settings
        if self.phase in (Phase.WAIT_PAIR, Phase.WAIT_BACKEND):
            if now - self.created >= s.setup_timeout:
                what = "the backend" if self.phase is Phase.WAIT_BACKEND else "the other channel"
                raise ProtocolError(f"timed out after {s.setup_timeout:g}s waiting for {what}")
            return
        for started in (self.in_recycle_started, self.out_recycle_started):
            if started is not None and now - started >= s.recycle_timeout:
                raise ProtocolError(f"channel recycling did not complete in {s.recycle_timeout:g}s")
        if self.phase is Phase.OPENED and now - self.last_out_write >= self.ping_interval():
            target = self.old_out if self.old_out is not None else self.out
            if target is not None and target.started:
                if target.bytes_left - len(rts.PING) < self._CLOSING_ROOM:
                    raise ProtocolError("OUT channel exhausted its Content-Length")
                if target is self.out and self.out_recycle is OutRecycle.NONE and (
                    target.bytes_left - len(rts.PING) < s.out_reserve
                ):
                    self._begin_out_recycle(target, now)
                else:
                    self._write_rts(target, rts.PING, now)

    def next_deadline(self) -> float | None:
        # Runs after every event (the adapter re-arms its timer): the common case, an open
        # VC that is not recycling, is one comparison and one addition.
        phase = self.phase
        if phase is not Phase.OPENED:
            return None if phase is Phase.CLOSED else self.created + self.settings.setup_timeout
        deadline = self.last_out_write + self._ping_s
        for started in (self.in_recycle_started, self.out_recycle_started):
            if started is not None:
                deadline = min(deadline, started + self.settings.recycle_timeout)
        return deadline

    def close(self, reason: str, now: float) -> list[Action]:
        """Tear the VC down from outside (server shutdown, admin)."""
        if self.phase is Phase.CLOSED:
            return []
        self._teardown(reason, None)
        return self._flush()

    def _teardown(self, reason: str, error: RpcProxyError | None) -> None:
        self.phase = Phase.CLOSED
        self.close_reason = reason
        for ch in self.channels():
            self._emit(CloseChannel(ch, error))
        self.out = self.in_ = self.out_successor = self.in_successor = self.old_out = None
        self.in_queued = None
        self.send_queue.clear()
        self.pending_rts.clear()
        if self.backend_requested:
            self._emit(CloseBackend())
        self._emit(VcClosed(reason, error))

    def open_channels(self) -> tuple[int, int]:
        """(IN, OUT) HTTP channels attached to this VC now, each counted once: while an OUT
        channel recycles it is both ``out`` and ``old_out``; a queued IN successor counts."""
        outs = {c.channel for c in (self.out, self.old_out, self.out_successor) if c is not None}
        ins = {c.channel for c in (self.in_, self.in_successor, self.in_queued) if c is not None}
        return len(ins), len(outs)
