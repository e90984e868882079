"""Configuration: embedded defaults, then a TOML file, then command-line flags.

``rpcproxy serve`` runs with no file at all. A TOML file (``--config``) may
set any key of ``Config`` at top level; flags override the file. Every value
is checked here, so a mistake is reported before anything listens.

Example file::

    listen = "0.0.0.0:443"
    backend = "127.0.0.1:1024"          # Samba mapiproxy ncacn_ip_tcp endpoint
    server_names = ["mail.example.com", "mail"]
    targets = ["mail.example.com:6001-6004=127.0.0.1:1024"]
    tls_cert = "/etc/rpcproxy/cert.pem"
    tls_key = "/etc/rpcproxy/key.pem"
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpcproxy.connection import VcSettings
from rpcproxy.errors import ConfigError
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
    ntlm_server: str | None = None  # where NTLM is verified; defaults to backend
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
    max_pending_handshakes: int = 256
    handshake_timeout: float = 30.0  # seconds a connection may stay unauthenticated
    max_unauthenticated_connections: int = 1024
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

    # ---- derived views ------------------------------------------------------------------

    def backend_endpoint(self) -> Endpoint:
        return parse_endpoint(self.backend, "backend")

    def ntlm_endpoint(self) -> Endpoint:
        return parse_endpoint(self.ntlm_server or self.backend, "ntlm_server")

    def listen_endpoint(self) -> Endpoint:
        return parse_endpoint(self.listen, "listen", listen=True)

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
        if self.ntlm_server:
            parse_endpoint(self.ntlm_server, "ntlm_server")
        if self.http_listen:
            parse_endpoint(self.http_listen, "http_listen", listen=True)
        if self.metrics_listen:
            parse_endpoint(self.metrics_listen, "metrics_listen", listen=True)
        self.allow_list()
        self.vc_settings()
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
                     "max_connections_per_user"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


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
            if name not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            values[name] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    config = Config()
    for name, value in values.items():
        default = getattr(config, name)
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
