"""The wheel carries every package of the source tree (an install from it can import them all)."""

import re
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_package_is_packaged() -> None:
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = find_packages(str(ROOT), include=["dcerpc*", "rpcproxy*", "ntlm*", "bench*"])
    assert sorted(found) == sorted(listed)


def _sources() -> list[Path]:
    files = [p for d in ("dcerpc", "ntlm", "rpcproxy", "bench", "tests", "deploy", "docs")
             for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md", ".sh")]
    return [*files, ROOT / "README.md"]


def test_cited_notes_are_in_the_repository() -> None:
    """No citation points at a document outside the repository; 'protocol notes N' exists."""
    outside = ("rpch-" + "notes", "design" + ".md", "samba" + ".md", "architecture-" + "review")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in _sources() for n, line in enumerate(p.read_text().splitlines(), 1)
             if any(word in line for word in outside)]
    assert not found, "\n".join(found)
    notes = (ROOT / "docs" / "protocol-notes.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", notes, re.M))
    cited = {(p.relative_to(ROOT), n) for p in _sources()
             for n in re.findall(r"protocol notes (\d+)", p.read_text())}
    assert cited and {n for _, n in cited} <= sections, sorted(cited)
