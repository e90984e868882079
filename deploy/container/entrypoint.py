#!/usr/bin/env python3
"""Container entrypoint: environment variables -> ``rpcproxy serve``; first-start certificate.

    rpcproxy-entrypoint [EXTRA SERVE ARGS...]   prepare, then exec rpcproxy serve
    rpcproxy-entrypoint health                   exit 0 when /health answers 200 (HEALTHCHECK,
                                                 or an exec probe of any orchestrator)
    rpcproxy-entrypoint check [CHECK ARGS...]    rpcproxy check with exactly the settings
                                                 the service runs with (--user, --password-file)
    rpcproxy-entrypoint plan                     print the serve command line, do not exec

Precedence, for every setting: an environment variable below, then the mounted TOML
file, then the image's defaults (RPCPROXY_LISTEN and RPCPROXY_METRICS_LISTEN below),
then rpcproxy's own built-in defaults.

Environment (all optional except RPCPROXY_BACKEND when no config file is mounted):

    RPCPROXY_CONFIG          TOML file (default /etc/rpcproxy/rpcproxy.toml when it exists);
                             the variables below override it
    RPCPROXY_BACKEND         Samba mapiproxy endpoint HOST:PORT, e.g. samba:1024
    RPCPROXY_NTLM_HELPER     the winbind NTLM helper command (default: ntlm_auth
                             --helper-protocol=squid-2.5-ntlmssp; it needs the host's winbind:
                             see the Containerfile)
    RPCPROXY_SERVER_NAME     name(s) Outlook uses, comma or space separated
    RPCPROXY_TARGETS         allow-list rule(s) NAME:PORTS[=HOST:PORT], comma or space separated
    RPCPROXY_TLS_CERT        mounted certificate (PEM) ...
    RPCPROXY_TLS_KEY         ... and its key; without both (and without tls_cert in the
                             config file) a self-signed pair is generated at first start
                             under $RPCPROXY_STATE_DIR/tls and a WARNING is logged
    RPCPROXY_LISTEN          default 0.0.0.0:8443 (publish it as 443: -p 443:8443); an
                             unprivileged port, since the container user (uid 10001) may
                             not bind 443 under every runtime (podman 4.3 on Debian 12)
    RPCPROXY_METRICS_LISTEN  default 0.0.0.0:9090 (/metrics and /health; HEALTHCHECK uses it)

A mounted key or certificate must be readable by uid 10001, the user the image runs as.
    RPCPROXY_LOG_LEVEL, RPCPROXY_LOG_FORMAT, RPCPROXY_WORKERS
    RPCPROXY_STATE_DIR       default /var/lib/rpcproxy (a volume keeps the generated pair)
    RPCPROXY_BIN             the rpcproxy executable (default: rpcproxy on PATH)

The process execs rpcproxy, so it is PID 1's only program and gets SIGTERM directly.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_CONFIG = "/etc/rpcproxy/rpcproxy.toml"
DEFAULT_LISTEN = "0.0.0.0:8443"
DEFAULT_METRICS = "0.0.0.0:9090"
DEFAULT_STATE_DIR = "/var/lib/rpcproxy"


class EntrypointError(Exception):
    """A setting is missing or wrong; the message says which and what to do."""


def say(message: str) -> None:
    print(f"rpcproxy-entrypoint: {message}", file=sys.stderr, flush=True)


def _split(value: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", value.strip()) if item]


def _config_file(env: Mapping[str, str]) -> str | None:
    path = env.get("RPCPROXY_CONFIG", "").strip()
    if path:
        if not Path(path).is_file():
            raise EntrypointError(f"RPCPROXY_CONFIG={path}: no such file (mount it, or unset it)")
        return path
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def _config_values(path: str | None) -> dict[str, object]:
    if path is None:
        return {}
    import tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EntrypointError(f"cannot read the config file {path}: {exc}") from None


def _unreadable(what: str, path: str) -> str:
    uid = os.geteuid()
    return (f"{what}={path}: permission denied: this container runs as uid {uid}, which "
            f"cannot read the mounted file. On the host: chown {uid} FILE && chmod 0600 FILE "
            f"(rootless podman: podman unshare chown {uid} FILE), or mount a copy that "
            f"uid {uid} may read")


def _setting(env: Mapping[str, str], var: str, file_values: Mapping[str, object],
             key: str, default: str) -> str | None:
    """The value to pass as a flag: the variable, else None when the file sets the key
    (the file then wins over the image default), else the image default."""
    value = env.get(var, "").strip()
    if value:
        return value
    if key in file_values:
        return None
    return default


def _certificate(env: Mapping[str, str], names: list[str], state_dir: Path) -> tuple[str, str]:
    """The mounted pair, or a self-signed one generated (once) in the state directory."""
    cert, key = env.get("RPCPROXY_TLS_CERT", "").strip(), env.get("RPCPROXY_TLS_KEY", "").strip()
    if cert or key:
        if not (cert and key):
            raise EntrypointError("set both RPCPROXY_TLS_CERT and RPCPROXY_TLS_KEY (or neither)")
        for what, path in (("RPCPROXY_TLS_CERT", cert), ("RPCPROXY_TLS_KEY", key)):
            if not Path(path).is_file():
                raise EntrypointError(f"{what}={path}: no such file (is the secret mounted?)")
            if not os.access(path, os.R_OK):
                raise EntrypointError(_unreadable(what, path))
        return cert, key

    from rpcproxy import certs

    tls_dir = state_dir / "tls"
    cert_path, key_path = tls_dir / certs.CERT_FILE_NAME, tls_dir / certs.KEY_FILE_NAME
    host = names[0] if names else socket.getfqdn().lower()
    if cert_path.is_file() and key_path.is_file():
        info = certs.inspect_certificate(cert_path)
        shown = ", ".join(info.dns_names)
        how = "reusing the SELF-SIGNED certificate generated at an earlier start"
    else:
        try:
            made = certs.create_self_signed(host, tls_dir, extra_names=names[1:], overwrite=True)
        except OSError as exc:
            raise EntrypointError(f"cannot write a certificate to {tls_dir}: "
                                  f"{exc.strerror or exc} (is {state_dir} writable?)") from None
        shown = ", ".join(made.names)
        how = "generated a SELF-SIGNED certificate"
    say(f"WARNING: no TLS certificate mounted (RPCPROXY_TLS_CERT/RPCPROXY_TLS_KEY unset): "
        f"{how} for {shown} in {tls_dir}. Outlook will not trust it unless it is imported "
        f"on every client; mount a real certificate for production.")
    return str(cert_path), str(key_path)


def plan(env: Mapping[str, str], extra: Sequence[str] = ()) -> list[str]:
    """The full ``rpcproxy serve`` command line; generates the certificate if needed."""
    argv = [env.get("RPCPROXY_BIN", "").strip() or "rpcproxy", "serve"]
    config_path = _config_file(env)
    file_values = _config_values(config_path)
    if config_path:
        argv += ["--config", config_path]

    listen = _setting(env, "RPCPROXY_LISTEN", file_values, "listen", DEFAULT_LISTEN)
    if listen:
        argv += ["--listen", listen]

    backend = env.get("RPCPROXY_BACKEND", "").strip()
    if backend:
        argv += ["--backend", backend]
    elif "backend" not in file_values:
        raise EntrypointError("RPCPROXY_BACKEND is not set: give the Samba mapiproxy endpoint, "
                              "e.g. RPCPROXY_BACKEND=samba.example.com:1024")
    ntlm = env.get("RPCPROXY_NTLM_HELPER", "").strip()
    if ntlm:
        argv += ["--ntlm-helper", ntlm]
    if env.get("RPCPROXY_NTLM_SERVER", "").strip():
        raise EntrypointError("RPCPROXY_NTLM_SERVER is gone: NTLM is judged by the host's "
                              "winbind through ntlm_auth (mount /run/samba/winbindd, see the "
                              "Containerfile); unset RPCPROXY_NTLM_SERVER")

    names = _split(env.get("RPCPROXY_SERVER_NAME", ""))
    for name in names:
        argv += ["--server-name", name]
    if not names:
        file_names = file_values.get("server_names")
        if isinstance(file_names, list):
            names = [str(n) for n in file_names]
    for rule in _split(env.get("RPCPROXY_TARGETS", "")):
        argv += ["--target", rule]

    if not file_values.get("tls_cert") or env.get("RPCPROXY_TLS_CERT"):
        state_dir = Path(env.get("RPCPROXY_STATE_DIR", "").strip() or DEFAULT_STATE_DIR)
        cert, key = _certificate(env, names, state_dir)
        argv += ["--tls-cert", cert, "--tls-key", key]

    metrics = _setting(env, "RPCPROXY_METRICS_LISTEN", file_values, "metrics_listen",
                       DEFAULT_METRICS)
    if metrics:
        argv += ["--metrics-listen", metrics]
    for var, flag in (("RPCPROXY_LOG_LEVEL", "--log-level"),
                      ("RPCPROXY_LOG_FORMAT", "--log-format"),
                      ("RPCPROXY_WORKERS", "--workers")):
        value = env.get(var, "").strip()
        if value:
            argv += [flag, value]
    return argv + list(extra)


def check_command(env: Mapping[str, str], extra: Sequence[str] = ()) -> list[str]:
    """``rpcproxy check`` with the same settings ``plan`` gives ``rpcproxy serve``."""
    serve = plan(env)
    argv = [serve[0], "check"]
    rest = serve[2:]
    i = 0
    while i < len(rest):
        if rest[i] in ("--metrics-listen", "--workers"):  # serve-only options
            i += 2
            continue
        argv.append(rest[i])
        i += 1
    return argv + list(extra)


def health(env: Mapping[str, str], timeout: float = 4.0) -> int:
    """0 when the proxy's /health says ok (what the container HEALTHCHECK runs)."""
    try:
        file_values = _config_values(_config_file(env))
    except EntrypointError as exc:
        say(f"health check: {exc}")
        return 1
    address = _setting(env, "RPCPROXY_METRICS_LISTEN", file_values, "metrics_listen",
                       DEFAULT_METRICS) or str(file_values.get("metrics_listen", ""))
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        say(f"health check {url} failed: {exc}")
        return 1


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    if args[:1] == ["health"]:
        return health(env)
    if args[:1] == ["check"]:
        try:
            command = check_command(env, args[1:])
        except EntrypointError as exc:
            say(f"error: {exc}")
            return 2
        os.execvp(command[0], command)
    dry_run = args[:1] == ["plan"]
    if dry_run:
        args = args[1:]
    try:
        command = plan(env, args)
    except EntrypointError as exc:
        say(f"error: {exc}")
        return 2
    if dry_run:
        print(shlex.join(command))
        return 0
    say("exec " + " ".join(command))
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
