"""Refusals: why a client was turned away, aggregated into a few log lines; per-source keys.

Theory of operation: everything a client can make the proxy refuse (a connection over a
bound, a handshake that timed out, a malformed request, a failed login, a disconnect in the
middle of a request) is one ``Refusal`` code. The server counts every refusal in its
metrics by that code and hands it to ``RefusalLog``, which decides what reaches the log:
in each window of ``interval`` seconds the first ``burst`` refusals are logged one line
each (with peer and reason, so a single failure is easy to find), the rest only counted;
when the window ends, one summary line gives their number per reason and the top sources.
A flood of N refused connections therefore writes O(1) lines per window, never N.

``RefusalLog`` is sans-IO: it gets the time with each call and returns the line to write
(or none); the caller writes them and arms a timer for ``due()``.

``source_key`` names the source a per-address bound counts against: the IPv4 address, or
the /64 an IPv6 address is in (one customer line usually gets a whole /64). Sources in
``per_source_exempt`` (by default loopback: a TLS terminator or HAProxy on this host, whose
clients all share its address) count only against the global bounds.
"""

from __future__ import annotations

import collections
import enum
import functools
import ipaddress

from ntlm.errors import Unreachable


class Refusal(enum.StrEnum):
    """Why a client was refused or dropped (metric label ``reason``)."""

    UNAUTH_LIMIT = "unauthenticated_limit"  # max_unauthenticated_connections reached
    UNAUTH_PER_SOURCE = "unauthenticated_per_source"  # ..._per_source reached
    HANDSHAKE_TIMEOUT = "handshake_timeout"  # unauthenticated past handshake_timeout
    TLS_TIMEOUT = "tls_handshake_timeout"  # TLS handshake not done within handshake_timeout
    TLS_FAILED = "tls_handshake_failed"  # TLS handshake failed or was abandoned
    TLS_ERROR = "tls_error"  # a TLS error after the handshake (bad record, alert)
    PROXY_HEADER = "proxy_header"  # bad or late PROXY protocol header from a front proxy
    PENDING_LIMIT = "pending_handshakes_limit"  # max_pending_handshakes reached
    PENDING_PER_SOURCE = "pending_handshakes_per_source"
    AUTH_DENIED = "auth_denied"  # credentials refused or malformed
    AUTH_UNAVAILABLE = "auth_unavailable"  # the NTLM server could not be asked
    BAD_REQUEST = "bad_request"  # malformed HTTP (aiohttp's parser refused it)
    CLIENT_GONE = "client_disconnected"  # the client went away mid-request
    TARGET_REFUSED = "target_refused"  # server:port not on the allow-list
    CHANNEL_REFUSED = "channel_refused"  # a bad channel opening or a VC bound


# Why no verdict could be had (ntlm.errors.Unreachable) -> the refusal it is counted as
_UNAVAILABLE: dict[Unreachable, Refusal] = {
    Unreachable.BUSY: Refusal.PENDING_LIMIT,
    Unreachable.BUSY_PER_SOURCE: Refusal.PENDING_PER_SOURCE,
}


def unavailable_refusal(code: Unreachable) -> Refusal:
    """The refusal an authentication that got no verdict counts as."""
    return _UNAVAILABLE.get(code, Refusal.AUTH_UNAVAILABLE)


MAX_SOURCES = 1024  # distinct sources remembered per window; the rest count as "other"
MAX_DETAIL = 200  # characters of a refusal's reason in its log line


@functools.lru_cache(maxsize=4096)  # each connection asks once or twice; addresses repeat
def source_key(host: str) -> str:
    """The key a per-source bound counts against: IPv4 address, or IPv6 /64."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Exemptions:
    """Networks whose sources are not bounded per source (front proxies)."""

    def __init__(self, networks: list[str]) -> None:
        try:
            self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        except ValueError as exc:
            raise ValueError(f"per_source_exempt: {exc}") from None
        self._cached = functools.lru_cache(maxsize=4096)(self._contains)

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str) or not self.networks:
            return False
        return self._cached(host)

    def _contains(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


class RefusalLog:
    """Decides which refusals get a line of their own and summarises the rest."""

    def __init__(self, interval: float = 10.0, burst: int = 5, top: int = 5) -> None:
        self.interval = interval
        self.burst = burst
        self.top = top
        self.window_start: float | None = None
        self.logged = 0  # lines of their own in this window
        self.suppressed: collections.Counter[Refusal] = collections.Counter()
        self.sources: collections.Counter[str] = collections.Counter()

    def note(self, reason: Refusal, source: str, detail: str, now: float,
             peer: str | None = None) -> list[str]:
        """One refusal from ``source`` (``peer``: its address and port, for its own line);
        returns the lines to log now (often none)."""
        lines: list[str] = []
        start = self.window_start
        if start is not None and now >= start + self.interval:
            summary = self.flush(now)  # the timer was late: close the old window first
            if summary is not None:
                lines.append(summary)
        if self.window_start is None:
            self.window_start = now
            self.logged = 0
        if self.logged < self.burst:
            self.logged += 1
            if len(detail) > MAX_DETAIL:
                detail = detail[:MAX_DETAIL] + "..."
            lines.append(f"refused {peer or source} ({reason.value}): {detail}")
            return lines
        self.suppressed[reason] += 1
        if source in self.sources or len(self.sources) < MAX_SOURCES:
            self.sources[source] += 1
        else:
            self.sources["other"] += 1
        return lines

    def due(self) -> float | None:
        """When ``flush`` has a summary to write (None: nothing suppressed)."""
        if not self.suppressed:
            return None
        start = self.window_start
        return None if start is None else start + self.interval

    def flush(self, now: float) -> str | None:
        """End the window; the summary line of what was not logged, if anything was not."""
        start = self.window_start
        if start is not None and now < start + self.interval:
            return None
        self.window_start = None
        if not self.suppressed:
            return None
        total = sum(self.suppressed.values())
        reasons = " ".join(f"{r.value}={n}" for r, n in self.suppressed.most_common())
        tops = " ".join(f"{s}={n}" for s, n in self.sources.most_common(self.top))
        self.suppressed.clear()
        self.sources.clear()
        return (f"refused {total} more in the last {self.interval:g}s: {reasons}; "
                f"top sources: {tops}")
