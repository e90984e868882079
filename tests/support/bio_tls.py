"""A TLS client over memory BIOs on a blocking socket, so that a test decides which TLS
records leave in one send: a burst of tiny records, a PDU glued to a close_notify."""

from __future__ import annotations

import socket
import ssl


class BioTlsClient:
    """Connected and through its handshake once made; ``raw`` is the TCP socket."""

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext,
                 server_hostname: str) -> None:
        self.raw = socket.create_connection(address, timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.raw.sendall(self.outgoing.read())
                self.incoming.write(self.raw.recv(65536))
        self.raw.sendall(self.outgoing.read())

    def records(self, *chunks: bytes) -> bytes:
        """The TLS records of ``chunks`` (one record per chunk, at most 16 KiB each)."""
        for chunk in chunks:
            self.tls.write(chunk)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        """The close_notify alert's record (the peer's is not waited for)."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()
