"""Finding Debian's HAProxy for the tests that run it (tests/deploy, tests/http/test_proxyproto)."""

from __future__ import annotations

import os
import shutil

import pytest


def haproxy_binary() -> str:
    """The path of ``haproxy``; skips the test if it is missing, fails it under ``CI``."""
    tool = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is required in CI (Debian package haproxy)")
        pytest.skip("haproxy not installed (Debian package haproxy)")
    return tool
