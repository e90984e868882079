"""Several worker processes, and how the two channels of one connection meet in one of them.

Theory of operation
-------------------
``rpcproxy serve --workers N`` binds the listening socket(s) once in a
supervisor process and forks N workers that all accept on them, so the
kernel spreads TCP connections over both cores. The IN and OUT channels of
one virtual connection are two TCP connections and usually land in different
workers, but a VC (its state machine and its one backend socket) must live in
exactly one process. The rule: the VC whose cookie is C is owned by worker
``owner(C)`` (a hash of the cookie, so every worker computes the same answer
without talking to the others).

A worker that accepted a channel does the HTTP part itself (authentication,
target check, ``100 Continue``, the first RTS PDU, which names the cookie).
If another worker owns that cookie, the channel is *handed off*: the TCP
socket's file descriptor travels to the owner over a Unix SOCK_SEQPACKET
socket (SCM_RIGHTS), with a small record of what was already learnt
(``Handoff``: method, first PDU, authenticated identity, target, bytes
aiohttp had buffered). The owner adopts the socket as a channel exactly as if
it had accepted it. Over TLS the socket cannot move (the TLS state lives in
the accepting process), so the acceptor keeps the TLS connection and relays
the plaintext over a socketpair whose other end is handed off instead.

Each worker has an inbox: a socketpair made by the supervisor before forking;
the worker reads one end, every process may write records to the other.
SOCK_SEQPACKET keeps each record (and its descriptor) whole and atomic.
"""

from __future__ import annotations

import array
import asyncio
import base64
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

log = logging.getLogger("rpcproxy.workers")

HANDOFF_MAX = 256 * 1024  # one record: metadata + buffered body bytes
INBOX_BUFFER = 4 * 1024 * 1024
RESPAWN_LIMIT = 5  # worker deaths tolerated per RESPAWN_WINDOW before giving up
RESPAWN_WINDOW = 60.0


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


class HandoffError(Exception):
    pass


class WorkerSet:
    """This worker's view of its siblings: who owns what, and the inboxes."""

    def __init__(self, index: int, count: int, inbox_send: list[socket.socket],
                 inbox_recv: socket.socket | None) -> None:
        self.index = index
        self.count = count
        self.inbox_send = inbox_send  # inbox_send[j]: write records for worker j here
        self.inbox_recv = inbox_recv  # this worker's own inbox
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


def make_inboxes(count: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(count):
        send_end, recv_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (send_end, recv_end):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, INBOX_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INBOX_BUFFER)
        pairs.append((send_end, recv_end))
    return pairs


def supervise(count: int, run_worker: Callable[[WorkerSet], int],
              notify: Callable[[str], None] | None = None) -> int:
    """Fork ``count`` workers running ``run_worker`` and keep them alive until signalled.

    Must be called before any event loop exists in this process. SIGTERM/SIGINT
    are passed to every worker (each closes its channels cleanly and exits);
    SIGHUP is passed on for reloading. A worker that dies is replaced (its
    virtual connections are lost; the others keep going), at most
    ``RESPAWN_LIMIT`` times a minute.
    """
    inboxes = make_inboxes(count)
    senders = [p[0] for p in inboxes]
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    deaths: list[float] = []

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            code = 1
            try:
                for j, (_, recv_end) in enumerate(inboxes):
                    if j != index:
                        recv_end.close()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = run_worker(WorkerSet(index, count, senders, inboxes[index][1]))
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent
                log.exception("worker %d crashed", index)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            if notify is not None:
                notify("STOPPING=1")
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        spawn(index)
    if notify is not None:
        notify(f"READY=1\nSTATUS=serving with {count} workers")
    log.info("supervisor: %d workers started", count)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, -1)
        if index < 0:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESPAWN_WINDOW] + [now]
        log.error("worker %d (pid %d) exited with %d", index, pid, code)
        if len(deaths) > RESPAWN_LIMIT:
            log.error("supervisor: workers keep dying; stopping")
            exit_code = 1
            forward(signal.SIGTERM, None)
            continue
        spawn(index)
    return exit_code
