"""The HTTP bytes rpcproxy writes itself, and the method and path names of RPC over HTTP v2.

Once a channel's transport is taken from aiohttp, nothing formats HTTP for us: the
``200 Success`` head of an OUT channel and the ``503 RPC Error`` of a refusal are written
here (the error status line is [MS-RPCH] 2.1.2.1.3). Before the hand-over the same
refusal goes out through aiohttp (``rpc_error_response``), with the same status and body.
"""

from __future__ import annotations

from aiohttp import web

from ntlm.http_auth import Challenge, Denied
from rpcproxy.errors import RpcProxyError

RPC_IN_DATA = "RPC_IN_DATA"
RPC_OUT_DATA = "RPC_OUT_DATA"
RPC_CONNECT = "RPC_CONNECT"  # RPC over HTTP v1: not supported
PATHS = ("/rpc/rpcproxy.dll", "/rpcwithcert/rpcproxy.dll")

ECHO_MAX_BODY = 16  # [MS-RPCH] 2.1.2.1.5: an echo request carries at most this much


def error_status(error: RpcProxyError) -> str:
    return f"RPC Error: {error.rpc_error:X}"


def error_body(error: RpcProxyError) -> str:
    return f"{error_status(error)}: {error.reason}\r\n"


def rpc_error_response(error: RpcProxyError) -> web.Response:
    """``503 RPC Error: <hex>`` ([MS-RPCH] 2.1.2.1.3) with the reason as body; closes."""
    resp = web.Response(status=503, reason=error_status(error), text=error_body(error))
    resp.force_close()
    return resp


def raw_error_response(error: RpcProxyError) -> bytes:
    """``503 RPC Error`` written straight to a transport that aiohttp no longer owns."""
    body = error_body(error).encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 503 {error_status(error)}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def success_head(content_length: int) -> bytes:
    """The head of an OUT channel's response; its RTS and RPC PDUs are the body."""
    return (b"HTTP/1.1 200 Success\r\nContent-Type: application/rpc\r\n"
            b"Content-Length: %d\r\nCache-Control: private\r\n\r\n" % content_length)


def unauthorized_response(outcome: Challenge | Denied) -> web.Response:
    """The ``401`` of a login that is not (yet) accepted, with the authenticator's offers
    (``WWW-Authenticate``): the same for a channel request and for Autodiscover."""
    text = ("authentication failed\r\n" if isinstance(outcome, Denied)
            else "authentication required\r\n")
    resp = web.Response(status=401, text=text)
    for value in outcome.www_authenticate:
        resp.headers.add("WWW-Authenticate", value)
    return resp
