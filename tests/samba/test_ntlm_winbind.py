"""The winbind verifier (ntlm.winbind) and its helper codec, against the real Samba AD DC and
against scripted fake helpers for the failure modes a real winbind does not produce on demand.

The identity attacks of the security review are here at the verifier level: a NUL in the user
name, and a UPN that belongs to another account (the HTTP-level versions are in
test_identity_samba.py).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import spnego

from ntlm import helper_protocol as hp
from ntlm import messages
from ntlm.basic import verify_password
from ntlm.errors import AuthenticationFailed, NtlmServerUnavailable, Refusal, Unreachable
from ntlm.verifier import Identity, has_control_characters
from ntlm.winbind import HelperPool, WinbindVerifier
from tests.support.ntlm_tokens import anonymous_authenticate, replace_user_field
from tests.support.samba_dc import SambaDC

TESTUSER = Identity(user="testuser", domain="EXAMPLE")


def ntlm_client(user: str, password: str) -> spnego.ContextProxy:
    return spnego.client(
        user, password, hostname="proxy", protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm
    )


async def relay(verifier: WinbindVerifier, user: str, password: str) -> Identity:
    """What the HTTP server does: the client's tokens go through the verifier to winbind."""
    client = ntlm_client(user, password)
    handshake = await verifier.begin(client.step() or b"")
    authenticate = client.step(handshake.challenge)
    assert authenticate is not None
    return await handshake.complete(authenticate)


@pytest.fixture
async def verifier(samba_dc: SambaDC) -> AsyncIterator[WinbindVerifier]:
    v = WinbindVerifier(HelperPool(samba_dc.ntlm_helper(), size=4))
    yield v
    await v.aclose()


# -- real Samba: who is authenticated --------------------------------------------------------


@pytest.mark.samba
async def test_right_password(verifier: WinbindVerifier) -> None:
    identity = await relay(verifier, "testuser", "Test1234")
    assert identity == TESTUSER
    assert identity.principal == "EXAMPLE\\testuser"


@pytest.mark.samba
@pytest.mark.parametrize(
    "spelling",
    ["testuser", "TESTUSER", "testuser@EXAMPLE.COM", "EXAMPLE\\testuser", "example.com\\TestUser"],
)
async def test_user_spellings_give_one_identity(verifier: WinbindVerifier, spelling: str) -> None:
    assert await relay(verifier, spelling, "Test1234") == TESTUSER
    assert await verify_password(verifier, spelling, "Test1234") == TESTUSER


@pytest.mark.samba
async def test_upn_gives_the_account_it_belongs_to(
    verifier: WinbindVerifier, samba_dc: SambaDC
) -> None:
    """asmith's UPN is victim@corp.test: logging in with it is asmith, never 'victim'."""
    asmith = Identity(samba_dc.alias_user, "EXAMPLE")
    assert await relay(verifier, samba_dc.alias_upn, samba_dc.alias_password) == asmith
    upn, password = samba_dc.alias_upn, samba_dc.alias_password
    assert await verify_password(verifier, upn, password) == asmith
    assert await verify_password(verifier, upn.upper(), password) == asmith
    # The real account 'victim' is itself, and its password is not asmith's UPN's.
    victim = Identity(samba_dc.victim_user, "EXAMPLE")
    assert await relay(verifier, samba_dc.victim_user, samba_dc.victim_password) == victim
    with pytest.raises(AuthenticationFailed) as exc:
        await relay(verifier, samba_dc.alias_upn, samba_dc.victim_password)
    assert exc.value.code is Refusal.BAD_CREDENTIALS


@pytest.mark.samba
async def test_nul_in_user_name_refused_before_winbind(
    verifier: WinbindVerifier, samba_dc: SambaDC
) -> None:
    """otheruser's real AUTHENTICATE, UserName 'otheruser\\0\\testuser': never sent to winbind."""
    client = ntlm_client("otheruser", samba_dc.users["otheruser"])
    handshake = await verifier.begin(client.step() or b"")
    forged = replace_user_field(client.step(handshake.challenge) or b"", "otheruser\0\\testuser")
    assert messages.parse_authenticate(forged).user == "otheruser\0\\testuser"
    with pytest.raises(AuthenticationFailed) as exc:
        await handshake.complete(forged)
    assert exc.value.code is Refusal.BAD_NAME
    assert verifier.pool.busy == 0


