"""Holder processes: many idle connections kept open outside the load generator's process.

Why: a process may only have so many file descriptors (RLIMIT_NOFILE; where the hard limit
cannot be raised, 20,000 is common), and 10,000 virtual connections are 20,000 client
sockets. The concurrency scenario therefore spreads its idle connections over holder
processes, each opening ``count`` bound sessions (proxy or direct) and keeping them alive.

Line protocol (``python -m bench.holder SPEC_JSON``):

* stdout: ``PROGRESS n`` while opening, then ``READY n``; ``ERROR message`` on failure;
* stdin: ``CHECK`` -> one small call on every session -> ``CHECKED n`` (or ``ERROR``);
  ``STREAM seconds [rate]`` -> every session streams 64 KiB responses until then (paced to
  ``rate`` bytes/s when given) -> ``STREAMED bytes``;
  ``CLOSE`` or end of input -> every session closed -> ``CLOSED`` and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.limits import raise_nofile


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
    server_hostname: str | None = None
    timeout: float = 10.0
    concurrency: int = 100


async def _child(spec: HolderSpec) -> int:
    import ssl

    from bench.client import BasicAuth, NtlmAuth, RpchClient
    from bench.direct import DirectClient
    from bench.session import BenchSession, PduTransport

    raise_nofile(2 * spec.count + 256)
    auth: BasicAuth | NtlmAuth | None = None
    if spec.auth == "basic":
        auth = BasicAuth(spec.user, spec.password, spec.domain)
    elif spec.auth == "ntlm":
        auth = NtlmAuth(spec.user, spec.password, spec.domain)
    ctx = None
    if spec.tls:
        ctx = ssl.create_default_context()
        if spec.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    sessions: list[BenchSession] = []
    sem = asyncio.Semaphore(spec.concurrency)
    step = max(1, spec.count // 10)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def one() -> None:
        async with sem:
            t: PduTransport
            if spec.path == "direct":
                t = await DirectClient.connect(spec.host, spec.port, timeout=spec.timeout)
            else:
                t = await RpchClient.connect(
                    spec.host, spec.port, target=spec.target, path=spec.url_path, auth=auth,
                    ssl=ctx, server_hostname=spec.server_hostname, timeout=spec.timeout)
            s = BenchSession(t, timeout=spec.timeout)
            sessions.append(s)
            await s.bind()
            if len(sessions) % step == 0:
                say(f"PROGRESS {len(sessions)}")

    async def close_all() -> None:
        async def close(s: BenchSession) -> None:
            async with sem:
                await s.t.close()

        await asyncio.gather(*(close(s) for s in sessions), return_exceptions=True)

    try:
        await asyncio.gather(*(one() for _ in range(spec.count)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        say(f"ERROR opening: {type(exc).__name__}: {exc}")
        await close_all()
        return 1
    say(f"READY {len(sessions)}")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    code = 0
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "CHECK":
            async def check(s: BenchSession) -> None:
                async with sem:
                    await s.call(16, 16)

            try:
                await asyncio.gather(*(check(s) for s in sessions))
                say(f"CHECKED {len(sessions)}")
            except Exception as exc:  # noqa: BLE001
                say(f"ERROR checking: {type(exc).__name__}: {exc}")
                code = 1
        elif line.startswith("STREAM "):
            # Every session streams 64 KiB responses (2 calls in flight) for N seconds,
            # optionally paced to a rate (bytes per second per session).
            words = line.split()
            seconds = min(3600.0, float(words[1]))
            rate = float(words[2]) if len(words) > 2 and float(words[2]) > 0 else None
            deadline = time.perf_counter() + seconds
            big = 0xFFF8 - 24 - 24

            async def stream(s: BenchSession, big: int = big, deadline: float = deadline,
                             rate: float | None = rate) -> int:
                r = await s.stream(want=big, length=16, depth=2, deadline=deadline, rate=rate)
                return r.bytes_down

            try:
                moved = await asyncio.gather(*(stream(s) for s in sessions))
                say(f"STREAMED {sum(moved)}")
            except Exception as exc:  # noqa: BLE001
                say(f"ERROR streaming: {type(exc).__name__}: {exc}")
                code = 1
        else:  # CLOSE or EOF
            break
    await close_all()
    say("CLOSED")
    return code


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
            elif word == "READY":
                self.opened = int(rest)
                return self.opened
            elif word == "ERROR":
                raise RuntimeError(f"holder ({self.spec.path}): {rest}")

    async def check(self, timeout: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"CHECK\n")
        line = await self._line(timeout)
        if not line.startswith("CHECKED"):
            raise RuntimeError(f"holder ({self.spec.path}): {line}")

    async def stream(self, seconds: float, timeout: float, rate: float = 0.0) -> int:
        """Stream on every session (``rate`` bytes/s each, 0 = as fast as possible); returns
        the bytes moved."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"STREAM {seconds} {rate}\n".encode())
        line = await self._line(seconds + timeout)
        if not line.startswith("STREAMED "):
            raise RuntimeError(f"holder ({self.spec.path}): {line}")
        return int(line.split()[1])

    async def stop(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"CLOSE\n")
                proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


if __name__ == "__main__":
    sys.exit(main())
