"""HttpAuthenticator: HTTP Authorization handling bound to connections.

Flows run against the real Samba DC where the verdict matters; bookkeeping races (forget while
Samba is answering, restarts, bounds) use a fake verifier whose timing the test controls.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import struct
from collections.abc import Callable

import pytest
import spnego

from ntlm import messages
from ntlm.errors import AuthenticationFailed, NtlmServerUnavailable, Refusal, Unreachable
from ntlm.http_auth import (
    Authenticated,
    Challenge,
    Denied,
    HttpAuthenticator,
    Unavailable,
)
from ntlm.verifier import Handshake, Identity
from ntlm.winbind import HelperPool, WinbindVerifier
from tests.support.samba_dc import SambaDC

TESTUSER = Identity("testuser", "EXAMPLE")
BASIC_OFFER = 'Basic realm="rpcproxy"'


class Conn:
    """Stands in for the asyncio transport that identifies a TCP connection."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def basic(user: str, password: str) -> str:
    return "Basic " + b64(f"{user}:{password}".encode())


class HttpClient:
    """An NTLM HTTP client (pyspnego) speaking through the authenticator on one connection."""

    def __init__(self, auth: HttpAuthenticator, user: str, password: str, *, tls: bool = True):
        self.auth = auth
        self.conn = Conn()
        self.tls = tls
        self.ntlm = spnego.client(
            user, password, hostname="proxy", protocol="ntlm",
            options=spnego.NegotiateOptions.use_ntlm,
        )  # fmt: skip

    async def send(self, authorization: str | None) -> object:
        return await self.auth.authenticate(self.conn, authorization, tls=self.tls)

    async def type1(self, scheme: str = "NTLM") -> Challenge:
        outcome = await self.send(f"{scheme} {b64(self.ntlm.step() or b'')}")
        assert isinstance(outcome, Challenge), outcome
        return outcome

    async def login(self, scheme: str = "NTLM") -> object:
        challenge = await self.type1(scheme)
        (value,) = challenge.www_authenticate
        got_scheme, token = value.split(" ", 1)
        assert got_scheme == scheme
        return await self.send(f"{scheme} {b64(self.ntlm.step(base64.b64decode(token)) or b'')}")


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll (no timing assertion: the bound only keeps a broken test from hanging)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def unreachable_verifier() -> WinbindVerifier:
    """A verifier whose helper cannot even start (no winbind on this host)."""
    return WinbindVerifier(HelperPool(["/nonexistent/ntlm_auth"]))


@pytest.fixture
def auth(samba_dc: SambaDC) -> HttpAuthenticator:
    return HttpAuthenticator(WinbindVerifier(HelperPool(samba_dc.ntlm_helper())))


# -- with the real Samba ---------------------------------------------------------------------


@pytest.mark.samba
async def test_first_request_gets_scheme_list(auth: HttpAuthenticator) -> None:
    conn = Conn()
    assert await auth.authenticate(conn, None, tls=True) == Challenge(["NTLM", BASIC_OFFER])
    assert await auth.authenticate(conn, "", tls=False) == Challenge(["NTLM"])


@pytest.mark.samba
async def test_ntlm_login_is_bound_to_the_connection(auth: HttpAuthenticator) -> None:
    client = HttpClient(auth, "testuser", "Test1234")
    challenge = await client.type1()
    token = base64.b64decode(challenge.www_authenticate[0].split(" ", 1)[1])
    assert messages.parse_challenge(token).nb_domain_name == "EXAMPLE"
    assert auth.pending_count() == 1
    outcome = await client.send(f"NTLM {b64(client.ntlm.step(token) or b'')}")
    assert outcome == Authenticated(TESTUSER)
    assert auth.pending_count() == 0
    # later requests on the same connection without a header: same identity (IIS behaviour)
    assert await client.send(None) == Authenticated(TESTUSER)
    assert await client.send(None) == Authenticated(TESTUSER)
    # another connection is not authenticated
    assert isinstance(await auth.authenticate(Conn(), None, tls=True), Challenge)
    # the connection closes: its state is gone
    auth.forget(client.conn)
    assert isinstance(await client.send(None), Challenge)


