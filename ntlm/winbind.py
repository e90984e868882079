"""NTLM verified by Samba's winbind: a pool of ``ntlm_auth`` helper processes.

Theory of operation: each helper is one ``ntlm_auth --helper-protocol=squid-2.5-ntlmssp``
process (the protocol is in ``ntlm.helper_protocol``), the same helper Squid and Apache's
mod_auth_ntlm_winbind use.  A helper judges one handshake at a time, so a handshake *holds* a
helper from the client's NEGOTIATE until the verdict (or until it is given up):

    begin(NEGOTIATE)       acquire a helper (queue)  YR -> TT CHALLENGE     handshake holds it
    complete(AUTHENTICATE) KK -> AF DOMAIN\\account  = Identity(account, DOMAIN)
                                 NA status          = AuthenticationFailed (401)
                                 BH / dead / late   = NtlmServerUnavailable (503)
    close()                the helper goes back to the pool (a new YR resets its state)

The pool starts helpers on demand up to ``size``; when all are busy a handshake *waits* for one
(first come, first served) up to ``queue_timeout`` instead of failing, so a reconnect storm
degrades into queueing.  Only a helper that cannot be had in time, or a winbind that gives no
verdict, is 503.  A helper that answers garbage, times out or exits is killed and replaced.

Rules kept from the earlier DCE/RPC relay of the tokens: Samba decides (the proxy never sees
a password hash); anonymous AUTHENTICATE messages and client-written names with NUL or
control characters are refused before they reach the helper; the identity is the account
winbind resolved.

What the helper needs from the host: winbindd running (on a Samba AD DC it is started by
``samba``; on a member server it is the ``winbind`` service), ``ntlm_auth`` (Debian package
``winbind``), and read access to winbindd's privileged pipe (Debian: group ``winbindd_priv``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
from collections.abc import Sequence

from . import helper_protocol as hp
from . import messages
from .basic import verify_password
from .errors import AuthenticationFailed, NtlmError, NtlmServerUnavailable, Refusal, Unreachable
from .verifier import Identity, check_client_name, parse_safe_authenticate

log = logging.getLogger(__name__)

DEFAULT_HELPER = ("ntlm_auth", "--helper-protocol=squid-2.5-ntlmssp")
PROBE_USER = "rpcproxy-probe-no-such-account"


class _Helper:
    """One running ntlm_auth process; ``ask`` sends one request line and reads one reply."""

    def __init__(self, proc: asyncio.subprocess.Process, argv0: str) -> None:
        self.proc = proc
        self.argv0 = argv0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=4)
        self.broken = False
        self.source: str | None = None  # whose handshake holds it (per-source bound)
        self._stderr_task = asyncio.get_running_loop().create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            return
        with contextlib.suppress(Exception):
            while True:
                line = await stream.readline()
                if not line:
                    return
                text = line.decode("utf-8", "replace").strip()
                if text:
                    self.stderr_tail.append(text[:200])
                    log.debug("%s: %s", self.argv0, text[:200])

    def diagnostics(self) -> str:
        return f" ({self.stderr_tail[-1]})" if self.stderr_tail else ""

    async def ask(self, request: hp.Request, token: bytes, timeout: float) -> hp.Reply:
        """Raises NtlmServerUnavailable (and marks the helper broken) on any trouble."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                self.proc.stdin.write(hp.encode_request(request, token))
                await self.proc.stdin.drain()
                line = await self.proc.stdout.readline()
        except TimeoutError:
            self.broken = True
            raise NtlmServerUnavailable(
                f"{self.argv0} gave no answer within {timeout:g} s{self.diagnostics()}"
            ) from None
        except asyncio.CancelledError:
            self.broken = True  # its answer would be read by the next handshake: replace it
            raise
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            self.broken = True
            raise NtlmServerUnavailable(f"{self.argv0} failed: {exc}") from None
        if not line:
            self.broken = True
            await asyncio.sleep(0)  # let the stderr drain catch the last words
            raise NtlmServerUnavailable(f"{self.argv0} exited{self.diagnostics()}")
        try:
            return hp.parse_reply(line)
        except hp.HelperProtocolError as exc:
            self.broken = True
            raise NtlmServerUnavailable(f"{self.argv0} answered garbage: {exc.reason}") from None

    @property
    def alive(self) -> bool:
        return not self.broken and self.proc.returncode is None

    def kill(self) -> None:
        self.broken = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self._stderr_task.cancel()

    async def reap(self) -> None:
        """Wait until the (killed) process is gone and its pipes are closed."""
        with contextlib.suppress(Exception):
            await self.proc.wait()
        with contextlib.suppress(BaseException):
            await self._stderr_task