@pytest.mark.samba
async def test_nul_attack_even_unchecked_never_names_the_victim(
    verifier: WinbindVerifier, samba_dc: SambaDC, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with the name check switched off, the identity is still the account
    winbind verified (or a refusal), never the name after the NUL."""
    import ntlm.verifier

    monkeypatch.setattr(ntlm.verifier, "check_client_names", lambda auth: None)
    client = ntlm_client("otheruser", samba_dc.users["otheruser"])
    handshake = await verifier.begin(client.step() or b"")
    forged = replace_user_field(client.step(handshake.challenge) or b"", "otheruser\0\\testuser")
    try:
        identity = await handshake.complete(forged)
    except (AuthenticationFailed, NtlmServerUnavailable):
        return
    assert identity == Identity("otheruser", "EXAMPLE")


@pytest.mark.samba
@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("testuser", "wrong"),
        ("testuser", "test1234"),
        ("testuser", "Other1234"),  # another user's password
        ("nosuchuser", "Test1234"),
        ("disableduser", "Disabled1234"),
    ],
    ids=["wrong-password", "wrong-case-password", "other-users-password", "unknown", "disabled"],
)
async def test_rejected(verifier: WinbindVerifier, user: str, password: str) -> None:
    with pytest.raises(AuthenticationFailed) as excinfo:
        await relay(verifier, user, password)
    assert excinfo.value.code is Refusal.BAD_CREDENTIALS
    assert "NT_STATUS_" in excinfo.value.reason


@pytest.mark.samba
async def test_challenge_announces_netbios_domain(verifier: WinbindVerifier) -> None:
    handshake = await verifier.begin(ntlm_client("testuser", "x").step() or b"")
    try:
        challenge = messages.parse_challenge(handshake.challenge)
        assert challenge.nb_domain_name == "EXAMPLE"
        assert handshake.domain == "EXAMPLE"
    finally:
        handshake.close()
        handshake.close()  # idempotent
    assert handshake.closed
    assert verifier.pool.busy == 0
    with pytest.raises(AuthenticationFailed, match="closed"):
        await handshake.complete(b"anything")


@pytest.mark.samba
async def test_complete_only_once(verifier: WinbindVerifier) -> None:
    client = ntlm_client("testuser", "Test1234")
    handshake = await verifier.begin(client.step() or b"")
    authenticate = client.step(handshake.challenge) or b""
    assert await handshake.complete(authenticate) == TESTUSER
    assert handshake.closed
    with pytest.raises(AuthenticationFailed):
        await handshake.complete(authenticate)


@pytest.mark.samba
async def test_replayed_authenticate_is_rejected(verifier: WinbindVerifier) -> None:
    """An AUTHENTICATE captured from one handshake is worthless in another: every helper
    handshake has a fresh CHALLENGE."""
    client = ntlm_client("testuser", "Test1234")
    first = await verifier.begin(client.step() or b"")
    captured = client.step(first.challenge) or b""
    assert await first.complete(captured) == TESTUSER
    second = await verifier.begin(ntlm_client("testuser", "x").step() or b"")
    assert second.challenge != first.challenge
    with pytest.raises(AuthenticationFailed) as exc:
        await second.complete(captured)
    assert exc.value.code is Refusal.BAD_CREDENTIALS


@pytest.mark.samba
async def test_anonymous_refused_before_winbind(verifier: WinbindVerifier) -> None:
    handshake = await verifier.begin(messages.build_negotiate())
    with pytest.raises(AuthenticationFailed) as exc:
        await handshake.complete(anonymous_authenticate())
    assert exc.value.code is Refusal.ANONYMOUS
    assert handshake.closed


@pytest.mark.samba
async def test_probe_and_helpers_are_reused(verifier: WinbindVerifier) -> None:
    await verifier.probe()
    for _ in range(6):
        assert await verify_password(verifier, "testuser", "Test1234") == TESTUSER
    assert verifier.pool.started == 1  # one at a time: the same helper every time


@pytest.mark.samba
async def test_storm_queues_instead_of_failing(samba_dc: SambaDC) -> None:
    """More logins at once than helpers: they wait their turn, none fails."""
    verifier = WinbindVerifier(HelperPool(samba_dc.ntlm_helper(), size=2, queue_timeout=60))
    try:
        results = await asyncio.gather(
            *[verify_password(verifier, "testuser", "Test1234") for _ in range(40)]
        )
        assert results == [TESTUSER] * 40
        assert verifier.pool.started == 2
        assert verifier.pool.queued > 0
        assert verifier.pool.queue_timeouts == 0
    finally:
        await verifier.aclose()


@pytest.mark.samba
async def test_samba_stopped_and_restarted(samba_dc: SambaDC) -> None:
    verifier = WinbindVerifier(HelperPool(samba_dc.ntlm_helper(), size=2), reply_timeout=10)
    try:
        assert await relay(verifier, "testuser", "Test1234") == TESTUSER
        samba_dc.stop()
        try:
            with pytest.raises(NtlmServerUnavailable):
                await relay(verifier, "testuser", "Test1234")
            with pytest.raises(NtlmServerUnavailable):
                await verify_password(verifier, "testuser", "Test1234")
            with pytest.raises(NtlmServerUnavailable):
                await verifier.probe()
        finally:
            samba_dc.start()
        assert await relay(verifier, "testuser", "Test1234") == TESTUSER
    finally:
        await verifier.aclose()


# -- no winbind at all -----------------------------------------------------------------------


async def test_helper_missing_is_unavailable() -> None:
    verifier = WinbindVerifier(HelperPool(["/nonexistent/ntlm_auth"]))
    with pytest.raises(NtlmServerUnavailable, match="cannot start the NTLM helper"):
        await verifier.begin(messages.build_negotiate())
    with pytest.raises(NtlmServerUnavailable):
        await verifier.probe()
    with pytest.raises(NtlmServerUnavailable):
        await verify_password(verifier, "testuser", "Test1234")
    assert verifier.pool.busy == 0


async def test_begin_refuses_non_negotiate_without_a_helper() -> None:
    verifier = WinbindVerifier(HelperPool(["/nonexistent/ntlm_auth"]))
    with pytest.raises(AuthenticationFailed, match="malformed NTLM NEGOTIATE"):
        await verifier.begin(b"NTLMSSP\x00\x03\x00\x00\x00" + b"\x00" * 60)
    assert verifier.pool.started == 0


@pytest.mark.parametrize(
    "name", ["a\0b", "a\nb", "a\rb", "a\tb", "a\x7fb", "a\x85b", "a\u2028b", "a\u200bb"]
)
async def test_control_characters_in_basic_user_refused(name: str) -> None:
    verifier = WinbindVerifier(HelperPool(["/nonexistent/ntlm_auth"]))
    with pytest.raises(AuthenticationFailed) as exc:
        await verify_password(verifier, name, "pw")
    assert exc.value.code is Refusal.BAD_NAME
    assert verifier.pool.started == 0


async def test_control_characters_in_negotiate_names_refused() -> None:
    flags = (messages.PROBE_NEGOTIATE_FLAGS | messages.Flag.OEM_DOMAIN_SUPPLIED
             | messages.Flag.OEM_WORKSTATION_SUPPLIED)
    head = messages.SIGNATURE + struct.pack("<II", messages.MessageType.NEGOTIATE, flags)
    negotiate = head + struct.pack("<HHIHHI", 3, 3, 32, 2, 2, 35) + b"EX\0WS"
    assert messages.parse_negotiate(negotiate).domain == "EX\0"
    verifier = WinbindVerifier(HelperPool(["/nonexistent/ntlm_auth"]))
    with pytest.raises(AuthenticationFailed) as exc:
        await verifier.begin(negotiate)
    assert exc.value.code is Refusal.BAD_NAME
    assert verifier.pool.started == 0


def test_has_control_characters() -> None:
    for ok in ["testuser", "Test User", "jürgen", "o'brien", "victim@corp.test", "EXAMPLE\\x"]:
        assert not has_control_characters(ok)
    for bad in ["\0", "x\0", "\n", "\x1b[31m", "\x7f", "\u0085", "\u2029", "\ufeff"]:
        assert has_control_characters(bad)


# -- the helper codec ------------------------------------------------------------------------


def test_codec_round_trip() -> None:
    assert hp.encode_request(hp.Request.NEGOTIATE, b"\x01\x02") == b"YR AQI=\n"
    assert hp.encode_request(hp.Request.AUTHENTICATE, b"x") == b"KK eA==\n"
    assert hp.parse_reply(b"TT AQI=\n") == hp.Reply(hp.ReplyKind.CHALLENGE, token=b"\x01\x02")
    assert hp.parse_reply(b"AF EXAMPLE\\testuser\n") == hp.Reply(
        hp.ReplyKind.ACCEPTED, text="EXAMPLE\\testuser")
    assert hp.parse_reply(b"NA NT_STATUS_LOGON_FAILURE") == hp.Reply(
        hp.ReplyKind.REJECTED, text="NT_STATUS_LOGON_FAILURE")
    assert hp.parse_reply(b"BH x y\n").kind is hp.ReplyKind.BROKEN


@pytest.mark.parametrize("line", [b"", b"XX foo", b"TT", b"TT !!!", b"\xff\xfe", b"AF" * 40000])
def test_codec_refuses_garbage(line: bytes) -> None:
    with pytest.raises(hp.HelperProtocolError):
        hp.parse_reply(line)


def test_split_account() -> None:
    assert hp.split_account("EXAMPLE\\TestUser", "X") == ("EXAMPLE", "testuser")
    assert hp.split_account("example+testuser", "X") == ("EXAMPLE", "testuser")
    assert hp.split_account("testuser", "example") == ("EXAMPLE", "testuser")
    for bad in ["", "EXAMPLE\\", "\\user", "EXAMPLE\\a\x00b", "a\nb"]:
        with pytest.raises(hp.HelperProtocolError):
            hp.split_account(bad, "EXAMPLE")


# -- scripted fake helpers -------------------------------------------------------------------

FAKE_CHALLENGE = (
    messages.SIGNATURE
    + struct.pack("<I", messages.MessageType.CHALLENGE)
    + struct.pack("<HHI", 14, 14, 48)  # TargetName "EXAMPLE"
    + struct.pack("<I", messages.Flag.NEGOTIATE_UNICODE | messages.Flag.NEGOTIATE_NTLM)
    + b"\x11" * 8  # server challenge
    + b"\x00" * 8  # reserved
    + struct.pack("<HHI", 0, 0, 62)  # TargetInfo: none
    + "EXAMPLE".encode("utf-16-le")
)


def fake_helper(tmp_path: Path, answer: str) -> list[str]:
    """A helper that answers YR with a CHALLENGE and KK with ``answer`` (or misbehaves)."""
    script = tmp_path / "fake_ntlm_auth.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        challenge = {base64.b64encode(FAKE_CHALLENGE).decode()!r}
        answer = {answer!r}
        for line in sys.stdin:
            if line.startswith("YR"):
                print("TT " + challenge, flush=True)
            elif answer == "exit":
                sys.exit(0)
            elif answer == "hang":
                time.sleep(60)
            else:
                print(answer, flush=True)
    """))
    return [sys.executable, str(script)]


