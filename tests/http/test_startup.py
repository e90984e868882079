"""The proxy's start-up: signals that arrive before READY are never the default action,
and a listener that cannot be opened says how it can be.

An admin's or a test's SIGHUP sent right after "listening on ..." was logged used to kill
the process (the handlers were installed only after start-up returned)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from rpcproxy import config as config_mod
from rpcproxy.app import ProxyProcess


@pytest.fixture
def unhandled() -> Iterator[list[int]]:
    """Signals that reached the process without a handler of the proxy's (recorded here
    instead of killing the test run)."""
    seen: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        seen.append(signum)

    old = {sig: signal.signal(sig, record) for sig in (signal.SIGHUP, signal.SIGTERM)}
    yield seen
    for sig, handler in old.items():
        signal.signal(sig, handler)


def _process(monkeypatch: pytest.MonkeyPatch, sig: signal.Signals) -> ProxyProcess:
    cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": "127.0.0.1:9"})
    process = ProxyProcess(cfg)
    started = process.start

    async def start_then_signal() -> None:
        await started()
        os.kill(os.getpid(), sig)  # as if sent the moment "listening on" was logged
        await asyncio.sleep(0.05)

    monkeypatch.setattr(process, "start", start_then_signal)
    return process


async def test_sighup_during_start_up_reloads_once_started(
        monkeypatch: pytest.MonkeyPatch, unhandled: list[int]) -> None:
    process = _process(monkeypatch, signal.SIGHUP)
    reloads: list[bool] = []

    def reload() -> bool:
        reloads.append(True)
        return True

    monkeypatch.setattr(process, "reload", reload)
    task = asyncio.create_task(process.run())
    for _ in range(100):
        if reloads or unhandled:
            break
        await asyncio.sleep(0.02)
    process.stop_event.set()
    await asyncio.wait_for(task, 10)
    assert unhandled == [] and reloads == [True]


async def test_sigterm_during_start_up_stops_once_started(
        monkeypatch: pytest.MonkeyPatch, unhandled: list[int]) -> None:
    process = _process(monkeypatch, signal.SIGTERM)
    task = asyncio.create_task(process.run())
    for _ in range(100):
        if task.done() or unhandled:
            break
        await asyncio.sleep(0.02)
    if not task.done():
        process.stop_event.set()
    await asyncio.wait_for(task, 10)
    assert unhandled == []


async def test_a_metrics_address_that_is_not_ours_is_a_config_error() -> None:
    """Like the main listener: no restart binds an address the host does not have, so it
    exits 78 (no restart loop) with the address named."""
    from rpcproxy.app import StartupError

    cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": "127.0.0.1:9",
                                 "metrics_listen": "192.0.2.1:0"})
    process = ProxyProcess(cfg)
    with pytest.raises(StartupError) as caught:
        await process.start()
    await process.server.stop()
    assert caught.value.config and "192.0.2.1:0 for metrics" in str(caught.value)


def test_worker_metrics_ports_past_65535_stop_the_start_not_the_workers(
        caplog: pytest.LogCaptureFixture) -> None:
    """Worker i serves metrics on the port + i: when that runs past 65535 the supervisor
    says so and exits 78 before it binds or forks anything (a worker used to die of a
    ConfigError traceback, again at each respawn)."""
    from rpcproxy.app import _serve_workers
    from rpcproxy.workers import EXIT_CONFIG

    cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": "127.0.0.1:9",
                                 "metrics_listen": "127.0.0.1:65535", "workers": 2})
    with caplog.at_level(logging.ERROR, logger="rpcproxy"):
        assert _serve_workers(cfg, config_path=None, arg_overrides=None) == EXIT_CONFIG
    assert "worker 1 would need port 65536" in caplog.text
