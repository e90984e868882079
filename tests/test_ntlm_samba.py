"""NtlmVerifier / verify_password against a real Samba AD DC, plus scripted fake DCE/RPC servers
for the failure modes a real Samba does not produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import spnego

from ntlm import dcerpc_auth as rpc
from ntlm import messages
from ntlm.basic import verify_password
from ntlm.errors import AuthenticationFailed, NtlmServerUnavailable
from ntlm.passthrough import Identity, NtlmVerifier
from tests.samba_dc import SambaDC

TESTUSER = Identity(user="testuser", domain="EXAMPLE")
SEC_PKG_ERROR = "0x00000721"  # rpc_s_sec_pkg_error: Samba's FAULT for bad credentials


def ntlm_client(user: str, password: str) -> spnego.ContextProxy:
    return spnego.client(
        user, password, hostname="proxy", protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm
    )


async def relay(verifier: NtlmVerifier, user: str, password: str) -> Identity:
    """What the HTTP server does: the client's tokens go through the verifier to Samba."""
    client = ntlm_client(user, password)
    negotiate = client.step()
    assert negotiate is not None
    handshake = await verifier.begin(negotiate)
    authenticate = client.step(handshake.challenge)
    assert authenticate is not None
    return await handshake.complete(authenticate)


def anonymous_authenticate() -> bytes:
    """An anonymous AUTHENTICATE as MS-NLMP 3.1.5.1.2 describes it: LM = Z(1), rest empty."""
    flags = messages.Flag.NEGOTIATE_UNICODE | messages.Flag.NEGOTIATE_NTLM
    flags |= messages.Flag.NEGOTIATE_ANONYMOUS
    head = messages.SIGNATURE + struct.pack("<I", messages.MessageType.AUTHENTICATE)
    head += struct.pack("<HHI", 1, 1, 64)  # LmChallengeResponse: one zero byte
    for _ in range(5):  # NT response, domain, user, workstation, session key: empty
        head += struct.pack("<HHI", 0, 0, 65)
    return head + struct.pack("<I", flags) + b"\x00"


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def verifier(samba_dc: SambaDC) -> NtlmVerifier:
    return NtlmVerifier((samba_dc.host, samba_dc.port))


# -- real Samba ------------------------------------------------------------------------------


@pytest.mark.samba
async def test_right_password(verifier: NtlmVerifier) -> None:
    identity = await relay(verifier, "testuser", "Test1234")
    assert identity == TESTUSER
    assert identity.principal == "EXAMPLE\\testuser"


@pytest.mark.samba
@pytest.mark.parametrize(
    "spelling", ["TESTUSER", "testuser@EXAMPLE.COM", "EXAMPLE\\testuser", "example.com\\TestUser"]
)
async def test_user_spellings_give_one_identity(verifier: NtlmVerifier, spelling: str) -> None:
    assert await relay(verifier, spelling, "Test1234") == TESTUSER


@pytest.mark.samba
async def test_domain_comes_from_samba_not_client(verifier: NtlmVerifier) -> None:
    """The client's domain field ('example.com', '') is not what ends up in the identity."""
    client = ntlm_client("example.com\\testuser", "Test1234")
    handshake = await verifier.begin(client.step() or b"")
    authenticate = client.step(handshake.challenge) or b""
    assert messages.parse_authenticate(authenticate).domain == "example.com"
    assert await handshake.complete(authenticate) == TESTUSER


@pytest.mark.samba
async def test_second_user(verifier: NtlmVerifier, samba_dc: SambaDC) -> None:
    password = samba_dc.users["otheruser"]
    assert await relay(verifier, "otheruser", password) == Identity("otheruser", "EXAMPLE")


