"""Command line: ``rpcproxy serve`` and the admin subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rpcproxy import config as config_mod
from rpcproxy.errors import ConfigError

log = logging.getLogger("rpcproxy")

# Subcommands other modules add: name -> (add_arguments, run). run returns the exit code.
SubcommandSpec = tuple[str, Callable[[argparse.ArgumentParser], None],
                       Callable[[argparse.Namespace], int]]
EXTRA_SUBCOMMANDS: list[SubcommandSpec] = []
SUBCOMMAND_HELP = {
    "cert": "create a self-signed TLS certificate for a host and its autodiscover name",
    "provision": "print or apply the Samba, user and DNS set-up the proxy needs",
    "check": "check configuration, certificate, backend, winbind, a test login and Autodiscover",
}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``serve`` and ``check`` share."""
    p.add_argument("--config", metavar="PATH", help="TOML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080)")
    p.add_argument("--backend", metavar="HOST:PORT",
                   help="the Samba mapiproxy ncacn_ip_tcp endpoint (default 127.0.0.1:1024)")
    p.add_argument("--target", metavar="NAME:PORT[=HOST:PORT]", action="append",
                   help="allow-list entry (repeatable; replaces the default "
                        "<server names>:6001,6002,6004 -> backend)")
    p.add_argument("--server-name", metavar="NAME", action="append", dest="server_names",
                   help="server name clients put in the URL (repeatable; for the default rules)")
    p.add_argument("--ntlm-helper", metavar="COMMAND",
                   help="the winbind NTLM helper that judges logins (default: "
                        "'ntlm_auth --helper-protocol=squid-2.5-ntlmssp')")
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--http-listen", metavar="HOST:PORT",
                   help="extra plain-HTTP listener when TLS is on")
    p.add_argument("--basic-over-http", action="store_true", default=None,
                   help="allow Basic authentication without TLS (testing only)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])


def config_from_args(args: argparse.Namespace) -> config_mod.Config:
    overrides: dict[str, Any] = {
        "listen": args.listen,
        "backend": args.backend,
        "targets": args.target,
        "server_names": args.server_names,
        "ntlm_helper": args.ntlm_helper,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "http_listen": args.http_listen,
        "basic_over_http": args.basic_over_http,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    for extra in ("workers", "metrics_listen"):
        if hasattr(args, extra):
            overrides[extra] = getattr(args, extra)
    return config_mod.load(args.config, overrides)


def setup_logging(level: str, fmt: str) -> None:
    from rpcproxy.logs import configure

    configure(level, fmt)


def _serve(args: argparse.Namespace) -> int:
    from rpcproxy.app import EXIT_CONFIG, serve

    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        # A distinct status: the unit's RestartPreventExitStatus= stops retrying on it.
        print(f"rpcproxy: configuration error: {exc.reason}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level, cfg.log_format)
    return serve(cfg, config_path=args.config, arg_overrides=args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpcproxy",
        description="Outlook Anywhere (RPC over HTTP v2) proxy for Samba/OpenChange.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the proxy")
    add_config_arguments(serve_p)
    serve_p.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve_p.add_argument("--metrics-listen", metavar="HOST:PORT",
                         help="Prometheus metrics listener")
    serve_p.set_defaults(func=_serve)
    for name, add_args, run in EXTRA_SUBCOMMANDS:
        p = sub.add_parser(name, help=SUBCOMMAND_HELP.get(name))
        add_args(p)
        p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _load_plugins()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"rpcproxy: configuration error: {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _load_plugins() -> None:
    """Import the modules that register admin subcommands (cert, check, provision)."""
    import importlib

    for module in ("rpcproxy.admin",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


if __name__ == "__main__":
    # Run through the real module: the admin subcommands register themselves into
    # rpcproxy.cli.EXTRA_SUBCOMMANDS, not into this __main__ copy.
    from rpcproxy.cli import main as _main

    sys.exit(_main())