@pytest.mark.samba
async def test_user_spelling_normalised(auth: HttpAuthenticator) -> None:
    client = HttpClient(auth, "TestUser@EXAMPLE.COM", "Test1234")
    assert await client.login() == Authenticated(TESTUSER)


@pytest.mark.samba
@pytest.mark.parametrize(
    ("user", "password"),
    [("testuser", "bad"), ("nosuchuser", "x"), ("disableduser", "Disabled1234")],
)
async def test_ntlm_rejected(auth: HttpAuthenticator, user: str, password: str) -> None:
    client = HttpClient(auth, user, password, tls=False)
    outcome = await client.login()
    assert isinstance(outcome, Denied)
    assert outcome.code is Refusal.BAD_CREDENTIALS and "NT_STATUS_" in outcome.reason
    assert outcome.www_authenticate == ["NTLM"]
    assert auth.pending_count() == 0
    assert isinstance(await client.send(None), Challenge)


@pytest.mark.samba
async def test_new_type1_restarts_authentication(auth: HttpAuthenticator) -> None:
    client = HttpClient(auth, "testuser", "Test1234")
    assert await client.login() == Authenticated(TESTUSER)
    other = HttpClient(auth, "otheruser", "Other1234")
    other.conn = client.conn  # same TCP connection, new handshake
    await other.type1()
    assert isinstance(await client.send(None), Challenge)  # no longer authenticated
    assert auth.pending_count() == 1
    # and a second type1 while one is pending replaces it (one Samba socket per connection)
    third = HttpClient(auth, "otheruser", "Other1234")
    third.conn = client.conn
    await third.type1()
    assert auth.pending_count() == 1
    fourth = HttpClient(auth, "otheruser", "Other1234")
    fourth.conn = client.conn
    assert await fourth.login() == Authenticated(Identity("otheruser", "EXAMPLE"))


@pytest.mark.samba
async def test_type3_without_type1_denied(auth: HttpAuthenticator) -> None:
    donor = HttpClient(auth, "testuser", "Test1234")
    challenge = await donor.type1()
    token = base64.b64decode(challenge.www_authenticate[0].split(" ", 1)[1])
    type3 = donor.ntlm.step(token) or b""
    # replayed on a connection that never sent type1
    outcome = await auth.authenticate(Conn(), f"NTLM {b64(type3)}", tls=True)
    assert isinstance(outcome, Denied)
    assert "without a pending handshake" in outcome.reason
    auth.forget(donor.conn)
    assert auth.pending_count() == 0


@pytest.mark.samba
async def test_anonymous_denied(auth: HttpAuthenticator) -> None:
    client = HttpClient(auth, "testuser", "Test1234")
    await client.type1()
    flags = messages.Flag.NEGOTIATE_UNICODE | messages.Flag.NEGOTIATE_ANONYMOUS
    head = messages.SIGNATURE + struct.pack("<I", 3) + struct.pack("<HHI", 1, 1, 64)
    head += struct.pack("<HHI", 0, 0, 65) * 5 + struct.pack("<I", flags) + b"\x00"
    outcome = await client.send(f"NTLM {b64(head)}")
    assert isinstance(outcome, Denied)
    assert "anonymous" in outcome.reason
    assert auth.pending_count() == 0


@pytest.mark.samba
async def test_negotiate_wrapping_raw_ntlm(auth: HttpAuthenticator) -> None:
    client = HttpClient(auth, "testuser", "Test1234")
    assert await client.login(scheme="Negotiate") == Authenticated(TESTUSER)


async def test_negotiate_with_kerberos_token_denied() -> None:
    auth = HttpAuthenticator(unreachable_verifier())
    spnego_init = b"\x60\x28\x06\x06\x2b\x06\x01\x05\x05\x02\xa0\x1e" + b"\x00" * 30
    outcome = await auth.authenticate(Conn(), f"Negotiate {b64(spnego_init)}", tls=True)
    assert isinstance(outcome, Denied)
    assert "Kerberos" in outcome.reason
    assert outcome.www_authenticate == ["NTLM", BASIC_OFFER]


