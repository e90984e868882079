"""Unit tests for rpcproxy.rpch.connection.VirtualConnection: scripted events in, exact actions out.

No sockets and no clocks: time is a number passed with each event.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcerpc.pdu import CLIENT_PTYPES, SERVER_PTYPES, PType
from rpcproxy.errors import (
    ERROR_ACCESS_DENIED,
    RPC_S_PROTOCOL_ERROR,
    RPC_S_SERVER_UNAVAILABLE,
    BackendUnavailable,
    ProtocolError,
)
from rpcproxy.metrics import CLOSE_KINDS, ServerMetrics, classify_close
from rpcproxy.rpch import rts
from rpcproxy.rpch.actions import (
    Action,
    CloseBackend,
    CloseChannel,
    CloseKind,
    ConnectBackend,
    PauseBackend,
    ResumeBackend,
    SendToBackend,
    SendToClient,
    StartResponse,
    VcClosed,
)
from rpcproxy.rpch.channels import (
    Method,
    VcSettings,
    check_content_length,
    first_pdu_length,
    judge_opening,
    min_out_content_length,
)
from rpcproxy.rpch.connection import VirtualConnection
from rpcproxy.rpch.rts import ForwardDestination
from rpcproxy.rpch.states import Backend, InRecycle, OutRecycle, Phase
from tests.support.vc_script import (
    A3_DEFAULT,
    AG,
    C2_DEFAULT,
    CL,
    IN,
    IN2,
    IN2_CK,
    IN3,
    IN3_CK,
    IN_CK,
    ME,
    OUT,
    OUT2,
    OUT2_CK,
    OUT3,
    OUT3_CK,
    OUT_CK,
    R500,
    SMALL,
    TARGET,
    VC,
    Tally,
    a1,
    a3,
    b1,
    in_a1,
    join,
    new_vc,
    norm,
    open_in,
    open_out,
    opened,
    out_ack,
    recycle_to_a2,
    rpc,
    sent_to,
    teardown,
)

# --- opening ----------------------------------------------------------------------------------


def test_a1_then_b1_then_backend() -> None:
    vc = new_vc()
    assert vc.phase is Phase.WAIT_PAIR
    assert open_out(vc) == [ConnectBackend()]
    assert vc.phase is Phase.WAIT_PAIR
    assert open_in(vc) == []
    assert vc.phase is Phase.WAIT_BACKEND
    assert vc.backend_up(1.0) == [
        StartResponse(OUT, CL),
        SendToClient(OUT, A3_DEFAULT),
        SendToClient(OUT, C2_DEFAULT),
    ]
    assert vc.phase is Phase.OPENED
    assert vc.channels() == [OUT, IN]


def test_b1_then_a1_then_backend() -> None:
    vc = new_vc()
    assert open_in(vc) == [ConnectBackend()]
    assert vc.phase is Phase.WAIT_PAIR
    assert open_out(vc) == []
    assert vc.phase is Phase.WAIT_BACKEND
    assert vc.backend_up(1.0) == [
        StartResponse(OUT, CL), SendToClient(OUT, A3_DEFAULT), SendToClient(OUT, C2_DEFAULT)]


ORDERS = [
    ("a1", "b1", "up"),
    ("b1", "a1", "up"),
    ("a1", "up", "b1"),
    ("b1", "up", "a1"),
]


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_every_order_connects_once_and_opens_exactly(order: tuple[str, ...]) -> None:
    vc = new_vc()
    events: dict[str, Callable[[], list[Action]]] = {
        "a1": lambda: open_out(vc), "b1": lambda: open_in(vc), "up": lambda: vc.backend_up(0.5)}
    results = [events[e]() for e in order]
    assert results[0] == [ConnectBackend()]
    assert results[1] == []
    assert results[2] == [
        StartResponse(OUT, CL), SendToClient(OUT, A3_DEFAULT), SendToClient(OUT, C2_DEFAULT)]
    assert vc.phase is Phase.OPENED


def test_every_permutation_never_raises_and_connects_once() -> None:
    # Including the unrealistic "backend up before anyone asked for it".
    for order in itertools.permutations(("a1", "b1", "up")):
        vc = new_vc()
        events: dict[str, Callable[[], list[Action]]] = {
            "a1": partial(open_out, vc), "b1": partial(open_in, vc),
            "up": partial(vc.backend_up, 0.5)}
        acts = [a for e in order for a in events[e]()]
        assert acts.count(ConnectBackend()) == 1
        assert acts[-3:] == [
            StartResponse(OUT, CL), SendToClient(OUT, A3_DEFAULT), SendToClient(OUT, C2_DEFAULT)]


def test_settings_shape_a3_and_c2() -> None:
    s = VcSettings(receive_window=0x8000, connection_timeout_ms=900_000,
                   out_content_length=0x100000)
    vc = new_vc(s)
    open_out(vc)
    open_in(vc)
    assert vc.backend_up(0) == [
        StartResponse(OUT, 0x100000),
        SendToClient(OUT, rts.conn_a3(900_000)),
        SendToClient(OUT, rts.conn_c2(0x8000, 900_000)),
    ]


def test_nothing_reaches_the_client_before_the_backend_is_up() -> None:
    vc = new_vc()
    acts = open_out(vc) + open_in(vc)
    acts += vc.in_data(IN, rts.PING, 1.0)
    acts += vc.in_data(IN, rts.keep_alive(120_000), 1.0)
    acts += vc.on_timer(5.0)
    assert acts == [ConnectBackend()]
    assert vc.phase is Phase.WAIT_BACKEND


def test_flow_control_ack_before_open_ignored() -> None:
    vc = new_vc()
    open_out(vc)
    open_in(vc)
    assert vc.in_data(IN, out_ack(0, 0x40000), 1.0) == []
    assert vc.phase is Phase.WAIT_BACKEND


def test_backend_data_before_open_is_held_then_sent() -> None:
    vc = new_vc()
    open_out(vc)
    assert vc.backend_up(0.1) == []
    resp = rpc(PType.SHUTDOWN, 16)
    assert vc.backend_data(resp, 0.2) == [PauseBackend()]
    assert vc.phase is Phase.WAIT_PAIR
    assert vc.backend_up(0.3) == []  # repeated up is harmless
    assert open_in(vc) == [
        StartResponse(OUT, CL), SendToClient(OUT, A3_DEFAULT), SendToClient(OUT, C2_DEFAULT),
        SendToClient(OUT, resp), ResumeBackend()]


# --- pairing timeout ------------------------------------------------------------------------------


def test_pairing_timeout_only_out() -> None:
    vc = new_vc(now=100.0)
    open_out(vc, now=100.0)
    assert vc.next_deadline() == 130.0
    assert vc.on_timer(129.999) == []
    assert vc.phase is Phase.WAIT_PAIR
    assert norm(vc.on_timer(130.0)) == teardown(OUT)
    assert vc.closed
    assert "other channel" in (vc.close_reason or "")
    assert vc.next_deadline() is None


def test_pairing_timeout_only_in() -> None:
    vc = new_vc(VcSettings(setup_timeout=5.0))
    open_in(vc)
    assert vc.next_deadline() == 5.0
    assert norm(vc.on_timer(7.0)) == teardown(IN)


def test_setup_timeout_waiting_for_backend() -> None:
    vc = new_vc()
    open_out(vc)
    open_in(vc, now=20.0)
    assert vc.next_deadline() == 30.0
    assert vc.on_timer(29.0) == []
    assert norm(vc.on_timer(30.0)) == teardown(OUT, IN)
    assert "backend" in (vc.close_reason or "")


def test_no_timeout_once_opened() -> None:
    vc = opened()
    assert vc.on_timer(31.0) == []
    assert vc.phase is Phase.OPENED


# --- identity, target, duplicates -------------------------------------------------------------


@pytest.mark.parametrize("side", ["out", "in"])
def test_identity_mismatch_refuses_only_the_intruder(side: str) -> None:
    vc = new_vc()
    if side == "out":
        open_in(vc)
        acts = open_out(vc, "evil", identity="mallory")
    else:
        open_out(vc)
        acts = open_in(vc, "evil", identity="mallory")
    assert norm(acts) == [("close", "evil", "ProtocolError")]
    assert isinstance(acts[0], CloseChannel)
    assert acts[0].error is not None and acts[0].error.rpc_error == ERROR_ACCESS_DENIED
    assert vc.phase is Phase.WAIT_PAIR
    # the rightful owner can still complete the pair
    acts = open_out(vc) if side == "out" else open_in(vc)
    assert acts == []
    assert [type(a) for a in vc.backend_up(1)] == [StartResponse, SendToClient, SendToClient]


@pytest.mark.parametrize("side", ["out", "in"])
def test_target_mismatch_refuses_only_the_intruder(side: str) -> None:
    vc = new_vc()
    if side == "out":
        open_in(vc)
        acts = open_out(vc, "evil", target=("other", 6001))
    else:
        open_out(vc)
        acts = open_in(vc, "evil", target=("mbx01", 6004))
    assert norm(acts) == [("close", "evil", "ProtocolError")]
    assert isinstance(acts[0], CloseChannel) and acts[0].error is not None
    assert acts[0].error.rpc_error == RPC_S_PROTOCOL_ERROR
    assert vc.phase is Phase.WAIT_PAIR
    assert vc.channels() == ([IN] if side == "out" else [OUT])


def test_successor_identity_and_target_mismatch_refused() -> None:
    vc = opened()
    acts = join(vc, IN2, in_a1(), identity="mallory", target=TARGET, now=1)
    assert norm(acts) == [("close", IN2, "ProtocolError")]
    acts = join(vc, OUT2, a3(), identity=ME, target=("x", 1), now=1)
    assert norm(acts) == [("close", OUT2, "ProtocolError")]
    assert vc.phase is Phase.OPENED
    assert vc.in_data(IN, rpc(PType.BIND), 2) == [SendToBackend(rpc(PType.BIND))]


def test_duplicate_a1_and_b1() -> None:
    vc = new_vc()
    open_out(vc)
    assert norm(open_out(vc, "dup-out", pdu=a1(out=OUT2_CK))) == [
        ("close", "dup-out", "ProtocolError")]
    open_in(vc)
    assert norm(open_in(vc, "dup-in", pdu=b1(in_=IN2_CK))) == [
        ("close", "dup-in", "ProtocolError")]
    assert vc.phase is Phase.WAIT_BACKEND
    vc.backend_up(0)
    assert norm(open_out(vc, "late-out")) == [("close", "late-out", "ProtocolError")]
    assert norm(open_in(vc, "late-in")) == [("close", "late-in", "ProtocolError")]
    assert vc.phase is Phase.OPENED
    assert vc.channels() == [OUT, IN]


def test_a1_with_foreign_vc_cookie_tears_down_and_closes_the_channel() -> None:
    vc = new_vc()
    open_in(vc)
    acts = open_out(vc, pdu=a1(vc=b"X" * 16))
    assert norm(acts) == [("close", OUT, "ProtocolError"), *teardown(IN)]


# --- IN direction -------------------------------------------------------------------------------


def test_rpc_before_opened_tears_down() -> None:
    vc = new_vc()
    open_out(vc)
    open_in(vc)
    acts = vc.in_data(IN, rpc(PType.BIND), 1.0)
    assert norm(acts) == teardown(OUT, IN)
    assert not any(isinstance(a, SendToBackend) for a in acts)


def test_rpc_before_pair_tears_down() -> None:
    vc = new_vc()
    open_in(vc)
    assert norm(vc.in_data(IN, rpc(PType.REQUEST), 1.0)) == teardown(IN)


@pytest.mark.parametrize("ptype", sorted(CLIENT_PTYPES))
def test_client_ptypes_forwarded_unchanged(ptype: int) -> None:
    vc = opened()
    pdu = rpc(ptype, 100, call_id=7, fill=ptype)
    assert vc.in_data(IN, pdu, 1.0) == [SendToBackend(pdu)]
    assert vc.traffic.client_to_backend == 100


NON_CLIENT = sorted(set(range(20)) - set(CLIENT_PTYPES)) + [21, 0x7F, 0xFF]


@pytest.mark.parametrize("ptype", NON_CLIENT)
def test_non_client_ptype_on_in_tears_down(ptype: int) -> None:
    vc = opened()
    good = rpc(PType.REQUEST, 32)
    acts = vc.in_data(IN, rpc(ptype, 40) + good, 1.0)
    assert norm(acts) == teardown(OUT, IN)
    assert not any(isinstance(a, SendToBackend) for a in acts)


def test_in_framing_across_chunks() -> None:
    vc = opened()
    p1, p2, p3 = rpc(PType.BIND, 120, 1), rpc(PType.AUTH3, 60, 2), rpc(PType.REQUEST, 300, 3)
    stream = p1 + p2 + rts.PING + p3
    got: list[Action] = []
    for i in range(len(stream)):
        got += vc.in_data(IN, stream[i : i + 1], 1.0)
    assert got == [SendToBackend(p1), SendToBackend(p2), SendToBackend(p3)]
    assert vc.in_data(IN, stream, 2.0) == [SendToBackend(p1), SendToBackend(p2),
                                           SendToBackend(p3)]


def test_in_garbage_tears_down() -> None:
    vc = opened()
    assert norm(vc.in_data(IN, b"GET / HTTP/1.1\r\n\r\n", 1.0)) == teardown(OUT, IN)


def test_in_bad_rts_tears_down() -> None:
    vc = opened()
    bad = bytearray(rts.PING)
    bad[12] = 1  # call_id != 0
    assert norm(vc.in_data(IN, bytes(bad), 1.0)) == teardown(OUT, IN)


@pytest.mark.parametrize(
    "pdu",
    [rts.conn_a3(120_000), rts.ECHO, rts.OUT_R2_C1, rts.conn_c2(0x10000, 120_000),
     rts.conn_b1(VC, IN_CK, AG), rts.OUT_R2_B3],
    ids=["A3", "echo", "C1", "C2", "B1", "B3"],
)
def test_rts_not_valid_on_in_tears_down(pdu: bytes) -> None:
    vc = opened()
    assert norm(vc.in_data(IN, pdu, 1.0)) == teardown(OUT, IN)


def test_in_data_on_unknown_channel_ignored() -> None:
    vc = opened()
    assert vc.in_data("stranger", rpc(PType.REQUEST), 1.0) == []


def test_in_flow_control_ack() -> None:
    s = VcSettings(receive_window=0x2000)  # half window 4096
    vc = opened(s)
    pdu = rpc(PType.REQUEST, 1000)
    for _ in range(4):
        assert vc.in_data(IN, pdu, 1.0) == [SendToBackend(pdu)]
    # RTS PDUs do not count
    assert vc.in_data(IN, rts.PING * 10 + rts.keep_alive(300_000), 1.0) == []
    # exactly half a window does not trigger
    assert vc.in_data(IN, rpc(PType.REQUEST, 96), 1.0) == [SendToBackend(rpc(PType.REQUEST, 96))]
    acts = vc.in_data(IN, pdu, 2.0)
    ack = rts.flow_control_ack(ForwardDestination.CLIENT, 5096, 0x2000, IN_CK)
    assert acts == [SendToBackend(pdu), SendToClient(OUT, ack)]
    decoded = rts.decode_rts(ack)
    assert rts.identify(decoded) is rts.Kind.FLOW_CONTROL_ACK_WITH_DESTINATION
    assert decoded.commands == (rts.Destination(ForwardDestination.CLIENT),
                                rts.FlowControlAck(5096, 0x2000, IN_CK))
    # the next ack counts BytesReceived cumulatively
    big = rpc(PType.REQUEST, 4097)
    assert vc.in_data(IN, big, 3.0) == [
        SendToBackend(big),
        SendToClient(OUT, rts.flow_control_ack(ForwardDestination.CLIENT, 5096 + 4097, 0x2000,
                                               IN_CK))]


def test_in_flow_control_ack_in_one_chunk() -> None:
    vc = opened(VcSettings(receive_window=0x2000))
    pdus = [rpc(PType.REQUEST, 2000, i) for i in range(5)]
    acts = vc.in_data(IN, b"".join(pdus), 1.0)
    ack = SendToClient(OUT, rts.flow_control_ack(ForwardDestination.CLIENT, 6000, 0x2000, IN_CK))
    assert acts == [SendToBackend(pdus[0]), SendToBackend(pdus[1]), SendToBackend(pdus[2]), ack,
                    SendToBackend(pdus[3]), SendToBackend(pdus[4])]


def bind_pdu(max_xmit: int, little: bool = True) -> bytes:
    """A BIND whose max_xmit_frag is ``max_xmit`` (no presentation contexts)."""
    if little:
        head = bytes([5, 0, PType.BIND, 3, 0x10, 0, 0, 0]) + struct.pack("<HHI", 28, 0, 1)
        return head + struct.pack("<HHIB3x", max_xmit, max_xmit, 0, 0)
    head = bytes([5, 0, PType.BIND, 3, 0, 0, 0, 0]) + struct.pack(">HHI", 28, 0, 1)
    return head + struct.pack(">HHIB3x", max_xmit, max_xmit, 0, 0)


@pytest.mark.parametrize("little", [True, False])
def test_in_ack_comes_early_enough_for_the_clients_fragments(little: bool) -> None:
    """With a 64 KiB IN window and a client that may send 65,528-byte fragments, waiting
    for half a window would let the client hold such a fragment for an ack that never
    comes: the ack must come while the client still has room for one."""
    vc = opened(VcSettings(receive_window=0x10000))
    bind = bind_pdu(0xFFF8, little)
    ack1 = rts.flow_control_ack(ForwardDestination.CLIENT, len(bind), 0x10000, IN_CK)
    assert vc.in_data(IN, bind, 1.0) == [SendToBackend(bind), SendToClient(OUT, ack1)]
    assert vc.in_ack_after == 8  # 0x10000 - 0xFFF8
    req = rpc(PType.REQUEST, 100)
    ack2 = rts.flow_control_ack(ForwardDestination.CLIENT, len(bind) + 100, 0x10000, IN_CK)
    assert vc.in_data(IN, req, 2.0) == [SendToBackend(req), SendToClient(OUT, ack2)]


def test_in_ack_stays_at_half_a_window_for_small_fragments() -> None:
    vc = opened(VcSettings(receive_window=0x10000))
    bind = bind_pdu(5840)  # Windows' usual fragment size
    assert vc.in_data(IN, bind, 1.0) == [SendToBackend(bind)]
    assert vc.in_ack_after == 0x8000
    # a later ALTER_CONTEXT can only widen the client's fragments, never narrow them back
    alter = bytearray(bind_pdu(0xFFF8))
    alter[2] = PType.ALTER_CONTEXT
    vc.in_data(IN, bytes(alter), 1.0)
    assert vc.in_ack_after == 8
    vc.in_data(IN, bind_pdu(2000), 1.0)
    assert vc.in_ack_after == 8


def test_in_ack_goes_out_even_when_out_window_is_closed() -> None:
    vc = opened(VcSettings(receive_window=0x2000), window=0x2000)
    big = rpc(PType.RESPONSE, 0x2000)
    assert sent_to(vc.backend_data(big, 1.0), OUT) == [big]
    assert vc.backend_data(rpc(PType.RESPONSE, 100), 1.0) == [PauseBackend()]
    req = rpc(PType.REQUEST, 4097)
    assert vc.in_data(IN, req, 2.0) == [
        SendToBackend(req),
        SendToClient(OUT, rts.flow_control_ack(ForwardDestination.CLIENT, 4097, 0x2000, IN_CK))]


# --- backend direction --------------------------------------------------------------------------


def test_backend_framing_across_chunks() -> None:
    vc = opened()
    r1, r2 = rpc(PType.BIND_ACK, 90, 1), rpc(PType.RESPONSE, 200, 2)
    stream = r1 + r2
    got: list[Action] = []
    for i in range(0, len(stream), 7):
        got += vc.backend_data(stream[i : i + 7], 1.0)
    assert got == [SendToClient(OUT, r1), SendToClient(OUT, r2)]
    assert vc.backend_data(stream, 1.0) == [SendToClient(OUT, r1), SendToClient(OUT, r2)]
    assert vc.traffic.backend_to_client == 2 * len(stream)


@pytest.mark.parametrize("ptype", sorted(SERVER_PTYPES))
def test_server_ptypes_forwarded(ptype: int) -> None:
    vc = opened()
    pdu = rpc(ptype, 48)
    assert vc.backend_data(pdu, 1.0) == [SendToClient(OUT, pdu)]


@pytest.mark.parametrize("ptype", [PType.RTS, PType.REQUEST, PType.BIND, PType.PING, 21])
def test_non_server_ptype_from_backend_tears_down(ptype: int) -> None:
    vc = opened()
    pdu = rts.PING if ptype == PType.RTS else rpc(ptype, 48)
    acts = vc.backend_data(pdu, 1.0)
    assert norm(acts) == teardown(OUT, IN)
    assert sent_to(acts, OUT) == []


def test_backend_garbage_tears_down() -> None:
    vc = opened()
    assert vc.backend_data(b"ncacn_http/1.0", 1.0) == []  # shorter than a header: waits
    assert norm(vc.backend_data(b"\r\n" * 8, 1.0)) == teardown(OUT, IN)


# --- OUT flow control ---------------------------------------------------------------------------


def test_out_flow_control_queue_pause_ack_resume() -> None:
    vc = opened(window=0x2000)
    r = [rpc(PType.RESPONSE, 3000, i) for i in range(4)]
    assert vc.backend_data(r[0], 1.0) == [SendToClient(OUT, r[0])]
    assert vc.backend_data(r[1], 1.0) == [SendToClient(OUT, r[1])]
    assert vc.backend_data(r[2], 1.0) == [PauseBackend()]
    assert vc.backend_data(r[3], 1.0) == []  # already paused
    # ack for an unknown cookie: ignored
    assert vc.in_data(IN, out_ack(6000, 0x2000, b"Z" * 16), 2.0) == []
    # client consumed the first PDU: window 8192 - (6000 - 3000) = 5192 -> one more fits
    assert vc.in_data(IN, out_ack(3000, 0x2000), 2.0) == [SendToClient(OUT, r[2])]
    # everything acknowledged: the last one goes and the backend resumes
    assert vc.in_data(IN, out_ack(9000, 0x2000), 3.0) == [SendToClient(OUT, r[3]),
                                                          ResumeBackend()]


def test_out_flow_control_plain_ack_accepted() -> None:
    vc = opened(window=0x2000)
    r = rpc(PType.RESPONSE, 0x1800)
    vc.backend_data(r, 1.0)
    assert vc.backend_data(r, 1.0) == [PauseBackend()]
    plain = rts.RtsPdu(rts.RtsFlags.OTHER_CMD, (rts.FlowControlAck(0x1800, 0x2000, OUT_CK),))
    assert vc.in_data(IN, plain.encode(), 2.0) == [SendToClient(OUT, r), ResumeBackend()]


def test_out_ack_respects_reported_available_window() -> None:
    vc = opened(window=0x2000)
    r = rpc(PType.RESPONSE, 3000)
    vc.backend_data(r + r, 1.0)
    assert vc.backend_data(r, 1.0) == [PauseBackend()]
    # all received but the client's buffer is still full: nothing may go
    assert vc.in_data(IN, out_ack(6000, 1000), 2.0) == []
    assert vc.in_data(IN, out_ack(6000, 3000), 2.0) == [SendToClient(OUT, r), ResumeBackend()]


@pytest.mark.parametrize(
    "ack",
    [out_ack(3001, 0x2000), out_ack(0, 0x2001), out_ack(0xFFFFFFFF, 0)],
    ids=["acks-unsent-bytes", "window-bigger-than-advertised", "huge"],
)
def test_bogus_out_ack_tears_down(ack: bytes) -> None:
    vc = opened(window=0x2000)
    vc.backend_data(rpc(PType.RESPONSE, 3000), 1.0)
    assert norm(vc.in_data(IN, ack, 2.0)) == teardown(OUT, IN)


def test_ack_with_wrong_destination_tears_down() -> None:
    vc = opened()
    ack = rts.flow_control_ack(ForwardDestination.CLIENT, 0, 0x40000, OUT_CK)
    assert norm(vc.in_data(IN, ack, 2.0)) == teardown(OUT, IN)


def test_pdu_larger_than_window_goes_when_nothing_outstanding() -> None:
    vc = opened(window=0x2000)
    huge = rpc(PType.RESPONSE, 0x3000)
    small = rpc(PType.RESPONSE, 100)
    assert vc.backend_data(huge, 1.0) == [SendToClient(OUT, huge)]
    assert vc.backend_data(small, 1.0) == [PauseBackend()]
    assert vc.in_data(IN, out_ack(0x3000, 0x2000), 2.0) == [SendToClient(OUT, small),
                                                            ResumeBackend()]
    # but not while half the window or more is outstanding: the client will ack that
    vc2 = opened(window=0x2000)
    half = rpc(PType.RESPONSE, 0x1000)
    assert vc2.backend_data(half, 1.0) == [SendToClient(OUT, half)]
    assert vc2.backend_data(huge, 1.0) == [PauseBackend()]
    assert vc2.in_data(IN, out_ack(0x1000, 0x2000), 2.0) == [SendToClient(OUT, huge),
                                                             ResumeBackend()]


@pytest.mark.parametrize("window", [0x2000, 0x8000, 0x10000])
def test_pdu_that_does_not_fit_goes_while_less_than_half_is_outstanding(window: int) -> None:
    """A client acks only once more than half its window is used (W, impacket, Samba): a
    PDU held for an ack while less than that is outstanding would wait forever. Seen with
    64 KiB fragments after a 60-byte BIND_ACK in Outlook's default 64 KiB window."""
    vc = opened(window=window)
    bind_ack = rpc(PType.BIND_ACK, 60)
    big = rpc(PType.RESPONSE, window - 8)  # does not fit in window - 60
    assert vc.backend_data(bind_ack, 1.0) == [SendToClient(OUT, bind_ack)]
    assert vc.backend_data(big, 1.0) == [SendToClient(OUT, big)]
    # now more than half is outstanding: the next one waits for the client's ack
    assert vc.backend_data(bind_ack, 1.0) == [PauseBackend()]
    assert vc.in_data(IN, out_ack(window + 52, window), 2.0) == [
        SendToClient(OUT, bind_ack), ResumeBackend()]


