"""Shared pytest fixtures (registration only; implementations live in their own modules)."""

from __future__ import annotations

from collections.abc import Iterator

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
