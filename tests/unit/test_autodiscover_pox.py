"""The sans-IO Autodiscover modules: request parsing, response rendering, settings."""

from __future__ import annotations

import datetime as dt
import tracemalloc
from pathlib import Path

import pytest
from exchangelib.autodiscover.properties import Autodiscover as ExAutodiscover
from exchangelib.version import Build

from rpcproxy.autodiscover import pox
from rpcproxy.autodiscover.directory import mailbox_filter, realm_of, server_url
from rpcproxy.autodiscover.settings import (
    CertNames,
    common_name,
    default_proxy_server,
    derive,
    legacy_dn,
    parse_table,
)
from rpcproxy.errors import ConfigError
from tests.support.pox_requests import BAD, BILLION_LAUGHS, SCHEMA, body

DATA = Path(__file__).parents[1] / "data" / "autodiscover"


# --- parse_request -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["outlook2016.xml", "outlook2010.xml"])
def test_outlook_requests_parse(name: str) -> None:
    parsed = pox.parse_request((DATA / name).read_bytes())
    assert parsed == pox.PoxRequest("test.user@example.com", SCHEMA)


def test_prefixed_namespace_and_extra_elements_are_fine() -> None:
    doc = (f'<a:Autodiscover xmlns:a="{pox.REQUEST_NS}"><a:Request><a:LegacyDN>/o=x</a:LegacyDN>'
           "<a:EMailAddress> u@example.com </a:EMailAddress>"
           f"<a:AcceptableResponseSchema>{SCHEMA}</a:AcceptableResponseSchema>"
           "</a:Request></a:Autodiscover>").encode()
    assert pox.parse_request(doc) == pox.PoxRequest("u@example.com", SCHEMA)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_an_error_code(case: str) -> None:
    doc, code = BAD[case]
    parsed = pox.parse_request(doc)
    assert isinstance(parsed, pox.PoxError), parsed
    assert parsed.code == code, parsed
    assert parsed.reason


def test_billion_laughs_uses_no_memory() -> None:
    tracemalloc.start()
    try:
        pox.parse_request(BILLION_LAUGHS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


# --- responses, read back by exchangelib's POX classes ---------------------------------------


def settings(**kw: object) -> pox.ResponseSettings:
    t = parse_table({})
    s = derive(t, ["mail.example.com", "mail"], CertNames("mail.example.com",
                                                          ["mail.example.com",
                                                           "autodiscover.example.com"]))
    return pox.ResponseSettings(**{**s.__dict__, **kw})


def test_response_read_by_exchangelib() -> None:
    mailbox = pox.Mailbox("Test <User> & Co", "/o=First Organization/ou=First Administrative "
                          "Group/cn=Recipients/cn=testuser", "test.user@example.com")
    xml = pox.render_response(settings(), mailbox)
    ad = ExAutodiscover.from_bytes(xml)
    ad.raise_errors()
    resp = ad.response
    assert resp.user.display_name == "Test <User> & Co"
    assert resp.user.legacy_dn.endswith("/cn=Recipients/cn=testuser")
    assert resp.user.autodiscover_smtp_address == "test.user@example.com"
    assert resp.account.action == "settings" and resp.account.type == "email"
    protocols = {p.type: p for p in resp.account.protocols}
    assert set(protocols) == {"EXCH", "EXPR"}  # never EXHTTP
    exch, expr = protocols["EXCH"], protocols["EXPR"]
    assert exch.server == "mail.example.com"
    assert exch.server_dn == ("/o=First Organization/ou=First Administrative Group"
                              "/cn=Configuration/cn=Servers/cn=mail")
    assert exch.mdb_dn == exch.server_dn + "/cn=Microsoft Private MDB"
    assert exch.server_version == Build(14, 3, 123)
    assert (exch.port, exch.directory_port, exch.referral_port) == (6001, 6004, 6002)
    assert expr.server == "mail.example.com"
    assert expr.ssl is True
    assert expr.auth_package == "Ntlm"
    assert expr.cert_principal_name == "msstd:mail.example.com"
    assert b"<ServerExclusiveConnect>On</ServerExclusiveConnect>" in xml
    assert b"EXHTTP" not in xml


def test_server_version_hex_form() -> None:
    assert pox.server_version_hex((14, 1, 218)) == "738180DA"  # Exchange 2010 SP1
    assert Build.from_hex_string(pox.server_version_hex((15, 1, 2507))) == Build(15, 1, 2507)
    with pytest.raises(ValueError):
        pox.server_version_hex((64, 0, 0))


def test_ports_zero_are_left_out_and_control_characters_dropped() -> None:
    xml = pox.render_response(settings(port=0, directory_port=0, referral_port=0),
                              pox.Mailbox("bell\x07 name", "/o=x", "a@example.com"))
    assert b"<Port>" not in xml and b"DirectoryPort" not in xml
    assert b"bell name" in xml


@pytest.mark.parametrize("code", list(pox.ErrorCode))
def test_error_response_read_by_exchangelib(code: pox.ErrorCode) -> None:
    xml = pox.render_error(code, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), 42)
    ad = ExAutodiscover.from_bytes(xml)
    assert ad.response is None
    assert ad.error_response.error.code == str(int(code))
    assert ad.error_response.error.message == pox.MESSAGES[code]
    assert ad.error_response.error.time == "03:04:05.000000"


