"""``rpcproxy check``: is this installation going to work? One line per part, in admin words.

Reads the configuration exactly like ``rpcproxy serve`` (same file, same flags; without
``--config`` the unit's file ``/etc/rpcproxy/rpcproxy.toml`` when it exists; in the
container ``rpcproxy-entrypoint check`` adds the image's settings), then:

1. configuration   every value valid (a failure here stops the other checks);
2. certificate     key matches, not expired / not yet valid, covers the names clients use;
3. backend         each backend of the allow-list accepts a TCP connection;
4. NTLM (winbind)  the configured ntlm_auth helper starts and winbind gives verdicts (a
                   logon of an account that does not exist is rejected);
5. test login      with ``--user``: a real NTLM login through the same helper pool the proxy
                   uses (``ntlm.verify_password``), printing the account Samba authenticated;
6. directory       the LDAP directory Autodiscover reads answers (and how rpcproxy binds);
7. autodiscover    the settings it hands out work (EXCH on the allow-list, EXPR host in the
                   certificate); with ``--user``, a real Autodiscover request with NTLM
                   through a proxy started on loopback, and what Outlook would be told.

Lines start with ``[ OK ]``, ``[FAIL]``, ``[WARN]`` (works, but look at it) or ``[SKIP]``.
The exit status is 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from rpcproxy.config import Config, config_from_args
from rpcproxy.errors import ConfigError
from rpcproxy.targets import Endpoint

OK, FAIL, WARN, SKIP = "[ OK ]", "[FAIL]", "[WARN]", "[SKIP]"
EXPIRY_WARNING_DAYS = 14
CONNECT_TIMEOUT = 5.0
SERVICE_CONFIG = "/etc/rpcproxy/rpcproxy.toml"  # what the systemd unit runs with
PASSWORD_ENV = "RPCPROXY_CHECK_PASSWORD"

# getaddrinfo() failures in words (socket.gaierror errno -> what it means here)
_RESOLVER_ERRORS = {
    socket.EAI_NONAME: "no such name (the DNS answered that it does not exist)",
    socket.EAI_AGAIN: "name resolution failed for now (no DNS server answered; is DNS "
                      "reachable from here, e.g. inside the container?)",
    socket.EAI_FAIL: "the DNS server failed to answer",
}
for _name in ("EAI_NODATA", "EAI_ADDRFAMILY"):
    if hasattr(socket, _name):
        _RESOLVER_ERRORS[getattr(socket, _name)] = "the name has no address"


@dataclass
class Result:
    status: str
    what: str
    message: str

    def line(self) -> str:
        return f"{self.status} {self.what}: {self.message}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", metavar="DOMAIN\\NAME",
                   help="try a real login with this user (also NAME or NAME@REALM)")
    p.add_argument("--password", help="the test user's password (visible to other local "
                   "users in the process list: prefer --password-file or $RPCPROXY_CHECK_PASSWORD;"
                   " asked for on a terminal when none is given)")
    p.add_argument("--password-file", metavar="PATH",
                   help="read the test user's password from the first line of PATH ('-': stdin)")
    p.add_argument("--email", metavar="ADDRESS",
                   help="address for the Autodiscover check (default: NAME@realm)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="name the certificate must cover (repeatable; default: the dotted "
                        "server_names)")


# --- the checks ------------------------------------------------------------------------------


def check_certificate(config: Config, hosts: list[str],
                      now: dt.datetime | None = None) -> list[Result]:
    from rpcproxy import certs

    what = "certificate"
    if not config.tls_cert or not config.tls_key:
        return [Result(WARN, what, f"TLS is off: {config.listen} serves plain HTTP. Outlook "
                       "needs HTTPS: set tls_cert/tls_key, or terminate TLS in front of rpcproxy")]
    cert, key = config.tls_cert, config.tls_key
    try:
        certs.server_ssl_context(cert, key)
        info = certs.inspect_certificate(cert)
    except certs.CertificateError as exc:
        return [Result(FAIL, what, exc.reason)]
    now = now or dt.datetime.now(dt.UTC)
    results: list[Result] = []
    if info.not_after <= now:
        ago = (now - info.not_after).days
        return [Result(FAIL, what, f"{cert} expired on {info.not_after:%Y-%m-%d} ({ago} days "
                       "ago): Outlook refuses it. Renew it and run: systemctl reload rpcproxy")]
    if info.not_before > now:
        return [Result(FAIL, what, f"{cert} is not valid before {info.not_before:%Y-%m-%d %H:%M} "
                       "UTC: check this machine's clock or the certificate")]
    names = hosts or [n for n in config.server_names if "." in n] or list(config.server_names)
    covered = info.dns_names + info.ip_addresses
    missing = [n for n in names if not certs.name_covered(info, n)]
    if missing:
        return [Result(FAIL, what, f"{cert} does not cover {', '.join(missing)} (it covers "
                       f"{', '.join(covered) or 'no names at all'}): Outlook will refuse the "
                       "connection. Make one with these names (rpcproxy cert --host NAME)")]
    days = int(info.days_left(now))
    message = (f"{cert} valid until {info.not_after:%Y-%m-%d} ({days} days), covers "
               f"{', '.join(names)}; key matches")
    if info.self_signed:
        message += "; self-signed: every Outlook machine must trust it explicitly"
    if days < EXPIRY_WARNING_DAYS:
        results.append(Result(WARN, what, message + f"; expires in {days} days: renew it now"))
    else:
        results.append(Result(OK, what, message))
    return results


async def check_backend(endpoint: Endpoint) -> Result:
    what = "backend"
    started = time.monotonic()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    except TimeoutError:
        return Result(FAIL, what, f"connecting to {endpoint} timed out after "
                      f"{CONNECT_TIMEOUT:g}s: a firewall, or the wrong address?")
    except socket.gaierror as exc:
        return Result(FAIL, what, resolve_failure(endpoint, exc))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return Result(FAIL, what, f"cannot connect to {endpoint}: {reason}. Is "
                      "Samba running with the mapiproxy endpoint on that port? "
                      "(rpcproxy provision samba)")
    writer.close()
    ms = (time.monotonic() - started) * 1000
    return Result(OK, what, f"{endpoint} accepts TCP connections ({ms:.0f} ms)")


def resolve_failure(endpoint: Endpoint, exc: socket.gaierror) -> str:
    """A name-resolution failure in words, instead of "Unknown error -3"."""
    meaning = _RESOLVER_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    return (f"cannot resolve the host name {endpoint.host!r} of {endpoint}: {meaning}. Check "
            f"the name in the configuration, /etc/resolv.conf, or use an IP address")


async def _resolves(endpoint: Endpoint) -> str | None:
    """None when the host name resolves, else the explanation."""
    try:
        await asyncio.get_running_loop().getaddrinfo(endpoint.host, endpoint.port,
                                                     type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return resolve_failure(endpoint, exc)
    return None


async def check_ntlm(config: Config) -> Result:
    """winbind answers through the configured ntlm_auth helper (a logon of an account that
    does not exist must be *rejected*; only a verdict proves winbindd is reachable)."""
    from ntlm import NtlmServerUnavailable, WinbindVerifier
    from rpcproxy.server import helper_pool

    what = "NTLM (winbind)"
    command = " ".join(config.ntlm_helper)
    verifier = WinbindVerifier(helper_pool(config), reply_timeout=CONNECT_TIMEOUT)
    try:
        await verifier.probe()
    except NtlmServerUnavailable as exc:
        return Result(FAIL, what, f"{exc.reason}. Logins cannot be checked, so every client "
                      "would get 503. Is winbindd running (samba on a DC, the winbind service "
                      "on a member), and may this user read its privileged pipe (Debian: "
                      "group winbindd_priv)? (rpcproxy provision winbind)")
    finally:
        await verifier.aclose()
    return Result(OK, what, f"{command} gives verdicts (an unknown account was rejected)")


async def check_login(config: Config, user: str, password: str) -> Result:
    from ntlm import AuthenticationFailed, NtlmServerUnavailable, WinbindVerifier, verify_password
    from rpcproxy.server import helper_pool

    what = "test login"
    verifier = WinbindVerifier(helper_pool(config), reply_timeout=CONNECT_TIMEOUT)
    try:
        identity = await verify_password(verifier, user, password)
    except AuthenticationFailed as exc:
        return Result(FAIL, what, f"{user} was refused: {exc.reason} (wrong password, unknown "
                      "or disabled user, or an expired password)")
    except NtlmServerUnavailable as exc:
        return Result(FAIL, what, f"could not ask winbind: {exc.reason}")
    finally:
        await verifier.aclose()
    return Result(OK, what, f"{user} logged in as {identity} (the account Samba authenticated)")


def check_autodiscover_settings(config: Config) -> list[str]:
    """Problems with what Autodiscover hands out (empty: none)."""
    from rpcproxy import certs
    from rpcproxy.autodiscover.service import resolve
    from rpcproxy.errors import TargetRefused
    from rpcproxy.targets import Target

    r = resolve(config).response
    problems = []
    rules = config.allow_list()
    for port in (p for p in (r.port, r.directory_port, r.referral_port) if p):
        try:
            rules.resolve(Target(r.exch_server, port))
        except TargetRefused:
            problems.append(f"EXCH server {r.exch_server}:{port} is not on the allow-list: "
                            "Outlook would be refused")
    if config.tls_cert:
        try:
            info = certs.inspect_certificate(config.tls_cert)
        except certs.CertificateError:
            info = None
        if info is not None and not certs.name_covered(info, r.proxy_server):
            problems.append(f"EXPR proxy host {r.proxy_server} is not covered by "
                            f"{config.tls_cert}: Outlook would refuse the certificate")
    return problems


async def check_directory(config: Config) -> tuple[Result, str]:
    """(result, realm) of the LDAP directory Autodiscover reads."""
    from rpcproxy.autodiscover.directory import DirectoryUnavailable, LdapDirectory
    from rpcproxy.autodiscover.settings import parse_table

    what = "directory"
    directory = LdapDirectory(parse_table(config.autodiscover))
    try:
        base, realm, netbios = await directory.naming()
    except DirectoryUnavailable as exc:
        directory.close()
        configured = bool(config.autodiscover)
        hint = ("" if configured else " (no [autodiscover] table: the default is Samba's "
                "privileged ldapi socket; set autodiscover.ldap_url)")
        return Result(FAIL if configured else WARN, what,
                      f"{directory.describe()}: {exc.reason}{hint}. Autodiscover answers "
                      "603 until this works"), ""
    directory.close()
    return Result(OK, what, f"{directory.describe()}: naming context {base}, realm {realm}, "
                  f"domain {netbios}"), realm


async def check_autodiscover(config: Config, user: str, password: str, email: str) -> Result:
    """A real Autodiscover request through a proxy on loopback; what Outlook is told."""
    import ssl

    import spnego

    from rpcproxy.autodiscover import pox
    from rpcproxy.server import ProxyServer

    what = "autodiscover"
    local = dataclasses_replace(config)
    server = ProxyServer(local)
    try:
        bound = await server.start()
    except OSError as exc:
        return Result(FAIL, what, f"cannot start a test listener: {exc}")
    try:
        host, port = bound[0]
        ctx = None
        if config.tls_cert:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # our own listener on loopback
        body = (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{pox.REQUEST_NS}">'
                f"<Request><EMailAddress>{escape(email)}</EMailAddress><AcceptableResponseSchema>"
                f"{pox.OUTLOOK_RESPONSE_NS}</AcceptableResponseSchema></Request></Autodiscover>"
                ).encode()
        client = spnego.client(user, password, protocol="ntlm")  # as check_login logs in
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
            try:
                token = client.step()
                status, data = await _post(reader, writer, body, token)
                if status == 401 and data:
                    status, data = await _post(reader, writer, body, client.step(data))
            finally:
                writer.close()
    except (OSError, TimeoutError, EOFError, asyncio.LimitOverrunError, ValueError,
            IndexError, spnego.exceptions.SpnegoError) as exc:  # EOFError: IncompleteReadError
        return Result(FAIL, what, f"the test request failed: {type(exc).__name__}: {exc}")
    finally:
        await server.stop()
    if status != 200:
        return Result(FAIL, what, f"{email} as {user}: HTTP {status} (login refused?)")
    return _describe_answer(email, data if isinstance(data, bytes) else b"")


def dataclasses_replace(config: Config) -> Config:
    import dataclasses

    table = {**config.autodiscover, "redirect_listen": ""}
    return dataclasses.replace(config, listen="127.0.0.1:0", http_listen=None, workers=1,
                               metrics_listen=None, autodiscover=table)


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes,
                token: bytes | None) -> tuple[int, bytes | None]:
    """One POST; (status, the NTLM challenge of a 401 or the body of anything else)."""
    import base64

    auth = f"Authorization: NTLM {base64.b64encode(token or b'').decode()}\r\n"
    writer.write((f"POST /Autodiscover/Autodiscover.xml HTTP/1.1\r\nHost: rpcproxy-check\r\n"
                  f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n{auth}\r\n"
                  ).encode() + body)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = [h.split(":", 1) for h in head[1:] if ":" in h]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    data = await reader.readexactly(length) if length else b""
    if status == 401:
        for k, v in headers:
            if k.lower() == "www-authenticate" and v.strip().startswith("NTLM "):
                return status, base64.b64decode(v.strip()[5:])
        return status, None
    return status, data


def _describe_answer(email: str, data: bytes) -> Result:
    import xml.etree.ElementTree as ET  # our own listener's answer, not a client's input

    from rpcproxy.autodiscover import pox

    what = "autodiscover"
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return Result(FAIL, what, "the answer is not XML")
    ns = {"a": pox.OUTLOOK_RESPONSE_NS, "e": pox.RESPONSE_NS}
    code = root.findtext("e:Response/e:Error/e:ErrorCode", namespaces=ns)
    if code is not None:
        message = root.findtext("e:Response/e:Error/e:Message", namespaces=ns)
        return Result(FAIL, what, f"{email}: error {code} ({message}); the proxy's log "
                      "says why")
    told = []
    for proto in root.iterfind("a:Response/a:Account/a:Protocol", ns):
        kind = proto.findtext("a:Type", namespaces=ns)
        fields = {c.tag.split("}")[1]: (c.text or "") for c in proto}
        if kind == "EXCH":
            told.append(f"EXCH server {fields.get('Server')} (ports {fields.get('Port', '-')}/"
                        f"{fields.get('DirectoryPort', '-')}/{fields.get('ReferralPort', '-')}, "
                        f"version {fields.get('ServerVersion')})")
        elif kind == "EXPR":
            told.append(f"Outlook Anywhere proxy {fields.get('Server')} (SSL "
                        f"{fields.get('SSL')}, {fields.get('AuthPackage')}, "
                        f"{fields.get('CertPrincipalName')})")
    name = root.findtext("a:Response/a:User/a:DisplayName", namespaces=ns)
    return Result(OK, what, f"{email}: Outlook is told: user {name!r}; " + "; ".join(told))


# --- running them ----------------------------------------------------------------------------


async def run_checks(config: Config, args: argparse.Namespace, password: str | None,
                     emit: Callable[[Result], None]) -> list[Result]:
    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        emit(result)

    for r in check_certificate(config, args.host):
        add(r)
    backends: list[Endpoint] = []
    for rule in config.allow_list().rules:
        if rule.backend not in backends:
            backends.append(rule.backend)
    if not backends:
        backends.append(config.backend_endpoint())
    for endpoint in backends:
        add(await check_backend(endpoint))
    ntlm = await check_ntlm(config)
    add(ntlm)
    login_ok = False
    if not args.user:
        add(Result(SKIP, "test login", "give --user DOMAIN\\name --password P to try a real "
                   "login"))
    elif ntlm.status == FAIL:
        add(Result(SKIP, "test login", "winbind gives no verdicts"))
    else:
        login = await check_login(config, args.user, password or "")
        login_ok = login.status == OK
        add(login)
    from rpcproxy.autodiscover.settings import parse_table

    if not parse_table(config.autodiscover).enabled:
        add(Result(SKIP, "directory", "Autodiscover is turned off (autodiscover.enabled)"))
        add(Result(SKIP, "autodiscover", "turned off"))
        return results
    directory, realm = await check_directory(config)
    add(directory)
    problems = check_autodiscover_settings(config)
    if problems:
        add(Result(WARN, "autodiscover", "; ".join(problems)))
    if not args.user:
        if not problems:
            add(Result(SKIP, "autodiscover", "give --user and --password to run a real "
                       "Autodiscover request"))
    elif not login_ok or directory.status != OK:
        if not problems:
            add(Result(SKIP, "autodiscover", "needs winbind, a login and the directory"))
    else:
        name = args.user.rpartition("\\")[2].split("@")[0]
        email = args.email or (args.user if "@" in args.user else f"{name}@{realm}")
        add(await check_autodiscover(config, args.user, password or "", email))
    return results


def _describe(config: Config, path: str | None) -> str:
    source = f"{path} is valid" if path else "built-in defaults and command-line options are valid"
    tls = "TLS" if config.tls_cert else "plain HTTP"
    rules = config.allow_list()
    return (f"{source}: listen {config.listen} ({tls}), backend {config.backend}, NTLM judged "
            f"by {' '.join(config.ntlm_helper)}, {len(rules)} target rule(s): "
            f"{', '.join(str(r) for r in rules.rules)}")


def read_password(args: argparse.Namespace, env: dict[str, str] | None = None) -> str | None:
    """--password, --password-file, $RPCPROXY_CHECK_PASSWORD, else a terminal prompt.

    Raises ``PasswordUnavailable`` with what to do when none of them gives one.
    """
    if args.password is not None:
        return str(args.password)
    if args.password_file:
        try:
            if args.password_file == "-":
                text = sys.stdin.readline()
            else:
                with open(args.password_file, encoding="utf-8") as fh:
                    text = fh.readline()
        except OSError as exc:
            raise PasswordUnavailable(f"cannot read --password-file {args.password_file}: "
                                      f"{exc.strerror or exc}") from None
        return text.rstrip("\r\n")
    value = (os.environ if env is None else env).get(PASSWORD_ENV)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise PasswordUnavailable(f"--user needs a password and there is no terminal to ask: "
                                  f"give --password-file PATH (or '-' for stdin), set "
                                  f"{PASSWORD_ENV}, or --password")
    try:
        return getpass.getpass(f"Password for {args.user}: ")
    except EOFError:
        raise PasswordUnavailable("no password entered (end of input at the prompt)") from None


class PasswordUnavailable(Exception):
    pass


def config_path(args: argparse.Namespace) -> str | None:
    """--config, else the unit's file when it exists (what ``rpcproxy serve`` runs with)."""
    if args.config is None and Path(SERVICE_CONFIG).is_file():
        args.config = SERVICE_CONFIG
    return str(args.config) if args.config else None


