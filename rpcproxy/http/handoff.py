"""The cross-worker hand-off: how the two channels of one VC meet in one worker process.

Theory of operation
-------------------
With ``--workers N`` the IN and OUT channels of one virtual connection are two TCP
connections and usually land in different workers, but a VC (its state machine and its
one backend socket) must live in exactly one process. The rule: the VC whose cookie is C
is owned by worker ``owner_of(C)`` (a hash of the cookie, so every worker computes the
same answer without talking to the others).

A worker that accepted a channel does the HTTP part itself (authentication, target
check, ``100 Continue``, the first RTS PDU, which names the cookie). If another worker
owns that cookie, the channel is *handed off* (``hand_off``): the TCP socket's file
descriptor travels to the owner over a Unix SOCK_SEQPACKET socket (SCM_RIGHTS), with a
small record of what was already learnt (``Handoff``: method, first PDU, authenticated
identity, target, bytes aiohttp had buffered). The owner adopts the socket as a channel
(``adopt``) exactly as if it had accepted it. Over TLS the socket cannot move (the TLS
state lives in the accepting process), so the acceptor keeps the TLS connection and
relays the plaintext (``_Relay``) over a socketpair whose other end is handed off instead.

Each worker has an inbox (``WorkerSet``): a socketpair made by the supervisor
(``rpcproxy.workers``) before forking; the worker reads one end, every process may write
records to the other. SOCK_SEQPACKET keeps each record (and its descriptor) whole and
atomic.
"""

from __future__ import annotations

import array
import asyncio
import base64
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ntlm.verifier import Identity
from rpcproxy.errors import RPC_S_SERVER_TOO_BUSY, ProtocolError, RpcProxyError
from rpcproxy.http.aiohttp_glue import detach_aiohttp, drain_body, peer_of
from rpcproxy.http.front import ChannelRequest
from rpcproxy.http.vc_io import ChannelProtocol
from rpcproxy.http.wire import RPC_IN_DATA, raw_error_response
from rpcproxy.rpch import channels
from rpcproxy.targets import Endpoint, Target

log = logging.getLogger("rpcproxy.workers")

HANDOFF_MAX = 256 * 1024  # one record: metadata + buffered body bytes


def owner_of(cookie: bytes, count: int) -> int:
    """The worker that owns the VC with this cookie (same answer in every process)."""
    if count <= 1:
        return 0
    digest = hashlib.blake2s(cookie, digest_size=4).digest()
    return int.from_bytes(digest, "little") % count


@dataclass
class Handoff:
    """What a worker learnt about a channel before handing its socket to the owner."""

    method: str  # RPC_IN_DATA / RPC_OUT_DATA
    pdu: bytes  # the first RTS PDU of the body
    body_left: int  # request body bytes after pdu and leftover
    leftover: bytes  # body bytes already read past the first PDU
    user: str
    domain: str
    server: str  # target as asked, normalised
    port: int
    backend_host: str
    backend_port: int
    peer: str

    def encode(self) -> bytes:
        data = asdict(self)
        data["pdu"] = base64.b64encode(self.pdu).decode()
        data["leftover"] = base64.b64encode(self.leftover).decode()
        return json.dumps(data).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Handoff:
        data = json.loads(raw)
        data["pdu"] = base64.b64decode(data["pdu"])
        data["leftover"] = base64.b64decode(data["leftover"])
        return cls(**data)

    def identity(self) -> Identity:
        return Identity(user=self.user, domain=self.domain)

    def target(self) -> Target:
        return Target(self.server, self.port)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.backend_host, self.backend_port)


class HandoffError(Exception):
    pass