# --- pings and keep-alive -------------------------------------------------------------------------


def test_ping_after_idle_interval() -> None:
    vc = opened()
    assert vc.ping_interval() == 60.0
    assert vc.next_deadline() == 60.0
    assert vc.on_timer(59.9) == []
    assert vc.on_timer(60.0) == [SendToClient(OUT, rts.PING)]
    assert vc.next_deadline() == 120.0
    # any OUT write resets the idle clock
    r = rpc(PType.RESPONSE, 64)
    assert vc.backend_data(r, 100.0) == [SendToClient(OUT, r)]
    assert vc.next_deadline() == 160.0
    assert vc.on_timer(120.0) == []
    assert vc.on_timer(160.0) == [SendToClient(OUT, rts.PING)]


def test_no_ping_before_c2() -> None:
    vc = new_vc(VcSettings(setup_timeout=1000.0))
    open_out(vc)
    open_in(vc)
    assert vc.next_deadline() == 1000.0
    for t in (60.0, 120.0, 500.0):
        assert vc.on_timer(t) == []


def test_keepalive_changes_ping_interval() -> None:
    vc = opened()
    assert vc.in_data(IN, rts.keep_alive(60_000), 10.0) == []
    assert vc.ping_interval() == 30.0
    assert vc.next_deadline() == 30.0
    assert vc.on_timer(30.0) == [SendToClient(OUT, rts.PING)]
    assert vc.in_data(IN, rts.keep_alive(0), 40.0) == []  # 0 means 300000
    assert vc.ping_interval() == 60.0
    assert vc.in_data(IN, rts.keep_alive(1000), 40.0) == []  # clamped to 60000
    assert vc.ping_interval() == 30.0


