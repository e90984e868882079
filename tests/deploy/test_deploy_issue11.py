"""Issue 11: what broke under a real systemd, podman and a Debian Samba without OpenChange.

Each test here failed before its fix. The parts that need a booted systemd or a container
engine are scripts (deploy/test/), run by hand; these are the parts CI can run.
"""

from __future__ import annotations

import argparse
import getpass
import http.server
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

from rpcproxy import certs, check, logs, provision, workers
from rpcproxy.cli import build_parser, main
from rpcproxy.config import config_from_args
from rpcproxy.http.handoff import WorkerSet
from tests.support.deploy_support import (
    ENTRYPOINT,
    REPO,
    NotifySocket,
    ServeProcess,
    load_entrypoint,
    unused_port,
    wait_until,
)
from tests.support.samba_dc import SambaDC

UNIT = REPO / "deploy" / "systemd" / "rpcproxy.service"


@pytest.fixture(scope="module")
def ep() -> ModuleType:
    return load_entrypoint("rpcproxy_entrypoint_11")


# --- 1. the watchdog watches the workers ------------------------------------------------------


def test_worker_watch_gates_pings_and_names_the_stalled() -> None:
    watch = workers.WorkerWatch(2, stall_timeout=2.0)
    watch.started(0, 0.0)
    assert not watch.all_alive(0.5)  # worker 1 not there yet: no ping
    watch.started(1, 0.5)
    assert watch.all_alive(1.0)
    watch.beat(0, 1.9)
    watch.beat(1, 1.9)
    assert watch.all_alive(3.8) and watch.stalled(3.8) == []
    watch.beat(1, 4.0)  # worker 0 is silent from 1.9 on
    assert watch.stalled(4.0) == [0] and not watch.all_alive(4.0)
    watch.gone(0)
    assert not watch.all_alive(4.1)
    watch.started(0, 4.2)  # respawned: pings resume
    watch.beat(0, 4.5)
    assert watch.all_alive(4.6)
    watch.beat(5, 4.6)  # unknown worker: ignored
    assert 5 not in watch.last


def test_stall_timeout_follows_watchdog() -> None:
    assert workers.stall_timeout_for(15.0) == 10.0  # WatchdogSec=30s
    assert workers.stall_timeout_for(3.0) == 2.0
    assert workers.stall_timeout_for(0.1) == workers.MIN_STALL_TIMEOUT
    assert workers.stall_timeout_for(None) == workers.STALL_TIMEOUT


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(x) for x in path.read_text().split()]
    except OSError:
        return []


