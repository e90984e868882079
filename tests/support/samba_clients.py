"""Blocking RPC-over-HTTP clients for the Samba tests: impacket's samr over ncacn_http, and a
deadline for them (impacket loops forever on some failures)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from impacket.dcerpc.v5 import samr, transport
from impacket.dcerpc.v5.rpcrt import RPC_C_AUTHN_LEVEL_PKT_PRIVACY
from impacket.http import AUTH_BASIC

T = TypeVar("T")


def samr_domains(proxy_url: str, target: str, user: str, password: str,
                 *, basic: bool = False) -> list[str]:
    t = transport.DCERPCTransportFactory(f"ncacn_http:{target}")
    t.set_rpc_proxy_url(proxy_url)
    t.set_credentials(user, password, "EXAMPLE")
    if basic:
        t.set_auth_type(AUTH_BASIC)
    t.set_connect_timeout(10)
    dce = t.get_dce_rpc()
    dce.set_auth_level(RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
    dce.connect()
    try:
        dce.bind(samr.MSRPC_UUID_SAMR)
        handle = samr.hSamrConnect(dce)["ServerHandle"]
        resp = samr.hSamrEnumerateDomainsInSamServer(dce, handle)
        return [d["Name"] for d in resp["Buffer"]["Buffer"]]
    finally:
        dce.disconnect()


def run_with_timeout(fn: Callable[[], T], timeout: float = 60.0) -> T:
    """impacket loops forever on some failures: run it in a thread with a deadline."""
    values: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            values.append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise AssertionError(f"client did not finish within {timeout}s")
    if errors:
        raise errors[0]
    return values[0]
