"""A reload keeps the settings only a restart can apply (the listeners are built with them)
and says so, instead of logging them as reloaded while nothing changes."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from rpcproxy import config as config_mod
from rpcproxy.app import RESTART_ONLY, ProxyProcess


@pytest.mark.parametrize(("name", "value"), [("tls_transport", "loop"),
                                             ("proxy_protocol_from", ["127.0.0.1"])])
def test_listener_settings_are_restart_only(name: str, value: object,
                                            caplog: pytest.LogCaptureFixture) -> None:
    assert name in RESTART_ONLY
    base = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": "127.0.0.1:9"})
    changed = dataclasses.replace(base)
    setattr(changed, name, value)
    process = ProxyProcess(base, loader=lambda: changed)
    with caplog.at_level(logging.WARNING, logger="rpcproxy"):
        assert process._reload()
    assert getattr(process.config, name) == getattr(base, name)
    assert f"reload: {name} changed" in caplog.text
