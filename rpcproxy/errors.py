"""Exception hierarchy of the rpcproxy server package.

Every error carries a ``reason`` a log reader understands and, where it ends a
channel, the Windows error code the client gets in ``503 RPC Error: <hex>``.
The HTTP adapter turns them into that status line; the sans-IO core carries
them in its ``CloseChannel``/``VcClosed`` actions.

``ProtocolError`` derives from ``dcerpc.pdu.FramingError``, the one "bytes that
break a wire rule" error of the DCE/RPC codec: ``except FramingError`` catches
both, and ``protocol_error()`` turns a bare ``FramingError`` from the codec into
the ``ProtocolError`` (with its RPC error code) the proxy's layers pass on.
``ConfigError`` is not an ``RpcProxyError``: no configuration mistake has an
RPC error code, and none ever reaches a client.
"""

from __future__ import annotations

from dcerpc.pdu import FramingError

# Win32 error codes used in "RPC Error: <hex>" status lines ([MS-RPCH] 2.1.2.1.3).
ERROR_ACCESS_DENIED = 0x5
RPC_S_SERVER_UNAVAILABLE = 0x6BA
RPC_S_PROTOCOL_ERROR = 0x6C0
RPC_S_SERVER_TOO_BUSY = 0x6BB


class RpcProxyError(Exception):
    """Base class: something ended a request, a channel or a virtual connection."""

    rpc_error: int = RPC_S_PROTOCOL_ERROR

    def __init__(self, reason: str, *, rpc_error: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if rpc_error is not None:
            self.rpc_error = rpc_error

    def __str__(self) -> str:
        return self.reason


class ProtocolError(RpcProxyError, FramingError):
    """The peer sent bytes that break DCE/RPC or [MS-RPCH] rules."""

    rpc_error = RPC_S_PROTOCOL_ERROR


def protocol_error(exc: FramingError) -> ProtocolError:
    """``exc`` as a ``ProtocolError``: itself if it is one, else one with the same reason."""
    return exc if isinstance(exc, ProtocolError) else ProtocolError(exc.reason)


class TargetRefused(RpcProxyError):
    """The ``server:port`` the client asked for is not on the allow-list."""

    rpc_error = RPC_S_SERVER_UNAVAILABLE


class BackendUnavailable(RpcProxyError):
    """The DCE/RPC backend could not be reached or went away."""

    rpc_error = RPC_S_SERVER_UNAVAILABLE


class ConfigError(Exception):
    """The configuration file or a flag is wrong (``reason`` says which and why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason
