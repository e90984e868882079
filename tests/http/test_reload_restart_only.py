"""A reload keeps the settings only a restart can apply (the listeners are built with them)
and says so, instead of logging them as reloaded while nothing changes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from rpcproxy import certs, sdnotify
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


async def test_respawned_process_applies_the_reloaded_configuration_before_listening(
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker respawned after a reload starts from the start-up configuration (its
    listeners) and applies the reloaded one through the reload path before it listens:
    what only a restart applies is kept and said, the rest is served from the start."""
    base = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": "127.0.0.1:9",
                                  "targets": ["a.example.com:6001"]})
    reloaded = dataclasses.replace(base, listen="127.0.0.1:1",
                                   targets=["a.example.com:6001", "b.example.com:6001"])
    process = ProxyProcess(base, respawn_config=reloaded, notifier=sdnotify.Notifier(env={}))
    process.stop_event.set()  # start, then stop at once
    with caplog.at_level(logging.INFO, logger="rpcproxy"):
        await process.run()
    assert process.config.listen == "127.0.0.1:0" and process.bound
    assert [str(r) for r in process.server.allow_list.rules] == [
        "a.example.com:6001=127.0.0.1:9", "b.example.com:6001=127.0.0.1:9"]
    said = caplog.text
    assert ("respawned after a reload, applying the last configuration that loaded: reload: "
            "listen changed from '127.0.0.1:0' to '127.0.0.1:1'") in said
    assert said.index("configuration reloaded (targets)") < said.index("listening on")


async def test_respawned_process_with_an_unusable_reloaded_certificate_keeps_its_own(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reloaded certificate is checked before the respawned process listens (its TLS
    context does not exist yet): an unusable one leaves the start-up configuration."""
    certs.create_self_signed("proxy.example.com", tmp_path)
    base = config_mod.load(None, {"listen": "127.0.0.1:0", "backend": "127.0.0.1:9",
                                  "tls_cert": str(tmp_path / "cert.pem"),
                                  "tls_key": str(tmp_path / "key.pem")})
    reloaded = dataclasses.replace(base, tls_cert=str(tmp_path / "gone.pem"),
                                   targets=["b.example.com:6001"])
    process = ProxyProcess(base, respawn_config=reloaded, notifier=sdnotify.Notifier(env={}))
    process.stop_event.set()
    with caplog.at_level(logging.INFO, logger="rpcproxy"):
        await process.run()
    assert process.config is base and process.bound
    assert ("respawned after a reload, applying the last configuration that loaded: reload "
            "failed, keeping the running configuration and certificate") in caplog.text


async def test_each_listener_is_logged_as_what_it_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With TLS on and an ``http_listen`` next to it, start-up names the TLS listener TLS and
    the plain one HTTP (both used to read TLS)."""
    certs.create_self_signed("proxy.example.com", tmp_path)
    cfg = config_mod.load(None, {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0",
                                 "backend": "127.0.0.1:9",
                                 "tls_cert": str(tmp_path / "cert.pem"),
                                 "tls_key": str(tmp_path / "key.pem")})
    process = ProxyProcess(cfg, notifier=sdnotify.Notifier(env={}))
    process.stop_event.set()  # start, then stop at once
    with caplog.at_level(logging.INFO, logger="rpcproxy"):
        await process.run()
    (_, tls_port), (_, plain_port) = process.bound
    assert f"listening on 127.0.0.1:{tls_port} (TLS)" in caplog.text
    assert f"listening on 127.0.0.1:{plain_port} (HTTP)" in caplog.text
