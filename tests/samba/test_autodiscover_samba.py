"""Autodiscover against the real Samba DC: Outlook-style requests over TLS, NTLM and Basic,
the directory over Samba's LDAP, exchangelib as the independent reader of the answers, and
impacket connecting to exactly the EXPR/EXCH values it was given."""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ldap3
import ldap3.core.exceptions
import pytest
import spnego
from exchangelib.autodiscover.properties import Autodiscover as ExAutodiscover
from exchangelib.version import Build

from rpcproxy import certs
from rpcproxy.autodiscover.directory import LdapDirectory, server_url
from tests.support.ntlm_tokens import anonymous_authenticate
from tests.support.pox_requests import BAD, BILLION_LAUGHS
from tests.support.proxy_harness import ProxyThread, SpyBackend
from tests.support.rawhttp import RawConnection, RawResponse
from tests.support.samba_clients import run_with_timeout, samr_domains
from tests.support.samba_dc import SambaDC

pytestmark = pytest.mark.samba

DATA = Path(__file__).parents[1] / "data" / "autodiscover"
HOST = "mail.example.com"
OTHER_LEGACY_DN = "/o=OpenChange Org/ou=First Administrative Group/cn=Recipients/cn=otheruser"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def directory_attrs(samba_dc: SambaDC) -> None:
    """A secondary proxy address for testuser, an OpenChange legacyExchangeDN for otheruser
    (Administrator's simple bind over Samba's privileged ldapi socket)."""
    server = ldap3.Server(server_url(f"ldapi://{samba_dc.ldapi_path}"))
    deadline = time.monotonic() + 30  # samba's ldap server opens after the RPC ports
    while True:
        try:
            conn = ldap3.Connection(server, user="Administrator@example.com",
                                    password=samba_dc.admin_password, auto_bind=True)
            break
        except ldap3.core.exceptions.LDAPException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        for name, changes in (
            ("testuser", {"proxyAddresses": [(ldap3.MODIFY_REPLACE,
                                              ["SMTP:test.user@example.com",
                                               "smtp:tu@example.net"])]}),
            ("otheruser", {"legacyExchangeDN": [(ldap3.MODIFY_REPLACE, [OTHER_LEGACY_DN])]}),
        ):
            # types-ldap3 leaves Connection.modify unannotated (its stub is wrong, not our call)
            dn = f"CN={name},CN=Users,DC=example,DC=com"
            assert conn.modify(dn, changes), conn.result  # type: ignore[no-untyped-call]
    finally:
        conn.unbind()


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> certs.CreatedCertificate:
    return certs.create_self_signed(HOST, tmp_path_factory.mktemp("tls"))


def make_proxy(samba_dc: SambaDC, pair: certs.CreatedCertificate, **autodiscover: Any
               ) -> ProxyThread:
    table = {"ldap_url": f"ldapi://{samba_dc.ldapi_path}", "body_timeout": 1.0,
             **autodiscover}
    return ProxyThread(backend=f"{samba_dc.host}:{samba_dc.port}", server_names=[HOST, "mail"],
                       ntlm_helper=samba_dc.ntlm_helper(),
                       tls_cert=str(pair.cert_path), tls_key=str(pair.key_path),
                       autodiscover=table)


@pytest.fixture(scope="module")
def proxy(samba_dc: SambaDC, tls_pair: certs.CreatedCertificate, directory_attrs: None
          ) -> Iterator[ProxyThread]:
    p = make_proxy(samba_dc, tls_pair, redirect_listen="127.0.0.1:0")
    yield p
    p.stop()


def ldap_operations(proxy: ProxyThread) -> int:
    def read() -> int:
        service = proxy.server.autodiscover
        directory = service.directory(service.resolved().table)
        assert isinstance(directory, LdapDirectory)
        return directory.operations

    return proxy.sync(read)


class TlsConnection(RawConnection):
    def __init__(self, port: int, cafile: Path) -> None:
        super().__init__(port)
        ctx = ssl.create_default_context(cafile=str(cafile))
        self.sock = ctx.wrap_socket(self.sock, server_hostname=HOST)