def fake_authenticate() -> bytes:
    client = ntlm_client("alice", "pw")
    client.step()
    return client.step(FAKE_CHALLENGE) or b""


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ("AF EXAMPLE\\alice", Identity("alice", "EXAMPLE")),
        ("AF alice", Identity("alice", "EXAMPLE")),  # winbind "use default domain"
        ("NA NT_STATUS_WRONG_PASSWORD", Refusal.BAD_CREDENTIALS),
        ("NA NT_STATUS_NO_LOGON_SERVERS", Unreachable.NTLM_SERVER),
        ("BH NT_STATUS_UNSUCCESSFUL", Unreachable.NTLM_SERVER),
        ("TT AAAA", Unreachable.NTLM_SERVER),
        ("garbage", Unreachable.NTLM_SERVER),
        ("AF ", Unreachable.NTLM_SERVER),
        ("exit", Unreachable.NTLM_SERVER),
        ("hang", Unreachable.NTLM_SERVER),
    ],
)
async def test_fake_helper_verdicts(
    tmp_path: Path, answer: str, outcome: Identity | Refusal | Unreachable
) -> None:
    verifier = WinbindVerifier(HelperPool(fake_helper(tmp_path, answer), size=1),
                               reply_timeout=1.0)
    try:
        handshake = await verifier.begin(messages.build_negotiate())
        assert handshake.domain == "EXAMPLE"
        if isinstance(outcome, Identity):
            assert await handshake.complete(fake_authenticate()) == outcome
            return
        error = AuthenticationFailed if isinstance(outcome, Refusal) else NtlmServerUnavailable
        with pytest.raises(error) as exc:
            await handshake.complete(fake_authenticate())
        failure = exc.value  # pytest types it as their common base, which has no code
        assert isinstance(failure, AuthenticationFailed | NtlmServerUnavailable)
        assert failure.code is outcome
        # Whatever happened, the next handshake gets a working helper again.
        assert verifier.pool.busy == 0
        again = await verifier.begin(messages.build_negotiate())
        again.close()
        expected_started = 1 if answer.startswith("NA") else 2  # a verdict keeps the helper
        assert verifier.pool.started == expected_started
    finally:
        await verifier.aclose()


