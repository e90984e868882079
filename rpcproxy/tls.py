"""A lean server-side TLS transport: what a held TLS channel costs beyond a plain one.

Theory of operation. The listener accepts plain TCP and takes the accepted socket from
its first transport before a byte is read; each connection then gets one
``TlsConnection``, an ``asyncio.Transport`` that runs OpenSSL directly on the socket (an
``ssl.SSLSocket`` in non-blocking mode, watched with ``add_reader`` / ``add_writer``):

* handshake: ``do_handshake`` runs whenever the socket is readable (or writable, if
  OpenSSL asked to write). Only once it has completed is the application protocol made
  and given this transport (``connection_made``), as asyncio's own TLS transports do. A
  handshake that is not done within ``handshake_timeout`` or fails closes the connection
  with one report (``handshake_timed_out`` / ``handshake_failed``);
* reading: OpenSSL reads the records from the socket itself and decrypts each into a new
  bytes object; what one readable event brought (at most ``READ_BATCH`` bytes in at most
  ``READ_RECORDS`` records, so that no client holds the loop) goes to the application in
  one ``data_received``. A TLS close_notify, or a TCP end without it, is
  ``eof_received``. ``pause_reading`` stops watching the socket;
* writing: ``write`` hands the plaintext to OpenSSL, which encrypts and sends it record by
  record, ``WRITE_CHUNK`` at a time. When the socket is full, OpenSSL wants the same write
  again once it is writable (it keeps the records it made): that chunk is kept, the rest
  and later writes queue behind it, and the queue drives the application's
  ``pause_writing`` / ``resume_writing`` at the write buffer limits;
* ``close`` sends close_notify once the queue is written (or aborts after
  ``CLOSE_TIMEOUT`` if the client never reads it) and closes the socket; ``abort`` closes
  it at once. ``connection_lost`` reaches the application exactly once. A callback of the
  application that raises is logged and the connection aborted, as asyncio's transports do.

Why the socket and not memory BIOs (``ssl.MemoryBIO``, as the event loop's TLS transports
use): a memory BIO keeps the largest burst it ever held, so a channel that once carried a
64 KiB PDU keeps about 40 KiB of BIO buffers for the rest of its life, and uvloop's and
asyncio's transports add a 256 KiB read buffer per connection. Here nothing grows with
traffic: OpenSSL's own record buffers are released while idle (Python sets
``SSL_MODE_RELEASE_BUFFERS``), and what is left per connection is OpenSSL's session state
(about 14 KiB with OpenSSL 3.0, heaptrack) whatever the channel carried. The plaintext
also skips two copies on the way in and one on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rpcproxy")

RECORD = 16384  # the largest TLS plaintext record: what one SSL_read returns at most
READ_BATCH = 256 * 1024  # plaintext taken per readable event before other connections run
READ_RECORDS = 64  # and records: a client sending tiny records gets no more loop time
HIGH_WATER = 64 * 1024  # write queue limits (as asyncio's transports default to)
LOW_WATER = 16 * 1024
WRITE_CHUNK = 64 * 1024  # plaintext given to OpenSSL at a time: what waits there is bounded
CLOSE_TIMEOUT = 30.0  # a close whose queue the client never reads ends in an abort (asyncio's
# TLS transports: ssl_shutdown_timeout)


class TlsConnection(asyncio.Transport):
    """One server-side TLS connection on its own socket (see the module docstring)."""

    __slots__ = ("_loop", "_ctx", "_factory", "_sock", "_fd", "_app", "_timer",
                 "_handshake_timeout", "_peername", "_sockname", "_reading",
                 "_reader_on", "_writer_on", "_pending", "_queue", "_queued", "_paused",
                 "_high", "_low", "_read_wants_write", "_write_wants_read", "_lost_called",
                 "_closing", "_close_timer")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext,
                 app_factory: Callable[[], asyncio.BaseProtocol],
                 handshake_timeout: float) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._ctx = context
        self._factory: Callable[[], asyncio.BaseProtocol] | None = app_factory
        self._handshake_timeout = handshake_timeout
        self._app: asyncio.Protocol | None = None
        try:
            self._peername: Any = sock.getpeername()
            self._sockname: Any = sock.getsockname()
        except OSError:
            self._peername = self._sockname = None
        sock.setblocking(False)
        self._sock: ssl.SSLSocket | None = context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False)
        self._fd = self._sock.fileno()
        self._closing = False
        self._reading = True
        self._reader_on = False
        self._writer_on = False
        self._read_wants_write = False  # SSL_read must be called again once writable
        self._write_wants_read = False  # the kept write must be given again once readable
        self._lost_called = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._pending: bytes | None = None  # the write OpenSSL must be given again
        self._queue: list[bytes] = []  # writes behind it
        self._queued = 0
        self._paused = False
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            handshake_timeout, self._handshake_expired)
        self._watch_reading(True)  # the ClientHello wakes _handshake

    # ---- reports and hooks (the guard overrides them) ------------------------------------

    def closed(self) -> None:
        """The socket was closed (handshake done or not)."""

    def _peer(self) -> str:
        peer = self._peername
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def handshake_timed_out(self) -> None:
        """The handshake was not done in time (the connection is then aborted)."""
        log.info("TLS handshake from %s not done within %gs; closed", self._peer(),
                 self._handshake_timeout)

    def handshake_failed(self, reason: str) -> None:
        """The handshake failed (the connection is then aborted)."""
        log.info("TLS handshake from %s failed: %s", self._peer(), reason)

    def tls_failed(self, what: str, reason: str) -> None:
        """A TLS error after the handshake (the connection is then aborted)."""
        log.info("TLS %s %s: %s; closed", what, self._peer(), reason)

    # ---- the socket ----------------------------------------------------------------------

    def _watch_reading(self, on: bool) -> None:
        if on and not self._reader_on and self._sock is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reader_on = True
        elif not on and self._reader_on:
            self._loop.remove_reader(self._fd)
            self._reader_on = False

    def _watch_writing(self, on: bool) -> None:
        if on and not self._writer_on and self._sock is not None:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer_on = True
        elif not on and self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False

    def _on_readable(self) -> None:
        if self._factory is not None:
            self._handshake()
            return
        if self._write_wants_read:
            self._write_wants_read = False
            self._flush()
        self._read()

    def _on_writable(self) -> None:
        if self._factory is not None:
            self._handshake()
            return
        if self._read_wants_write:
            self._read_wants_write = False
            self._watch_reading(self._reading and not self._closing)
            self._read()
        if self._sock is not None:
            self._flush()

    # ---- handshake -----------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._factory is not None:
            self.handshake_timed_out()
            self.abort()

    def _handshake(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch_writing(False)
            self._watch_reading(True)
            return
        except ssl.SSLWantWriteError:
            self._watch_reading(False)  # (a readable socket would only wake us for nothing)
            self._watch_writing(True)
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.handshake_failed(_reason(exc))
            _discard_input(sock)  # so that the close is a FIN after OpenSSL's alert, not a RST
            self.abort()
            return
        self._watch_writing(False)
        self._watch_reading(True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        factory, self._factory = self._factory, None
        assert factory is not None
        try:
            app = factory()
            self._app = app  # type: ignore[assignment]
            app.connection_made(self)
        except Exception:  # noqa: BLE001 - our bug, not the client's: said, and closed
            self._app_failed("connection_made")
            return
        if self._sock is not None and self._reading:
            self._read()  # application data that came with the client's Finished

    # ---- reading -------------------------------------------------------------------------

    def _read(self) -> None:
        sock = self._sock
        if sock is None or not self._reading or self._closing or self._read_wants_write:
            return
        chunks: list[bytes] = []
        size = 0
        eof = False
        records = 0
        try:
            while size < READ_BATCH and records < READ_RECORDS:
                records += 1
                chunk = sock.recv(RECORD)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
                size += len(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:  # e.g. answering a KeyUpdate into a full socket
            self._read_wants_write = True
            self._watch_reading(False)
            self._watch_writing(True)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            eof = True
        except ssl.SSLError as exc:
            self._deliver(chunks)
            self.tls_failed("error from", _reason(exc))
            self.abort()
            return
        except OSError as exc:  # reset by the peer
            self._deliver(chunks)
            self._lose(exc)
            return
        self._deliver(chunks)
        if ((size >= READ_BATCH or records >= READ_RECORDS) and not eof
                and self._sock is not None and self._reading):
            self._loop.call_soon(self._read)  # more may sit inside OpenSSL: go on soon
        if eof and self._sock is not None:
            self._eof()

    def _eof(self) -> None:
        """The client's end of data: TLS has no half-close, so the connection closes whatever
        the application's ``eof_received`` answers."""
        self._watch_reading(False)
        app = self._app
        if app is not None:
            try:
                app.eof_received()
            except Exception:  # noqa: BLE001
                self._app_failed("eof_received")
                return
        self.close()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self._app is not None and not self._closing:
            try:
                self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except Exception:  # noqa: BLE001
                self._app_failed("data_received")

    def _app_failed(self, what: str) -> None:
        """The application raised from a callback: our defect, logged with its traceback;
        the connection is aborted (as asyncio's transports do) instead of left half-alive."""
        log.exception("TLS connection from %s: the application's %s failed; closed",
                      self._peer(), what)
        self.abort()

    # ---- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._sock is None or not data:
            return
        if self._pending is not None:
            self._queue.append(bytes(data))
            self._queued += len(data)
            self._check_high()
            return
        self._send_all(data)

    def writelines(self, list_of_data: Any) -> None:
        chunks = list(list_of_data)
        if chunks:
            self.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _send_all(self, data: bytes | bytearray | memoryview) -> bool:
        """Give ``data`` to OpenSSL ``WRITE_CHUNK`` at a time; False if the socket filled up:
        the chunk it refused is kept (``_pending``) and the rest queued behind it."""
        if len(data) <= WRITE_CHUNK:  # (most writes: no slicing, and a refused bytes is kept)
            return self._send(data)
        view = memoryview(data)
        for pos in range(0, len(view), WRITE_CHUNK):
            if not self._send(view[pos:pos + WRITE_CHUNK]):
                rest = view[pos + WRITE_CHUNK:]
                if len(rest) and self._sock is not None:  # (None: it was aborted)
                    self._queue.insert(0, bytes(rest))
                    self._queued += len(rest)
                    self._check_high()
                return False
        return True

    def _send(self, data: bytes | bytearray | memoryview) -> bool:
        """Give ``data`` to OpenSSL; False if it must be given again (socket full)."""
        sock = self._sock
        assert sock is not None
        try:
            sock.send(data)  # all of it, or nothing yet (no partial writes)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
            self._pending = data if isinstance(data, bytes) else bytes(data)
            if isinstance(exc, ssl.SSLWantReadError):  # (no renegotiation: not expected)
                self._write_wants_read = True  # again once readable
                self._watch_reading(True)
            else:
                self._watch_writing(True)
            self._check_high()
            return False
        except ssl.SSLError as exc:
            self.tls_failed("write to", _reason(exc))
            self.abort()
            return False
        except OSError as exc:
            self._lose(exc)
            return False
        return True

    def _flush(self) -> None:
        """The socket is writable (or readable, if OpenSSL asked): the kept write again,
        then the queue."""
        while self._sock is not None:
            pending = self._pending
            if pending is not None:
                self._pending = None
                if not self._send(pending):
                    return
                continue
            if not self._queue:
                break
            data = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
            self._queue.clear()
            self._queued = 0
            if not self._send_all(data):
                return
        if self._sock is None:
            return
        self._watch_writing(self._read_wants_write)
        self._check_low()
        if self._closing:
            self._finish_close()

    def _buffered(self) -> int:
        pending = self._pending
        return self._queued + (len(pending) if pending is not None else 0)

    def _check_high(self) -> None:
        if not self._paused and self._buffered() > self._high and self._app is not None:
            self._paused = True
            try:
                self._app.pause_writing()
            except Exception:  # noqa: BLE001
                self._app_failed("pause_writing")

    def _check_low(self) -> None:
        if self._paused and self._buffered() <= self._low and self._app is not None:
            self._paused = False
            try:
                self._app.resume_writing()
            except Exception:  # noqa: BLE001
                self._app_failed("resume_writing")

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    def get_write_buffer_size(self) -> int:
        return self._buffered()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    # ---- closing -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._watch_reading(False)
        if self._pending is None:
            self._finish_close()
        else:  # _flush finishes it once the queue is written, or this timer does not
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)

    def _finish_close(self) -> None:
        sock = self._sock
        if sock is not None and self._factory is None:
            try:
                sock.unwrap()  # close_notify; the peer's is not waited for
            except (ssl.SSLError, OSError, ValueError):
                pass
        self._lose(None)

    def abort(self) -> None:
        self._closing = True
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        """Close the socket now; the application hears of it once, soon."""
        self._closing = True
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._close_timer = None
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._watch_reading(False)
        self._watch_writing(False)
        self._pending = None
        self._queue.clear()
        self._queued = 0
        sock.close()
        self._factory = None
        self.closed()
        if self._app is not None:
            self._loop.call_soon(self._call_lost, exc)

    def _call_lost(self, exc: Exception | None) -> None:
        app, self._app = self._app, None
        if app is not None and not self._lost_called:
            self._lost_called = True
            try:
                app.connection_lost(exc)
            except Exception:  # noqa: BLE001 - our defect: said with its traceback
                log.exception("TLS connection from %s: the application's connection_lost "
                              "failed", self._peer())

    def is_closing(self) -> bool:
        return self._closing

    # ---- the rest of asyncio.Transport ---------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name == "peername":
            return self._peername
        if name == "sockname":
            return self._sockname
        if name == "sslcontext":
            return self._ctx
        if name in ("ssl_object", "socket"):
            return sock if sock is not None else default
        if sock is None:
            return default
        if name == "peercert":
            return sock.getpeercert()
        if name == "cipher":
            return sock.cipher()
        if name == "compression":
            return sock.compression()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[return-value]

    def pause_reading(self) -> None:
        self._reading = False
        self._watch_reading(False)

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        self._watch_reading(True)
        self._loop.call_soon(self._read)  # OpenSSL may hold a record already read

    def is_reading(self) -> bool:
        return self._reading and not self._closing


def _discard_input(sock: socket.socket) -> None:
    """Read and drop what the client already sent (bounded), below TLS."""
    try:
        socket.socket.recv(sock, READ_BATCH)
    except OSError:
        pass


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc) or type(exc).__name__