def outlook_head(path: str = "/Autodiscover/Autodiscover.xml") -> list[str]:
    lines = (DATA / "outlook2016.head").read_bytes().decode().split("\r\n")
    lines = [line for line in lines if line]
    return [f"POST {path} HTTP/1.1"] + lines[1:]


def send(conn: RawConnection, head: list[str], body: bytes,
         authorization: str | None = None, content_length: int | None = None) -> RawResponse:
    lines = list(head)
    lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    if authorization:
        lines.append(f"Authorization: {authorization}")
    conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return conn.read_response()


def request_body(address: str, name: str = "outlook2016.xml") -> bytes:
    return (DATA / name).read_bytes().replace(b"test.user@example.com", address.encode())


def ntlm_once(proxy: ProxyThread, tls_pair: Any, user: str, password: str, body: bytes
              ) -> RawResponse:
    """``ntlm`` on a TLS connection of its own, closed afterwards."""
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        return ntlm(conn, user, password, body)
    finally:
        conn.close()


def basic_once(proxy: ProxyThread, tls_pair: Any, user: str = "testuser",
               password: str = "Test1234", body: bytes | None = None,
               head: list[str] | None = None) -> RawResponse:
    """A Basic request (by default testuser's for its own settings) on a TLS connection of its
    own, closed afterwards."""
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        return send(conn, head or outlook_head(),
                    request_body("test.user@example.com") if body is None else body,
                    basic(user, password))
    finally:
        conn.close()


def ntlm(conn: RawConnection, user: str, password: str, body: bytes,
         head: list[str] | None = None, domain: str = "EXAMPLE") -> RawResponse:
    """Outlook's way: the whole request with the NEGOTIATE, again with the AUTHENTICATE."""
    head = head or outlook_head()
    client = spnego.client(user, password, hostname=HOST, protocol="ntlm")
    t1 = client.step()
    assert t1 is not None
    first = send(conn, head, body, "NTLM " + base64.b64encode(t1).decode())
    assert first.status == 401, (first.status, first.body)
    challenge = [v for v in first.header("WWW-Authenticate") if v.startswith("NTLM ")]
    assert challenge
    t3 = client.step(base64.b64decode(challenge[0][5:]))
    assert t3 is not None
    return send(conn, head, body, "NTLM " + base64.b64encode(t3).decode())


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse(resp: RawResponse) -> Any:
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.header("Content-Type")[0].startswith("text/xml")
    return ExAutodiscover.from_bytes(resp.body)


def settings_of(resp: RawResponse) -> tuple[Any, dict[str, Any]]:
    ad = parse(resp)
    ad.raise_errors()
    return ad.response, {p.type: p for p in ad.response.account.protocols}


def error_code(resp: RawResponse) -> str:
    ad = parse(resp)
    assert ad.response is None, resp.body
    return str(ad.error_response.error.code)


# --- the right password ------------------------------------------------------------------------


def test_ntlm_outlook_request_gets_settings(proxy: ProxyThread, tls_pair: Any) -> None:
    resp = ntlm_once(proxy, tls_pair, "testuser", "Test1234",
                     request_body("test.user@example.com"))
    response, protocols = settings_of(resp)
    assert set(protocols) == {"EXCH", "EXPR"}
    assert b"EXHTTP" not in resp.body  # although the request said X-MapiHttpCapability: 1
    assert response.user.display_name == "Test User"
    assert response.user.legacy_dn == (
        "/o=First Organization/ou=First Administrative Group/cn=Recipients/cn=testuser")
    assert response.user.autodiscover_smtp_address == "test.user@example.com"
    exch, expr = protocols["EXCH"], protocols["EXPR"]
    assert (exch.server, exch.port, exch.directory_port, exch.referral_port) == (
        HOST, 6001, 6004, 6002)
    assert exch.server_version == Build(14, 3, 123)
    assert exch.server_dn.endswith("/cn=Configuration/cn=Servers/cn=mail")
    assert (expr.server, expr.ssl, expr.auth_package) == (HOST, True, "Ntlm")
    assert expr.cert_principal_name == f"msstd:{HOST}"