async def test_queue_timeout_is_busy_503(tmp_path: Path) -> None:
    pool = HelperPool(fake_helper(tmp_path, "AF EXAMPLE\\alice"), size=1, queue_timeout=0.2)
    verifier = WinbindVerifier(pool)
    try:
        held = await verifier.begin(messages.build_negotiate())
        with pytest.raises(NtlmServerUnavailable) as exc:
            await verifier.begin(messages.build_negotiate())
        assert exc.value.code is Unreachable.HELPERS_BUSY
        assert pool.queue_timeouts == 1
        # A waiter gets the helper as soon as it is given back.
        waiting = asyncio.create_task(verifier.begin(messages.build_negotiate()))
        await asyncio.sleep(0.05)
        assert pool.waiting == 1
        held.close()
        second = await asyncio.wait_for(waiting, 5)
        assert await second.complete(fake_authenticate()) == Identity("alice", "EXAMPLE")
        assert pool.started == 1
    finally:
        await verifier.aclose()


async def test_dead_helper_slot_goes_to_a_waiter(tmp_path: Path) -> None:
    pool = HelperPool(fake_helper(tmp_path, "exit"), size=1, queue_timeout=5)
    verifier = WinbindVerifier(pool, reply_timeout=2)
    try:
        held = await verifier.begin(messages.build_negotiate())
        waiting = asyncio.create_task(verifier.begin(messages.build_negotiate()))
        await asyncio.sleep(0.05)
        with pytest.raises(NtlmServerUnavailable):
            await held.complete(fake_authenticate())  # the helper exits: its slot is freed
        second = await asyncio.wait_for(waiting, 5)
        second.close()
        assert pool.started == 2
    finally:
        await verifier.aclose()


