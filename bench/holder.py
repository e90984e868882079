"""Holder processes: many idle connections kept open outside the load generator's process.

Why: a process may only have so many file descriptors (RLIMIT_NOFILE; where the hard limit
cannot be raised, 20,000 is common), and 10,000 virtual connections are 20,000 client
sockets. The concurrency scenario therefore spreads its idle connections over holder
processes, each opening ``count`` bound sessions (proxy or direct) and keeping them alive.

Line protocol (``python -m bench.holder SPEC_JSON``):

* stdout: ``PROGRESS n`` while opening, then ``TLS version ...`` (what the connections
  negotiated, ``plain`` for none) and ``READY n``; ``ERROR message`` on failure;
* stdin: ``CHECK`` -> one small call on every session -> ``CHECKED n`` (or ``ERROR``);
  ``STREAM seconds [rate [length [depth]]]`` -> every session streams 64 KiB responses
  (requests carrying ``length`` payload bytes, default 16; ``depth`` calls in flight, default
  2) until then, paced to ``rate`` bytes/s when it is not 0 ->
  ``STREAMED down up calls seconds`` (payload bytes received and sent, calls completed, wall
  seconds from the command to the last response, all sessions together);
  ``INFO`` -> ``INFO cookie ...`` (the hex VC cookie of every proxy session, nothing for
  direct ones: the parent works out which proxy worker owns each VC);
  ``CLOSE`` or end of input -> every session closed -> ``CLOSED`` and exit.

With ``owners`` in the spec, the VC cookies are chosen so that a multi-worker proxy's cookie
hash (``rpcproxy.http.handoff.owner_of``) gives VC i to worker ``owners[i]``.

Every response a holder receives is checked like the load generator's own
(``BenchSession``): a lost, reordered or damaged byte makes the command answer ``ERROR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.limits import raise_nofile
from bench.procs import wait_or_kill


@dataclass
class HolderSpec:
    path: str  # "proxy" or "direct"
    host: str
    port: int
    count: int
    target: str = ""
    url_path: str = "/rpc/rpcproxy.dll"
    auth: str = "basic"  # "basic", "ntlm" or "none"
    user: str = "bench"
    password: str = "bench"
    domain: str = ""
    tls: bool = False
    insecure: bool = False
    tls_max: str = ""  # "1.2": offer TLS 1.2 at most (rpcproxy-bench --tls-version 1.2)
    server_hostname: str | None = None
    timeout: float = 10.0
    concurrency: int = 100
    receive_window: int = 0x40000  # OUT-channel window announced in CONN/A1 (proxy path)
    # Place VC i on proxy worker owners[i] of owner_count (a cookie chosen so that
    # rpcproxy.http.handoff.owner_of maps it there); empty: random cookies.
    owners: list[int] = field(default_factory=list)
    owner_count: int = 0


async def _child(spec: HolderSpec) -> int:
    from bench.client import BasicAuth, NtlmAuth, RpchClient
    from bench.direct import DirectClient
    from bench.session import BenchSession, PduTransport, StreamResult
    from bench.tls_client import client_context

    raise_nofile(2 * spec.count + 256)
    auth: BasicAuth | NtlmAuth | None = None
    if spec.auth == "basic":
        auth = BasicAuth(spec.user, spec.password, spec.domain)
    elif spec.auth == "ntlm":
        auth = NtlmAuth(spec.user, spec.password, spec.domain)
    ctx = None
    if spec.tls:
        ctx = client_context(verify=not spec.insecure, max_version=spec.tls_max)
    sessions: list[BenchSession] = []
    tls_seen: set[str] = set()  # the TLS versions the connections negotiated
    sem = asyncio.Semaphore(spec.concurrency)
    step = max(1, spec.count // 10)
    cookies = [_placed_cookie(spec.owners[i], spec.owner_count) if i < len(spec.owners)
               else None for i in range(spec.count)]

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def one(cookie: bytes | None) -> None:
        async with sem:
            t: PduTransport
            if spec.path == "direct":
                t = await DirectClient.connect(spec.host, spec.port, timeout=spec.timeout,
                                               ssl=ctx)
            else:
                t = await RpchClient.connect(
                    spec.host, spec.port, target=spec.target, path=spec.url_path, auth=auth,
                    ssl=ctx, server_hostname=spec.server_hostname, timeout=spec.timeout,
                    vc_cookie=cookie, receive_window=spec.receive_window)
            s = BenchSession(t, timeout=spec.timeout)
            sessions.append(s)
            tls_seen.add(t.tls_version or "plain")
            await s.bind()
            if len(sessions) % step == 0:
                say(f"PROGRESS {len(sessions)}")

    async def close_all() -> None:
        async def close(s: BenchSession) -> None:
            async with sem:
                await s.t.close()

        await asyncio.gather(*(close(s) for s in sessions), return_exceptions=True)

    try:
        await asyncio.gather(*(one(c) for c in cookies))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        say(f"ERROR opening: {type(exc).__name__}: {exc}")
        await close_all()
        return 1
    say(f"TLS {' '.join(sorted(tls_seen))}")
    say(f"READY {len(sessions)}")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    code = 0
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "CHECK" or line.startswith("CHECK "):
            # One call per session: 16 bytes each way, or "CHECK N": N bytes each way.
            size = int(line[6:]) if line.startswith("CHECK ") and line[6:].isdigit() else 16

            async def check(s: BenchSession, size: int = size) -> None:
                async with sem:
                    await s.call(size, size)

            try:
                await asyncio.gather(*(check(s) for s in sessions))
                say(f"CHECKED {len(sessions)}")
            except Exception as exc:  # noqa: BLE001
                say(f"ERROR checking: {type(exc).__name__}: {exc}")
                code = 1
        elif line == "INFO":
            hex_cookies = [s.t.vc_cookie.hex() for s in sessions if isinstance(s.t, RpchClient)]
            say(" ".join(["INFO", *hex_cookies]))
        elif line.startswith("STREAM "):
            # Every session streams 64 KiB responses for N seconds (see the module docstring).
            try:
                seconds, rate, length, depth = _stream_args(line)
            except ValueError as exc:
                say(f"ERROR bad STREAM command: {exc}")
                code = 1
                continue
            t0 = time.perf_counter()
            deadline = t0 + seconds
            big = 0xFFF8 - 24 - 24

            async def stream(s: BenchSession, big: int = big, deadline: float = deadline,
                             rate: float | None = rate, length: int = length,
                             depth: int = depth) -> StreamResult:
                return await s.stream(want=big, length=length, depth=depth, deadline=deadline,
                                      rate=rate)

            try:
                res = await asyncio.gather(*(stream(s) for s in sessions))
                wall = time.perf_counter() - t0
                say(f"STREAMED {sum(r.bytes_down for r in res)} {sum(r.bytes_up for r in res)} "
                    f"{sum(r.calls for r in res)} {wall:.6f}")
            except Exception as exc:  # noqa: BLE001
                say(f"ERROR streaming: {type(exc).__name__}: {exc}")
                code = 1
        else:  # CLOSE or EOF
            break
    await close_all()
    say("CLOSED")
    return code


def _placed_cookie(worker: int, count: int) -> bytes:
    """A random VC cookie that a ``count``-worker proxy gives to ``worker``."""
    import os

    from rpcproxy.http.handoff import owner_of

    for _ in range(100 * max(1, count)):  # each try lands on `worker` with chance 1/count
        cookie = os.urandom(16)
        if owner_of(cookie, count) == worker:
            return cookie
    raise RuntimeError(f"no cookie for worker {worker} of {count}")


def _stream_args(line: str) -> tuple[float, float | None, int, int]:
    """``STREAM seconds [rate [length [depth]]]`` -> (seconds, rate or None, length, depth),
    each bounded."""
    words = line.split()
    if not 2 <= len(words) <= 5:
        raise ValueError(line)
    seconds = min(3600.0, max(0.0, float(words[1])))
    rate = float(words[2]) if len(words) > 2 else 0.0
    length = int(words[3]) if len(words) > 3 else 16
    depth = int(words[4]) if len(words) > 4 else 2
    if not 0 <= length <= 1 << 20 or not 1 <= depth <= 64:
        raise ValueError(f"length {length} or depth {depth} out of range")
    return seconds, (rate if rate > 0 else None), length, depth


@dataclass
class Streamed:
    """What one holder's ``STREAM`` moved (payload bytes, all its sessions together)."""

    down: int
    up: int
    calls: int
    seconds: float