def test_b1_keepalive_and_connection_timeout_bound_interval() -> None:
    assert opened(keepalive=90_000).ping_interval() == 45.0
    vc = opened(VcSettings(connection_timeout_ms=120_000, max_ping_interval=20.0))
    assert vc.ping_interval() == 20.0


def test_client_ping_consumed() -> None:
    vc = opened()
    assert vc.in_data(IN, rts.PING, 5.0) == []


# --- OUT channel recycling ------------------------------------------------------------------------



def recycle_to_a6(s: VcSettings = SMALL, window: int = rts.MAX_RECEIVE_WINDOW,
                  ) -> tuple[VirtualConnection, Tally]:
    vc, t = recycle_to_a2(s)
    acts = join(vc, OUT2, a3(window=window), identity=ME, target=TARGET, now=3.0)
    assert t.feed(acts) == [SendToClient(OUT, rts.OUT_R2_A6)]
    return vc, t


def test_out_recycle_a7_then_c1() -> None:
    vc, t = recycle_to_a6()
    acts = t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 4.0))
    assert norm(acts) == [SendToClient(OUT, rts.OUT_R2_B3), ("close", OUT, None)]
    assert vc.channels() == [OUT2, IN]
    acts = t.feed(vc.out_request_data(OUT2, rts.OUT_R2_C1, 5.0))
    assert acts == [StartResponse(OUT2, 4096), SendToClient(OUT2, R500[7]),
                    SendToClient(OUT2, R500[8]), ResumeBackend()]
    _after_out_recycle(vc, t)


def test_out_recycle_c1_then_a7() -> None:
    vc, t = recycle_to_a6()
    assert vc.out_request_data(OUT2, rts.OUT_R2_C1, 4.0) == []
    acts = t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 5.0))
    assert norm(acts) == [
        SendToClient(OUT, rts.OUT_R2_B3), ("close", OUT, None),
        StartResponse(OUT2, 4096), SendToClient(OUT2, R500[7]), SendToClient(OUT2, R500[8]),
        ResumeBackend()]
    _after_out_recycle(vc, t)


