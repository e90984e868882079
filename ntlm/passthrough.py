"""NTLM pass-through: Samba judges the HTTP client's NTLM handshake.

Theory of operation: an HTTP client's NTLM handshake has three legs (NEGOTIATE, CHALLENGE,
AUTHENTICATE) spread over two HTTP requests on one TCP connection.  For each handshake the
proxy opens one TCP connection to a Samba DCE/RPC endpoint and relays the legs inside
DCE/RPC PDUs (see ntlm.dcerpc_auth):

    begin(NEGOTIATE)       connect, BIND(NEGOTIATE)            -> BIND_ACK(CHALLENGE)
    complete(AUTHENTICATE) ALTER_CONTEXT(AUTHENTICATE)         -> ALTER_CONTEXT_RESP = accepted
                                                               -> anything else     = rejected

The socket to Samba stays open between the two legs (the CHALLENGE is bound to it) and is
closed after the verdict, on ``close()`` or when the caller gives up.

Verdict rules (measured against Samba 4.17, see the shared samba notes):
* success is exactly an ALTER_CONTEXT_RESP with the matching call_id whose presentation
  context result is "acceptance";
* FAULT (Samba sends 0x721 rpc_s_sec_pkg_error for a wrong password), BIND_NAK, a closed
  connection, garbage, a wrong call_id or a reply timeout are ``AuthenticationFailed``;
* anonymous AUTHENTICATE messages are refused here without being sent (Samba accepts them);
* failing to reach Samba, or Samba not producing a CHALLENGE in time, is
  ``NtlmServerUnavailable``: no verdict was obtained, so it must not look like a bad password.

The identity comes from the AUTHENTICATE's user name (lower-cased, ``@realm`` dropped) and the
NetBIOS domain Samba announced in its CHALLENGE, and is only built after Samba accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from . import dcerpc_auth as rpc
from . import messages
from .errors import AuthenticationFailed, NtlmError, NtlmServerUnavailable

log = logging.getLogger(__name__)

BIND_CALL_ID = 1
ALTER_CONTEXT_CALL_ID = 2


@dataclass(frozen=True)
class Identity:
    """An authenticated user, normalised: ``user`` lower-case without ``@realm``,
    ``domain`` the upper-case NetBIOS domain name announced by the NTLM server."""

    user: str
    domain: str

    @property
    def principal(self) -> str:
        return f"{self.domain}\\{self.user}"

    def __str__(self) -> str:
        return self.principal


def normalise_user(user: str) -> str:
    """``TestUser`` / ``testuser@EXAMPLE.COM`` / ``EXAMPLE\\testuser`` -> ``testuser``."""
    user = user.strip()
    if "\\" in user:
        user = user.rsplit("\\", 1)[1]
    if "@" in user:
        user = user.split("@", 1)[0]
    return user.lower()


def _check_authenticate(token: bytes) -> messages.Authenticate:
    """Parse an AUTHENTICATE message and refuse anonymous ones (never sent to Samba)."""
    try:
        auth = messages.parse_authenticate(token)
    except NtlmError as exc:
        raise AuthenticationFailed(f"malformed NTLM AUTHENTICATE: {exc.reason}") from None
    if auth.is_anonymous:
        raise AuthenticationFailed("anonymous NTLM logon refused")
    if not normalise_user(auth.user):
        raise AuthenticationFailed("NTLM AUTHENTICATE has an empty user name")
    return auth


class _Channel:
    """One TCP connection to the DCE/RPC server, reading whole PDUs with a timeout."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pdus = rpc.PduReader()
        self.closed = False

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def read_pdu(self, timeout: float) -> rpc.Pdu:
        """Next PDU; raises TimeoutError, ConnectionError (on EOF) or rpc.ProtocolError."""
        async with asyncio.timeout(timeout):
            while True:
                pdu = self._pdus.next_pdu()
                if pdu is not None:
                    return pdu
                chunk = await self._reader.read(max(self._pdus.needed(), 4096))
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self._pdus.feed(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # The event loop may already be gone when this runs from a finaliser.
        with contextlib.suppress(RuntimeError):
            self._writer.close()


class PendingHandshake:
    """A handshake between CHALLENGE and AUTHENTICATE, holding its socket to the server."""

    def __init__(
        self,
        channel: _Channel,
        challenge: bytes,
        domain: str,
        *,
        interface: rpc.SyntaxId,
        auth_level: rpc.AuthLevel,
        reply_timeout: float,
        server: tuple[str, int],
    ) -> None:
        self._channel = channel
        self.challenge = challenge
        self.domain = domain
        self._interface = interface
        self._auth_level = auth_level
        self._reply_timeout = reply_timeout
        self._server = server
        self._used = False

    @property
    def closed(self) -> bool:
        return self._channel.closed

    def close(self) -> None:
        """Close the socket to the server (idempotent)."""
        self._channel.close()

    async def complete(self, authenticate: bytes) -> Identity:
        """Send the AUTHENTICATE in an ALTER_CONTEXT and return the identity Samba accepted.

        Raises AuthenticationFailed for anything but an accepting ALTER_CONTEXT_RESP.  The
        socket to the server is closed afterwards in every case.
        """
        try:
            if self._used or self._channel.closed:
                raise AuthenticationFailed("NTLM handshake already completed or closed")
            self._used = True
            auth = _check_authenticate(authenticate)
            await self._exchange(authenticate)
            identity = Identity(user=normalise_user(auth.user), domain=self.domain)
            log.debug("NTLM server %s:%d accepted %s", *self._server, identity)
            return identity
        finally:
            self.close()

    async def _exchange(self, authenticate: bytes) -> None:
        try:
            pdu_bytes = rpc.build_alter_context(
                ALTER_CONTEXT_CALL_ID, self._interface, authenticate, self._auth_level
            )
            await self._channel.send(pdu_bytes)
            pdu = await self._channel.read_pdu(self._reply_timeout)
        except TimeoutError:
            raise AuthenticationFailed("no verdict from the NTLM server in time") from None
        except (OSError, ConnectionError) as exc:
            raise AuthenticationFailed(f"NTLM server closed the connection: {exc}") from None
        except rpc.ProtocolError as exc:
            raise AuthenticationFailed(f"garbage from the NTLM server: {exc.reason}") from None
        if pdu.ptype == rpc.PType.FAULT:
            try:
                status = rpc.describe_status(rpc.parse_fault_status(pdu))
            except rpc.ProtocolError:
                status = "(unreadable)"
            raise AuthenticationFailed(f"NTLM server rejected the credentials: fault {status}")
        if pdu.ptype == rpc.PType.BIND_NAK:
            raise AuthenticationFailed("NTLM server rejected the credentials: BIND_NAK")
        if pdu.ptype != rpc.PType.ALTER_CONTEXT_RESP:
            raise AuthenticationFailed(f"unexpected PDU type {pdu.ptype} from the NTLM server")
        if pdu.call_id != ALTER_CONTEXT_CALL_ID:
            raise AuthenticationFailed(f"ALTER_CONTEXT_RESP with wrong call_id {pdu.call_id}")
        try:
            ack = rpc.parse_bind_ack(pdu)
        except rpc.ProtocolError as exc:
            raise AuthenticationFailed(f"garbage from the NTLM server: {exc.reason}") from None
        if not ack.results or ack.results[0][0] != rpc.ContextResult.ACCEPTANCE:
            raise AuthenticationFailed(f"NTLM server did not accept the context: {ack.results}")


class NtlmVerifier:
    """Opens NTLM handshakes against one DCE/RPC endpoint of the NTLM server (Samba)."""

    def __init__(
        self,
        server: tuple[str, int],
        *,
        connect_timeout: float = 5.0,
        reply_timeout: float = 10.0,
        interface: rpc.SyntaxId = rpc.MGMT_INTERFACE,
        auth_level: rpc.AuthLevel = rpc.AuthLevel.CONNECT,
    ) -> None:
        self.server = server
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.interface = interface
        self.auth_level = auth_level

    def __repr__(self) -> str:
        return f"NtlmVerifier({self.server[0]}:{self.server[1]})"

    async def _connect(self) -> _Channel:
        host, port = self.server
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise NtlmServerUnavailable(
                f"connecting to NTLM server {host}:{port} timed out"
            ) from None
        except OSError as exc:
            raise NtlmServerUnavailable(
                f"cannot connect to NTLM server {host}:{port}: {exc.strerror or exc}"
            ) from None
        return _Channel(reader, writer)

    async def _bind(self, channel: _Channel, token: bytes | None) -> rpc.BindAck:
        """BIND and wait for the BIND_ACK; server-side trouble is NtlmServerUnavailable."""
        host, port = self.server
        try:
            await channel.send(rpc.build_bind(BIND_CALL_ID, self.interface, token, self.auth_level))
            pdu = await channel.read_pdu(self.reply_timeout)
        except TimeoutError:
            raise NtlmServerUnavailable(
                f"NTLM server {host}:{port} did not answer the BIND"
            ) from None
        except (OSError, ConnectionError) as exc:
            raise NtlmServerUnavailable(
                f"NTLM server {host}:{port} dropped the connection during BIND: {exc}"
            ) from None
        except rpc.ProtocolError as exc:
            raise NtlmServerUnavailable(
                f"NTLM server {host}:{port} answered the BIND with garbage: {exc.reason}"
            ) from None
        if pdu.ptype == rpc.PType.BIND_NAK:
            try:
                reason = str(rpc.parse_bind_nak_reason(pdu))
            except rpc.ProtocolError:
                reason = "(unreadable)"
            raise AuthenticationFailed(f"NTLM server refused the BIND (BIND_NAK reason {reason})")
        if pdu.ptype != rpc.PType.BIND_ACK or pdu.call_id != BIND_CALL_ID:
            raise NtlmServerUnavailable(
                f"NTLM server {host}:{port} answered the BIND with ptype {pdu.ptype} "
                f"call_id {pdu.call_id}"
            )
        try:
            ack = rpc.parse_bind_ack(pdu)
        except rpc.ProtocolError as exc:
            raise NtlmServerUnavailable(f"malformed BIND_ACK: {exc.reason}") from None
        if not ack.results or ack.results[0][0] != rpc.ContextResult.ACCEPTANCE:
            raise NtlmServerUnavailable(
                f"NTLM server {host}:{port} does not serve the interface {self.interface.uuid} "
                f"(results {ack.results})"
            )
        return ack

    async def begin(self, negotiate: bytes) -> PendingHandshake:
        """Relay the client's NEGOTIATE; the returned handshake carries Samba's CHALLENGE."""
        try:
            messages.parse_negotiate(negotiate)
        except NtlmError as exc:
            raise AuthenticationFailed(f"malformed NTLM NEGOTIATE: {exc.reason}") from None
        channel = await self._connect()
        try:
            ack = await self._bind(channel, negotiate)
            challenge_token = ack.auth_token
            try:
                challenge = messages.parse_challenge(challenge_token)
                domain = challenge.nb_domain_name
            except NtlmError as exc:
                raise NtlmServerUnavailable(
                    f"NTLM server sent no usable CHALLENGE: {exc.reason}"
                ) from None
            if not domain:
                domain = challenge.target_name
            return PendingHandshake(
                channel,
                challenge_token,
                domain.upper(),
                interface=self.interface,
                auth_level=self.auth_level,
                reply_timeout=self.reply_timeout,
                server=self.server,
            )
        except BaseException:
            channel.close()
            raise

    async def probe(self) -> None:
        """Prove that an NTLM server answers: BIND with a dummy NEGOTIATE, expect a CHALLENGE."""
        handshake = None
        try:
            handshake = await self.begin(messages.build_negotiate())
        except AuthenticationFailed as exc:
            raise NtlmServerUnavailable(f"NTLM probe failed: {exc.reason}") from None
        finally:
            if handshake is not None:
                handshake.close()