class WorkerSet:
    """This worker's view of its siblings: who owns what, and the inboxes."""

    def __init__(self, index: int, count: int, inbox_send: list[socket.socket],
                 inbox_recv: socket.socket | None, heartbeat: socket.socket | None = None,
                 heartbeat_interval: float = 1.0) -> None:
        self.index = index
        self.count = count
        self.inbox_send = inbox_send  # inbox_send[j]: write records for worker j here
        self.inbox_recv = inbox_recv  # this worker's own inbox
        self.heartbeat = heartbeat  # one byte per heartbeat_interval to the supervisor
        self.heartbeat_interval = heartbeat_interval
        self.sent = 0
        self.received = 0

    def owner(self, cookie: bytes) -> int:
        return owner_of(cookie, self.count)

    def is_mine(self, cookie: bytes) -> bool:
        return self.owner(cookie) == self.index

    def send(self, worker: int, fd: int, handoff: Handoff) -> None:
        """Pass ``fd`` (not closed here) with its record to ``worker``'s inbox."""
        payload = handoff.encode()
        if len(payload) > HANDOFF_MAX:
            raise HandoffError("hand-off record too large")
        fds = array.array("i", [fd])
        try:
            self.inbox_send[worker].sendmsg(
                [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], socket.MSG_DONTWAIT
            )
        except OSError as exc:
            raise HandoffError(f"worker {worker} inbox: {exc.strerror or exc}") from None
        self.sent += 1

    def start_receiving(self, loop: asyncio.AbstractEventLoop,
                        on_handoff: Callable[[socket.socket, Handoff], None]) -> None:
        inbox = self.inbox_recv
        if inbox is None:
            return
        inbox.setblocking(False)

        def readable() -> None:
            while True:
                try:
                    msg, ancdata, _flags, _addr = inbox.recvmsg(
                        HANDOFF_MAX, socket.CMSG_SPACE(array.array("i", [0]).itemsize)
                    )
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.error("worker %d inbox failed: %s", self.index, exc)
                    loop.remove_reader(inbox.fileno())
                    return
                fds = array.array("i")
                for level, kind, data in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                if not fds:
                    continue
                sock = socket.socket(fileno=fds[0])
                for extra in fds[1:]:
                    os.close(extra)
                try:
                    handoff = Handoff.decode(msg)
                except (ValueError, TypeError, KeyError):
                    log.error("worker %d: unreadable hand-off record", self.index)
                    sock.close()
                    continue
                self.received += 1
                on_handoff(sock, handoff)

        loop.add_reader(inbox.fileno(), readable)

    def stop_receiving(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.inbox_recv is not None:
            try:
                loop.remove_reader(self.inbox_recv.fileno())
            except (ValueError, OSError):
                pass


# ---- the sending worker ---------------------------------------------------------------------


async def hand_off(workers: WorkerSet, request: ChannelRequest, opening: channels.Opening,
                   identity: Identity, target: Target, endpoint: Endpoint) -> str | None:
    """Give a channel whose VC belongs to another worker to that worker; the reason if that
    failed (the client then has its 503 and the connection is closed)."""
    transport = request.transport
    if transport is None:  # the client left while its request was being judged
        raise ConnectionResetError("the client closed the connection before its hand-off")
    transport.pause_reading()
    leftover = drain_body(request)
    owner = workers.owner(opening.vc_cookie)
    record = Handoff(
        method=request.method, pdu=opening.pdu.encode(),
        body_left=opening.body_left - len(leftover),
        leftover=leftover, user=identity.user, domain=identity.domain,
        server=target.server, port=target.port, backend_host=endpoint.host,
        backend_port=endpoint.port, peer=peer_of(request),
    )
    loop = asyncio.get_running_loop()
    if transport.get_extra_info("sslcontext") is None:
        # Plain TCP: the socket itself moves; our copy closes without a shutdown.
        sock = transport.get_extra_info("socket")
        try:
            workers.send(owner, sock.fileno(), record)
        except HandoffError as exc:
            return _refuse_hand_off(request, transport, str(exc))
        detach_aiohttp(request, _Discard())
        transport.abort()
        return None
    # TLS: keep the TLS connection here and relay its plaintext over a socketpair.
    if transport.is_closing():  # the client left while its request was being judged
        raise ConnectionResetError("the client closed the connection before its hand-off")
    try:
        ours, theirs = socket.socketpair()
    except OSError as exc:  # e.g. out of descriptors (EMFILE)
        return _refuse_hand_off(request, transport, f"no socketpair: {exc.strerror or exc}")
    try:
        workers.send(owner, theirs.fileno(), record)
    except HandoffError as exc:
        ours.close()
        return _refuse_hand_off(request, transport, str(exc))
    finally:
        theirs.close()
    # Both ends know each other before the socketpair is read: the owner may answer
    # (an OUT channel's 200 and CONN/A3) before connect_accepted_socket returns here.
    client_side, pair_side = _Relay(), _Relay()
    client_side.transport = transport
    client_side.peer, pair_side.peer = pair_side, client_side
    detach_aiohttp(request, client_side)  # before the await: a client leaving reaches the relay
    try:
        await loop.connect_accepted_socket(lambda: pair_side, ours)
    except OSError as exc:
        ours.close()
        transport.close()
        return f"relay socket: {exc.strerror or exc}"
    if client_side.lost and pair_side.transport is not None:  # it left during the await
        pair_side.transport.close()
        return None
    transport.resume_reading()
    return None


def _refuse_hand_off(request: ChannelRequest, transport: asyncio.Transport, why: str) -> str:
    """The channel cannot reach its owner: the client gets a 503 (server too busy, so it
    retries) and the connection is closed. Returns the reason, for the caller's log."""
    detach_aiohttp(request, _Discard())
    transport.write(raw_error_response(
        RpcProxyError(f"hand-off failed: {why}", rpc_error=RPC_S_SERVER_TOO_BUSY)))
    transport.close()
    return why


class _Discard(asyncio.Protocol):
    """Placeholder protocol for a transport that is about to be dropped."""


class _Relay(asyncio.Protocol):
    """One side of a byte pump between two transports (TLS hand-off to a sibling)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Relay | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


# ---- the owning worker ----------------------------------------------------------------------


async def adopt(sock: socket.socket,
                record: Handoff) -> tuple[ChannelProtocol, channels.Opening] | None:
    """A sibling handed us ``sock``: it becomes a channel (not yet joined to its VC) and
    the record's opening, judged again by the core (the record came over a socket); None
    (socket closed, logged) if either is unusable."""
    loop = asyncio.get_running_loop()
    kind_name = "IN" if record.method == RPC_IN_DATA else "OUT"
    try:
        _transport, channel = await loop.connect_accepted_socket(
            lambda: ChannelProtocol(kind_name, None, record.body_left, "?"), sock)
        opening = channels.judge_opening(
            channels.Method(record.method),
            len(record.pdu) + len(record.leftover) + record.body_left, record.pdu)
    except (OSError, ProtocolError, ValueError) as exc:
        log.warning("could not adopt a handed-off channel: %s", exc)
        sock.close()
        return None
    return channel, opening
