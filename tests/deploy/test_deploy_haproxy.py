"""deploy/haproxy: Debian's HAProxy in front of two ``rpcproxy serve``, many clients through it.

The shipped haproxy.cfg is used as is, except for the addresses (a free loopback port for the
frontend, the two instances and their /health ports) and the stats socket path. Simulated
clients each have their own source address in 127.0.0.0/8; every virtual connection binds
the bench interface on the bench backend stub and makes checked calls through its channels.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.backend import BenchBackend
from bench.client import BasicAuth, RpchClient, RpchError
from bench.session import BenchSession
from tests.support.deploy_support import (
    REPO,
    ServeProcess,
    http_get,
    metric_value,
    unused_port,
    wait_until,
)
from tests.support.haproxy import haproxy_binary
from tests.support.samba_dc import SambaDC

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
TARGET = "mail.example.com:6001"
CLIENTS = 16  # distinct source addresses
VCS_PER_CLIENT = 4

# RpchClient has no source-address option; for this test every TCP connection a client task
# opens takes its local address from this context variable (unset: the kernel's choice).
_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("source", default=None)


@pytest.fixture
def source_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    original = asyncio.open_connection

    async def open_connection(*args: Any, **kwargs: Any) -> Any:
        src = _source.get()
        if src is not None and "local_addr" not in kwargs and "sock" not in kwargs:
            kwargs["local_addr"] = (src, 0)
        return await original(*args, **kwargs)

    monkeypatch.setattr(asyncio, "open_connection", open_connection)


def render_config(template: str, *, frontend: int, servers: list[tuple[int, int]],
                  stats_socket: Path, balance: str | None = None) -> str:
    """The shipped config with test addresses (everything else untouched)."""
    text = re.sub(r"(?m)^(\s*)bind :443$", rf"\g<1>bind 127.0.0.1:{frontend}", template)
    lines = []
    n = 0
    for line in text.splitlines():
        m = re.match(r"^(\s*)server (\S+) \S+(.*)$", line)
        if m:
            if n < len(servers):
                port, check = servers[n]
                lines.append(f"{m.group(1)}server {m.group(2)} 127.0.0.1:{port}{m.group(3)} "
                             f"check port {check}")
            n += 1
            continue
        lines.append(line)
    assert n == len(servers), "the shipped config should name exactly two servers"
    text = "\n".join(lines) + "\n"
    text = text.replace("stats socket /run/haproxy/admin.sock", f"stats socket {stats_socket}")
    if balance is not None:
        text = re.sub(r"(?m)^(\s*)balance source$", rf"\g<1>balance {balance}", text)
    # HAProxy wants 2 descriptors per connection of maxconn; test machines may cap
    # RLIMIT_NOFILE below what the production value needs.
    text = re.sub(r"(?m)^(\s*)maxconn \d+$", r"\g<1>maxconn 2000", text)
    assert f"bind 127.0.0.1:{frontend}" in text
    return text


def _stats(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode()


def _servers_up(sock_path: Path) -> dict[str, str]:
    """server name -> status, from ``show stat`` (CSV)."""
    out = _stats(sock_path, "show stat")
    header, *rows = [ln for ln in out.splitlines() if ln]
    cols = header.lstrip("# ").split(",")
    status: dict[str, str] = {}
    for row in rows:
        rec = dict(zip(cols, row.split(","), strict=False))
        if rec.get("pxname") == "rpcproxy" and rec.get("svname") not in ("BACKEND", None):
            status[rec["svname"]] = rec.get("status", "")
    return status


class Deployment:
    """Two rpcproxy instances (Samba for NTLM, the bench stub as backend) behind HAProxy."""

    def __init__(self, tmp: Path, dc: SambaDC, backend_port: int, balance: str | None) -> None:
        self.procs: list[ServeProcess] = []
        self.haproxy: subprocess.Popen[str] | None = None
        conf = tmp / "rpcproxy.toml"
        conf.write_text(
            f'backend = "127.0.0.1:{backend_port}"\n'
            + dc.ntlm_helper_toml() +
            f'targets = ["{TARGET}"]\n'
            "basic_over_http = true\n"
            "setup_timeout = 3.0\n"
        )
        instances = []
        for _ in range(2):
            p = ServeProcess(["--config", str(conf), "--listen", "127.0.0.1:0",
                              "--metrics-listen", "127.0.0.1:0"])
            self.procs.append(p)
        for p in self.procs:
            instances.append((p.port(), p.metrics_port()))
        self.metrics_ports = [m for _, m in instances]
        self.frontend = unused_port()
        self.stats_socket = tmp / "haproxy.sock"
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(render_config(HAPROXY_CFG.read_text(), frontend=self.frontend,
                                     servers=instances, stats_socket=self.stats_socket,
                                     balance=balance))
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(cfg)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = tmp / "haproxy.out"
        with open(self.log, "w") as out:
            self.haproxy = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], stdout=out,
                                            stderr=subprocess.STDOUT, text=True)
        haproxy = self.haproxy

        def started() -> bool:
            assert haproxy.poll() is None, f"haproxy exited:\n{self.log.read_text()}"
            return self.stats_socket.exists()

        wait_until(started, 20, "HAProxy's stats socket")
        wait_until(lambda: _servers_up(self.stats_socket) == {"rpcproxy1": "UP",
                                                               "rpcproxy2": "UP"},
                   30, "both rpcproxy instances UP in HAProxy (health checks on /health)")

    def scrape(self, i: int) -> str:
        status, text = http_get(self.metrics_ports[i], "/metrics")
        assert status == 200
        return text

    def close(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(20)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(10)
        for p in self.procs:
            p.close()


@pytest.fixture
def bench_backend() -> Iterator[tuple[BenchBackend, asyncio.AbstractEventLoop]]:
    """The bench DCE/RPC stub, on its own event loop in a thread."""
    import threading

    loop = asyncio.new_event_loop()
    backend = BenchBackend()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(backend.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield backend, loop
    asyncio.run_coroutine_threadsafe(backend.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def _one_vc(port: int, auth: BasicAuth, source: str, calls: int) -> None:
    _source.set(source)
    client = await RpchClient.connect("127.0.0.1", port, target=TARGET, auth=auth, timeout=20)
    try:
        session = BenchSession(client, timeout=20)
        await session.bind()
        for i in range(calls):
            await session.call(want=2048 * (i + 1), length=1024 * (i + 1))
    finally:
        await client.close()


async def _run_clients(port: int, auth: BasicAuth, clients: int, vcs_per_client: int
                       ) -> list[BaseException | None]:
    async def client(n: int) -> list[BaseException | None]:
        source = f"127.0.1.{n + 10}"
        results: list[BaseException | None] = []
        for _ in range(vcs_per_client):
            try:
                await _one_vc(port, auth, source, calls=3)
                results.append(None)
            except (RpchError, OSError, TimeoutError) as exc:
                results.append(exc)
        return results

    per_client = await asyncio.gather(*(client(n) for n in range(clients)))
    return [r for rs in per_client for r in rs]


@pytest.mark.samba
@pytest.mark.usefixtures("source_addresses")
def test_many_vcs_through_haproxy_stay_on_one_instance(
    samba_dc: SambaDC, tmp_path: Path,
    bench_backend: tuple[BenchBackend, asyncio.AbstractEventLoop]
) -> None:
    backend, _ = bench_backend
    dep = Deployment(tmp_path, samba_dc, backend.port, balance=None)
    try:
        auth = BasicAuth("testuser", samba_dc.users["testuser"], samba_dc.domain)
        results = asyncio.run(_run_clients(dep.frontend, auth, CLIENTS, VCS_PER_CLIENT))
        failures = [r for r in results if r is not None]
        assert not failures, f"{len(failures)} of {len(results)} VCs failed: {failures[:3]}"

        total = CLIENTS * VCS_PER_CLIENT
        opened = [metric_value(dep.scrape(i), "rpcproxy_virtual_connections_opened_total")
                  for i in range(2)]
        # Exactly one VC object per client VC: had the two channels of one VC landed on
        # different instances, each instance would have created half a VC (and timed out).
        assert sum(opened) == total, opened
        assert all(n > 0 for n in opened), f"one instance got every client: {opened}"
        for i in range(2):
            text = dep.scrape(i)
            assert metric_value(text, "rpcproxy_pairing_timeouts_total") == 0
            assert metric_value(text, "rpcproxy_bytes_total",
                                'direction="backend_to_client"') > 0
        assert backend.calls == total * 3
        assert backend.faults == 0

        def all_closed() -> bool:
            return all(metric_value(dep.scrape(i), "rpcproxy_virtual_connections",
                                    'phase="opened"') == 0 for i in range(2))

        wait_until(all_closed, 20, "every VC to be closed on both instances")
    finally:
        dep.close()


@pytest.mark.samba
@pytest.mark.usefixtures("source_addresses")
def test_without_source_affinity_channels_split_and_fail(
    samba_dc: SambaDC, tmp_path: Path,
    bench_backend: tuple[BenchBackend, asyncio.AbstractEventLoop]
) -> None:
    """Control: with round-robin the IN and OUT channels part ways; stickiness is the point."""
    backend, _ = bench_backend
    dep = Deployment(tmp_path, samba_dc, backend.port, balance="roundrobin")
    try:
        auth = BasicAuth("testuser", samba_dc.users["testuser"], samba_dc.domain)
        results = asyncio.run(_run_clients(dep.frontend, auth, clients=1, vcs_per_client=3))
        assert any(r is not None for r in results), "round-robin unexpectedly kept pairs"

        def timeouts() -> float:
            return sum(metric_value(dep.scrape(i), "rpcproxy_pairing_timeouts_total")
                       for i in range(2))

        wait_until(lambda: timeouts() > 0, 20, "a pairing timeout on some instance")
    finally:
        dep.close()


def test_shipped_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    done = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    text = HAPROXY_CFG.read_text()
    assert re.search(r"(?m)^\s*mode tcp$", text)
    assert re.search(r"(?m)^\s*balance source$", text)
    assert re.search(r"(?m)^\s*option httpchk GET /health$", text)
