"""``rpcproxy check`` against the real Samba DC: all pass, and each failure in words."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from rpcproxy import certs
from rpcproxy.check import check_certificate
from rpcproxy.cli import main
from rpcproxy.config import Config
from tests.support.deploy_support import unused_port
from tests.support.samba_dc import SambaDC

pytestmark = pytest.mark.samba


def _lines(out: str) -> dict[str, str]:
    """'what' -> the whole line, for the five checks."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"^\[(?: OK |FAIL|WARN|SKIP)\] ([^:]+): ", line)
        if m:
            found[m.group(1)] = line
    return found


@pytest.fixture
def good(samba_dc: SambaDC, tmp_path: Path) -> Path:
    pair = certs.create_self_signed("mail.example.com", tmp_path / "tls")
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text(
        'listen = "127.0.0.1:8443"\n'
        f'backend = "{samba_dc.host}:{samba_dc.port}"\n'
        + samba_dc.ntlm_helper_toml() +
        'server_names = ["mail.example.com", "localhost"]\n'
        f'tls_cert = "{pair.cert_path}"\ntls_key = "{pair.key_path}"\n'
        f'[autodiscover]\nldap_url = "ldapi://{samba_dc.ldapi_path}"\n'
    )
    return conf


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str], str]:
    code = main(["check", *args])
    out = capsys.readouterr().out
    return code, _lines(out), out