def _after_out_recycle(vc: VirtualConnection, t: Tally) -> None:
    assert vc.phase is Phase.OPENED
    assert t.bytes[OUT] <= 4096
    # the old channel going away is normal; acks naming it are discarded
    assert vc.channel_closed(OUT) == []
    assert vc.in_data(IN, out_ack(0, 0x40000, OUT_CK), 6.0) == []
    # new traffic flows on the successor, acks for it are honoured
    r = rpc(PType.RESPONSE, 100)
    assert t.feed(vc.backend_data(r, 7.0)) == [SendToClient(OUT2, r)]
    assert vc.in_data(IN, out_ack(1100, 0x40000, OUT2_CK), 7.0) == []
    assert vc.on_timer(67.0) == [SendToClient(OUT2, rts.PING)]
    # and it recycles again when it fills up
    acts: list[Action] = []
    for i in range(10):
        acts += t.feed(vc.backend_data(rpc(PType.RESPONSE, 500, 100 + i), 8.0))
    assert SendToClient(OUT2, rts.OUT_R2_A2) in acts
    t.feed(join(vc, OUT3, a3(OUT2_CK, OUT3_CK), identity=ME, target=TARGET,
                                 now=9.0))
    t.feed(vc.in_data(IN, rts.out_r2_a7(OUT3_CK), 9.0))
    acts = t.feed(vc.out_request_data(OUT3, rts.OUT_R2_C1, 9.0))
    assert acts[0] == StartResponse(OUT3, 4096)
    assert vc.channels() == [OUT3, IN]


def test_out_recycle_b3_is_last_on_old_channel() -> None:
    vc, t = recycle_to_a6()
    assert vc.in_data(IN, rts.keep_alive(60_000), 3.0) == []  # ping every 30 s
    # a ping while waiting still goes on the old channel (the client still reads it)
    assert t.feed(vc.on_timer(33.0)) == [SendToClient(OUT, rts.PING)]
    t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 5.0))
    acts = t.feed(vc.out_request_data(OUT2, rts.OUT_R2_C1, 5.0))
    acts += t.feed(vc.backend_data(rpc(PType.RESPONSE, 100), 6.0))
    acts += t.feed(vc.on_timer(40.0))
    assert sent_to(acts, OUT) == []
    assert SendToClient(OUT2, rts.PING) in acts


def test_in_ack_during_out_recycle_before_switch_goes_on_old_channel() -> None:
    vc, t = recycle_to_a6()
    req = rpc(PType.REQUEST, 4097)
    ack = rts.flow_control_ack(ForwardDestination.CLIENT, 4097, 0x2000, IN_CK)
    assert t.feed(vc.in_data(IN, req, 4.0)) == [SendToBackend(req), SendToClient(OUT, ack)]


def test_in_ack_between_a7_and_c1_waits_for_the_successor() -> None:
    vc, t = recycle_to_a6()
    t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 4.0))
    req = rpc(PType.REQUEST, 4097)
    ack = rts.flow_control_ack(ForwardDestination.CLIENT, 4097, 0x2000, IN_CK)
    assert vc.in_data(IN, req, 4.0) == [SendToBackend(req)]
    acts = t.feed(vc.out_request_data(OUT2, rts.OUT_R2_C1, 5.0))
    assert acts[:2] == [StartResponse(OUT2, 4096), SendToClient(OUT2, ack)]


def test_rts_during_out_recycle_never_overflows_the_old_channel() -> None:
    # Uploads during an OUT recycle make IN acks; the old channel must keep room for B3.
    s = VcSettings(receive_window=0x2000, out_content_length=4096, out_reserve=128)
    vc, t = recycle_to_a6(s)  # 4096 - 72 - 7 * 500 - 28 - 32 = 464 bytes left on OUT
    req = rpc(PType.REQUEST, 4097)
    acks = [rts.flow_control_ack(ForwardDestination.CLIENT, 4097 * i, 0x2000, IN_CK)
            for i in range(1, 11)]
    sent: list[Action] = []
    for _ in range(10):
        sent += t.feed(vc.in_data(IN, req, 4.0))
    # six acks fit while leaving room for B3 (and A2/A6), the rest wait for the successor
    assert sent_to(sent, OUT) == acks[:6]
    acts = t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 5.0))
    assert sent_to(acts, OUT) == [rts.OUT_R2_B3]
    acts = t.feed(vc.out_request_data(OUT2, rts.OUT_R2_C1, 5.0))
    assert sent_to(acts, OUT2) == [*acks[6:], R500[7], R500[8]]
    assert t.bytes[OUT] <= 4096


def test_settings_reject_a_reserve_too_small_for_recycling() -> None:
    with pytest.raises(ValueError):
        VcSettings(out_reserve=64)


def test_out_recycle_window_of_successor_from_a3() -> None:
    s = VcSettings(out_content_length=0x10000, out_reserve=256)
    vc, t = recycle_to_a6(s, window=0x2000)
    t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 4.0))
    big = [rpc(PType.RESPONSE, 3000, i) for i in range(3)]
    t.feed(vc.out_request_data(OUT2, rts.OUT_R2_C1, 5.0))
    # The successor's window is 0x2000 (8192): the queued 2 x 500 went, 3000 + 3000 fit,
    # the third 3000 must wait for an ack naming the successor.
    assert t.feed(vc.backend_data(big[0] + big[1] + big[2], 6.0)) == [
        SendToClient(OUT2, big[0]), SendToClient(OUT2, big[1]), PauseBackend()]
    assert vc.in_data(IN, out_ack(7000, 0x2000, OUT2_CK), 7.0) == [
        SendToClient(OUT2, big[2]), ResumeBackend()]


def test_out_r2_a3_without_a2_is_an_error() -> None:
    vc = opened()
    acts = join(vc, OUT2, a3(), identity=ME, target=TARGET, now=1.0)
    assert norm(acts) == [("close", OUT2, "ProtocolError"), *teardown(OUT, IN)]
    assert vc.closed


def test_out_r2_a3_before_opened_is_an_error() -> None:
    vc = new_vc()
    open_out(vc)
    acts = join(vc, OUT2, a3(), identity=ME, target=TARGET, now=1.0)
    assert norm(acts) == [("close", OUT2, "ProtocolError"), *teardown(OUT)]


@pytest.mark.parametrize(
    "pdu",
    [a3(pred=b"Z" * 16), a3(vc=b"Z" * 16)],
    ids=["predecessor", "vc"],
)
def test_out_r2_a3_bad_cookies_tear_down(pdu: rts.RtsPdu) -> None:
    vc, t = recycle_to_a2()
    acts = join(vc, OUT2, pdu, identity=ME, target=TARGET, now=3.0)
    assert norm(acts) == [("close", OUT2, "ProtocolError"), *teardown(OUT, IN)]
    assert vc.closed


def test_second_a3_tears_down() -> None:
    vc, t = recycle_to_a6()
    acts = join(vc, OUT3, a3(succ=OUT3_CK), identity=ME, target=TARGET, now=3.0)
    assert norm(acts) == [("close", OUT3, "ProtocolError"), *teardown(OUT, OUT2, IN)]


def test_out_r2_a7_bad_cookie_tears_down() -> None:
    vc, t = recycle_to_a6()
    acts = vc.in_data(IN, rts.out_r2_a7(OUT3_CK), 4.0)
    assert norm(acts) == teardown(OUT, OUT2, IN)
    assert sent_to(acts, OUT) == []


def test_out_r2_a7_wrong_destination_tears_down() -> None:
    vc, t = recycle_to_a6()
    pdu = rts.RtsPdu(rts.RtsFlags.OUT_CHANNEL, (rts.Destination(ForwardDestination.CLIENT),
                                                rts.Cookie(OUT2_CK), rts.Version()))
    assert norm(vc.in_data(IN, pdu.encode(), 4.0)) == teardown(OUT, OUT2, IN)


def test_out_r1_a7_accepted_like_r2() -> None:
    vc, t = recycle_to_a6()
    pdu = rts.RtsPdu(rts.RtsFlags.OUT_CHANNEL, (rts.Destination(ForwardDestination.SERVER),
                                                rts.Cookie(OUT2_CK)))
    assert norm(vc.in_data(IN, pdu.encode(), 4.0)) == [
        SendToClient(OUT, rts.OUT_R2_B3), ("close", OUT, None)]


def test_out_r2_a7_without_recycle_tears_down() -> None:
    vc = opened()
    assert norm(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 1.0)) == teardown(OUT, IN)
    vc, t = recycle_to_a2()  # A2 sent, but no A3 yet
    assert norm(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 1.0)) == teardown(OUT, IN)


@pytest.mark.parametrize(
    ("channel", "data"),
    [
        (OUT, rts.OUT_R2_C1),  # C1 on the old channel
        (OUT2, rts.PING),  # something else on the successor
        (OUT2, rpc(PType.REQUEST, 24)),  # an RPC PDU in an OUT body
        (OUT2, rts.OUT_R2_C1 + rts.OUT_R2_C1),  # more than C1
        (OUT2, rts.OUT_R2_C1[:10]),  # truncated
        ("stranger", rts.OUT_R2_C1),
    ],
    ids=["c1-on-old", "ping", "rpc", "double", "truncated", "unknown-channel"],
)
def test_bad_out_request_data_tears_down(channel: str, data: bytes) -> None:
    vc, t = recycle_to_a6()
    acts = vc.out_request_data(channel, data, 4.0)
    assert norm(acts) == teardown(OUT, OUT2, IN)


def test_duplicate_c1_tears_down() -> None:
    vc, t = recycle_to_a6()
    assert vc.out_request_data(OUT2, rts.OUT_R2_C1, 4.0) == []
    assert norm(vc.out_request_data(OUT2, rts.OUT_R2_C1, 4.0)) == teardown(OUT, OUT2, IN)


def test_out_request_data_on_primary_channel_tears_down() -> None:
    vc = opened()
    assert norm(vc.out_request_data(OUT, rpc(PType.REQUEST), 1.0)) == teardown(OUT, IN)


def test_out_recycle_timeout() -> None:
    vc, t = recycle_to_a2()
    assert vc.next_deadline() == 2.0 + 60.0  # recycle deadline; the ping one is the same
    vc2, _ = recycle_to_a6()
    acts = vc2.on_timer(62.0)
    assert norm(acts) == teardown(OUT, OUT2, IN)
    assert "recycl" in (vc2.close_reason or "")


