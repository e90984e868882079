"""Child processes of the bench (backend stub, proxy) and what /proc says about them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcSample:
    t: float
    rss: int  # bytes, summed over the process and its descendants
    fds: int
    cpu: float  # user + system seconds, summed over the process and its descendants


async def wait_or_kill(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Wait for a child to exit; SIGKILL it if it has not within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(x) for x in fh.read().split())
    except OSError:
        pass
    return found


def child_pids(pid: int) -> list[int]:
    """Direct children of a process."""
    return _children(pid)


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a bounded walk)."""
    return _tree(pid)


def _tree(pid: int) -> list[int]:
    out = [pid]
    frontier = [pid]
    for _ in range(4):  # bounded depth: workers of workers are not expected
        nxt: list[int] = []
        for p in frontier:
            nxt.extend(_children(p))
        out.extend(nxt)
        frontier = nxt
        if not frontier:
            break
    return out


def sample(pid: int) -> ProcSample:
    rss = fds = 0
    cpu = 0.0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/statm") as fh:
                rss += int(fh.read().split()[1]) * _PAGE
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / _CLK_TCK
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, ValueError, IndexError):
            continue
    return ProcSample(time.monotonic(), rss, fds, cpu)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of this one process (its children not included), or None
    once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of one process, by thread id (empty once the
    process is gone)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
    return out


def self_sample() -> ProcSample:
    return sample(os.getpid())


class ChildProcess:
    """A child that prints ``LISTENING <host> <port>`` once ready and exits when stdin closes."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self._log = tempfile.NamedTemporaryFile(prefix=f"rpcproxy-bench-{name}-", suffix=".log",
                                                delete=False)
        self.log_path = Path(self._log.name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 20.0) -> tuple[str, int]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.argv, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._log, env=env)
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise RuntimeError(f"{self.name} exited before listening:\n"
                                           f"{self.log_tail()}")
                    parts = line.decode().split()
                    if len(parts) == 3 and parts[0] == "LISTENING":
                        self.host, self.port = parts[1], int(parts[2])
                        return self.host, self.port
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.name} did not start within {timeout:g}s") from None

    def sample(self) -> ProcSample:
        return sample(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await wait_or_kill(proc, timeout)
        self._log.close()

    def remove_log(self) -> None:
        with contextlib.suppress(OSError):
            self.log_path.unlink()
