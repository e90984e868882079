"""The ``storm`` scenario: every client reconnects at once, through real NTLM.

After a network blip or a restart, every Outlook reconnects at the same moment. This opens
``storm_vcs`` virtual connections at once through the proxy, each authenticating both of its
channels with NTLM that winbind judges (``--ntlm-helper``, ``--user``, ``--password``), binds
each, and holds them until all are open. It reports:

* ``failures``: VCs that did not open (a refused login, a 503, a timeout): must be 0;
* ``seconds``: from the first connect until the last VC was open, and ``proxy`` = VCs/s;
* ``direct``: NTLM logins per second the same Samba sustains *without* the proxy, measured in
  the same run with the same helper command and helper count (``samba_logins_per_s``);
* ``ratio`` = VCs/s x 2 (each VC is two logins) / direct logins/s: 1.0 means the proxy adds no
  bottleneck of its own in front of Samba.

``storm_wrong_passwords`` VCs use a wrong password: the harness's own check that a refused
login is counted as a failure.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any

from bench import dcerpc
from bench.client import BasicAuth, NtlmAuth
from bench.measure import ratio
from bench.scenarios.base import Bench, Figures, bench_syntax
from ntlm import HelperPool, NtlmError, WinbindVerifier, verify_password


class StormResult(Figures):
    vcs: int
    opened: int
    failures: int  # VCs that did not open: must be 0
    failure_kinds: dict[str, int]  # the five most common, by exception and message
    seconds: float  # from the first connect until the last VC was open
    wrong_passwords_injected: int
    samba: dict[str, Any]  # samba_logins_per_s: the same Samba without the proxy


async def samba_logins_per_s(argv: list[str], user: str, password: str, *, logins: int,
                             helpers: int) -> dict[str, Any]:
    """Logins per second through ``helpers`` ntlm_auth helpers, no proxy in between."""
    verifier = WinbindVerifier(HelperPool(argv, size=helpers, queue_timeout=300))
    try:
        try:  # start one helper, prove it works
            await verify_password(verifier, user, password)
        except NtlmError as exc:  # a scenario failure the CLI reports, not a traceback
            raise RuntimeError(f"the Samba baseline login failed: {exc}") from None
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(verify_password(verifier, user, password) for _ in range(logins)),
            return_exceptions=True)
        seconds = time.perf_counter() - t0
    finally:
        await verifier.aclose()
    failed = sum(isinstance(r, BaseException) for r in results)
    return {"logins": logins, "failed": failed, "seconds": round(seconds, 3),
            "per_s": round((logins - failed) / seconds, 1), "helpers": helpers}


async def samba_baseline(bench: Bench, auth: BasicAuth | NtlmAuth, *,
                         logins: int) -> dict[str, Any]:
    """``samba_logins_per_s`` for the bench's account through its helper command."""
    assert bench.ntlm_helper
    account = f"{auth.domain}\\{auth.user}" if auth.domain else auth.user
    return await samba_logins_per_s(bench.ntlm_helper, account, auth.password,
                                    logins=logins, helpers=bench.ntlm_helpers)


async def run_storm(bench: Bench) -> StormResult:
    if not bench.ntlm_helper or not isinstance(bench.proxy.auth, NtlmAuth):
        raise RuntimeError("the storm scenario needs --ntlm-helper, --user and --password "
                           "(real NTLM through winbind)")
    auth = bench.proxy.auth
    n = bench.storm_vcs
    wrong = dataclasses.replace(bench.proxy, auth=NtlmAuth(auth.user, auth.password + "-wrong",
                                                           auth.domain))
    opened: list[Any] = []
    errors: collections.Counter[str] = collections.Counter()
    last_open = 0.0
    bench.progress(f"storm: opening {n} VCs at once through real NTLM")
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal last_open
        target = wrong if i < bench.storm_wrong_passwords else None
        try:
            t = await bench.open("proxy", proxy=target)
            try:
                await t.send_pdu(dcerpc.build_bind(1, bench_syntax()))
                dcerpc.parse_bind_ack(await t.recv_pdu(bench.timeout))
            except BaseException:
                await t.close()
                raise
        except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
            errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            return
        opened.append(t)
        last_open = time.perf_counter()

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await asyncio.gather(*(t.close() for t in opened), return_exceptions=True)
    seconds = max(last_open - t0, 1e-9)
    failures = sum(errors.values())
    vcs_per_s = round(len(opened) / seconds, 1)
    bench.progress(f"storm: {len(opened)}/{n} VCs open after {seconds:.2f} s "
                   f"({vcs_per_s} VCs/s), {failures} failed")
    baseline = await samba_baseline(bench, auth, logins=min(2 * n, 2000))
    bench.progress(f"storm: the same Samba alone: {baseline['per_s']} NTLM logins/s "
                   f"({baseline['helpers']} helpers)")
    direct = baseline["per_s"]
    return {
        "metric": "VCs opened at once through real NTLM; direct: NTLM logins/s of the same "
                  "Samba without the proxy (ratio = VCs/s x 2 / logins/s)",
        "proxy": vcs_per_s, "direct": direct,
        "ratio": ratio(vcs_per_s * 2, direct), "unit": "VCs/s",
        "vcs": n, "opened": len(opened), "failures": failures,
        "failure_kinds": dict(errors.most_common(5)), "seconds": round(seconds, 3),
        "wrong_passwords_injected": bench.storm_wrong_passwords, "samba": baseline,
    }
