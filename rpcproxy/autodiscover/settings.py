"""The ``[autodiscover]`` table of the configuration file, and what is derived from it.

Every value Outlook is told can be set; each has an embedded default derived from the
proxy's server names and its certificate, so that an install with a certificate made by
``rpcproxy cert --host mail.example.com`` answers correctly with no table at all:

* EXPR ``Server`` (the Outlook Anywhere proxy host): the first name of the certificate
  that is also a server name and not an ``autodiscover.`` name, else the first dotted
  server name; ``CertPrincipalName`` is ``msstd:`` + the certificate's subject CN.
* EXCH ``Server``: the EXPR host (the default allow-list maps its ports 6001, 6002 and
  6004 to the mapiproxy endpoint), with ``ServerDN``/``MdbDN`` built from
  ``organization`` and ``administrative_group`` the way OpenChange provisioned them.

Pure: ``parse_table`` checks the table, ``derive`` combines it with the server names and
the certificate's names (read by the caller).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

from rpcproxy.autodiscover.pox import ResponseSettings, server_version_hex
from rpcproxy.errors import ConfigError

DEFAULT_LDAPI = "ldapi:///var/lib/samba/private/ldap_priv/ldapi"
AUTH_PACKAGES = {"ntlm": "Ntlm", "basic": "Basic", "negotiate": "Negotiate"}


@dataclass(frozen=True)
class AutodiscoverTable:
    """The ``[autodiscover]`` keys, with their defaults ("" / 0 = derive it)."""

    enabled: bool = True
    # the directory
    ldap_url: str = DEFAULT_LDAPI
    ldap_user: str = ""  # bind DN or user@realm; empty: no bind (ldapi as root / its group)
    ldap_password: str = ""
    ldap_password_file: str = ""
    ldap_ca_file: str = ""  # CA of the LDAP server's certificate (ldaps:// or start_tls)
    ldap_tls_name: str = ""  # name its certificate must carry when the URL has an address
    ldap_start_tls: bool = False
    ldap_base: str = ""  # default: the directory's defaultNamingContext
    ldap_timeout: float = 5.0
    netbios_domain: str = ""  # default: read from the directory
    realm: str = ""  # for the sAMAccountName@realm fallback; default: from the base DN
    max_concurrent_lookups: int = 8
    # the request
    max_body: int = 8192
    body_timeout: float = 10.0
    # the response
    deployment_id: str = ""
    organization: str = "First Organization"
    administrative_group: str = "First Administrative Group"
    exch_server: str = ""
    server_dn: str = ""
    mdb_dn: str = ""
    server_version: str = "14.3.123"  # Exchange 2010 SP3: the oldest Outlook 2016 accepts
    exch_auth_package: str = "Ntlm"
    port: int = 6001
    directory_port: int = 6004
    referral_port: int = 6002
    proxy_server: str = ""
    auth_package: str = "Ntlm"
    ssl: bool = True
    cert_principal_name: str = ""  # "" = msstd:<certificate CN>; "None" to leave it open
    server_exclusive_connect: bool = True
    ttl_hours: int = 1
    # the port-80 helper
    redirect_listen: str = ""  # plain HTTP: /autodiscover/* -> https://proxy_server/...

    def password(self) -> str:
        if self.ldap_password_file:
            try:
                with open(self.ldap_password_file, encoding="utf-8") as fh:
                    return fh.read().strip()
            except OSError as exc:
                raise ConfigError(f"autodiscover.ldap_password_file: cannot read "
                                  f"{self.ldap_password_file}: {exc.strerror}") from None
        return self.ldap_password


_KEYS = {f.name: f for f in dataclasses.fields(AutodiscoverTable)}


def parse_table(table: dict[str, Any]) -> AutodiscoverTable:
    """The TOML table -> AutodiscoverTable; ConfigError names the first bad key."""
    values: dict[str, Any] = {}
    defaults = AutodiscoverTable()
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _KEYS:
            raise ConfigError(f"autodiscover: unknown key {key!r}")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"autodiscover.{name} must be a {type(default).__name__}, "
                              f"not {value!r}")
        values[name] = value
    t = dataclasses.replace(defaults, **values)
    for name in ("port", "directory_port", "referral_port"):
        if not 0 <= getattr(t, name) <= 65535:
            raise ConfigError(f"autodiscover.{name} must be 0 (left out) or a port")
    if t.auth_package.lower() not in AUTH_PACKAGES:
        raise ConfigError("autodiscover.auth_package must be Ntlm, Basic or Negotiate")
    if not 256 <= t.max_body <= 1 << 20:
        raise ConfigError("autodiscover.max_body must be 256 .. 1048576 bytes")
    for name in ("body_timeout", "ldap_timeout"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"autodiscover.{name} must be positive")
    if t.max_concurrent_lookups < 1 or t.ttl_hours < 0:
        raise ConfigError("autodiscover.max_concurrent_lookups must be at least 1, "
                          "ttl_hours at least 0")
    parse_version(t.server_version)
    if t.deployment_id:
        try:
            uuid.UUID(t.deployment_id)
        except ValueError:
            raise ConfigError("autodiscover.deployment_id must be a GUID") from None
    if not t.ldap_url.startswith(("ldap://", "ldaps://", "ldapi://")):
        raise ConfigError("autodiscover.ldap_url must start with ldap://, ldaps:// or ldapi://")
    if t.ldap_user and t.ldap_url.startswith("ldap://") and not t.ldap_start_tls:
        raise ConfigError("autodiscover: a password bind needs TLS: use an ldaps:// URL or "
                          "set ldap_start_tls = true")
    return t


def parse_version(text: str) -> tuple[int, int, int]:
    try:
        major, minor, build = (int(p) for p in text.split(".")[:3])
        version = (major, minor, build)
        server_version_hex(version)
    except ValueError:
        raise ConfigError(f"autodiscover.server_version {text!r} is not MAJOR.MINOR.BUILD "
                          "(e.g. 14.3.123)") from None
    if major < 14:
        raise ConfigError("autodiscover.server_version must be Exchange 2010 (14.x) or later: "
                          "Outlook 2016 refuses older servers")
    return version


@dataclass(frozen=True)
class CertNames:
    """What the derivation needs from the proxy's certificate."""

    common_name: str | None
    dns_names: list[str] = field(default_factory=list)


