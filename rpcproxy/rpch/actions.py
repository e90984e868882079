"""What the core tells the adapter to do, and why a virtual connection ended.

Every event method of ``rpcproxy.rpch.connection.VirtualConnection`` returns a list of
these actions; the adapter carries them out in order (an exhaustive ``match`` over
``Action``). They are final, frozen and slotted: plain records, no behaviour.

``VcClosed.kind`` (a ``CloseKind``) is the closed vocabulary other rooms use to tell how a
VC ended (metrics count it); ``VcClosed.reason`` is prose for the log line only, so
rewording a message never changes a metric.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass
from typing import final

from rpcproxy.errors import RpcProxyError

Channel = Hashable  # whatever the adapter uses to name one HTTP channel


class CloseKind(enum.Enum):
    """Why a virtual connection ended (one value per way the core ends one)."""

    CLIENT_CLOSED = "client_closed"  # the client ended a live channel (3.2.3.5.10)
    SHUTDOWN = "shutdown"  # torn down from outside: server shutdown, admin
    PAIRING_TIMEOUT = "pairing_timeout"  # the other channel of the pair never came
    BACKEND_TIMEOUT = "backend_timeout"  # both channels came, the backend connect did not finish
    BACKEND_UNREACHABLE = "backend_unreachable"  # the adapter gave up connecting the backend
    BACKEND_CLOSED = "backend_closed"  # the backend closed its connection
    BACKEND_PROTOCOL_ERROR = "backend_protocol_error"  # the backend sent what a server never does
    PDU_TOO_LARGE = "pdu_too_large"  # a backend PDU fits in no OUT channel (settings too small)
    RECYCLE_TIMEOUT = "recycle_timeout"  # a channel recycling sequence did not complete in time
    PROTOCOL_ERROR = "protocol_error"  # the client broke [MS-RPCH] or DCE/RPC rules


@final
@dataclass(frozen=True, slots=True)
class SendToClient:
    """Write these bytes (whole PDUs) on an OUT channel's response body."""

    channel: Channel
    data: bytes


@final
@dataclass(frozen=True, slots=True)
class StartResponse:
    """Write the OUT channel's ``200 Success`` status line and headers."""

    channel: Channel
    content_length: int


@final
@dataclass(frozen=True, slots=True)
class SendToBackend:
    data: bytes


@final
@dataclass(frozen=True, slots=True)
class ConnectBackend:
    pass


@final
@dataclass(frozen=True, slots=True)
class PauseBackend:
    pass


@final
@dataclass(frozen=True, slots=True)
class ResumeBackend:
    pass


@final
@dataclass(frozen=True, slots=True)
class CloseChannel:
    """Close one HTTP channel after what was already queued for it is written.

    ``error`` is set when the channel ends because of a failure; an adapter
    answers ``503 RPC Error`` with it if the channel's response has not
    started yet.
    """

    channel: Channel
    error: RpcProxyError | None = None


@final
@dataclass(frozen=True, slots=True)
class CloseBackend:
    pass


@final
@dataclass(frozen=True, slots=True)
class VcClosed:
    """The VC is finished; the adapter drops it from its registry.

    ``kind`` says why (for metrics and anything else that branches on it), ``reason`` is
    the same in words for the log, ``error`` is what the client's channels were told."""

    reason: str
    error: RpcProxyError | None
    kind: CloseKind


Action = (
    SendToClient
    | StartResponse
    | SendToBackend
    | ConnectBackend
    | PauseBackend
    | ResumeBackend
    | CloseChannel
    | CloseBackend
    | VcClosed
)
