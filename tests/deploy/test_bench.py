"""The bench harness itself: its client through a real in-process ProxyServer, its integrity
checks (a flipped byte, a stalled stream: fail, never hang) and a short CLI run's JSON.

No timing assertions here: speed is judged by rpcproxy-bench, these only check correctness.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import dcerpc
from bench import protocol as bp
from bench.auth import BenchAuthenticator
from bench.backend import BenchBackend
from bench.client import BasicAuth, NtlmAuth, RpchClient
from bench.direct import DirectClient
from bench.http_head import HttpStatusError, RpchTimeout
from bench.protocol import IntegrityError
from bench.session import BenchSession
from bench.tls_client import client_context
from dcerpc.pdu import PType
from ntlm.http_auth import Authenticated, Denied
from ntlm.verifier import Identity
from rpcproxy import config as config_mod
from rpcproxy.server import ProxyServer
from tests.support.samba_dc import SambaDC

ROOT = Path(__file__).resolve().parents[2]
TARGET = "bench:6001"

pytestmark = pytest.mark.timeout(60)


@dataclass
class Stack:
    backend: BenchBackend
    server: ProxyServer
    auth: BenchAuthenticator
    host: str
    port: int

    async def client(self, **kw: object) -> RpchClient:
        kw.setdefault("auth", BasicAuth("alice", "pw"))
        kw.setdefault("timeout", 5.0)
        return await RpchClient.connect(self.host, self.port, target=TARGET, **kw)  # type: ignore[arg-type]


async def _stack(backend: BenchBackend, *, auth: BenchAuthenticator | None = None,
                 **overrides: object) -> Stack:
    bport = await backend.start()
    cfg = config_mod.load(None, {
        "listen": "127.0.0.1:0", "backend": f"127.0.0.1:{bport}",
        "targets": [f"{TARGET}=127.0.0.1:{bport}"], **overrides})
    authenticator = auth or BenchAuthenticator()
    server = ProxyServer(cfg, authenticator=authenticator)
    (host, port), *_ = await server.start()
    return Stack(backend, server, authenticator, host, port)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    # Small Content-Lengths so that both channel recyclings happen within a test.
    s = await _stack(BenchBackend(), out_content_length=1 << 20)
    try:
        yield s
    finally:
        await s.server.stop()
        await s.backend.stop()
        s.auth.close()


async def test_client_calls_through_proxy_with_recycling(stack: Stack) -> None:
    conn = await stack.client(in_content_length=256 << 10)
    try:
        session = BenchSession(conn, timeout=5.0)
        ack = await session.bind()
        assert ack.accepted and ack.max_xmit == 0xFFF8
        for want, length in ((0, 0), (16, 16), (70_000, 16), (16, 200_000), (65_480, 65_480)):
            await session.call(want, length)  # multi-fragment both ways included
        result = await session.stream(want=65_480, length=65_480, depth=4, count=40)
        assert result.calls == 40
        assert conn.out_recycles >= 2  # 5 MiB down through 1 MiB OUT channels
        assert conn.in_recycles >= 2  # 5 MiB up through 256 KiB IN channels
        await conn.recycle_in()  # on demand as well
        await session.call(1000, 1000)
        assert conn.acks_sent > 0 and conn.acks_received > 0
    finally:
        await conn.close()
    assert stack.backend.calls == 46 and stack.backend.faults == 0
    assert stack.backend.accepted == 1  # recycling never reconnects the backend


async def test_out_recycling_with_a7_before_c1(stack: Stack) -> None:
    conn = await stack.client()
    conn.a7_before_c1 = True
    try:
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        await session.stream(want=65_480, length=16, depth=4, count=40)
        assert conn.out_recycles >= 2
    finally:
        await conn.close()


async def _stream_20_calls(s: Stack, want: int, length: int, **client: object) -> RpchClient:
    """Bind, then 20 calls two deep with 64 KiB fragments one way; returns the (closed)
    client for its flow-control counters."""
    conn = await s.client(**client)
    try:
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        result = await session.stream(want=want, length=length, depth=2, count=20)
        assert result.calls == 20
    finally:
        await conn.close()
    return conn


@pytest.mark.parametrize("window", [0x10000, 0x8000])
async def test_outlook_sized_window_with_64k_fragments_never_stalls(stack: Stack,
                                                                   window: int) -> None:
    """Outlook's default OUT window is 64 KiB and the stub's fragments are 65,528 bytes:
    after the BIND_ACK a whole fragment no longer fits, and the client acks only past half
    its window. The proxy must send it anyway (it used to wait for that ack forever)."""
    conn = await _stream_20_calls(stack, 65_480, 16, receive_window=window)
    assert conn.acks_sent >= 10


async def test_small_in_window_with_64k_request_fragments_never_stalls() -> None:
    """The mirror case on the IN side: the proxy announces a 64 KiB window (an admin's
    receive_window) and the client sends 64 KiB fragments, holding each until it fits.
    After the BIND the proxy must ack early enough; it used to wait for half a window."""
    s = await _stack(BenchBackend(), receive_window=0x10000)
    try:
        conn = await _stream_20_calls(s, 16, 65_480)
        assert conn.acks_received >= 20
    finally:
        await s.server.stop()
        await s.backend.stop()
        s.auth.close()


async def test_direct_client_same_api(stack: Stack) -> None:
    conn = await DirectClient.connect("127.0.0.1", stack.backend.port, timeout=5.0)
    try:
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        await session.call(200_000, 200_000)
    finally:
        await conn.close()


async def test_corrupted_byte_is_detected_on_both_paths() -> None:
    backend = BenchBackend(corrupt_response=3)
    s = await _stack(backend)
    try:
        conn = await s.client()
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        await session.call(1000, 10)
        await session.call(1000, 10)
        with pytest.raises(IntegrityError, match="corrupted"):
            await session.call(1000, 10)
        await conn.close()
        backend.corrupt_response = backend.calls + 2
        direct = await DirectClient.connect("127.0.0.1", backend.port)
        session = BenchSession(direct, timeout=5.0)
        await session.bind()
        await session.call(100, 100)
        with pytest.raises(IntegrityError, match="corrupted"):
            await session.call(100, 100)
        await direct.close()
    finally:
        await s.server.stop()
        await backend.stop()


async def test_damaged_request_is_reported_by_the_backend(stack: Stack) -> None:
    conn = await stack.client()
    try:
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        await session.call(10, 10)
        session.seq += 1  # skip a sequence number: the backend sees a gap
        with pytest.raises(IntegrityError, match="damaged request"):
            await session.call(10, 10)
        # A flipped payload byte in a request.
        session.seq += 1
        raw = bytearray(bp.build_request_stub(session.seq, 10, 100))
        raw[-1] ^= 0xFF
        await conn.send_pdu(dcerpc.build_request(99, bp.OPNUM_EXCHANGE, bytes(raw)))
        reply = await conn.recv_pdu(5.0)
        assert dcerpc.parse_fault(reply) == bp.FAULT_BAD_CRC
    finally:
        await conn.close()


async def test_stalled_stream_fails_instead_of_hanging() -> None:
    backend = BenchBackend(stall_after=2)
    s = await _stack(backend)
    try:
        conn = await s.client(timeout=1.0)
        session = BenchSession(conn, timeout=1.0)
        await session.bind()
        async with asyncio.timeout(10):
            with pytest.raises(RpchTimeout):
                await session.stream(want=1000, length=1000, depth=2, count=100)
        assert conn.error is not None
        with pytest.raises(RpchTimeout):  # the connection stays failed
            await conn.send_pdu(b"")
        await conn.close()
    finally:
        await s.server.stop()
        await backend.stop()


async def test_in_window_that_never_reopens_times_out() -> None:
    """A fake proxy that opens the VC but never acknowledges IN traffic."""
    from rpcproxy.rpch import rts

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"RPC_OUT_DATA"):
            await reader.readexactly(76)
            writer.write(b"HTTP/1.1 200 Success\r\nContent-Type: application/rpc\r\n"
                         b"Content-Length: 1073741824\r\n\r\n"
                         + rts.conn_a3(120_000) + rts.conn_c2(0x2000, 120_000))
        await asyncio.sleep(30)

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await RpchClient.connect("127.0.0.1", port, target=TARGET, timeout=1.0)
        await conn.send_pdu(b"x" * 0x2000)  # fills the 8 KiB window exactly
        async with asyncio.timeout(10):
            with pytest.raises(RpchTimeout, match="window"):
                await conn.send_pdu(b"y" * 100)
        await conn.close()
    finally:
        server.close()


async def test_http_errors_raise_with_status_and_code() -> None:
    s = await _stack(BenchBackend(), auth=BenchAuthenticator(password="right"))
    try:
        with pytest.raises(HttpStatusError) as info:
            await s.client(auth=BasicAuth("alice", "wrong"))
        assert info.value.status == 401
        with pytest.raises(HttpStatusError) as info:
            await RpchClient.connect(s.host, s.port, target="elsewhere:6001",
                                     auth=BasicAuth("alice", "right"), timeout=5.0)
        assert info.value.status == 503 and info.value.rpc_error == 0x6BA
        assert "elsewhere:6001" in str(info.value)  # the proxy's reason, from the body
        conn = await s.client(auth=BasicAuth("alice", "right"), expect_continue=True,
                              http_version="1.0")
        await conn.close()
    finally:
        await s.server.stop()
        await s.backend.stop()


async def test_ntlm_handshake_over_keep_alive_connections() -> None:
    auth = BenchAuthenticator(ntlm_users={("BENCH", "bob"): "secret"})
    s = await _stack(BenchBackend(), auth=auth, out_content_length=1 << 20)
    try:
        conn = await s.client(auth=NtlmAuth("bob", "secret", "BENCH"))
        session = BenchSession(conn, timeout=5.0)
        await session.bind()
        await session.stream(want=65_480, length=16, depth=4, count=20)  # OUT successor too
        assert conn.out_recycles >= 1
        await conn.recycle_in()  # IN successor authenticates with NTLM as well
        await session.call(10, 10)
        await conn.close()
        with pytest.raises(HttpStatusError) as info:
            await s.client(auth=NtlmAuth("bob", "wrong", "BENCH"))
        assert info.value.status == 401
    finally:
        await s.server.stop()
        await s.backend.stop()
        auth.close()


def _haproxy_installed() -> bool:
    """Whether the bench's C relay (HAProxy) can run here; in CI it must (Debian package)."""
    if shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin") is not None:
        return True
    if os.environ.get("CI"):
        pytest.fail("haproxy is required in CI (Debian package haproxy)")
    return False


