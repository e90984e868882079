"""``rpcproxy provision samba|user|dns``: temp smb.conf files and the real Samba DC."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from bench.dcerpc import build_bind_ack
from ntlm import HelperPool, WinbindVerifier, verify_password
from rpcproxy import check, provision
from rpcproxy.cli import main
from tests.support.samba_dc import SambaDC

GUIDE_CONF = """# Global parameters
[global]
\tserver role = active directory domain controller
\tworkgroup = EXAMPLE
\trealm = example.com
\tnetbios name = sogo
\tpassdb backend = samba4
\tdcerpc endpoint servers = epmapper, mapiproxy, dnsserver
\tdcerpc_mapiproxy:server = true

[netlogon]
\tpath = /var/lib/samba/sysvol/example.com/scripts
\tread only = No
"""


@pytest.fixture(autouse=True)
def openchange_installed(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about merging smb.conf for an OpenChange host: a modules directory
    with a mapiproxy module stands in for one (this machine's Samba has none; the refusal
    on a real Samba without it is tested in test_deploy_issue11)."""
    modules = tmp_path_factory.mktemp("samba-modules")
    (modules / "dcerpc_server").mkdir()
    (modules / "dcerpc_server" / "mapiproxy.so").write_bytes(b"")
    monkeypatch.setattr(provision, "samba_modules_dir", lambda: modules)


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.rpcproxy-*.bak"))


def _global_settings(text: str) -> dict[str, str]:
    """Effective [global] settings as Samba reads them: the last one of a key wins."""
    out: dict[str, str] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]").lower()
            continue
        if section != "global" or not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[re.sub(r"\s+", " ", key.strip().lower())] = value.strip()
    return out


# --- provision samba -------------------------------------------------------------------------


def test_samba_print_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "samba", "--port", "1030"]) == 0
    out = capsys.readouterr().out
    assert "dcerpc endpoint servers = +epmapper, +mapiproxy" in out
    assert "dcerpc_mapiproxy:server = true" in out
    assert "dcerpc_mapiproxy:interfaces = exchange_emsmdb, exchange_nsp, exchange_ds_rfr" in out
    for iface in ("exchange_emsmdb", "exchange_nsp", "exchange_ds_rfr"):
        assert f"rpc server port:{iface} = 1030" in out
    assert 'backend = "127.0.0.1:1030"' in out


