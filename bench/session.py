"""Bench calls over any PDU transport (proxy or direct), with every byte checked.

``BenchSession(transport)`` binds the bench interface and runs ``exchange`` calls:

* ``await session.call(want, length)`` -> round-trip seconds of one call;
* ``await session.stream(...)`` keeps ``depth`` calls in flight (a sender and a receiver task)
  until a deadline or a call count, and returns bytes moved and per-call latencies.

Each response is checked fragment by fragment (call_id, FIRST/LAST flags, reassembled size) and
then by ``bench.protocol.check_response_stub`` (seq, echoed request CRC, payload CRC). Any
mismatch raises ``IntegrityError``; a FAULT raises ``RpcFault`` (``IntegrityError`` when it is
the backend reporting a CRC or sequence error).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from bench import dcerpc
from bench import protocol as bp
from bench.protocol import IntegrityError
from dcerpc.pdu import PFC_FIRST_FRAG, PFC_LAST_FRAG, PType, parse_header

BIND_CALL_ID = 1


class PduTransport(Protocol):
    async def send_pdu(self, data: bytes, timeout: float | None = None) -> None: ...

    async def recv_pdu(self, timeout: float | None = None) -> bytes: ...

    async def close(self) -> None: ...


class RpcFault(Exception):
    def __init__(self, call_id: int, status: int) -> None:
        super().__init__(f"call {call_id}: FAULT 0x{status:08x}")
        self.call_id = call_id
        self.status = status


@dataclass
class StreamResult:
    calls: int = 0
    bytes_up: int = 0  # payload bytes sent
    bytes_down: int = 0  # payload bytes received
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Call:
    call_id: int
    seq: int
    want: int
    length: int
    crc: int
    started: float


class BenchSession:
    def __init__(self, transport: PduTransport, *, timeout: float = 10.0,
                 max_frag: int = 0xFFF8) -> None:
        self.t = transport
        self.timeout = timeout
        self.max_frag = max_frag
        self.next_call_id = BIND_CALL_ID + 1
        self.seq = 0
        self.context_id = 0
        self.bound = False
        self._outstanding: deque[_Call] = deque()

    async def bind(self) -> dcerpc.BindAck:
        await self.t.send_pdu(dcerpc.build_bind(BIND_CALL_ID, bp.BENCH_SYNTAX,
                                                max_xmit=self.max_frag, max_recv=self.max_frag))
        data = await self.t.recv_pdu(self.timeout)
        ack = dcerpc.parse_bind_ack(data)
        if ack.call_id != BIND_CALL_ID:
            raise IntegrityError(f"BIND_ACK for call {ack.call_id}, expected {BIND_CALL_ID}")
        if not ack.accepted:
            raise IntegrityError(f"bench interface rejected: {ack.results}")
        self.max_frag = min(self.max_frag, ack.max_xmit)
        self.bound = True
        return ack

    # -- one call in two halves -----------------------------------------------------------

    async def send_call(self, want: int, length: int) -> _Call:
        self.seq += 1
        call_id = self.next_call_id
        self.next_call_id += 1
        stub = bp.build_request_stub(self.seq, want, length)
        call = _Call(call_id, self.seq, want, length, bp.payload_crc(self.seq, length),
                     time.perf_counter())
        self._outstanding.append(call)
        if len(stub) + dcerpc.REQUEST_HEADER_LEN <= self.max_frag:
            await self.t.send_pdu(dcerpc.build_request(call_id, bp.OPNUM_EXCHANGE, stub,
                                                       context_id=self.context_id))
        else:
            for frag in dcerpc.fragment_request(call_id, bp.OPNUM_EXCHANGE, stub, self.max_frag,
                                                context_id=self.context_id):
                await self.t.send_pdu(frag)
        return call

    async def recv_call(self) -> _Call:
        """Receive and check the response to the oldest outstanding call."""
        if not self._outstanding:
            raise IntegrityError("a response arrived with no call outstanding")
        call = self._outstanding[0]
        pieces: list[memoryview] = []
        first = True
        while True:
            data = await self.t.recv_pdu(self.timeout)
            if len(data) > 2 and data[2] == PType.FAULT:
                status = dcerpc.parse_fault(data)
                fault_call = parse_header(data).call_id
                if fault_call != call.call_id:
                    raise IntegrityError(
                        f"PDU for call_id {fault_call} while waiting for {call.call_id} "
                        "(lost or reordered)")
                self._outstanding.popleft()
                if status in (bp.FAULT_BAD_CRC, bp.FAULT_BAD_SEQ, bp.FAULT_BAD_STUB):
                    raise IntegrityError(
                        f"call {call.seq}: backend reports a damaged request (0x{status:08x})")
                raise RpcFault(call.call_id, status)
            resp = dcerpc.parse_response(data)  # the one header parse of a response
            h = resp.header
            if h.call_id != call.call_id:
                raise IntegrityError(
                    f"PDU for call_id {h.call_id} while waiting for {call.call_id} "
                    "(lost or reordered)")
            if bool(h.pfc_flags & PFC_FIRST_FRAG) != first:
                raise IntegrityError(f"call {call.seq}: fragment FIRST flag out of place")
            first = False
            pieces.append(resp.stub)
            if h.pfc_flags & PFC_LAST_FRAG:
                break
            if sum(len(p) for p in pieces) > call.want + bp.STUB_HEADER_LEN:
                raise IntegrityError(f"call {call.seq}: response longer than requested")
        self._outstanding.popleft()
        stub = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
        bp.check_response_stub(stub, call.seq, call.want, call.crc)
        return call

    async def call(self, want: int, length: int) -> float:
        """One call; returns its round-trip time in seconds."""
        call = await self.send_call(want, length)
        await self.recv_call()
        return time.perf_counter() - call.started

    async def stream(self, *, want: int, length: int, depth: int, deadline: float | None = None,
                     count: int | None = None, record_latency: bool = False,
                     rate: float | None = None) -> StreamResult:
        """Keep ``depth`` calls in flight until ``deadline`` (perf_counter) or ``count`` calls;
        with ``rate`` (payload bytes per second, both ways) calls are paced to that rate."""
        if deadline is None and count is None:
            raise ValueError("stream() needs a deadline or a count")
        result = StreamResult()
        slots = asyncio.Semaphore(depth)
        in_flight: asyncio.Queue[bool] = asyncio.Queue()  # True per call sent, False at the end
        sent = 0
        t0 = time.perf_counter()

        async def sender() -> None:
            nonlocal sent
            try:
                while True:
                    if count is not None and sent >= count:
                        break
                    now = time.perf_counter()
                    if deadline is not None and now >= deadline:
                        break
                    if rate:
                        ahead = sent * (want + length) / rate - (now - t0)
                        if ahead > 0:
                            await asyncio.sleep(min(ahead, 0.5))
                            continue
                    await slots.acquire()
                    await self.send_call(want, length)
                    sent += 1
                    in_flight.put_nowait(True)
            finally:
                in_flight.put_nowait(False)

        async def receiver() -> None:
            while await in_flight.get():
                call = await self.recv_call()
                slots.release()
                result.calls += 1
                result.bytes_up += call.length
                result.bytes_down += call.want
                if record_latency:
                    result.latencies.append(time.perf_counter() - call.started)

        send_task = asyncio.ensure_future(sender())
        recv_task = asyncio.ensure_future(receiver())
        try:
            done, _ = await asyncio.wait((send_task, recv_task),
                                         return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raise the first failure
            await asyncio.gather(send_task, recv_task)
        finally:
            for task in (send_task, recv_task):
                if not task.done():
                    task.cancel()
        result.seconds = time.perf_counter() - t0
        return result
