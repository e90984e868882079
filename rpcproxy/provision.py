"""``rpcproxy provision samba|user|dns|winbind``: the Samba/OpenChange/DNS side of an install.

These replace the hand-edited steps of the SOGo/OpenChange guide:

* ``samba``  the smb.conf lines that turn on OpenChange's mapiproxy endpoint (guide
  section 6.2) plus a fixed TCP port for its three interfaces, so rpcproxy's ``backend``
  is a known ``host:port`` instead of a dynamic port found through the endpoint mapper.
  Printed, or merged into a file with ``--apply`` (timestamped backup first, idempotent).
* ``user``   ``samba-tool user create`` + ``setexpiry --noexpiry``, then
  ``openchange_newuser --create`` when OpenChange is installed (guide section 7).
* ``dns``    the autodiscover records and a hosts-file line (guide sections 6.5 and 8).
* ``winbind`` what logins judged by winbind need on this host (``rpcproxy.provision_winbind``).

Why per-interface ports: Samba binds an interface that keeps state between calls (as
EMSMDB, NSPI and RFR do) in one process and only honours ``rpc server port:<interface>``
for it; the global ``rpc server port`` applies to the other interfaces, so setting it to
the same number could make two processes fight over one port. The interface names are
those of OpenChange's NDR tables, the same as in ``dcerpc_mapiproxy:interfaces``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from dcerpc.pdu import MAX_FRAG_LENGTH, FramingError, PduFramer, PType, parse_header
from rpcproxy import provision_winbind
from rpcproxy.errors import ConfigError
from rpcproxy.targets import parse_endpoint

MAPIPROXY_INTERFACES = ("exchange_emsmdb", "exchange_nsp", "exchange_ds_rfr")
PLAIN_INTERFACES = ("lsarpc", "samr", "drsuapi", "dssetup")
# DCE/RPC interfaces the endpoint check binds to (uuid, major, minor version)
EMSMDB_SYNTAX = (uuid.UUID("a4f1db00-ca47-1067-b31f-00dd010662da"), 0, 81)
MGMT_SYNTAX = (uuid.UUID("afa8bd80-7d8a-11c9-bef4-08002b102989"), 1, 0)
NDR_SYNTAX = (uuid.UUID("8a885d04-1ceb-11c9-9fe8-08002b104860"), 2, 0)
PROBE_TIMEOUT = 5.0
DEFAULT_PORT = 1024
BLOCK_BEGIN = "# BEGIN rpcproxy: OpenChange mapiproxy endpoint (rpcproxy provision samba)"
BLOCK_END = "# END rpcproxy"
REPLACED_MARK = "# rpcproxy provision samba replaced: "
ENDPOINT_SERVERS_KEY = "dcerpcendpointservers"
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- provision samba -------------------------------------------------------------------------


def _norm_key(key: str) -> str:
    """Samba compares parameter names ignoring case and white space."""
    return re.sub(r"\s+", "", key).lower()


def mapiproxy_settings(port: int, endpoint_servers: str = "+epmapper, +mapiproxy"
                       ) -> list[tuple[str, str]]:
    settings = [
        ("dsdb:schema update allowed", "true"),  # openchange_provision extends the schema
        ("dcerpc endpoint servers", endpoint_servers),
        ("dcerpc_mapiproxy:server", "true"),
        ("dcerpc_mapiproxy:interfaces", ", ".join(MAPIPROXY_INTERFACES)),
    ]
    settings += [(f"rpc server port:{iface}", str(port)) for iface in MAPIPROXY_INTERFACES]
    return settings


def render_block(settings: list[tuple[str, str]], indent: str = "\t") -> list[str]:
    lines = [BLOCK_BEGIN]
    lines += [f"{indent}{key} = {value}" for key, value in settings]
    lines.append(BLOCK_END)
    return lines


def merge_endpoint_servers(existing: str | None) -> str:
    """Add epmapper and mapiproxy to an existing ``dcerpc endpoint servers`` value."""
    if existing is None or not existing.strip():
        return "+epmapper, +mapiproxy"
    items = [i for i in re.split(r"[,\s]+", existing.strip()) if i]
    relative = all(i[0] in "+-" for i in items)
    names = {i.lstrip("+-").lower() for i in items if not i.startswith("-")}
    removed = {i[1:].lower() for i in items if i.startswith("-")}
    for wanted in ("epmapper", "mapiproxy"):
        if wanted in removed:
            items = [i for i in items if i.lower() != f"-{wanted}"]
        if wanted not in names:
            items.append(f"+{wanted}" if relative else wanted)
    return ", ".join(items)


class SmbConfError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class MergeResult:
    text: str
    replaced: list[str]  # original lines that were commented out


def _logical_lines(lines: list[str], start: int) -> int:
    """Index after the logical line starting at ``start`` (backslash continuations)."""
    i = start
    while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
        i += 1
    return i + 1


def plain_settings(port: int) -> list[tuple[str, str]]:
    """A plain Samba DCE/RPC endpoint on a fixed port (no OpenChange): lsarpc, samr,
    drsuapi and dssetup answer NTLM BINDs there, but no mail interface exists."""
    return [(f"rpc server port:{iface}", str(port)) for iface in PLAIN_INTERFACES]


def merge_smb_conf(text: str, port: int, plain: bool = False) -> MergeResult:
    """Put the managed block at the end of [global]; comment out lines it supersedes."""
    lines = text.splitlines()
    section_rx = re.compile(r"^\s*\[([^\]]+)\]")
    global_start = None
    global_end = len(lines)
    for i, line in enumerate(lines):
        m = section_rx.match(line)
        if not m:
            continue
        if global_start is None and m.group(1).strip().lower() == "global":
            global_start = i
        elif global_start is not None and i > global_start:
            global_end = i
            break
    if global_start is None:
        raise SmbConfError("no [global] section: is this an smb.conf?")

    body = lines[global_start + 1:global_end]
    # Drop an earlier managed block (re-apply), remember superseded settings.
    kept: list[str] = []
    in_block = False
    existing_servers: str | None = None
    managed = {_norm_key(k) for k, _ in (plain_settings(port) if plain
                                         else mapiproxy_settings(port))}
    replaced: list[str] = []
    i = 0
    while i < len(body):
        line = body[i]
        stripped = line.strip()
        if stripped == BLOCK_BEGIN:
            in_block = True
            i += 1
            continue
        if stripped == BLOCK_END:
            in_block = False
            i += 1
            continue
        if in_block:
            i += 1
            continue
        if stripped.startswith(REPLACED_MARK):
            original = stripped[len(REPLACED_MARK):]
            key, sep, value = original.partition("=")
            if sep and _norm_key(key) == ENDPOINT_SERVERS_KEY:
                existing_servers = value.strip()
            kept.append(line)
            i += 1
            continue
        if stripped and not stripped.startswith(("#", ";")) and "=" in stripped:
            key, _, value = stripped.partition("=")
            if _norm_key(key) in managed:
                end = _logical_lines(body, i)
                if _norm_key(key) == ENDPOINT_SERVERS_KEY:
                    existing_servers = value.strip()
                for raw in body[i:end]:
                    replaced.append(raw.strip())
                    kept.append(f"\t{REPLACED_MARK}{raw.strip()}")
                i = end
                continue
        kept.append(line)
        i += 1
    if in_block:
        raise SmbConfError(f"'{BLOCK_BEGIN}' without '{BLOCK_END}': fix the file by hand")

    # Keep trailing blank lines of [global] after the block.
    trailing: list[str] = []
    while kept and not kept[-1].strip():
        trailing.insert(0, kept.pop())
    indent = "\t"
    for line in kept:
        if line.strip() and not line.strip().startswith("#"):
            indent = line[: len(line) - len(line.lstrip())] or ""
            break
    if plain:
        settings = plain_settings(port)
    else:
        settings = mapiproxy_settings(port, merge_endpoint_servers(existing_servers))
    block = render_block(settings, indent)
    new_lines = lines[:global_start + 1] + kept + block + trailing + lines[global_end:]
    new_text = "\n".join(new_lines) + ("\n" if text.endswith("\n") or not text else "")
    return MergeResult(new_text, replaced)


def _testparm(path: Path, plain: bool = False) -> tuple[bool, str]:
    """Run Samba's testparm on ``path``: (usable, what to tell the admin)."""
    tool = _which("testparm")
    if tool is None:
        return True, "testparm not installed: the merged file was not checked by Samba"
    done = subprocess.run([tool, "--suppress-prompt", "-s", str(path)], capture_output=True,
                          text=True, timeout=60, env=_tool_env())
    if done.returncode != 0:
        return False, f"testparm refused the merged file: {done.stderr.strip()[-500:]}"
    servers = re.search(r"^\s*dcerpc endpoint servers\s*=\s*(.*)$", done.stdout, re.M)
    if not plain and servers and "mapiproxy" not in servers.group(1):
        return False, "testparm: mapiproxy is not among the dcerpc endpoint servers"
    return True, "testparm accepts the merged file"


