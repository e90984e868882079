"""The wheel carries every package of the source tree (an install from it can import them all)."""

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_packaged() -> None:
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = find_packages(str(ROOT), include=["dcerpc*", "rpcproxy*", "ntlm*", "bench*"])
    assert sorted(found) == sorted(listed)