async def test_closed_pool_refuses() -> None:
    pool = HelperPool(["/nonexistent/ntlm_auth"])
    await pool.aclose()
    with pytest.raises(NtlmServerUnavailable, match="closed"):
        await pool.acquire()


async def test_one_source_holds_only_its_share_of_helpers(tmp_path: Path) -> None:
    """Half-done handshakes from one address take at most ``per_source`` helpers; another
    address still gets one at once, and the flooder's extra logins wait (then 503 BUSY)."""
    pool = HelperPool(fake_helper(tmp_path, "AF EXAMPLE\\alice"), size=4, per_source=2,
                      queue_timeout=0.3)
    verifier = WinbindVerifier(pool)
    try:
        held = [await verifier.begin(messages.build_negotiate(), "198.51.100.7")
                for _ in range(2)]
        with pytest.raises(NtlmServerUnavailable) as exc:
            await verifier.begin(messages.build_negotiate(), "198.51.100.7")
        assert exc.value.code is Unreachable.HELPERS_BUSY
        assert "this address's share" in exc.value.reason
        other = await asyncio.wait_for(
            verifier.begin(messages.build_negotiate(), "203.0.113.9"), 5)
        assert await other.complete(fake_authenticate()) == Identity("alice", "EXAMPLE")
        # The flooder's next login gets a helper as soon as one of its own is given back.
        waiting = asyncio.create_task(verifier.begin(messages.build_negotiate(), "198.51.100.7"))
        await asyncio.sleep(0.05)
        held[0].close()
        third = await asyncio.wait_for(waiting, 5)
        third.close()
        held[1].close()
        assert pool.busy == 0
        # Without a source (exempt front proxies) there is no per-source share.
        unbounded = [await verifier.begin(messages.build_negotiate()) for _ in range(4)]
        for h in unbounded:
            h.close()
    finally:
        await verifier.aclose()


