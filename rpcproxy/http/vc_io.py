"""The I/O of one virtual connection: its channel and backend protocols and the driver.

Theory of operation: ``VcRuntime`` drives one ``rpcproxy.rpch.connection.VirtualConnection``.
Every event of its sockets and its timer (bytes in, a transport lost, a write buffer over
its high-water mark, a deadline) becomes one call into the VC, and the actions the VC
returns are carried out at once, synchronously and in order (``execute``): bytes queued
on a transport, a channel's ``200 Success`` head or ``503`` written, a backend connect
started, reading paused or resumed, the VC forgotten. Nothing here decides protocol
legality; the only awaits are the backend connect and its retries.

A runtime sees the process around it only through ``VcHost`` (the VC registry): the
counters it bumps, the backend connect settings, and who to tell that the VC ended.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol, assert_never

from ntlm.verifier import Identity
from rpcproxy.errors import (
    RPC_S_SERVER_UNAVAILABLE,
    BackendUnavailable,
    ProtocolError,
    RpcProxyError,
)
from rpcproxy.http.wire import raw_error_response, success_head
from rpcproxy.metrics import ServerMetrics
from rpcproxy.rpch.actions import (
    Action,
    CloseBackend,
    CloseChannel,
    ConnectBackend,
    PauseBackend,
    ResumeBackend,
    SendToBackend,
    SendToClient,
    StartResponse,
    VcClosed,
)
from rpcproxy.rpch.channels import Method, RequestBody
from rpcproxy.rpch.connection import VirtualConnection
from rpcproxy.targets import Endpoint

log = logging.getLogger("rpcproxy")


@dataclass(frozen=True)
class BackendConnect:
    """How a VC connects to its backend (reloadable: read at each connect)."""

    timeout: float
    retries: int


class VcHost(Protocol):
    """What a VC's I/O needs of the process around it, and nothing more."""

    metrics: ServerMetrics
    backend_connect: BackendConnect

    def on_closed(self, rt: VcRuntime) -> None:
        """The VC ended: forget it."""


class ChannelProtocol(asyncio.Protocol):
    """One IN or OUT channel after its HTTP request was accepted.

    aiohttp parses the request line, headers and the first RTS PDU and runs
    authentication; then the connection's transport is switched to this
    protocol (``transport.set_protocol``), the way an HTTP upgrade hands a
    connection over, and aiohttp is told the connection is gone, so its request
    objects and handler task are freed at once (an idle channel costs only this
    object and its transport). From here on bytes go straight between the transport and
    the VC: the IN body into ``VirtualConnection.in_data`` (at most
    Content-Length bytes), the OUT response (status line, then PDUs) written
    synchronously in the order the VC chose. TCP back-pressure is plain
    asyncio flow control: an OUT transport that cannot keep up pauses the
    backend's reading; a backend that cannot keep up pauses IN reading.
    """

    __slots__ = ("kind", "transport", "body", "label", "runtime", "started", "closed",
                 "_early")

    def __init__(self, kind: str, transport: asyncio.Transport | None, body_left: int,
                 label: str) -> None:
        self.kind = kind  # "IN" or "OUT"
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        # the rest of the request body: its budget and (OUT) framing are the core's
        self.body = RequestBody(Method.IN if kind == "IN" else Method.OUT, body_left)
        self.label = label
        self.runtime: VcRuntime | None = None
        self.started = False  # OUT: 200 Success written
        self.closed = False
        self._early = b""  # bytes that came before the channel was joined to its VC

    def __repr__(self) -> str:
        return f"<{self.kind} {self.label}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only for a socket handed over by a sibling worker (connect_accepted_socket);
        # a taken-over transport is given to __init__.
        self.transport = transport  # type: ignore[assignment]

    # ---- from the VC (actions) -----------------------------------------------------------

    def start(self, content_length: int) -> None:
        self.started = True
        self.transport.write(success_head(content_length))

    def write_many(self, chunks: list[bytes]) -> None:
        if not self.closed:
            self.transport.writelines(chunks)

    def close(self, error: RpcProxyError | None) -> None:
        if self.closed:
            return
        self.closed = True
        if error is not None and not self.started:
            self.transport.write(raw_error_response(error))
        self.transport.close()  # after what was written is flushed

    # ---- from the transport --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Body bytes, from aiohttp's buffer at hand-over or from the socket."""
        rt = self.runtime
        if rt is None:  # an adopted socket can speak before _attach ran: keep it, bounded;
            # one byte past the budget is kept so that the overrun is refused once it joins
            room = self.body.left + 1 - len(self._early)
            if room > 0:
                self._early += data[:room]
            return
        if self.closed or not data:
            return
        try:
            if self.kind == "IN":
                self.body.take(data)
                pdus = None
            else:
                pdus = self.body.out_pdus(data)
        except ProtocolError as exc:  # past Content-Length, or the OUT body lost its framing
            rt.execute(rt.vc.channel_failed(self, exc))
            return
        if pdus is None:
            rt.on_in_data(self, data)
        else:
            for pdu in pdus:
                rt.execute(rt.vc.out_request_data(self, pdu, rt.now()))

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        rt = self.runtime
        if rt is not None and not was_closed:
            rt.execute(rt.vc.channel_closed(self))
        if rt is not None:
            rt.channel_lost(self)
        self.runtime = None  # no cycle left for the garbage collector to find

    def pause_writing(self) -> None:
        if self.runtime is not None:
            self.runtime.throttle_backend(self, True)

    def resume_writing(self) -> None:
        if self.runtime is not None:
            self.runtime.throttle_backend(self, False)


