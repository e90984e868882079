"""The identity of a channel is the account Samba authenticated: the security review's two
identity attacks through the whole proxy, against the real Samba AD DC.

1. A NUL in the NTLM user name: otheruser's real AUTHENTICATE whose UserName field says
   ``otheruser\\0\\testuser`` must not join testuser's half-open virtual connection.
2. A UPN that belongs to another account: asmith (UPN victim@corp.test) logging in as
   ``victim@corp.test`` is asmith, and must not join the VC of the account ``victim``.

And the legitimate spellings of one account all give one identity, so its two channels pair.
The backend is an echo server that records every byte: what reaches it is exactly what a VC
let through.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator

import pytest
import spnego

from rpcproxy import config as config_mod
from rpcproxy.rpch import rts
from rpcproxy.server import ProxyServer
from tests.support.fakes import EchoBackend, request_pdu
from tests.support.ntlm_tokens import replace_user_field
from tests.support.proxy_env import Env
from tests.support.rpch_raw import GIB, Head, RawChannel
from tests.support.samba_dc import SambaDC

pytestmark = pytest.mark.samba

PATH = "/rpc/rpcproxy.dll?srv:6001"


@pytest.fixture
async def env(samba_dc: SambaDC) -> AsyncIterator[Env]:
    backend = await EchoBackend().start()
    cfg = config_mod.load(None, {
        "listen": "127.0.0.1:0", "backend": backend.endpoint, "targets": ["srv:6001"],
        "basic_over_http": True, "ntlm_helper": samba_dc.ntlm_helper(), "setup_timeout": 5.0,
    })
    server = ProxyServer(cfg)
    bound = await server.start()
    yield Env(server, bound[0][1], backend)
    await server.stop()
    await backend.stop()


async def ntlm_channel(port: int, method: str, body: bytes, user: str, password: str, *,
                       forge_user: str | None = None) -> tuple[RawChannel, Head | None]:
    """Open a channel with a real NTLM handshake; ``forge_user`` rewrites the AUTHENTICATE's
    UserName field.  Returns the channel and the final head when it came at once (401/503)."""
    ch = await RawChannel.connect(port)
    client = spnego.client(user, password, protocol="ntlm")
    ch.request(method, PATH, content_length=0,
               headers={"Authorization": "NTLM " + base64.b64encode(client.step() or b"").decode()})
    first = await ch.head()
    assert first.status == 401, first
    await ch.body(first)
    token = first.headers["www-authenticate"].split(" ", 1)[1]
    authenticate = client.step(base64.b64decode(token)) or b""
    if forge_user is not None:
        authenticate = replace_user_field(authenticate, forge_user)
    length = GIB if method == "RPC_IN_DATA" else 76
    ch.request(method, PATH, content_length=length,
               headers={"Authorization": "NTLM " + base64.b64encode(authenticate).decode()},
               body=body)
    try:
        head = await asyncio.wait_for(ch.head(), 1.0)
    except TimeoutError:
        return ch, None  # an accepted IN channel gets no response head
    return ch, head


async def half_open_out(env: Env, user: str, password: str) -> tuple[bytes, RawChannel]:
    """The victim's OUT channel, waiting for its IN channel (the VC is half open)."""
    cookie = os.urandom(16)
    out, head = await ntlm_channel(env.port, "RPC_OUT_DATA", rts.conn_a1(cookie, os.urandom(16),
                                   0x10000), user, password)
    assert head is None, head  # no answer before the IN channel arrives
    return cookie, out


async def completes(env: Env, cookie: bytes, out: RawChannel, user: str, password: str) -> str:
    """The VC's rightful IN channel pairs with ``out`` and a call goes through; returns the
    identity the VC is bound to."""
    inp, head = await ntlm_channel(env.port, "RPC_IN_DATA",
                                   rts.conn_b1(cookie, os.urandom(16), os.urandom(16)),
                                   user, password)
    assert head is None, head
    head = await out.head()
    assert head.status == 200, head
    assert rts.identify(rts.decode_rts(await out.pdu())) is rts.Kind.CONN_A3
    assert rts.identify(rts.decode_rts(await out.pdu())) is rts.Kind.CONN_C2
    call = request_pdu(7, b"hello")
    inp.send(call)
    reply = await out.pdu()
    assert reply[:2] + reply[3:] == call[:2] + call[3:]  # echoed back as a RESPONSE
    assert bytes(env.backend.received).endswith(call)
    (identity,) = [str(rt.vc.identity) for rt in env.server.vcs.values() if rt.vc.cookie == cookie]
    inp.close()
    out.close()
    return identity