async def test_waiter_cancelled_as_it_is_handed_a_helper_loses_nothing(tmp_path: Path) -> None:
    """A client that goes away in the instant its queued login is handed a helper must not
    take the helper with it: the pool would shrink by one for ever."""
    pool = HelperPool(fake_helper(tmp_path, "AF EXAMPLE\\alice"), size=1, queue_timeout=5)
    verifier = WinbindVerifier(pool)
    try:
        held = await verifier.begin(messages.build_negotiate())
        waiting = asyncio.create_task(verifier.begin(messages.build_negotiate()))
        await asyncio.sleep(0.05)
        held.close()  # hands the helper to the waiter ...
        waiting.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.busy == 0
        again = await asyncio.wait_for(verifier.begin(messages.build_negotiate()), 2)
        assert await again.complete(fake_authenticate()) == Identity("alice", "EXAMPLE")
        assert pool.started == 1
    finally:
        await verifier.aclose()


async def test_request_cancelled_mid_answer_replaces_the_helper(tmp_path: Path) -> None:
    """A login cancelled while its helper is answering must not leave that answer in the
    pipe for the next handshake to read: the helper is replaced."""
    pool = HelperPool(fake_helper(tmp_path, "hang"), size=1, queue_timeout=5)
    verifier = WinbindVerifier(pool, reply_timeout=30)
    try:
        handshake = await verifier.begin(messages.build_negotiate())
        task = asyncio.create_task(handshake.complete(fake_authenticate()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await asyncio.wait_for(verifier.begin(messages.build_negotiate()), 5)
        again.close()
        assert pool.started == 2
    finally:
        await verifier.aclose()


async def test_concurrent_logins_from_one_source_take_only_its_share(tmp_path: Path) -> None:
    """Logins from one address arriving together, while the pool is still starting its
    helpers, take no more than ``per_source`` (the share counts from the grant, not from
    when the helper is up); the rest wait and then get 503 BUSY."""
    pool = HelperPool(fake_helper(tmp_path, "AF EXAMPLE\\alice"), size=8, per_source=2,
                      queue_timeout=0.5)
    try:
        results = await asyncio.gather(*(pool.acquire("198.51.100.7") for _ in range(6)),
                                       return_exceptions=True)
        got = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, NtlmServerUnavailable)]
        assert len(got) == 2 and len(refused) == 4
        assert all(r.code is Unreachable.HELPERS_BUSY for r in refused)
        for helper in got:
            pool.release(helper)
        assert pool.busy == 0
        again = await asyncio.wait_for(pool.acquire("198.51.100.7"), 5)  # its share is back
        pool.release(again)
    finally:
        await pool.aclose()