def test_basic_outlook2010_request_and_other_address_forms(proxy: ProxyThread,
                                                           tls_pair: Any) -> None:
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        for address in ("test.user@example.com", "tu@example.net", "testuser@example.com",
                        "TestUser@EXAMPLE.com"):
            resp = send(conn, outlook_head(), request_body(address, "outlook2010.xml"),
                        basic("EXAMPLE\\testuser", "Test1234"))
            response, protocols = settings_of(resp)
            assert response.user.display_name == "Test User", address
            assert protocols["EXPR"].server == HOST
    finally:
        conn.close()


def test_upn_that_is_not_the_account_name(proxy: ProxyThread, tls_pair: Any,
                                          samba_dc: SambaDC) -> None:
    resp = ntlm_once(proxy, tls_pair, samba_dc.upn_user, samba_dc.upn_password,
                     request_body(samba_dc.upn))
    response, _ = settings_of(resp)
    assert response.user.display_name == "Jane Doe"
    assert response.user.legacy_dn.endswith(f"/cn=Recipients/cn={samba_dc.upn_user}")


def test_login_by_upn_discovers_its_own_mailbox(proxy: ProxyThread, tls_pair: Any,
                                                 samba_dc: SambaDC) -> None:
    """Logged in *with* the UPN (jane.doe@example.com), the identity is the account winbind
    resolved (upnuser), so its own mailbox is found; another account's UPN is not."""
    resp = ntlm_once(proxy, tls_pair, samba_dc.upn, samba_dc.upn_password,
                     request_body(samba_dc.upn))
    response, _ = settings_of(resp)
    assert response.user.display_name == "Jane Doe"
    # asmith asks for testuser's mailbox
    resp = ntlm_once(proxy, tls_pair, samba_dc.alias_upn, samba_dc.alias_password,
                     request_body("test.user@example.com"))
    assert b"<ErrorCode>500</ErrorCode>" in resp.body, resp.body


def test_legacy_dn_from_the_directory(proxy: ProxyThread, tls_pair: Any) -> None:
    resp = basic_once(proxy, tls_pair, "otheruser", "Other1234",
                      request_body("other.user@example.com"))
    response, _ = settings_of(resp)
    assert response.user.legacy_dn == OTHER_LEGACY_DN


def test_lower_and_upper_case_paths(proxy: ProxyThread, tls_pair: Any) -> None:
    for path in ("/autodiscover/autodiscover.xml", "/AUTODISCOVER/AUTODISCOVER.XML"):
        settings_of(basic_once(proxy, tls_pair, head=outlook_head(path)))


# --- refused before the directory ----------------------------------------------------------


def _anonymous_ntlm(conn: RawConnection, body: bytes) -> RawResponse:
    client = spnego.client("u", "p", protocol="ntlm")
    t1 = client.step()
    assert t1 is not None
    first = send(conn, outlook_head(), body, "NTLM " + base64.b64encode(t1).decode())
    assert first.status == 401
    return send(conn, outlook_head(), body,
                "NTLM " + base64.b64encode(anonymous_authenticate()).decode())


