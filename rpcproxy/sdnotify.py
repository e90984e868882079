"""systemd's readiness protocol (sd_notify), without libsystemd.

A ``Type=notify`` service tells systemd about its state by sending newline-separated
``KEY=VALUE`` lines in one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the Linux abstract namespace). rpcproxy sends:

* ``READY=1``            once every listener accepts connections (and after a reload);
* ``RELOADING=1``        while SIGHUP is being handled;
* ``STOPPING=1``         when shutdown begins;
* ``WATCHDOG=1``         every ``$WATCHDOG_USEC / 2`` when ``WatchdogSec=`` is set; it is sent
  from the event loop, so a stuck loop stops it and systemd restarts the service (with
  several workers the supervisor sends it, only while every worker's loop beats: see
  ``rpcproxy.workers``);
* ``STATUS=...``         a line ``systemctl status`` shows.

Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("rpcproxy")


class Notifier:
    """Sends sd_notify datagrams to the socket named at construction time."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False (logged once) when it could not be delivered."""
        if self.address is None or not lines:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd via NOTIFY_SOCKET: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))


def _status(text: str | None) -> list[str]:
    if not text:
        return []
    return ["STATUS=" + text.replace("\n", " ")]


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: only AF_UNIX paths and @abstract names "
                "are supported", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout systemd set), or None."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (e.g. our parent)
    return int(usec) / 2 / 1_000_000
