"""The supervisor of several worker processes: fork, respawn, signals, liveness.

Theory of operation
-------------------
``rpcproxy serve --workers N`` binds the listening socket(s) once in a
supervisor process and forks N workers that all accept on them, so the
kernel spreads TCP connections over both cores. The two channels of one
virtual connection usually land in different workers; how they meet in the
one that owns the VC is ``rpcproxy.http.handoff``. The supervisor makes each
worker's inbox (``make_inboxes``: a SOCK_SEQPACKET socketpair) before forking.

Liveness: each worker's event loop sends one byte every ``heartbeat_interval`` on its
own heartbeat socket to the supervisor. ``WorkerWatch`` (sans-IO, times passed in)
decides from those beats: the supervisor sends systemd's ``WATCHDOG=1`` only while
every worker has beaten within ``stall_timeout``, and kills (SIGKILL) a worker that
has not, then respawns it like any dead worker. A worker that cannot be killed keeps
the pings off, so systemd's own watchdog restarts the service; a wedged supervisor
stops pinging by itself.

Reload: SIGHUP runs ``on_reload`` in the supervisor first (rpcproxy.app records there the
configuration the file now gives, when it loads), then goes to every worker, which
reloads itself. A worker forked later inherits what ``on_reload`` recorded: a respawned
worker starts from the configuration its siblings reloaded, not the start-up one. SIGHUP
is blocked while a worker is forked and registered, so every worker either was forked
after ``on_reload`` ran or gets the signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from rpcproxy.http.handoff import WorkerSet

log = logging.getLogger("rpcproxy.workers")

INBOX_BUFFER = 4 * 1024 * 1024
RESPAWN_LIMIT = 5  # worker deaths tolerated per RESPAWN_WINDOW before giving up
RESPAWN_WINDOW = 60.0
STALL_TIMEOUT = 10.0  # seconds without a heartbeat before a worker counts as wedged
MIN_STALL_TIMEOUT = 2.0
EXIT_CONFIG = 78  # sysexits EX_CONFIG: a configuration error; restarting will not help


def send_heartbeat(sock: socket.socket) -> None:
    """One beat; a full buffer (supervisor busy) just drops it."""
    try:
        sock.send(b".", socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        pass  # the supervisor is gone: SIGTERM follows or the worker is orphaned anyway


async def beat_forever(sock: socket.socket, interval: float) -> None:
    """A worker's heartbeat task: one beat every ``interval`` seconds while its loop runs."""
    while True:
        send_heartbeat(sock)
        await asyncio.sleep(interval)


class WorkerWatch:
    """Which workers' event loops are alive, from their heartbeats (sans-IO).

    ``started``/``beat``/``gone`` record events at time ``now``; ``stalled`` lists the
    workers silent for more than ``stall_timeout``; ``all_alive`` is what gates the
    supervisor's WATCHDOG=1: every one of ``count`` workers present and beating.
    """

    def __init__(self, count: int, stall_timeout: float) -> None:
        self.count = count
        self.stall_timeout = stall_timeout
        self.last: dict[int, float] = {}

    def started(self, index: int, now: float) -> None:
        self.last[index] = now  # a new worker gets one timeout to start beating

    def beat(self, index: int, now: float) -> None:
        if index in self.last:
            self.last[index] = max(self.last[index], now)

    def gone(self, index: int) -> None:
        self.last.pop(index, None)

    def silent_for(self, index: int, now: float) -> float:
        return now - self.last[index]

    def stalled(self, now: float) -> list[int]:
        return sorted(i for i, t in self.last.items() if now - t > self.stall_timeout)

    def all_alive(self, now: float) -> bool:
        return len(self.last) == self.count and not self.stalled(now)