CASES: dict[str, Callable[[RawConnection, bytes], RawResponse]] = {
    "no credentials": lambda c, b: send(c, outlook_head(), b),
    "NTLM wrong password": lambda c, b: ntlm(c, "testuser", "wrong", b),
    "NTLM unknown user": lambda c, b: ntlm(c, "nosuchuser", "Test1234", b),
    "NTLM disabled user": lambda c, b: ntlm(c, "disableduser", "Disabled1234", b),
    "NTLM anonymous": _anonymous_ntlm,
    "Basic wrong password": lambda c, b: send(c, outlook_head(), b, basic("testuser", "x")),
    "Basic unknown user": lambda c, b: send(c, outlook_head(), b, basic("nosuch", "x")),
    "Basic disabled user": lambda c, b: send(c, outlook_head(), b,
                                             basic("disableduser", "Disabled1234")),
    "Kerberos token": lambda c, b: send(c, outlook_head(), b, "Negotiate YIIBkgYGKwYBBQUCoA=="),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_logins_get_401_and_never_reach_the_directory(
        proxy: ProxyThread, tls_pair: Any, case: str) -> None:
    before = ldap_operations(proxy)
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        resp = CASES[case](conn, request_body("test.user@example.com"))
    finally:
        conn.close()
    assert resp.status == 401, (resp.status, resp.body)
    offers = resp.header("WWW-Authenticate")
    assert "NTLM" in offers and any(o.startswith("Basic ") for o in offers), offers
    assert b"Autodiscover" not in resp.body
    assert ldap_operations(proxy) == before


def test_get_needs_login_then_gets_invalid_request(proxy: ProxyThread, tls_pair: Any) -> None:
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        get = ["GET /autodiscover/autodiscover.xml HTTP/1.1", f"Host: {HOST}"]
        assert send(conn, get, b"").status == 401
        assert error_code(send(conn, get, b"", basic("testuser", "Test1234"))) == "600"
    finally:
        conn.close()


# --- only one's own mailbox -----------------------------------------------------------------


@pytest.mark.parametrize("address", ["other.user@example.com", "otheruser@example.com",
                                     "jane.doe@example.com", "nobody@example.com",
                                     "test.user@other.org"])
def test_another_users_or_unknown_address_is_refused(proxy: ProxyThread, tls_pair: Any,
                                                     address: str) -> None:
    resp = ntlm_once(proxy, tls_pair, "testuser", "Test1234", request_body(address))
    assert error_code(resp) == "500"
    assert b"Other User" not in resp.body and b"Jane" not in resp.body


# --- bad input ----------------------------------------------------------------------------------


def test_bad_bodies_get_error_responses_without_traceback(
        proxy: ProxyThread, tls_pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    auth = basic("testuser", "Test1234")
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        for case, (doc, code) in sorted(BAD.items()):
            resp = send(conn, outlook_head(), doc, auth)
            assert error_code(resp) == str(code), case
    finally:
        conn.close()
    assert "Traceback" not in caplog.text
    assert "refused (600)" in caplog.text and "refused (601)" in caplog.text


def test_oversized_body_is_refused_unread(proxy: ProxyThread, tls_pair: Any) -> None:
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        resp = send(conn, outlook_head(), b"", basic("testuser", "Test1234"),
                    content_length=50 << 20)
        assert error_code(resp) == "600"
        assert conn.is_closed()
    finally:
        conn.close()
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:  # unauthenticated: 401, closed, nothing read
        resp = send(conn, outlook_head(), b"x" * 100, content_length=50 << 20)
        assert resp.status == 401 and conn.is_closed()
    finally:
        conn.close()


def test_slow_body_times_out(proxy: ProxyThread, tls_pair: Any) -> None:
    body = request_body("test.user@example.com")
    conn = TlsConnection(proxy.port, tls_pair.cert_path)
    try:
        resp = send(conn, outlook_head(), body[:50], basic("testuser", "Test1234"),
                    content_length=len(body))
        assert error_code(resp) == "600"  # after body_timeout (1 s here)
        assert conn.is_closed()
    finally:
        conn.close()


# --- the port-80 redirect -------------------------------------------------------------------


def test_redirect_listener(proxy: ProxyThread) -> None:
    host, port = proxy.sync(lambda: proxy.server.autodiscover.redirect_bound[0])
    conn = RawConnection(port, host)
    try:
        conn.send_request("GET", "/autodiscover/autodiscover.xml", {})
        resp = conn.read_response()
        assert resp.status == 302
        assert resp.header("Location") == [f"https://{HOST}/Autodiscover/Autodiscover.xml"]
        conn.send_request("GET", "/rpc/rpcproxy.dll", {})
        assert conn.read_response().status == 404
    finally:
        conn.close()


# --- LDAPS with a service account --------------------------------------------------------------


def test_ldaps_simple_bind_service_account(samba_dc: SambaDC, tls_pair: Any,
                                           directory_attrs: None) -> None:
    p = make_proxy(samba_dc, tls_pair, ldap_url=f"ldaps://{samba_dc.host}",
                   ldap_user="Administrator@example.com", ldap_password=samba_dc.admin_password,
                   ldap_ca_file=str(samba_dc.tls_ca), ldap_tls_name="DC1.example.com")
    try:
        response, _ = settings_of(basic_once(p, tls_pair))
        assert response.user.display_name == "Test User"
    finally:
        p.stop()


def test_directory_down_is_error_603(samba_dc: SambaDC, tls_pair: Any) -> None:
    p = make_proxy(samba_dc, tls_pair, ldap_url="ldapi:///nonexistent/ldapi")
    try:
        assert error_code(basic_once(p, tls_pair)) == "603"
    finally:
        p.stop()


# --- end to end: what Outlook was told is what works ------------------------------------------


def test_impacket_connects_where_autodiscover_said(proxy: ProxyThread, tls_pair: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    resp = ntlm_once(proxy, tls_pair, "testuser", "Test1234",
                     request_body("test.user@example.com"))
    _, protocols = settings_of(resp)
    expr_host, exch_host, exch_port = (protocols["EXPR"].server, protocols["EXCH"].server,
                                       protocols["EXCH"].port)
    assert protocols["EXPR"].ssl and exch_port == 6001

    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kw: Any) -> Any:  # the test's DNS: EXPR -> loopback
        return real("127.0.0.1" if host == expr_host else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    domains = run_with_timeout(lambda: samr_domains(
        f"https://{expr_host}:{proxy.port}/rpc/rpcproxy.dll", f"{exch_host}[{exch_port}]",
        "testuser", "Test1234"))
    assert domains == ["EXAMPLE", "BUILTIN"]


# --- an independent spy: the LDAP server address is a recorder ---------------------------------


def test_tcp_spy_sees_no_ldap_connection_for_refused_logins(
        samba_dc: SambaDC, tls_pair: Any) -> None:
    """Not the directory's own counter: a TCP listener in its place records every connect."""
    spy = SpyBackend()
    p = make_proxy(samba_dc, tls_pair, ldap_url=f"ldap://{spy.endpoint}", ldap_timeout=1.0)
    try:
        body = request_body("test.user@example.com")
        for case in sorted(CASES):
            conn = TlsConnection(p.port, tls_pair.cert_path)
            try:
                assert CASES[case](conn, body).status == 401, case
            finally:
                conn.close()
        time.sleep(0.3)
        assert spy.connections == 0 and spy.received == b""
        # The right password does reach it (and a directory that never answers is 603).
        assert error_code(basic_once(p, tls_pair, body=body)) == "603"
        assert spy.connections >= 1
    finally:
        p.stop()
        spy.close()


def test_basic_refused_without_tls(samba_dc: SambaDC, directory_attrs: None) -> None:
    p = ProxyThread(backend=f"{samba_dc.host}:{samba_dc.port}", server_names=[HOST],
                    ntlm_helper=samba_dc.ntlm_helper(),
                    autodiscover={"ldap_url": f"ldapi://{samba_dc.ldapi_path}"})
    try:
        conn = RawConnection(p.port)
        try:
            resp = send(conn, outlook_head(), request_body("test.user@example.com"),
                        basic("testuser", "Test1234"))
            assert resp.status == 401
            assert resp.header("WWW-Authenticate") == ["NTLM"]
            # NTLM over plain HTTP works (for a TLS terminator in front)
            settings_of(ntlm(conn, "testuser", "Test1234", request_body("test.user@example.com")))
        finally:
            conn.close()
    finally:
        p.stop()


def test_bad_input_memory_is_bounded(proxy: ProxyThread, tls_pair: Any) -> None:
    """50 entity bombs and 50 claimed 50 MiB bodies: the proxy's peak allocation stays small."""
    import tracemalloc

    auth = basic("testuser", "Test1234")
    tracemalloc.start()
    try:
        conn = TlsConnection(proxy.port, tls_pair.cert_path)
        try:
            for _ in range(50):
                assert error_code(send(conn, outlook_head(), BILLION_LAUGHS, auth)) == "600"
        finally:
            conn.close()
        for _ in range(50):
            conn = TlsConnection(proxy.port, tls_pair.cert_path)
            try:
                resp = send(conn, outlook_head(), b"<" * 4096, auth, content_length=50 << 20)
                assert error_code(resp) == "600"
            finally:
                conn.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