def run(args: argparse.Namespace) -> int:
    def emit(result: Result) -> None:
        print(result.line(), flush=True)

    config_path(args)
    try:
        config = config_from_args(args)
        config.allow_list()
    except ConfigError as exc:
        emit(Result(FAIL, "configuration", exc.reason))
        for what in ("certificate", "backend", "NTLM (winbind)", "test login", "directory",
                     "autodiscover"):
            emit(Result(SKIP, what, "the configuration is not valid"))
        print("1 check failed")
        return 1
    emit(Result(OK, "configuration", _describe(config, args.config)))
    flags = ("listen", "backend", "target", "server_names", "tls_cert", "ntlm_helper")
    if (args.config is None and not any(getattr(args, f, None) for f in flags)
            and any(k.startswith("RPCPROXY_") for k in os.environ)):
        emit(Result(WARN, "configuration", "these are rpcproxy's built-in defaults, not the "
                    "container's settings (RPCPROXY_* variables): run rpcproxy-entrypoint "
                    "check instead"))

    password = None
    if args.user:
        try:
            password = read_password(args)
        except PasswordUnavailable as exc:
            print(f"rpcproxy check: {exc}", file=sys.stderr)
            return 2
    try:
        results = asyncio.run(run_checks(config, args, password, emit))
    except Exception as exc:  # noqa: BLE001 - an admin tool says what broke, no traceback
        emit(Result(FAIL, "check", f"stopped by an unexpected error: {type(exc).__name__}: "
                    f"{exc}"))
        print("1 check failed")
        return 1
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    if failed:
        print(f"{failed} check(s) failed")
        return 1
    print("all checks passed" + (f" ({warned} warning(s))" if warned else ""))
    return 0