@pytest.mark.samba
async def test_basic(auth: HttpAuthenticator) -> None:
    conn = Conn()
    outcome = await auth.authenticate(conn, basic("EXAMPLE\\testuser", "Test1234"), tls=True)
    assert outcome == Authenticated(TESTUSER)
    # Basic is per request, never cached on the connection
    assert isinstance(await auth.authenticate(conn, None, tls=True), Challenge)
    assert auth.pending_count() == 0
    wrong = await auth.authenticate(conn, basic("testuser", "nope"), tls=True)
    assert isinstance(wrong, Denied)
    assert wrong.www_authenticate == ["NTLM", BASIC_OFFER]


@pytest.mark.samba
async def test_basic_refused_on_plain_http(samba_dc: SambaDC) -> None:
    verifier = WinbindVerifier(HelperPool(samba_dc.ntlm_helper()))
    strict = HttpAuthenticator(verifier)
    outcome = await strict.authenticate(Conn(), basic("testuser", "Test1234"), tls=False)
    assert isinstance(outcome, Denied) and "TLS" in outcome.reason
    assert outcome.www_authenticate == ["NTLM"]
    lax = HttpAuthenticator(verifier, basic_requires_tls=False)
    assert await lax.authenticate(Conn(), None, tls=False) == Challenge(["NTLM", BASIC_OFFER])
    good = await lax.authenticate(Conn(), basic("testuser", "Test1234"), tls=False)
    assert good == Authenticated(TESTUSER)
    off = HttpAuthenticator(verifier, allow_basic=False, realm="x")
    assert await off.authenticate(Conn(), None, tls=True) == Challenge(["NTLM"])
    refused = await off.authenticate(Conn(), basic("testuser", "Test1234"), tls=True)
    assert isinstance(refused, Denied) and "disabled" in refused.reason


@pytest.mark.samba
async def test_max_pending(samba_dc: SambaDC) -> None:
    auth = HttpAuthenticator(WinbindVerifier(HelperPool(samba_dc.ntlm_helper())), max_pending=2)
    a = HttpClient(auth, "testuser", "Test1234")
    b = HttpClient(auth, "testuser", "Test1234")
    c = HttpClient(auth, "testuser", "Test1234")
    await a.type1()
    await b.type1()
    assert auth.pending_count() == 2
    full = await c.send(f"NTLM {b64(c.ntlm.step() or b'')}")
    assert full == Unavailable("too many pending handshakes", Unreachable.BUSY)
    assert await auth.authenticate(Conn(), basic("testuser", "Test1234"), tls=True) == full
    auth.forget(a.conn)
    assert auth.pending_count() == 1
    c = HttpClient(auth, "testuser", "Test1234")
    assert await c.login() == Authenticated(TESTUSER)
    assert auth.pending_count() == 1  # b is still waiting


@pytest.mark.samba
async def test_handshake_expires(samba_dc: SambaDC) -> None:
    auth = HttpAuthenticator(WinbindVerifier(HelperPool(samba_dc.ntlm_helper())),
                             handshake_timeout=0.05)
    client = HttpClient(auth, "testuser", "Test1234")
    challenge = await client.type1()
    await wait_until(lambda: auth.pending_count() == 0)
    token = base64.b64decode(challenge.www_authenticate[0].split(" ", 1)[1])
    outcome = await client.send(f"NTLM {b64(client.ntlm.step(token) or b'')}")
    assert isinstance(outcome, Denied)
    assert "without a pending handshake" in outcome.reason


@pytest.mark.samba
async def test_garbage_collected_connection_releases_samba_socket(
    auth: HttpAuthenticator,
) -> None:
    client = HttpClient(auth, "testuser", "Test1234")
    await client.type1()
    assert auth.pending_count() == 1
    del client
    gc.collect()
    assert auth.pending_count() == 0


