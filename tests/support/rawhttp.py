"""A tiny blocking HTTP/1.1 client for exact status checks (NTLM via pyspnego).

Response heads are parsed by the one head reader of bench and tests (bench.http_head)."""

from __future__ import annotations

import base64
import socket

import spnego

from bench.client_auth import BasicAuth
from bench.http_head import parse_head


class RawResponse:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RawConnection:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send_request(self, method: str, path: str, headers: dict[str, str],
                     body: bytes = b"", content_length: int | None = None) -> None:
        cl = len(body) if content_length is None else content_length
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {cl}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before {marker!r}; got {self.buf[:200]!r}")
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed in a response body")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, *, body_limit: int = 1 << 16) -> RawResponse:
        head = parse_head(self._read_until(b"\r\n\r\n") + b"\r\n\r\n", "test request")
        resp = RawResponse(head.status, head.reason, head.headers, b"")
        length = head.content_length
        if length and head.status != 100:
            resp.body = self._read_exact(min(length, body_limit))
        return resp

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except TimeoutError:
            return False
        except OSError:
            return True


def ntlm_request(
    conn: RawConnection,
    method: str,
    path: str,
    user: str,
    password: str,
    *,
    content_length: int = 0,
    body: bytes = b"",
    extra: dict[str, str] | None = None,
) -> RawResponse:
    """NEGOTIATE (CL 0) -> 401 CHALLENGE -> AUTHENTICATE with the real request."""
    client = spnego.client(user, password, protocol="ntlm")
    t1 = client.step()
    assert t1 is not None
    conn.send_request(method, path, {"Authorization": "NTLM " + base64.b64encode(t1).decode()})
    first = conn.read_response()
    assert first.status == 401, (first.status, first.reason)
    challenge = [v for v in first.header("WWW-Authenticate") if v.startswith("NTLM ")]
    assert challenge, first.headers
    t3 = client.step(base64.b64decode(challenge[0][5:]))
    assert t3 is not None
    headers = {"Authorization": "NTLM " + base64.b64encode(t3).decode()}
    headers.update(extra or {})
    conn.send_request(method, path, headers, body, content_length=content_length)
    return conn.read_response()


def basic_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": BasicAuth(user, password).header()}