def test_stopped_worker_is_killed_and_respawned(tmp_path: Path,
                                                procs: list[ServeProcess]) -> None:
    notify = NotifySocket(tmp_path)
    victim = 0
    try:
        p = ServeProcess(["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{unused_port()}",
                          "--workers", "2"],
                         env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "6000000"})
        procs.append(p)
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        wait_until(lambda: len(_children(p.proc.pid)) == 2, 20, "two workers")
        victim, other = _children(p.proc.pid)
        os.kill(victim, signal.SIGSTOP)
        p.wait_for_log(rf"worker \d \(pid {victim}\): event loop silent for [\d.]+s "
                       rf"\(limit 2s\): killing it", timeout=20)
        p.wait_for_log(rf"worker \d \(pid {victim}\) exited with -9", timeout=20)
        wait_until(lambda: len(_children(p.proc.pid)) == 2
                   and victim not in _children(p.proc.pid), 20, "a respawned worker")
        assert other in _children(p.proc.pid)
        pings = notify.count("WATCHDOG=1")
        notify.wait_for("WATCHDOG=1", timeout=20, times=pings + 1)  # pinging again
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        notify.close()
        if victim:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_pings_stop_while_a_worker_cannot_be_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that stays silent even after SIGKILL (e.g. stuck in the kernel) keeps
    WATCHDOG=1 off, so systemd's watchdog restarts the service."""
    import time

    sent: list[tuple[float, str]] = []
    started = time.monotonic()

    def worker(ws: WorkerSet) -> int:
        assert ws.heartbeat is not None
        if ws.index == 1:
            time.sleep(6.0)  # silent: never beats
            return 0
        while True:
            workers.send_heartbeat(ws.heartbeat)
            time.sleep(0.1)

    real_kill = os.kill

    def no_sigkill(pid: int, sig: int) -> None:  # pretend SIGKILL does not take
        if sig != signal.SIGKILL:
            real_kill(pid, sig)

    monkeypatch.setattr("rpcproxy.workers.os.kill", no_sigkill)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    timer = threading.Timer(8.0, real_kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = workers.supervise(2, worker, notify=lambda m: sent.append(
            (time.monotonic() - started, m)), watchdog_interval=0.5)
    finally:
        timer.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert code == 0
    pings = [t for t, m in sent if m == "WATCHDOG=1"]
    assert any(t < 1.9 for t in pings), sent  # both alive at first
    assert not [t for t in pings if 2.6 < t < 5.9], sent  # worker 1 stalled, unkillable
    assert any(t > 6.0 for t in pings), sent  # it exited and was replaced: pings again


# --- 2/3/4/5. the container entrypoint ------------------------------------------------------


def _parse(argv: list[str]) -> object:
    args = build_parser().parse_args(argv[1:])
    return config_from_args(args)


def test_file_sets_ports_env_overrides_file_defaults_last(ep: ModuleType, tmp_path: Path) -> None:
    pair = certs.create_self_signed("mail.example.net", tmp_path / "secret")
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(f'listen = "0.0.0.0:7443"\nmetrics_listen = "127.0.0.1:9191"\n'
                    f'backend = "samba:1024"\ntls_cert = "{pair.cert_path}"\n'
                    f'tls_key = "{pair.key_path}"\n')
    env = {"RPCPROXY_CONFIG": str(conf), "RPCPROXY_STATE_DIR": str(tmp_path)}
    argv = ep.plan(env)
    assert "--listen" not in argv and "--metrics-listen" not in argv
    cfg = _parse(argv)
    assert cfg.listen == "0.0.0.0:7443" and cfg.metrics_listen == "127.0.0.1:9191"  # type: ignore[attr-defined]

    env["RPCPROXY_LISTEN"] = "0.0.0.0:6443"
    cfg = _parse(ep.plan(env))
    assert cfg.listen == "0.0.0.0:6443" and cfg.metrics_listen == "127.0.0.1:9191"  # type: ignore[attr-defined]

    # No file: the image defaults, an unprivileged port inside (published as 443).
    cfg = _parse(ep.plan({"RPCPROXY_BACKEND": "samba:1024", "RPCPROXY_TLS_CERT":
                          str(pair.cert_path), "RPCPROXY_TLS_KEY": str(pair.key_path)}))
    assert cfg.listen == "0.0.0.0:8443" and cfg.metrics_listen == "0.0.0.0:9090"  # type: ignore[attr-defined]


def test_health_uses_the_files_metrics_address(ep: ModuleType, tmp_path: Path) -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conf = tmp_path / "rpcproxy.toml"
        conf.write_text(f'metrics_listen = "0.0.0.0:{server.server_address[1]}"\n')
        assert ep.health({"RPCPROXY_CONFIG": str(conf)}) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_check_in_the_container_uses_the_service_settings(ep: ModuleType, tmp_path: Path) -> None:
    pair = certs.create_self_signed("mail.example.com", tmp_path / "secret")
    env = {"RPCPROXY_BACKEND": "samba:1024", "RPCPROXY_SERVER_NAME": "mail.example.com",
           "RPCPROXY_TLS_CERT": str(pair.cert_path), "RPCPROXY_TLS_KEY": str(pair.key_path),
           "RPCPROXY_WORKERS": "2"}
    argv = ep.check_command(env, ["--user", "EX\\jdoe"])
    assert argv[:2] == ["rpcproxy", "check"]
    assert "--metrics-listen" not in argv and "--workers" not in argv
    args = build_parser().parse_args(argv[1:])
    cfg = config_from_args(args)
    assert cfg.listen == "0.0.0.0:8443" and cfg.backend == "samba:1024"
    assert cfg.tls_cert == str(pair.cert_path) and args.user == "EX\\jdoe"


def test_unreadable_mounted_key_says_what_to_do(ep: ModuleType, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pair = certs.create_self_signed("mail.example.com", tmp_path / "secret")
    real_access = os.access
    monkeypatch.setattr(ep.os, "access", lambda path, mode: (
        False if str(path) == str(pair.key_path) else real_access(path, mode)))
    env = {"RPCPROXY_BACKEND": "s:1024", "RPCPROXY_TLS_CERT": str(pair.cert_path),
           "RPCPROXY_TLS_KEY": str(pair.key_path)}
    assert ep.main(["plan"], env) == 2
    err = capsys.readouterr().err
    assert f"RPCPROXY_TLS_KEY={pair.key_path}: permission denied" in err
    assert f"chown {os.geteuid()} FILE" in err


def test_certificate_permission_error_names_user_and_fix(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pair = certs.create_self_signed("mail.example.com", tmp_path / "secret")
    key = str(pair.key_path)
    monkeypatch.setattr("rpcproxy.certs.os.access", lambda path, mode: str(path) != key)
    message = certs._unreadable(None, str(pair.cert_path), str(pair.key_path))
    assert message.startswith(f"{pair.key_path}: permission denied: rpcproxy runs as uid ")
    assert f"chown {os.geteuid()} {pair.key_path}" in message and "10001" in message


# --- 6. rpcproxy check -----------------------------------------------------------------------


def _check_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["check", *argv])


def test_check_reads_the_units_config_file_by_default(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(f'listen = "127.0.0.1:8443"\nbackend = "127.0.0.1:{unused_port()}"\n')
    monkeypatch.setattr(check, "SERVICE_CONFIG", str(conf))
    assert main(["check"]) == 1  # the backend is down
    out = capsys.readouterr().out
    assert f"[ OK ] configuration: {conf} is valid: listen 127.0.0.1:8443" in out


def test_check_explains_a_dns_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text('backend = "no-such-host.invalid:1024"\n')
    assert main(["check", "--config", str(conf)]) == 1
    out = capsys.readouterr().out
    assert "Unknown error" not in out
    assert "[FAIL] backend: cannot resolve the host name 'no-such-host.invalid'" in out
    # (NTLM goes to the local winbind through ntlm_auth: no host name to resolve there)


def test_check_password_without_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text("S3cret!\n")
    assert check.read_password(_check_args("--user", "u", "--password-file", str(pwfile))) \
        == "S3cret!"
    assert check.read_password(_check_args("--user", "u"), env={check.PASSWORD_ENV: "x y"}) \
        == "x y"
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 - no terminal
    monkeypatch.delenv(check.PASSWORD_ENV, raising=False)
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(f'backend = "127.0.0.1:{unused_port()}"\n')
    assert main(["check", "--config", str(conf), "--user", "EX\\jdoe"]) == 2
    err = capsys.readouterr().err
    assert "--password-file" in err and check.PASSWORD_ENV in err and "Traceback" not in err


def test_check_ctrl_d_at_the_prompt_is_no_traceback(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(getpass, "getpass", eof)
    monkeypatch.delenv(check.PASSWORD_ENV, raising=False)
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(f'backend = "127.0.0.1:{unused_port()}"\n')
    assert main(["check", "--config", str(conf), "--user", "EX\\jdoe"]) == 2
    assert "no password entered" in capsys.readouterr().err


# --- 7. provision samba on a Samba without OpenChange ------------------------------------------


@pytest.mark.samba
def test_provision_refuses_without_mapiproxy_and_plain_endpoint_verifies(
    samba_dc: SambaDC, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = provision.samba_modules_dir()
    assert modules is not None, "the suite's Samba has smbd"
    assert provision.mapiproxy_module(modules) is None  # Debian 12: no OpenChange
    conf = tmp_path / "smb.conf"
    shutil.copy(samba_dc.smb_conf, conf)
    before = conf.read_text()
    assert main(["provision", "samba", "--apply", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "mapiproxy endpoint server is not installed" in err
    assert "rpc server port:lsarpc = 1024" in err and "--plain" in err
    assert conf.read_text() == before
    assert list(tmp_path.glob("smb.conf.rpcproxy-*.bak")) == []

    where = f"{samba_dc.host}:{samba_dc.port}"
    # The real Samba listens there, but serves no EMSMDB: that is said plainly.
    assert main(["provision", "samba", "--verify", "--backend", where]) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] Samba endpoint: {where} answers, but not as the mapiproxy endpoint" in out
    assert main(["provision", "samba", "--verify", "--plain", "--backend", where]) == 0
    assert f"[ OK ] Samba endpoint: Samba serves a DCE/RPC endpoint on {where}" \
        in capsys.readouterr().out
    free = f"{samba_dc.host}:{unused_port()}"
    assert main(["provision", "samba", "--verify", "--plain", "--backend", free]) == 1
    assert "nothing listens on" in capsys.readouterr().out

    # The plain lines applied to the copy, then checked against the running Samba.
    assert main(["provision", "samba", "--plain", "--apply", str(conf), "--port",
                 str(samba_dc.port), "--backend", where]) == 0
    out = capsys.readouterr().out
    assert f"[ OK ] Samba endpoint: Samba serves a DCE/RPC endpoint on {where}" in out
    assert f"rpc server port:lsarpc = {samba_dc.port}" in conf.read_text()


# --- 8. journal priorities ---------------------------------------------------------------------


def test_journal_formatter_prefixes_every_line() -> None:
    fmt = logs.JournalFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    record = logging.LogRecord("rpcproxy", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert fmt.format(record) == "<3>ERROR rpcproxy: a\n<3>b"
    assert [logs.syslog_priority(n) for n in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_under_journal_stream_lines_carry_priority_not_time(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with socket.socket() as busy, out.open("w") as fh:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        st = os.fstat(fh.fileno())
        import subprocess

        from tests.support.deploy_support import child_env, serve_command

        done = subprocess.run(serve_command("serve", "--listen",
                                            f"127.0.0.1:{busy.getsockname()[1]}"),
                              env=child_env({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}),
                              stdout=subprocess.DEVNULL, stderr=fh, timeout=60, cwd=REPO)
    assert done.returncode == 1
    lines = out.read_text().splitlines()
    assert any(ln.startswith("<3>ERROR rpcproxy: rpcproxy cannot start: cannot listen")
               for ln in lines), lines
    assert all(ln.startswith("<") and not ln[3:4].isdigit() for ln in lines), lines


# --- 9. configuration errors stop the restart loop -------------------------------------------


def test_bad_key_exits_with_the_config_status(tmp_path: Path, procs: list[ServeProcess]) -> None:
    one = certs.create_self_signed("mail.example.com", tmp_path / "one")
    two = certs.create_self_signed("mail.example.com", tmp_path / "two")
    for extra in ([], ["--workers", "2"]):
        p = ServeProcess(["--listen", "127.0.0.1:0", "--tls-cert", str(one.cert_path),
                          "--tls-key", str(two.key_path), *extra])
        procs.append(p)
        assert p.wait(60) == 78, p.log
        p.wait_for_log(r"TLS certificate: cannot use certificate .* KEY_VALUES_MISMATCH")
    conf = tmp_path / "bad.toml"
    conf.write_text('lisen = "0.0.0.0:443"\n')
    p = ServeProcess(["--config", str(conf)])
    procs.append(p)
    assert p.wait(60) == 78
    p.wait_for_log(r"configuration error: config file .* unknown key 'lisen'")


def test_unit_stops_restarting_on_config_errors() -> None:
    text = UNIT.read_text()
    assert "\nRestartPreventExitStatus=78\n" in text
    assert "\nDocumentation=file:/usr/local/share/doc/rpcproxy/README.md\n" in text
    header = text[:text.index("[Unit]")]
    for step in ("rpcproxy.toml /etc/rpcproxy/rpcproxy.toml", "rpcproxy cert --host",
                 "rpcproxy check", "deploy/README.md /usr/local/share/doc/rpcproxy/README.md"):
        assert step in header, step


def test_documented_container_commands_keep_healthcheck_and_bind() -> None:
    """The doc's build keeps HEALTHCHECK (Docker format) and its run publishes 443 to the
    unprivileged port the image listens on (deploy/test/podman-image.sh runs them)."""
    doc = (REPO / "deploy" / "README.md").read_text()
    assert "podman build --format docker -f deploy/container/Containerfile" in doc
    assert "-p 443:8443" in doc and "-p 443:443" not in doc
    containerfile = (REPO / "deploy" / "container" / "Containerfile").read_text()
    assert "-p 443:443" not in containerfile and "EXPOSE 8443 9090" in containerfile
    assert 'DEFAULT_LISTEN = "0.0.0.0:8443"' in ENTRYPOINT.read_text()


def test_plain_check_in_the_container_warns_it_sees_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(check, "SERVICE_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("RPCPROXY_BACKEND", "samba:1024")
    monkeypatch.setattr(check, "run_checks", _no_checks)
    assert main(["check"]) == 0
    assert "[WARN] configuration: these are rpcproxy's built-in defaults" \
        in capsys.readouterr().out
    assert main(["check", "--backend", "samba:1024"]) == 0  # as rpcproxy-entrypoint runs it
    assert "[WARN]" not in capsys.readouterr().out


async def _no_checks(*_args: object) -> list[check.Result]:
    return []
