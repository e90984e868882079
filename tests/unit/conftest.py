"""Keeps tests/unit/ free of sockets and processes: connecting, binding or starting a process
fails the test with a pointer to the room it belongs in (tests/http/ or tests/deploy/)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import NoReturn

import pytest


def _refuse(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("a unit test opened a socket or started a process: "
                         "it belongs in tests/http/ (loopback servers) or tests/deploy/")


@pytest.fixture(scope="package", autouse=True)
def no_sockets_no_processes() -> Iterator[None]:
    """Package-scoped (not monkeypatch) so hypothesis tests take it too; undone after unit/."""
    saved: list[tuple[type, str, object]] = [
        (socket.socket, name, getattr(socket.socket, name)) for name in ("bind", "connect",
                                                                          "connect_ex")]
    saved.append((subprocess.Popen, "__init__", subprocess.Popen.__init__))
    for owner, name, _ in saved:
        setattr(owner, name, _refuse)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
