"""rpch.channels.RequestBody: the rest of a channel request's body is counted and framed by
the core, so the adapter passes bytes through and decides nothing."""

from __future__ import annotations

import pytest

from rpcproxy.errors import ProtocolError
from rpcproxy.rpch import rts
from rpcproxy.rpch.channels import Method, RequestBody, judge_opening


def test_in_body_is_counted_against_the_content_length() -> None:
    body = RequestBody(Method.IN, 10)
    body.take(b"x" * 4)
    body.take(b"x" * 6)
    assert body.left == 0
    with pytest.raises(ProtocolError, match="IN request body runs past its Content-Length"):
        body.take(b"x")


def test_out_body_is_framed_into_whole_pdus_across_reads() -> None:
    c1 = rts.OUT_R2_C1
    body = RequestBody(Method.OUT, len(c1))
    assert body.out_pdus(c1[:5]) == []
    assert body.out_pdus(c1[5:]) == [c1]
    with pytest.raises(ProtocolError, match="OUT request body runs past its Content-Length"):
        body.out_pdus(b"\x05")


def test_out_body_that_loses_its_framing_is_a_protocol_error() -> None:
    body = RequestBody(Method.OUT, 24)
    with pytest.raises(ProtocolError):  # the adapter's except clause sees a ProtocolError
        body.out_pdus(b"\x04" + bytes(23))  # DCE/RPC version 4


def test_an_opening_gives_the_budget_the_body_starts_with() -> None:
    data = rts.out_r2_a3(b"V" * 16, b"P" * 16, b"S" * 16, 0x10000)
    opening = judge_opening(Method.OUT, 120, data)
    body = RequestBody(opening.method, opening.body_left)
    assert body.out_pdus(rts.OUT_R2_C1) == [rts.OUT_R2_C1] and body.left == 0
