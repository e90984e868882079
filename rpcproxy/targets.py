"""Which ``server:port`` a client may ask for, and where it really goes.

Theory of operation
-------------------
A v2 channel URL is ``/rpc/rpcproxy.dll?<server>:<port>`` ([MS-RPCH]
2.2.2; docs/protocol-notes.md section 1). Microsoft's RPC proxy only forwards to entries
of its ``ValidPorts`` registry value (``host:port[-port];...``, trailing
``*`` wildcard on the host, matched case-insensitively on the exact string
the client sent, no DNS). We keep that spirit and add the one thing a
translating proxy needs: each entry also names the backend ncacn_ip_tcp
endpoint it maps to. Nothing outside the list is reachable, so the proxy can
never be used as an open relay.

Rule syntax (config file and ``--target``)::

    NAME:PORTS[=HOST:PORT]
    mail.example.com:6001-6002=127.0.0.1:1024
    mail*:6004                  (backend defaults to --backend)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rpcproxy.errors import ConfigError, TargetRefused

MAX_SERVER_NAME = 1023  # [MS-RPCH] 2.1.2.1.1: server name shorter than 1024
DEFAULT_PORTS = ((6001, 6001), (6002, 6002), (6004, 6004))  # EMSMDB, RFR, NSPI

_NAME_RE = re.compile(r"^(?:[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\])$")
_PATTERN_RE = re.compile(r"^(?:[A-Za-z0-9_.\-]*\*?|\[[0-9A-Fa-f:.]+\])$")
_PORT_RE = re.compile(r"^[0-9]{1,6}$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    """What the client asked for, normalised (lower-case name)."""

    server: str
    port: int

    def __str__(self) -> str:
        return f"{self.server}:{self.port}"


def parse_endpoint(text: str, what: str = "endpoint", *, listen: bool = False) -> Endpoint:
    """Parse HOST:PORT (``[v6]:PORT`` too); a listen address may use port 0 (any free port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not _PORT_RE.match(port) or not lowest <= int(port) < 65536:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Endpoint(host, int(port))


def parse_target_query(query: str) -> Target:
    """Parse the query part of a channel URL (``server:port``); TargetRefused if malformed."""
    if not query:
        raise TargetRefused("the request names no server:port target")
    if len(query) > MAX_SERVER_NAME + 7:
        raise TargetRefused("the target in the URL is too long")
    server, sep, port = query.rpartition(":")
    if not sep or not server or not _PORT_RE.match(port) or not 0 < int(port) < 65536:
        raise TargetRefused(f"malformed target {query[:80]!r}: expected server:port")
    if not _NAME_RE.match(server):
        raise TargetRefused(f"malformed server name in target {query[:80]!r}")
    return Target(server.lower(), int(port))


@dataclass(frozen=True, slots=True)
class TargetRule:
    pattern: str  # lower case; may end in '*'
    port_low: int
    port_high: int
    backend: Endpoint

    def matches(self, target: Target) -> bool:
        if not self.port_low <= target.port <= self.port_high:
            return False
        if self.pattern.endswith("*"):
            return target.server.startswith(self.pattern[:-1])
        return target.server == self.pattern

    def __str__(self) -> str:
        ports = (
            str(self.port_low) if self.port_low == self.port_high
            else f"{self.port_low}-{self.port_high}"
        )
        return f"{self.pattern}:{ports}={self.backend}"


def parse_rule(text: str, default_backend: Endpoint) -> TargetRule:
    """Parse ``NAME:PORTS[=HOST:PORT]``."""
    left, eq, right = text.strip().partition("=")
    backend = parse_endpoint(right, "target backend") if eq else default_backend
    name, sep, ports = left.rpartition(":")
    if not sep or not name:
        raise ConfigError(f"target {text!r} is not NAME:PORT[=HOST:PORT]")
    if not _PATTERN_RE.match(name):
        raise ConfigError(f"target name {name!r} has characters a server name cannot have")
    low_s, dash, high_s = ports.partition("-")
    high_s = high_s if dash else low_s
    if not (_PORT_RE.match(low_s) and _PORT_RE.match(high_s)):
        raise ConfigError(f"target {text!r}: ports must be N or N-M")
    low, high = int(low_s), int(high_s)
    if not 0 < low <= high < 65536:
        raise ConfigError(f"target {text!r}: port range {low}-{high} is invalid")
    return TargetRule(name.lower(), low, high, backend)


def default_rules(server_names: list[str], backend: Endpoint) -> list[TargetRule]:
    """Ports 6001, 6002 and 6004 of each configured server name -> the backend."""
    return [
        TargetRule(name.lower(), low, high, backend)
        for name in server_names
        for low, high in DEFAULT_PORTS
    ]


class AllowList:
    """The ordered target rules; the first match wins."""

    def __init__(self, rules: list[TargetRule]) -> None:
        self.rules = list(rules)

    def resolve(self, target: Target) -> Endpoint:
        for rule in self.rules:
            if rule.matches(target):
                return rule.backend
        raise TargetRefused(f"target {target} is not on the allow-list")

    def __len__(self) -> int:
        return len(self.rules)
