"""A DCE/RPC backend stub speaking real ncacn_ip_tcp, for the bench and for tests.

``BenchBackend`` listens on 127.0.0.1 and serves the ``bench.protocol`` interface:

* BIND / ALTER_CONTEXT -> BIND_ACK / ALTER_CONTEXT_RESP: a context is accepted when its
  abstract syntax is the bench interface and one transfer syntax is NDR; other contexts get
  a provider rejection (as a real server does).
* REQUEST (possibly in several fragments, reassembled by call_id) -> RESPONSE carrying
  ``want`` payload bytes, cut into fragments of the negotiated size; FAULT for an unknown
  context or opnum, a bad stub, a CRC mismatch or a sequence gap (bench.protocol).
* Anything that is not a client PDU closes the connection.

``echo=True`` (the HTTP-level tests' backend, tests/fakes.py) answers nothing of that: each
REQUEST comes back as a RESPONSE, each BIND / ALTER_CONTEXT as a BIND_ACK / ALTER_CONTEXT_RESP,
byte for byte but for the PDU type; other PDUs are ignored; every byte received is kept in
``received``.

Back-pressure: when a connection's transport buffers more than its high-water mark, reading
from it pauses until the buffer drains, so a slow reader cannot make the stub buffer without
bound.

Fault injection for tests of the harness itself: ``corrupt_response=N`` flips one payload byte
in the N-th response (counted over all connections), ``stall_after=N`` stops answering after
N responses.

Run on its own: ``python -m bench.backend [--listen 127.0.0.1:0]`` prints
``LISTENING <host> <port>`` on stdout and serves until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import cast

from bench import dcerpc, protocol
from dcerpc.pdu import PFC_FIRST_FRAG, PFC_LAST_FRAG, FramingError, PduFramer, PType

SERVER_MAX_FRAG = 0xFFF8  # largest fragment we send or accept (8-aligned, < 65535)
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
MAX_CALL_STUB = 32 << 20  # bound on one reassembled request
# echo mode: the answer's PDU type for each PDU type answered
_ECHO: dict[int, int] = {PType.REQUEST: PType.RESPONSE, PType.BIND: PType.BIND_ACK,
                         PType.ALTER_CONTEXT: PType.ALTER_CONTEXT_RESP}


class _Conn(asyncio.Protocol):
    def __init__(self, server: BenchBackend) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.framer = PduFramer()
        self.contexts: set[int] = set()
        self.max_xmit = 0
        self.next_seq = 1
        self.partial: dict[int, list[bytes | memoryview]] = {}
        self.partial_len: dict[int, int] = {}
        self.assoc_group = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.server.live.add(self)
        self.server.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.live.discard(self)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            if self.server.echo:
                self.server.received += data
            pdus = self.framer.feed(data)
            if self.server.echo:
                for pdu in pdus:
                    self._echo(pdu.data)
                return
            for pdu in pdus:
                self._pdu(pdu.data)
        except FramingError as exc:
            self.server.errors.append(str(exc))
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _echo(self, data: bytes) -> None:
        reply = _ECHO.get(data[2])
        if reply is not None:
            self._write(bytes([*data[:2], reply]) + data[3:])

    def _pdu(self, data: bytes) -> None:
        ptype = data[2]
        if ptype in (PType.BIND, PType.ALTER_CONTEXT):
            self._bind(data, ptype)
        elif ptype == PType.REQUEST:
            self._request(data)
        elif ptype in (16, 18, 19):  # AUTH3, CO_CANCEL, ORPHANED: nothing to answer
            return
        else:
            raise FramingError(f"PDU type {ptype} is not a client PDU")

    def _bind(self, data: bytes, ptype: int) -> None:
        bind = dcerpc.parse_bind(data)
        if ptype == PType.BIND:
            self.max_xmit = min(bind.max_recv, SERVER_MAX_FRAG)
            self.server.assoc_groups += 1
            self.assoc_group = bind.assoc_group or (0x12340000 + self.server.assoc_groups)
        results: list[tuple[int, int, bytes]] = []
        for ctx_id, abstract, transfers in bind.contexts:
            if abstract != protocol.BENCH_SYNTAX:
                results.append((dcerpc.RESULT_PROVIDER_REJECTION,
                                dcerpc.REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED, b""))
            elif dcerpc.NDR_SYNTAX not in transfers:
                results.append((dcerpc.RESULT_PROVIDER_REJECTION,
                                dcerpc.REASON_TRANSFER_SYNTAXES_NOT_SUPPORTED, b""))
            else:
                self.contexts.add(ctx_id)
                results.append((dcerpc.RESULT_ACCEPTANCE, 0, dcerpc.NDR_SYNTAX))
        reply = PType.BIND_ACK if ptype == PType.BIND else PType.ALTER_CONTEXT_RESP
        self._write(dcerpc.build_bind_ack(
            bind.call_id, self.max_xmit, min(bind.max_xmit, SERVER_MAX_FRAG), self.assoc_group,
            results, secondary_address=b"1024" if ptype == PType.BIND else b"", ptype=reply))

    def _request(self, data: bytes) -> None:
        req = dcerpc.parse_request(data)
        call_id = req.header.call_id
        flags = req.header.pfc_flags
        if not self.max_xmit:
            raise FramingError("REQUEST before BIND")
        if flags & PFC_FIRST_FRAG:
            if call_id in self.partial:
                raise FramingError(f"call {call_id} started twice")
            self.partial[call_id] = []
            self.partial_len[call_id] = 0
        elif call_id not in self.partial:
            raise FramingError(f"middle fragment of unknown call {call_id}")
        self.partial[call_id].append(req.stub)
        self.partial_len[call_id] += len(req.stub)
        if self.partial_len[call_id] > MAX_CALL_STUB:
            raise FramingError(f"call {call_id} exceeds {MAX_CALL_STUB} bytes")
        if not flags & PFC_LAST_FRAG:
            return
        pieces = self.partial.pop(call_id)
        del self.partial_len[call_id]
        stub: bytes | memoryview = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if req.context_id not in self.contexts:
            self._write(dcerpc.build_fault(call_id, dcerpc.NCA_S_UNK_IF,
                                           context_id=req.context_id))
            return
        if req.opnum != protocol.OPNUM_EXCHANGE:
            self._write(dcerpc.build_fault(call_id, dcerpc.NCA_S_OP_RNG_ERROR,
                                           context_id=req.context_id))
            return
        parsed, status = protocol.check_request_stub(stub)
        if parsed is None:
            self.server.faults += 1
            self._write(dcerpc.build_fault(call_id, status, context_id=req.context_id))
            return
        if parsed.seq != self.next_seq:
            self.server.faults += 1
            self.server.errors.append(f"seq {parsed.seq}, expected {self.next_seq}")
            self._write(dcerpc.build_fault(call_id, protocol.FAULT_BAD_SEQ,
                                           context_id=req.context_id))
            self.next_seq = parsed.seq + 1
            return
        self.next_seq += 1
        server = self.server
        server.calls += 1
        server.bytes_in += parsed.payload_len
        server.bytes_out += parsed.want
        if server.stall_after is not None and server.calls > server.stall_after:
            return
        self._respond(call_id, req.context_id, parsed)

    def _respond(self, call_id: int, ctx: int, req: protocol.RequestStub) -> None:
        head, body = protocol.build_response_stub(req.seq, req.crc, req.want)
        server = self.server
        if server.corrupt_response is not None and server.calls == server.corrupt_response:
            if len(body):
                raw = bytearray(body)
                raw[len(raw) // 2] ^= 0x01
                body = memoryview(bytes(raw))
        room = (self.max_xmit - dcerpc.RESPONSE_HEADER_LEN) & ~7
        total = len(head) + len(body)
        if total <= room:
            self._write(dcerpc.build_response(call_id, head + body, context_id=ctx))
            return
        stub = memoryview(head + body)  # one copy; fragments are slices of it
        out: list[bytes] = []
        pos = 0
        while pos < total:
            piece = stub[pos : pos + room]
            flags = (PFC_FIRST_FRAG if pos == 0 else 0) | (
                PFC_LAST_FRAG if pos + len(piece) >= total else 0)
            out.append(dcerpc.build_response(call_id, piece, context_id=ctx, flags=flags,
                                             alloc_hint=total - pos))
            pos += len(piece)
        assert self.transport is not None
        self.transport.writelines(out)


class BenchBackend:
    """The stub server; ``await start()`` returns the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 corrupt_response: int | None = None, stall_after: int | None = None,
                 echo: bool = False) -> None:
        self.host = host
        self.port = port
        self.corrupt_response = corrupt_response
        self.stall_after = stall_after
        self.echo = echo
        self.received = bytearray()  # echo mode: every byte received
        self.server: asyncio.AbstractServer | None = None
        self.live: set[_Conn] = set()
        self.accepted = 0
        self.calls = 0
        self.faults = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.assoc_groups = 0
        self.errors: list[str] = []

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), self.host, self.port,
                                               backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def kill_connections(self) -> None:
        """Reset every open connection (the backend "goes away" under the proxy)."""
        for conn in list(self.live):
            if conn.transport is not None:
                conn.transport.abort()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.kill_connections()
        if self.server is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self.server.wait_closed()
            except TimeoutError:
                pass
            self.server = None


async def _serve(host: str, port: int, corrupt_response: int | None,
                 stall_after: int | None) -> None:
    backend = BenchBackend(host, port, corrupt_response=corrupt_response,
                           stall_after=stall_after)
    bound = await backend.start()
    print(f"LISTENING {host} {bound}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Also stop when the parent goes away (our stdin is its pipe).
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    eof = loop.create_task(reader.read())
    stopper = loop.create_task(stop.wait())
    await asyncio.wait((eof, stopper), return_when=asyncio.FIRST_COMPLETED)
    eof.cancel()
    stopper.cancel()
    await backend.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend",
                                description="DCE/RPC (ncacn_ip_tcp) backend stub for the bench")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--corrupt-response", type=int, metavar="N",
                   help="flip one payload byte of the N-th response (harness self-test)")
    p.add_argument("--stall-after", type=int, metavar="N",
                   help="stop answering after N responses (harness self-test)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    from bench.limits import raise_nofile

    raise_nofile(1 << 20)
    try:
        import uvloop

        uvloop.run(_serve(host, int(port), args.corrupt_response, args.stall_after))
    except ImportError:
        asyncio.run(_serve(host, int(port), args.corrupt_response, args.stall_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
