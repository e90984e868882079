"""The process around the proxy: event loop, signals, systemd notification, reload, metrics.

Theory of operation
-------------------
``serve`` runs one ``ProxyProcess`` on uvloop. Its life:

1. start the ProxyServer listeners (and the metrics/health listener when configured);
   a failure here exits with status 1 when a retry may help (address in use), so
   systemd's ``Restart=on-failure`` applies, and with ``EXIT_CONFIG`` (78) when it cannot
   (unreadable certificate, port not allowed), which the unit's
   ``RestartPreventExitStatus=78`` turns into ``failed`` instead of a restart loop;
2. ``READY=1`` to systemd (sd_notify, see ``rpcproxy.sdnotify``), then serve;
3. ``SIGHUP``: reload. The configuration file is read again and the command-line
   overrides re-applied, exactly as at start. Everything is checked before anything
   changes: an invalid file or an unusable certificate leaves the running configuration
   in place (logged as an error). What can change live: target rules, server names,
   backend, the NTLM helper command and pool bounds, authentication options, timeouts
   and windows for *new* virtual connections, log level, and the TLS certificate
   (loaded into the existing SSL context: new TLS connections get it, established ones
   keep theirs). Listener
   addresses, TLS on/off and the metrics address need a restart; a reload that changes
   them says so and keeps the old ones. Live channels are never touched by a reload.
4. ``SIGTERM``/``SIGINT``: ``STOPPING=1``, /health turns 503, listeners close, every live
   virtual connection is closed cleanly (channels end, backend sockets close), and the
   process exits after at most ``SHUTDOWN_GRACE`` seconds whatever the clients do.

``WATCHDOG=1`` is sent from the event loop every ``WATCHDOG_USEC / 2`` when systemd asks
for it, so a wedged loop gets the service restarted.

With ``workers > 1`` the process above runs once per worker under a supervisor
(``rpcproxy.workers.supervise``) that binds the sockets before forking and is the only
process talking to systemd; see ``_serve_workers``. Worker i serves metrics on the
configured metrics port + i, since each worker only knows its own connections. On SIGHUP
the supervisor loads and checks the file too, before passing the signal on; a worker it
respawns afterwards applies the last configuration that loaded, through the reload path,
before it serves (``respawn_config``), so it serves what its siblings serve even when the
file has since become invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from rpcproxy import sdnotify
from rpcproxy.certs import CertificateError, server_ssl_context
from rpcproxy.config import Config, config_from_args, load
from rpcproxy.errors import ConfigError
from rpcproxy.http.handoff import WorkerSet
from rpcproxy.prometheus import MetricsListener
from rpcproxy.server import ProxyServer
from rpcproxy.targets import parse_endpoint
from rpcproxy.workers import EXIT_CONFIG as EXIT_CONFIG  # the unit's RestartPreventExitStatus=
from rpcproxy.workers import beat_forever, supervise

log = logging.getLogger("rpcproxy")

SHUTDOWN_GRACE = 10.0  # seconds for closing live channels on SIGTERM before exiting anyway
STOP_LISTENERS_GRACE = 5.0  # of which: waiting for the listening sockets to close

# Settings that need new listening sockets: a reload keeps the running values.
RESTART_ONLY = ("listen", "http_listen", "metrics_listen", "workers", "tls_transport",
                "proxy_protocol_from")


class StartupError(Exception):
    """The proxy could not start (reason is for the admin).

    ``config`` marks failures a restart cannot cure (an unreadable or mismatched
    certificate, a port the user may not bind): they exit with ``EXIT_CONFIG``.
    Others (an address in use) exit with 1 and systemd retries.
    """

    def __init__(self, reason: str, *, config: bool = False) -> None:
        super().__init__(reason)
        self.config = config

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if self.config else 1


class ProxyProcess:
    """One running proxy: listeners, metrics listener, signal handlers, reload."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        arg_overrides: argparse.Namespace | None = None,
        notifier: sdnotify.Notifier | None = None,
        loader: Callable[[], Config] | None = None,
        workers: WorkerSet | None = None,
        listen_sockets: list[socket.socket] | None = None,
        metrics_listen: str | None = None,
        respawn_config: Config | None = None,
    ) -> None:
        self.config = config
        # A respawned worker: the configuration its siblings reloaded, applied before serving.
        self.respawn_config = respawn_config
        self.config_path = config_path
        self.arg_overrides = arg_overrides
        self.notifier = notifier or sdnotify.Notifier()
        self._loader = loader
        self.worker_index = workers.index if workers is not None else None
        self.heartbeat = workers.heartbeat if workers is not None else None
        self.heartbeat_interval = workers.heartbeat_interval if workers is not None else 1.0
        self.metrics_listen = metrics_listen or config.metrics_listen
        self.server = ProxyServer(config, workers=workers, listen_sockets=listen_sockets)
        self.metrics_listener: MetricsListener | None = None
        self.bound: list[tuple[str, int]] = []
        self.metrics_bound: list[tuple[str, int]] = []
        self.stopping = False
        self.stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- health -------------------------------------------------------------------------

    def healthy(self) -> bool:
        return (not self.stopping and bool(self.server.servers)
                and all(s.is_serving() for s in self.server.servers))

    # ---- start / stop -------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        try:
            self.bound = await self.server.start()
        except CertificateError as exc:
            raise StartupError(f"TLS certificate: {exc.reason}", config=True) from None
        except OSError as exc:
            raise _listen_error(config.listen, exc) from None
        for (host, port), tls in zip(self.bound, self.server.bound_tls, strict=True):
            log.info("listening on %s:%d (%s)", host, port, "TLS" if tls else "HTTP")
        log.info("backend %s, NTLM judged by %s (up to %d at once), %d target rule(s): %s",
                 config.backend_endpoint(), " ".join(config.ntlm_helper), config.ntlm_helpers,
                 len(self.server.allow_list),
                 ", ".join(str(r) for r in self.server.allow_list.rules))
        if self.metrics_listen:
            await self._start_metrics(self.metrics_listen)

    async def _start_metrics(self, address: str) -> None:
        ep = parse_endpoint(address, "metrics_listen", listen=True)
        try:
            listener = MetricsListener(self.server, self.healthy)
            self.metrics_bound = await listener.start(ep.host, ep.port)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise _listen_error(address, exc, what=" for metrics") from None
        self.metrics_listener = listener
        who = "" if self.worker_index is None else f"worker {self.worker_index}: "
        for host, port in self.metrics_bound:
            log.info("%smetrics on http://%s:%d/metrics, health on http://%s:%d/health",
                     who, host, port, host, port)

    async def shutdown(self) -> None:
        self.stopping = True
        n = len(self.server.vcs)
        self.notifier.stopping(f"closing {n} virtual connection(s)")
        log.info("shutting down: closing %d virtual connection(s)", n)
        try:
            await asyncio.wait_for(self.server.stop(STOP_LISTENERS_GRACE), SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning("shutdown did not finish within %gs; exiting anyway", SHUTDOWN_GRACE)
        for task in self._tasks:
            task.cancel()
        if self.metrics_listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.metrics_listener.stop(), STOP_LISTENERS_GRACE)
        log.info("stopped")

    # ---- the main loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Start, notify, serve until SIGTERM/SIGINT (or ``stop_event``), shut down.

        The signal handlers are in place before start-up logs anything, so a signal sent as
        soon as the proxy says it listens is never the default action (which would kill
        it): SIGTERM/SIGINT during start-up stop it once started, a SIGHUP then reloads.
        """
        loop = asyncio.get_running_loop()
        early_reload: list[bool] = []
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
            installed.append(sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: early_reload.append(True))
        installed.append(signal.SIGHUP)
        respawn = self.respawn_config
        if respawn is not None:  # before listening: it never serves the start-up one
            who = "" if self.worker_index is None else f"worker {self.worker_index} "
            self._reload(lambda: respawn, why=f"{who}respawned after a reload, applying the "
                                              "last configuration that loaded: ")
        try:
            try:
                await self.start()
            except BaseException:
                self.stopping = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.server.stop(STOP_LISTENERS_GRACE),
                                           SHUTDOWN_GRACE)
                raise
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            await self._serve(reload_now=bool(early_reload))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _serve(self, *, reload_now: bool) -> None:
        try:
            if self.heartbeat is not None:
                self._tasks.append(asyncio.create_task(
                    beat_forever(self.heartbeat, self.heartbeat_interval)))
            if self.notifier.watchdog_interval:
                self._tasks.append(asyncio.create_task(
                    self._watchdog(self.notifier.watchdog_interval)))
            self.notifier.ready(self._status())
            if reload_now:  # a SIGHUP came during start-up
                self.reload()
            await self.stop_event.wait()
        finally:
            await self.shutdown()

    def _status(self) -> str:
        where = ", ".join(f"{h}:{p}" for h, p in self.bound)
        tls = "TLS" if self.config.tls_cert else "HTTP"
        return f"serving {tls} on {where}; backend {self.config.backend}"

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ---- reload -------------------------------------------------------------------------

    def _load(self) -> Config:
        if self._loader is not None:
            return self._loader()
        if self.arg_overrides is not None:
            return config_from_args(self.arg_overrides)
        return load(self.config_path)

    def reload(self) -> bool:
        """SIGHUP: re-read configuration and certificate; keep the old ones if invalid."""
        self.notifier.reloading()
        try:
            ok = self._reload()
        finally:
            self.notifier.ready(self._status())
        self.server.metrics.reloads["ok" if ok else "failed"] += 1
        return ok

    def _reload(self, load: Callable[[], Config] | None = None, why: str = "") -> bool:
        """Load (``load``, default: the file and flags, as at start), check, apply.

        ``why`` starts each line it logs (a respawned worker says so)."""
        old = self.config
        server = self.server
        try:
            new = (load or self._load)()
            new.allow_list()  # everything is validated before anything changes
            new.vc_settings()
        except ConfigError as exc:
            log.error("%sreload failed, keeping the running configuration: %s", why, exc.reason)
            return False
        except Exception as exc:  # noqa: BLE001 - a reload must never kill the server
            log.error("%sreload failed, keeping the running configuration: %s", why, exc)
            return False

        for note in keep_restart_only(new, old):
            log.warning("%sreload: %s", why, note)

        try:
            server.apply(new)
        except CertificateError as exc:
            log.error("%sreload failed, keeping the running configuration and certificate: "
                      "%s", why, exc.reason)
            return False
        logging.getLogger().setLevel(new.log_level.upper())
        self.config = new

        changed = [f.name for f in dataclasses.fields(Config)
                   if getattr(new, f.name) != getattr(old, f.name)]
        log.info("%sconfiguration reloaded (%s); %d live virtual connection(s) kept; "
                 "%d target rule(s): %s", why, ", ".join(changed) or "no setting changed",
                 len(server.vcs), len(server.allow_list),
                 ", ".join(str(r) for r in server.allow_list.rules))
        if new.tls_cert:
            log.info("TLS certificate reloaded from %s (new connections use it)", new.tls_cert)
        return True


def keep_restart_only(new: Config, old: Config) -> list[str]:
    """Give ``new`` the running values of the settings only a restart applies (listeners
    are built with them: RESTART_ONLY, TLS on/off); returns what to tell the admin."""
    notes = []
    for name in RESTART_ONLY:
        if getattr(new, name) != getattr(old, name):
            notes.append(f"{name} changed from {getattr(old, name)!r} to "
                         f"{getattr(new, name)!r}; restart rpcproxy to apply it")
            setattr(new, name, getattr(old, name))
    if bool(new.tls_cert) != bool(old.tls_cert):
        notes.append(f"turning TLS {'on' if new.tls_cert else 'off'} needs a restart; "
                     f"keeping it {'on' if old.tls_cert else 'off'}")
        new.tls_cert, new.tls_key = old.tls_cert, old.tls_key
    return notes


async def run_server(config: Config, stop: asyncio.Event | None = None, *,
                     config_path: str | None = None,
                     arg_overrides: argparse.Namespace | None = None) -> ProxyProcess:
    """Run until ``stop`` is set or SIGTERM/SIGINT; returns the finished ProxyProcess."""
    process = ProxyProcess(config, config_path=config_path, arg_overrides=arg_overrides)
    if stop is not None:
        process.stop_event = stop
    await process.run()
    return process


def serve(config: Config, *, config_path: str | None = None,
          arg_overrides: argparse.Namespace | None = None) -> int:
    """``rpcproxy serve``: 0 after a clean stop, 1 when the proxy could not start."""
    if config.workers > 1:
        return _serve_workers(config, config_path=config_path, arg_overrides=arg_overrides)
    main = run_server(config, config_path=config_path, arg_overrides=arg_overrides)
    try:
        _run_loop(config, main)
    except StartupError as exc:
        log.error("rpcproxy cannot start: %s", exc)
        return exc.exit_code
    return 0


def _run_loop(config: Config, main: Coroutine[Any, Any, object]) -> None:
    uvloop.run(main)


# --- several worker processes ------------------------------------------------------------------


def _bind_listeners(config: Config) -> list[socket.socket]:
    """Bind every listening socket in the supervisor, before forking (workers share them)."""
    socks: list[socket.socket] = []
    try:
        for address, tls in config.listen_addresses():
            ep = parse_endpoint(address, "listen", listen=True)
            family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
            try:
                sock = socket.create_server((ep.host, ep.port), family=family, backlog=4096)
            except OSError as exc:
                raise _listen_error(address, exc) from None
            socks.append(sock)
            host, port = sock.getsockname()[:2]
            log.info("listening on %s:%d (%s)", host, port, "TLS" if tls else "HTTP")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _listen_error(address: str, exc: OSError, what: str = "") -> StartupError:
    """A listener that could not be opened: with a hint, and as a configuration error
    (exit 78, no restart loop) when no restart can cure it."""
    return StartupError(f"cannot listen on {address}{what}: {exc.strerror or exc}"
                        + _bind_hint(exc), config=_is_config_errno(exc))


def _is_config_errno(exc: OSError) -> bool:
    """Binding failures no restart cures: not allowed, or no such local address."""
    return exc.errno in (errno.EACCES, errno.EPERM, errno.EADDRNOTAVAIL)


def _bind_hint(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (" (ports below 1024 need CAP_NET_BIND_SERVICE, or a lower "
                "net.ipv4.ip_unprivileged_port_start; in a container listen on 8443 and "
                "publish 443 to it)")
    return ""


def _worker_metrics_address(address: str | None, index: int) -> str | None:
    """Worker i serves metrics on the configured port + i (port 0: any free port each)."""
    if not address:
        return None
    ep = parse_endpoint(address, "metrics_listen", listen=True)
    port = ep.port + index if ep.port else 0
    if port > 65535:
        raise ConfigError(f"metrics_listen {address!r}: worker {index} would need port {port} "
                          "(each worker serves metrics on the port + its index)")
    host = f"[{ep.host}]" if ":" in ep.host else ep.host
    return f"{host}:{port}"


def _serve_workers(config: Config, *, config_path: str | None,
                   arg_overrides: argparse.Namespace | None) -> int:
    """Supervisor: bind, fork ``config.workers`` workers (rpcproxy.workers.supervise), wait.

    systemd sees one main process: READY=1 once the sockets listen (connections queue in
    the backlog until a worker accepts), STOPPING=1 on SIGTERM, WATCHDOG=1 from the
    supervisor only while every worker's event loop beats (a dead or wedged worker is
    killed and respawned by the supervisor itself; see rpcproxy.workers). SIGHUP is passed
    to every worker, and each reloads as described in the module docstring. Workers do
    not talk to systemd (NotifyAccess=main).
    """
    notifier = sdnotify.Notifier()
    try:  # every worker's metrics address is known before any worker starts
        metrics_addresses = [_worker_metrics_address(config.metrics_listen, i)
                             for i in range(config.workers)]
    except ConfigError as exc:
        log.error("rpcproxy cannot start: %s", exc.reason)
        return EXIT_CONFIG
    try:
        socks = _bind_listeners(config)
    except StartupError as exc:
        log.error("rpcproxy cannot start: %s", exc)
        return exc.exit_code
    silent = sdnotify.Notifier(env={})
    reloaded: list[Config] = []  # the last configuration a SIGHUP loaded (forked workers see it)

    def check_reload() -> None:
        """SIGHUP, before the workers get it: load and check the file as a worker will."""
        try:
            new = (config_from_args(arg_overrides) if arg_overrides is not None
                   else load(config_path))
            new.allow_list()
            new.vc_settings()
            kept = dataclasses.replace(new)
            keep_restart_only(kept, config)
            if kept.tls_cert and kept.tls_key:
                server_ssl_context(kept.tls_cert, kept.tls_key)
        except (ConfigError, CertificateError) as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - the supervisor must never die of a reload
            reason = str(exc)
        else:
            reloaded[:] = [new]
            log.info("supervisor: reload: the configuration loads; a worker respawned from "
                     "now on starts with it")
            return
        log.warning("supervisor: reload: the configuration does not load (%s); a worker "
                    "respawned from now on starts with %s", reason,
                    "the last one that loaded" if reloaded else "the start-up one")

    def run_worker(ws: WorkerSet) -> int:
        process = ProxyProcess(
            config, config_path=config_path, arg_overrides=arg_overrides, notifier=silent,
            workers=ws, listen_sockets=socks,
            metrics_listen=metrics_addresses[ws.index],
            respawn_config=reloaded[0] if reloaded else None,
        )
        try:
            _run_loop(config, process.run())
        except StartupError as exc:
            log.error("worker %d cannot start: %s", ws.index, exc)
            return exc.exit_code
        return 0

    log.info("supervisor pid %d: starting %d workers", os.getpid(), config.workers)
    def notify(text: str) -> None:
        notifier.notify(text)

    try:
        return supervise(config.workers, run_worker, notify=notify,
                         watchdog_interval=notifier.watchdog_interval, on_reload=check_reload)
    finally:
        for sock in socks:
            sock.close()
