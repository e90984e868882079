"""The real ``rpcproxy serve`` process: sd_notify, SIGTERM, SIGHUP reload, metrics, health."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from pathlib import Path

import pytest

from dcerpc.pdu import PType
from rpcproxy import certs
from tests.support.deploy_support import (
    NotifySocket,
    ServeProcess,
    basic_auth,
    http_get,
    metric_value,
    open_vc,
    refused_channel,
    unused_port,
    wait_until,
)
from tests.support.samba_dc import SambaDC


def _serve(procs: list[ServeProcess], *args: str, env: dict[str, str] | None = None
           ) -> ServeProcess:
    p = ServeProcess(["--listen", "127.0.0.1:0", *args], env=env)
    procs.append(p)
    return p


# --- sd_notify and SIGTERM ---------------------------------------------------------------------


def test_notify_ready_then_stopping(tmp_path: Path, procs: list[ServeProcess]) -> None:
    notify = NotifySocket(tmp_path)
    try:
        p = _serve(procs, "--backend", f"127.0.0.1:{unused_port()}",
                   env={"NOTIFY_SOCKET": notify.env_value})
        notify.wait_for("READY=1")
        # READY means listening: the port accepts now.
        with socket.create_connection(("127.0.0.1", p.port()), timeout=5):
            pass
        assert notify.index_of("STOPPING=1") == -1
        p.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert p.wait(30) == 0
        assert notify.index_of("READY=1") < notify.index_of("STOPPING=1")
        ready = notify.messages[notify.index_of("READY=1")]
        assert "STATUS=serving HTTP on 127.0.0.1:" in ready
    finally:
        notify.close()


def test_notify_abstract_socket_and_watchdog(tmp_path: Path, procs: list[ServeProcess]) -> None:
    notify = NotifySocket(tmp_path, abstract=True)
    try:
        p = _serve(procs, env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "200000"})
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", times=3)  # repeated while running
        p.signal(signal.SIGINT)
        notify.wait_for("STOPPING=1")
        assert p.wait(30) == 0
    finally:
        notify.close()


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path, procs: list[ServeProcess]) -> None:
    notify = NotifySocket(tmp_path)
    try:
        p = _serve(procs, env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "100000",
                               "WATCHDOG_PID": "1"})
        notify.wait_for("READY=1")
        p.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert p.wait(30) == 0
        assert "WATCHDOG=1" not in notify.messages
    finally:
        notify.close()


def test_start_failure_exits_1_with_reason(procs: list[ServeProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = ServeProcess(["--listen", f"127.0.0.1:{port}"])
        procs.append(p)
        assert p.wait(30) == 1
        p.wait_for_log(rf"cannot start: cannot listen on 127\.0\.0\.1:{port}")


# --- with the real Samba DC ------------------------------------------------------------------


def _write_config(path: Path, dc: SambaDC, targets: list[str], extra: str = "") -> None:
    rules = ", ".join(f'"{t}"' for t in targets)
    path.write_text(
        f'backend = "{dc.host}:{dc.port}"\n'
        + dc.ntlm_helper_toml() +
        f"targets = [{rules}]\n"
        "basic_over_http = true\n"
        "setup_timeout = 2.0\n" + extra
    )


def _auth(dc: SambaDC) -> str:
    return basic_auth(f"{dc.domain}\\testuser", dc.users["testuser"])


@pytest.mark.samba
def test_sigterm_closes_live_vc_and_exits(samba_dc: SambaDC, tmp_path: Path,
                                          procs: list[ServeProcess]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    _write_config(conf, samba_dc, ["mail.example.com:6001"])
    notify = NotifySocket(tmp_path)
    p = _serve(procs, "--config", str(conf), env={"NOTIFY_SOCKET": notify.env_value})
    port = p.port()
    notify.wait_for("READY=1")

    async def scenario() -> bytes:
        vc = await open_vc("127.0.0.1", port, "mail.example.com:6001", _auth(samba_dc))
        try:
            assert (await vc.bind_mgmt())[2] == PType.BIND_ACK
            out = await vc.out_stream()
            p.signal(signal.SIGTERM)
            # The proxy ends the OUT response: the client sees end of stream.
            async with asyncio.timeout(20):
                return await out.read()
        finally:
            vc.close()

    rest = asyncio.run(scenario())
    assert rest == b"" or len(rest) < 1 << 16
    assert p.wait(30) == 0
    notify.wait_for("STOPPING=1")
    p.wait_for_log(r"shutting down: closing 1 virtual connection")
    p.wait_for_log(r"vc=\S+ closed user=EXAMPLE\\testuser .* how=server shutting down")
    notify.close()


@pytest.mark.samba
def test_sighup_adds_target_keeps_live_vc_and_cli_overrides(
    samba_dc: SambaDC, tmp_path: Path, procs: list[ServeProcess]
) -> None:
    conf = tmp_path / "rpcproxy.toml"
    # The file names an NTLM helper that does not exist; --ntlm-helper on the command line
    # overrides it, and must still do so after the reload.
    def write_bogus(targets: list[str]) -> None:
        _write_config(conf, samba_dc, targets)
        conf.write_text(conf.read_text().replace(samba_dc.ntlm_helper_toml(),
                                                 'ntlm_helper = ["/nonexistent/ntlm_auth"]\n'))

    write_bogus(["mail.example.com:6001"])
    notify = NotifySocket(tmp_path)
    p = _serve(procs, "--config", str(conf), *samba_dc.ntlm_helper_flag(),
               "--metrics-listen", "127.0.0.1:0", env={"NOTIFY_SOCKET": notify.env_value})
    port, mport = p.port(), p.metrics_port()
    notify.wait_for("READY=1")
    auth = _auth(samba_dc)

    async def scenario() -> None:
        live = await open_vc("127.0.0.1", port, "mail.example.com:6001", auth)
        try:
            status, body = await refused_channel("127.0.0.1", port, "new.example.com:6001", auth)
            assert status.startswith("HTTP/1.1 503"), (status, body)
            assert "not on the allow-list" in body

            write_bogus(["mail.example.com:6001", "new.example.com:6001"])
            mark = p.line_count()
            notify.messages.clear()
            p.signal(signal.SIGHUP)
            await asyncio.to_thread(p.wait_for_log, r"configuration reloaded \(targets\)",
                                    20, mark)
            await asyncio.to_thread(notify.wait_for, "READY=1")
            assert any("RELOADING=1" in m.split("\n") for m in notify.messages)

            # The new rule works (and authentication still goes to --ntlm-helper).
            fresh = await open_vc("127.0.0.1", port, "new.example.com:6001", auth)
            try:
                assert (await fresh.bind_mgmt())[2] == PType.BIND_ACK
            finally:
                fresh.close()
            # The VC opened before the reload still carries RPC both ways.
            assert (await live.bind_mgmt())[2] == PType.BIND_ACK
        finally:
            live.close()

    asyncio.run(scenario())
    status, text = http_get(mport, "/metrics")
    assert metric_value(text, "rpcproxy_config_reloads_total", 'result="ok"') == 1


@pytest.mark.samba
def test_sighup_with_broken_config_keeps_running_config(
    samba_dc: SambaDC, tmp_path: Path, procs: list[ServeProcess]
) -> None:
    conf = tmp_path / "rpcproxy.toml"
    _write_config(conf, samba_dc, ["mail.example.com:6001"])
    p = _serve(procs, "--config", str(conf), "--metrics-listen", "127.0.0.1:0")
    port, mport = p.port(), p.metrics_port()
    auth = _auth(samba_dc)

    for broken in ('targets = ["mail.example.com:6001"\n',  # not TOML
                   'targets = ["new.example.com:99999"]\n',  # invalid rule
                   'tls_cert = "/nonexistent.pem"\n'):  # half a TLS pair
        conf.write_text(broken)
        mark = p.line_count()
        p.signal(signal.SIGHUP)
        p.wait_for_log(r"reload failed, keeping the running configuration", 20, mark)

    async def scenario() -> None:
        vc = await open_vc("127.0.0.1", port, "mail.example.com:6001", auth)
        try:
            assert (await vc.bind_mgmt())[2] == PType.BIND_ACK
        finally:
            vc.close()

    asyncio.run(scenario())
    _, text = http_get(mport, "/metrics")
    assert metric_value(text, "rpcproxy_config_reloads_total", 'result="failed"') == 3
    assert metric_value(text, "rpcproxy_config_reloads_total", 'result="ok"') == 0


def test_sighup_restart_only_settings_are_kept(tmp_path: Path, procs: list[ServeProcess]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text('listen = "127.0.0.1:0"\n')
    p = ServeProcess(["--config", str(conf)])
    procs.append(p)
    port = p.port()
    conf.write_text(f'listen = "127.0.0.1:{unused_port()}"\nlog_level = "debug"\n')
    mark = p.line_count()
    p.signal(signal.SIGHUP)
    p.wait_for_log(r"listen changed .* restart rpcproxy to apply it", 20, mark)
    p.wait_for_log(r"configuration reloaded \(log_level\)", 20, mark)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # still on the old port


# --- certificate reload ----------------------------------------------------------------------


def _peer_fingerprint(sock: ssl.SSLSocket) -> bytes:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_sighup_reloads_certificate_without_dropping_tls_connections(
    tmp_path: Path, procs: list[ServeProcess]
) -> None:
    tls = tmp_path / "tls"
    first = certs.create_self_signed("mail.example.com", tls)
    p = _serve(procs, "--tls-cert", str(first.cert_path), "--tls-key", str(first.key_path),
               "--server-name", "mail.example.com")
    port = p.port()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="mail.example.com")

    def get(sock: ssl.SSLSocket) -> bytes:
        sock.sendall(b"GET /rpc/rpcproxy.dll HTTP/1.1\r\nHost: mail.example.com\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    old_conn = connect()
    try:
        old_cert = _peer_fingerprint(old_conn)
        assert get(old_conn).startswith(b"HTTP/1.1 405")
        certs.create_self_signed("mail.example.com", tls, overwrite=True)
        mark = p.line_count()
        p.signal(signal.SIGHUP)
        p.wait_for_log(r"TLS certificate reloaded", 20, mark)
        with connect() as new_conn:
            assert _peer_fingerprint(new_conn) != old_cert
            assert new_conn.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(
                (tls / "cert.pem").read_text())
        # The connection made before the reload still works, with its old certificate.
        assert get(old_conn).startswith(b"HTTP/1.1 405")
        assert _peer_fingerprint(old_conn) == old_cert

        # A key that does not match: reload refused, the running certificate stays.
        other = certs.create_self_signed("other.example.com", tmp_path / "other")
        (tls / "key.pem").write_bytes(other.key_path.read_bytes())
        mark = p.line_count()
        p.signal(signal.SIGHUP)
        p.wait_for_log(r"reload failed, keeping the running configuration and certificate",
                       20, mark)
        with connect() as again:
            assert again.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(
                (tls / "cert.pem").read_text())
    finally:
        old_conn.close()


@pytest.mark.samba
def test_tls_vc_with_basic_auth_and_certificate_reload(
    samba_dc: SambaDC, tmp_path: Path, procs: list[ServeProcess]
) -> None:
    """The whole path over in-process TLS: Basic (only offered over TLS), a VC, RPC."""
    tls_dir = tmp_path / "tls"
    pair = certs.create_self_signed("mail.example.com", tls_dir)
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(f'backend = "{samba_dc.host}:{samba_dc.port}"\n'
                    + samba_dc.ntlm_helper_toml() +
                    'targets = ["mail.example.com:6001"]\n'
                    f'tls_cert = "{pair.cert_path}"\ntls_key = "{pair.key_path}"\n')
    p = _serve(procs, "--config", str(conf))
    port = int(p.wait_for_log(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)").group(1))
    ctx = ssl.create_default_context(cafile=str(pair.cert_path))

    async def scenario() -> None:
        live = await open_vc("127.0.0.1", port, "mail.example.com:6001", _auth(samba_dc),
                             tls=ctx, server_hostname="mail.example.com")
        try:
            assert (await live.bind_mgmt())[2] == PType.BIND_ACK
            certs.create_self_signed("mail.example.com", tls_dir, overwrite=True)
            mark = p.line_count()
            p.signal(signal.SIGHUP)
            await asyncio.to_thread(p.wait_for_log, r"TLS certificate reloaded", 20, mark)
            # New connections need the new certificate; the live VC keeps going.
            fresh_ctx = ssl.create_default_context(cafile=str(tls_dir / "cert.pem"))
            fresh = await open_vc("127.0.0.1", port, "mail.example.com:6001",
                                  _auth(samba_dc), tls=fresh_ctx,
                                  server_hostname="mail.example.com")
            try:
                assert (await fresh.bind_mgmt())[2] == PType.BIND_ACK
            finally:
                fresh.close()
            with pytest.raises(ssl.SSLCertVerificationError):
                await open_vc("127.0.0.1", port, "mail.example.com:6001", _auth(samba_dc),
                              tls=ctx, server_hostname="mail.example.com")
            # A second BIND on the live VC: Samba answers (BIND_ACK or BIND_NAK), through.
            assert (await live.bind_mgmt())[2] in (PType.BIND_ACK, PType.BIND_NAK)
        finally:
            live.close()

    asyncio.run(scenario())


# --- metrics and health ----------------------------------------------------------------------


METRIC_NAMES = [
    "rpcproxy_virtual_connections",
    "rpcproxy_channels",
    "rpcproxy_bytes_total",
    "rpcproxy_auth_results_total",
    "rpcproxy_backend_connect_failures_total",
    "rpcproxy_vc_handshake_seconds_bucket",
    "rpcproxy_auth_seconds_bucket",
    "rpcproxy_pairing_timeouts_total",
    "rpcproxy_event_loop_lag_seconds_bucket",
    "process_resident_memory_bytes",
]


def test_health_and_metric_names(procs: list[ServeProcess]) -> None:
    p = _serve(procs, "--metrics-listen", "127.0.0.1:0")
    mport = p.metrics_port()
    assert http_get(mport, "/health") == (200, "ok\n")
    status, text = http_get(mport, "/metrics")
    assert status == 200
    for name in METRIC_NAMES:
        assert f"\n{name}" in text, name
    assert metric_value(text, "rpcproxy_virtual_connections", 'phase="opened"') == 0


@pytest.mark.samba
def test_metrics_follow_traffic(samba_dc: SambaDC, tmp_path: Path,
                                procs: list[ServeProcess]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    dead = unused_port()
    _write_config(conf, samba_dc, ["mail.example.com:6001",
                                   f"dead.example.com:6001=127.0.0.1:{dead}"],
                  "backend_connect_retries = 0\n")
    p = _serve(procs, "--config", str(conf), "--metrics-listen", "127.0.0.1:0")
    port, mport = p.port(), p.metrics_port()
    auth = _auth(samba_dc)

    def scrape() -> str:
        status, text = http_get(mport, "/metrics")
        assert status == 200
        return text

    async def scenario() -> None:
        vc = await open_vc("127.0.0.1", port, "mail.example.com:6001", auth)
        try:
            assert (await vc.bind_mgmt())[2] == PType.BIND_ACK
            text = await asyncio.to_thread(scrape)
            assert metric_value(text, "rpcproxy_virtual_connections", 'phase="opened"') == 1
            assert metric_value(text, "rpcproxy_channels", 'direction="in"') == 1
            assert metric_value(text, "rpcproxy_channels", 'direction="out"') == 1
            assert metric_value(text, "rpcproxy_bytes_total",
                                'direction="client_to_backend"') > 0
            assert metric_value(text, "rpcproxy_bytes_total",
                                'direction="backend_to_client"') > 0
            assert metric_value(text, "rpcproxy_vc_handshake_seconds_count") == 1
        finally:
            vc.close()
        # A wrong password.
        status, _ = await refused_channel("127.0.0.1", port, "mail.example.com:6001",
                                          basic_auth("EXAMPLE\\testuser", "wrong"))
        assert status.startswith("HTTP/1.1 401")
        # A backend that is down.
        with pytest.raises(Exception):  # noqa: B017 - the channel is refused one way or another
            await open_vc("127.0.0.1", port, "dead.example.com:6001", auth, timeout=20)

    asyncio.run(scenario())

    # Only an OUT channel: the pairing times out (setup_timeout = 2 s in the config).
    async def lonely_out() -> None:
        status, body = await refused_channel("127.0.0.1", port, "mail.example.com:6001", auth)
        assert status.startswith("HTTP/1.1 503") and "waiting for the other channel" in body

    asyncio.run(lonely_out())

    def settled() -> bool:
        text = scrape()
        return (metric_value(text, "rpcproxy_pairing_timeouts_total") == 1
                and metric_value(text, "rpcproxy_virtual_connections", 'phase="opened"') == 0)

    wait_until(settled, 20, "the pairing timeout and the closed VCs to show in /metrics")
    text = scrape()
    # One or two: the IN channel may arrive after the OUT channel's VC already failed.
    assert metric_value(text, "rpcproxy_backend_connect_failures_total") >= 1
    assert metric_value(text, "rpcproxy_auth_results_total",
                        'result="accepted",reason="ok"') >= 3
    assert metric_value(text, "rpcproxy_auth_results_total",
                        'result="denied",reason="bad_credentials"') == 1
    assert metric_value(text, "rpcproxy_auth_seconds_count") >= 4
    assert metric_value(text, "rpcproxy_virtual_connections_closed_total",
                        'how="pairing_timeout"') == 1
    assert metric_value(text, "rpcproxy_virtual_connections_closed_total", 'how="backend"') >= 1
    # The good VC, closed by its client; plus, in the same race as above, the dead target's
    # late IN channel, which starts a VC of its own that the refused client then closes.
    assert metric_value(text, "rpcproxy_virtual_connections_closed_total",
                        'how="client_closed"') in (1, 2)


# --- several workers under one supervisor ----------------------------------------------------


@pytest.mark.samba
def test_workers_supervisor_notify_reload_and_stop(samba_dc: SambaDC, tmp_path: Path,
                                                   procs: list[ServeProcess]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    _write_config(conf, samba_dc, ["mail.example.com:6001"])
    notify = NotifySocket(tmp_path)
    p = _serve(procs, "--config", str(conf), "--workers", "2", "--metrics-listen", "127.0.0.1:0",
               env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "200000"})
    port = p.port()
    notify.wait_for("READY=1")
    notify.wait_for("WATCHDOG=1", times=2)  # from the supervisor (the main pid)
    p.wait_for_log(r"worker 0: metrics on")
    p.wait_for_log(r"worker 1: metrics on")
    auth = _auth(samba_dc)

    async def traffic(target: str) -> None:
        vcs = [await open_vc("127.0.0.1", port, target, auth) for _ in range(6)]
        try:
            for vc in vcs:
                assert (await vc.bind_mgmt())[2] == PType.BIND_ACK
        finally:
            for vc in vcs:
                vc.close()

    asyncio.run(traffic("mail.example.com:6001"))
    _write_config(conf, samba_dc, ["new.example.com:6001"])
    mark = p.line_count()
    p.signal(signal.SIGHUP)
    p.wait_for_log(r"configuration reloaded", 20, mark)
    wait_until(lambda: p.log.count("configuration reloaded") == 2, 20, "both workers to reload")
    asyncio.run(traffic("new.example.com:6001"))
    p.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert p.wait(30) == 0
    assert notify.index_of("READY=1") < notify.index_of("STOPPING=1")
    notify.close()



def _worker_pids(pid: int) -> list[int]:
    """The supervisor's children: its workers."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _respawn_one(p: ServeProcess) -> int:
    """SIGKILL one worker; the metrics port of the worker the supervisor starts instead."""
    wait_until(lambda: len(_worker_pids(p.proc.pid)) == 2, 20, "two workers")
    victim = _worker_pids(p.proc.pid)[0]
    mark = p.line_count()
    os.kill(victim, signal.SIGKILL)
    index = p.wait_for_log(rf"worker (\d) \(pid {victim}\) exited with -9", 20, mark).group(1)
    return int(p.wait_for_log(rf"worker {index}: metrics on http://127\.0\.0\.1:(\d+)/",
                              20, mark).group(1))