def test_out_recycle_timeout_after_a7() -> None:
    vc, t = recycle_to_a6()
    vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 4.0)
    assert norm(vc.on_timer(62.0)) == teardown(OUT2, IN)


def _serve_out_recycles(vc: VirtualConnection, t: Tally, acts: list[Action],
                        limit: int) -> tuple[int, int]:
    """Play a compliant client: answer every OUT_R2/A2 with a successor (A3, A6 seen, A7,
    C1), at most ``limit`` times; (recycles, RPC bytes received)."""
    recycles = got = 0
    cookie = OUT_CK
    now = 10.0
    while not vc.closed and recycles < limit:
        got += sum(len(a.data) for a in acts
                   if isinstance(a, SendToClient) and a.data[2] != PType.RTS)
        if not any(isinstance(a, SendToClient) and a.data == rts.OUT_R2_A2 for a in acts):
            break
        recycles += 1
        succ, ch = bytes([recycles]) * 16, f"out-r{recycles}"
        now += 1
        acts = t.feed(join(vc, ch, a3(cookie, succ), identity=ME, target=TARGET,
                                            now=now))
        acts += t.feed(vc.in_data(IN, rts.out_r2_a7(succ), now))
        acts += t.feed(vc.out_request_data(ch, rts.OUT_R2_C1, now))
        cookie = succ
    return recycles, got


@pytest.mark.parametrize(("content_length", "size"), [(32768, 60_000), (65536, 0xFFF8)])
def test_pdu_no_out_channel_can_carry_ends_the_vc_instead_of_recycling_forever(
        content_length: int, size: int) -> None:
    # The livelock: each fresh channel had too little room for the PDU, so the
    # proxy sent OUT_R2/A2 at once on every successor and never the PDU itself.
    s = VcSettings(out_content_length=content_length)
    vc = opened(s)
    t = Tally(content_length)
    t.started.add(OUT)
    t.bytes[OUT] = len(A3_DEFAULT) + len(C2_DEFAULT)
    acts = t.feed(vc.backend_data(rpc(PType.RESPONSE, size), 1.0))
    recycles, _ = _serve_out_recycles(vc, t, acts, limit=5)
    assert recycles == 0, "a recycle that cannot help was started"
    assert norm(acts) == teardown(OUT, IN)
    assert vc.close_reason is not None
    assert f"{size}-byte PDU" in vc.close_reason and "cannot fit" in vc.close_reason


def test_largest_fragment_fits_a_fresh_channel_of_the_least_allowed_content_length() -> None:
    # The configuration's floor: after one recycle the 65535-byte fragment goes out, even
    # with RTS (an IN ack) waiting to go first on the successor.
    least = min_out_content_length(4096)
    s = VcSettings(out_content_length=least, receive_window=0x2000)
    vc = opened(s)
    t = Tally(least)
    t.started.add(OUT)
    t.bytes[OUT] = len(A3_DEFAULT) + len(C2_DEFAULT)
    first = rpc(PType.RESPONSE, 0x8000, 1)
    big = rpc(PType.RESPONSE, 0xFFFF, 2)
    acts = t.feed(vc.backend_data(first, 1.0)) + t.feed(vc.backend_data(big, 1.0))
    assert sent_to(acts, OUT) == [first, rts.OUT_R2_A2]
    acts = t.feed(join(vc, OUT2, a3(), identity=ME, target=TARGET, now=2.0))
    acts += t.feed(vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 2.0))
    acts += t.feed(vc.in_data(IN, rpc(PType.REQUEST, 0x1001), 2.0))  # an IN ack is due
    acts += t.feed(vc.out_request_data(OUT2, rts.OUT_R2_C1, 2.0))
    assert sent_to(acts, OUT2)[-1] == big
    assert not vc.closed


# --- IN channel recycling -------------------------------------------------------------------------


def test_in_recycle() -> None:
    vc = opened()
    acts = join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    assert acts == [SendToClient(OUT, rts.IN_R2_A4)]
    assert vc.channels() == [OUT, IN, IN2]
    held = [rpc(PType.REQUEST, 100, 10), rpc(PType.REQUEST, 60, 11)]
    # the successor is plugged
    assert vc.in_data(IN2, held[0] + held[1][:30], 2.0) == []
    assert vc.in_data(IN2, held[1][30:], 2.0) == []
    # the predecessor still delivers, in order
    pre = rpc(PType.REQUEST, 80, 9)
    assert vc.in_data(IN, pre, 3.0) == [SendToBackend(pre)]
    # A5 on the old channel switches; bytes after A5 on the old channel are ignored
    acts = vc.in_data(IN, rts.in_r2_a5(IN2_CK) + rpc(PType.REQUEST, 40, 99), 4.0)
    assert norm(acts) == [("close", IN, None), SendToBackend(held[0]), SendToBackend(held[1])]
    assert vc.channels() == [OUT, IN2]
    after = rpc(PType.REQUEST, 50, 12)
    assert vc.in_data(IN2, after, 5.0) == [SendToBackend(after)]
    assert vc.in_data(IN, rpc(PType.REQUEST, 40, 100), 5.0) == []
    assert vc.channel_closed(IN) == []
    assert vc.phase is Phase.OPENED


def test_in_recycle_successor_counts_its_own_bytes() -> None:
    vc = opened(VcSettings(receive_window=0x2000))
    pdu = rpc(PType.REQUEST, 3000)
    vc.in_data(IN, pdu, 1.0)
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    vc.in_data(IN, rts.in_r2_a5(IN2_CK), 2.0)
    assert vc.in_data(IN2, pdu, 3.0) == [SendToBackend(pdu)]
    acts = vc.in_data(IN2, pdu, 3.0)
    assert acts == [SendToBackend(pdu), SendToClient(
        OUT, rts.flow_control_ack(ForwardDestination.CLIENT, 6000, 0x2000, IN2_CK))]


def test_in_recycle_a5_with_pdus_before_it_in_one_chunk() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    held = rpc(PType.REQUEST, 64, 2)
    vc.in_data(IN2, held, 1.0)
    pre = rpc(PType.REQUEST, 64, 1)
    acts = vc.in_data(IN, pre + rts.in_r2_a5(IN2_CK), 2.0)
    assert norm(acts) == [SendToBackend(pre), ("close", IN, None), SendToBackend(held)]


def test_in_recycle_a5_bad_cookie_tears_down() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    vc.in_data(IN2, rpc(PType.REQUEST), 1.0)
    acts = vc.in_data(IN, rts.in_r2_a5(b"Z" * 16), 2.0)
    assert norm(acts) == teardown(OUT, IN, IN2)
    assert not any(isinstance(a, SendToBackend) for a in acts)


def test_in_r2_a5_without_recycle_tears_down() -> None:
    vc = opened()
    assert norm(vc.in_data(IN, rts.in_r2_a5(IN2_CK), 2.0)) == teardown(OUT, IN)


def test_in_r2_a5_on_successor_is_just_buffered() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    assert vc.in_data(IN2, rts.in_r2_a5(IN2_CK), 2.0) == []
    assert vc.phase is Phase.OPENED


def test_in_recycle_plugged_non_client_ptype_never_forwarded() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    ok = rpc(PType.REQUEST, 64)
    vc.in_data(IN2, ok + rpc(PType.RESPONSE, 64) + ok, 1.0)
    acts = vc.in_data(IN, rts.in_r2_a5(IN2_CK), 2.0)
    assert [a for a in acts if isinstance(a, SendToBackend)] == [SendToBackend(ok)]
    assert vc.closed
    assert norm(acts)[-2:] == [CloseBackend(), ("vc_closed", "ProtocolError")]


@pytest.mark.parametrize(
    "pdu", [in_a1(pred=b"Z" * 16), in_a1(vc=b"Z" * 16)], ids=["predecessor", "vc"])
def test_in_r2_a1_bad_cookies_tear_down(pdu: rts.RtsPdu) -> None:
    vc = opened()
    acts = join(vc, IN2, pdu, identity=ME, target=TARGET, now=1.0)
    assert norm(acts) == [("close", IN2, "ProtocolError"), *teardown(OUT, IN)]


def test_in_r2_a1_before_opened_tears_down() -> None:
    vc = new_vc()
    open_in(vc)
    acts = join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    assert norm(acts) == [("close", IN2, "ProtocolError"), *teardown(IN)]


def test_second_in_r2_a1_tears_down() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    acts = join(vc, "in-3", in_a1(succ=b"K" * 16), identity=ME, target=TARGET,
                                now=1.0)
    assert norm(acts) == [("close", "in-3", "ProtocolError"), *teardown(OUT, IN, IN2)]




def test_in_r2_a1_that_overtakes_the_previous_a5_is_queued_in_order() -> None:
    """A client that got IN_R2/A4 sends A5 on IN#1, fills IN#2 and recycles it; its A1
    for IN#3 (naming IN#2) can arrive before that A5. It waits, plugged, for the A5."""
    vc = opened()
    assert join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0) == [
        SendToClient(OUT, rts.IN_R2_A4)]
    on2 = [rpc(PType.REQUEST, 100, 20), rpc(PType.REQUEST, 60, 21)]
    assert vc.in_data(IN2, on2[0], 1.5) == []
    acts = join(vc, IN3, in_a1(IN2_CK, IN3_CK), identity=ME, target=TARGET,
                                now=2.0)
    assert acts == []  # queued: no A4 before the pending recycle completes
    assert vc.channels() == [OUT, IN, IN2, IN3]
    on3 = rpc(PType.REQUEST, 70, 30)
    assert vc.in_data(IN3, on3, 2.5) == []
    pre = rpc(PType.REQUEST, 80, 10)
    assert vc.in_data(IN, pre, 3.0) == [SendToBackend(pre)]
    # the late A5 on IN#1: IN#2 becomes current, its PDUs go, then IN#3's A4
    acts = vc.in_data(IN, rts.in_r2_a5(IN2_CK), 4.0)
    assert norm(acts) == [("close", IN, None), SendToBackend(on2[0]),
                          SendToClient(OUT, rts.IN_R2_A4)]
    assert vc.in_data(IN2, on2[1], 4.5) == [SendToBackend(on2[1])]
    acts = vc.in_data(IN2, rts.in_r2_a5(IN3_CK), 5.0)
    assert norm(acts) == [("close", IN2, None), SendToBackend(on3)]
    after = rpc(PType.REQUEST, 50, 31)
    assert vc.in_data(IN3, after, 6.0) == [SendToBackend(after)]
    assert vc.channels() == [OUT, IN3] and vc.phase is Phase.OPENED
    assert vc.in_recycle_started is None


