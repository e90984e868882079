"""``rpcproxy check``: is this installation going to work? One line per part, in admin words.

Reads the configuration exactly like ``rpcproxy serve`` (same file, same flags; without
``--config`` the unit's file ``/etc/rpcproxy/rpcproxy.toml`` when it exists; in the
container ``rpcproxy-entrypoint check`` adds the image's settings), then:

1. configuration   every value valid (a failure here stops the other checks);
2. certificate     key matches, not expired / not yet valid, covers the names clients use;
3. backend         each backend of the allow-list accepts a TCP connection;
4. NTLM server     answers a DCE/RPC BIND carrying an NTLM NEGOTIATE with a CHALLENGE;
5. test login      with ``--user``: a real NTLM login through the pass-through path the
                   proxy uses for Basic credentials (``ntlm.verify_password``).

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

from rpcproxy.config import Config
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


async def check_ntlm(endpoint: Endpoint) -> Result:
    from ntlm import AuthenticationFailed, NtlmServerUnavailable, NtlmVerifier
    from ntlm.messages import build_negotiate

    what = "NTLM server"
    unresolved = await _resolves(endpoint)
    if unresolved:
        return Result(FAIL, what, unresolved + ". Logins cannot be checked, so every client "
                      "would get 503")
    verifier = NtlmVerifier((endpoint.host, endpoint.port), connect_timeout=CONNECT_TIMEOUT,
                            reply_timeout=CONNECT_TIMEOUT)
    try:
        handshake = await verifier.begin(build_negotiate())
    except NtlmServerUnavailable as exc:
        return Result(FAIL, what, f"{exc.reason}. Logins cannot be checked, so every client "
                      "would get 503")
    except AuthenticationFailed as exc:
        return Result(FAIL, what, f"{endpoint} refused the NTLM BIND: {exc.reason}")
    domain = handshake.domain
    handshake.close()
    return Result(OK, what, f"{endpoint} answered a BIND with an NTLM challenge "
                  f"(domain {domain or '?'})")


async def check_login(endpoint: Endpoint, user: str, password: str) -> Result:
    from ntlm import AuthenticationFailed, NtlmServerUnavailable, NtlmVerifier, verify_password

    what = "test login"
    verifier = NtlmVerifier((endpoint.host, endpoint.port), connect_timeout=CONNECT_TIMEOUT,
                            reply_timeout=CONNECT_TIMEOUT)
    try:
        identity = await verify_password(verifier, user, password)
    except AuthenticationFailed as exc:
        return Result(FAIL, what, f"{user} was refused: {exc.reason} (wrong password, unknown "
                      "or disabled user, or an expired password)")
    except NtlmServerUnavailable as exc:
        return Result(FAIL, what, f"could not ask the NTLM server: {exc.reason}")
    return Result(OK, what, f"{user} logged in as {identity} through the NTLM pass-through")


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
    ntlm_ep = config.ntlm_endpoint()
    ntlm = await check_ntlm(ntlm_ep)
    add(ntlm)
    if not args.user:
        add(Result(SKIP, "test login", "give --user DOMAIN\\name --password P to try a real "
                   "login"))
    elif ntlm.status == FAIL:
        add(Result(SKIP, "test login", "the NTLM server does not answer"))
    else:
        add(await check_login(ntlm_ep, args.user, password or ""))
    return results


def _describe(config: Config, path: str | None) -> str:
    source = f"{path} is valid" if path else "built-in defaults and command-line options are valid"
    tls = "TLS" if config.tls_cert else "plain HTTP"
    rules = config.allow_list()
    return (f"{source}: listen {config.listen} ({tls}), backend {config.backend}, NTLM server "
            f"{config.ntlm_endpoint()}, {len(rules)} target rule(s): "
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


def _config_path(args: argparse.Namespace) -> str | None:
    """--config, else the unit's file when it exists (what ``rpcproxy serve`` runs with)."""
    if args.config is None and Path(SERVICE_CONFIG).is_file():
        args.config = SERVICE_CONFIG
    return str(args.config) if args.config else None


def run(args: argparse.Namespace) -> int:
    from rpcproxy.cli import config_from_args

    def emit(result: Result) -> None:
        print(result.line(), flush=True)

    _config_path(args)
    try:
        config = config_from_args(args)
        config.allow_list()
    except ConfigError as exc:
        emit(Result(FAIL, "configuration", exc.reason))
        for what in ("certificate", "backend", "NTLM server", "test login"):
            emit(Result(SKIP, what, "the configuration is not valid"))
        print("1 check failed")
        return 1
    emit(Result(OK, "configuration", _describe(config, args.config)))
    flags = ("listen", "backend", "target", "server_names", "tls_cert", "ntlm_server")
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