def _vcs_until_worker_took(port: int, metrics: int, target: str, auth: str,
                           channels: int = 3, at_most: int = 40) -> list[tuple[float, str]]:
    """Open VCs to ``target`` (BIND to mgmt) until the worker serving metrics on ``metrics``
    has authenticated ``channels`` of their channels: the kernel gives each connection to
    either worker. Each VC: (channels that worker took, what the VC got)."""
    def logins() -> float:
        return metric_value(http_get(metrics, "/metrics")[1], "rpcproxy_auth_results_total",
                            'result="accepted",reason="ok"')

    async def one_vc() -> str:
        try:
            vc = await open_vc("127.0.0.1", port, target, auth)
        except Exception as exc:  # noqa: BLE001 - the test shows it
            return f"refused: {exc}"
        try:
            return "BIND_ACK" if (await vc.bind_mgmt())[2] == PType.BIND_ACK else "no BIND_ACK"
        finally:
            vc.close()

    answers: list[tuple[float, str]] = []
    while len(answers) < at_most and sum(took for took, _ in answers) < channels:
        before = logins()
        answer = asyncio.run(one_vc())
        answers.append((logins() - before, answer))
    return answers


@pytest.mark.samba
def test_respawned_worker_serves_what_its_siblings_reloaded(
        samba_dc: SambaDC, tmp_path: Path, procs: list[ServeProcess]) -> None:
    """A target added by a reload is served by a worker respawned afterwards, also when the
    file has become invalid since (its siblings keep the last good one): the respawned
    worker once started from the start-up configuration and refused the new target
    (503 RPC Error: 6BA) until the next SIGHUP."""
    conf = tmp_path / "rpcproxy.toml"
    _write_config(conf, samba_dc, ["mail.example.com:6001"])
    p = _serve(procs, "--config", str(conf), "--workers", "2", "--metrics-listen", "127.0.0.1:0")
    port = p.port()
    p.wait_for_log(r"worker 0: metrics on")
    p.wait_for_log(r"worker 1: metrics on")
    auth = _auth(samba_dc)

    def logged_since(mark: int, text: str) -> int:
        return sum(text in line for line in p.log.splitlines()[mark:])

    _write_config(conf, samba_dc, ["mail.example.com:6001", "new.example.com:6001"])
    mark = p.line_count()
    p.signal(signal.SIGHUP)
    wait_until(lambda: logged_since(mark, "configuration reloaded") == 2, 20,
               "both workers to reload")
    metrics = _respawn_one(p)
    answers = _vcs_until_worker_took(port, metrics, "new.example.com:6001", auth)
    assert sum(took for took, _ in answers) >= 3, answers
    assert all(answer == "BIND_ACK" for _, answer in answers), answers
    p.wait_for_log(r"worker \d respawned after a reload, applying the last configuration that "
                   r"loaded: configuration reloaded \(targets\)")

    conf.write_text("targets = [\n")  # broken TOML: each worker keeps what it serves
    mark = p.line_count()
    p.signal(signal.SIGHUP)
    wait_until(lambda: logged_since(mark, "reload failed") == 2, 20, "both reloads to fail")
    p.wait_for_log(r"supervisor: reload: the configuration does not load .*; a worker "
                   r"respawned from now on starts with the last one that loaded", 20, mark)
    metrics = _respawn_one(p)
    answers = _vcs_until_worker_took(port, metrics, "new.example.com:6001", auth)
    assert sum(took for took, _ in answers) >= 3, answers
    assert all(answer == "BIND_ACK" for _, answer in answers), answers
    page = http_get(metrics, "/metrics")[1]
    assert metric_value(page, "rpcproxy_targets_refused_total") == 0
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0