def test_queued_in_successor_restarts_the_recycle_timer() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    join(vc, IN3, in_a1(IN2_CK, IN3_CK), identity=ME, target=TARGET, now=2.0)
    vc.in_data(IN, rts.in_r2_a5(IN2_CK), 50.0)
    assert vc.next_deadline() == 110.0  # 60 s from the A4 sent for IN#3
    assert norm(vc.on_timer(110.0)) == teardown(OUT, IN2, IN3)


@pytest.mark.parametrize("pdu", [in_a1(IN2_CK, b"L" * 16), in_a1(IN_CK, b"L" * 16),
                                 in_a1(IN2_CK, b"L" * 16, vc=b"Z" * 16)],
                         ids=["third", "names-current", "foreign-vc"])
def test_in_r2_a1_beside_a_queued_or_pending_one_still_tears_down(pdu: rts.RtsPdu) -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    if tuple(rts.cookies(pdu)[:2]) == (VC, IN2_CK):  # "third": one is queued already
        join(vc, IN3, in_a1(IN2_CK, IN3_CK), identity=ME, target=TARGET, now=1.0)
        expect = teardown(OUT, IN, IN2, IN3)
    else:
        expect = teardown(OUT, IN, IN2)
    acts = join(vc, "in-4", pdu, identity=ME, target=TARGET, now=2.0)
    assert norm(acts) == [("close", "in-4", "ProtocolError"), *expect]


def test_queued_in_successor_closing_ends_the_vc() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    join(vc, IN3, in_a1(IN2_CK, IN3_CK), identity=ME, target=TARGET, now=1.0)
    assert norm(vc.channel_closed(IN3)) == teardown(OUT, IN, IN2, IN3, error=None)


def test_in_recycle_timeout() -> None:
    vc = opened()
    vc.in_data(IN, rts.keep_alive(60_000), 0.0)  # ping every 30 s
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=10.0)  # A4 at t=10
    assert vc.next_deadline() == 40.0  # ping first
    assert vc.on_timer(40.0) == [SendToClient(OUT, rts.PING)]
    assert vc.next_deadline() == 70.0
    assert vc.on_timer(69.9) == []
    assert norm(vc.on_timer(70.0)) == teardown(OUT, IN, IN2)


def test_in_r2_a4_during_out_recycle_goes_on_old_out() -> None:
    vc, t = recycle_to_a6()
    acts = join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=4.0)
    assert t.feed(acts) == [SendToClient(OUT, rts.IN_R2_A4)]


# --- closing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", [OUT, IN])
def test_channel_closed_of_live_channel_tears_down(which: str) -> None:
    vc = opened()
    acts = vc.channel_closed(which)
    # a client closing a channel is a normal end: no error to report
    assert norm(acts) == teardown(OUT, IN, error=None)
    assert vc.closed


def test_channel_closed_of_successor_tears_down() -> None:
    vc = opened()
    join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=1.0)
    assert norm(vc.channel_closed(IN2)) == teardown(OUT, IN, IN2, error=None)


def test_channel_closed_during_pairing() -> None:
    vc = new_vc()
    open_out(vc)
    assert norm(vc.channel_closed(OUT)) == teardown(OUT, error=None)


def test_channel_closed_of_unknown_channel_ignored() -> None:
    vc = opened()
    assert vc.channel_closed("stranger") == []
    assert vc.phase is Phase.OPENED


def test_backend_closed_tears_down_with_error() -> None:
    vc = opened()
    acts = vc.backend_closed()
    assert norm(acts) == teardown(OUT, IN, error="BackendUnavailable")
    for a in acts:
        if isinstance(a, CloseChannel | VcClosed):
            assert isinstance(a.error, BackendUnavailable)
            assert a.error.rpc_error == RPC_S_SERVER_UNAVAILABLE


def test_backend_failed_tears_down_with_that_error() -> None:
    vc = new_vc()
    open_out(vc)
    open_in(vc)
    error = BackendUnavailable("backend 127.0.0.1:1024 unreachable: refused")
    acts = vc.backend_failed(error)
    assert norm(acts) == teardown(OUT, IN, error="BackendUnavailable")
    assert all(a.error is error for a in acts if isinstance(a, CloseChannel | VcClosed))
    assert vc.close_reason == str(error)


def test_close_from_outside() -> None:
    vc = opened()
    acts = vc.close("server shutdown")
    assert norm(acts) == teardown(OUT, IN, error=None)
    assert isinstance(acts[-1], VcClosed) and acts[-1].reason == "server shutdown"
    assert vc.close("again") == []


def test_close_before_backend_requested() -> None:
    vc = new_vc()
    assert norm(vc.close("bye")) == [("vc_closed", None)]


def test_teardown_clears_queues() -> None:
    vc = opened(window=0x2000)
    vc.backend_data(rpc(PType.RESPONSE, 0x2000) * 3, 1.0)
    assert vc.send_queue
    vc.close("bye")
    assert not vc.send_queue and vc.channels() == []


def test_everything_after_closed_is_empty_or_refused() -> None:
    vc = opened()
    vc.close("bye")
    assert norm(open_out(vc, "x")) == [("close", "x", "ProtocolError")]
    assert norm(open_in(vc, "y")) == [("close", "y", "ProtocolError")]
    results = [
        vc.in_data(IN, rpc(PType.REQUEST), 2.0),
        vc.out_request_data(OUT, rts.OUT_R2_C1, 2.0),
        vc.backend_data(rpc(PType.RESPONSE), 2.0),
        vc.backend_up(2.0),
        vc.backend_closed(),
        vc.backend_failed(BackendUnavailable("x")),
        vc.channel_closed(OUT),
        vc.on_timer(1000.0),
        vc.close("again"),
    ]
    for r in results:
        assert r == [] or all(isinstance(a, CloseChannel) for a in r)
    assert norm(join(vc, OUT2, a3(), identity=ME, target=TARGET, now=2.0)) == [
        ("close", OUT2, "ProtocolError")]
    assert norm(join(vc, IN2, in_a1(), identity=ME, target=TARGET, now=2.0)) == [
        ("close", IN2, "ProtocolError")]
    assert vc.next_deadline() is None


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        VcSettings(receive_window=0x1000)
    with pytest.raises(ValueError):
        VcSettings(connection_timeout_ms=1000)
    with pytest.raises(ValueError):
        VcSettings(out_content_length=1000, out_reserve=4096)


# --- random event sequences -----------------------------------------------------------------------

PROP_SETTINGS = VcSettings(receive_window=0x2000, out_content_length=4096, out_reserve=128,
                           setup_timeout=30.0, recycle_timeout=60.0)


