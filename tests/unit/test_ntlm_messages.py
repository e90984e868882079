"""Unit tests for ntlm.messages (NTLM parsing); no network."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import spnego
from hypothesis import given, settings
from hypothesis import strategies as st

from ntlm import messages as m
from ntlm.errors import NtlmError

# -- helpers ---------------------------------------------------------------------------------


def _fields(length: int, offset: int) -> bytes:
    return struct.pack("<HHI", length, length, offset)


def build_authenticate(
    *,
    user: str = "alice",
    domain: str = "EXAMPLE",
    workstation: str = "WS1",
    lm: bytes = b"\x00" * 24,
    nt: bytes = b"\x11" * 48,
    flags: int = m.Flag.NEGOTIATE_UNICODE | m.Flag.NEGOTIATE_NTLM,
    unicode: bool = True,
) -> bytes:
    """A structurally valid AUTHENTICATE_MESSAGE (responses are not cryptographically valid)."""
    enc = "utf-16-le" if unicode else "cp437"
    payloads = [lm, nt, domain.encode(enc), user.encode(enc), workstation.encode(enc), b""]
    offset = 72  # 64 + VERSION
    header = m.SIGNATURE + struct.pack("<I", m.MessageType.AUTHENTICATE)
    body = b""
    for p in payloads:
        header += _fields(len(p), offset + len(body))
        body += p
    header += struct.pack("<I", flags) + b"\x00" * 8  # NegotiateFlags, VERSION
    return header + body


def build_challenge(av_pairs: list[tuple[int, bytes]], *, target: str = "EXAMPLE") -> bytes:
    info = b"".join(struct.pack("<HH", i, len(v)) + v for i, v in av_pairs)
    info += struct.pack("<HH", m.AvId.EOL, 0)
    name = target.encode("utf-16-le")
    flags = m.Flag.NEGOTIATE_UNICODE | m.Flag.NEGOTIATE_TARGET_INFO | m.Flag.TARGET_TYPE_DOMAIN
    head = m.SIGNATURE + struct.pack("<I", m.MessageType.CHALLENGE)
    head += _fields(len(name), 56) + struct.pack("<I", flags) + b"\x01" * 8 + b"\x00" * 8
    head += _fields(len(info), 56 + len(name)) + b"\x00" * 8
    return head + name + info


def u16(s: str) -> bytes:
    return s.encode("utf-16-le")


@pytest.fixture
def pyspnego_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes, bytes]:
    """A real NEGOTIATE / CHALLENGE / AUTHENTICATE exchange between pyspnego's NTLM peers."""
    users = tmp_path / "ntlm-users"
    users.write_text("EXAMPLE:testuser:Test1234\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    client = spnego.client(
        "EXAMPLE\\TestUser",
        "Test1234",
        hostname="proxy",
        protocol="ntlm",
        options=spnego.NegotiateOptions.use_ntlm,
    )
    server = spnego.server(protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm)
    t1 = client.step()
    assert t1 is not None
    t2 = server.step(t1)
    assert t2 is not None
    t3 = client.step(t2)
    assert t3 is not None
    return t1, t2, t3


# -- real messages ---------------------------------------------------------------------------


def test_parse_real_pyspnego_messages(pyspnego_tokens: tuple[bytes, bytes, bytes]) -> None:
    t1, t2, t3 = pyspnego_tokens
    assert m.message_type(t1) is m.MessageType.NEGOTIATE
    assert m.message_type(t2) is m.MessageType.CHALLENGE
    assert m.message_type(t3) is m.MessageType.AUTHENTICATE

    neg = m.parse_message(t1)
    assert isinstance(neg, m.Negotiate)
    assert neg.flags & m.Flag.NEGOTIATE_NTLM
    assert neg.flags & m.Flag.NEGOTIATE_UNICODE

    chal = m.parse_message(t2)
    assert isinstance(chal, m.Challenge)
    assert len(chal.server_challenge) == 8
    assert chal.nb_domain_name  # pyspnego announces some NetBIOS domain
    assert m.AvId.TIMESTAMP in chal.target_info

    auth = m.parse_message(t3)
    assert isinstance(auth, m.Authenticate)
    assert auth.user == "TestUser"
    assert auth.domain == "EXAMPLE"
    assert len(auth.nt_response) > 24  # NTLMv2
    assert not auth.is_anonymous


