"""deploy/container: the entrypoint outside any image (no container engine here)."""

from __future__ import annotations

import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from rpcproxy import certs
from rpcproxy.cli import build_parser
from rpcproxy.config import config_from_args
from tests.support.deploy_support import (
    REPO,
    ServeProcess,
    child_env,
    http_get,
    load_entrypoint,
    unused_port,
)

CONTAINER_DIR = REPO / "deploy" / "container"
ENTRYPOINT = CONTAINER_DIR / "entrypoint.py"


@pytest.fixture(scope="module")
def ep() -> ModuleType:
    return load_entrypoint("rpcproxy_entrypoint")


def _parse(argv: list[str]):  # type: ignore[no-untyped-def]
    """The serve command line as rpcproxy itself reads it, and the config it yields."""
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    return args, config_from_args(args)


def test_env_only_generates_self_signed_cert_loudly(
    ep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "RPCPROXY_BACKEND": "samba.internal:1024",
        "RPCPROXY_SERVER_NAME": "mail.example.com, mail",
        "RPCPROXY_TARGETS": "mail.example.com:6001-6004=samba.internal:1024 mail:6001",
        "RPCPROXY_STATE_DIR": str(tmp_path),
        "RPCPROXY_LOG_FORMAT": "json",
    }
    argv = ep.plan(env)
    err = capsys.readouterr().err
    assert "WARNING" in err and "SELF-SIGNED" in err and "mail.example.com" in err

    tls = tmp_path / "tls"
    assert argv == [
        "rpcproxy", "serve", "--listen", "0.0.0.0:8443", "--backend", "samba.internal:1024",
        "--server-name", "mail.example.com", "--server-name", "mail",
        "--target", "mail.example.com:6001-6004=samba.internal:1024", "--target", "mail:6001",
        "--tls-cert", str(tls / "cert.pem"), "--tls-key", str(tls / "key.pem"),
        "--metrics-listen", "0.0.0.0:9090", "--log-format", "json",
    ]
    assert stat.S_IMODE((tls / "key.pem").stat().st_mode) == 0o600
    info = certs.inspect_certificate(tls / "cert.pem")
    assert info.dns_names == ["mail.example.com", "autodiscover.example.com", "mail"]
    certs.server_ssl_context(str(tls / "cert.pem"), str(tls / "key.pem"))  # a usable pair

    _, cfg = _parse(argv)
    assert cfg.listen == "0.0.0.0:8443" and cfg.backend == "samba.internal:1024"
    assert cfg.server_names == ["mail.example.com", "mail"]
    assert [str(r) for r in cfg.allow_list().rules] == [
        "mail.example.com:6001-6004=samba.internal:1024", "mail:6001=samba.internal:1024"]
    assert cfg.tls_cert == str(tls / "cert.pem") and cfg.metrics_listen == "0.0.0.0:9090"
    assert cfg.log_format == "json"

    # Next start: the same pair is reused (and still called out as self-signed).
    before = (tls / "key.pem").read_bytes()
    assert ep.plan(env) == argv
    assert (tls / "key.pem").read_bytes() == before
    assert "SELF-SIGNED" in capsys.readouterr().err


