"""The "C relay" reference path: HAProxy in TCP mode between the direct clients and the backend.

A third path next to ``proxy`` and ``direct`` (self-contained mode only): the same
ncacn_ip_tcp clients as the direct path, but through one HAProxy process (TCP mode,
``option splice-auto``, one thread unless asked for more: ``threads``, HAProxy's
``nbthread``) listening on 127.0.0.1 and forwarding to the bench's backend stub. It costs
what any one-hop proxy written in C costs on this machine (one more process to schedule, a
second TCP connection per client connection for every byte to cross), so its figures say
which proxy-vs-direct targets the machine rules out, and how close rpcproxy gets to it.
With ``tls_pem`` (``rpcproxy-bench --tls``) HAProxy terminates TLS on its listener, as the
proxy then does: the same clients speak TLS to it and it relays the plaintext.

``RelayProcess`` is a ``ChildProcess`` (same ``stop``, ``sample``, ``alive``, log file), so
the CLI starts, checks and stops it like the backend stub and the proxy. The aggregate
scenario starts a second one with two threads next to the CLI's one-thread relay: what a C
relay gains from a second thread on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.procs import ChildProcess

SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "C relay (HAProxy TCP, splice)"
MAXCONN_CAP = 100_000
FD_SLACK = 100  # descriptors HAProxy wants beyond its connections and pipes (listeners etc.)


def find_haproxy() -> str | None:
    """HAProxy's executable, in the system directories only (Debian: /usr/sbin)."""
    return shutil.which("haproxy", path=SEARCH_PATH)


def haproxy_version(exe: str) -> str:
    """The first line of ``haproxy -v`` ("HAProxy version 2.6.12-1 ..."), or "" if none."""
    try:
        done = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0].strip() if lines else ""


def relay_maxconn(hard_limit: int | None = None) -> int:
    """Connections HAProxy may hold, from the hard RLIMIT_NOFILE it inherits.

    HAProxy sizes its descriptor limit as two per connection, two per splice pipe (``maxpipes``,
    a quarter of ``maxconn``) and a little slack, and refuses to start when it cannot raise
    its limit that far: so 2.5 descriptors per connection must fit under the hard limit."""
    if hard_limit is None:
        hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_limit == resource.RLIM_INFINITY or hard_limit < 0:
        return MAXCONN_CAP
    return max(1, min(MAXCONN_CAP, (hard_limit - FD_SLACK) * 2 // 5))


def haproxy_config(listen_port: int, backend: tuple[str, int], maxconn: int,
                   threads: int = 1, tls_pem: str | None = None) -> str:
    """The relay's whole configuration: TCP mode, splicing, ``threads`` threads (one by
    default), loopback only. ``tls_pem`` (certificate and key in one PEM file): the relay
    terminates TLS on its listener (``bind ... ssl crt``), TLS 1.2 and 1.3, and forwards
    the plaintext to the backend (splicing then applies on the backend side only)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    bhost, bport = backend
    return "\n".join([
        "global",
        f"\tmaxconn {maxconn}",
        f"\tmaxpipes {max(1, maxconn // 4)}",
        f"\tnbthread {threads}",
        "",
        "defaults",
        "\tmode tcp",
        "\toption splice-auto",
        f"\tmaxconn {maxconn}",
        "\ttimeout connect 5s",
        "\ttimeout client 1h",
        "\ttimeout server 1h",
        "",
        "frontend bench_relay",
        f"\tbind 127.0.0.1:{listen_port}"
        + (f" ssl crt {tls_pem} ssl-min-ver TLSv1.2" if tls_pem else ""),
        "\tdefault_backend bench_backend",
        "",
        "backend bench_backend",
        f"\tserver stub {bhost}:{bport}",
        "",
    ])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess(ChildProcess):
    """HAProxy in the foreground (``-db``) with a generated config in a temp dir.

    Named "relay" with one thread, "relay-<N>t" with N (its log file and error lines)."""

    def __init__(self, exe: str, backend: tuple[str, int], *, maxconn: int | None = None,
                 threads: int = 1, tls_pem: str | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        super().__init__("relay" if threads == 1 else f"relay-{threads}t", [])
        self.exe = exe
        self.backend = backend
        self.threads = threads
        self.tls_pem = tls_pem  # terminate TLS with this certificate + key (PEM)
        self.maxconn = maxconn if maxconn is not None else relay_maxconn()
        self.version = haproxy_version(exe)
        self._dir = tempfile.TemporaryDirectory(prefix="rpcproxy-bench-relay-")

    async def start(self, timeout: float = 20.0) -> tuple[str, int]:
        """Start HAProxy on a free loopback port; returns (host, port) once it accepts.

        A port taken between choosing and binding it: HAProxy exits, another one is tried."""
        deadline = time.monotonic() + timeout
        for _ in range(3):
            port = _free_port()
            cfg = Path(self._dir.name) / "haproxy.cfg"
            cfg.write_text(haproxy_config(port, self.backend, self.maxconn, self.threads,
                                          self.tls_pem))
            self.proc = await asyncio.create_subprocess_exec(
                self.exe, "-db", "-f", str(cfg), stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log, stderr=self._log)
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    break
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                    self.host, self.port = "127.0.0.1", port
                    return self.host, self.port
                await asyncio.sleep(0.05)
            if self.proc.returncode is None:  # neither listening nor gone: give up
                await super().stop(5.0)
                raise RuntimeError(f"haproxy did not listen within {timeout:g}s:\n"
                                   f"{self.log_tail()}")
            if "cannot bind" not in self.log_tail().lower():
                break
        raise RuntimeError(f"haproxy exited with {self.proc.returncode if self.proc else '?'}:"
                           f"\n{self.log_tail()}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Soft stop (SIGUSR1: HAProxy closes its listener, waits for its connections to end
        and exits with 0), so that a relay stopped between scenarios leaves no failure
        status; SIGTERM (exit status -15) and SIGKILL after that when it lingers."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(3.0, timeout)):
                    await proc.wait()
        await super().stop(timeout)
        self._dir.cleanup()
