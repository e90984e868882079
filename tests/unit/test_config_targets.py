"""Configuration, allow-list and command-line parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpcproxy import cli
from rpcproxy import config as config_mod
from rpcproxy.errors import ConfigError, RpcProxyError, TargetRefused
from rpcproxy.targets import (
    AllowList,
    Endpoint,
    Target,
    default_rules,
    parse_endpoint,
    parse_rule,
    parse_target_query,
)

BACKEND = Endpoint("127.0.0.1", 1024)


@pytest.mark.parametrize(
    ("query", "target"),
    [("mail:6001", Target("mail", 6001)),
     ("MAIL.Example.COM:6004", Target("mail.example.com", 6004)),
     ("10.0.0.1:593", Target("10.0.0.1", 593)), ("[fe80::1]:6001", Target("[fe80::1]", 6001))],
)
def test_parse_target_query(query: str, target: Target) -> None:
    assert parse_target_query(query) == target


@pytest.mark.parametrize(
    "query",
    ["", "mail", "mail:", ":6001", "mail:0", "mail:65536", "mail:1234567", "ma il:6001",
     "mail/../x:6001", "a" * 1100 + ":1", "mail:6001x", "fe80::1:6001"],
)
def test_parse_target_query_rejects(query: str) -> None:
    with pytest.raises(TargetRefused):
        parse_target_query(query)


def test_rules_and_matching() -> None:
    rules = [
        parse_rule("mail.example.com:6001-6002", BACKEND),
        parse_rule("mbx*:6004=10.1.1.1:1025", BACKEND),
        parse_rule("[fe80::1]:593=[::1]:1024", BACKEND),
    ]
    allow = AllowList(rules)
    assert allow.resolve(Target("mail.example.com", 6002)) == BACKEND
    assert allow.resolve(Target("mbx17", 6004)) == Endpoint("10.1.1.1", 1025)
    assert allow.resolve(Target("[fe80::1]", 593)) == Endpoint("::1", 1024)
    for t in (Target("mail.example.com", 6003), Target("mail.example.co", 6001),
              Target("xmbx1", 6004), Target("mail.example.com.evil", 6001)):
        with pytest.raises(TargetRefused):
            allow.resolve(t)
    assert str(rules[1]) == "mbx*:6004=10.1.1.1:1025"


@pytest.mark.parametrize("text", ["mail", "mail:x", "mail:6002-6001", "mail:0", "ma il:1",
                                  "mail:1=nohost", "mail:1=host:99999", ":6001"])
def test_bad_rules(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_rule(text, BACKEND)


def test_default_rules_cover_exchange_ports() -> None:
    allow = AllowList(default_rules(["Mail", "mail.example.com"], BACKEND))
    for port in (6001, 6002, 6004):
        assert allow.resolve(Target("mail", port)) == BACKEND
        assert allow.resolve(Target("mail.example.com", port)) == BACKEND
    with pytest.raises(TargetRefused):
        allow.resolve(Target("mail", 6003))
    with pytest.raises(TargetRefused):
        allow.resolve(Target("mail", 1024))


def test_endpoint_parsing() -> None:
    assert parse_endpoint("[::1]:8080") == Endpoint("::1", 8080)
    assert parse_endpoint("0.0.0.0:0", listen=True).port == 0
    with pytest.raises(ConfigError):
        parse_endpoint("0.0.0.0:0")


def test_embedded_defaults_are_valid() -> None:
    cfg = config_mod.load()
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.backend_endpoint() == BACKEND
    assert cfg.ntlm_helper == ["ntlm_auth", "--helper-protocol=squid-2.5-ntlmssp"]
    assert len(cfg.allow_list()) == 3 * len(cfg.server_names)
    assert cfg.vc_settings().receive_window == 0x40000


def test_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "rpcproxy.toml"
    f.write_text('listen = "0.0.0.0:443"\nbackend = "10.0.0.5:1024"\n'
                 'targets = ["mail:6001"]\nsetup-timeout = 5\n')
    cfg = config_mod.load(f, {"listen": "127.0.0.1:9000", "ntlm_helper": None})
    assert cfg.listen == "127.0.0.1:9000"
    assert cfg.backend == "10.0.0.5:1024"
    assert cfg.setup_timeout == 5.0
    assert cfg.allow_list().resolve(Target("mail", 6001)) == Endpoint("10.0.0.5", 1024)


@pytest.mark.parametrize(
    ("content", "message"),
    [("listen = 5", "must be a str"), ("bogus = 1", "unknown key"),
     ("listen = [", "not valid TOML"),
     ('backend = "nohost"', "backend"), ('tls_cert = "a.pem"', "together"),
     ("receive_window = 1", "receive_window"), ("connection_timeout = 10", "connection_timeout"),
     ('targets = ["x"]', "NAME:PORT"), ('log_format = "xml"', "log_format")],
)
def test_bad_files(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(content + "\n")
    with pytest.raises(ConfigError, match=message):
        config_mod.load(f)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config_mod.load("/nonexistent/rpcproxy.toml")


def test_cli_flags_reach_config() -> None:
    args = cli.build_parser().parse_args([
        "serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1300",
        "--target", "mail:6001", "--target", "mail:6004=127.0.0.1:1400",
        "--ntlm-helper", "/usr/bin/ntlm_auth --helper-protocol=squid-2.5-ntlmssp -d 0",
        "--basic-over-http",
    ])
    cfg = config_mod.config_from_args(args)
    allow = cfg.allow_list()
    assert allow.resolve(Target("mail", 6001)) == Endpoint("127.0.0.1", 1300)
    assert allow.resolve(Target("mail", 6004)) == Endpoint("127.0.0.1", 1400)
    assert cfg.ntlm_helper == ["/usr/bin/ntlm_auth", "--helper-protocol=squid-2.5-ntlmssp",
                               "-d", "0"]
    assert cfg.basic_over_http is True


def test_ntlm_helper_in_file_and_removed_ntlm_server(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('ntlm_helper = "ntlm_auth --helper-protocol=squid-2.5-ntlmssp -s \'/etc/x y\'"\n'
                 "ntlm_helpers = 4\nauth_queue_timeout = 3\n")
    cfg = config_mod.load(f)
    assert cfg.ntlm_helper == ["ntlm_auth", "--helper-protocol=squid-2.5-ntlmssp", "-s", "/etc/x y"]
    assert (cfg.ntlm_helpers, cfg.auth_queue_timeout) == (4, 3.0)
    f.write_text('ntlm_server = "127.0.0.1:1024"\n')
    with pytest.raises(ConfigError, match="winbind judges it"):
        config_mod.load(f)
    for bad in ("ntlm_helper = []\n", "ntlm_helpers = 0\n", "auth_queue_timeout = 0\n"):
        f.write_text(bad)
        with pytest.raises(ConfigError):
            config_mod.load(f)


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--backend", "nonsense"])
    assert code == 78  # EX_CONFIG: the unit's RestartPreventExitStatus= (issue 11)
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize("value", [32768, 65536, 70654])
def test_out_content_length_too_small_for_the_largest_fragment_is_refused(value: int) -> None:
    # Below 65535 (frag_length's maximum) + the 4096-byte reserve + 1024 for the proxy's
    # RTS, some fragment the backend may send would never fit in an OUT channel.
    with pytest.raises(ConfigError, match=r"out_content_length .* too small.* at least 70655"):
        config_mod.load(None, {"out_content_length": value})


def test_least_out_content_length_is_accepted() -> None:
    assert config_mod.load(None, {"out_content_length": 70655}).out_content_length == 70655


def test_bench_refuses_an_out_content_length_the_proxy_would_refuse(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench import cli as bench_cli

    with pytest.raises(SystemExit) as exc:
        bench_cli.build_parser().parse_args(["--out-content-length", "65536"])
    assert exc.value.code == 2
    assert "at least 70655" in capsys.readouterr().err
    args = bench_cli.build_parser().parse_args(["--out-content-length", "0x20000"])
    assert args.out_content_length == 0x20000


def test_config_error_is_no_rpc_error() -> None:
    """A configuration mistake never reaches a client: it has a reason, no RPC error code."""
    err = ConfigError("listen 'x' is not HOST:PORT")
    assert not isinstance(err, RpcProxyError) and not hasattr(err, "rpc_error")
    assert err.reason == str(err) == "listen 'x' is not HOST:PORT"


def test_flags_to_config_live_in_config_and_check_shares_them() -> None:
    """``serve`` and ``check`` read the same flags through ``config.add_config_arguments``."""
    for command in ("serve", "check"):
        args = cli.build_parser().parse_args([command, "--listen", "127.0.0.1:0",
                                              "--server-name", "mail"])
        cfg = config_mod.config_from_args(args)
        assert cfg.listen == "127.0.0.1:0" and cfg.server_names == ["mail"]


def test_an_ntlm_helper_that_does_not_split_is_a_config_error() -> None:
    """An unclosed quote is the admin's error (exit 78, one line), not a ValueError traceback."""
    with pytest.raises(ConfigError, match="ntlm_helper"):
        config_mod.load(None, {"ntlm_helper": 'ntlm_auth "--helper-protocol=squid-2.5-ntlmssp'})