async def test_samba_unreachable_is_unavailable_not_denied() -> None:
    auth = HttpAuthenticator(unreachable_verifier())
    client = HttpClient(auth, "testuser", "Test1234")
    outcome = await client.send(f"NTLM {b64(client.ntlm.step() or b'')}")
    assert isinstance(outcome, Unavailable)
    assert "cannot start the NTLM helper" in outcome.reason
    assert auth.pending_count() == 0
    outcome = await auth.authenticate(Conn(), basic("testuser", "Test1234"), tls=True)
    assert isinstance(outcome, Unavailable)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("NTLM !!!notbase64", "base64"),
        ("NTLM " + b64(b"hello"), "not an NTLMSSP"),
        ("NTLM " + b64(b"NTLMSSP\x00\x02\x00\x00\x00" + b"\x00" * 60), "CHALLENGE"),
        ("NTLM " + b64(b"NTLMSSP\x00\x07\x00\x00\x00" + b"\x00" * 60), "malformed"),
        ("NTLM", "not an NTLMSSP"),
        ("Digest username=x", "unsupported authentication scheme"),
        ("Basic " + b64(b"no-colon"), "lack a ':'"),
        ("Basic " + b64(b":pw"), "empty user"),
        ("Basic ###", "base64"),
    ],
)
async def test_bad_headers_denied(header: str, reason: str) -> None:
    auth = HttpAuthenticator(unreachable_verifier())
    outcome = await auth.authenticate(Conn(), header, tls=True)
    assert isinstance(outcome, Denied), outcome
    assert reason in outcome.reason
    assert auth.pending_count() == 0


# -- with a fake verifier (timing controlled by the test) -------------------------------------


class FakeHandshake:
    def __init__(self, identity: Identity | None) -> None:
        self.challenge = b"NTLMSSP\x00\x02\x00\x00\x00fake"
        self.identity = identity
        self.closed = False

    async def complete(self, authenticate: bytes) -> Identity:
        self.closed = True
        if self.identity is None:
            raise AuthenticationFailed("fake says no")
        return self.identity

    def close(self) -> None:
        self.closed = True


class FakeVerifier:
    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.unavailable = False
        self.handshakes: list[FakeHandshake] = []

    async def probe(self) -> None:
        pass

    async def begin(self, negotiate: bytes, source: str | None = None) -> Handshake:
        if self.gate is not None:
            await self.gate.wait()
        if self.unavailable:
            raise NtlmServerUnavailable("fake server down")
        handshake = FakeHandshake(Identity("alice", "EXAMPLE"))
        self.handshakes.append(handshake)
        return handshake


TYPE1 = "NTLM " + b64(messages.build_negotiate())
FAKE_TYPE3 = "NTLM " + b64(
    messages.SIGNATURE
    + struct.pack("<I", 3)
    + struct.pack("<HHI", 0, 0, 72)  # LM
    + struct.pack("<HHI", 16, 16, 74)  # NT
    + struct.pack("<HHI", 0, 0, 72)  # domain
    + struct.pack("<HHI", 2, 2, 72)  # user
    + struct.pack("<HHI", 0, 0, 72) * 2  # workstation, session key
    + struct.pack("<I", messages.Flag.NEGOTIATE_UNICODE)
    + b"\x00" * 8
    + "a".encode("utf-16-le")
    + b"\x01" * 16
)


async def test_fake_flow_and_second_type1_closes_first() -> None:
    verifier = FakeVerifier()
    auth = HttpAuthenticator(verifier)
    conn = Conn()
    first = await auth.authenticate(conn, TYPE1, tls=True)
    assert isinstance(first, Challenge)
    assert first.www_authenticate == ["NTLM " + b64(verifier.handshakes[0].challenge)]
    await auth.authenticate(conn, TYPE1, tls=True)
    assert verifier.handshakes[0].closed
    assert not verifier.handshakes[1].closed
    assert auth.pending_count() == 1
    outcome = await auth.authenticate(conn, FAKE_TYPE3, tls=True)
    assert outcome == Authenticated(Identity("alice", "EXAMPLE"))
    assert auth.pending_count() == 0


