"""rpcproxy.http.request_head: a head is ours only if aiohttp would parse it the same way.

The oracle is aiohttp's ``HttpRequestParserPy`` with the limits rpcproxy's request handlers
have: for generated heads (mostly well-formed channel requests with one thing changed, the
smuggling shapes among them), "ours" implies aiohttp parses the same method, target,
headers, length and keep-alive; every proper prefix of a head of ours is NEED_MORE; and no
input makes the parser raise.
"""

from __future__ import annotations

import inspect
from typing import Any
from unittest import mock

import aiohttp.http_exceptions
import aiohttp.http_parser
import aiohttp.web_protocol
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rpcproxy.http.request_head import HeadLimits, RequestHead, Verdict, parse

# aiohttp's RequestHandler defaults, which rpcproxy does not change (web.AppRunner kwargs)
MAX_LINE, MAX_FIELD, MAX_HEADERS = 8190, 8190, 128
LIMITS = HeadLimits.within(MAX_LINE, MAX_FIELD, MAX_HEADERS)


def aiohttp_parse(data: bytes) -> Any:
    """The one message aiohttp's pure-Python request parser makes of ``data``; raises as it."""
    parser = aiohttp.http_parser.HttpRequestParserPy(
        mock.Mock(), mock.Mock(), 2**16, max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
        max_headers=MAX_HEADERS)
    messages, _upgraded, _tail = parser.feed_data(data)
    assert len(messages) == 1
    return messages[0][0]


def assert_same_as_aiohttp(data: bytes, head: RequestHead) -> None:
    msg = aiohttp_parse(data)
    assert msg.method == head.method
    assert msg.path == head.target
    assert msg.url.path == head.path
    assert msg.url.query_string == head.query
    assert (msg.version.major, msg.version.minor) == head.version
    assert list(msg.headers.items()) == list(head.headers)
    length = msg.headers.get("Content-Length")
    assert (int(length) if length is not None else None) == head.content_length
    assert not msg.should_close == head.keep_alive
    assert not msg.chunked and not msg.upgrade and msg.compression is None


def channel_head(method: str = "RPC_IN_DATA", target: str = "/rpc/rpcproxy.dll?srv:6001",
                 version: str = "HTTP/1.1", headers: list[str] | None = None) -> bytes:
    lines = [f"{method} {target} {version}"]
    lines += headers if headers is not None else [
        "Host: proxy.example", "Accept: application/rpc", "User-Agent: MSRPC",
        "Cache-Control: no-cache", "Connection: Keep-Alive", "Content-Length: 1073741824",
        "Authorization: NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw=="]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---- generated heads ------------------------------------------------------------------------

