"""The virtual connection: [MS-RPCH] v2 from the proxy's side, as a pure state machine.

Rule 1 (h11's): everything that decides whether an event is legal in a state, and every
state transition, lives in this package: this file for the VC (the states it moves
between are named in ``states.py``), ``channels.py`` for which first PDU may open which
channel. The adapter never decides protocol legality.

Theory of operation
-------------------
A translating proxy plays three roles of the four-party model at once: inbound
proxy, outbound proxy and the RTS half of the RPC server ([MS-RPCH] 1.3,
3.2.3-3.2.5). The backend is a plain ncacn_ip_tcp DCE/RPC server that never
sees an RTS PDU. A ``VirtualConnection`` owns everything about one virtual
connection (VC) and nothing about sockets or clocks:

* the adapter feeds it *events* (a method call each: a channel opened with its
  judged first RTS PDU, ``open_channel``; bytes read from a channel or from the
  backend; a channel or the backend closed; the clock ticked), passing the current
  time as a number where the VC uses it;
* each call returns the list of *actions* (``rpcproxy.rpch.actions``) for the
  adapter to carry out, in order. Handlers only ever ``_emit`` into one pending
  list; the typed funnel ``_run`` returns it, and turns an ``RpcProxyError`` (or an
  ``_End`` naming its ``CloseKind``) into the teardown.

The state is five enums (``Phase``, ``Backend``, ``BackendReading``, and inside
``OPENED`` the two channel-recycling sub-machines ``OutRecycle`` and ``InRecycle``, whose
theory is in ``states.py``); every transition is here. The table ``_IN_RTS`` says which
RTS PDU is legal on an IN channel in which phase, ``_OPENERS`` how each judged first PDU
joins the VC.

Flow control both ways (windows, acks): see ``channels.py``.

The data paths have fast paths for the common read (one read = one whole RPC
PDU, nothing held or due) that give exactly the general paths' result; the
tests compare the two on random event sequences (``VcSettings.fast_paths``).

Keep-alive (3.2.4.2, protocol notes 5): after CONN/C2 a Ping goes on OUT whenever
nothing was written for ``ping_interval``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import ClassVar, TypeVarTuple

from dcerpc.pdu import (
    CLIENT_PTYPES,
    HEADER_LEN,
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
from rpcproxy.rpch.actions import (
    Action,
    Channel,
    CloseBackend,
    CloseChannel,
    CloseKind,
    ConnectBackend,
    PauseBackend,
    ResumeBackend,
    SendToBackend,
    SendToClient,
    StartResponse,
    VcClosed,
)
from rpcproxy.rpch.channels import InChannel, Opening, OutChannel, VcSettings
from rpcproxy.rpch.states import (
    ANY_PHASE,
    BACKEND_ASKED,
    BACKEND_UP,
    OPENED_ONLY,
    Backend,
    BackendReading,
    InRecycle,
    OutRecycle,
    Phase,
)

_BINDS = frozenset({PType.BIND, PType.ALTER_CONTEXT})  # carry the client's max_xmit_frag
_Args = TypeVarTuple("_Args")


# The hot paths (both fast paths, next_deadline) compare with these: looking up an enum
# member on its class costs ~50 ns in Python 3.11, a module global ~10.
_OPENED = Phase.OPENED
_CLOSED = Phase.CLOSED
_OUT_NOT_RECYCLING = OutRecycle.NONE
_READING = BackendReading.RUNNING


@dataclass(slots=True)
class Traffic:
    """Counters for the end-of-VC log line and metrics."""

    client_to_backend: int = 0
    backend_to_client: int = 0


class _End(Exception):
    """Raised inside an event: end the VC with this kind, telling the client ``error``."""

    def __init__(self, kind: CloseKind, error: RpcProxyError) -> None:
        super().__init__(error.reason)
        self.kind = kind
        self.error = error


# the handlers the tables of VirtualConnection hold
_Opener = Callable[["VirtualConnection", Channel, rts.RtsPdu, float], None]
_RtsHandler = Callable[["VirtualConnection", InChannel, rts.RtsPdu, float], None]


class VirtualConnection:
    """One virtual connection; see the module docstring."""

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
        self._fast = settings.fast_paths
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
        self.backend = Backend.IDLE
        self.reading = BackendReading.RUNNING
        self.out: OutChannel | None = None
        self.in_: InChannel | None = None
        self.out_recycle = OutRecycle.NONE
        self.out_successor: OutChannel | None = None  # A7_AND_C1_WAIT, A7_WAIT
        self.old_out: OutChannel | None = None  # predecessor still writing, before B3
        self.out_recycle_started: float | None = None
        self.in_recycle = InRecycle.NONE
        self.in_successor: InChannel | None = None  # PLUGGED, QUEUED
        self.in_queued: InChannel | None = None  # QUEUED: the A1 that overtook the A5
        self.in_recycle_started: float | None = None
        self.send_queue: deque[bytes] = deque()  # RPC PDUs waiting for an OUT window
        self.pending_rts: list[bytes] = []  # RTS for the client while no OUT is writable
        self.last_out_write = now
        self._backend_framer = PduFramer()
        self._actions: list[Action] = []  # emitted by the running event, returned by _run
        self._opening: Channel | None = None  # the channel whose first PDU is being handled

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

    def open_channels(self) -> tuple[int, int]:
        """(IN, OUT) channels attached now, each once (``out`` is ``old_out`` before B3)."""
        ins = {c.channel for c in (self.in_, self.in_successor, self.in_queued) if c is not None}
        return len(ins), len(self.channels()) - len(ins)

    def _emit(self, action: Action) -> None:
        self._actions.append(action)

    def _flush(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _run(self, handler: Callable[[*_Args], None], *args: *_Args) -> list[Action]:
        """The one event funnel: run a handler, return what it emitted; an error it raises
        tears the VC down (``_End`` with its kind, any other as a protocol error)."""
        if self.phase is _CLOSED:
            return []
        try:
            handler(*args)
        except _End as end:
            self._teardown(end.error.reason, end.error, end.kind)
        except RpcProxyError as exc:
            self._teardown(exc.reason, exc, CloseKind.PROTOCOL_ERROR)
        except FramingError as exc:  # a framer's: the stream lost its DCE/RPC framing
            self._teardown(exc.reason, protocol_error(exc), CloseKind.PROTOCOL_ERROR)
        return self._flush()

    def ping_interval(self) -> float:
        return self._ping_s

    def _ping_interval_for(self, keepalive_ms: int) -> float:
        # Ping before any intermediary's idle timer (our own ConnectionTimeout, the
        # client's keep-alive) can fire: half of the smaller, capped.
        half = min(self.settings.connection_timeout_ms, keepalive_ms) / 2000.0
        return min(half, self.settings.max_ping_interval)

    # ---- channel opening ----------------------------------------------------------------

    def open_channel(self, channel: Channel, opening: Opening, *, identity: Hashable,
                     target: Hashable, now: float) -> list[Action]:
        """A channel whose first PDU ``channels.judge_opening`` accepted joins this VC, the
        way ``_OPENERS`` says for its kind. A channel of another user or target is refused
        alone; if the VC ends (or had ended), this channel closes too, although the VC never
        adopted it (else its request would hang; ``_teardown`` sees ``_opening``)."""
        if self.phase is Phase.CLOSED:
            self._emit(CloseChannel(channel, ProtocolError("virtual connection is closed")))
        elif not self._refuse_foreign(channel, identity, target):
            self._opening = channel
            try:
                return self._run(self._OPENERS[opening.kind], self, channel, opening.pdu, now)
            finally:
                self._opening = None
        return self._flush()

    def _refuse_foreign(self, channel: Channel, identity: Hashable, target: Hashable) -> bool:
        """A channel of another user or for another target may not join this VC.

        Only the intruding channel is refused: the cookie is a bearer token and the
        rightful owner's channels stay up.
        """
        if identity != self.identity:
            self._emit(CloseChannel(channel, ProtocolError(
                "channel belongs to another user than its virtual connection",
                rpc_error=ERROR_ACCESS_DENIED)))
            return True
        if target != self.target:
            self._emit(CloseChannel(channel, ProtocolError(
                "channel asks for another target than its virtual connection")))
            return True
        return False

    def _new_channel_cookie(self, channel: Channel, pdu: rts.RtsPdu, name: str,
                            taken: bool) -> bytes | None:
        """Checks CONN/A1 and CONN/B1 share; the new channel's cookie, or None if refused."""
        if taken or self.phase is not Phase.WAIT_PAIR:
            self._emit(CloseChannel(channel, ProtocolError(f"a second {name} for one connection")))
            return None
        vc_cookie, channel_cookie = rts.cookies(pdu)
        if vc_cookie != self.cookie:
            raise ProtocolError(f"{name} virtual connection cookie mismatch")
        return channel_cookie

    def _open_out(self, channel: Channel, a1: rts.RtsPdu, now: float) -> None:
        out_cookie = self._new_channel_cookie(channel, a1, "CONN/A1", self.out is not None)
        if out_cookie is None:
            return
        window = a1.get(rts.ReceiveWindowSize).value
        self.out = OutChannel(channel, out_cookie, window, self.settings.out_content_length)
        self._request_backend()
        self._maybe_open(now)

    def _open_in(self, channel: Channel, b1: rts.RtsPdu, now: float) -> None:
        in_cookie = self._new_channel_cookie(channel, b1, "CONN/B1", self.in_ is not None)
        if in_cookie is None:
            return
        self._set_keepalive(b1.get(rts.ClientKeepalive).value)
        self.in_ = InChannel(channel, in_cookie)
        self._request_backend()
        self._maybe_open(now)

    def _set_keepalive(self, value: int) -> None:
        # 0 means 300 000 ms (2.2.3.5.6); clamp silly small values like gromox does.
        self.keepalive_ms = 300_000 if value == 0 else max(value, 60_000)
        self._ping_s = self._ping_interval_for(self.keepalive_ms)

    def _request_backend(self) -> None:
        if self.backend is Backend.IDLE:
            self.backend = Backend.CONNECTING
            self._emit(ConnectBackend())
        elif self.backend is Backend.UP_UNASKED:
            self.backend = Backend.UP
            self._emit(ConnectBackend())

    def _maybe_open(self, now: float) -> None:
        if self.out is None or self.in_ is None:
            return
        if self.backend not in BACKEND_UP:
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
        if self.backend is Backend.IDLE:
            self.backend = Backend.UP_UNASKED
        elif self.backend is Backend.CONNECTING:
            self.backend = Backend.UP
        self._maybe_open(now)

    def backend_failed(self, error: RpcProxyError) -> list[Action]:
        """The backend could not be connected (after the adapter's retries)."""
        return self._end_with(CloseKind.BACKEND_UNREACHABLE, error)

    def backend_data(self, data: bytes, now: float) -> list[Action]:
        # Fast path, same result as the general one: an open VC, nothing queued or held,
        # and the read is exactly one server PDU that the client's window and the OUT
        # channel's Content-Length take now. It goes straight out on the OUT channel.
        out = self.out
        if (self._fast and self.phase is _OPENED and not self.send_queue
                and out is not None and out.started and self.out_recycle is _OUT_NOT_RECYCLING
                and self.reading is _READING and type(data) is bytes
                and not self._backend_framer.buffered
                and single_pdu_ptype(data) in SERVER_PTYPES):
            size = len(data)
            if out.bytes_left - size >= self.settings.out_reserve and out.admits(size):
                self.traffic.backend_to_client += size
                out.available -= size  # out.sent(size), inlined on the hot path
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
                raise _End(CloseKind.BACKEND_PROTOCOL_ERROR, ProtocolError(
                    f"backend sent a {name} PDU, which a server never sends"))
            self.traffic.backend_to_client += len(pdu.data)
            self.send_queue.append(pdu.data)
        self._drain(now)

    def backend_closed(self) -> list[Action]:
        return self._end_with(CloseKind.BACKEND_CLOSED, BackendUnavailable(
            "the backend closed the connection", rpc_error=RPC_S_SERVER_UNAVAILABLE))

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
            out.sent(size)
            self.last_out_write = now
            self._emit(SendToClient(out.channel, pdu))
        self._update_backend_pause()

    def _update_backend_pause(self) -> None:
        # Stop reading the backend while PDUs wait for the client's window, so TCP
        # back-pressure reaches the backend instead of our memory.
        want_pause = bool(self.send_queue)
        if want_pause and self.reading is BackendReading.RUNNING:
            self.reading = BackendReading.PAUSED
            self._emit(PauseBackend())
        elif not want_pause and self.reading is BackendReading.PAUSED:
            self.reading = BackendReading.RUNNING
            self._emit(ResumeBackend())

    def _flow_control_ack(self, ack: rts.FlowControlAck, now: float) -> None:
        for out in (self.out, self.out_successor):
            if out is not None and out.cookie == ack.channel_cookie:
                break
        else:
            return  # unknown cookie (e.g. a predecessor's): discard, 3.2.1.5.1.1
        out.acked(ack)
        self._drain(now)

    # ---- OUT channel recycling (OUT_R2) -------------------------------------------------

    def _begin_out_recycle(self, out: OutChannel, now: float) -> None:
        self.out_recycle = OutRecycle.A3_WAIT
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
            raise _End(CloseKind.PDU_TOO_LARGE, ProtocolError(
                f"a {size}-byte PDU from the backend cannot fit in any OUT channel: "
                f"out_content_length {s.out_content_length} less the {s.out_reserve}-byte "
                f"reserve and {waiting} bytes of RTS leaves {budget}"))
        self._begin_out_recycle(out, now)

    def _open_out_successor(self, channel: Channel, a3: rts.RtsPdu, now: float) -> None:
        if self.phase is not Phase.OPENED or self.out_recycle is not OutRecycle.A3_WAIT:
            raise ProtocolError("OUT_R2/A3 without a pending OUT channel recycle")
        vc_cookie, predecessor, successor = rts.cookies(a3)
        old = self.old_out
        assert old is not None
        if vc_cookie != self.cookie or predecessor != old.cookie:
            raise ProtocolError("OUT_R2/A3 cookies do not match the current OUT channel")
        window = a3.get(rts.ReceiveWindowSize).value
        self.out_successor = OutChannel(channel, successor, window,
                                        self.settings.out_content_length)
        self.out_recycle = OutRecycle.A7_AND_C1_WAIT
        self._write_rts(old, rts.OUT_R2_A6, now)

    def out_request_data(self, channel: Channel, data: bytes, now: float) -> list[Action]:
        """One whole PDU of an OUT request body after its first (only OUT_R2/C1 is legal)."""
        return self._run(self._out_request_data, channel, data, now)

    def _out_request_data(self, channel: Channel, data: bytes, now: float) -> None:
        state = self.out_recycle
        if state is OutRecycle.A7_AND_C1_WAIT:
            succ = self.out_successor
        elif state is OutRecycle.C1_WAIT:
            succ = self.out  # OUT_R2/A7 came first and already made the successor current
        else:
            succ = None
        if succ is None or succ.channel != channel:
            raise ProtocolError("unexpected bytes in an OUT channel request body")
        pdu = rts.decode_rts(data)
        if rts.identify(pdu) is not rts.Kind.OUT_R2_C1:
            raise ProtocolError("an OUT channel request body may only carry OUT_R2/C1 here")
        if state is OutRecycle.A7_AND_C1_WAIT:
            self.out_recycle = OutRecycle.A7_WAIT
        else:
            self._finish_out_recycle(now)

    def _out_r2_a7(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        state = self.out_recycle
        succ = self.out_successor
        old = self.old_out
        if state not in (OutRecycle.A7_AND_C1_WAIT, OutRecycle.A7_WAIT):
            raise ProtocolError("OUT_R2/A7 without a pending OUT channel recycle")
        assert succ is not None and old is not None
        if pdu.get(rts.Destination).destination is not rts.ForwardDestination.SERVER:
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
        if state is OutRecycle.A7_WAIT:
            self._finish_out_recycle(now)
        else:
            self.out_recycle = OutRecycle.C1_WAIT

    def _finish_out_recycle(self, now: float) -> None:
        out = self.out
        assert out is not None
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
        if (self._fast and cur is not None and self.phase is _OPENED
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
        if ch.received(size, self.in_ack_after):
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
        """An RTS PDU on an IN channel: legal only as ``_IN_RTS`` says, in one place."""
        kind = rts.identify(pdu)
        rule = self._IN_RTS.get(kind)
        if rule is not None and self.phase in rule[0]:
            rule[1](self, ch, pdu, now)
        elif self.phase is not Phase.OPENED:
            raise ProtocolError(f"{kind.value} before the connection was opened")
        else:
            raise ProtocolError(f"{kind.value} is not valid on an IN channel")

    def _ignore(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        pass

    def _keep_alive(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        self._set_keepalive(pdu.get(rts.ClientKeepalive).value)

    def _ack_with_destination(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        dest = pdu.get(rts.Destination).destination
        if dest is not rts.ForwardDestination.OUT_PROXY:
            raise ProtocolError(f"flow-control ack on IN for {dest.name}, not the OUT proxy")
        self._ack(ch, pdu, now)

    def _ack(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        ack = pdu.get(rts.FlowControlAck)
        if self.phase is Phase.OPENED:  # legal before, but nothing was sent to ack yet
            self._flow_control_ack(ack, now)

    # ---- IN channel recycling (IN_R2) ---------------------------------------------------

    def _open_in_successor(self, channel: Channel, a1: rts.RtsPdu, now: float) -> None:
        if self.phase is not Phase.OPENED:
            raise ProtocolError("IN_R2/A1 before the connection was opened")
        cur = self.in_
        assert cur is not None
        vc_cookie, predecessor, successor = rts.cookies(a1)
        if self.in_recycle is InRecycle.NONE:
            if vc_cookie != self.cookie or predecessor != cur.cookie:
                raise ProtocolError("IN_R2/A1 cookies do not match the current IN channel")
            self.in_successor = InChannel(channel, successor)
            self.in_recycle = InRecycle.PLUGGED
            self.in_recycle_started = now
            self._send_rts_to_client(rts.IN_R2_A4, now)
            return
        # The client got IN_R2/A4, sent A5 on the old channel (still in flight on its TCP
        # connection) and is recycling the successor already: queue this one; its IN_R2/A4
        # goes out when A5 completes the pending recycle.
        pending = self.in_successor
        assert pending is not None
        if (self.in_recycle is InRecycle.QUEUED or vc_cookie != self.cookie
                or predecessor != pending.cookie):
            raise ProtocolError("IN_R2/A1 while another IN channel recycle is pending")
        self.in_queued = InChannel(channel, successor)
        self.in_recycle = InRecycle.QUEUED

    def _in_r2_a5(self, ch: InChannel, pdu: rts.RtsPdu, now: float) -> None:
        succ = self.in_successor
        if self.in_recycle is InRecycle.NONE or succ is None or ch is not self.in_:
            raise ProtocolError("IN_R2/A5 without a pending IN channel recycle")
        (cookie,) = rts.cookies(pdu)
        if cookie != succ.cookie:
            raise ProtocolError("IN_R2/A5 names another successor IN channel")
        old = ch
        self.in_ = succ
        self.in_successor = None
        self.in_recycle = InRecycle.NONE  # in_queued, if any, waits for the replay below
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
            self.in_recycle = InRecycle.PLUGGED
            self.in_recycle_started = now
            self._send_rts_to_client(rts.IN_R2_A4, now)

    # ---- the tables: what is legal where (Rule 1) ---------------------------------------

    # The RTS PDUs a client may send on an IN channel: in which phases, and who handles
    # them. Anything else ends the VC. The handlers check the recycling sub-state.
    _IN_RTS: ClassVar[dict[rts.Kind, tuple[frozenset[Phase], _RtsHandler]]] = {
        rts.Kind.PING: (ANY_PHASE, _ignore),
        rts.Kind.KEEP_ALIVE: (ANY_PHASE, _keep_alive),
        rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION: (ANY_PHASE, _ack_with_destination),
        rts.Kind.FLOW_CONTROL_ACK: (ANY_PHASE, _ack),
        rts.Kind.OUT_R2_A7: (OPENED_ONLY, _out_r2_a7),
        rts.Kind.OUT_R1_A7: (OPENED_ONLY, _out_r2_a7),
        rts.Kind.IN_R2_A5: (OPENED_ONLY, _in_r2_a5),
    }
    # The first PDU of a channel (judged by channels.judge_opening) -> how it joins the VC.
    _OPENERS: ClassVar[dict[rts.Kind, _Opener]] = {
        rts.Kind.CONN_A1: _open_out,
        rts.Kind.CONN_B1: _open_in,
        rts.Kind.OUT_R2_A3: _open_out_successor,
        rts.Kind.IN_R2_A1: _open_in_successor,
    }

    # ---- closing and time ---------------------------------------------------------------

    def channel_closed(self, channel: Channel) -> list[Action]:
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
                self._teardown(f"client closed its {role}", None, CloseKind.CLIENT_CLOSED)
                return
        # A predecessor closing after a completed recycle is normal.

    def channel_failed(self, channel: Channel, error: RpcProxyError) -> list[Action]:
        """A channel's own transport saw bad input (e.g. a body past its Content-Length)."""
        return self._end_with(CloseKind.PROTOCOL_ERROR, error)

    def on_timer(self, now: float) -> list[Action]:
        return self._run(self._on_timer, now)

    def _on_timer(self, now: float) -> None:
        s = self.settings
        if self.phase in (Phase.WAIT_PAIR, Phase.WAIT_BACKEND):
            if now - self.created >= s.setup_timeout:
                if self.phase is Phase.WAIT_BACKEND:
                    kind, what = CloseKind.BACKEND_TIMEOUT, "the backend"
                else:
                    kind, what = CloseKind.PAIRING_TIMEOUT, "the other channel"
                raise _End(kind, ProtocolError(
                    f"timed out after {s.setup_timeout:g}s waiting for {what}"))
            return
        for started in (self.in_recycle_started, self.out_recycle_started):
            if started is not None and now - started >= s.recycle_timeout:
                raise _End(CloseKind.RECYCLE_TIMEOUT, ProtocolError(
                    f"channel recycling did not complete in {s.recycle_timeout:g}s"))
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
        if phase is not _OPENED:
            return None if phase is _CLOSED else self.created + self.settings.setup_timeout
        deadline = self.last_out_write + self._ping_s
        for started in (self.in_recycle_started, self.out_recycle_started):
            if started is not None:
                deadline = min(deadline, started + self.settings.recycle_timeout)
        return deadline

    def close(self, reason: str) -> list[Action]:
        """Tear the VC down from outside (server shutdown, admin)."""
        return self._end_with(CloseKind.SHUTDOWN, None, reason)

    def _end_with(self, kind: CloseKind, error: RpcProxyError | None,
                  reason: str = "") -> list[Action]:
        """An event that ends the VC by itself (unless it has ended already)."""
        if self.phase is not Phase.CLOSED:
            self._teardown(error.reason if error is not None else reason, error, kind)
        return self._flush()

    def _teardown(self, reason: str, error: RpcProxyError | None, kind: CloseKind) -> None:
        self.phase = Phase.CLOSED
        self.close_reason = reason
        channels = self.channels()
        opening = self._opening
        if opening is not None and opening not in channels:
            self._emit(CloseChannel(
                opening, error or ProtocolError("virtual connection is closed")))
        for ch in channels:
            self._emit(CloseChannel(ch, error))
        self.out = self.in_ = self.out_successor = self.in_successor = self.old_out = None
        self.in_queued = None
        self.out_recycle = OutRecycle.NONE
        self.in_recycle = InRecycle.NONE
        self.send_queue.clear()
        self.pending_rts.clear()
        if self.backend in BACKEND_ASKED:
            self._emit(CloseBackend())
        self._emit(VcClosed(reason, error, kind))
