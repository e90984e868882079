"""Logging set-up: one line per event that matters, as text or JSON.

Log lines carry what clients wrote (user names, reasons built from their requests). In text
logs every control character of a message (CR, LF, NUL, ...) is written as an escape such
as ``\\x0a``, so no client can end a line or forge one of its own; JSON logs are safe by
construction (``json.dumps`` escapes them inside the string).

Under systemd (stderr is the journal stream named by ``$JOURNAL_STREAM``) each line
starts with its syslog priority, ``<3>`` for ERROR and so on (sd-daemon(3) style), so
``journalctl -p err`` selects by level; the journal stamps the time itself, so text
lines carry no timestamp of their own there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

# logging level -> syslog priority (sd-daemon.h SD_ERR etc.)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control or line-separator character written as an escape."""
    return _CONTROL.sub(_escape_one, text)


class TextFormatter(logging.Formatter):
    """The text format, with control characters in the message escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        message = record.message
        record.message = escape_controls(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        return json.dumps(data, separators=(",", ":"))


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with ``<priority>`` (journald's stream protocol)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + self.inner.format(record).replace("\n", "\n" + prefix)


def stderr_is_journal(env: Mapping[str, str] | None = None,
                      stream: TextIO | None = None) -> bool:
    """True when stderr is the journal stream systemd connected ($JOURNAL_STREAM=dev:ino)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif journal:
        formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JournalFormatter(formatter) if journal else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