def common_name(rfc4514_subject: str) -> str | None:
    for part in rfc4514_subject.split(","):
        key, _, value = part.partition("=")
        if key.strip().upper() == "CN" and value.strip():
            return value.strip()
    return None


def default_proxy_server(server_names: list[str], cert: CertNames | None) -> str:
    names = [n.lower() for n in server_names]
    if cert is not None:
        for name in cert.dns_names:
            if name in names and not name.startswith(("autodiscover.", "*")):
                return name
    dotted = [n for n in names if "." in n and n != "localhost"]
    if dotted:
        return dotted[0]
    if cert is not None:
        for name in cert.dns_names:
            if not name.startswith(("autodiscover.", "*")):
                return name
    return names[0] if names else "localhost"


def derive(t: AutodiscoverTable, server_names: list[str],
           cert: CertNames | None) -> ResponseSettings:
    proxy = t.proxy_server or default_proxy_server(server_names, cert)
    exch = t.exch_server or proxy
    short = exch.split(".")[0]
    server_dn = t.server_dn or (f"/o={t.organization}/ou={t.administrative_group}"
                                f"/cn=Configuration/cn=Servers/cn={short}")
    mdb_dn = t.mdb_dn or f"{server_dn}/cn=Microsoft Private MDB"
    if t.cert_principal_name:
        cpn = t.cert_principal_name
    elif cert is not None and cert.common_name:
        cpn = f"msstd:{cert.common_name}"
    else:
        cpn = "None"
    deployment = t.deployment_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"rpcproxy.{proxy}"))
    return ResponseSettings(
        deployment_id=deployment, exch_server=exch, server_dn=server_dn, mdb_dn=mdb_dn,
        server_version=parse_version(t.server_version),
        exch_auth_package=t.exch_auth_package, port=t.port, directory_port=t.directory_port,
        referral_port=t.referral_port, proxy_server=proxy, ssl=t.ssl,
        auth_package=AUTH_PACKAGES[t.auth_package.lower()], cert_principal_name=cpn,
        server_exclusive_connect=t.server_exclusive_connect, ttl_hours=t.ttl_hours,
    )


def legacy_dn(t: AutodiscoverTable, sam_account_name: str) -> str:
    """The user's legacyExchangeDN as OpenChange's provisioning wrote it."""
    return f"/o={t.organization}/ou={t.administrative_group}/cn=Recipients/cn={sam_account_name}"