async def test_nul_in_user_name_does_not_join_victims_vc(env: Env, samba_dc: SambaDC) -> None:
    cookie, out = await half_open_out(env, "testuser", "Test1234")
    attacker, head = await ntlm_channel(
        env.port, "RPC_IN_DATA", rts.conn_b1(cookie, os.urandom(16), os.urandom(16)),
        "otheruser", samba_dc.users["otheruser"], forge_user="otheruser\0\\testuser")
    assert head is not None and head.status == 401, head
    assert await attacker.closed()
    assert env.backend.received == b""  # nothing of the attacker's reached the backend
    await completes(env, cookie, out, "testuser", "Test1234")  # the victim's VC is intact


async def test_nul_suffixes_do_not_mint_identities(env: Env, samba_dc: SambaDC) -> None:
    """``otheruser\\0<n>`` used to be a new identity each time (defeating the per-user bound)."""
    for n in range(3):
        ch, head = await ntlm_channel(
            env.port, "RPC_OUT_DATA", rts.conn_a1(os.urandom(16), os.urandom(16), 0x10000),
            "otheruser", samba_dc.users["otheruser"], forge_user=f"otheruser\0{n}")
        assert head is not None and head.status == 401, head
        ch.close()
    assert not env.server.vcs


async def test_upn_of_another_account_does_not_join_its_vc(env: Env, samba_dc: SambaDC) -> None:
    cookie, out = await half_open_out(env, samba_dc.victim_user, samba_dc.victim_password)
    attacker, head = await ntlm_channel(
        env.port, "RPC_IN_DATA", rts.conn_b1(cookie, os.urandom(16), os.urandom(16)),
        samba_dc.alias_upn, samba_dc.alias_password)  # asmith's UPN and password: asmith
    assert head is not None and head.status == 503, head
    assert head.reason == "RPC Error: 5"  # ERROR_ACCESS_DENIED: another user's VC
    attacker.close()
    assert env.backend.received == b""  # nothing of the attacker's reached the backend
    await completes(env, cookie, out, samba_dc.victim_user, samba_dc.victim_password)


async def test_upn_login_is_its_own_account(env: Env, samba_dc: SambaDC) -> None:
    """asmith's OUT by UPN and IN by account name are one user: the VC pairs."""
    cookie, out = await half_open_out(env, samba_dc.alias_upn, samba_dc.alias_password)
    assert await completes(env, cookie, out, samba_dc.alias_user,
                           samba_dc.alias_password) == "EXAMPLE\\asmith"


@pytest.mark.parametrize(("out_user", "in_user"), [
    ("testuser", "TESTUSER"),
    ("testuser@EXAMPLE.COM", "EXAMPLE\\testuser"),
    ("example.com\\TestUser", "testuser@example.com"),
])
async def test_spellings_of_one_account_pair(env: Env, out_user: str, in_user: str) -> None:
    cookie, out = await half_open_out(env, out_user, "Test1234")
    assert await completes(env, cookie, out, in_user, "Test1234") == "EXAMPLE\\testuser"


async def test_basic_upn_gives_its_account(env: Env, samba_dc: SambaDC) -> None:
    """Basic with victim@corp.test and asmith's password is asmith: cannot join victim's VC."""
    cookie, out = await half_open_out(env, samba_dc.victim_user, samba_dc.victim_password)
    token = base64.b64encode(f"{samba_dc.alias_upn}:{samba_dc.alias_password}".encode()).decode()
    inp = await RawChannel.connect(env.port)
    inp.request("RPC_IN_DATA", PATH, content_length=GIB,
                headers={"Authorization": f"Basic {token}"},
                body=rts.conn_b1(cookie, os.urandom(16), os.urandom(16)))
    head = await inp.head()
    assert (head.status, head.reason) == (503, "RPC Error: 5")
    inp.close()
    await completes(env, cookie, out, samba_dc.victim_user, samba_dc.victim_password)