def test_all_pass(samba_dc: SambaDC, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = _check(capsys, "--config", str(good), "--user", "EXAMPLE\\testuser",
                              "--password", samba_dc.users["testuser"])
    assert code == 0, out
    assert set(lines) == {"configuration", "certificate", "backend", "NTLM (winbind)",
                          "test login", "directory", "autodiscover"}
    for what in ("configuration", "backend", "NTLM (winbind)", "test login", "directory",
                 "autodiscover"):
        assert lines[what].startswith("[ OK ]"), out
    assert lines["certificate"].startswith("[ OK ]") and "self-signed" in lines["certificate"]
    assert "covers mail.example.com;" in lines["certificate"]
    assert "gives verdicts" in lines["NTLM (winbind)"]
    assert "logged in as EXAMPLE\\testuser" in lines["test login"]
    assert out.rstrip().endswith("all checks passed")


def test_backend_down(samba_dc: SambaDC, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = unused_port()
    code, lines, out = _check(capsys, "--config", str(good), "--backend", f"127.0.0.1:{port}",
                              *samba_dc.ntlm_helper_flag())
    assert code == 1
    assert lines["backend"] == (f"[FAIL] backend: cannot connect to 127.0.0.1:{port}: "
                                "Connection refused. Is Samba running with the mapiproxy "
                                "endpoint on that port? (rpcproxy provision samba)")
    assert lines["NTLM (winbind)"].startswith("[ OK ]")
    assert lines["test login"].startswith("[SKIP]")
    assert "1 check(s) failed" in out


def test_ntlm_server_down_skips_login(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = _check(capsys, "--config", str(good),
                              "--ntlm-helper", "/nonexistent/ntlm_auth",
                              "--user", "EXAMPLE\\testuser", "--password", "x")
    assert code == 1
    assert lines["NTLM (winbind)"].startswith(
        "[FAIL] NTLM (winbind): cannot start the NTLM helper '/nonexistent/ntlm_auth'")
    assert "winbindd_priv" in lines["NTLM (winbind)"]
    assert lines["test login"] == "[SKIP] test login: winbind gives no verdicts"


def test_wrong_password(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = _check(capsys, "--config", str(good), "--user", "EXAMPLE\\testuser",
                              "--password", "wrong-password")
    assert code == 1
    assert lines["test login"].startswith("[FAIL] test login: EXAMPLE\\testuser was refused: ")
    assert "wrong password" in lines["test login"]
    assert lines["NTLM (winbind)"].startswith("[ OK ]")


def test_disabled_user(samba_dc: SambaDC, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = _check(capsys, "--config", str(good), "--user", samba_dc.disabled_user,
                            "--password", samba_dc.disabled_password)
    assert code == 1 and lines["test login"].startswith("[FAIL]")


def test_expired_certificate(samba_dc: SambaDC, good: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    old = certs.create_self_signed(
        "mail.example.com", tmp_path / "old", days=30,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=400))
    code, lines, out = _check(capsys, "--config", str(good), "--tls-cert", str(old.cert_path),
                              "--tls-key", str(old.key_path))
    assert code == 1
    assert lines["certificate"].startswith(f"[FAIL] certificate: {old.cert_path} expired on ")
    assert "Outlook refuses it" in lines["certificate"]
    assert lines["backend"].startswith("[ OK ]")  # the other checks still run


def test_certificate_for_another_host(good: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    other = certs.create_self_signed("www.example.org", tmp_path / "other")
    code, lines, _ = _check(capsys, "--config", str(good), "--tls-cert", str(other.cert_path),
                            "--tls-key", str(other.key_path))
    assert code == 1
    assert lines["certificate"] == (
        f"[FAIL] certificate: {other.cert_path} does not cover mail.example.com (it covers "
        "www.example.org, autodiscover.example.org): Outlook will refuse the connection. "
        "Make one with these names (rpcproxy cert --host NAME)")
    # --host names the public name explicitly.
    code, lines, _ = _check(capsys, "--config", str(good), "--tls-cert", str(other.cert_path),
                            "--tls-key", str(other.key_path), "--host", "www.example.org")
    assert lines["certificate"].startswith("[ OK ]")


def test_key_of_another_certificate(good: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    a = certs.create_self_signed("mail.example.com", tmp_path / "a")
    b = certs.create_self_signed("mail.example.com", tmp_path / "b")
    code, lines, _ = _check(capsys, "--config", str(good), "--tls-cert", str(a.cert_path),
                            "--tls-key", str(b.key_path))
    assert code == 1
    assert lines["certificate"].startswith(f"[FAIL] certificate: cannot use certificate "
                                           f"{a.cert_path} with key {b.key_path}")


def test_invalid_configuration_stops_early(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "rpcproxy.toml"
    conf.write_text('listen = "0.0.0.0:443"\ntargets = ["mail.example.com:99999"]\n')
    code, lines, _ = _check(capsys, "--config", str(conf))
    assert code == 1
    assert lines["configuration"].startswith("[FAIL] configuration: ")
    assert "99999" in lines["configuration"]
    assert all(lines[w].startswith("[SKIP]") for w in ("certificate", "backend", "NTLM (winbind)"))
    code, lines, _ = _check(capsys, "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and "cannot read config file" in lines["configuration"]


def test_plain_http_is_a_warning(samba_dc: SambaDC, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = _check(capsys, "--backend", f"{samba_dc.host}:{samba_dc.port}",
                              *samba_dc.ntlm_helper_flag())
    assert code == 0, out
    assert lines["certificate"].startswith("[WARN] certificate: TLS is off")
    # and Autodiscover's default directory (Samba's ldapi socket) is not on this machine
    assert lines["directory"].startswith("[WARN] directory: ldapi:///var/lib/samba/")
    assert "all checks passed (2 warning(s))" in out


def test_certificate_close_to_expiry_warns(tmp_path: Path) -> None:
    pair = certs.create_self_signed("mail.example.com", tmp_path, days=5)
    cfg = Config(tls_cert=str(pair.cert_path), tls_key=str(pair.key_path),
                 server_names=["mail.example.com"])
    [result] = check_certificate(cfg, [])
    assert result.status == "[WARN]" and "renew it now" in result.message


def test_autodiscover_check_says_what_outlook_is_told(
        samba_dc: SambaDC, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = _check(capsys, "--config", str(good), "--user", "EXAMPLE\\testuser",
                              "--password", samba_dc.users["testuser"])
    assert code == 0, out
    assert lines["directory"].startswith(f"[ OK ] directory: ldapi://{samba_dc.ldapi_path} "
                                         "over the local socket, without a bind"), out
    assert "realm example.com, domain EXAMPLE" in lines["directory"]
    told = lines["autodiscover"]
    assert told.startswith("[ OK ] autodiscover: testuser@example.com: Outlook is told: user "
                           "'Test User'; EXCH server mail.example.com (ports 6001/6004/6002, "
                           "version 7383807B)"), told
    assert ("Outlook Anywhere proxy mail.example.com (SSL On, Ntlm, msstd:mail.example.com)"
            in told)


def test_autodiscover_check_failures_in_words(
        samba_dc: SambaDC, good: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(good.read_text().replace(
        "[autodiscover]\n", '[autodiscover]\nexch_server = "elsewhere.example.com"\n'
        'proxy_server = "other.example.com"\n').replace(
        f'ldap_url = "ldapi://{samba_dc.ldapi_path}"', 'ldap_url = "ldapi:///nonexistent"'))
    code, lines, out = _check(capsys, "--config", str(conf), "--user", "EXAMPLE\\testuser",
                              "--password", samba_dc.users["testuser"])
    assert code == 1, out
    assert lines["directory"].startswith("[FAIL] directory: ldapi:///nonexistent"), out
    assert "elsewhere.example.com:6001 is not on the allow-list" in lines["autodiscover"]
    assert "other.example.com is not covered by" in lines["autodiscover"]
