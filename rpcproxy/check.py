"""``rpcproxy check``: is this installation going to work? One line per part, in admin words.

Reads the configuration exactly like ``rpcproxy serve`` (same file, same flags), then:

1. configuration   every value valid (a failure here stops the other checks);
2. certificate     key matches, not expired / not yet valid, covers the names clients use;
3. backend         each backend of the allow-list accepts a TCP connection;
4. NTLM (winbind)  the configured ntlm_auth helper starts and winbind gives verdicts (a
                   logon of an account that does not exist is rejected);
5. test login      with ``--user``: a real NTLM login through the same helper pool the proxy
                   uses (``ntlm.verify_password``), printing the account Samba authenticated.

Lines start with ``[ OK ]``, ``[FAIL]``, ``[WARN]`` (works, but look at it) or ``[SKIP]``.
The exit status is 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rpcproxy.config import Config
from rpcproxy.errors import ConfigError
from rpcproxy.targets import Endpoint

OK, FAIL, WARN, SKIP = "[ OK ]", "[FAIL]", "[WARN]", "[SKIP]"
EXPIRY_WARNING_DAYS = 14
CONNECT_TIMEOUT = 5.0


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
    p.add_argument("--password", help="the test user's password (asked for when omitted)")
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
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return Result(FAIL, what, f"cannot connect to {endpoint}: {reason}. Is "
                      "Samba running with the mapiproxy endpoint on that port? "
                      "(rpcproxy provision samba)")
    writer.close()
    ms = (time.monotonic() - started) * 1000
    return Result(OK, what, f"{endpoint} accepts TCP connections ({ms:.0f} ms)")


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
    if not args.user:
        add(Result(SKIP, "test login", "give --user DOMAIN\\name --password P to try a real "
                   "login"))
    elif ntlm.status == FAIL:
        add(Result(SKIP, "test login", "winbind gives no verdicts"))
    else:
        add(await check_login(config, args.user, password or ""))
    return results


def _describe(config: Config, path: str | None) -> str:
    source = f"{path} is valid" if path else "built-in defaults and command-line options are valid"
    tls = "TLS" if config.tls_cert else "plain HTTP"
    rules = config.allow_list()
    return (f"{source}: listen {config.listen} ({tls}), backend {config.backend}, NTLM judged "
            f"by {' '.join(config.ntlm_helper)}, {len(rules)} target rule(s): "
            f"{', '.join(str(r) for r in rules.rules)}")


def run(args: argparse.Namespace) -> int:
    from rpcproxy.cli import config_from_args

    def emit(result: Result) -> None:
        print(result.line(), flush=True)

    try:
        config = config_from_args(args)
        config.allow_list()
    except ConfigError as exc:
        emit(Result(FAIL, "configuration", exc.reason))
        for what in ("certificate", "backend", "NTLM (winbind)", "test login"):
            emit(Result(SKIP, what, "the configuration is not valid"))
        print("1 check failed")
        return 1
    emit(Result(OK, "configuration", _describe(config, args.config)))

    password = args.password
    if args.user and password is None:
        if sys.stdin.isatty():
            password = getpass.getpass(f"Password for {args.user}: ")
        else:
            print("rpcproxy check: --user needs --password (or a terminal to ask)",
                  file=sys.stderr)
            return 2
    results = asyncio.run(run_checks(config, args, password, emit))
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    if failed:
        print(f"{failed} check(s) failed")
        return 1
    print("all checks passed" + (f" ({warned} warning(s))" if warned else ""))
    return 0
