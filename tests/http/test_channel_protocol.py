"""ChannelProtocol before its channel has joined a VC (a socket handed over by a sibling
worker can speak before ``_attach`` runs): what it keeps, and that an overrun of the
request's Content-Length in that window is still refused once the channel joins."""

from __future__ import annotations

from typing import Any, cast

from rpcproxy.errors import ProtocolError
from rpcproxy.http.vc_io import ChannelProtocol, VcRuntime


class _Runtime:
    """The two things data_received asks of its runtime on a refused body."""

    def __init__(self) -> None:
        self.failed: list[ProtocolError] = []
        self.vc = self

    def channel_failed(self, channel: object, error: ProtocolError) -> list[Any]:
        self.failed.append(error)
        return []

    def execute(self, actions: list[Any]) -> None:
        pass

    def on_in_data(self, channel: object, data: bytes) -> None:
        raise AssertionError("bytes past Content-Length reached the VC")


def test_early_bytes_are_bounded_and_an_overrun_is_refused_on_join() -> None:
    channel = ChannelProtocol("IN", None, 4, "?")
    channel.data_received(b"abc")
    channel.data_received(b"defgh" * 1000)  # far past the 4-byte budget
    early = channel._early
    assert early == b"abcde"  # the budget and one byte: bounded, and the overrun is kept
    rt = _Runtime()
    channel.runtime = cast(VcRuntime, rt)
    channel._early = b""
    channel.data_received(early)  # what _attach does once the channel has joined
    assert [str(e.reason) for e in rt.failed] == [
        "IN request body runs past its Content-Length"]


def test_early_bytes_within_the_budget_are_kept_whole() -> None:
    channel = ChannelProtocol("IN", None, 6, "?")
    channel.data_received(b"abc")
    channel.data_received(b"def")
    assert channel._early == b"abcdef"
