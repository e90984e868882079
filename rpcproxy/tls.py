"""A lean server-side TLS transport: what a held TLS channel costs beyond a plain one.

Theory of operation. The listener accepts plain TCP; each connection gets one
``TlsConnection``, which is at once the protocol of the TCP transport and the transport
its application protocol (aiohttp's request handler, later a ``ChannelProtocol``) sees.
It runs OpenSSL through ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` objects:

* handshake: ciphertext from the socket goes into the incoming BIO, ``do_handshake``
  runs, whatever OpenSSL wrote to the outgoing BIO goes to the socket. Only once the
  handshake has completed is the application protocol made and given this transport
  (``connection_made``), as asyncio's own TLS transports do. A handshake that is not done
  within ``handshake_timeout`` or fails closes the connection with one log line;
* reading: ciphertext is fed to the incoming BIO in pieces of at most one TLS record, and
  each piece is decrypted into one buffer shared by every connection of the process, so
  neither BIO ever grows beyond about two records; the plaintext of one socket read goes
  to the application in one ``data_received``. A TLS close_notify is ``eof_received``;
* writing: plaintext is encrypted one record at a time, each record taken out of the
  outgoing BIO at once; the records of one ``write`` go to the TCP transport together (one
  ``writelines``), which does the buffering and the write flow control (``pause_writing``
  / ``resume_writing`` are passed through);
* ``close`` sends close_notify and closes the TCP transport once its buffer is written.

Why not the event loop's TLS transport (``create_server(ssl=...)``): uvloop's keeps a
256 KiB read buffer per connection, and its memory BIOs grow to the largest burst a
channel ever carried and stay that size; asyncio's allocates a 256 KiB bytearray per
connection. A proxy holding thousands of mostly idle long-lived channels pays that per
channel. What is left here per connection is OpenSSL's own state (about 20 KiB with
OpenSSL 3.0, buffers released while idle: Python sets ``SSL_MODE_RELEASE_BUFFERS``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("rpcproxy")

RECORD = 16384  # the largest TLS plaintext record
PIECE = RECORD + 512  # ciphertext fed to OpenSSL at a time: one full record and its framing
_PLAIN = bytearray(RECORD + 1024)  # decrypted records land here (one event loop a process)
_PLAIN_VIEW = memoryview(_PLAIN)


class TlsConnection(asyncio.Protocol, asyncio.Transport):
    """One server-side TLS connection (see the module docstring)."""

    __slots__ = ("_ctx", "_factory", "_raw", "_app", "_incoming", "_outgoing", "_sslobj",
                 "_timer", "_closing", "_reading", "_handshake_timeout")

    def __init__(self, context: ssl.SSLContext, app_factory: Callable[[], asyncio.BaseProtocol],
                 handshake_timeout: float) -> None:
        super().__init__()
        self._ctx = context
        self._factory: Callable[[], asyncio.BaseProtocol] | None = app_factory
        self._handshake_timeout = handshake_timeout
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._reading = True

    # ---- as the TCP transport's protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self._sslobj = self._ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._timer = asyncio.get_running_loop().call_later(
            self._handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self._factory is not None:
            self._handshake(data)
        elif self._app is not None and self._sslobj is not None:
            self._decrypt(data)

    def eof_received(self) -> bool | None:
        app = self._app
        if app is None:  # a client that left during the handshake
            self.abort()
            return True
        if not app.eof_received():
            self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = True
        app, self._app = self._app, None
        self._factory = None
        self._sslobj = None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # ---- TLS -----------------------------------------------------------------------------

    def _peer(self) -> str:
        peer = self._raw.get_extra_info("peername") if self._raw is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._factory is not None:
            self.handshake_timed_out()
            self.abort()

    def handshake_timed_out(self) -> None:
        """The handshake was not done in time (the connection is then aborted)."""
        log.info("TLS handshake from %s not done within %gs; closed", self._peer(),
                 self._handshake_timeout)

    def handshake_failed(self, reason: str) -> None:
        """The handshake failed (the connection is then aborted)."""
        log.info("TLS handshake from %s failed: %s", self._peer(), reason)

    def _handshake(self, data: bytes) -> None:
        sslobj = self._sslobj
        assert sslobj is not None
        pos, end = 0, len(data)
        try:
            while True:  # a record at a time here too: the BIO stays small
                self._incoming.write(data[pos:pos + PIECE])
                pos += PIECE
                try:
                    sslobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if pos >= end:
                        self._flush()
                        return
        except (ssl.SSLError, ValueError) as exc:
            self._flush()  # OpenSSL's alert, if it wrote one
            self.handshake_failed(str(getattr(exc, "reason", None) or exc))
            self.abort()
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        factory, self._factory = self._factory, None
        assert factory is not None
        app = factory()
        self._app = app  # type: ignore[assignment]
        app.connection_made(self)
        if (pos < end or self._incoming.pending) and self._app is not None:
            self._decrypt(data[pos:])  # application data that came with the client's Finished

    def _decrypt(self, data: bytes) -> None:
        """Feed ``data`` to OpenSSL a record at a time; deliver the plaintext at once."""
        sslobj, incoming = self._sslobj, self._incoming
        assert sslobj is not None
        chunks: list[bytes] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        eof = False
        try:
            while True:
                if pos < end:
                    incoming.write(view[pos:pos + PIECE])
                    pos += PIECE
                while True:
                    try:
                        n = cast(int, sslobj.read(len(_PLAIN), _PLAIN))  # with a buffer: a count
                    except ssl.SSLWantReadError:
                        break
                    if not n:  # close_notify
                        eof = True
                        break
                    chunks.append(bytes(_PLAIN_VIEW[:n]))
                if eof or pos >= end:
                    break
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError as exc:
            log.info("TLS error from %s: %s; closed", self._peer(),
                     getattr(exc, "reason", None) or exc)
            self.abort()
            return
        finally:
            view.release()
        if self._outgoing.pending:  # e.g. a TLS 1.3 KeyUpdate answer
            self._flush()
        if chunks and self._app is not None:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof:
            self.eof_received()

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())

    # ---- as the application's transport --------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._sslobj is None:
            return
        sslobj, outgoing = self._sslobj, self._outgoing
        view = memoryview(data)
        records: list[bytes] = []
        try:
            for pos in range(0, len(view), RECORD):
                sslobj.write(view[pos:pos + RECORD])
                records.append(outgoing.read())  # the BIO never holds more than a record
        except ssl.SSLError as exc:
            log.info("TLS write to %s failed: %s; closed", self._peer(),
                     getattr(exc, "reason", None) or exc)
            self.abort()
            return
        finally:
            view.release()
        if self._raw is not None:
            self._raw.writelines(records)  # one writev for them all

    def writelines(self, list_of_data: Any) -> None:
        chunks = list(list_of_data)
        self.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._sslobj is not None and self._factory is None:
            try:
                self._sslobj.unwrap()  # close_notify; the peer's is not waited for
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._sslobj
        if name == "sslcontext":
            return self._ctx
        if name == "ssl_object":
            return sslobj
        if name == "peercert":
            return sslobj.getpeercert() if sslobj is not None else default
        if name == "cipher":
            return sslobj.cipher() if sslobj is not None else default
        if name == "compression":
            return sslobj.compression() if sslobj is not None else default
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[return-value]

    def pause_reading(self) -> None:
        self._reading = False
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._reading = True
        if self._raw is not None:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._reading and not self.is_closing()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        if self._raw is None:
            return (0, 0)
        return self._raw.get_write_buffer_limits()
