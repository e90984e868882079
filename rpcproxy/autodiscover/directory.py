"""Finding a mailbox's owner in Samba's directory over LDAP (ldap3, run in a thread).

Theory of operation: ``mailbox_filter`` (pure) builds the search filter for an address:
``mail``, ``proxyAddresses`` (``smtp:`` + address), ``userPrincipalName``, and, when the
address's domain is the realm, ``sAMAccountName`` = its local part. ``LdapDirectory.find``
opens one LDAP connection per lookup in a worker thread (ldap3 is synchronous; lookups
are rare, a few per Outlook start), binds as configured, reads the naming context and
NetBIOS domain once (cached), searches, and closes. At most ``max_concurrent_lookups``
run at once and each is bounded by ``ldap_timeout``; anything that goes wrong is a
``DirectoryUnavailable`` with a reason for the log, never an exception to the client.

How it binds (configuration, see README):
* ``ldapi://`` + the path of Samba's *privileged* socket (``private/ldap_priv/ldapi``) on a
  co-located DC: no bind, Samba grants system access to whoever can open that socket
  (root or the socket directory's group);
* ``ldaps://`` or ``ldap://`` with ``ldap_start_tls``, and ``ldap_user``/``ldap_password``:
  a simple bind of a service account over TLS (Samba refuses simple binds without TLS:
  ``ldap server require strong auth``).

``operations`` counts every connection and search, so tests can prove that a request
that failed authentication never reached the directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from rpcproxy.autodiscover.settings import AutodiscoverTable

if TYPE_CHECKING:  # ldap3 is imported when the first lookup runs, not by every process
    import ldap3

ATTRIBUTES = ["sAMAccountName", "displayName", "legacyExchangeDN", "mail",
              "userPrincipalName", "userAccountControl"]
UF_ACCOUNTDISABLE = 0x2


class DirectoryUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DirectoryEntry:
    sam_account_name: str
    domain: str  # NetBIOS domain of the directory, upper case
    display_name: str
    legacy_dn: str | None
    mail: str | None
    disabled: bool


class Directory(Protocol):
    async def find(self, address: str) -> DirectoryEntry | None: ...

    def describe(self) -> str: ...


def escape_filter_chars(value: str) -> str:
    """RFC 4515 escaping of a value in a search filter."""
    return "".join(f"\\{ord(c):02x}" if c in "\\*()\x00" else c for c in value)


def mailbox_filter(address: str, realm: str) -> str:
    """The LDAP filter matching the user an address belongs to (values escaped)."""
    quoted = escape_filter_chars(address)
    local, _, domain = address.rpartition("@")
    parts = [f"(mail={quoted})", f"(proxyAddresses=smtp:{quoted})",
             f"(userPrincipalName={quoted})"]
    if realm and local and domain.lower() == realm.lower():
        parts.append(f"(sAMAccountName={escape_filter_chars(local)})")
    return f"(&(objectCategory=person)(objectClass=user)(|{''.join(parts)}))"


def realm_of(base_dn: str) -> str:
    """``DC=example,DC=com`` -> ``example.com``."""
    labels = [p.split("=", 1)[1] for p in base_dn.split(",")
              if p.strip().upper().startswith("DC=")]
    return ".".join(labels).lower()


def _first(attrs: dict[str, Any], name: str) -> str | None:
    value = attrs.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    return str(value)


def server_url(url: str) -> str:
    """ldap3 wants the ldapi socket path percent-encoded."""
    if url.startswith("ldapi://"):
        rest = url[len("ldapi://"):]
        if rest.startswith("/"):
            return "ldapi://" + urllib.parse.quote(rest, safe="")
    return url


class LdapDirectory:
    def __init__(self, table: AutodiscoverTable) -> None:
        self.table = table
        self.operations = 0  # connections opened + searches sent (for tests and metrics)
        self._lock = threading.Lock()
        self._naming: tuple[str, str, str] | None = None  # base DN, realm, NetBIOS domain
        self._sem: asyncio.Semaphore | None = None
        # Its own threads: a slow directory holds at most max_concurrent_lookups of them,
        # never the event loop's default pool (which resolves backend host names), and a
        # lookup that timed out still occupies its thread, so the bound stays real.
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=table.max_concurrent_lookups, thread_name_prefix="ldap")

    def close(self) -> None:
        """No new lookups; threads still in one end with it (bounded by ldap_timeout)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> str:
        t = self.table
        if t.ldap_url.startswith("ldapi://"):
            how = ("over the local socket, without a bind" if not t.ldap_user
                   else f"over the local socket as {t.ldap_user}")
        else:
            tls = "TLS" if t.ldap_url.startswith("ldaps://") or t.ldap_start_tls else "no TLS"
            how = (f"with a simple bind as {t.ldap_user} ({tls})" if t.ldap_user
                   else f"anonymously ({tls})")
        return f"{t.ldap_url} {how}"

    async def find(self, address: str) -> DirectoryEntry | None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.table.max_concurrent_lookups)
        async with self._sem:
            try:
                async with asyncio.timeout(self.table.ldap_timeout * 3):
                    return await asyncio.get_running_loop().run_in_executor(
                        self._threads, self._find_sync, address)
            except TimeoutError:
                raise DirectoryUnavailable(
                    f"no answer from {self.table.ldap_url} within "
                    f"{self.table.ldap_timeout * 3:g}s") from None
            except DirectoryUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever ldap3 raises: a reason, no trace
                raise DirectoryUnavailable(
                    f"LDAP with {self.table.ldap_url} failed: {type(exc).__name__}: {exc}"
                ) from None

    async def naming(self) -> tuple[str, str, str]:
        """(base DN, realm, NetBIOS domain): is the directory there, and what is it?"""

        def run() -> tuple[str, str, str]:
            conn = self._connect()
            try:
                return self._naming_context(conn)
            finally:
                conn.unbind()

        try:
            async with asyncio.timeout(self.table.ldap_timeout * 3):
                return await asyncio.get_running_loop().run_in_executor(self._threads, run)
        except TimeoutError:
            raise DirectoryUnavailable(f"no answer from {self.table.ldap_url}") from None
        except DirectoryUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from None

    # ---- in the worker thread ---------------------------------------------------------

    def _count(self) -> None:
        with self._lock:
            self.operations += 1

    def _connect(self) -> ldap3.Connection:
        import ldap3
        from ldap3.core.exceptions import LDAPException

        t = self.table
        tls = None
        url = server_url(t.ldap_url)
        if url.startswith("ldaps://") or t.ldap_start_tls:
            tls = ldap3.Tls(
                ca_certs_file=t.ldap_ca_file or None, validate=ssl.CERT_REQUIRED,
                valid_names=[t.ldap_tls_name] if t.ldap_tls_name else None,
                version=ssl.PROTOCOL_TLS_CLIENT)
        timeout = max(1, math.ceil(t.ldap_timeout))  # ldap3 packs it into a socket option
        server = ldap3.Server(url, tls=tls, get_info=ldap3.NONE, connect_timeout=timeout)
        conn = ldap3.Connection(
            server, user=t.ldap_user or None, password=t.password() or None,
            authentication=ldap3.SIMPLE if t.ldap_user else ldap3.ANONYMOUS,
            read_only=True, auto_referrals=False, receive_timeout=timeout,
            raise_exceptions=False)
        self._count()
        try:
            conn.open()
            if t.ldap_start_tls and not conn.start_tls():
                raise DirectoryUnavailable(f"StartTLS with {t.ldap_url} failed: {conn.result}")
            if t.ldap_user and not conn.bind():
                desc = (conn.result or {}).get("description", "refused")
                raise DirectoryUnavailable(f"LDAP bind as {t.ldap_user} to {t.ldap_url} "
                                           f"failed: {desc}")
        except LDAPException as exc:
            conn.unbind()
            raise DirectoryUnavailable(f"cannot reach {t.ldap_url}: {exc}") from None
        except DirectoryUnavailable:
            conn.unbind()
            raise
        return conn

    def _search(self, conn: ldap3.Connection, base: str, flt: str,
                scope: Literal["BASE", "LEVEL", "SUBTREE"],
                attributes: list[str]) -> list[dict[str, Any]]:
        self._count()
        ok = conn.search(base, flt, search_scope=scope, attributes=attributes, size_limit=4,
                         time_limit=max(1, int(self.table.ldap_timeout)))
        result = conn.result or {}
        if not ok and result.get("description") not in ("success", "noSuchObject",
                                                         "sizeLimitExceeded"):
            raise DirectoryUnavailable(f"LDAP search under {base or 'the root'} failed: "
                                       f"{result.get('description')} "
                                       f"{result.get('message', '')}".strip())
        return [dict(e["attributes"]) for e in (conn.response or [])
                if e.get("type") == "searchResEntry"]

    def _naming_context(self, conn: ldap3.Connection) -> tuple[str, str, str]:
        import ldap3

        if self._naming is not None:
            return self._naming
        t = self.table
        root = self._search(conn, "", "(objectClass=*)", ldap3.BASE,
                            ["defaultNamingContext", "configurationNamingContext"])
        attrs = root[0] if root else {}
        base = t.ldap_base or _first(attrs, "defaultNamingContext") or ""
        if not base:
            raise DirectoryUnavailable("the directory names no defaultNamingContext: "
                                       "set autodiscover.ldap_base")
        realm = t.realm or realm_of(base)
        netbios = t.netbios_domain
        config_nc = _first(attrs, "configurationNamingContext")
        if not netbios and config_nc:
            found = self._search(
                conn, f"CN=Partitions,{config_nc}",
                f"(&(objectClass=crossRef)(nCName={escape_filter_chars(base)}))",
                ldap3.LEVEL, ["nETBIOSName"])
            netbios = _first(found[0], "nETBIOSName") or "" if found else ""
        if not netbios:
            raise DirectoryUnavailable("cannot read the NetBIOS domain name from the directory: "
                                       "set autodiscover.netbios_domain")
        self._naming = (base, realm, netbios.upper())
        return self._naming

    def _find_sync(self, address: str) -> DirectoryEntry | None:
        import ldap3
        from ldap3.core.exceptions import LDAPException

        conn = self._connect()
        try:
            base, realm, netbios = self._naming_context(conn)
            found = self._search(conn, base, mailbox_filter(address, realm), ldap3.SUBTREE,
                                 ATTRIBUTES)
        except LDAPException as exc:
            raise DirectoryUnavailable(f"LDAP search failed: {exc}") from None
        finally:
            conn.unbind()
        owners = {(_first(a, "sAMAccountName") or "").lower() for a in found}
        if len(owners) != 1 or "" in owners:
            return None  # nobody, or an address two accounts claim: not a mailbox
        attrs = found[0]
        try:
            disabled = bool(int(_first(attrs, "userAccountControl") or 0) & UF_ACCOUNTDISABLE)
        except ValueError:
            disabled = False
        sam = _first(attrs, "sAMAccountName") or ""
        return DirectoryEntry(
            sam_account_name=sam, domain=netbios,
            display_name=_first(attrs, "displayName") or sam,
            legacy_dn=_first(attrs, "legacyExchangeDN"), mail=_first(attrs, "mail"),
            disabled=disabled)
