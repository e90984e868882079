"""A real, throwaway Samba AD DC for tests (the ``samba_dc`` fixture).

Theory of operation: once per test session a domain EXAMPLE.COM (NetBIOS EXAMPLE, host DC1)
is provisioned with ``samba-tool`` into a temporary directory, its smb.conf is rewritten so
that every directory lives under that directory and every socket is bound to one loopback
address, the test users are created, and ``samba --foreground`` runs as our child process in
its own process group.  Port 1024 then serves lsarpc, samr, drsuapi and mgmt over
ncacn_ip_tcp and demands NTLM like OpenChange's mapiproxy endpoint; 135 is the endpoint mapper.

Loopback address: 127.0.0.1 by default.  If another test session on this machine already
runs its DC there (detected with a lock file and a bind test on ports 135/1024), the next
free address 127.0.0.2 ... 127.0.0.20 is used instead, so parallel sessions do not collide.
``RPCPROXY_SAMBA_HOST`` forces an address.

Samba missing: as root it is installed with apt-get; otherwise the tests are skipped, except
when ``CI`` is set, where they fail.  ``stop()``/``start()`` are idempotent so a test can stop
the DC and bring it back for later tests.  Processes are only ever signalled by the id of the
child (or its own process group), never by name.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

REALM = "EXAMPLE.COM"
DOMAIN = "EXAMPLE"
HOST_NAME = "DC1"
ADMIN_PASSWORD = "Passw0rd!x"
USERS = {"testuser": "Test1234", "otheruser": "Other1234"}
# An account whose userPrincipalName looks like another account's name (AD allows it: UPNs that
# look like e-mail addresses often differ from account names), and that other account.
ALIAS_USER, ALIAS_PASSWORD, ALIAS_SUFFIX = "asmith", "Asmith1234", "corp.test"
VICTIM_USER, VICTIM_PASSWORD = "victim", "Victim1234"
ALIAS_UPN = f"{VICTIM_USER}@{ALIAS_SUFFIX}"  # belongs to asmith, not to victim
# libwbclient (ntlm_auth, wbinfo) finds winbindd only at its compiled-in socket directory, not
# at smb.conf's "winbindd socket directory"; helpers for this DC run in a private mount
# namespace where the DC's directory is bind-mounted there.
WINBINDD_DEFAULT_DIR = "/run/samba/winbindd"
DISABLED_USER = "disableduser"
DISABLED_PASSWORD = "Disabled1234"
# Directory attributes for Autodiscover: display names, mail addresses, and an account whose
# userPrincipalName is not sAMAccountName@realm.
MAIL = {"testuser": ("Test User", "test.user@example.com"),
        "otheruser": ("Other User", "other.user@example.com")}
UPN_USER, UPN_PASSWORD, UPN = "upnuser", "Upn12345", "jane.doe@example.com"
EPM_PORT = 135
RPC_PORT = 1024  # lsarpc, samr, drsuapi, mgmt (like the mapiproxy endpoint)
NETLOGON_PORT = 1025

DEBIAN_PACKAGES = [
    "samba",
    "samba-ad-dc",
    "samba-ad-provision",
    "samba-dsdb-modules",
    "samba-vfs-modules",
    "winbind",
    "python3-samba",
    "krb5-user",
    "smbclient",
]
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HOST_CANDIDATES = ["127.0.0.1"] + [f"127.0.0.{i}" for i in range(2, 21)]


class SambaNotAvailable(Exception):
    """Samba is not installed and could not be installed (the caller skips or fails)."""


def _tool_env() -> dict[str, str]:
    """Environment for Samba's tools: they run on Debian's python3, not on ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = _SBIN_PATH + ":" + env.get("PATH", "")
    env["LC_ALL"] = "C.UTF-8"
    return env


def _which(name: str) -> str | None:
    return shutil.which(name, path=_tool_env()["PATH"])


