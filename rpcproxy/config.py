"""Configuration: embedded defaults, then a TOML file, then command-line flags.

``rpcproxy serve`` runs with no file at all. A TOML file (``--config``) may
set any key of ``Config`` at top level; flags override the file. Every value
is checked here, so a mistake is reported before anything listens. The flag
half lives here too (``add_config_arguments``, ``config_from_args``): the
command line, ``rpcproxy check`` and a reload all build a ``Config`` one way.

Example file::

    listen = "0.0.0.0:443"
    backend = "127.0.0.1:1024"          # Samba mapiproxy ncacn_ip_tcp endpoint
    server_names = ["mail.example.com", "mail"]
    targets = ["mail.example.com:6001-6004=127.0.0.1:1024"]
    tls_cert = "/etc/rpcproxy/cert.pem"
    tls_key = "/etc/rpcproxy/key.pem"
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcerpc.pdu import MAX_FRAG_LENGTH
from ntlm.winbind import DEFAULT_HELPER
from rpcproxy.autodiscover.settings import parse_table
from rpcproxy.errors import ConfigError
from rpcproxy.ratelimit import Exemptions
from rpcproxy.rpch.channels import OUT_RTS_HEADROOM, VcSettings, min_out_content_length
from rpcproxy.targets import (
    AllowList,
    Endpoint,
    default_rules,
    parse_endpoint,
    parse_rule,
)


def _default_server_names() -> list[str]:
    names = {"localhost"}
    host = socket.gethostname()
    if host:
        names.add(host.lower())
        names.add(host.split(".")[0].lower())
    return sorted(names)


@dataclass
class Config:
    listen: str = "127.0.0.1:8080"  # plain HTTP; put TLS in front or set tls_cert/tls_key
    backend: str = "127.0.0.1:1024"  # the Samba mapiproxy endpoint (ncacn_ip_tcp)
    # NTLM is judged by winbind through Samba's ntlm_auth helper (ntlm.winbind): the command
    # (a list, or a string split like a shell would), how many run at once per worker, and how
    # long a login may wait for a free one before it is answered 503.
    ntlm_helper: list[str] = field(default_factory=lambda: list(DEFAULT_HELPER))
    ntlm_helpers: int = 32
    auth_queue_timeout: float = 15.0
    # One source (as for the per-source bounds below) holds at most this many helpers at once;
    # its further logins wait their turn. A handshake whose client never sends its
    # AUTHENTICATE gives its helper back after ntlm_challenge_timeout.
    ntlm_helpers_per_source: int = 8
    ntlm_challenge_timeout: float = 10.0
    server_names: list[str] = field(default_factory=_default_server_names)
    targets: list[str] = field(default_factory=list)  # replaces the default rules when set
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_session_tickets: int = 2  # TLS 1.3 tickets per handshake; 0 for Samba's ncacn_http
    tls_transport: str = "lean"  # rpcproxy.tls, or "loop": the event loop's TLS transport
    http_listen: str | None = None  # optional second, plain-HTTP listener next to TLS
    metrics_listen: str | None = None
    allow_basic: bool = True
    basic_over_http: bool = False  # Basic without TLS only when explicitly allowed
    # Handshakes waiting for or holding an ntlm_auth helper (a waiting one costs a few hundred
    # bytes: a reconnect storm of thousands of channels queues instead of failing).
    max_pending_handshakes: int = 4096
    handshake_timeout: float = 30.0  # seconds a connection may stay unauthenticated
    max_unauthenticated_connections: int = 4096
    # One source (IPv4 address, IPv6 /64) may hold only this share of the two bounds above.
    max_unauthenticated_per_source: int = 256
    max_pending_handshakes_per_source: int = 256
    # Front proxies (TLS terminator, HAProxy) whose clients share one address: global bounds only.
    per_source_exempt: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Front proxies that open each connection with a PROXY protocol (v1/v2) header naming the
    # client; connections from these addresses must have one, from others it is not honoured.
    proxy_protocol_from: list[str] = field(default_factory=list)
    refusal_log_interval: float = 10.0  # seconds; refusals beyond a few are summarised
    max_connections_per_user: int = 100  # virtual connections one user may hold (per worker)
    backend_connect_timeout: float = 5.0
    backend_connect_retries: int = 2
    receive_window: int = 0x40000
    connection_timeout: int = 120  # seconds, announced in CONN/A3 and CONN/C2
    out_content_length: int = 0x40000000
    setup_timeout: float = 30.0
    recycle_timeout: float = 60.0
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    autodiscover: dict[str, Any] = field(default_factory=dict)  # the [autodiscover] table

    # ---- derived views ------------------------------------------------------------------

    def backend_endpoint(self) -> Endpoint:
        return parse_endpoint(self.backend, "backend")

    def listen_endpoint(self) -> Endpoint:
        return parse_endpoint(self.listen, "listen", listen=True)

    def listen_addresses(self) -> list[tuple[str, bool]]:
        """(address, tls) of every listener, in the order the server opens them (the
        supervisor of ``--workers`` binds the same list before forking)."""
        if self.tls_cert:
            out = [(self.listen, True)]
            if self.http_listen:
                out.append((self.http_listen, False))
            return out
        return [(self.listen, False)]

    def allow_list(self) -> AllowList:
        backend = self.backend_endpoint()
        if self.targets:
            return AllowList([parse_rule(t, backend) for t in self.targets])
        return AllowList(default_rules(self.server_names, backend))

    def vc_settings(self) -> VcSettings:
        try:
            return VcSettings(
                receive_window=self.receive_window,
                connection_timeout_ms=self.connection_timeout * 1000,
                out_content_length=self.out_content_length,
                setup_timeout=self.setup_timeout,
                recycle_timeout=self.recycle_timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"invalid setting: {exc}") from None

    def validate(self) -> None:
        """Raise ConfigError with a readable reason for the first bad value."""
        self.listen_endpoint()
        self.backend_endpoint()
        if not self.ntlm_helper or not all(isinstance(a, str) and a for a in self.ntlm_helper):
            raise ConfigError("ntlm_helper must be a non-empty command, e.g. "
                              "[\"ntlm_auth\", \"--helper-protocol=squid-2.5-ntlmssp\"]")
        if self.auth_queue_timeout <= 0 or self.ntlm_challenge_timeout <= 0:
            raise ConfigError("auth_queue_timeout and ntlm_challenge_timeout must be positive")
        if self.http_listen:
            parse_endpoint(self.http_listen, "http_listen", listen=True)
        if self.metrics_listen:
            parse_endpoint(self.metrics_listen, "metrics_listen", listen=True)
        self.allow_list()
        vc = self.vc_settings()
        least = min_out_content_length(vc.out_reserve)
        if self.out_content_length < least:
            raise ConfigError(
                f"out_content_length {self.out_content_length} is too small: an OUT channel "
                f"must carry the largest DCE/RPC fragment ({MAX_FRAG_LENGTH} bytes, whatever "
                f"max_recv_frag the endpoints negotiate) plus {vc.out_reserve} bytes kept for "
                f"pings and recycling and {OUT_RTS_HEADROOM} for the proxy's own RTS PDUs: "
                f"use at least {least}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be given together")
        if not 0 <= self.tls_session_tickets <= 16:
            raise ConfigError("tls_session_tickets must be between 0 and 16")
        if self.tls_transport not in ("lean", "loop"):
            raise ConfigError("tls_transport must be 'lean' or 'loop'")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be 'text' or 'json'")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        for name in ("max_pending_handshakes", "max_unauthenticated_connections",
                     "max_connections_per_user", "max_unauthenticated_per_source",
                     "max_pending_handshakes_per_source", "ntlm_helpers",
                     "ntlm_helpers_per_source"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        try:
            Exemptions(self.per_source_exempt)
            Exemptions(self.proxy_protocol_from)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.refusal_log_interval <= 0 or self.handshake_timeout <= 0:
            raise ConfigError("refusal_log_interval and handshake_timeout must be positive")
        parse_table(self.autodiscover)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Keys that existed once: a file that still sets one is told what replaced it.
_REMOVED = {
    "ntlm_server": "NTLM is no longer relayed to a DCE/RPC port: winbind judges it through "
                   "Samba's ntlm_auth (see ntlm_helper); remove ntlm_server",
}


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- TOML file <- overrides (flags); validated."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name in _REMOVED:
                raise ConfigError(f"config file {path}: {key!r}: {_REMOVED[name]}")
            if name not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            values[name] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    config = Config()
    for name, value in values.items():
        default = getattr(config, name)
        if name == "ntlm_helper" and isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as exc:  # e.g. an unclosed quote: a config error, not a crash
                raise ConfigError(f"ntlm_helper {value!r}: {exc}") from None
        if default is not None and not isinstance(value, type(default)):
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            else:
                raise ConfigError(
                    f"setting {name!r} must be a {type(default).__name__}, not {value!r}"
                )
        setattr(config, name, value)
    config.validate()
    return config


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``serve`` and ``check`` share (each overrides the TOML key of its name)."""
    p.add_argument("--config", metavar="PATH", help="TOML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080)")
    p.add_argument("--backend", metavar="HOST:PORT",
                   help="the Samba mapiproxy ncacn_ip_tcp endpoint (default 127.0.0.1:1024)")
    p.add_argument("--target", metavar="NAME:PORT[=HOST:PORT]", action="append",
                   help="allow-list entry (repeatable; replaces the default "
                        "<server names>:6001,6002,6004 -> backend)")
    p.add_argument("--server-name", metavar="NAME", action="append", dest="server_names",
                   help="server name clients put in the URL (repeatable; for the default rules)")
    p.add_argument("--ntlm-helper", metavar="COMMAND",
                   help="the winbind NTLM helper that judges logins (default: "
                        "'ntlm_auth --helper-protocol=squid-2.5-ntlmssp')")
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--http-listen", metavar="HOST:PORT",
                   help="extra plain-HTTP listener when TLS is on")
    p.add_argument("--basic-over-http", action="store_true", default=None,
                   help="allow Basic authentication without TLS (testing only)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- ``args.config`` <- the flags ``args`` carries (ConfigError if invalid)."""
    overrides: dict[str, Any] = {
        "listen": args.listen,
        "backend": args.backend,
        "targets": args.target,
        "server_names": args.server_names,
        "ntlm_helper": args.ntlm_helper,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "http_listen": args.http_listen,
        "basic_over_http": args.basic_over_http,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    for extra in ("workers", "metrics_listen"):  # flags only ``serve`` has
        if hasattr(args, extra):
            overrides[extra] = getattr(args, extra)
    return load(args.config, overrides)
