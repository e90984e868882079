"""End to end: real RPC-over-HTTP clients -> rpcproxy -> a real Samba AD DC.

Clients: impacket's ncacn_http transport and Samba's own client library
(python3-samba, run under Debian's /usr/bin/python3 in a subprocess). The DC
is the session fixture ``samba_dc``; port 1024 stands in for the mapiproxy
endpoint (samr there demands NTLM at PKT_PRIVACY).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from impacket.dcerpc.v5 import samr, transport
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_PKT_PRIVACY

from tests.support.proxy_harness import ProxyThread, SpyBackend
from tests.support.rawhttp import RawConnection, basic_header, ntlm_request
from tests.support.samba_clients import run_with_timeout, samr_domains
from tests.support.samba_dc import SambaDC

pytestmark = pytest.mark.samba

PATH = "/rpc/rpcproxy.dll?dc1:6001"
GIB = 1 << 30


@pytest.fixture(scope="module")
def proxy(samba_dc: SambaDC) -> Iterator[ProxyThread]:
    p = ProxyThread(
        backend=f"{samba_dc.host}:{samba_dc.port}",
        ntlm_helper=samba_dc.ntlm_helper(),
        server_names=["dc1", "dc1.example.com"],
        basic_over_http=True,
    )
    yield p
    p.stop()


@pytest.fixture
def spy_proxy(samba_dc: SambaDC) -> Iterator[tuple[ProxyThread, SpyBackend]]:
    """NTLM verified by Samba, but the RPC backend is a recorder."""
    spy = SpyBackend()
    p = ProxyThread(
        backend=spy.endpoint,
        ntlm_helper=samba_dc.ntlm_helper(),
        server_names=["dc1"],
        basic_over_http=True,
    )
    yield p, spy
    p.stop()
    spy.close()


# --- success paths ---------------------------------------------------------------------------


def test_impacket_ntlm_samr_enumerate_domains(proxy: ProxyThread) -> None:
    domains = run_with_timeout(lambda: samr_domains(proxy.url, "DC1[6001]", "testuser", "Test1234"))
    assert domains == ["EXAMPLE", "BUILTIN"]


def test_impacket_basic_samr_enumerate_domains(proxy: ProxyThread) -> None:
    domains = run_with_timeout(
        lambda: samr_domains(proxy.url, "DC1[6002]", "testuser", "Test1234", basic=True)
    )
    assert domains == ["EXAMPLE", "BUILTIN"]


def test_several_virtual_connections_at_once(proxy: ProxyThread) -> None:
    results: list[object] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        user, pw = ("testuser", "Test1234") if i % 2 else ("otheruser", "Other1234")
        try:
            r: object = samr_domains(proxy.url, "DC1[6001]", user, pw)
        except Exception as exc:  # noqa: BLE001
            r = exc
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    assert results == [["EXAMPLE", "BUILTIN"]] * 6


SAMBA_CLIENT = textwrap.dedent(
    """
    import sys
    from samba import param, credentials
    from samba.dcerpc import samr, security
    proxy, target, user, pw, auth = sys.argv[1:6]
    lp = param.LoadParm()
    creds = credentials.Credentials()
    creds.guess(lp)
    creds.set_username(user)
    creds.set_password(pw)
    creds.set_domain("EXAMPLE")
    host, port = target.split(":")
    binding = (f"ncacn_http:{host}[{port},RpcProxy={proxy},HttpUseTls=false,"
               f"HttpAuthOption={auth},seal]")
    try:
        conn = samr.samr(binding, lp, creds)
        h = conn.Connect2(None, security.SEC_FLAG_MAXIMUM_ALLOWED)
        _, doms, _ = conn.EnumDomains(h, 0, 100)
    except Exception as exc:
        print("ERROR", exc)
        sys.exit(3)
    print("DOMAINS", ",".join(d.name.string for d in doms.entries))
    """
)


def samba_client(tmp_path: Path, proxy: ProxyThread, user: str, password: str,
                 auth: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "samba_client.py"
    script.write_text(SAMBA_CLIENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        ["/usr/bin/python3", str(script), f"127.0.0.1:{proxy.port}", "dc1:6001", user,
         password, auth],
        capture_output=True, text=True, timeout=90, env=env,
    )


@pytest.mark.parametrize("auth", ["ntlm", "basic"])
def test_samba_client_library_samr(proxy: ProxyThread, tmp_path: Path, auth: str) -> None:
    r = samba_client(tmp_path, proxy, "testuser", "Test1234", auth)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DOMAINS EXAMPLE,BUILTIN" in r.stdout


def test_samba_client_library_wrong_password(proxy: ProxyThread, tmp_path: Path) -> None:
    r = samba_client(tmp_path, proxy, "testuser", "wrong", "ntlm")
    assert r.returncode == 3, r.stdout + r.stderr


# --- failure paths: 401 and nothing reaches the backend ---------------------------------------


@pytest.mark.parametrize(
    ("user", "password"),
    [("testuser", "wrong-password"), ("nosuchuser", "Test1234"), ("disableduser", "Disabled1234")],
    ids=["wrong-password", "unknown-user", "disabled-user"],
)
@pytest.mark.parametrize("method", ["RPC_IN_DATA", "RPC_OUT_DATA"])
def test_bad_credentials_get_401_and_no_backend_bytes(
    spy_proxy: tuple[ProxyThread, SpyBackend], user: str, password: str, method: str
) -> None:
    proxy, spy = spy_proxy
    conn = RawConnection(proxy.port)
    try:
        cl = GIB if method == "RPC_IN_DATA" else 76
        resp = ntlm_request(conn, method, PATH, user, password, content_length=cl)
        assert resp.status == 401
        assert any(v.startswith("NTLM") for v in resp.header("WWW-Authenticate"))
        assert conn.is_closed(), "a failed channel request must close the connection"
    finally:
        conn.close()
    assert spy.connections == 0 and spy.received == b""


@pytest.mark.parametrize("password", ["wrong-password", ""])
def test_basic_wrong_password_401(spy_proxy: tuple[ProxyThread, SpyBackend],
                                  password: str) -> None:
    proxy, spy = spy_proxy
    conn = RawConnection(proxy.port)
    try:
        conn.send_request("RPC_OUT_DATA", PATH, basic_header("testuser", password),
                          content_length=76)
        assert conn.read_response().status == 401
    finally:
        conn.close()
    assert spy.connections == 0


def test_anonymous_ntlm_refused_by_proxy(spy_proxy: tuple[ProxyThread, SpyBackend]) -> None:
    """Samba accepts anonymous NTLM; the proxy must refuse it itself."""
    from impacket import ntlm

    proxy, spy = spy_proxy
    conn = RawConnection(proxy.port)
    try:
        t1 = ntlm.getNTLMSSPType1("", "")
        conn.send_request("RPC_OUT_DATA", PATH,
                          {"Authorization": "NTLM " + base64.b64encode(t1.getData()).decode()})
        first = conn.read_response()
        assert first.status == 401
        challenge = [v for v in first.header("WWW-Authenticate") if v.startswith("NTLM ")][0]
        t3, _ = ntlm.getNTLMSSPType3(t1, base64.b64decode(challenge[5:]), "", "", "")
        conn.send_request("RPC_OUT_DATA", PATH,
                          {"Authorization": "NTLM " + base64.b64encode(t3.getData()).decode()},
                          content_length=76)
        resp = conn.read_response()
        assert resp.status == 401
    finally:
        conn.close()
    assert spy.connections == 0


def test_impacket_wrong_password_fails(spy_proxy: tuple[ProxyThread, SpyBackend]) -> None:
    proxy, spy = spy_proxy
    with pytest.raises(Exception):  # noqa: B017 - impacket raises several kinds
        run_with_timeout(lambda: samr_domains(proxy.url, "DC1[6001]", "testuser", "nope"), 30)
    assert spy.connections == 0


def test_target_off_allow_list_refused(spy_proxy: tuple[ProxyThread, SpyBackend]) -> None:
    proxy, spy = spy_proxy
    for query in ("dc1:1024", "evil.example.org:6001", "127.0.0.1:22", "dc1:6003"):
        conn = RawConnection(proxy.port)
        try:
            resp = ntlm_request(conn, "RPC_OUT_DATA", f"/rpc/rpcproxy.dll?{query}",
                                "testuser", "Test1234", content_length=76)
            assert resp.status == 503, query
            assert resp.reason.startswith("RPC Error: "), resp.reason
            assert b"allow-list" in resp.body
        finally:
            conn.close()
    assert spy.connections == 0


def test_samba_stopped_mid_session_closes_both_channels(samba_dc: SambaDC) -> None:
    proxy = ProxyThread(backend=f"{samba_dc.host}:{samba_dc.port}", server_names=["dc1"],
                        ntlm_helper=samba_dc.ntlm_helper())
    try:
        t = transport.DCERPCTransportFactory("ncacn_http:DC1[6001]")
        t.set_rpc_proxy_url(proxy.url)
        t.set_credentials("testuser", "Test1234", "EXAMPLE")
        dce = t.get_dce_rpc()
        dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY)

        def first_call() -> object:
            dce.connect()
            dce.bind(samr.MSRPC_UUID_SAMR)
            return samr.hSamrConnect(dce)["ServerHandle"]

        handle = run_with_timeout(first_call)
        assert proxy.open_vcs() == 1
        samba_dc.stop()
        deadline = time.monotonic() + 20
        while proxy.open_vcs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.open_vcs() == 0, "the VC must end when the backend goes away"
        with pytest.raises(Exception):  # noqa: B017
            run_with_timeout(lambda: samr.hSamrEnumerateDomainsInSamServer(dce, handle), 20)
    finally:
        samba_dc.start()
        proxy.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
