"""Command line: ``rpcproxy serve`` and the admin subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rpcproxy import admin
from rpcproxy.config import add_config_arguments, config_from_args
from rpcproxy.errors import ConfigError
from rpcproxy.logs import configure

log = logging.getLogger("rpcproxy")


def _serve(args: argparse.Namespace) -> int:
    # Imported here for start-up time: rpcproxy.app pulls in the server (aiohttp, the
    # autodiscover directory), about 0.1 s that the admin subcommands and --help never need.
    from rpcproxy.app import EXIT_CONFIG, serve

    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        # A distinct status: the unit's RestartPreventExitStatus= stops retrying on it.
        print(f"rpcproxy: configuration error: {exc.reason}", file=sys.stderr)
        return EXIT_CONFIG
    configure(cfg.log_level, cfg.log_format)
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
    admin.add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
