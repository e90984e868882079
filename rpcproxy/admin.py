"""Admin subcommands: ``cert``, ``provision samba|user|dns`` and ``check``.

``rpcproxy.cli`` calls ``add_subcommands`` while it builds its parser. The heavy lifting
lives in ``rpcproxy.certs``, ``rpcproxy.provision`` and ``rpcproxy.check``; this module only
parses and prints.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from rpcproxy import certs, check, provision
from rpcproxy.config import add_config_arguments

# --- cert ------------------------------------------------------------------------------------


def _cert_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Create a self-signed certificate and key for HOST and autodiscover.<domain of HOST> "
        "(for first installs and tests; replace it with a certificate clients trust)."
    )
    p.add_argument("--host", required=True, metavar="NAME",
                   help="the name clients use, e.g. mail.example.com")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="where cert.pem and key.pem (mode 0600) are written")
    p.add_argument("--key-type", choices=["rsa", "ec"], default="rsa",
                   help="RSA 2048 (default, any Outlook) or EC P-256")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument("--name", action="append", default=[], metavar="NAME", dest="extra_names",
                   help="another name (or IP address) to put in the certificate (repeatable)")
    p.add_argument("--owner", metavar="USER",
                   help="chown both files to USER (e.g. rpcproxy, the service user)")
    p.add_argument("--force", action="store_true", help="replace existing files")


def _cert_run(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("rpcproxy cert: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        made = certs.create_self_signed(
            args.host, args.out_dir, key_type=args.key_type, days=args.days,
            extra_names=args.extra_names, overwrite=args.force,
        )
    except certs.CertificateError as exc:
        print(f"rpcproxy cert: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"rpcproxy cert: cannot write to {args.out_dir}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    if args.owner:
        try:
            for path in (made.cert_path, made.key_path):
                shutil.chown(path, user=args.owner)
        except (LookupError, OSError) as exc:
            print(f"rpcproxy cert: cannot chown to {args.owner}: {exc}", file=sys.stderr)
            return 1
    print(f"wrote {made.cert_path} (self-signed, valid until "
          f"{made.not_after:%Y-%m-%d}, names: {', '.join(made.names)})")
    print(f"wrote {made.key_path} (mode {certs.KEY_FILE_MODE:04o}"
          + (f", owner {args.owner})" if args.owner else ")"))
    print("Clients do not trust a self-signed certificate: import it on the Outlook machines "
          "(Trusted Root Certification Authorities) or replace it with a trusted one.")
    print("Configuration lines:")
    print(f'  tls_cert = "{os.path.abspath(made.cert_path)}"')
    print(f'  tls_key = "{os.path.abspath(made.key_path)}"')
    return 0


# --- provision -------------------------------------------------------------------------------


def _provision_arguments(p: argparse.ArgumentParser) -> None:
    provision.add_arguments(p)


def _provision_run(args: argparse.Namespace) -> int:
    return provision.run(args)


# --- check -----------------------------------------------------------------------------------


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Check the configuration, certificate, backend, winbind (NTLM) and "
                     "(with --user) a real login; exit status 0 only when all pass.")
    add_config_arguments(p)
    check.add_arguments(p)


def _check_run(args: argparse.Namespace) -> int:
    return check.run(args)


SUBCOMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None],
                         Callable[[argparse.Namespace], int]], ...] = (
    ("cert", "create a self-signed TLS certificate for a host and its autodiscover name",
     _cert_arguments, _cert_run),
    ("provision", "print or apply the Samba, user and DNS set-up the proxy needs",
     _provision_arguments, _provision_run),
    ("check", "check configuration, certificate, backend, winbind, a test login and Autodiscover",
     _check_arguments, _check_run),
)


def add_subcommands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``cert``, ``provision`` and ``check`` to ``rpcproxy``'s subcommand parser."""
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=run)