class BackendProtocol(asyncio.Protocol):
    """The one backend TCP connection of a VC."""

    def __init__(self, runtime: VcRuntime) -> None:
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport: no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.runtime.on_backend_data(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.runtime is not None:
            self.runtime.on_backend_lost()
        self.runtime = None  # type: ignore[assignment]  # break the runtime <-> backend cycle

    def pause_writing(self) -> None:
        self.runtime.pause_in_reading(True)

    def resume_writing(self) -> None:
        self.runtime.pause_in_reading(False)

    def write_many(self, chunks: list[bytes]) -> None:
        if self.transport is not None and not self.closing:
            self.transport.writelines(chunks)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class VcRuntime:
    """A VirtualConnection plus the I/O objects its actions act on."""

    host: VcHost
    vc: VirtualConnection
    backend_endpoint: Endpoint
    client: str
    started_wall: float = field(default_factory=time.time)
    backend: BackendProtocol | None = None
    connect_task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    backend_read_paused: bool = False  # by the VC (flow control)
    throttled_by: set[ChannelProtocol] = field(default_factory=set)  # OUTs that can't keep up
    in_paused: bool = False  # IN reading paused because the backend can't keep up
    closed: bool = False
    opened_at: float | None = None  # loop time CONN/A3 went out (metrics)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    @functools.cached_property
    def label(self) -> str:
        """The VC cookie as a GUID: the correlation id in every log line."""
        return str(uuid.UUID(bytes_le=self.vc.cookie))

    def now(self) -> float:
        return self.loop.time()

    def execute(self, actions: list[Action]) -> None:
        # Consecutive writes to one destination go out as one writelines() call (one
        # writev syscall instead of one per PDU); any other action first flushes them,
        # so the order the VC chose is kept on every socket. This runs for every read of
        # every socket: exact type checks, no per-action allocation beyond the batch.
        batch: list[bytes] = []
        batch_to: ChannelProtocol | BackendProtocol | None = None
        for action in actions:
            kind = type(action)
            if kind is SendToBackend:
                dest: ChannelProtocol | BackendProtocol | None = self.backend
            elif kind is SendToClient:
                dest = action.channel  # type: ignore[union-attr,assignment]
            else:
                if batch_to is not None:
                    batch_to.write_many(batch)
                    batch, batch_to = [], None
                self._act(action)
                continue
            if dest is not batch_to:
                if batch_to is not None:
                    batch_to.write_many(batch)
                batch = []
                batch_to = dest
            batch.append(action.data)  # type: ignore[union-attr]
        if batch_to is not None:
            batch_to.write_many(batch)
        self._arm_timer()

    def _act(self, action: Action) -> None:
        """Every action but a batched write (``execute`` batches those)."""
        match action:
            case SendToClient():
                channel = action.channel
                assert isinstance(channel, ChannelProtocol)
                channel.write_many([action.data])
            case SendToBackend():
                if self.backend is not None:
                    self.backend.write_many([action.data])
            case StartResponse():
                channel = action.channel
                assert isinstance(channel, ChannelProtocol)
                channel.start(action.content_length)
                if self.opened_at is None:  # the first A3: the VC is open
                    self.opened_at = self.now()
                    self.host.metrics.vc_opened(self.opened_at - self.vc.created)
            case CloseChannel():
                ch = action.channel
                assert isinstance(ch, ChannelProtocol)
                ch.close(action.error)
            case ConnectBackend():
                self.connect_task = asyncio.create_task(self._connect_backend())
            case PauseBackend():
                self.backend_read_paused = True
                self._apply_backend_reading()
            case ResumeBackend():
                self.backend_read_paused = False
                self._apply_backend_reading()
            case CloseBackend():
                if self.connect_task is not None and not self.connect_task.done():
                    self.connect_task.cancel()
                if self.backend is not None:
                    self.backend.close()
            case VcClosed():
                self._closed(action)
            case _:
                assert_never(action)

    def _apply_backend_reading(self) -> None:
        backend = self.backend
        if backend is None or backend.transport is None or backend.closing:
            return
        if self.backend_read_paused or self.throttled_by:
            backend.transport.pause_reading()
        else:
            backend.transport.resume_reading()

    async def _connect_backend(self) -> None:
        cfg = self.host.backend_connect
        ep = self.backend_endpoint
        loop = asyncio.get_running_loop()
        last: str = ""
        for attempt in range(cfg.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.2 * attempt, 1.0))
            try:
                async with asyncio.timeout(cfg.timeout):  # (no extra task, as wait_for makes)
                    _, proto = await loop.create_connection(
                        lambda: BackendProtocol(self), ep.host, ep.port)
            except (OSError, TimeoutError) as exc:
                last = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                continue
            self.backend = proto
            self.execute(self.vc.backend_up(self.now()))
            return
        self.host.metrics.backend_connect_failures += 1
        log.warning("vc=%s backend %s unreachable: %s", self.label, ep, last)
        self.execute(
            self.vc.backend_failed(
                BackendUnavailable(f"backend {ep} unreachable: {last}",
                                   rpc_error=RPC_S_SERVER_UNAVAILABLE),
            )
        )

    def on_backend_data(self, data: bytes) -> None:
        self.execute(self.vc.backend_data(data, self.now()))

    def on_in_data(self, channel: ChannelProtocol, data: bytes) -> None:
        self.execute(self.vc.in_data(channel, data, self.now()))
        if self.in_paused and not channel.closed:
            channel.transport.pause_reading()

    def throttle_backend(self, channel: ChannelProtocol, paused: bool) -> None:
        """An OUT transport's write buffer crossed its high (low) water mark."""
        if paused:
            self.throttled_by.add(channel)
        else:
            self.throttled_by.discard(channel)
        self._apply_backend_reading()

    def pause_in_reading(self, paused: bool) -> None:
        """The backend's write buffer crossed its high (low) water mark."""
        self.in_paused = paused
        for ch in self.vc.channels():
            if isinstance(ch, ChannelProtocol) and ch.kind == "IN" and not ch.closed:
                if paused:
                    ch.transport.pause_reading()
                else:
                    ch.transport.resume_reading()

    def channel_lost(self, channel: ChannelProtocol) -> None:
        if channel in self.throttled_by:
            self.throttle_backend(channel, False)

    def on_backend_lost(self) -> None:
        self.execute(self.vc.backend_closed())

    def _arm_timer(self) -> None:
        deadline = self.vc.next_deadline()
        if deadline is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            return
        # Lazy re-arming: an early wake-up just re-arms; only move the timer earlier.
        if self.timer is not None and self.timer_at is not None and self.timer_at <= deadline:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        self.execute(self.vc.on_timer(self.now()))

    def _closed(self, action: VcClosed) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.host.on_closed(self)
        vc = self.vc
        ident = vc.identity
        user = ident.principal if isinstance(ident, Identity) else str(ident)
        duration = time.time() - self.started_wall
        fields = {
            "event": "vc_closed", "vc": self.label, "user": user, "target": str(vc.target),
            "backend": str(self.backend_endpoint), "client": self.client,
            "duration_s": round(duration, 3), "bytes_up": vc.traffic.client_to_backend,
            "bytes_down": vc.traffic.backend_to_client, "how": action.reason,
            "error": action.error is not None,
        }
        log.info(
            "vc=%s closed user=%s target=%s client=%s duration=%.1fs up=%d down=%d how=%s",
            self.label, user, vc.target, self.client, duration,
            vc.traffic.client_to_backend, vc.traffic.backend_to_client, action.reason,
            extra={"fields": fields},
        )
        self.host.metrics.vc_closed(action.kind, vc.traffic.client_to_backend,
                                    vc.traffic.backend_to_client)

