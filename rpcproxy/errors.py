"""Exception hierarchy of the rpcproxy server package.

Every error carries a ``reason`` a log reader understands and, where it ends a
channel, the Windows error code the client gets in ``503 RPC Error: <hex>``.
The HTTP layer maps these to responses in one place (``rpcproxy.http_errors``).
"""

from __future__ import annotations

# Win32 error codes used in "RPC Error: <hex>" status lines ([MS-RPCH] 2.1.2.1.3).
ERROR_ACCESS_DENIED = 0x5
RPC_S_SERVER_UNAVAILABLE = 0x6BA
RPC_S_PROTOCOL_ERROR = 0x6C0
RPC_S_CALL_FAILED = 0x6BE
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


class ProtocolError(RpcProxyError):
    """The peer sent bytes that break DCE/RPC or [MS-RPCH] rules."""

    rpc_error = RPC_S_PROTOCOL_ERROR


class TargetRefused(RpcProxyError):
    """The ``server:port`` the client asked for is not on the allow-list."""

    rpc_error = RPC_S_SERVER_UNAVAILABLE


class BackendUnavailable(RpcProxyError):
    """The DCE/RPC backend could not be reached or went away."""

    rpc_error = RPC_S_SERVER_UNAVAILABLE


class ConfigError(RpcProxyError):
    """The configuration file or a flag is wrong."""