def test_challenge_av_pairs() -> None:
    data = build_challenge(
        [
            (m.AvId.NB_COMPUTER_NAME, u16("DC1")),
            (m.AvId.NB_DOMAIN_NAME, u16("EXAMPLE")),
            (m.AvId.DNS_DOMAIN_NAME, u16("example.com")),
            (m.AvId.NB_DOMAIN_NAME, u16("IGNORED-DUPLICATE")),
        ],
        target="TARGET",
    )
    chal = m.parse_challenge(data)
    assert chal.nb_domain_name == "EXAMPLE"
    assert chal.nb_computer_name == "DC1"
    assert chal.dns_domain_name == "example.com"
    assert chal.target_name == "TARGET"
    assert chal.server_challenge == b"\x01" * 8


def test_challenge_without_target_info() -> None:
    data = bytearray(build_challenge([]))
    data[40:48] = _fields(0, 0)
    chal = m.parse_challenge(bytes(data))
    assert chal.target_info == {}
    assert chal.nb_domain_name is None


def test_build_negotiate_round_trip() -> None:
    neg = m.parse_negotiate(m.build_negotiate())
    assert neg.flags == m.PROBE_NEGOTIATE_FLAGS
    assert neg.domain == "" and neg.workstation == ""


def test_negotiate_oem_domain_and_workstation() -> None:
    flags = m.Flag.NEGOTIATE_OEM | m.Flag.OEM_DOMAIN_SUPPLIED | m.Flag.OEM_WORKSTATION_SUPPLIED
    data = m.SIGNATURE + struct.pack("<II", 1, flags) + _fields(7, 32) + _fields(3, 39)
    data += b"EXAMPLEWS1"
    neg = m.parse_negotiate(data)
    assert (neg.domain, neg.workstation) == ("EXAMPLE", "WS1")


def test_authenticate_fields_unicode_and_oem() -> None:
    auth = m.parse_authenticate(build_authenticate(user="Bob", domain="DOM", workstation="PC"))
    assert (auth.user, auth.domain, auth.workstation) == ("Bob", "DOM", "PC")
    oem = build_authenticate(user="Bob", domain="DOM", flags=m.Flag.NEGOTIATE_OEM, unicode=False)
    assert m.parse_authenticate(oem).user == "Bob"


# -- anonymous -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flags": m.Flag.NEGOTIATE_UNICODE | m.Flag.NEGOTIATE_ANONYMOUS},
        {"user": ""},
        {"nt": b""},
        {"user": "", "nt": b"", "lm": b"\x00"},
    ],
    ids=["anonymous-flag", "empty-user", "empty-nt-response", "all-of-them"],
)
def test_anonymous_detection(kwargs: dict[str, object]) -> None:
    auth = m.parse_authenticate(build_authenticate(**kwargs))  # type: ignore[arg-type]
    assert auth.is_anonymous


def test_not_anonymous() -> None:
    assert not m.parse_authenticate(build_authenticate()).is_anonymous


# -- malformed input -------------------------------------------------------------------------


GOOD_AUTH = build_authenticate()
GOOD_CHALLENGE = build_challenge([(m.AvId.NB_DOMAIN_NAME, u16("EXAMPLE"))])


def _patch(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (b"NTLMSSP\x00\x03\x00", "too short"),
        (b"NTLMSSX\x00" + b"\x00" * 60, "signature"),
        (m.SIGNATURE + struct.pack("<I", 4) + b"\x00" * 60, "unknown NTLM message type"),
        (m.SIGNATURE + struct.pack("<I", 0) + b"\x00" * 60, "unknown NTLM message type"),
        (m.SIGNATURE + struct.pack("<I", 1) + b"\x00" * 4, "truncated"),
        (GOOD_CHALLENGE[:47], "truncated"),
        (GOOD_AUTH[:63], "truncated"),
        (_patch(GOOD_AUTH, 36, _fields(10, 0xFFFFFFF0)), "out of range"),  # user offset
        (_patch(GOOD_AUTH, 36, _fields(0xFFFF, 72)), "out of range"),  # user length
        (_patch(GOOD_AUTH, 20, _fields(49, len(GOOD_AUTH) - 48)), "out of range"),  # NT response
        (_patch(GOOD_AUTH, 52, _fields(16, len(GOOD_AUTH))), "out of range"),  # session key
        (_patch(GOOD_CHALLENGE, 12, _fields(4, 999)), "out of range"),  # target name
        (_patch(GOOD_CHALLENGE, 40, _fields(400, 60)), "out of range"),  # target info
    ],
)
def test_malformed_messages(data: bytes, reason: str) -> None:
    with pytest.raises(NtlmError) as excinfo:
        m.parse_message(data)
    assert reason in excinfo.value.reason


def test_odd_length_utf16_user() -> None:
    data = _patch(GOOD_AUTH, 36, _fields(3, 72 + 24 + 48 + 14))
    with pytest.raises(NtlmError, match="odd number of bytes"):
        m.parse_authenticate(data)


def test_invalid_utf16_user() -> None:
    data = build_authenticate(user="ab")
    lone_surrogate = b"\x00\xd8"
    start = data.index(u16("ab"))
    data = data[:start] + lone_surrogate + data[start + 2 :]
    with pytest.raises(NtlmError, match="not valid UTF-16LE"):
        m.parse_authenticate(data)


def test_wrong_message_type_for_parser() -> None:
    with pytest.raises(NtlmError, match="expected NTLM NEGOTIATE, got AUTHENTICATE"):
        m.parse_negotiate(GOOD_AUTH)
    with pytest.raises(NtlmError, match="expected NTLM AUTHENTICATE"):
        m.parse_authenticate(GOOD_CHALLENGE)


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (b"", "truncated"),
        (struct.pack("<HH", 2, 4) + u16("EX"), "no MsvAvEOL"),
        (struct.pack("<HH", 2, 40) + u16("EX"), "runs past the end"),
        (b"\x02\x00", "truncated"),
    ],
)
def test_bad_av_pairs(info: bytes, reason: str) -> None:
    with pytest.raises(NtlmError, match=reason):
        m.parse_av_pairs(info)


def test_odd_av_string_raises_ntlm_error() -> None:
    chal = m.parse_challenge(build_challenge([(m.AvId.NB_DOMAIN_NAME, b"\x41\x00\x42")]))
    with pytest.raises(NtlmError):
        _ = chal.nb_domain_name


def test_looks_like_ntlm() -> None:
    assert m.looks_like_ntlm(GOOD_AUTH)
    assert not m.looks_like_ntlm(b"\x60\x82")


# -- fuzz ------------------------------------------------------------------------------------


def _parse_everything(data: bytes) -> None:
    msg = m.parse_message(data)
    if isinstance(msg, m.Challenge):
        _ = (msg.nb_domain_name, msg.nb_computer_name, msg.dns_domain_name)
    if isinstance(msg, m.Authenticate):
        _ = msg.is_anonymous


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        _parse_everything(data)
    except NtlmError:
        pass


@settings(max_examples=1000)
@given(st.sampled_from([1, 2, 3]), st.binary(min_size=0, max_size=200))
def test_fuzz_valid_prefix(mtype: int, rest: bytes) -> None:
    """Past the signature, so the field parsers see hostile offsets and lengths."""
    try:
        _parse_everything(m.SIGNATURE + struct.pack("<I", mtype) + rest)
    except NtlmError:
        pass


@settings(max_examples=500)
@given(st.integers(0, len(GOOD_AUTH) - 1), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_authenticate(at: int, value: bytes) -> None:
    try:
        _parse_everything(_patch(GOOD_AUTH, at, value)[: len(GOOD_AUTH)])
    except NtlmError:
        pass