def _backup(path: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.rpcproxy-{stamp}.bak")
    n = 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.rpcproxy-{stamp}-{n}.bak")
        n += 1
    shutil.copy2(path, backup)
    return backup


def _replace_file(path: Path, text: str) -> None:
    """Write atomically, keeping the file's mode and owner."""
    st = path.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def samba_modules_dir() -> Path | None:
    """Samba's MODULESDIR (``smbd -b``), or None when smbd is not installed here."""
    smbd = _which("smbd")
    if smbd is None:
        return None
    try:
        done = subprocess.run([smbd, "-b"], capture_output=True, text=True, timeout=30,
                              env=_tool_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^\s*MODULESDIR:\s*(\S+)", done.stdout, re.M)
    return Path(m.group(1)) if m else None


def mapiproxy_module(modules_dir: Path) -> Path | None:
    """OpenChange's endpoint server module under Samba's ``dcerpc_server`` modules."""
    found = sorted((modules_dir / "dcerpc_server").glob("*mapiproxy*.so"))
    return found[0] if found else None


def _no_mapiproxy_message(modules_dir: Path, port: int, path: Path) -> str:
    plain = "\n".join(f"    {k} = {v}" for k, v in plain_settings(port))
    return (
        f"OpenChange's mapiproxy endpoint server is not installed: Samba's modules "
        f"({modules_dir}/dcerpc_server) have no mapiproxy module. With "
        f"'dcerpc endpoint servers = +mapiproxy' this Samba would fail to start its RPC "
        f"server (\"Failed to find endpoint server 'mapiproxy'\"): ports 135 and {port} "
        f"would be gone. {path} left unchanged.\n"
        f"Install OpenChange for Outlook mail (Debian 12 has no package for it), or give "
        f"rpcproxy a plain Samba DCE/RPC endpoint on a fixed port, which verifies NTLM "
        f"logins but serves no mailbox:\n{plain}\n"
        f"  (rpcproxy provision samba --plain --apply {path} writes these lines)")


def _bind_pdu(syntax: tuple[uuid.UUID, int, int]) -> bytes:
    """An unauthenticated DCE/RPC BIND (C706 12.6.4.3) for one interface, NDR transfer."""
    def syntax_id(s: tuple[uuid.UUID, int, int]) -> bytes:
        return s[0].bytes_le + struct.pack("<HH", s[1], s[2])

    body = struct.pack("<HHI", 5840, 5840, 0) + struct.pack("<BBH", 1, 0, 0)
    body += struct.pack("<HBB", 0, 1, 0) + syntax_id(syntax) + syntax_id(NDR_SYNTAX)
    header = struct.pack("<BBBB4sHHI", 5, 0, 11, 3, b"\x10\x00\x00\x00", 16 + len(body), 0, 1)
    return header + body


def _bind_result(answer: bytes) -> str | None:
    """None when the answer (one whole PDU) is a BIND_ACK accepting the interface, else
    why not."""
    try:
        ptype = parse_header(answer).ptype
    except FramingError:
        return "the answer is not DCE/RPC"
    if ptype == PType.BIND_NAK:
        return "BIND_NAK"
    if ptype != PType.BIND_ACK or len(answer) < 26:
        return f"DCE/RPC packet type {ptype} instead of BIND_ACK"
    sec_len = struct.unpack_from("<H", answer, 24)[0]
    at = 26 + sec_len
    at += (-at) % 4
    if len(answer) < at + 6:
        return "a truncated BIND_ACK"
    if answer[at] < 1:
        return "a BIND_ACK without results"
    result = struct.unpack_from("<H", answer, at + 4)[0]
    return None if result == 0 else "the interface is not served (BIND_ACK rejected it)"


def _read_pdu(sock: socket.socket) -> bytes:
    """The first whole PDU the endpoint sends (what it sent if it closes or breaks
    DCE/RPC framing first); the socket's timeout bounds each read."""
    framer = PduFramer()
    seen = b""
    while len(seen) < MAX_FRAG_LENGTH:
        data = sock.recv(4096)
        if not data:
            return seen
        seen += data
        try:
            pdus = framer.feed(data)
        except FramingError:
            return seen
        if pdus:
            return bytes(pdus[0].data)
    return seen


def probe_endpoint(host: str, port: int, plain: bool, timeout: float = PROBE_TIMEOUT
                   ) -> tuple[bool, str]:
    """Does Samba serve what rpcproxy needs at host:port? (ok, what to tell the admin)"""
    what = "a DCE/RPC endpoint" if plain else "the mapiproxy endpoint (EMSMDB)"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_bind_pdu(MGMT_SYNTAX if plain else EMSMDB_SYNTAX))
            answer = _read_pdu(sock)
    except socket.gaierror as exc:
        return False, f"cannot resolve {host}: {exc.strerror or exc}"
    except TimeoutError:
        return False, f"{host}:{port} did not answer within {timeout:g}s"
    except OSError as exc:
        return False, (f"nothing listens on {host}:{port} ({exc.strerror or exc}): "
                       f"restart Samba (systemctl restart samba-ad-dc), look at its log, "
                       f"and run this check again")
    reason = _bind_result(answer)
    if reason is None:
        return True, f"Samba serves {what} on {host}:{port}: rpcproxy can connect there"
    return False, (f"{host}:{port} answers, but not as {what}: {reason}"
                   + ("" if plain else " (is OpenChange's mapiproxy loaded?)"))


def _verify(args: argparse.Namespace, host: str, port: int) -> int:
    ok, verdict = probe_endpoint(host, port, args.plain)
    print(f"[{' OK ' if ok else 'FAIL'}] Samba endpoint: {verdict}")
    return 0 if ok else 1


def provision_samba(args: argparse.Namespace) -> int:
    port: int = args.port
    if not 0 < port < 65536:
        print("rpcproxy provision samba: --port must be 1..65535", file=sys.stderr)
        return 2
    try:
        host, port = _where(args, port)
    except ConfigError as exc:
        print(f"rpcproxy provision samba: {exc.reason}", file=sys.stderr)
        return 2
    if args.verify:
        return _verify(args, host, port)
    settings = plain_settings(port) if args.plain else mapiproxy_settings(port)
    if not args.apply:
        print("# Add to the [global] section of smb.conf (or run with --apply FILE):")
        for line in render_block(settings, ""):
            print(line)
        print("# Then restart Samba (systemctl restart samba-ad-dc) and point rpcproxy at it:")
        print(f'#   backend = "127.0.0.1:{port}"   (in /etc/rpcproxy/rpcproxy.toml)')
        return 0

    path = Path(args.apply)
    try:
        text = path.read_text()
    except OSError as exc:
        print(f"rpcproxy provision samba: cannot read {path}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    if not args.plain:
        modules = Path(args.modules_dir) if args.modules_dir else samba_modules_dir()
        if modules is not None and mapiproxy_module(modules) is None:
            print(f"rpcproxy provision samba: {_no_mapiproxy_message(modules, port, path)}",
                  file=sys.stderr)
            return 1
    try:
        result = merge_smb_conf(text, port, plain=args.plain)
    except SmbConfError as exc:
        print(f"rpcproxy provision samba: {path}: {exc.reason}", file=sys.stderr)
        return 1
    if result.text == text:
        print(f"{path} already has the {'endpoint' if args.plain else 'mapiproxy'} settings "
              f"(port {port}): nothing changed")
        return _after_apply(args, host, port)

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "smb.conf"
        candidate.write_text(result.text)
        ok, verdict = _testparm(candidate, args.plain)
    if not ok:
        print(f"rpcproxy provision samba: {verdict}; {path} left unchanged", file=sys.stderr)
        return 1
    try:
        backup = _backup(path)
        _replace_file(path, result.text)
    except OSError as exc:
        print(f"rpcproxy provision samba: cannot write {path}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"backup: {backup}")
    for line in result.replaced:
        print(f"commented out (superseded): {line}")
    ifaces = PLAIN_INTERFACES if args.plain else MAPIPROXY_INTERFACES
    print(f"{path}: {'plain DCE/RPC' if args.plain else 'mapiproxy'} endpoint enabled, "
          f"interfaces {', '.join(ifaces)} on TCP port {port}")
    print(verdict)
    print("Restart Samba to apply: systemctl restart samba-ad-dc")
    print(f'rpcproxy configuration: backend = "{host}:{port}"')
    return _after_apply(args, host, port)


def _where(args: argparse.Namespace, port: int) -> tuple[str, int]:
    """Where rpcproxy will connect: --backend HOST:PORT (ConfigError if it is not one),
    else 127.0.0.1:--port."""
    if not args.backend:
        return "127.0.0.1", port
    ep = parse_endpoint(args.backend, "--backend")
    return ep.host, ep.port


def _after_apply(args: argparse.Namespace, host: str, port: int) -> int:
    """After --apply: does Samba already serve there? Says how to finish either way."""
    ok, verdict = probe_endpoint(host, port, args.plain)
    if ok:
        print(f"[ OK ] Samba endpoint: {verdict}")
    else:
        print(f"[WAIT] Samba endpoint: {verdict}")
        flags = " --plain" if args.plain else ""
        print(f"After restarting Samba, check again: rpcproxy provision samba --verify{flags} "
              f"--backend {host}:{port}")
    return 0


# --- provision user --------------------------------------------------------------------------


def _tool_env() -> dict[str, str]:
    """Samba's tools run on the system Python: keep ours (venv, PYTHONPATH) out of theirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = TOOL_PATH + os.pathsep + env.get("PATH", "")
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _which(name: str) -> str | None:
    return shutil.which(name, path=_tool_env()["PATH"])


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_tool_env(),
                          stdin=subprocess.DEVNULL)


def _tail(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return " | ".join(text[-3:]) if text else f"exit status {done.returncode}"


def _redact(cmd: list[str], secret: str | None) -> str:
    return " ".join("***" if secret and part == secret else part for part in cmd)


def provision_user(args: argparse.Namespace) -> int:
    name: str = args.name
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,20}", name):
        print("rpcproxy provision user: the user name must be 1-20 letters, digits, '.', '_' "
              "or '-' (a Windows logon name)", file=sys.stderr)
        return 2
    samba_tool = _which("samba-tool")
    if samba_tool is None:
        print("[FAIL] samba-tool is not installed (Debian package samba-ad-dc / python3-samba)")
        return 1
    conf = [f"--configfile={args.configfile}"] if args.configfile else []
    if args.configfile and not Path(args.configfile).is_file():
        print(f"[FAIL] {args.configfile}: no such smb.conf")
        return 1

    exists = _run([samba_tool, "user", "show", name, *conf]).returncode == 0
    if exists:
        print(f"[ OK ] {name} already exists in Samba; its password was left unchanged"
              + (" (use: samba-tool user setpassword)" if args.password else ""))
    else:
        password = args.password
        if password is None:
            if not sys.stdin.isatty():
                print("rpcproxy provision user: give --password, or run it in a terminal to be "
                      "asked", file=sys.stderr)
                return 2
            password = getpass.getpass(f"Password for {name}: ")
            if password != getpass.getpass("Again: "):
                print("rpcproxy provision user: the passwords differ", file=sys.stderr)
                return 2
        cmd = [samba_tool, "user", "create", name, password, *conf]
        done = _run(cmd)
        if done.returncode != 0:
            print(f"[FAIL] {_redact(cmd, password)}: {_tail(done)}")
            return 1
        print(f"[ OK ] Samba user {name} created")

    cmd = [samba_tool, "user", "setexpiry", name, "--noexpiry", *conf]
    done = _run(cmd)
    if done.returncode != 0:
        print(f"[FAIL] {' '.join(cmd)}: {_tail(done)}")
        return 1
    print(f"[ OK ] the password of {name} never expires")

    newuser = _which("openchange_newuser")
    if newuser is None:
        print(f"[SKIP] openchange_newuser is not installed: {name} can log in through "
              "rpcproxy but has no OpenChange mailbox. Install OpenChange, then run: "
              f"openchange_newuser --create {name}")
        return 0
    cmd = [newuser, "--create", name]
    done = _run(cmd, timeout=300)
    if done.returncode != 0:
        print(f"[FAIL] {' '.join(cmd)}: {_tail(done)}")
        return 1
    print(f"[ OK ] OpenChange mailbox for {name} created (openchange_newuser --create)")
    return 0


# --- provision dns ---------------------------------------------------------------------------


def provision_dns(args: argparse.Namespace) -> int:
    host = args.host.strip().rstrip(".").lower()
    if "." not in host:
        print("rpcproxy provision dns: --host must be a fully qualified name, "
              "e.g. mail.example.com", file=sys.stderr)
        return 2
    try:
        ip = ipaddress.ip_address(args.ip)
    except ValueError:
        print(f"rpcproxy provision dns: --ip {args.ip!r} is not an IP address", file=sys.stderr)
        return 2
    domain = args.domain.strip().rstrip(".").lower() if args.domain else host.split(".", 1)[1]
    auto = f"autodiscover.{domain}"
    rtype = "AAAA" if ip.version == 6 else "A"
    label = host[: -len(domain) - 1] if host.endswith("." + domain) else None
    port = args.port
    w = max(len(host), len(auto), len(f"_autodiscover._tcp.{domain}")) + 2
    print(f"; DNS records for zone {domain} (BIND zone file syntax)")
    print(f"{host + '.':<{w}} IN {rtype:<5} {ip}")
    print(f"{auto + '.':<{w}} IN CNAME {host}.")
    print(f"{'_autodiscover._tcp.' + domain + '.':<{w}} IN SRV   0 0 {port} {host}.")
    print()
    print("; The same with Samba's internal DNS (run on the DC, as a domain admin):")
    if label is not None:
        print(f"samba-tool dns add {args.dns_server} {domain} {label} {rtype} {ip} "
              "-U administrator")
    else:
        print(f"; {host} is outside {domain}: add its {rtype} record in its own zone")
    print(f"samba-tool dns add {args.dns_server} {domain} autodiscover CNAME {host} "
          "-U administrator")
    print(f"samba-tool dns add {args.dns_server} {domain} _autodiscover._tcp SRV "
          f"'{host} {port} 0 0' -U administrator")
    print()
    print("# hosts file line, for a test client without DNS (Windows: "
          "C:\\Windows\\System32\\drivers\\etc\\hosts, Linux: /etc/hosts)")
    print(f"{ip}\t{host} {auto}")
    return 0


# --- argument parsing ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Provisioning helpers for Samba, OpenChange users, DNS and winbind."
    sub = p.add_subparsers(dest="what", required=True)

    s = sub.add_parser("samba", help="smb.conf lines for the OpenChange mapiproxy endpoint",
                       description="Print, or merge into FILE, the smb.conf lines that enable "
                       "OpenChange's mapiproxy endpoint on a fixed TCP port.")
    s.add_argument("--apply", metavar="FILE",
                   help="merge into this smb.conf (a timestamped backup is made first)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port of the mapiproxy interfaces (default {DEFAULT_PORT})")
    s.add_argument("--plain", action="store_true",
                   help="a plain Samba DCE/RPC endpoint on the port instead of mapiproxy "
                        "(for a Samba without OpenChange: NTLM logins, no mailbox)")
    s.add_argument("--verify", action="store_true",
                   help="only check that Samba serves the endpoint where rpcproxy connects")
    s.add_argument("--backend", metavar="HOST:PORT",
                   help="where rpcproxy connects (default 127.0.0.1:--port)")
    s.add_argument("--modules-dir", metavar="DIR",
                   help="Samba's modules directory (default: MODULESDIR of smbd -b), "
                        "searched for OpenChange's mapiproxy module")
    s.set_defaults(provision=provision_samba)

    u = sub.add_parser("user", help="create a Samba (and OpenChange) user",
                       description="samba-tool user create + setexpiry --noexpiry, then "
                       "openchange_newuser --create when OpenChange is installed.")
    u.add_argument("name", help="logon name (sAMAccountName)")
    u.add_argument("--password", help="initial password (asked for when omitted; note that "
                   "samba-tool receives it on its command line)")
    u.add_argument("-s", "--configfile", metavar="SMB_CONF",
                   help="smb.conf of the Samba DC (default: Samba's own default)")
    u.set_defaults(provision=provision_user)

    d = sub.add_parser("dns", help="autodiscover DNS records and a hosts-file line",
                       description="Print the DNS records Outlook's autodiscovery needs.")
    d.add_argument("--host", required=True, help="the proxy's public name, e.g. mail.example.com")
    d.add_argument("--ip", required=True, help="its public IP address")
    d.add_argument("--domain", help="the mail domain (default: the domain of --host)")
    d.add_argument("--port", type=int, default=443, help="HTTPS port (default 443)")
    d.add_argument("--dns-server", default="localhost",
                   help="DNS server for the samba-tool lines (default localhost)")
    d.set_defaults(provision=provision_dns)

    provision_winbind.add_parser(sub)


def run(args: argparse.Namespace) -> int:
    code: int = args.provision(args)
    return code