RELAY_SCENARIOS = ("throughput", "latency", "concurrency", "setup")
RELAY_ROW = "C relay (HAProxy TCP, splice) vs direct"
RELAY_THREADS_ROW = "C relay 2 threads / 1 thread"


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_short_run_writes_json_with_ratios(tmp_path: Path) -> None:
    """Every scenario, tiny sizes: each one's JSON carries proxy, direct and ratio.

    The concurrency scenario holds 120 VCs of the one bench user: more than a real
    deployment's default max_connections_per_user (100), which the bench's proxy lifts.
    With HAProxy installed (always in CI) the C relay runs as a third path."""
    from bench.scenarios import DEFAULT_SCENARIOS

    relay = _haproxy_installed()

    out = tmp_path / "bench.json"
    html = tmp_path / "bench.html"
    proc = _run_cli("--duration", "0.5", "--clients", "4", "--connections", "120", "--active",
                    "2", "--streams", "2", "--soak-connections", "2", "--setup-workers", "2",
                    "--aggregate-vcs", "4", "--aggregate-procs", "2",
                    "--json", str(out), "--html", str(html), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["errors"] == []
    assert list(doc["scenarios"]) == list(DEFAULT_SCENARIOS)
    assert "throughput" in DEFAULT_SCENARIOS and "aggregate" in DEFAULT_SCENARIOS
    for name, r in doc["scenarios"].items():
        assert r["proxy"] > 0 and r["direct"] > 0, name
        assert r["ratio"] == pytest.approx(r["proxy"] / r["direct"], rel=0.01), name
        assert r["unit"] and r["metric"], name
    assert doc["scenarios"]["throughput"]["unit"] == "MB/s"
    assert doc["scenarios"]["concurrency"]["details"]["connections"] == 120
    assert doc["scenarios"]["concurrency"]["rss_per_vc_kib"] is not None
    assert doc["scenarios"]["concurrency"]["rss_per_used_vc_kib"] is not None
    assert "once it carried 64 KiB each way" in proc.stdout
    assert doc["config"]["tls"] is False and doc["tls"]["proxy"] == ["plain"]
    assert doc["machine"]["cores"] >= 1
    page = html.read_text()
    assert "<svg" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "throughput" in proc.stdout  # the terminal table
    _check_aggregate(doc["scenarios"]["aggregate"], vcs=4, procs=2, relay=relay)
    assert "2 workers / 1 worker" in proc.stdout
    if relay:
        _check_relay(doc, proc.stdout)
    else:
        assert RELAY_THREADS_ROW not in proc.stdout


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_cli_tls_runs_every_path_over_tls(tmp_path: Path, version: str) -> None:
    """``--tls``: the proxy and the C relay terminate TLS (the negotiated version is what the
    bench's clients, holders included, saw), the direct path stays plain; every scenario
    keeps its figures, and concurrency its RSS per VC."""
    relay = _haproxy_installed()
    out = tmp_path / "bench.json"
    scenarios = ("throughput,aggregate,latency,concurrency,setup,soak" if version == "1.3"
                 else "concurrency,setup")
    proc = _run_cli("--tls", "--tls-version", version, "--scenarios", scenarios,
                    "--duration", "0.5", "--clients", "2", "--connections", "40", "--active",
                    "2", "--streams", "2", "--soak-connections", "2", "--setup-workers", "2",
                    "--aggregate-vcs", "2", "--aggregate-procs", "1", "--aggregate-workers", "1",
                    "--json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["config"]["tls"] is True
    want = f"TLSv{version}"
    assert doc["tls"]["proxy"] == [want] and doc["tls"]["direct"] == ["plain"]
    if relay:
        assert doc["tls"]["relay"] == [want]
        assert "ssl crt" in doc["machine"]["relay"]["mode"]
    assert list(doc["scenarios"]) == scenarios.split(",")
    for name, r in doc["scenarios"].items():
        assert r["proxy"] > 0 and r["direct"] > 0 and r["ratio"] > 0, name
        if relay and name in RELAY_SCENARIOS:
            assert r["relay"] > 0 and r["proxy_vs_relay"] > 0, name
    conc = doc["scenarios"]["concurrency"]
    assert conc["rss_per_vc_kib"] == conc["details"]["proxy"]["rss_per_vc_kib"]
    assert conc["rss_per_vc_kib"] is not None
    assert conc["rss_per_used_vc_kib"] == conc["details"]["proxy"]["rss_per_used_vc_kib"]
    assert conc["rss_per_used_vc_kib"] is not None
    if relay:
        assert conc["relay_rss_per_conn_kib"] is not None


def test_cli_tls_needs_the_self_contained_mode() -> None:
    proc = _run_cli("--tls", "--url", "https://127.0.0.1:1/rpc/rpcproxy.dll")
    assert proc.returncode == 2 and "--tls" in proc.stderr


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("max_version", ["", "1.2", "1.3"])
def test_tls_client_context(verify: bool, max_version: str) -> None:
    """The one context of the CLI, the --url path and the holders: TLS 1.2 or later, at most
    --tls-version; verifying (host name and chain) unless told not to."""
    ctx = client_context(verify=verify, max_version=max_version)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == {"": ssl.TLSVersion.MAXIMUM_SUPPORTED,
                                   "1.2": ssl.TLSVersion.TLSv1_2,
                                   "1.3": ssl.TLSVersion.TLSv1_3}[max_version]
    assert ctx.check_hostname is verify
    assert ctx.verify_mode == (ssl.CERT_REQUIRED if verify else ssl.CERT_NONE)


def _check_relay(doc: dict[str, Any], table: str) -> None:
    """The C relay's figures in the relay-aware scenarios, none in aggregate and soak."""
    assert doc["config"]["relay_ran"] is True and doc["config"]["relay"] == "auto"
    assert doc["machine"]["relay"]["version"].startswith("HAProxy version ")
    for name in RELAY_SCENARIOS:
        r = doc["scenarios"][name]
        assert r["relay"] > 0, name
        assert r["relay_ratio"] == pytest.approx(r["relay"] / r["direct"], rel=0.01), name
        assert r["proxy_vs_relay"] == pytest.approx(r["proxy"] / r["relay"], rel=0.01), name
        assert "relay" in r["cpu" if name != "latency" else "cpu_at_max_clients"], name
    for name in ("aggregate", "soak"):
        assert "relay" not in doc["scenarios"][name], name
    # The relay's own CPU is counted as the relay's, not as the load generator's.
    cpu = doc["scenarios"]["throughput"]["cpu"]
    assert cpu["relay"]["relay_cpu"] > 0 and cpu["direct"]["relay_cpu"] == 0
    for level in doc["scenarios"]["latency"]["levels"].values():
        assert level["relay"]["p99_us"] > 0 and "p99_us" in level["relay_ratio"]
    conc = doc["scenarios"]["concurrency"]["details"]
    assert conc["relay"]["active_latency"]["calls"] > 0 and conc["relay"]["fds"] > 120
    lines = [line for line in table.splitlines() if RELAY_ROW in line]
    assert len(lines) == len(RELAY_SCENARIOS), table
    r = doc["scenarios"]["throughput"]
    assert f"{r['relay_ratio']:.3g}" in lines[0]  # relay / direct in the ratio column
    # The aggregate scenario's relay with 1 and 2 threads: MB/s rows and 2 threads / 1.
    agg = doc["scenarios"]["aggregate"]
    lines = [line for line in table.splitlines() if RELAY_THREADS_ROW in line]
    assert len(lines) == 1 and lines[0].split()[-2:] == [
        f"{agg['relay_threads_ratio']:.3g}", "x"], table
    for threads, key in ((1, "relay_1t"), (2, "relay_2t")):
        label = ["C", "relay", str(threads), "threads" if threads > 1 else "thread"]
        row = [cells for cells in (line.split() for line in table.splitlines())
               if cells[:4] == label and cells[4:5] != ["/"]]
        assert len(row) == 1 and row[0][-1] == "MB/s", table
        # its MB/s in the proxy column, direct's next to it (as the proxy worker rows)
        assert float(row[0][-4].replace(",", "")) == pytest.approx(agg[key], rel=0.01), table
        assert float(row[0][-3].replace(",", "")) == pytest.approx(agg["direct"], rel=0.01)


def test_cli_outlook_client_window_streams_64k_fragments(tmp_path: Path) -> None:
    """``--client-window 0x10000`` (Outlook's default) with the stub's 65,528-byte fragments,
    through the bench's own clients (throughput) and holder processes (concurrency's
    streaming VCs, aggregate): a whole fragment does not fit the window after the BIND_ACK,
    and a proxy that waits for an ack the client only sends past half its window stalls."""
    out = tmp_path / "bench.json"
    proc = _run_cli("--duration", "0.3", "--scenarios", "throughput,concurrency,aggregate",
                    "--client-window", "0x10000", "--connections", "4", "--active", "1",
                    "--streams", "2", "--aggregate-vcs", "2", "--aggregate-procs", "1",
                    "--aggregate-workers", "1", "--relay", "none", "--timeout", "3",
                    "--json", str(out), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["errors"] == []
    assert doc["config"]["client_window"] == 0x10000
    assert "client receive window 0x10000 (64 KiB)" in proc.stderr
    for name, r in doc["scenarios"].items():
        assert r["proxy"] > 0 and r["direct"] > 0, name


def test_client_window_reaches_holders_and_is_bounded() -> None:
    """The window travels to holder processes in their JSON spec; out-of-range values are
    usage errors (exit 2)."""
    from dataclasses import asdict

    from bench.cli import build_parser
    from bench.holder import HolderSpec
    from bench.scenarios.base import Bench, ProxyTarget, holder_specs

    bench = Bench(ProxyTarget("127.0.0.1", 1, TARGET, auth=BasicAuth("u", "p")), None, 1.0,
                  print, client_window=0x10000)
    spec, = holder_specs(bench, "proxy", 3)
    assert spec.receive_window == 0x10000
    assert HolderSpec(**json.loads(json.dumps(asdict(spec)))) == spec
    assert HolderSpec("proxy", "h", 1, 1).receive_window == 0x40000
    parser = build_parser()
    assert parser.parse_args([]).client_window == 0x40000
    assert parser.parse_args(["--client-window", "0x2000"]).client_window == 0x2000
    assert parser.parse_args(["--client-window", "65536"]).client_window == 0x10000
    for bad in ("100", "0x40001", "64k"):
        proc = _run_cli("--client-window", bad, "--scenarios", "throughput", timeout=30)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "--client-window" in proc.stderr and "Traceback" not in proc.stderr, bad
        assert proc.stdout == ""


def test_cli_relay_none_measures_no_relay(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run_cli("--duration", "0.3", "--scenarios", "throughput,latency,aggregate",
                    "--clients", "2", "--aggregate-vcs", "2", "--aggregate-procs", "1",
                    "--relay", "none", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["config"]["relay_ran"] is False and doc["machine"]["relay"] is None
    for name, r in doc["scenarios"].items():
        assert not any(k.startswith("relay") or k.endswith("relay") for k in r), name
        assert r["proxy"] > 0 and r["direct"] > 0, name
    assert "relay" not in doc["scenarios"]["latency"]["levels"]["1"]
    agg = doc["scenarios"]["aggregate"]
    assert list(agg["paths"]) == ["proxy-1w", "proxy-2w", "direct"]
    assert not any(k.startswith("relay") for c in agg["cpu"].values() for k in c)
    assert "C relay" not in proc.stdout


def test_relay_config_loopback_only_and_maxconn_from_fd_limit(tmp_path: Path) -> None:
    """HAProxy wants 2 descriptors per connection and 2 per splice pipe (a quarter of
    maxconn): the generated config must fit under the hard limit it inherits, or HAProxy
    refuses to start."""
    from bench.relay import MAXCONN_CAP, RelayProcess, haproxy_config, relay_maxconn

    assert relay_maxconn(20_000) == 7960
    assert relay_maxconn(resource.RLIM_INFINITY) == MAXCONN_CAP
    for hard in (500, 1024, 20_000, 65_536):
        assert 5 * relay_maxconn(hard) // 2 + 60 <= hard
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert relay_maxconn() == relay_maxconn(hard)
    cfg = haproxy_config(40001, ("127.0.0.1", 40002), relay_maxconn(1000))
    assert cfg == haproxy_config(40001, ("127.0.0.1", 40002), relay_maxconn(1000), threads=1)
    words = [line.split() for line in cfg.splitlines() if line.strip()]
    assert [w for w in words if w[0] == "bind"] == [["bind", "127.0.0.1:40001"]]
    assert [w for w in words if w[0] == "server"] == [["server", "stub", "127.0.0.1:40002"]]
    assert ["maxconn", "360"] in words and ["maxpipes", "90"] in words
    for needed in (["mode", "tcp"], ["option", "splice-auto"], ["nbthread", "1"]):
        assert needed in words
    assert not any(w[0] in ("daemon", "user", "chroot") for w in words)
    # Threads: nbthread N and nothing else changes.
    cfg2 = haproxy_config(40001, ("127.0.0.1", 40002), relay_maxconn(1000), threads=2)
    words2 = [line.split() for line in cfg2.splitlines() if line.strip()]
    assert [w for w in words2 if w[0] == "nbthread"] == [["nbthread", "2"]]
    assert [w for w in words2 if w[0] != "nbthread"] == [w for w in words if w[0] != "nbthread"]
    with pytest.raises(ValueError):
        haproxy_config(40001, ("127.0.0.1", 40002), 100, threads=0)
    one = RelayProcess("haproxy", ("127.0.0.1", 9), maxconn=10)
    more = RelayProcess("haproxy", ("127.0.0.1", 9), maxconn=10, threads=2)
    try:
        assert (one.name, one.threads) == ("relay", 1)
        assert (more.name, more.threads) == ("relay-2t", 2)
    finally:  # never started: only their log files and temp dirs to clean up
        for made in (one, more):
            asyncio.run(made.stop())
            made.remove_log()
    if not _haproxy_installed():
        return
    # The real thing under a 1000-descriptor limit: it must start and listen.
    exe = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert exe is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config(port, ("127.0.0.1", 9), relay_maxconn(1000), threads=2))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))

    child = subprocess.Popen([exe, "-db", "-f", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, preexec_fn=low_limit)
    try:
        deadline = time.monotonic() + 10
        listening = False
        while time.monotonic() < deadline and child.poll() is None and not listening:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                listening = True
            except OSError:
                time.sleep(0.05)
        assert listening, child.communicate(timeout=5)[0] if child.poll() is not None else ""
        assert len(os.listdir(f"/proc/{child.pid}/task")) == 2  # nbthread 2: two threads
    finally:
        child.terminate()
        child.communicate(timeout=10)


def _check_aggregate(r: dict[str, Any], *, vcs: int, procs: int, relay: bool = False) -> None:
    """The aggregate scenario's JSON: 1 worker, 2 workers and direct, every figure apart;
    with the C relay also HAProxy with 1 and with 2 threads."""
    paths = r["paths"]
    assert isinstance(paths, dict)
    relays = ["relay-1t", "relay-2t"] if relay else []
    assert list(paths) == ["proxy-1w", "proxy-2w", "direct", *relays]
    assert r["vcs"] == vcs and r["load_processes"] == procs
    assert r["proxy"] == r["proxy_2w"] and r["ratio"] == r["ratio_2w"]
    for key in ("proxy_1w", "proxy_2w", "ratio_1w", "ratio_2w", "workers_ratio"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["workers_compared"] == [1, 2]
    assert r["workers_ratio"] == pytest.approx(r["proxy_2w"] / r["proxy_1w"], rel=0.02)
    assert r["ratio_1w"] == pytest.approx(r["proxy_1w"] / r["direct"], rel=0.02)
    assert paths["proxy-2w"]["vcs_per_worker"] == [vcs // 2, vcs // 2]  # balanced placement
    cpu = r["cpu"]
    assert isinstance(cpu, dict)
    for name, d in paths.items():
        assert d["calls"] > 0 and d["mb_s"] > 0, name
        c = cpu[name]
        assert len(c["loadgen_procs"]) == 1 + procs  # the bench itself + its holders
        assert len(c["backend_procs"]) == 1
        assert set(d["cpu_s_per_gb"]) == {"loadgen", "proxy", "backend", "irq",
                                          *(["relay"] if name in relays else [])}
        assert (c.get("relay_procs") == []) == (relay and name not in relays), name
    assert len(cpu["proxy-1w"]["proxy_procs"]) == 1
    assert len(cpu["proxy-2w"]["proxy_procs"]) == 3  # supervisor + 2 workers
    assert cpu["direct"]["proxy_procs"] == []
    if not relay:
        assert not any(k.startswith("relay") for k in r)
        assert not any(k.startswith("relay") for c in cpu.values() for k in c)
        return
    for key in ("relay_1t", "relay_2t", "relay_threads_ratio"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["relay_1t"] == paths["relay-1t"]["mb_s"]
    assert r["relay_2t"] == paths["relay-2t"]["mb_s"]
    assert r["relay_threads_compared"] == [1, 2]
    assert r["relay_threads_ratio"] == pytest.approx(r["relay_2t"] / r["relay_1t"], rel=0.02)
    for threads, name in ((1, "relay-1t"), (2, "relay-2t")):
        d, c = paths[name], cpu[name]
        assert d["threads"] == threads and d["workers"] is None
        assert d["ratio_vs_direct"] == pytest.approx(d["mb_s"] / r["direct"], rel=0.02)
        # HAProxy's own CPU, under "relay": one process, each of its threads apart.
        assert len(c["relay_procs"]) == 1 and c["relay_cpu"] > 0, name
        assert len(c["relay_threads"]) == threads, name
        # Its threads' CPU adds up to the process's, give or take a clock tick or two each
        # (the kernel scales a thread's and a process's tick counts apart).
        tick = 1 / os.sysconf("SC_CLK_TCK") / c["wall_s"]
        assert sum(c["relay_threads"]) == pytest.approx(c["relay_cpu"],
                                                        abs=2 * (threads + 1) * tick), name
        assert c["proxy_procs"] == [] and d["cpu_s_per_gb"]["relay"] > 0, name


def test_cli_aggregate_fails_loudly_on_corruption(tmp_path: Path) -> None:
    """A flipped byte seen by a holder process (not the bench itself) fails the run."""
    out = tmp_path / "bench.json"
    proc = _run_cli("--duration", "0.3", "--scenarios", "aggregate", "--aggregate-vcs", "2",
                    "--aggregate-procs", "2", "--inject-corrupt", "40", "--timeout", "10",
                    "--json", str(out))
    assert proc.returncode == 1
    doc = json.loads(out.read_text())
    assert doc["ok"] is False
    r = doc["scenarios"]["aggregate"]
    assert "IntegrityError" in r["error"] and "corrupted" in r["error"]
    assert r["proxy"] is None and r["direct"] is None and r["ratio"] is None


def test_cli_fails_loudly_on_corruption(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run_cli("--duration", "0.5", "--scenarios", "throughput", "--inject-corrupt", "5",
                    "--timeout", "2", "--json", str(out))
    assert proc.returncode == 1
    doc = json.loads(out.read_text())
    assert doc["ok"] is False
    assert "IntegrityError" in doc["scenarios"]["throughput"]["error"]
    assert "FAILED" in proc.stderr


def test_bottleneck_notes_judge_the_busiest_process() -> None:
    """Several load-generator (or proxy) processes are CPU-bound only when one of them is."""
    from bench.measure import bottleneck, limits_of

    spread: dict[str, float | None] = {
        "wall_s": 1.0, "loadgen_cpu": 1.3, "loadgen_processes": 3,
        "loadgen_busiest": 0.5, "proxy_cpu": 0.9, "proxy_processes": 3,
        "proxy_busiest": 0.45, "backend_cpu": 0.2, "irq_cpu": 0.1, "other_cpu": 0.0}
    note = bottleneck({"proxy": spread})
    assert "CPU-bound" not in note and "load generator" not in note
    hot = dict(spread, loadgen_busiest=0.97)
    note = bottleneck({"proxy": hot})
    assert "loadgen 97% (the busiest of its 3 processes)" in note
    assert "the load generator itself limits this figure" in note
    assert "CPU-bound: loadgen 95%" in bottleneck({"direct": {"loadgen_cpu": 0.95}})
    per_process = {"wall_s": 1.0, "loadgen_cpu": 0.9, "loadgen_procs": [0.0, 0.45, 0.45],
                   "proxy_cpu": 0.2, "proxy_procs": [0.2], "backend_cpu": 0.9,
                   "backend_procs": [0.9], "irq_cpu": 0.0, "other_cpu": 0.0}
    found = limits_of(per_process, cores=4)
    assert len(found) == 1 and found[0].startswith("backend stub (90%")
    assert any(x.startswith("the machine") for x in limits_of(per_process, cores=2))
    # The C relay: bound when one of its threads is, whatever its process's sum.
    relay = dict(per_process, backend_cpu=0.3, backend_procs=[0.3], relay_cpu=1.0,
                 relay_procs=[1.0], relay_threads=[0.9, 0.1])
    assert limits_of(relay, cores=8) == ["C relay (90% of a core in 1 of its 2 threads)"]
    assert limits_of(dict(relay, relay_threads=[0.5, 0.5]), cores=8) == []
    one = dict(relay, relay_threads=[])
    assert limits_of(one, cores=8) == ["C relay (100% of a core, one process)"]
    assert limits_of(dict(relay, relay_cpu=0.2, relay_procs=[0.2], relay_threads=[0.2]),
                     cores=2) == []  # 1.6 cores used in all: under 90% of 2
    assert any(x.startswith("the machine") for x in limits_of(relay, cores=2))


def test_one_cpu_meter_sums_parts_and_keeps_processes_apart() -> None:
    """bench.measure.CpuMeter: the parts' sums (what bottleneck reads) and every process
    apart (what limits_of reads) from the same slices; a part without processes is None."""
    from bench.measure import CpuMeter

    meter = CpuMeter({"loadgen": [os.getpid()], "proxy": []}, shown=("loadgen", "proxy"))
    for _ in range(2):  # alternating slices add up
        meter.start()
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:
            pass
        meter.pause()
    summed, apart = meter.result(), meter.per_process()
    assert summed["wall_s"] == apart["wall_s"] and (summed["wall_s"] or 0) >= 0.1
    assert summed["proxy_cpu"] is None and apart["proxy_cpu"] is None
    assert apart["proxy_procs"] == [] and summed["loadgen_processes"] == 1
    assert apart["loadgen_procs"] == [summed["loadgen_cpu"]] == [summed["loadgen_busiest"]]
    assert {"irq_cpu", "other_cpu"} <= summed.keys() & apart.keys()


async def test_one_head_reader_for_bench_and_tests() -> None:
    """bench.http_head reads every response head (rpch_raw and rawhttp use it): repeated
    headers kept, names lower-cased; a closed or broken head is an RpchError."""
    from bench.http_head import RpchClosed, RpchProtocolError, parse_head, read_head
    from tests.support.rpch_raw import Head

    raw = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\nwww-authenticate: Basic\r\n\r\n"
    head = parse_head(raw, "t")
    assert (head.version, head.status, head.reason) == ("HTTP/1.1", 401, "Unauthorized")
    assert head.get_all("WWW-Authenticate") == ["NTLM", "Basic"]
    assert Head.of(head).headers == {"www-authenticate": "Basic"}
    with pytest.raises(RpchProtocolError):
        parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "t")
    for data, error in ((b"", RpchClosed), (b"HTTP/1.1 2", RpchProtocolError)):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        with pytest.raises(error):
            await read_head(reader, "t")


async def test_backend_echo_mode_and_authenticator_table_mode() -> None:
    """The tests' EchoBackend and TableAuthenticator are bench's stub and authenticator."""
    from tests.support.fakes import EchoBackend, TableAuthenticator, basic, request_pdu

    backend = BenchBackend(echo=True)
    port = await backend.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        call = request_pdu(7, b"abcdefgh")
        bind = bytearray(request_pdu(8, b""))
        bind[2] = PType.BIND  # not a real BIND: echo mode only swaps the PDU type
        w.write(call + bind)
        answer = await asyncio.wait_for(r.readexactly(len(call) + len(bind)), 5)
        assert answer[:len(call)] == call[:2] + bytes([PType.RESPONSE]) + call[3:]
        assert answer[len(call) + 2] == PType.BIND_ACK and backend.accepted == 1
        assert backend.received == call + bind
        w.close()
    finally:
        await backend.stop()
    assert isinstance(EchoBackend().stub, BenchBackend)
    auth = TableAuthenticator()
    assert isinstance(auth, BenchAuthenticator)
    ok = await auth.authenticate(object(), basic("alice", "pw-alice"), tls=False)
    assert isinstance(ok, Authenticated) and ok.identity == Identity("alice", "TEST")
    for name in ("Alice", "TEST\\alice"):  # the table's names exactly, nothing normalised
        denied = await auth.authenticate(object(), basic(name, "pw-alice"), tls=False)
        assert isinstance(denied, Denied), name
    auth.forget(object())
    assert auth.forgotten == 1


@pytest.mark.samba
def test_cli_storm_through_real_ntlm_counts_refused_logins(tmp_path: Path,
                                                           samba_dc: SambaDC) -> None:
    """The storm scenario opens VCs at once through winbind: with the right password none
    fails; an injected wrong password is counted as a failure. The Samba-alone baseline is
    reported as the direct figure, and the setup scenario reports it too."""
    helper = shlex.join(samba_dc.ntlm_helper())
    common = ("--scenarios", "storm", "--ntlm-helper", helper, "--ntlm-helpers", "4",
              "--user", "testuser", "--password", samba_dc.users["testuser"],
              "--domain", "EXAMPLE", "--relay", "none", "--storm-vcs", "30")
    out = tmp_path / "storm.json"
    proc = _run_cli(*common, "--json", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    storm = json.loads(out.read_text())["scenarios"]["storm"]
    assert (storm["vcs"], storm["opened"], storm["failures"]) == (30, 30, 0), storm
    assert storm["direct"] > 0 and storm["samba"]["failed"] == 0
    assert storm["ratio"] == round(storm["proxy"] * 2 / storm["direct"], 3)
    proc = _run_cli(*common, "--storm-wrong-passwords", "1", "--json", str(out), timeout=240)
    assert proc.returncode == 1  # a failed login fails the run
    doc = json.loads(out.read_text())
    storm = doc["scenarios"]["storm"]
    assert (storm["opened"], storm["failures"]) == (29, 1), storm
    assert sum(storm["failure_kinds"].values()) == 1, storm  # named, e.g. the 401's close
    assert doc["ok"] is False and "storm: 1 of 30 VCs failed" in doc["errors"][0]
    proc = _run_cli("--scenarios", "setup", "--duration", "0.5", "--setup-workers", "2",
                    *common[2:], "--json", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    setup = json.loads(out.read_text())["scenarios"]["setup"]
    assert setup["proxy"] > 0 and setup["samba"]["per_s"] > 0


def test_cli_throughput_at_the_least_out_content_length_recycles_and_completes(
        tmp_path: Path) -> None:
    """The stub's 65,528-byte fragments through OUT channels of the least Content-Length
    the proxy accepts: each fragment needs a fresh channel, and every one arrives (the
    issue's ``--out-content-length 65536`` recycled forever; it is now a usage error)."""
    out = tmp_path / "bench.json"
    proc = _run_cli("--duration", "0.3", "--scenarios", "throughput", "--relay", "none",
                    "--out-content-length", "70655", "--timeout", "5", "--json", str(out),
                    timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["errors"] == []
    assert doc["scenarios"]["throughput"]["proxy"] > 0
    proc = _run_cli("--out-content-length", "65536", "--scenarios", "throughput", timeout=30)
    assert proc.returncode == 2 and "at least 70655" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


async def test_samba_baseline_that_cannot_log_in_is_a_scenario_failure() -> None:
    """A helper that gives no verdict makes the baseline raise RuntimeError, which the CLI
    reports as a FAILED scenario (its JSON still written), never a traceback."""
    from bench.scenarios.storm import samba_logins_per_s

    broken = [sys.executable, "-c",
              "import sys\nfor line in sys.stdin:\n    print('BH no winbind', flush=True)"]
    with pytest.raises(RuntimeError, match="the Samba baseline login failed"):
        await samba_logins_per_s(broken, "EXAMPLE\\u", "p", logins=3, helpers=1)


@pytest.mark.parametrize("value", ["-5", "1_0", "+7", "\u0663", "12 3"])
def test_head_reader_refuses_a_content_length_int_would_take(value: str) -> None:
    from bench.http_head import RpchProtocolError, parse_head

    head = parse_head(f"HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\n".encode(), "t")
    with pytest.raises(RpchProtocolError, match="bad Content-Length"):
        _ = head.content_length


def test_cli_proxy_workers_outlive_the_stall_timeout(tmp_path: Path) -> None:
    """``--proxy-workers 2`` for longer than the supervisor's stall timeout: the bench's
    workers beat like ``rpcproxy serve``'s, so none is killed as stalled mid-run."""
    from rpcproxy.workers import stall_timeout_for

    out = tmp_path / "bench.json"
    seconds = stall_timeout_for(None) + 2
    proc = _run_cli("--scenarios", "soak", "--proxy-workers", "2", "--duration", str(seconds),
                    "--soak-connections", "2", "--relay", "none", "--keep-logs",
                    "--json", str(out), timeout=seconds + 90)
    logs = {line.split(" log: ")[0].split()[-1]: Path(line.split(" log: ")[1].strip())
            for line in proc.stderr.splitlines() if " log: " in line}
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(out.read_text())["ok"] is True
        assert "proxy" in logs, proc.stderr[-2000:]
        assert "killing it" not in logs["proxy"].read_text()
    finally:
        for log in logs.values():
            log.unlink(missing_ok=True)


def test_fds_per_vc_counts_tls_relays() -> None:
    """The concurrency scenario's descriptor check: 3 per VC, and over TLS with several
    workers the socketpair relays of the channels another worker accepted (10,000 TLS VCs
    over 2 workers need 50,000 descriptors, not 30,000)."""
    from bench.scenarios.concurrency import fds_per_vc

    assert fds_per_vc(tls=False, workers=1) == fds_per_vc(tls=True, workers=1) == 3
    assert fds_per_vc(tls=False, workers=4) == 3
    assert fds_per_vc(tls=True, workers=2) == 5
    assert fds_per_vc(tls=True, workers=4) == 6
