"""deploy/systemd: the unit passes ``systemd-analyze verify`` and says what the issue asks."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rpcproxy import config as config_mod
from rpcproxy.cli import build_parser

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = SYSTEMD_DIR / "rpcproxy.service"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is required in CI (Debian package systemd)")
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return tool


def _settings(text: str) -> dict[str, list[str]]:
    """Unit file keys -> values in order (keys may repeat, unlike configparser's view)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _verifiable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine.

    ``systemd-analyze verify`` checks that the ExecStart binary exists; the unit names the
    production path /opt/rpcproxy/bin/rpcproxy, which a test machine does not have. A shim
    script stands in for it; everything else is verified as shipped.
    """
    shim = tmp_path / "rpcproxy"
    shim.write_text("#!/bin/sh\nexit 0\n")
    shim.chmod(0o755)
    text = UNIT.read_text() if text is None else text
    assert "ExecStart=/opt/rpcproxy/bin/rpcproxy " in text
    unit = tmp_path / "rpcproxy.service"
    unit.write_text(text.replace("ExecStart=/opt/rpcproxy/bin/rpcproxy ", f"ExecStart={shim} "))
    return unit


def _verify(unit: Path) -> tuple[int, str]:
    done = subprocess.run([_analyze(), "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    code, output = _verify(_verifiable_copy(tmp_path))
    assert code == 0, output
    assert "rpcproxy.service" not in output, output  # no warning about our unit at all


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    broken = UNIT.read_text().replace("Type=notify", "Tpye=notify")
    _, output = _verify(_verifiable_copy(tmp_path, broken))
    assert "Tpye" in output


def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    done = subprocess.run([_analyze(), "security", "--offline=yes",
                           str(_verifiable_copy(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for rpcproxy\.service: ([0-9.]+)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.0, done.stdout


def test_unit_settings() -> None:
    s = _settings(UNIT.read_text())

    def one(key: str) -> str:
        assert len(s.get(key, [])) == 1, (key, s.get(key))
        return s[key][0]

    assert one("Type") == "notify"
    assert one("User") == "rpcproxy"
    assert "DynamicUser" not in s  # a provisioned system user, see rpcproxy.sysusers
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    # AF_NETLINK: ntlm_auth's getifaddrs() (the unit's comment); nothing else.
    assert one("RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX",
                                                      "AF_NETLINK"]
    assert s["SystemCallFilter"][0] == "@system-service"
    assert one("ReadOnlyPaths") == "/etc/rpcproxy"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    stop = one("TimeoutStopSec")
    assert stop.endswith("s") and 10 < int(stop[:-1]) <= 60  # above the 10 s grace
    assert one("WatchdogSec")
    assert one("KillMode") == "mixed"  # SIGTERM to the main process; workers via supervisor


def test_execstart_is_a_valid_rpcproxy_command_line() -> None:
    argv = shlex.split(_settings(UNIT.read_text())["ExecStart"][0])
    assert argv[0] == "/opt/rpcproxy/bin/rpcproxy"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == "/etc/rpcproxy/rpcproxy.toml"


def test_example_config_is_valid() -> None:
    cfg = config_mod.load(SYSTEMD_DIR / "rpcproxy.toml")
    assert cfg.listen == "0.0.0.0:443"
    assert cfg.tls_cert == "/etc/rpcproxy/cert.pem" and cfg.tls_key == "/etc/rpcproxy/key.pem"
    assert cfg.metrics_listen is not None and cfg.metrics_listen.startswith("127.0.0.1:")
    assert cfg.workers == 1


def test_sysusers_declares_the_unit_user() -> None:
    lines = [ln for ln in (SYSTEMD_DIR / "rpcproxy.sysusers").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert len(lines) == 1
    fields = shlex.split(lines[0])
    assert fields[:2] == ["u", "rpcproxy"]
