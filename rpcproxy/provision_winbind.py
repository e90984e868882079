"""``rpcproxy provision winbind``: what the proxy needs to have logins judged by winbind.

The proxy asks winbind (through Samba's ``ntlm_auth`` helper) who a client is, so the host that
runs it needs:

1. ``ntlm_auth`` (Debian package ``winbind``);
2. winbindd answering: on a Samba AD DC it is started by ``samba`` itself; on another host the
   machine is joined to the domain (``net ads join``) and the ``winbind`` service runs;
3. the proxy's user allowed on winbindd's privileged pipe: the group that owns
   ``/var/lib/samba/winbindd_privileged`` (Debian: ``winbindd_priv``).  The shipped systemd
   unit adds it with ``SupplementaryGroups=``; otherwise ``usermod -aG``.

Each is reported as one line; ``--apply`` adds the user to the group.  Last, a logon of an
account that does not exist is sent through the helper: only a *rejection* proves that winbind
gives verdicts (the same probe as ``rpcproxy check``).

The helper is the one ``rpcproxy serve`` would run: ``--ntlm-helper``, else ``ntlm_helper`` of
the configuration file (``--config``, else the unit's file as ``rpcproxy check`` finds it), else
the default; ``rpcproxy.config.load`` merges them, as it does for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import pwd
import shutil
import subprocess

from ntlm import NtlmServerUnavailable, WinbindVerifier
from ntlm.winbind import HelperPool
from rpcproxy import config
from rpcproxy.check import config_path

PRIVILEGED_DIRS = ("/var/lib/samba/winbindd_privileged", "/run/samba/winbindd_privileged")
DEFAULT_GROUP = "winbindd_priv"


def _privileged_group() -> str:
    for path in PRIVILEGED_DIRS:
        try:
            return grp.getgrgid(os.stat(path).st_gid).gr_name
        except (OSError, KeyError):
            continue
    return DEFAULT_GROUP


def _in_group(user: str, group: str) -> bool:
    try:
        entry = grp.getgrnam(group)
        account = pwd.getpwnam(user)
    except KeyError:
        return False
    return user in entry.gr_mem or account.pw_gid == entry.gr_gid


async def _probe(argv: list[str]) -> str | None:
    verifier = WinbindVerifier(HelperPool(argv, size=1), reply_timeout=10)
    try:
        await verifier.probe()
    except NtlmServerUnavailable as exc:
        return exc.reason
    finally:
        await verifier.aclose()
    return None


def provision_winbind(args: argparse.Namespace) -> int:
    argv = list(config.load(config_path(args), {"ntlm_helper": args.ntlm_helper}).ntlm_helper)
    failed = 0
    helper = shutil.which(argv[0])
    if helper is None:
        print(f"[FAIL] {argv[0]} is not installed: apt-get install winbind")
        return 1
    print(f"[ OK ] NTLM helper: {helper}")

    group = _privileged_group()
    user: str = args.user
    try:
        grp.getgrnam(group)
    except KeyError:
        print(f"[FAIL] group {group} does not exist (is the winbind package installed?)")
        return 1
    try:
        pwd.getpwnam(user)
        known = True
    except KeyError:
        known = False
    if not known:
        print(f"[WARN] user {user} does not exist yet; the systemd unit creates it and adds "
              f"SupplementaryGroups={group}")
    elif _in_group(user, group):
        print(f"[ OK ] {user} may use winbindd's privileged pipe (group {group})")
    elif args.apply:
        done = subprocess.run(["usermod", "-aG", group, user], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            print(f"[FAIL] usermod -aG {group} {user}: {done.stderr.strip()}")
            failed += 1
        else:
            print(f"[ OK ] added {user} to {group} (restart rpcproxy to apply)")
    else:
        print(f"[WARN] {user} is not in {group}: run `usermod -aG {group} {user}` (or --apply); "
              f"the shipped systemd unit sets SupplementaryGroups={group} itself")

    problem = asyncio.run(_probe(argv))
    if problem is None:
        print("[ OK ] winbind gives verdicts (a logon of an account that does not exist was "
              "rejected)")
    else:
        print(f"[FAIL] winbind gives no verdicts: {problem}. On a DC, is samba running? "
              "Elsewhere: join the domain (net ads join) and start winbind "
              "(systemctl enable --now winbind)")
        failed += 1
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("winbind", help="check (and fix) what NTLM through winbind needs",
                       description="Check that ntlm_auth is installed, that the proxy's user may "
                       "use winbindd's privileged pipe, and that winbind gives verdicts.")
    w.add_argument("--user", default="rpcproxy", help="the user rpcproxy runs as (default "
                   "rpcproxy)")
    w.add_argument("--config", metavar="PATH", help="the proxy's TOML configuration file, for "
                   "its ntlm_helper (default: the unit's file when it exists)")
    w.add_argument("--ntlm-helper", metavar="COMMAND",
                   help="the helper command (default: ntlm_helper of the configuration file, "
                   "else ntlm_auth --helper-protocol=squid-2.5-ntlmssp)")
    w.add_argument("--apply", action="store_true", help="add the user to the group")
    w.set_defaults(provision=provision_winbind)
