"""The POX Autodiscover protocol of [MS-OXDSCLI], sans-IO: bytes in, typed values out.

Theory of operation
-------------------
Outlook POSTs one small XML document::

    <Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
      <Request>
        <EMailAddress>user@example.com</EMailAddress>
        <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
      </Request>
    </Autodiscover>

``parse_request`` turns a body into a ``PoxRequest`` or a ``PoxError`` carrying the
protocol's own error code ([MS-OXDSCLI] 2.2.4.1.1.3.1: 600 invalid request, 601 schema
not supported). It never raises for anything a client can send. The XML is parsed by
expat with every DTD refused: no document type declaration means no entity can be
declared, so neither entity expansion (billion laughs) nor external entities can
happen; the body size is bounded by the caller, the element depth here.

``render_response`` renders the settings response (namespace ``.../responseschema/2006a``)
from a typed ``ResponseSettings`` and ``Mailbox``; ``render_error`` the error response
(namespace ``.../responseschema/2006``). Both are pure: the time is passed in. The
response holds a ``User``, an ``Account`` with action ``settings``, a ``Protocol`` of type
``EXCH`` (the RPC server Outlook names in its RPC-over-HTTP URLs) and one of type
``EXPR`` (Outlook Anywhere: the proxy host). There is deliberately no ``EXHTTP``
(MAPI over HTTP) block: rpcproxy does not serve MAPI over HTTP, and Outlook prefers
it when offered.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import xml.parsers.expat
from dataclasses import dataclass
from xml.sax.saxutils import escape

from ntlm.verifier import has_control_characters

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_RESPONSE_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a")
MAX_DEPTH = 8
MAX_ADDRESS = 320  # RFC 5321: 64 + 1 + 255

_SEP = "\x1f"  # expat's namespace separator: cannot occur in a URI or a name
_ADDRESS = re.compile(r"[^@\s<>\"\\,;:()\[\]]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})")
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class ErrorCode(enum.IntEnum):
    """[MS-OXDSCLI] 2.2.4.1.1.3.1 ErrorCode values."""

    ADDRESS_NOT_FOUND = 500
    INVALID_REQUEST = 600
    SCHEMA_NOT_SUPPORTED = 601
    CONFIGURATION_ERROR = 602
    INTERNAL_ERROR = 603


MESSAGES = {
    ErrorCode.ADDRESS_NOT_FOUND: "The email address can't be found.",
    ErrorCode.INVALID_REQUEST: "Invalid Request",
    ErrorCode.SCHEMA_NOT_SUPPORTED: "The requested schema version is not supported.",
    ErrorCode.CONFIGURATION_ERROR: "The Autodiscover server has a configuration error.",
    ErrorCode.INTERNAL_ERROR: "The Autodiscover server could not look up the address.",
}


@dataclass(frozen=True)
class PoxRequest:
    email: str  # as sent, stripped; checked to look like local@domain
    schema: str


@dataclass(frozen=True)
class PoxError:
    code: ErrorCode
    reason: str  # for the log, in admin words; the client gets MESSAGES[code]


class _Reject(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Collector:
    """expat callbacks: keep the text of Autodiscover/Request/* children, refuse DTDs."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.root: str | None = None
        self.fields: dict[str, str] = {}
        self._text: list[str] = []

    def start(self, name: str, attrs: dict[str, str]) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise _Reject(f"elements nested deeper than {MAX_DEPTH}")
        if self.root is None:
            self.root = name
        self.stack.append(name)
        self._text = []

    def end(self, name: str) -> None:
        path = self.stack
        if len(path) == 3 and path[1] == _q("Request"):
            local = name.rpartition(_SEP)[2] if name.startswith(REQUEST_NS + _SEP) else None
            if local is not None and local not in self.fields:
                self.fields[local] = "".join(self._text)
        path.pop()
        self._text = []

    def chars(self, data: str) -> None:
        if len(self.stack) == 3:
            self._text.append(data)

    @staticmethod
    def doctype(*_: object) -> None:
        raise _Reject("a DTD (document type declaration) is not accepted")

    @staticmethod
    def entity(*_: object) -> None:
        raise _Reject("entity declarations are not accepted")

    @staticmethod
    def external(*_: object) -> int:
        raise _Reject("external entities are not accepted")


def _q(local: str) -> str:
    return f"{REQUEST_NS}{_SEP}{local}"


def parse_request(body: bytes) -> PoxRequest | PoxError:
    """A request body -> the request, or the error code to answer with. Never raises."""
    if not body.strip():
        return PoxError(ErrorCode.INVALID_REQUEST, "empty request body")
    collector = _Collector()
    parser = xml.parsers.expat.ParserCreate(namespace_separator=_SEP)
    parser.StartDoctypeDeclHandler = collector.doctype
    parser.EntityDeclHandler = collector.entity
    parser.UnparsedEntityDeclHandler = collector.entity
    parser.ExternalEntityRefHandler = collector.external
    parser.StartElementHandler = collector.start
    parser.EndElementHandler = collector.end
    parser.CharacterDataHandler = collector.chars
    try:
        parser.Parse(body, True)
    except _Reject as exc:
        return PoxError(ErrorCode.INVALID_REQUEST, exc.reason)
    except xml.parsers.expat.ExpatError as exc:
        reason = xml.parsers.expat.errors.messages.get(exc.code, "not well-formed")
        return PoxError(ErrorCode.INVALID_REQUEST,
                        f"not well-formed XML ({reason}, line {exc.lineno})")
    except (ValueError, LookupError, RecursionError) as exc:  # e.g. an unknown encoding
        return PoxError(ErrorCode.INVALID_REQUEST, f"unreadable XML: {exc}")
    if collector.root != _q("Autodiscover"):
        got = (collector.root or "?").replace(_SEP, " ")
        return PoxError(ErrorCode.INVALID_REQUEST,
                        f"root element is {got!r}, not Autodiscover in the Outlook "
                        "request namespace")
    schema = collector.fields.get("AcceptableResponseSchema", "").strip()
    if schema != OUTLOOK_RESPONSE_NS:
        return PoxError(ErrorCode.SCHEMA_NOT_SUPPORTED,
                        f"AcceptableResponseSchema {schema[:200]!r} is not the Outlook "
                        "2006a schema")
    email = collector.fields.get("EMailAddress", "").strip()
    if not email:
        return PoxError(ErrorCode.INVALID_REQUEST, "no EMailAddress in the request")
    # Character references get DEL, C1 controls (CSI), bidi overrides and zero-width
    # characters past the pattern: none of them may reach a log line or an LDAP filter.
    if (len(email) > MAX_ADDRESS or not _ADDRESS.fullmatch(email)
            or has_control_characters(email)):
        return PoxError(ErrorCode.INVALID_REQUEST,
                        f"EMailAddress {email[:80]!r} is not an email address")
    return PoxRequest(email=email, schema=schema)


# --- responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseSettings:
    """Everything a settings response says that is not about the user (from the config)."""

    deployment_id: str
    exch_server: str
    server_dn: str
    mdb_dn: str
    server_version: tuple[int, int, int]  # major, minor, build
    exch_auth_package: str
    port: int  # 0: the element is left out
    directory_port: int
    referral_port: int
    proxy_server: str
    ssl: bool
    auth_package: str  # EXPR: "Ntlm" or "Basic"
    cert_principal_name: str  # "msstd:<subject>" or "None"
    server_exclusive_connect: bool
    ttl_hours: int = 1


@dataclass(frozen=True)
class Mailbox:
    """The user the settings are for (from the directory)."""

    display_name: str
    legacy_dn: str
    smtp_address: str


def server_version_hex(version: tuple[int, int, int]) -> str:
    """Exchange's ServerVersion form: 0111, 6 bits major, 6 bits minor, 1, 15 bits build."""
    major, minor, build = version
    if not (0 <= major < 64 and 0 <= minor < 64 and 0 <= build < 1 << 15):
        raise ValueError(f"server version {major}.{minor}.{build} does not fit the hex form")
    return f"{(0x7 << 28) | (major << 22) | (minor << 16) | (1 << 15) | build:08X}"


def _x(value: str) -> str:
    """Element text: invalid XML characters dropped, markup escaped."""
    return escape(_XML_INVALID.sub("", value))


def _on(flag: bool) -> str:
    return "On" if flag else "Off"


def render_response(settings: ResponseSettings, mailbox: Mailbox) -> bytes:
    s = settings
    ports = "".join(
        f"        <{name}>{value}</{name}>\n"
        for name, value in (("Port", s.port), ("DirectoryPort", s.directory_port),
                            ("ReferralPort", s.referral_port)) if value)
    text = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<Autodiscover xmlns="{RESPONSE_NS}">\n'
        f'  <Response xmlns="{OUTLOOK_RESPONSE_NS}">\n'
        "    <User>\n"
        f"      <DisplayName>{_x(mailbox.display_name)}</DisplayName>\n"
        f"      <LegacyDN>{_x(mailbox.legacy_dn)}</LegacyDN>\n"
        f"      <AutoDiscoverSMTPAddress>{_x(mailbox.smtp_address)}</AutoDiscoverSMTPAddress>\n"
        f"      <DeploymentId>{_x(s.deployment_id)}</DeploymentId>\n"
        "    </User>\n"
        "    <Account>\n"
        "      <AccountType>email</AccountType>\n"
        "      <Action>settings</Action>\n"
        "      <MicrosoftOnline>False</MicrosoftOnline>\n"
        "      <Protocol>\n"
        "        <Type>EXCH</Type>\n"
        f"        <TTL>{s.ttl_hours}</TTL>\n"
        f"        <Server>{_x(s.exch_server)}</Server>\n"
        f"        <ServerDN>{_x(s.server_dn)}</ServerDN>\n"
        f"        <ServerVersion>{server_version_hex(s.server_version)}</ServerVersion>\n"
        f"        <MdbDN>{_x(s.mdb_dn)}</MdbDN>\n"
        f"        <AuthPackage>{_x(s.exch_auth_package)}</AuthPackage>\n"
        f"{ports}"
        "      </Protocol>\n"
        "      <Protocol>\n"
        "        <Type>EXPR</Type>\n"
        f"        <TTL>{s.ttl_hours}</TTL>\n"
        f"        <Server>{_x(s.proxy_server)}</Server>\n"
        f"        <SSL>{_on(s.ssl)}</SSL>\n"
        f"        <AuthPackage>{_x(s.auth_package)}</AuthPackage>\n"
        f"        <CertPrincipalName>{_x(s.cert_principal_name)}</CertPrincipalName>\n"
        f"        <ServerExclusiveConnect>{_on(s.server_exclusive_connect)}"
        "</ServerExclusiveConnect>\n"
        "      </Protocol>\n"
        "    </Account>\n"
        "  </Response>\n"
        "</Autodiscover>\n"
    )
    return text.encode("utf-8")


def render_error(code: ErrorCode, now: dt.datetime, error_id: int = 0) -> bytes:
    """The POX error response; ``error_id`` is Exchange's per-server hash (any number)."""
    stamp = now.strftime("%H:%M:%S.%f")
    text = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<Autodiscover xmlns="{RESPONSE_NS}">\n'
        "  <Response>\n"
        f'    <Error Time="{stamp}" Id="{error_id & 0xFFFFFFFF}">\n'
        f"      <ErrorCode>{int(code)}</ErrorCode>\n"
        f"      <Message>{_x(MESSAGES[code])}</Message>\n"
        "      <DebugData />\n"
        "    </Error>\n"
        "  </Response>\n"
        "</Autodiscover>\n"
    )
    return text.encode("utf-8")