@pytest.mark.samba
@pytest.mark.parametrize("level", [rpc.AuthLevel.CONNECT, rpc.AuthLevel.PKT_INTEGRITY])
async def test_auth_levels(samba_dc: SambaDC, level: rpc.AuthLevel) -> None:
    v = NtlmVerifier((samba_dc.host, samba_dc.port), auth_level=level)
    assert await relay(v, "testuser", "Test1234") == TESTUSER
    with pytest.raises(AuthenticationFailed, match=SEC_PKG_ERROR):
        await relay(v, "testuser", "wrong")


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
async def test_rejected(verifier: NtlmVerifier, user: str, password: str) -> None:
    with pytest.raises(AuthenticationFailed) as excinfo:
        await relay(verifier, user, password)
    assert SEC_PKG_ERROR in excinfo.value.reason


@pytest.mark.samba
async def test_challenge_announces_netbios_domain(verifier: NtlmVerifier) -> None:
    handshake = await verifier.begin(ntlm_client("testuser", "x").step() or b"")
    try:
        challenge = messages.parse_challenge(handshake.challenge)
        assert challenge.nb_domain_name == "EXAMPLE"
        assert challenge.nb_computer_name == "DC1"
        assert handshake.domain == "EXAMPLE"
    finally:
        handshake.close()
        handshake.close()  # idempotent
    assert handshake.closed
    with pytest.raises(AuthenticationFailed, match="closed"):
        await handshake.complete(b"anything")


@pytest.mark.samba
async def test_complete_only_once(verifier: NtlmVerifier) -> None:
    client = ntlm_client("testuser", "Test1234")
    handshake = await verifier.begin(client.step() or b"")
    authenticate = client.step(handshake.challenge) or b""
    assert await handshake.complete(authenticate) == TESTUSER
    assert handshake.closed
    with pytest.raises(AuthenticationFailed):
        await handshake.complete(authenticate)


@pytest.mark.samba
async def test_samba_itself_accepts_anonymous(samba_dc: SambaDC) -> None:
    """Why the proxy must refuse anonymous logons itself: Samba says yes to them."""
    reader, writer = await asyncio.open_connection(samba_dc.host, samba_dc.port)
    try:
        writer.write(rpc.build_bind(1, rpc.MGMT_INTERFACE, messages.build_negotiate()))
        ack = await _read_pdu(reader)
        assert ack.ptype == rpc.PType.BIND_ACK
        writer.write(rpc.build_alter_context(2, rpc.MGMT_INTERFACE, anonymous_authenticate()))
        resp = await _read_pdu(reader)
        assert resp.ptype == rpc.PType.ALTER_CONTEXT_RESP
        assert rpc.parse_bind_ack(resp).results[0][0] == rpc.ContextResult.ACCEPTANCE
    finally:
        writer.close()