def _mostly(good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``good`` seven times in eight: most heads have one or two odd things, not ten."""
    return st.integers(0, 7).flatmap(lambda i: good if i else bad)


_VALUE_CHARS = st.sampled_from(
    list("abcXYZ019 =/+:;,.-_~\"'") + ["\t", "\r", "\n", "\x00", "\x01", "\x7f", "\x80",
                                        "\xe9", "\u2028"])
_TOKEN = st.text(st.sampled_from(list("aZ09-_!#$%&'*+.^`|~") + [" ", "\t", "(", "@", "\x00",
                                                                  "\r", "\xe9"]),
                 min_size=0, max_size=12)
_NAMES = st.sampled_from(["Host", "Content-Length", "content-length", "CONTENT-LENGTH",
                          "Connection", "Authorization", "Transfer-Encoding", "Expect",
                          "Accept", "User-Agent", "Upgrade", "Content-Encoding",
                          "Sec-WebSocket-Key1", "X-Foo", " Host", "Host ", "Ho st", "\tHost",
                          "", "Content-Length\x00"]) | _TOKEN
_LENGTHS = _mostly(st.sampled_from(["0", "5", "16", "76", "0076", "1073741824"]),
                   st.sampled_from(["+5", "-1", " 5 ", "5,5", "5, 5", "0x10", "", "1e3",
                                    "\u0663", "5\t", "99999999999999999999"]))
_CONNECTION = st.sampled_from(["keep-alive", "Keep-Alive", "close", "Close", "keep-alive, close",
                               "upgrade", "Upgrade, keep-alive", "", "te", "keep-alive,"])


_CLEAN_NAMES = st.sampled_from(["Accept", "User-Agent", "Cache-Control", "Pragma", "X-Foo",
                                "Authorization", "Expect", "Connection", "Content-Length"])
_CLEAN_VALUES = st.text(st.sampled_from(list("abcXYZ019 =/+:;,.-_~")), max_size=20)


@st.composite
def _header(draw: st.DrawFn) -> str:
    name = draw(_mostly(_CLEAN_NAMES, _NAMES))
    sep = draw(_mostly(st.sampled_from([": ", ":"]),
                       st.sampled_from([":  ", ":\t", " :", "\t:", ": \t"])))
    lower = name.lower()
    if lower == "content-length":
        value = draw(_LENGTHS)
    elif lower == "connection":
        value = draw(_CONNECTION)
    elif lower == "transfer-encoding":
        value = draw(st.sampled_from(["chunked", "identity", "gzip, chunked"]))
    else:
        value = draw(_mostly(_CLEAN_VALUES, st.text(_VALUE_CHARS, max_size=20)))
    line = f"{name}{sep}{value}"
    if draw(st.integers(0, 15)) == 0:
        line = draw(st.sampled_from([" ", "\t"])) + line  # obs-fold
    return line


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(_mostly(st.sampled_from(["RPC_IN_DATA", "RPC_OUT_DATA"]), st.sampled_from(
        ["rpc_in_data", "RPC_In_DATA", "GET", "POST", "RPC_CONNECT", "RPC_IN_DATA\x00", "",
         "RPC_OUT_DATA2", "PRI"])))
    path = draw(_mostly(st.sampled_from(["/rpc/rpcproxy.dll", "/rpcwithcert/rpcproxy.dll"]),
                        st.sampled_from(["/rpc/rpcproxy.DLL", "/rpc//rpcproxy.dll", "*", "/",
                                         "/rpc/rpcproxy.dll/", "http://x/rpc/rpcproxy.dll"])))
    if draw(st.booleans()):
        good = st.text(st.sampled_from(list("abz019.-_:[]")), max_size=24)
        bad = st.lists(st.sampled_from(list("abz019.-_:[]") + [
            "%", "%2e", "+", " ", "#", "?", "/", "\x00", "\xe9", "="]), max_size=24).map("".join)
        path += "?" + draw(_mostly(good, bad))
    version = draw(_mostly(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]), st.sampled_from(
        ["HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "HTTP/11", "HTTP/1.1\r"])))
    sep = draw(_mostly(st.just(" "), st.sampled_from(["  ", "\t"])))
    required = ["Host: proxy.example"] if draw(st.integers(0, 7)) else []
    length = [f"Content-Length: {draw(_LENGTHS)}"] if draw(st.booleans()) else []
    headers = required + length + draw(st.lists(_header(), max_size=4))
    headers = draw(st.permutations(headers))
    eols = [draw(_mostly(st.just("\r\n"), st.sampled_from(["\n", "\r", "\r\r\n"])))
            for _ in headers]
    text = f"{method}{sep}{path}{sep}{version}\r\n"
    text += "".join(h + eol for h, eol in zip(headers, eols, strict=True)) + "\r\n"
    return text.encode("utf-8")


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
@example(channel_head())
@example(channel_head("RPC_OUT_DATA", "/rpcwithcert/rpcproxy.dll?[::1]:6004", "HTTP/1.0",
                      ["Content-Length: 76"]))
def test_ours_only_if_aiohttp_parses_it_the_same(data: bytes) -> None:
    result = parse(data, LIMITS)
    if isinstance(result, RequestHead):
        assert result.size == len(data)
        assert_same_as_aiohttp(data, result)
        assert parse(data + b"RPC_IN_DATA / HTTP/1.1\r\n", LIMITS) == result  # a prefix parser
    else:
        assert result is Verdict.NOT_OURS  # (a whole head: never NEED_MORE)


@settings(max_examples=300, deadline=None)
@given(heads())
def test_every_prefix_of_a_head_of_ours_needs_more(data: bytes) -> None:
    if not isinstance(parse(data, LIMITS), RequestHead):
        return
    for cut in range(len(data)):
        assert parse(data[:cut], LIMITS) is Verdict.NEED_MORE, data[:cut]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200) | heads().flatmap(
    lambda h: st.integers(0, len(h)).map(lambda i: h[:i] + b"\r\n\r\n" + h[i:])))
def test_nothing_makes_it_raise(data: bytes) -> None:
    result = parse(data, LIMITS)
    if isinstance(result, RequestHead):
        assert_same_as_aiohttp(data[:result.size], result)


def test_generated_heads_are_often_ours() -> None:
    """The property above means something only if the generator makes heads of ours."""
    ours = 0

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(heads())
    def count(data: bytes) -> None:
        nonlocal ours
        ours += isinstance(parse(data, LIMITS), RequestHead)

    count()
    assert ours >= 25, ours


# ---- the refusals that matter, by name -------------------------------------------------------

@pytest.mark.parametrize("headers", [
    ["Host: a", "Content-Length: 5", "Content-Length: 5"],  # duplicate (even if equal)
    ["Host: a", "Content-Length: 5", "content-length: 6"],
    ["Host: a", "Content-Length: +5"],
    ["Host: a", "Content-Length: -1"],
    ["Host: a", "Content-Length: 5,5"],
    ["Host: a", "Content-Length: 0x10"],
    ["Host: a", "Content-Length: 1e3"],
    ["Host: a", "Content-Length: \u0663"],
    ["Host: a", "Content-Length:"],
    ["Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"],
    ["Host: a", "Transfer-Encoding: chunked"],
    ["Host: a", "Content-Length : 5"],  # whitespace before the colon
    ["Host: a", "Content-Length\t: 5"],
    ["Host: a", "X-A: b", " folded"],  # obs-fold
    ["Host: a", "X-A: b\x00c"],
    ["Host: a", "X-A: b\rc"],
    ["Host: a", "X-A: b\nc"],
    ["Host: a", "X-A: b\x7f"],
    ["Host: a", "X-A: caf\xe9"],
    ["Host: a", "Connection: Upgrade", "Upgrade: websocket"],
    ["Host: a", "Connection: keep-alive, te"],
    ["Host: a", "Content-Encoding: gzip"],
    ["Host: a", "Sec-WebSocket-Key1: x"],
    ["Host: a", "Host: b"],
    ["Accept: x"],  # HTTP/1.1 without Host
    ["Host: a", "Bad Name: x"],
    ["Host: a", ": x"],
    ["Host: a", "NoColon"],
])
def test_smuggling_shapes_are_not_ours(headers: list[str]) -> None:
    assert parse(channel_head(headers=headers), LIMITS) is Verdict.NOT_OURS


@pytest.mark.parametrize("data", [
    channel_head("rpc_in_data"),  # aiohttp upper-cases it: its business
    channel_head("GET"),
    channel_head("RPC_CONNECT"),
    channel_head(target="/rpc/rpcproxy.dll?srv%3A6001"),  # decoding would change it
    channel_head(target="/rpc/rpcproxy.dll?srv+x:6001"),
    channel_head(target="/rpc/rpcproxy.dll?srv:6001#frag"),
    channel_head(target="/autodiscover/autodiscover.xml"),
    channel_head(version="HTTP/2.0"),
    b"\r\n" + channel_head(),  # aiohttp skips a leading empty line: its business
    channel_head().replace(b"\r\n", b"\n"),
    channel_head().replace(b"HTTP/1.1", b"HTTP/1.1 ", 1),
    channel_head().replace(b" /rpc", b"  /rpc", 1),
])
def test_other_requests_are_not_ours(data: bytes) -> None:
    assert parse(data, LIMITS) is Verdict.NOT_OURS


def test_incomplete_heads() -> None:
    assert parse(b"", LIMITS) is Verdict.NEED_MORE
    assert parse(b"RPC_OUT", LIMITS) is Verdict.NEED_MORE
    assert parse(b"RPC_IN_DATA /rpc", LIMITS) is Verdict.NEED_MORE
    assert parse(b"GET /", LIMITS) is Verdict.NOT_OURS  # known at once
    assert parse(b"RPC_IN_DATAX", LIMITS) is Verdict.NOT_OURS
    # A head that never ends is given to aiohttp (its bounds apply) at our smaller bound.
    long_line = b"RPC_IN_DATA /rpc/rpcproxy.dll?" + b"a" * LIMITS.max_line
    assert parse(long_line, LIMITS) is Verdict.NOT_OURS
    endless = channel_head()[:-2] + b"X-A: b\r\n" * (LIMITS.max_head // 8)
    assert parse(endless, LIMITS) is Verdict.NOT_OURS


def test_limits_are_aiohttps_or_smaller() -> None:
    defaults = inspect.signature(aiohttp.web_protocol.RequestHandler.__init__).parameters
    assert (MAX_LINE, MAX_FIELD, MAX_HEADERS) == tuple(
        defaults[name].default for name in ("max_line_size", "max_field_size", "max_headers"))
    assert LIMITS.max_line <= 8190 and LIMITS.max_field <= 8190 and LIMITS.max_lines <= 128
    assert HeadLimits.within(100, 200, 10) == HeadLimits(100, 200, 10, LIMITS.max_head)
    line = "X-A: " + "b" * (LIMITS.max_field - 5)  # at the bound: aiohttp takes it too
    data = channel_head(headers=["Host: a", line])
    result = parse(data, LIMITS)
    assert isinstance(result, RequestHead)
    assert_same_as_aiohttp(data, result)
    data = channel_head(headers=["Host: a", line + "b"])
    assert parse(data, LIMITS) is Verdict.NOT_OURS
    with pytest.raises(aiohttp.http_exceptions.LineTooLong):
        aiohttp_parse(data)
    many = ["Host: a"] + [f"X-{i}: v" for i in range(LIMITS.max_lines - 3)]
    result = parse(channel_head(headers=many), LIMITS)
    assert isinstance(result, RequestHead)
    assert_same_as_aiohttp(channel_head(headers=many), result)
    too_many = many + ["X-last: v"]
    assert parse(channel_head(headers=too_many), LIMITS) is Verdict.NOT_OURS
    with pytest.raises(aiohttp.http_exceptions.BadHttpMessage):
        aiohttp_parse(channel_head(headers=too_many))


def test_keep_alive_and_length() -> None:
    head = parse(channel_head(), LIMITS)
    assert isinstance(head, RequestHead)
    assert (head.method, head.path, head.query) == ("RPC_IN_DATA", "/rpc/rpcproxy.dll",
                                                    "srv:6001")
    assert head.content_length == 1073741824 and head.keep_alive
    h10 = parse(channel_head(version="HTTP/1.0", headers=["Content-Length: 0"]), LIMITS)
    assert isinstance(h10, RequestHead) and not h10.keep_alive
    close = parse(channel_head(headers=["Host: a", "Connection: close"]), LIMITS)
    assert isinstance(close, RequestHead) and not close.keep_alive and close.content_length is None


@settings(max_examples=400, deadline=None)
@given(heads().flatmap(lambda h: st.tuples(st.just(h), st.lists(
    st.integers(1, max(1, len(h))), min_size=1, max_size=8))))
def test_parsing_what_arrives_piece_by_piece_is_parsing_it_whole(
        case: tuple[bytes, list[int]]) -> None:
    """The front passes ``scanned`` (what an earlier NEED_MORE saw), so that a head dribbled
    a byte at a time costs linear time; the verdict must be the one-shot verdict."""
    data, cuts = case
    whole = parse(data, LIMITS)
    scanned = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        result = parse(data[:cut], LIMITS, scanned)
        if result is not Verdict.NEED_MORE:
            assert result == (whole if cut == len(data) else parse(data[:cut], LIMITS))
            return
        assert parse(data[:cut], LIMITS) is Verdict.NEED_MORE
        scanned = cut
    raise AssertionError("a whole head was still NEED_MORE")


def test_bare_cr_or_lf_is_found_across_pieces() -> None:
    """A CR that ended one piece and is not followed by LF in the next, or an LF whose CR
    came in the piece before it: judged like the whole."""
    good = channel_head()
    first = good[:good.index(b"\r\n") + 1]  # ends with the CR of the request line's CRLF
    assert parse(first, LIMITS) is Verdict.NEED_MORE
    assert parse(first + b"X", LIMITS, len(first)) is Verdict.NOT_OURS  # CR then not LF
    assert parse(first + b"\n", LIMITS, len(first)) is Verdict.NEED_MORE  # the CRLF after all
    lf = good[:good.index(b"\r\n")] + b"\n"
    assert parse(lf, LIMITS, len(lf) - 1) is Verdict.NOT_OURS  # a bare LF in the new byte
