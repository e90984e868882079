"""Shared pytest fixtures (registration only; implementations live in their own modules), and
the check that each test sits in the room its fixtures call for.

The rooms: unit/ (no sockets, no subprocesses), http/ (an in-process proxy on loopback),
samba/ (the real Samba DC), deploy/ (the product as deployed), support/ (helpers, no tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deploy_support import ServeProcess
from tests.support.samba_dc import SambaDC, samba_dc_session


@pytest.fixture(scope="session")
def samba_dc() -> Iterator[SambaDC]:
    """A real Samba AD DC (EXAMPLE.COM) on loopback, provisioned once per session."""
    yield from samba_dc_session()


@pytest.fixture
def procs() -> Iterator[list[ServeProcess]]:
    """``rpcproxy serve`` processes a test starts; each is stopped (by its pid) afterwards."""
    started: list[ServeProcess] = []
    yield started
    for p in started:
        p.close()


# A fixture that starts real parts, and the only rooms whose tests may use it: the quick loop
# `pytest tests/unit tests/http` then never needs Samba or a serve process.
ROOMS_FOR_FIXTURE = {"samba_dc": ("samba", "deploy"), "procs": ("deploy",)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    wrong = []
    for item in items:
        if not item.path.is_relative_to(here):
            continue
        room = item.path.relative_to(here).parts[0]
        for fixture, rooms in ROOMS_FOR_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()) and room not in rooms:
                wrong.append(f"{item.nodeid} uses the {fixture} fixture: move its file to "
                             + " or ".join(f"tests/{r}/" for r in rooms))
    if wrong:
        raise pytest.UsageError("tests in the wrong room:\n" + "\n".join(wrong))