async def test_forget_while_samba_answers_closes_late_handshake() -> None:
    verifier = FakeVerifier()
    verifier.gate = asyncio.Event()
    auth = HttpAuthenticator(verifier)
    conn = Conn()
    task = asyncio.create_task(auth.authenticate(conn, TYPE1, tls=True))
    await wait_until(lambda: auth.pending_count() == 1)
    auth.forget(conn)
    verifier.gate.set()
    outcome = await task
    assert isinstance(outcome, Denied)
    assert verifier.handshakes[0].closed
    assert auth.pending_count() == 0


async def test_in_flight_begins_count_against_max_pending() -> None:
    verifier = FakeVerifier()
    verifier.gate = asyncio.Event()
    auth = HttpAuthenticator(verifier, max_pending=1)
    task = asyncio.create_task(auth.authenticate(Conn(), TYPE1, tls=True))
    await wait_until(lambda: auth.pending_count() == 1)
    assert await auth.authenticate(Conn(), TYPE1, tls=True) == Unavailable(
        "too many pending handshakes", Unreachable.BUSY
    )
    verifier.gate.set()
    assert isinstance(await task, Challenge)


async def test_fake_unavailable_and_rejection() -> None:
    verifier = FakeVerifier()
    verifier.unavailable = True
    auth = HttpAuthenticator(verifier)
    assert await auth.authenticate(Conn(), TYPE1, tls=True) == Unavailable("fake server down")
    assert auth.pending_count() == 0
    verifier.unavailable = False
    conn = Conn()
    await auth.authenticate(conn, TYPE1, tls=True)
    verifier.handshakes[-1].identity = None
    outcome = await auth.authenticate(conn, FAKE_TYPE3, tls=True)
    assert outcome == Denied("fake says no", ["NTLM", BASIC_OFFER])
    assert isinstance(await auth.authenticate(conn, None, tls=True), Challenge)


async def test_expiry_closes_handshake() -> None:
    verifier = FakeVerifier()
    auth = HttpAuthenticator(verifier, handshake_timeout=0.01)
    conn = Conn()
    await auth.authenticate(conn, TYPE1, tls=True)
    await wait_until(lambda: verifier.handshakes[0].closed)
    assert auth.pending_count() == 0
    assert isinstance(await auth.authenticate(conn, FAKE_TYPE3, tls=True), Denied)


async def test_forget_unknown_connection_is_harmless() -> None:
    auth = HttpAuthenticator(FakeVerifier())
    auth.forget(Conn())
    auth.forget(object.__new__(Conn))
    assert auth.pending_count() == 0


async def test_anonymous_never_reaches_the_verifier() -> None:
    verifier = FakeVerifier()
    auth = HttpAuthenticator(verifier)
    conn = Conn()
    await auth.authenticate(conn, TYPE1, tls=True)
    anonymous = base64.b64decode(FAKE_TYPE3.split(" ")[1])
    anonymous = anonymous[:20] + struct.pack("<HHI", 0, 0, 74) + anonymous[28:]  # no NT response
    outcome = await auth.authenticate(conn, "NTLM " + b64(anonymous), tls=True)
    assert isinstance(outcome, Denied) and "anonymous" in outcome.reason
    assert verifier.handshakes[0].closed
    assert verifier.handshakes[0].identity is not None  # complete() was never called
    assert auth.pending_count() == 0


async def test_unanswered_challenge_gives_its_slot_back_after_challenge_timeout() -> None:
    """A client that never sends its AUTHENTICATE holds a verifier slot (a helper) only for
    challenge_timeout, even when the connection may stay unauthenticated longer."""
    verifier = FakeVerifier()
    auth = HttpAuthenticator(verifier, handshake_timeout=30.0, challenge_timeout=0.05)
    conn = Conn()
    assert isinstance(await auth.authenticate(conn, TYPE1, tls=True), Challenge)
    assert auth.pending_count() == 1
    await wait_until(lambda: verifier.handshakes[0].closed)
    assert auth.pending_count() == 0
