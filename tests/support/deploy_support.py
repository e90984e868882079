"""Helpers for the deploy/admin tests (no tests in this module).

* ``ServeProcess``  the real ``rpcproxy serve`` as a child process, its log lines collected.
* ``NotifySocket``  a fake systemd NOTIFY_SOCKET (path or abstract) collecting datagrams.
* ``open_vc``       a virtual connection of bench's ``RpchClient`` (the Authorization header
                    given), with a mgmt BIND; ``refused_channel`` a bare OUT request's answer.

Every wait is bounded; every server binds to loopback; processes are signalled by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bench import dcerpc
from bench.client import OUT_NEW_CONTENT_LENGTH, RpchClient
from bench.client_auth import BasicAuth
from bench.http_head import RpchClosed, read_body, read_head
from rpcproxy.rpch import rts

REPO = Path(__file__).resolve().parents[2]
# The mgmt interface (C706 appendix Q), which every DCE/RPC server answers a BIND for.
MGMT_SYNTAX = dcerpc.syntax(uuid.UUID("afa8bd80-7d8a-11c9-bef4-08002b102989"), 1)
ENTRYPOINT = REPO / "deploy" / "container" / "entrypoint.py"


def load_entrypoint(name: str) -> ModuleType:
    """deploy/container/entrypoint.py (a script, not a package module) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, ENTRYPOINT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_command(*args: str) -> list[str]:
    """``rpcproxy ...`` run by this interpreter (no reliance on an installed script)."""
    return [sys.executable, "-c", "import sys; from rpcproxy.cli import main; sys.exit(main())",
            *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``rpcproxy serve`` (or another command line) as a child with its stderr collected."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        cmd = command if command is not None else serve_command("serve", *args)
        self.proc = subprocess.Popen(
            cmd, env=child_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"process exited ({self.proc.returncode}) before logging "
                                     f"{pattern!r}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line {pattern!r} within {timeout:g}s:\n{self.log}")
            time.sleep(0.05)

    def line_count(self) -> int:
        with self._lock:
            return len(self.lines)

    def port(self, timeout: float = 20.0) -> int:
        return int(self.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)", timeout).group(1))

    def metrics_port(self, timeout: float = 20.0) -> int:
        m = self.wait_for_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", timeout)
        return int(m.group(1))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


class NotifySocket:
    """A fake $NOTIFY_SOCKET: an AF_UNIX datagram socket that collects messages."""

    def __init__(self, tmp: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"rpcproxy-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = tmp / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.messages: list[str] = []

    def count(self, line: str) -> int:
        return sum(line in m.split("\n") for m in self.messages)

    def wait_for(self, line: str, timeout: float = 20.0, times: int = 1) -> list[str]:
        """Collect datagrams until ``times`` of them hold ``line``; returns all so far."""
        deadline = time.monotonic() + timeout
        while self.count(line) < times:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} (x{times}) on NOTIFY_SOCKET within "
                                     f"{timeout:g}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(data.decode())
        return self.messages

    def index_of(self, line: str) -> int:
        for i, m in enumerate(self.messages):
            if line in m.split("\n"):
                return i
        return -1

    def close(self) -> None:
        self.sock.close()


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of the sample ``name{labels}`` in a /metrics page (label order ignored)."""
    wanted = set(labels.split(",")) if labels else set()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, sample_labels = sample.partition("{")
        if sample_name != name:
            continue
        have = set(sample_labels.rstrip("}").split(",")) if sample_labels else set()
        if have == wanted:
            return float(value)
    raise KeyError(f"{name}{{{labels}}}")


# --- RPC over HTTP v2: bench's client, and a bare OUT channel for refusals --------------------


@dataclass
class RpchVc:
    """A virtual connection of bench's ``RpchClient``, as the deploy tests use it."""

    client: RpchClient
    call_id: int = 1

    async def bind_mgmt(self, timeout: float = 10.0) -> bytes:
        """BIND to the mgmt interface without auth; returns the answer (BIND_ACK expected)."""
        call_id = self.call_id
        self.call_id += 1
        await self.client.send_pdu(dcerpc.build_bind(call_id, MGMT_SYNTAX, max_xmit=5840,
                                                     max_recv=5840), timeout)
        return await self.client.recv_pdu(timeout)

    async def out_stream(self) -> asyncio.StreamReader:
        """The raw OUT stream, the client no longer reading it (to see how the proxy ends it)."""
        return await self.client.detach_out()

    def close(self) -> None:
        self.client.abort()


def basic_auth(user: str, password: str) -> str:
    return BasicAuth(user, password).header()


async def open_vc(host: str, port: int, target: str, auth: str, *, timeout: float = 20.0,
                  tls: ssl.SSLContext | None = None, server_hostname: str | None = None
                  ) -> RpchVc:
    """A VC opened by ``RpchClient`` with ``auth`` as the Authorization header of both
    channels; a certificate the client does not trust raises ``ssl.SSLCertVerificationError``."""
    try:
        client = await RpchClient.connect(
            host, port, target=target, ssl=tls, server_hostname=server_hostname,
            timeout=timeout, receive_window=0x10000, extra_headers={"Authorization": auth})
    except RpchClosed as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise exc.__cause__ from None
        raise
    return RpchVc(client)


async def refused_channel(host: str, port: int, target: str, auth: str,
                          timeout: float = 20.0) -> tuple[str, str]:
    """Send only an OUT channel request; the status line and body of its answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    try:
        head = (f"RPC_OUT_DATA /rpc/rpcproxy.dll?{target} HTTP/1.1\r\n"
                f"Host: {host}\r\nAccept: application/rpc\r\nUser-Agent: MSRPC\r\n"
                f"Cache-Control: no-cache\r\nAuthorization: {auth}\r\n"
                f"Content-Length: {OUT_NEW_CONTENT_LENGTH}\r\n\r\n")
        writer.write(head.encode() + rts.conn_a1(uuid.uuid4().bytes, uuid.uuid4().bytes,
                                                 0x10000))
        async with asyncio.timeout(timeout):
            answer = await read_head(reader, "OUT channel")
            body = b"" if answer.status == 200 else await read_body(reader, answer)
        return (f"{answer.version} {answer.status} {answer.reason}".rstrip(),
                body.decode(errors="replace"))
    finally:
        writer.close()