def test_mounted_certificate_is_used_as_is(
    ep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = certs.create_self_signed("mail.example.org", tmp_path / "secret")
    env = {"RPCPROXY_BACKEND": "10.0.0.5:1024", "RPCPROXY_TLS_CERT": str(pair.cert_path),
           "RPCPROXY_TLS_KEY": str(pair.key_path), "RPCPROXY_STATE_DIR": str(tmp_path / "st"),
           "RPCPROXY_LISTEN": "0.0.0.0:8443", "RPCPROXY_WORKERS": "2"}
    argv = ep.plan(env, ["--log-level", "debug"])
    assert "WARNING" not in capsys.readouterr().err
    assert not (tmp_path / "st").exists()
    _, cfg = _parse(argv)
    assert cfg.tls_cert == str(pair.cert_path) and cfg.tls_key == str(pair.key_path)
    assert cfg.listen == "0.0.0.0:8443" and cfg.workers == 2 and cfg.log_level == "debug"


def test_mounted_config_file(ep: ModuleType, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    pair = certs.create_self_signed("mail.example.net", tmp_path / "secret")
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(f'backend = "samba:1024"\nserver_names = ["mail.example.net"]\n'
                    f'tls_cert = "{pair.cert_path}"\ntls_key = "{pair.key_path}"\n')
    argv = ep.plan({"RPCPROXY_CONFIG": str(conf), "RPCPROXY_STATE_DIR": str(tmp_path)})
    assert "WARNING" not in capsys.readouterr().err
    assert "--tls-cert" not in argv and argv[2:4] == ["--config", str(conf)]
    _, cfg = _parse(argv)
    assert cfg.backend == "samba:1024" and cfg.tls_cert == str(pair.cert_path)

    # A config without a certificate: generated, named after the file's server name.
    conf.write_text('backend = "samba:1024"\nserver_names = ["mail.example.net"]\n')
    argv = ep.plan({"RPCPROXY_CONFIG": str(conf), "RPCPROXY_STATE_DIR": str(tmp_path)})
    assert "SELF-SIGNED" in capsys.readouterr().err
    info = certs.inspect_certificate(tmp_path / "tls" / "cert.pem")
    assert info.dns_names[:2] == ["mail.example.net", "autodiscover.example.net"]


@pytest.mark.parametrize("env, message", [
    ({}, "RPCPROXY_BACKEND is not set"),
    ({"RPCPROXY_BACKEND": "s:1024", "RPCPROXY_TLS_CERT": "/nonexistent/cert.pem"},
     "set both RPCPROXY_TLS_CERT and RPCPROXY_TLS_KEY"),
    ({"RPCPROXY_BACKEND": "s:1024", "RPCPROXY_TLS_CERT": "/nonexistent/cert.pem",
      "RPCPROXY_TLS_KEY": "/nonexistent/key.pem"},
     "RPCPROXY_TLS_CERT=/nonexistent/cert.pem: no such"),
    ({"RPCPROXY_CONFIG": "/nonexistent.toml"}, "RPCPROXY_CONFIG=/nonexistent.toml: no such file"),
])
def test_bad_settings_exit_2_with_a_reason(ep: ModuleType, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           env: dict[str, str], message: str) -> None:
    env = {"RPCPROXY_STATE_DIR": str(tmp_path), **env}
    assert ep.main([], env) == 2
    assert message in capsys.readouterr().err


# --- the entrypoint for real: exec rpcproxy serve ---------------------------------------------


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    """Stands in for the image's ``rpcproxy`` console script."""
    path = tmp_path / "rpcproxy"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                    "'import sys; from rpcproxy.cli import main; sys.exit(main())' \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def running(tmp_path: Path, shim: Path) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    env = {"RPCPROXY_BIN": str(shim), "RPCPROXY_BACKEND": f"127.0.0.1:{unused_port()}",
           "RPCPROXY_SERVER_NAME": "mail.example.com", "RPCPROXY_LISTEN": "127.0.0.1:0",
           "RPCPROXY_METRICS_LISTEN": "127.0.0.1:0", "RPCPROXY_STATE_DIR": str(tmp_path / "st")}
    p = ServeProcess([], env=env, command=[sys.executable, str(ENTRYPOINT)])
    try:
        yield p, env
    finally:
        p.close()


def test_entrypoint_execs_a_tls_proxy_with_health(
    running: tuple[ServeProcess, dict[str, str]], tmp_path: Path
) -> None:
    p, env = running
    p.wait_for_log(r"WARNING: no TLS certificate mounted")
    port = int(p.wait_for_log(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)").group(1))
    mport = p.metrics_port()

    ctx = ssl.create_default_context(cafile=str(tmp_path / "st" / "tls" / "cert.pem"))
    for name in ("mail.example.com", "autodiscover.example.com"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")

    assert http_get(mport, "/health") == (200, "ok\n")
    health_env = child_env({"RPCPROXY_METRICS_LISTEN": f"0.0.0.0:{mport}"})
    done = subprocess.run([sys.executable, str(ENTRYPOINT), "health"], env=health_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr

    # exec: the entrypoint's pid *is* the proxy, so SIGTERM reaches it directly.
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0
    p.wait_for_log(r"shutting down")

    done = subprocess.run([sys.executable, str(ENTRYPOINT), "health"], env=health_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "health check" in done.stderr


# --- the Containerfile, read by eye and by this test ------------------------------------------


def test_containerfile_shape() -> None:
    lines = [ln.strip() for ln in (CONTAINER_DIR / "Containerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[:2] == ["ARG BASE=python:3.11-slim", "FROM ${BASE}"]
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(ln.startswith("EXPOSE ") and "8443" in ln.split() for ln in instructions)
    assert 'CMD ["rpcproxy-entrypoint", "health"]' in (CONTAINER_DIR / "Containerfile").read_text()
    assert 'ENTRYPOINT ["rpcproxy-entrypoint"]' in instructions
    for ln in instructions:
        if ln.startswith("COPY "):
            for source in ln.split()[1:-1]:
                assert (REPO / source).exists(), source