def ensure_installed() -> None:
    """Install Samba with apt-get when missing and we are root; else SambaNotAvailable."""
    if _which("samba") and _which("samba-tool"):
        return
    if os.geteuid() != 0 or not _which("apt-get"):
        raise SambaNotAvailable("samba is not installed (and not root, cannot apt-get it)")
    env = _tool_env() | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SambaNotAvailable(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    if not (_which("samba") and _which("samba-tool")):
        raise SambaNotAvailable("apt-get succeeded but samba is still not on PATH")


def _port_free(host: str, port: int) -> bool:
    """Nobody listens on host:port (TIME_WAIT leftovers do not count: samba sets SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _accepts_unix(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            return True
    except OSError:
        return False


def _claim_host(forced: str | None) -> tuple[str, IO[bytes]]:
    """Pick a loopback address whose Samba ports are free; hold a lock file for it."""
    candidates = [forced] if forced else _HOST_CANDIDATES
    for host in candidates:
        lock_path = Path(tempfile.gettempdir()) / f"rpcproxy-samba-dc-{host}.lock"
        lock = open(lock_path, "wb")  # noqa: SIM115 - held for the whole session
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if all(_port_free(host, p) for p in (EPM_PORT, RPC_PORT, NETLOGON_PORT)):
            return host, lock
        lock.close()
    raise RuntimeError(
        f"no loopback address among {candidates} has Samba's ports "
        f"{EPM_PORT}/{RPC_PORT}/{NETLOGON_PORT} free"
    )


def _smb_conf(base: Path, host: str) -> str:
    d = str(base)
    return f"""# Written by tests/support/samba_dc.py: loopback only, everything under {d}
[global]
\tnetbios name = {HOST_NAME}
\trealm = {REALM}
\tworkgroup = {DOMAIN}
\tserver role = active directory domain controller
\tidmap_ldb:use rfc2307 = yes
\tinterfaces = {host}/8
\tbind interfaces only = yes
\tserver services = -dns, -dnsupdate, -nbt, -wrepl, -ntp_signd, -s3fs, -kcc, -drepl
\trpc server port = {NETLOGON_PORT}
\trpc server port:lsarpc = {RPC_PORT}
\trpc server port:samr = {RPC_PORT}
\trpc server port:drsuapi = {RPC_PORT}
\trpc server port:dssetup = {RPC_PORT}
\tdns forwarder =
\tprivate dir = {d}/private
\tstate directory = {d}/state
\tcache directory = {d}/cache
\tlock directory = {d}/lock
\tpid directory = {d}/run
\tncalrpc dir = {d}/ncalrpc
\twinbindd socket directory = {d}/winbindd
\tbinddns dir = {d}/bind-dns
\tlog file = {d}/log/samba.log
\tlogging = file
\tmax log size = 0
\tlog level = 1

[sysvol]
\tpath = {d}/state/sysvol
\tread only = No

[netlogon]
\tpath = {d}/state/sysvol/{REALM.lower()}/scripts
\tread only = No
"""


class SambaDC:
    """One provisioned domain controller; ``start()``/``stop()`` control its samba process."""

    def __init__(self, base: Path, host: str, lock: IO[bytes] | None = None) -> None:
        self.base = base
        self.host = host
        self.port = RPC_PORT
        self.epm_port = EPM_PORT
        self.realm = REALM
        self.domain = DOMAIN
        self.host_name = HOST_NAME
        self.admin_password = ADMIN_PASSWORD
        self.users = dict(USERS)
        self.disabled_user = DISABLED_USER
        self.alias_user, self.alias_password, self.alias_upn = (ALIAS_USER, ALIAS_PASSWORD,
                                                                ALIAS_UPN)
        self.victim_user, self.victim_password = VICTIM_USER, VICTIM_PASSWORD
        self.disabled_password = DISABLED_PASSWORD
        self.upn_user, self.upn_password, self.upn = UPN_USER, UPN_PASSWORD, UPN
        # Samba's privileged LDAP socket: system access for whoever can open it (root here)
        self.ldapi_path = base / "private" / "ldap_priv" / "ldapi"
        self.tls_ca = base / "private" / "tls" / "ca.pem"  # Samba's self-made LDAPS CA
        self.smb_conf = base / "etc" / "smb.conf"
        self.log_file = base / "log" / "samba.log"
        self._stdout_file = base / "log" / "samba.stdout"
        self._proc: subprocess.Popen[bytes] | None = None
        self._upn_set = False
        self._lock = lock

    # -- provisioning ---------------------------------------------------------------------

    @classmethod
    def create(cls, host: str | None = None) -> SambaDC:
        """Provision a new DC in a fresh temporary directory (about 10 s)."""
        ensure_installed()
        host, lock = _claim_host(host or os.environ.get("RPCPROXY_SAMBA_HOST") or None)
        base = Path(tempfile.mkdtemp(prefix="rpcproxy-samba-"))
        dc = cls(base, host, lock)
        atexit.register(dc.cleanup)
        try:
            dc.provision()
        except BaseException:
            dc.cleanup()
            raise
        return dc

    def _tool(self, *args: str, timeout: float = 300) -> str:
        cmd = ["samba-tool", *args]
        done = subprocess.run(
            cmd, env=_tool_env(), capture_output=True, text=True, timeout=timeout, cwd=self.base
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                f"\n{done.stderr[-4000:]}"
            )
        return done.stdout

    def provision(self) -> None:
        self._tool(
            "domain",
            "provision",
            f"--realm={REALM}",
            f"--domain={DOMAIN}",
            f"--adminpass={ADMIN_PASSWORD}",
            "--server-role=dc",
            f"--targetdir={self.base}",
            "--use-rfc2307",
            f"--host-name={HOST_NAME}",
            f"--host-ip={self.host}",
            "--dns-backend=SAMBA_INTERNAL",
            f"--option=interfaces={self.host}/8",
            "--option=bind interfaces only=yes",
        )
        for sub in ("run", "log", "cache", "lock", "ncalrpc", "winbindd", "bind-dns"):
            (self.base / sub).mkdir(exist_ok=True)
        # Provisioning copies the host's smb.conf settings: replace it entirely.
        self.smb_conf.write_text(_smb_conf(self.base, self.host))
        conf = f"--configfile={self.smb_conf}"
        self._tool(
            "domain",
            "passwordsettings",
            "set",
            conf,
            "--complexity=off",
            "--min-pwd-length=1",
            "--history-length=0",
            "--min-pwd-age=0",
            "--max-pwd-age=0",
        )
        for name, password in [*self.users.items(), (DISABLED_USER, DISABLED_PASSWORD)]:
            self._tool("user", "create", name, password, conf)
            self._tool("user", "setexpiry", name, "--noexpiry", conf)
        self._tool("user", "disable", DISABLED_USER, conf)
        for name, password in ((ALIAS_USER, ALIAS_PASSWORD), (VICTIM_USER, VICTIM_PASSWORD)):
            self._tool("user", "create", name, password, conf)
            self._tool("user", "setexpiry", name, "--noexpiry", conf)
        for name, (display, mail) in MAIL.items():
            self._tool("user", "rename", name, f"--display-name={display}",
                       f"--mail-address={mail}", conf)
        self._tool("user", "create", UPN_USER, UPN_PASSWORD, conf)
        self._tool("user", "setexpiry", UPN_USER, "--noexpiry", conf)
        self._tool("user", "rename", UPN_USER, f"--upn={UPN}", "--display-name=Jane Doe", conf)

    # -- process control ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start samba (no-op when running) and wait until ports 135 and 1024 accept."""
        if self.running:
            return
        self._reap()
        for port in (self.epm_port, self.port):
            if not self._wait(functools.partial(_port_free, self.host, port), 15.0):
                raise RuntimeError(f"{self.host}:{port} is still in use; cannot start samba")
        with open(self._stdout_file, "ab") as out:
            self._proc = subprocess.Popen(
                [
                    "samba",
                    f"--configfile={self.smb_conf}",
                    "--foreground",
                    "--no-process-group",
                ],
                env=_tool_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,  # its own process group, ours to clean up
                preexec_fn=_die_with_parent,
            )
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            return (_accepts(self.host, self.epm_port) and _accepts(self.host, self.port)
                    and _accepts_unix(self.ldapi_path))  # the LDAP server starts last

        if not self._wait(ready, timeout) or proc.poll() is not None:
            code = proc.poll()
            self.stop()
            state = f"exited with code {code}" if code is not None else "did not open its ports"
            raise RuntimeError(
                f"samba {state} within {timeout:.0f} s on {self.host}.\n{self.log_tail()}"
            )
        self.wait_winbind()
        if not self._upn_set:  # needs the running DC (the suffix list is changed over LSA)
            conf = f"--configfile={self.smb_conf}"
            self._tool("domain", "trust", "namespaces", f"--add-upn-suffix={ALIAS_SUFFIX}",
                       conf)
            self._tool("user", "rename", ALIAS_USER, f"--upn={ALIAS_UPN}", conf)
            self._upn_set = True

    def stop(self, timeout: float = 20.0) -> None:
        """Stop samba (no-op when not running): SIGTERM to our child, then its process group."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        """Make sure no process of the samba group we started survives."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made the child a group leader
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self._wait(lambda: not _group_alive(pgid), 5.0):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        self._wait(lambda: not _group_alive(pgid), 5.0)
        self._proc = None

    @staticmethod
    def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    # -- winbind -------------------------------------------------------------------------

    def in_winbind_namespace(self, *argv: str) -> list[str]:
        """``argv`` run where libwbclient finds this DC's winbindd (see WINBINDD_DEFAULT_DIR)."""
        os.makedirs(WINBINDD_DEFAULT_DIR, exist_ok=True)
        inner = (f"mount --bind {shlex.quote(str(self.base / 'winbindd'))} "
                 f"{WINBINDD_DEFAULT_DIR} && exec {shlex.join(argv)}")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]

    def ntlm_helper(self) -> list[str]:
        """The ntlm_helper command for a proxy whose logins this DC judges."""
        return self.in_winbind_namespace(
            "ntlm_auth", f"--configfile={self.smb_conf}", "--helper-protocol=squid-2.5-ntlmssp")

    def ntlm_helper_toml(self) -> str:
        """The ntlm_helper line of an rpcproxy TOML file."""
        return f"ntlm_helper = {json.dumps(self.ntlm_helper())}\n"

    def ntlm_helper_flag(self) -> list[str]:
        """The --ntlm-helper option of ``rpcproxy serve`` / ``check``."""
        return ["--ntlm-helper", shlex.join(self.ntlm_helper())]

    def wait_winbind(self, timeout: float = 60.0) -> None:
        """Wait until winbindd answers (it starts a moment after samba's ports open)."""
        def ping() -> bool:
            done = subprocess.run(self.in_winbind_namespace("wbinfo", "--ping-dc"),
                                  env=_tool_env(), capture_output=True, timeout=30)
            return done.returncode == 0
        if not self._wait(ping, timeout):
            raise RuntimeError(f"winbindd of the test DC does not answer.\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self._stdout_file, self.log_file):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no samba log)"

    def cleanup(self) -> None:
        """Stop samba, remove the directory, release the address (idempotent)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SambaDC {self.domain} {self.host}:{self.port} {state}>"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM samba if the test process dies without cleaning up
    (atexit does not run on SIGKILL).  Linux only; silently skipped elsewhere."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie group leader still counts; reap it if it is our child.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def samba_dc_session() -> Iterator[SambaDC]:
    """Body of the session fixture: provision, start, yield, clean up; skip/fail if no Samba."""
    import pytest

    try:
        dc = SambaDC.create()
    except SambaNotAvailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Samba is required in CI: {exc}")
        pytest.skip(f"Samba not available: {exc}")
    try:
        dc.start()
        yield dc
    finally:
        dc.cleanup()
