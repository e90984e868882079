"""LDAP lookups run on the directory's own threads: a slow directory holds at most
``max_concurrent_lookups`` of them and never the event loop's default pool (which the
proxy uses for name resolution of backends)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rpcproxy.autodiscover.directory import DirectoryEntry, LdapDirectory
from rpcproxy.autodiscover.settings import parse_table


async def test_a_hanging_directory_keeps_to_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = LdapDirectory(parse_table({"max_concurrent_lookups": 2, "ldap_timeout": 1.0}))
    release = threading.Event()
    running: set[str] = set()

    def hang(address: str) -> DirectoryEntry | None:
        running.add(threading.current_thread().name)
        release.wait(10)
        return None

    monkeypatch.setattr(directory, "_find_sync", hang)
    lookups = [asyncio.create_task(directory.find(f"u{i}@example.com")) for i in range(6)]
    await asyncio.sleep(0.2)
    try:
        # the default pool still answers at once, whatever the directory does
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 1) == 42
        assert len(running) == 2 and all(n.startswith("ldap") for n in running)
    finally:
        release.set()
        await asyncio.gather(*lookups, return_exceptions=True)
        directory.close()