class HelperPool:
    """At most ``size`` helper processes; waiters queue in order for up to ``queue_timeout``."""

    def __init__(
        self,
        argv: Sequence[str] = DEFAULT_HELPER,
        *,
        size: int = 32,
        queue_timeout: float = 15.0,
        start_timeout: float = 10.0,
        env: dict[str, str] | None = None,
        per_source: int | None = None,
    ) -> None:
        if not argv:
            raise ValueError("the NTLM helper command is empty")
        if size < 1:
            raise ValueError("the NTLM helper pool needs at least one helper")
        self.argv = list(argv)
        self.size = size
        self.queue_timeout = queue_timeout
        self.start_timeout = start_timeout
        self.env = env
        self.per_source = per_source  # helpers one source may hold at once (None: any)
        self._idle: list[_Helper] = []
        self._count = 0  # helpers running or starting
        self._busy = 0
        self._waiters: collections.deque[
            tuple[asyncio.Future[_Helper | None], str | None]] = collections.deque()
        self._held: collections.Counter[str] = collections.Counter()  # helpers per source
        self.started = 0  # helper processes started over the pool's life
        self.queued = 0  # acquisitions that had to wait
        self.queue_timeouts = 0
        self.closed = False
        self._dead: list[_Helper] = []  # killed, maybe not reaped yet

    def __repr__(self) -> str:
        return f"HelperPool({self.argv[0]}, {self._count}/{self.size})"

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def _spawn(self) -> _Helper:
        name = os.path.basename(self.argv[0])
        try:
            async with asyncio.timeout(self.start_timeout):
                proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=self.env,
                    limit=hp.MAX_LINE + 2,
                    start_new_session=True,
                )
        except TimeoutError:
            raise NtlmServerUnavailable(f"starting {name} timed out") from None
        except OSError as exc:
            raise NtlmServerUnavailable(
                f"cannot start the NTLM helper {self.argv[0]!r}: {exc.strerror or exc}"
            ) from None
        self.started += 1
        return _Helper(proc, name)

    def _may_hold(self, source: str | None) -> bool:
        return source is None or self.per_source is None or self._held[source] < self.per_source

    def _claim(self, source: str | None) -> None:
        """``source`` is granted a helper (or a slot to start one) now: it counts against
        its share from this moment, so grants made before the helper is in its hands
        (a spawn under way, a hand-off to a waiter) cannot take it past ``per_source``."""
        if source is not None:
            self._held[source] += 1

    def _unclaim(self, source: str | None) -> None:
        if source is not None:
            self._held[source] -= 1
            if self._held[source] <= 0:
                del self._held[source]

    def _held_by(self, helper: _Helper, source: str | None) -> _Helper:
        """The claimed helper is in the hands of ``source``'s handshake."""
        self._busy += 1
        helper.source = source
        return helper

    async def _start_claimed(self, source: str | None) -> _Helper:
        try:
            return self._held_by(await self._start_one(), source)
        except BaseException:
            self._unclaim(source)
            raise

    async def acquire(self, source: str | None = None) -> _Helper:
        """A helper for one handshake; NtlmServerUnavailable when none can be had in time.

        ``source`` (the client's address key, None: not bounded per source) may hold at most
        ``per_source`` helpers at once; beyond that it waits, whatever is idle."""
        if self.closed:
            raise NtlmServerUnavailable("the NTLM helper pool is closed")
        if self._may_hold(source):
            while self._idle:
                helper = self._idle.pop()
                if helper.alive:
                    self._claim(source)
                    return self._held_by(helper, source)
                self._forget(helper)
            if self._count < self.size:
                self._claim(source)
                return await self._start_claimed(source)
        self.queued += 1
        waiter: asyncio.Future[_Helper | None] = asyncio.get_running_loop().create_future()
        entry = (waiter, source)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.queue_timeout):
                handed = await waiter
        except BaseException as exc:
            self._return_unclaimed(waiter, source)
            if not isinstance(exc, TimeoutError):
                raise  # cancelled: the client went away while waiting
            self.queue_timeouts += 1
            busy = ("this address's share of" if not self._may_hold(source)
                    else f"all {self.size}")
            raise NtlmServerUnavailable(
                f"{busy} NTLM helpers stayed busy for {self.queue_timeout:g} s",
                Unreachable.HELPERS_BUSY,
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        if handed is None:  # a slot was freed by a dead helper: start a new one in it
            self._count -= 1
            return await self._start_claimed(source)
        return self._held_by(handed, source)

    def _return_unclaimed(self, waiter: asyncio.Future[_Helper | None],
                          source: str | None) -> None:
        """A waiter gave up (timeout, cancellation) just as it was handed a helper or a
        slot: give back its claim and pass what it was handed on, so nothing is lost."""
        if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
            return
        self._unclaim(source)
        handed = waiter.result()
        if handed is None:
            self._count -= 1  # the reserved slot
            self._wake_for_slot()
        else:
            self._busy += 1  # release() counts it back down
            self.release(handed)

    async def _start_one(self) -> _Helper:
        self._count += 1
        try:
            helper = await self._spawn()
        except BaseException:
            self._count -= 1
            self._wake_for_slot()
            raise
        return helper

    def _next_waiter(self) -> asyncio.Future[_Helper | None] | None:
        """The first waiter whose source may hold one more helper (it leaves the queue)."""
        for entry in list(self._waiters):
            waiter, source = entry
            if waiter.done():
                self._waiters.remove(entry)
            elif self._may_hold(source):
                self._waiters.remove(entry)
                self._claim(source)  # the caller hands it a helper or a slot at once
                return waiter
        return None

    def release(self, helper: _Helper) -> None:
        """Give a helper back; a broken one is killed and its slot offered to a waiter."""
        self._busy -= 1
        source, helper.source = helper.source, None
        self._unclaim(source)
        if not helper.alive or self.closed:
            self._forget(helper)
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(helper)
            return
        self._idle.append(helper)

    def _forget(self, helper: _Helper) -> None:
        helper.kill()
        self._dead.append(helper)
        if len(self._dead) > 64:  # reaped ones go; the rest are collected by aclose()
            self._dead = [h for h in self._dead if h.proc.returncode is None]
        self._count -= 1
        self._wake_for_slot()

    def _wake_for_slot(self) -> None:
        """A slot is free: the first waiter that may take it starts a helper in it."""
        waiter = self._next_waiter()
        if waiter is not None:
            self._count += 1  # reserved for the waiter, which undoes this and starts one
            waiter.set_result(None)

    def close(self) -> None:
        """Kill every idle helper and refuse new handshakes; busy ones die when released."""
        self.closed = True
        for helper in self._idle:
            helper.kill()
            self._dead.append(helper)
        self._count -= len(self._idle)
        self._idle.clear()
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(NtlmServerUnavailable("the NTLM helper pool is closed"))

    async def aclose(self) -> None:
        """``close``, then wait until every killed helper is reaped."""
        self.close()
        dead, self._dead = self._dead, []
        await asyncio.gather(*(helper.reap() for helper in dead))


class WinbindHandshake:
    """A handshake between CHALLENGE and AUTHENTICATE, holding one helper of the pool."""

    def __init__(self, pool: HelperPool, helper: _Helper, challenge: bytes, domain: str,
                 reply_timeout: float) -> None:
        self._pool = pool
        self._helper: _Helper | None = helper
        self.challenge = challenge
        self.domain = domain  # the NetBIOS domain the CHALLENGE announced
        self._reply_timeout = reply_timeout

    @property
    def closed(self) -> bool:
        return self._helper is None

    def close(self) -> None:
        helper, self._helper = self._helper, None
        if helper is not None:
            self._pool.release(helper)

    async def complete(self, authenticate: bytes) -> Identity:
        """The identity winbind accepted; the helper goes back to the pool in every case."""
        try:
            helper = self._helper
            if helper is None:
                raise AuthenticationFailed("NTLM handshake already completed or closed",
                                           Refusal.OUT_OF_ORDER)
            parse_safe_authenticate(authenticate)
            reply = await helper.ask(hp.Request.AUTHENTICATE, authenticate, self._reply_timeout)
            return self._verdict(helper, reply)
        finally:
            self.close()

    def _verdict(self, helper: _Helper, reply: hp.Reply) -> Identity:
        if reply.kind is hp.ReplyKind.ACCEPTED:
            try:
                domain, user = hp.split_account(reply.text, self.domain)
            except hp.HelperProtocolError as exc:
                helper.broken = True
                raise NtlmServerUnavailable(f"winbind accepted, but {exc.reason}") from None
            return Identity(user=user, domain=domain)
        status = reply.text.split(" ", 1)[0] if reply.text else "(no status)"
        if reply.kind is hp.ReplyKind.REJECTED:
            if status in hp.UNAVAILABLE_STATUSES:
                raise NtlmServerUnavailable(f"winbind could not judge the logon: {status}")
            raise AuthenticationFailed(f"winbind rejected the credentials: {status}",
                                       Refusal.BAD_CREDENTIALS)
        helper.broken = True  # BH, or a second TT: start over with a fresh helper
        if reply.kind is hp.ReplyKind.BROKEN:
            raise NtlmServerUnavailable(
                f"winbind gave no verdict: {reply.text or '(no reason)'}{helper.diagnostics()}"
            )
        raise NtlmServerUnavailable(f"NTLM helper answered {reply.kind.value} to AUTHENTICATE")


class WinbindVerifier:
    """The proxy's NTLM verifier: handshakes judged by winbind through a helper pool."""

    def __init__(self, pool: HelperPool | None = None, *, reply_timeout: float = 10.0) -> None:
        self.pool = pool or HelperPool()
        self.reply_timeout = reply_timeout

    def __repr__(self) -> str:
        return f"WinbindVerifier({self.pool!r})"

    async def begin(self, negotiate: bytes, source: str | None = None) -> WinbindHandshake:
        """Relay the client's NEGOTIATE; the handshake carries winbind's CHALLENGE."""
        try:
            parsed = messages.parse_negotiate(negotiate)
        except NtlmError as exc:
            raise AuthenticationFailed(f"malformed NTLM NEGOTIATE: {exc.reason}") from None
        check_client_name(parsed.domain, "NTLM NEGOTIATE domain name")
        check_client_name(parsed.workstation, "NTLM NEGOTIATE workstation name")
        helper = await self.pool.acquire(source)
        try:
            reply = await helper.ask(hp.Request.NEGOTIATE, negotiate, self.reply_timeout)
            if reply.kind is not hp.ReplyKind.CHALLENGE:
                helper.broken = True
                raise NtlmServerUnavailable(
                    f"NTLM helper answered the NEGOTIATE with {reply.kind.value} "
                    f"{reply.text[:80]}{helper.diagnostics()}"
                )
            try:
                challenge = messages.parse_challenge(reply.token)
                domain = challenge.nb_domain_name or challenge.target_name
            except NtlmError as exc:
                helper.broken = True
                raise NtlmServerUnavailable(
                    f"NTLM helper sent no usable CHALLENGE: {exc.reason}"
                ) from None
        except BaseException:
            self.pool.release(helper)
            raise
        return WinbindHandshake(self.pool, helper, reply.token, domain.upper(),
                                self.reply_timeout)

    async def probe(self) -> None:
        """Prove that winbind gives verdicts: a helper starts, and a logon of an account that
        does not exist (``PROBE_USER``) is *rejected* (NtlmServerUnavailable otherwise).

        ntlm_auth makes its CHALLENGE itself, so a CHALLENGE alone proves nothing about
        winbindd; only a verdict does."""
        try:
            await verify_password(self, PROBE_USER, secrets.token_urlsafe(16))
        except AuthenticationFailed:
            return

    def close(self) -> None:
        self.pool.close()

    async def aclose(self) -> None:
        await self.pool.aclose()