def stall_timeout_for(watchdog_interval: float | None) -> float:
    """A third of systemd's watchdog timeout (2 x the ping interval), at least 2 s."""
    if not watchdog_interval:
        return STALL_TIMEOUT
    return max(MIN_STALL_TIMEOUT, min(STALL_TIMEOUT, watchdog_interval * 2 / 3))


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
              notify: Callable[[str], None] | None = None,
              watchdog_interval: float | None = None,
              on_reload: Callable[[], None] | None = None) -> int:
    """Fork ``count`` workers running ``run_worker`` and keep them alive until signalled.

    Must be called before any event loop exists in this process. SIGTERM/SIGINT
    are passed to every worker (each closes its channels cleanly and exits);
    SIGHUP is passed on for reloading, after ``on_reload`` ran here (a worker forked
    afterwards sees what it recorded). A worker that dies is replaced (its
    virtual connections are lost; the others keep going), at most
    ``RESPAWN_LIMIT`` times a minute; one that stops beating for the stall
    timeout is killed first. ``WATCHDOG=1`` goes to ``notify`` every
    ``watchdog_interval`` seconds, but only while every worker beats. A worker
    exiting with ``EXIT_CONFIG`` stops them all: the supervisor exits with it.
    """
    inboxes = make_inboxes(count)
    senders = [p[0] for p in inboxes]
    children: dict[int, int] = {}  # pid -> worker index
    pids: dict[int, int] = {}  # worker index -> pid
    beats: dict[int, socket.socket] = {}  # worker index -> supervisor end of its heartbeat
    killed: set[int] = set()
    stopping = False
    deaths: list[float] = []
    stall = stall_timeout_for(watchdog_interval)
    watch = WorkerWatch(count, stall)

    def spawn(index: int) -> None:
        old = beats.pop(index, None)
        if old is not None:
            old.close()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A SIGHUP between the fork and ``children`` naming the worker would miss it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # worker
            code = 1
            try:
                mine.close()
                for other in beats.values():
                    other.close()
                for j, (_, recv_end) in enumerate(inboxes):
                    if j != index:
                        recv_end.close()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                code = run_worker(WorkerSet(index, count, senders, inboxes[index][1],
                                            heartbeat=theirs, heartbeat_interval=stall / 4))
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent
                log.exception("worker %d crashed", index)
            finally:
                os._exit(code)
        theirs.close()
        mine.setblocking(False)
        beats[index] = mine
        children[pid] = index
        pids[index] = pid
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        watch.started(index, time.monotonic())

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            if notify is not None:
                notify("STOPPING=1")
        if signum == signal.SIGHUP and on_reload is not None:
            on_reload()
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
    next_ping = time.monotonic()
    while children:
        by_fd = {s.fileno(): i for i, s in beats.items()}
        try:
            readable, _, _ = select.select(list(by_fd), [], [], min(0.5, stall / 4))
        except InterruptedError:
            readable = []
        now = time.monotonic()
        for fd in readable:
            index = by_fd[fd]
            try:
                while beats[index].recv(64):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                continue
            watch.beat(index, now)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            index = children.pop(pid, -1)
            if index < 0:
                continue
            pids.pop(index, None)
            watch.gone(index)
            code = os.waitstatus_to_exitcode(status)
            if pid in killed:
                killed.discard(pid)
                code = -signal.SIGKILL
            if stopping:
                continue
            if code == EXIT_CONFIG:
                log.error("worker %d (pid %d) cannot start: configuration error; stopping",
                          index, pid)
                exit_code = EXIT_CONFIG
                forward(signal.SIGTERM, None)
                continue
            deaths = [t for t in deaths if now - t < RESPAWN_WINDOW] + [now]
            log.error("worker %d (pid %d) exited with %d", index, pid, code)
            if len(deaths) > RESPAWN_LIMIT:
                log.error("supervisor: workers keep dying; stopping")
                exit_code = 1
                forward(signal.SIGTERM, None)
                continue
            spawn(index)
        if not stopping:
            for index in watch.stalled(now):
                pid = pids.get(index, 0)
                if pid and pid not in killed:
                    log.error("worker %d (pid %d): event loop silent for %.1fs (limit %gs): "
                              "killing it", index, pid, watch.silent_for(index, now), stall)
                    killed.add(pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if (watchdog_interval and notify is not None and now >= next_ping
                and watch.all_alive(now)):
            notify("WATCHDOG=1")
            next_ping = now + watchdog_interval
    for sock in beats.values():
        sock.close()
    return exit_code