def main() -> int:
    spec = HolderSpec(**json.loads(sys.argv[1]))
    try:
        import uvloop

        return uvloop.run(_child(spec))
    except ImportError:
        return asyncio.run(_child(spec))


class Holder:
    """Parent side of one holder process."""

    def __init__(self, spec: HolderSpec) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.opened = 0
        self.tls_seen: set[str] = set()  # TLS versions its connections negotiated ("plain")

    async def start(self) -> None:
        import os
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.holder", json.dumps(asdict(self.spec)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env)

    async def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"holder ({self.spec.path}) exited unexpectedly")
        return raw.decode().strip()

    async def wait_ready(self, timeout: float, on_progress: Any = None) -> int:
        """Until READY; ``on_progress()`` after each PROGRESS line. Raises on ERROR."""
        while True:
            line = await self._line(timeout)
            word, _, rest = line.partition(" ")
            if word == "PROGRESS":
                self.opened = int(rest)
                if on_progress is not None:
                    on_progress()
            elif word == "TLS":
                self.tls_seen.update(rest.split())
            elif word == "READY":
                self.opened = int(rest)
                return self.opened
            elif word == "ERROR":
                raise RuntimeError(f"holder ({self.spec.path}): {rest}")

    async def check(self, timeout: float, size: int = 16) -> None:
        """One call on every session, ``size`` bytes each way; raises if one fails."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"CHECK {size}\n".encode())
        line = await self._line(timeout)
        if not line.startswith("CHECKED"):
            raise RuntimeError(f"holder ({self.spec.path}): {line}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def stream(self, seconds: float, timeout: float, rate: float = 0.0) -> int:
        """Stream on every session (``rate`` bytes/s each, 0 = as fast as possible); returns
        the payload bytes received."""
        return (await self.stream_stats(seconds, timeout, rate)).down

    async def stream_stats(self, seconds: float, timeout: float, rate: float = 0.0, *,
                           length: int = 16, depth: int = 2) -> Streamed:
        """Like ``stream``, with requests of ``length`` payload bytes and ``depth`` calls in
        flight per session; returns both directions' bytes, the calls and the wall time."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"STREAM {seconds} {rate} {length} {depth}\n".encode())
        line = await self._line(seconds + timeout)
        words = line.split()
        if len(words) != 5 or words[0] != "STREAMED":
            raise RuntimeError(f"holder ({self.spec.path}): {line}")
        return Streamed(int(words[1]), int(words[2]), int(words[3]), float(words[4]))

    async def cookies(self, timeout: float) -> list[bytes]:
        """The VC cookies of this holder's proxy sessions."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"INFO\n")
        line = await self._line(timeout)
        words = line.split()
        if not words or words[0] != "INFO":
            raise RuntimeError(f"holder ({self.spec.path}): {line}")
        return [bytes.fromhex(w) for w in words[1:]]

    async def stop(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"CLOSE\n")
                proc.stdin.close()
        await wait_or_kill(proc, timeout)


if __name__ == "__main__":
    sys.exit(main())