class Driver:
    """Plays a mostly well-behaved client plus a random adversary against one VC."""

    def __init__(self, strict: bool, fast_paths: bool = True) -> None:
        self.strict = strict  # only send recycling PDUs when a real client would
        self.a2_seen = False
        self.a6_seen = False
        self.a7_sent = False
        self.c1_sent = False
        self.out_switches = 0
        self.vc = new_vc(dataclasses.replace(PROP_SETTINGS, fast_paths=fast_paths))
        self.log: list[Any] = []  # every action, normalised, in order
        self.now = 0.0
        self.tally = Tally(PROP_SETTINGS.out_content_length)
        self.closed_seen = False
        self.out_cookie = OUT_CK
        self.in_cookie = IN_CK
        self.n = 0
        self.pending_out: tuple[str, bytes] | None = None
        self.pending_in: tuple[str, bytes] | None = None
        self.queued_in: tuple[str, bytes] | None = None  # A1 that overtook pending's A5
        self.cur_in = IN
        self.out_received = 0
        self.backend_sent: list[bytes] = []

    def fresh(self) -> bytes:
        self.n += 1
        return struct.pack("<I", self.n) * 4

    def apply(self, actions: list[Action]) -> None:
        assert isinstance(actions, list)
        self.log.extend(norm(actions))
        if self.closed_seen:
            assert all(isinstance(a, CloseChannel) for a in actions), actions
        for a in actions:
            if isinstance(a, SendToBackend):
                assert a.data[2] in CLIENT_PTYPES, "non-client PTYPE forwarded"
                self.backend_sent.append(a.data)
            if isinstance(a, SendToClient) and a.data[2] != PType.RTS:
                self.out_received += len(a.data)
            if isinstance(a, SendToClient) and a.data[2] == PType.RTS:
                kind = rts.identify(rts.decode_rts(a.data))
                if kind is rts.Kind.OUT_R2_A2:
                    self.a2_seen = True
                elif kind is rts.Kind.OUT_R2_A6:
                    self.a6_seen = True
            if isinstance(a, StartResponse) and self.pending_out and (
                    a.channel == self.pending_out[0]):
                self.out_cookie = self.pending_out[1]
                self.pending_out = None
                self.a6_seen = False
                self.out_switches += 1
            if isinstance(a, VcClosed):
                self.closed_seen = True
        self.tally.feed(actions)

    def step(self, op: str, size: int) -> None:
        vc = self.vc
        self.now += 0.5
        if op == "tick":
            self.now += size / 20.0
            self.apply(vc.on_timer(self.now))
        elif op == "backend":
            self.apply(vc.backend_data(rpc(PType.RESPONSE, 16 + size, fill=size), self.now))
        elif op == "client_rpc":
            self.apply(vc.in_data(self.cur_in, rpc(PType.REQUEST, 16 + size * 4), self.now))
        elif op == "client_bind":  # a BIND announcing the client's largest fragment
            max_xmit = 16 + size * 90
            head = bytes([5, 0, PType.BIND, 3, 0x10, 0, 0, 0]) + struct.pack("<HHI", 28, 0, 1)
            self.apply(vc.in_data(self.cur_in, head + struct.pack(
                "<HHIB3x", min(max_xmit, 0xFFFF), 0xFFFF, 0, 0), self.now))
        elif op == "client_two":  # two PDUs in one read
            two = rpc(PType.REQUEST, 16 + size) + rpc(PType.ALTER_CONTEXT, 24)
            self.apply(vc.in_data(self.cur_in, two, self.now))
        elif op == "backend_split":  # one PDU over two reads
            pdu = rpc(PType.RESPONSE, 32 + size, fill=size)
            cut = 1 + size % (len(pdu) - 1)
            self.apply(vc.backend_data(pdu[:cut], self.now))
            self.apply(vc.backend_data(pdu[cut:], self.now))
        elif op == "client_lookalike":  # a PDU's head, then a tail that parses as a PDU
            tail = rpc(PType.REQUEST, 16 + size % 64)
            whole = rpc(PType.REQUEST, 16 + len(tail))
            self.apply(vc.in_data(self.cur_in, whole[:16], self.now))
            self.apply(vc.in_data(self.cur_in, tail, self.now))
        elif op == "backend_lookalike":
            tail = rpc(PType.RESPONSE, 16 + size % 64)
            whole = rpc(PType.RESPONSE, 16 + len(tail))
            self.apply(vc.backend_data(whole[:16], self.now))
            self.apply(vc.backend_data(tail, self.now))
        elif op == "client_split":  # one PDU over two reads
            pdu = rpc(PType.REQUEST, 32 + size)
            cut = 1 + size % (len(pdu) - 1)
            self.apply(vc.in_data(self.cur_in, pdu[:cut], self.now))
            self.apply(vc.in_data(self.cur_in, pdu[cut:], self.now))
        elif op == "client_bad_ptype":
            self.apply(vc.in_data(self.cur_in, rpc(size % 256, 16 + size), self.now))
        elif op == "garbage":
            self.apply(vc.in_data(self.cur_in, bytes([size % 256]) * (size % 40), self.now))
        elif op == "ping":
            self.apply(vc.in_data(self.cur_in, rts.PING, self.now))
        elif op == "keepalive":
            self.apply(vc.in_data(self.cur_in, rts.keep_alive(size * 1000), self.now))
        elif op == "ack":
            window = vc.out.peer_window if vc.out is not None else 0x40000
            cookie = vc.out.cookie if vc.out is not None else self.out_cookie
            got = vc.out.bytes_sent if vc.out is not None else 0
            self.apply(vc.in_data(self.cur_in, out_ack(got, window, cookie), self.now))
        elif op == "bogus_ack":
            self.apply(vc.in_data(self.cur_in, out_ack(size * 100, 0x2000 + size,
                                                       self.out_cookie), self.now))
        elif op == "out_a3":
            if self.strict and not self.a2_seen:
                return
            self.a2_seen = False
            self.a7_sent = self.c1_sent = False
            succ = self.fresh()
            ch = f"succ-out-{self.n}"
            self.pending_out = (ch, succ)
            self.apply(join(vc, ch, a3(self.out_cookie, succ, 0x2000),
                                             identity=ME, target=TARGET, now=self.now))
        elif op == "out_a7" and self.pending_out and (self.a6_seen or not self.strict):
            if self.strict and self.a7_sent:
                return
            self.a7_sent = True
            self.apply(vc.in_data(self.cur_in, rts.out_r2_a7(self.pending_out[1]), self.now))
        elif op == "out_c1" and self.pending_out and (self.a6_seen or not self.strict):
            if self.strict and self.c1_sent:
                return
            self.c1_sent = True
            self.apply(vc.out_request_data(self.pending_out[0], rts.OUT_R2_C1, self.now))
        elif op == "in_a1":
            if self.strict and self.pending_in:
                return
            succ = self.fresh()
            ch = f"succ-in-{self.n}"
            self.pending_in = (ch, succ)
            self.apply(join(vc, ch, in_a1(self.in_cookie, succ), identity=ME,
                                            target=TARGET, now=self.now))
        elif op == "in_a1_next" and self.pending_in:  # recycles the successor before A5
            if self.strict and self.queued_in:
                return
            succ = self.fresh()
            ch = f"succ-in-{self.n}"
            self.queued_in = (ch, succ)
            self.apply(join(vc, ch, in_a1(self.pending_in[1], succ), identity=ME,
                                            target=TARGET, now=self.now))
        elif op == "in_next_rpc" and self.queued_in:
            self.apply(vc.in_data(self.queued_in[0], rpc(PType.REQUEST, 16 + size), self.now))
        elif op == "in_succ_rpc" and self.pending_in:
            self.apply(vc.in_data(self.pending_in[0], rpc(PType.REQUEST, 16 + size), self.now))
        elif op == "in_a5" and self.pending_in:
            ch, succ = self.pending_in
            self.apply(vc.in_data(self.cur_in, rts.in_r2_a5(succ), self.now))
            if vc.in_ is not None and vc.in_.channel == ch:
                self.cur_in, self.in_cookie = ch, succ
                self.pending_in, self.queued_in = self.queued_in, None
        elif op == "close_channel":
            chans = vc.channels()
            if chans:
                self.apply(vc.channel_closed(chans[size % len(chans)]))
        elif op == "backend_closed":
            self.apply(vc.backend_closed())
        elif op == "close":
            self.apply(vc.close("test"))


# weighted: enough backend traffic and acks to fill OUT channels and force recycling
SAFE_OPS = ["tick", "backend", "backend", "backend", "backend", "client_rpc", "client_rpc",
            "ping", "keepalive", "ack", "ack", "out_a3", "out_a7", "out_c1", "in_a1",
            "in_succ_rpc", "in_a5", "in_a1_next", "in_next_rpc", "client_two", "backend_split",
            "client_split", "client_bind"]
HOSTILE_OPS = ["client_bad_ptype", "garbage", "bogus_ack", "close_channel", "backend_closed",
               "close"]


def _run_driver(ops: list[tuple[str, int]], strict: bool = True,
                fast_paths: bool = True) -> Driver:
    d = Driver(strict, fast_paths)
    d.apply(open_out(d.vc, pdu=a1(0x2000)))
    d.apply(open_in(d.vc))
    d.apply(d.vc.backend_up(0.0))
    for op, size in ops:
        d.step(op, size)
        if d.vc.closed:
            assert d.closed_seen
    return d


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(SAFE_OPS), st.integers(0, 700)), max_size=60))
def test_random_cooperative_client(ops: list[tuple[str, int]]) -> None:
    _run_driver(ops, strict=True)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(SAFE_OPS + HOSTILE_OPS), st.integers(0, 700)),
                max_size=60))
def test_random_hostile_events(ops: list[tuple[str, int]]) -> None:
    _run_driver(ops, strict=False)


# Weighted to the reads the fast paths take (and the ones next to them: acks due, windows
# closing, Content-Length running out, recycling); hostile events end a VC within a few
# steps, so they get their own, shorter test.
DATA_OPS = (["client_rpc"] * 6 + ["backend"] * 8 + ["ack"] * 3 + SAFE_OPS
            + ["client_lookalike", "backend_lookalike"])


def _same_outcome(ops: list[tuple[str, int]], strict: bool) -> None:
    fast = _run_driver(ops, strict=strict, fast_paths=True)
    slow = _run_driver(ops, strict=strict, fast_paths=False)
    assert fast.log == slow.log
    assert fast.backend_sent == slow.backend_sent
    for attr in ("phase", "traffic", "last_out_write", "reading", "out_recycle"):
        assert getattr(fast.vc, attr) == getattr(slow.vc, attr), attr
    for name in ("out", "in_", "out_successor", "in_successor", "old_out"):
        f, s_ = getattr(fast.vc, name), getattr(slow.vc, name)
        assert (f is None) == (s_ is None), name
        if f is not None:
            assert f.cookie == s_.cookie and f.channel == s_.channel, name
            for field_name in ("bytes_sent", "available", "bytes_left", "bytes_received",
                               "unacked"):
                if hasattr(f, field_name):
                    assert getattr(f, field_name) == getattr(s_, field_name), (name, field_name)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(DATA_OPS), st.integers(0, 700)), min_size=5,
                max_size=80), st.booleans())
def test_fast_paths_change_nothing(ops: list[tuple[str, int]], strict: bool) -> None:
    """in_data/backend_data's one-read-one-PDU fast paths: the same actions, in the same
    order, and the same counters as the general paths, whatever the event sequence."""
    _same_outcome(ops, strict)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(DATA_OPS + HOSTILE_OPS), st.integers(0, 700)),
                max_size=40))
def test_fast_paths_change_nothing_under_hostile_events(ops: list[tuple[str, int]]) -> None:
    _same_outcome(ops, strict=False)