@pytest.mark.samba
async def test_anonymous_refused_before_samba(
    verifier: NtlmVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    handshake = await verifier.begin(messages.build_negotiate())
    sent: list[bytes] = []
    channel = handshake._channel
    original = channel.send

    async def spy(data: bytes) -> None:
        sent.append(data)
        await original(data)

    monkeypatch.setattr(channel, "send", spy)
    with pytest.raises(AuthenticationFailed, match="anonymous"):
        await handshake.complete(anonymous_authenticate())
    assert sent == []
    assert handshake.closed


@pytest.mark.samba
async def test_probe(verifier: NtlmVerifier) -> None:
    await verifier.probe()


@pytest.mark.samba
async def test_verify_password(verifier: NtlmVerifier) -> None:
    assert await verify_password(verifier, "testuser", "Test1234") == TESTUSER
    assert await verify_password(verifier, "EXAMPLE\\TestUser", "Test1234") == TESTUSER
    assert await verify_password(verifier, "testuser@example.com", "Test1234") == TESTUSER
    for user, password in [
        ("testuser", "nope"),
        ("disableduser", "Disabled1234"),
        ("ghost", "x"),
        ("testuser", ""),
        ("", "Test1234"),
    ]:
        with pytest.raises(AuthenticationFailed):
            await verify_password(verifier, user, password)


@pytest.mark.samba
async def test_samba_stopped_and_restarted(samba_dc: SambaDC) -> None:
    verifier = NtlmVerifier((samba_dc.host, samba_dc.port), connect_timeout=2.0)
    samba_dc.stop()
    try:
        assert not samba_dc.running
        with pytest.raises(NtlmServerUnavailable):
            await relay(verifier, "testuser", "Test1234")
        with pytest.raises(NtlmServerUnavailable):
            await verify_password(verifier, "testuser", "Test1234")
        with pytest.raises(NtlmServerUnavailable):
            await verifier.probe()
    finally:
        samba_dc.start()
    assert samba_dc.running
    assert await relay(verifier, "testuser", "Test1234") == TESTUSER


# -- no server at all ------------------------------------------------------------------------


async def test_nothing_listening() -> None:
    verifier = NtlmVerifier(("127.0.0.1", dead_port()))
    with pytest.raises(NtlmServerUnavailable, match="cannot connect"):
        await verifier.begin(messages.build_negotiate())
    with pytest.raises(NtlmServerUnavailable):
        await verifier.probe()
    with pytest.raises(NtlmServerUnavailable):
        await verify_password(verifier, "testuser", "Test1234")


async def test_begin_refuses_non_negotiate_without_connecting() -> None:
    verifier = NtlmVerifier(("127.0.0.1", dead_port()))
    with pytest.raises(AuthenticationFailed, match="malformed NTLM NEGOTIATE"):
        await verifier.begin(b"NTLMSSP\x00\x03\x00\x00\x00" + b"\x00" * 60)
    with pytest.raises(AuthenticationFailed):
        await verifier.begin(b"garbage")


# -- scripted fake DCE/RPC servers -----------------------------------------------------------


async def _read_pdu(reader: asyncio.StreamReader) -> rpc.Pdu:
    head = await reader.readexactly(16)
    _, _, frag_length, _, _ = rpc.parse_header(head)
    return rpc.parse_pdu(head + await reader.readexactly(frag_length - 16))


def _ack(ptype: int, call_id: int, result: int = 0, token: bytes = b"") -> bytes:
    body = struct.pack("<HHIH", 5840, 5840, 0x99, 5) + b"1024\x00" + b"\x00"
    body += struct.pack("<BBH", 1, 0, 0) + struct.pack("<HH", result, 0) + b"\x00" * 20
    auth = struct.pack("<BBBBI", 10, 2, 0, 0, 1) + token if token else b""
    frag = 16 + len(body) + len(auth)
    head = struct.pack("<BBBB4sHHI", 5, 0, ptype, 3, b"\x10\0\0\0", frag, len(token), call_id)
    return head + body + auth


def _fault(call_id: int, status: int) -> bytes:
    body = struct.pack("<IHBBII", 32, 0, 0, 0, status, 0)
    return struct.pack("<BBBB4sHHI", 5, 0, 3, 3, b"\x10\0\0\0", 32, 0, call_id) + body


def _challenge() -> bytes:
    info = struct.pack("<HH", 2, 14) + "EXAMPLE".encode("utf-16-le") + b"\x00" * 4
    flags = messages.Flag.NEGOTIATE_UNICODE | messages.Flag.NEGOTIATE_TARGET_INFO
    head = messages.SIGNATURE + struct.pack("<I", 2) + struct.pack("<HHI", 0, 0, 56)
    head += struct.pack("<I", flags) + b"\x01" * 8 + b"\x00" * 8
    head += struct.pack("<HHI", len(info), len(info), 56) + b"\x00" * 8
    return head + info


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[NtlmVerifier]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield NtlmVerifier(("127.0.0.1", port), connect_timeout=2.0, reply_timeout=0.5)
    finally:
        server.close()


def after_bind(reply: bytes | None, *, hang: bool = False) -> Script:
    """Answer the BIND with a CHALLENGE, then answer the ALTER_CONTEXT with ``reply``."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bind = await _read_pdu(reader)
        writer.write(_ack(rpc.PType.BIND_ACK, bind.call_id, token=_challenge()))
        alter = await _read_pdu(reader)
        assert alter.ptype == rpc.PType.ALTER_CONTEXT
        if reply is not None:
            writer.write(reply)
            await writer.drain()
        if hang:
            await reader.read()

    return script


def authenticate_token() -> bytes:
    client = ntlm_client("testuser", "Test1234")
    client.step()
    return client.step(_challenge()) or b""


async def test_fake_server_accepting_gives_identity() -> None:
    """Control case: the fake server's success path works, so the failures below mean something."""
    async with fake_server(after_bind(_ack(rpc.PType.ALTER_CONTEXT_RESP, 2))) as verifier:
        handshake = await verifier.begin(messages.build_negotiate())
        assert await handshake.complete(authenticate_token()) == TESTUSER


@pytest.mark.parametrize(
    ("reply", "hang", "reason"),
    [
        (_fault(2, 0x721), False, "fault 0x00000721"),
        (_fault(2, 0x5), False, "rpc_s_access_denied"),
        (_ack(rpc.PType.BIND_NAK, 2), False, "BIND_NAK"),
        (_ack(rpc.PType.ALTER_CONTEXT_RESP, 3), False, "wrong call_id"),
        (_ack(rpc.PType.ALTER_CONTEXT_RESP, 2, result=2), False, "did not accept"),
        (_ack(rpc.PType.BIND_ACK, 2), False, "unexpected PDU type"),
        (b"HTTP/1.1 200 OK\r\n\r\n", False, "garbage"),
        (_ack(rpc.PType.ALTER_CONTEXT_RESP, 2)[:20], False, "closed"),
        (None, False, "closed"),
        (None, True, "no verdict"),
    ],
    ids=[
        "fault-721",
        "fault-5",
        "bind-nak",
        "wrong-call-id",
        "rejected-context",
        "wrong-ptype",
        "garbage",
        "truncated-then-close",
        "close",
        "timeout",
    ],
)
async def test_fake_server_failures(reply: bytes | None, hang: bool, reason: str) -> None:
    async with fake_server(after_bind(reply, hang=hang)) as verifier:
        handshake = await verifier.begin(messages.build_negotiate())
        with pytest.raises(AuthenticationFailed, match=reason):
            await handshake.complete(authenticate_token())
        assert handshake.closed


@pytest.mark.parametrize(
    ("behaviour", "error", "reason"),
    [
        ("close", NtlmServerUnavailable, "dropped the connection"),
        ("hang", NtlmServerUnavailable, "did not answer"),
        ("garbage", NtlmServerUnavailable, "garbage"),
        ("nak", AuthenticationFailed, "BIND_NAK"),
        ("no-challenge", NtlmServerUnavailable, "no usable CHALLENGE"),
        ("rejected", NtlmServerUnavailable, "does not serve the interface"),
    ],
)
async def test_fake_server_bind_failures(
    behaviour: str, error: type[Exception], reason: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bind = await _read_pdu(reader)
        replies = {
            "garbage": b"\x05\x00\x0c\x03\x10\x00\x00\x00\x04\x00\x00\x00\x01\x00\x00\x00",
            "nak": struct.pack("<BBBB4sHHI", 5, 0, 13, 3, b"\x10\0\0\0", 18, 0, bind.call_id)
            + b"\x08\x00",
            "no-challenge": _ack(rpc.PType.BIND_ACK, bind.call_id),
            "rejected": _ack(rpc.PType.BIND_ACK, bind.call_id, result=2, token=_challenge()),
        }
        if behaviour in replies:
            writer.write(replies[behaviour])
            await writer.drain()
        if behaviour == "hang":
            await reader.read()

    async with fake_server(script) as verifier:
        with pytest.raises(error, match=reason):
            await verifier.begin(messages.build_negotiate())