def test_samba_apply_backs_up_merges_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "smb.conf"
    conf.write_text(GUIDE_CONF)
    conf.chmod(0o640)
    assert main(["provision", "samba", "--apply", str(conf)]) == 0
    out = capsys.readouterr().out
    [backup] = _backups(conf)
    assert backup.read_text() == GUIDE_CONF
    assert f"backup: {backup}" in out
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640

    merged = conf.read_text()
    settings = _global_settings(merged)
    # The admin's own endpoint servers (dnsserver) survive; mapiproxy is on.
    assert settings["dcerpc endpoint servers"] == "epmapper, mapiproxy, dnsserver"
    assert settings["dcerpc_mapiproxy:server"] == "true"
    assert settings["dcerpc_mapiproxy:interfaces"] == \
        "exchange_emsmdb, exchange_nsp, exchange_ds_rfr"
    assert settings["rpc server port:exchange_emsmdb"] == "1024"
    assert settings["rpc server port:exchange_ds_rfr"] == "1024"
    assert merged.count("dcerpc endpoint servers =") == 2  # the original, commented out
    assert "# rpcproxy provision samba replaced: dcerpc endpoint servers" in merged
    # The block sits inside [global], before [netlogon], which is untouched.
    assert merged.index(provision.BLOCK_END) < merged.index("[netlogon]")
    assert merged.endswith("[netlogon]\n\tpath = /var/lib/samba/sysvol/example.com/scripts\n"
                           "\tread only = No\n")

    # Again: nothing changes, no second backup.
    assert main(["provision", "samba", "--apply", str(conf)]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert conf.read_text() == merged
    assert len(_backups(conf)) == 1

    # Another port: the block is replaced, not duplicated.
    assert main(["provision", "samba", "--apply", str(conf), "--port", "1100"]) == 0
    again = conf.read_text()
    assert again.count(provision.BLOCK_BEGIN) == 1
    assert _global_settings(again)["rpc server port:exchange_nsp"] == "1100"
    assert _global_settings(again)["dcerpc endpoint servers"] == "epmapper, mapiproxy, dnsserver"
    assert len(_backups(conf)) == 2


def test_samba_apply_to_a_minimal_conf_uses_relative_list(tmp_path: Path) -> None:
    conf = tmp_path / "smb.conf"
    conf.write_text("[global]\n    workgroup = EXAMPLE\n    Dcerpc Endpoint Servers = -winreg\n")
    assert main(["provision", "samba", "--apply", str(conf)]) == 0
    text = conf.read_text()
    assert _global_settings(text)["dcerpc endpoint servers"] == "-winreg, +epmapper, +mapiproxy"
    assert "    dcerpc_mapiproxy:server = true" in text  # the file's own indentation


def test_samba_apply_refuses_a_file_without_global(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "smb.conf"
    conf.write_text("[homes]\n\tread only = no\n")
    assert main(["provision", "samba", "--apply", str(conf)]) == 1
    assert "no [global] section" in capsys.readouterr().err
    assert conf.read_text() == "[homes]\n\tread only = no\n"
    assert _backups(conf) == []
    assert main(["provision", "samba", "--apply", str(tmp_path / "missing.conf")]) == 1


def test_samba_merged_file_as_testparm_reads_it(tmp_path: Path) -> None:
    if shutil.which("testparm", path="/usr/bin:/usr/sbin") is None:
        if os.environ.get("CI"):
            pytest.fail("Samba's testparm is required in CI (tests/run installs samba)")
        pytest.skip("Samba's testparm is not installed")
    conf = tmp_path / "smb.conf"
    conf.write_text(GUIDE_CONF)
    assert main(["provision", "samba", "--apply", str(conf), "--port", "1031"]) == 0
    done = subprocess.run(["testparm", "--suppress-prompt", "-s", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"dcerpc endpoint servers = .*mapiproxy", done.stdout)
    assert "rpc server port:exchange_emsmdb = 1031" in done.stdout
    assert "Unknown parameter" not in done.stderr


# --- provision dns ---------------------------------------------------------------------------


def test_dns_records_and_hosts_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "dns", "--host", "mail.example.com", "--ip", "192.0.2.10"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mail\.example\.com\.\s+IN A\s+192\.0\.2\.10$", out, re.M)
    assert re.search(r"^autodiscover\.example\.com\.\s+IN CNAME mail\.example\.com\.$", out, re.M)
    assert re.search(r"^_autodiscover\._tcp\.example\.com\.\s+IN SRV\s+0 0 443 "
                     r"mail\.example\.com\.$", out, re.M)
    assert "192.0.2.10\tmail.example.com autodiscover.example.com" in out
    assert "samba-tool dns add localhost example.com autodiscover CNAME mail.example.com" in out


def test_dns_ipv6_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "dns", "--host", "mx.corp.example.org", "--ip", "2001:db8::5",
                 "--domain", "example.org"]) == 0
    out = capsys.readouterr().out
    assert "IN AAAA  2001:db8::5" in out
    assert "autodiscover.example.org." in out and "mx.corp" in out
    assert main(["provision", "dns", "--host", "mail", "--ip", "192.0.2.1"]) == 2
    assert main(["provision", "dns", "--host", "mail.example.com", "--ip", "nope"]) == 2


# --- provision user (real Samba) -------------------------------------------------------------


def _login(dc: SambaDC, user: str, password: str) -> str:
    async def login() -> str:
        verifier = WinbindVerifier(HelperPool(dc.ntlm_helper(), size=1))
        try:
            return str(await verify_password(verifier, f"{dc.domain}\\{user}", password))
        finally:
            await verifier.aclose()
    return asyncio.run(login())


def _fake_openchange(tmp_path: Path) -> tuple[Path, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "openchange-args"
    tool = bindir / "openchange_newuser"
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    tool.chmod(0o755)
    return bindir, record


@pytest.mark.samba
def test_user_created_logs_in_and_never_expires(
    samba_dc: SambaDC, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"prov{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no openchange_newuser anywhere
    code = main(["provision", "user", name, "--password", "Prov1234", "-s", str(samba_dc.smb_conf)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"[ OK ] Samba user {name} created" in out
    assert f"[ OK ] the password of {name} never expires" in out
    assert "[SKIP] openchange_newuser is not installed" in out
    assert f"openchange_newuser --create {name}" in out
    assert "Prov1234" not in out

    assert _login(samba_dc, name, "Prov1234") == f"EXAMPLE\\{name}"
    shown = subprocess.run(["samba-tool", "user", "show", name, "-s", str(samba_dc.smb_conf)],
                           capture_output=True, text=True, timeout=60,
                           env=provision._tool_env())
    assert re.search(r"^accountExpires: (0|9223372036854775807)$", shown.stdout, re.M), \
        shown.stdout

    # Again: the user exists; nothing breaks, the password stays.
    assert main(["provision", "user", name, "--password", "Other999",
                 "-s", str(samba_dc.smb_conf)]) == 0
    assert "already exists" in capsys.readouterr().out
    assert _login(samba_dc, name, "Prov1234") == f"EXAMPLE\\{name}"


@pytest.mark.samba
def test_user_with_openchange_installed(
    samba_dc: SambaDC, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir, record = _fake_openchange(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")
    name = f"oc{uuid.uuid4().hex[:8]}"
    assert main(["provision", "user", name, "--password", "Oc123456",
                 "-s", str(samba_dc.smb_conf)]) == 0
    out = capsys.readouterr().out
    assert f"[ OK ] OpenChange mailbox for {name} created" in out
    assert record.read_text().split() == ["--create", name]


@pytest.mark.samba
def test_user_failures_are_reported(samba_dc: SambaDC, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "user", "bad name!", "--password", "x"]) == 2
    assert main(["provision", "user", "someone", "--password", "x",
                 "-s", str(tmp_path / "nope.conf")]) == 1
    assert "no such smb.conf" in capsys.readouterr().out
    # The domain's password policy refuses an empty-ish password: samba-tool's reason is shown.
    code = main(["provision", "user", f"e{uuid.uuid4().hex[:8]}", "--password", "",
                 "-s", str(samba_dc.smb_conf)])
    out = capsys.readouterr().out
    assert code == 1 and "[FAIL]" in out, out


# --- provision winbind -----------------------------------------------------------------------


@pytest.mark.samba
def test_provision_winbind_against_the_dc(samba_dc: SambaDC,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["provision", "winbind", "--user", "nobody",
                 "--ntlm-helper", shlex.join(samba_dc.ntlm_helper())])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[WARN] nobody is not in winbindd_priv: run `usermod -aG winbindd_priv nobody`" in out
    assert "[ OK ] winbind gives verdicts" in out


def test_provision_winbind_without_winbind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "winbind", "--ntlm-helper", "/nonexistent/ntlm_auth"]) == 1
    assert "[FAIL] /nonexistent/ntlm_auth is not installed: apt-get install winbind" in (
        capsys.readouterr().out)
    # A helper that starts but reaches no winbindd: no verdict, said in words.
    assert main(["provision", "winbind", "--user", "root", "--ntlm-helper",
                 "ntlm_auth --helper-protocol=squid-2.5-ntlmssp "
                 "--configfile=/nonexistent/smb.conf"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] winbind gives no verdicts" in out


def test_provision_winbind_takes_the_helper_of_the_configuration_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The helper is chosen as ``rpcproxy serve`` chooses it: the flag, else ``ntlm_helper`` of
    the file (--config, else the unit's file), else the default; not the default alone."""
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text('ntlm_helper = "/nonexistent/from-file/ntlm_auth --helper-protocol=x"\n')
    assert main(["provision", "winbind", "--config", str(conf)]) == 1
    assert "[FAIL] /nonexistent/from-file/ntlm_auth is not installed" in capsys.readouterr().out
    # Without --config: the file the unit runs with, as `rpcproxy check` reads it.
    monkeypatch.setattr(check, "SERVICE_CONFIG", str(conf))
    assert main(["provision", "winbind"]) == 1
    assert "[FAIL] /nonexistent/from-file/ntlm_auth is not installed" in capsys.readouterr().out
    # The flag beats the file.
    assert main(["provision", "winbind", "--config", str(conf),
                 "--ntlm-helper", "/nonexistent/from-flag/ntlm_auth"]) == 1
    assert "[FAIL] /nonexistent/from-flag/ntlm_auth is not installed" in capsys.readouterr().out
    # A file the server would refuse is refused here too, in words.
    conf.write_text("ntlm_helper = []\n")
    assert main(["provision", "winbind", "--config", str(conf)]) == 2
    assert "configuration error: ntlm_helper must be a non-empty command" in (
        capsys.readouterr().err)


def test_verify_refuses_a_backend_that_is_not_host_port(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--backend is parsed as the proxy parses it: a port past 65535 is the admin's error
    (exit 2), not 'nothing listens on 127.0.0.1:70000'."""
    assert main(["provision", "samba", "--verify", "--backend", "127.0.0.1:70000"]) == 2
    assert "--backend '127.0.0.1:70000' is not HOST:PORT" in capsys.readouterr().err


def test_verify_reads_a_bind_ack_that_arrives_in_pieces() -> None:
    """The answer is read until its whole PDU is there (frag_length), not one recv()."""
    ack = build_bind_ack(1, 5840, 5840, 0x1234, [(0, 0, bytes(20))])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                for i in range(0, len(ack), 7):
                    conn.sendall(ack[i:i + 7])
                    time.sleep(0.02)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        ok, verdict = provision.probe_endpoint("127.0.0.1", port, plain=True, timeout=5)
        thread.join(5)
    assert ok, verdict