def test_fast_paths_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common reads really take the fast paths (else the test above proves nothing)."""
    vc = opened()
    calls: list[str] = []

    def spy(fn: Callable[..., object], *a: object) -> list[Action]:
        calls.append(fn.__name__)
        return []

    monkeypatch.setattr(vc, "_run", spy)
    assert vc.in_data(IN, rpc(PType.REQUEST, 64), 1.0) == [SendToBackend(rpc(PType.REQUEST, 64))]
    response = rpc(PType.RESPONSE, 64)
    assert vc.backend_data(response, 1.0) == [SendToClient(OUT, response)]
    assert calls == []
    vc.in_data(IN, rpc(PType.REQUEST, 64) * 2, 1.0)  # two PDUs: the general path
    vc.backend_data(response[:10], 1.0)  # a partial PDU: the general path
    assert calls == ["_in_data", "_backend_data"]


def test_channel_counts_during_out_recycle() -> None:
    """The recycling OUT channel is ``out`` and ``old_out`` at once: it counts once (the
    metrics' rpcproxy_channels{direction="out"} read one too many while a VC recycled)."""
    vc = opened()
    assert vc.open_channels() == (1, 1)
    vc, _ = recycle_to_a2()
    assert vc.old_out is vc.out
    assert vc.open_channels() == (1, 1)
    vc, _ = recycle_to_a6()
    assert vc.open_channels() == (1, 2)


# --- how a VC ended: CloseKind, and the metric it becomes -----------------------------------------


def _pairing() -> list[Action]:
    vc = new_vc()
    open_out(vc)
    return vc.on_timer(30.0)


def _backend_wait() -> list[Action]:
    vc = new_vc()
    open_out(vc)
    open_in(vc)
    return vc.on_timer(30.0)


def _backend_unreachable() -> list[Action]:
    vc = new_vc()
    open_out(vc)
    return vc.backend_failed(BackendUnavailable("backend 127.0.0.1:1 unreachable: refused"))


def _backend_speaks_client() -> list[Action]:
    return opened().backend_data(rpc(PType.REQUEST), 1.0)


def _pdu_too_large() -> list[Action]:
    return opened(VcSettings(out_content_length=32768)).backend_data(
        rpc(PType.RESPONSE, 60_000), 1.0)


def _recycle_timeout() -> list[Action]:
    vc, _ = recycle_to_a2()
    return vc.on_timer(1000.0)


def _client_rpc_type() -> list[Action]:
    return opened().in_data(IN, rpc(PType.RESPONSE), 1.0)


def _channel_failed() -> list[Action]:
    return opened().channel_failed(IN, ProtocolError("IN request body runs past its end"))


# Each way the core ends a VC, its CloseKind, and the how="..." label of
# rpcproxy_virtual_connections_closed_total it had before CloseKind existed (then derived
# from the reason's words): the labels must not change.
CLOSE_PATHS: list[tuple[str, Callable[[], list[Action]], CloseKind, str]] = [
    ("pairing", _pairing, CloseKind.PAIRING_TIMEOUT, "pairing_timeout"),
    ("backend-wait", _backend_wait, CloseKind.BACKEND_TIMEOUT, "backend"),
    ("backend-failed", _backend_unreachable, CloseKind.BACKEND_UNREACHABLE, "backend"),
    ("backend-closed", lambda: opened().backend_closed(), CloseKind.BACKEND_CLOSED, "backend"),
    ("backend-ptype", _backend_speaks_client, CloseKind.BACKEND_PROTOCOL_ERROR, "backend"),
    ("pdu-too-large", _pdu_too_large, CloseKind.PDU_TOO_LARGE, "backend"),
    ("recycle-timeout", _recycle_timeout, CloseKind.RECYCLE_TIMEOUT, "timeout"),
    ("client-closed", lambda: opened().channel_closed(IN), CloseKind.CLIENT_CLOSED,
     "client_closed"),
    ("shutdown", lambda: opened().close("server shutting down"), CloseKind.SHUTDOWN,
     "shutdown"),
    ("client-ptype", _client_rpc_type, CloseKind.PROTOCOL_ERROR, "protocol_error"),
    ("channel-failed", _channel_failed, CloseKind.PROTOCOL_ERROR, "protocol_error"),
]


@pytest.mark.parametrize(("path", "kind", "label"), [p[1:] for p in CLOSE_PATHS],
                         ids=[p[0] for p in CLOSE_PATHS])
def test_vc_closed_says_how_in_a_code_and_the_metric_counts_the_code(
        path: Callable[[], list[Action]], kind: CloseKind, label: str) -> None:
    closed = path()[-1]
    assert isinstance(closed, VcClosed)
    assert closed.kind is kind
    metrics = ServerMetrics()
    metrics.vc_closed(closed.kind, 0, 0)
    # Reworded (or translated) prose: the same kind, the same metric.
    reworded = dataclasses.replace(closed, reason="ended, in other words")
    metrics.vc_closed(reworded.kind, 0, 0)
    assert metrics.vcs_closed[label] == 2
    assert sum(metrics.vcs_closed.values()) == 2
    assert metrics.pairing_timeouts == (2 if kind is CloseKind.PAIRING_TIMEOUT else 0)


def test_every_close_kind_has_a_metric_label() -> None:
    assert {classify_close(kind) for kind in CloseKind} == set(CLOSE_KINDS)


# --- the opening table (channels.judge_opening) ---------------------------------------------------

A1_BYTES = rts.conn_a1(VC, OUT_CK, rts.MAX_RECEIVE_WINDOW)
B1_BYTES = rts.conn_b1(VC, IN_CK, AG, keepalive_ms=300_000)
A3_BYTES = rts.out_r2_a3(VC, OUT_CK, OUT2_CK, rts.MAX_RECEIVE_WINDOW)
IN_A1_BYTES = rts.in_r2_a1(VC, IN_CK, IN2_CK)


@pytest.mark.parametrize(("method", "data", "length", "kind", "new"), [
    (Method.OUT, A1_BYTES, 76, rts.Kind.CONN_A1, True),
    (Method.OUT, A3_BYTES, 120, rts.Kind.OUT_R2_A3, False),
    (Method.IN, B1_BYTES, 0x20000, rts.Kind.CONN_B1, True),
    (Method.IN, B1_BYTES, 0x80000000, rts.Kind.CONN_B1, True),
    (Method.IN, IN_A1_BYTES, 0x40000000, rts.Kind.IN_R2_A1, False),
])
def test_judge_opening_accepts(method: Method, data: bytes, length: int, kind: rts.Kind,
                               new: bool) -> None:
    opening = judge_opening(method, length, data)
    assert (opening.method, opening.kind, opening.new_vc) == (method, kind, new)
    assert opening.vc_cookie == VC
    assert opening.pdu == rts.decode_rts(data)
    assert opening.body_left == length - len(data)


@pytest.mark.parametrize(("method", "data", "length", "message"), [
    (Method.OUT, A1_BYTES, 120, "CONN/A1 cannot open an RPC_OUT_DATA channel of Content-Length "
                                "120"),
    (Method.OUT, A3_BYTES, 76, "cannot open an RPC_OUT_DATA channel of Content-Length 76"),
    (Method.OUT, B1_BYTES, 76, "CONN/B1 cannot open an RPC_OUT_DATA channel"),
    (Method.OUT, A1_BYTES, 100, "RPC_OUT_DATA with Content-Length 100 (want 76 or 120)"),
    (Method.IN, A1_BYTES, 0x20000, "CONN/A1 cannot open an RPC_IN_DATA channel"),
    (Method.IN, rts.PING, 0x20000, "Ping cannot open an RPC_IN_DATA channel"),
    (Method.IN, B1_BYTES, 0x1FFFF, "RPC_IN_DATA with Content-Length 131071 (want 128 KiB"),
    (Method.IN, B1_BYTES, 0x80000001, "(want 128 KiB..2 GiB)"),
    (Method.IN, B1_BYTES[:-1], 0x20000, "RTS"),
    (Method.OUT, bytes(76), 76, "RTS"),
])
def test_judge_opening_refuses(method: Method, data: bytes, length: int, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        judge_opening(method, length, data)
    assert message in info.value.reason


def test_content_length_is_checked_before_the_body() -> None:
    check_content_length(Method.OUT, 76)
    check_content_length(Method.IN, 0x20000)
    with pytest.raises(ProtocolError, match="want 76 or 120"):
        check_content_length(Method.OUT, 0x20000)
    with pytest.raises(ProtocolError, match="want 128 KiB"):
        check_content_length(Method.IN, 76)


def test_first_pdu_length_is_bounded() -> None:
    assert first_pdu_length(B1_BYTES[:16]) == len(B1_BYTES)
    head = bytearray(B1_BYTES[:16])
    head[8:10] = (257).to_bytes(2, "little")
    with pytest.raises(ProtocolError, match="first PDU of a channel is 257 bytes long"):
        first_pdu_length(bytes(head))


# --- every sub-state named ------------------------------------------------------------------------


def test_backend_states() -> None:
    vc = new_vc()
    assert vc.backend is Backend.IDLE
    open_out(vc)
    assert vc.backend is Backend.CONNECTING
    vc.backend_up(0.0)
    assert vc.backend is Backend.UP
    early = new_vc()
    early.backend_up(0.0)
    assert early.backend is Backend.UP_UNASKED
    assert open_out(early) == [ConnectBackend()] and early.backend is Backend.UP


def test_out_recycle_states_a7_first() -> None:
    vc, _ = recycle_to_a2()
    assert vc.out_recycle is OutRecycle.A3_WAIT
    vc, _ = recycle_to_a6()
    assert vc.out_recycle is OutRecycle.A7_AND_C1_WAIT
    vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 4.0)
    assert vc.out_recycle is OutRecycle.C1_WAIT  # was "A7_C1W and old_out is None"
    vc.out_request_data(OUT2, rts.OUT_R2_C1, 5.0)
    assert vc.out_recycle is OutRecycle.NONE


def test_out_recycle_states_c1_first() -> None:
    vc, _ = recycle_to_a6()
    vc.out_request_data(OUT2, rts.OUT_R2_C1, 4.0)
    assert vc.out_recycle is OutRecycle.A7_WAIT
    vc.in_data(IN, rts.out_r2_a7(OUT2_CK), 5.0)
    assert vc.out_recycle is OutRecycle.NONE and vc.channels() == [OUT2, IN]


def test_in_recycle_states() -> None:
    vc = opened()
    assert vc.in_recycle is InRecycle.NONE
    join(vc, IN2, in_a1(), now=1.0)
    assert vc.in_recycle is InRecycle.PLUGGED
    join(vc, "in-3", in_a1(IN2_CK, b"K" * 16), now=1.0)
    assert vc.in_recycle is InRecycle.QUEUED
    vc.in_data(IN, rts.in_r2_a5(IN2_CK), 2.0)
    assert vc.in_recycle is InRecycle.PLUGGED and vc.in_ is not None
    assert vc.in_.channel == IN2
    vc.in_data(IN2, rts.in_r2_a5(b"K" * 16), 3.0)
    assert vc.in_recycle is InRecycle.NONE and vc.channels() == [OUT, "in-3"]


def test_fast_paths_is_a_setting_of_one_vc_not_of_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = opened(VcSettings(fast_paths=False))
    fast = opened()
    calls: list[str] = []

    def spy(fn: Callable[..., None], *args: object) -> list[Action]:
        calls.append(fn.__name__)
        return []

    monkeypatch.setattr(slow, "_run", spy)
    monkeypatch.setattr(fast, "_run", spy)
    assert fast.in_data(IN, rpc(PType.REQUEST, 64), 1.0) == [
        SendToBackend(rpc(PType.REQUEST, 64))]
    slow.in_data(IN, rpc(PType.REQUEST, 64), 1.0)
    assert calls == ["_in_data"]