# --- settings --------------------------------------------------------------------------------


def test_defaults_derive_from_names_and_certificate() -> None:
    cert = CertNames("mail.example.com", ["autodiscover.example.com", "mail.example.com"])
    assert default_proxy_server(["dc1", "mail.example.com"], cert) == "mail.example.com"
    assert default_proxy_server(["localhost", "dc1", "dc1.example.com"], None) == "dc1.example.com"
    s = derive(parse_table({}), ["mail.example.com"], None)
    assert s.cert_principal_name == "None"
    assert s.deployment_id == derive(parse_table({}), ["mail.example.com"], None).deployment_id
    assert legacy_dn(parse_table({"organization": "Org"}), "jdoe") == (
        "/o=Org/ou=First Administrative Group/cn=Recipients/cn=jdoe")
    assert common_name("CN=mail.example.com,O=Example") == "mail.example.com"


def test_every_value_can_be_set() -> None:
    t = parse_table({"exch_server": "rpc.example.com", "proxy_server": "owa.example.com",
                     "server_dn": "/o=A/cn=B", "mdb_dn": "/o=A/cn=C", "auth_package": "basic",
                     "cert_principal_name": "msstd:owa.example.com", "server_version": "15.1.2507",
                     "port": 0, "deployment_id": "11111111-2222-3333-4444-555555555555",
                     "ssl": False, "server_exclusive_connect": False, "ttl_hours": 2})
    s = derive(t, ["x"], None)
    assert (s.exch_server, s.proxy_server, s.server_dn, s.mdb_dn) == (
        "rpc.example.com", "owa.example.com", "/o=A/cn=B", "/o=A/cn=C")
    assert s.auth_package == "Basic" and s.server_version == (15, 1, 2507) and not s.ssl
    assert s.deployment_id == "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize("table", [
    {"nope": 1}, {"port": "6001"}, {"port": 70000}, {"auth_package": "kerberos"},
    {"server_version": "8.0.685"}, {"server_version": "fourteen"}, {"max_body": 10},
    {"deployment_id": "x"}, {"ldap_url": "http://x"}, {"enabled": "yes"},
    {"ldap_url": "ldap://dc1", "ldap_user": "svc"},  # a password in clear: refused
])
def test_bad_tables_are_config_errors(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parse_table(table)


def test_mailbox_filter_escapes_and_falls_back_to_the_realm() -> None:
    f = mailbox_filter("jo*e)(x@example.com", "EXAMPLE.COM")
    assert "*" not in f.replace("\\2a", "") and "(sAMAccountName=jo\\2ae\\29\\28x)" in f
    assert "sAMAccountName" not in mailbox_filter("jdoe@other.org", "example.com")
    assert realm_of("DC=Example,DC=com") == "example.com"
    assert server_url("ldapi:///var/lib/samba/private/ldap_priv/ldapi") == (
        "ldapi://%2Fvar%2Flib%2Fsamba%2Fprivate%2Fldap_priv%2Fldapi")


def test_service_settings_follow_a_reloaded_config() -> None:
    import dataclasses

    from rpcproxy.autodiscover.service import AutodiscoverService
    from rpcproxy.config import load

    class Server:
        config = load(None, {"server_names": ["mail.example.com"]})

    server = Server()
    service = AutodiscoverService(server)  # type: ignore[arg-type]
    assert service.resolved().response.proxy_server == "mail.example.com"
    server.config = dataclasses.replace(server.config,
                                        autodiscover={"proxy_server": "owa.example.com"})
    assert service.resolved().response.proxy_server == "owa.example.com"


@pytest.mark.parametrize("ref", ["&#x7f;", "&#x9b;", "&#x202e;", "&#x200b;", "&#x85;"])
def test_control_and_format_characters_in_the_address_are_refused(ref: str) -> None:
    """Character references put them past the address pattern; they must not reach the
    log lines or the LDAP filter that the address goes to."""
    parsed = pox.parse_request(body(f"jane{ref}doe@example.com"))
    assert isinstance(parsed, pox.PoxError)
    assert parsed.code == pox.ErrorCode.INVALID_REQUEST
