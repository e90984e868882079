"""The shape of the house, read from the source: no import circle, no upward import, no huge file.

The checker reads every product module (``dcerpc/``, ``ntlm/``, ``rpcproxy/``, ``bench/`` and
``deploy/container/entrypoint.py``) with ``ast``, so it sees every import the interpreter could
run: top-level ones, function-local ones and those under ``if TYPE_CHECKING:``. It keeps the
edges between our own modules (``from rpcproxy import admin`` is an edge to
``rpcproxy.admin``; ``from rpcproxy.rpch.rts import Kind`` one to ``rpcproxy.rpch.rts``) and
checks three rules:

(a) no circle between files (every strongly connected component of the graph is one file);
(b) no upward import: the packages are layers, lowest first ``dcerpc < ntlm < rpcproxy <
    bench``, and ``deploy/container/entrypoint.py`` sits on top and may import rpcproxy and
    what is below it; inside rpcproxy, ``rpcproxy/rpch/`` (the sans-IO core) imports nothing of
    rpcproxy outside itself but ``rpcproxy.errors``, and ``rpcproxy/http/`` (the adapter) does
    not import the server, the process, the command line or the worker supervisor;
(c) no product file over ``MAX_LINES`` lines.

Each failure message lists every offending cycle, edge or file. The first tests run the checker
on a tiny synthetic tree, so a checker that stopped seeing things would fail too.

The tests obey one rule of their own, read the same way: (d) no file under ``tests/`` imports a
test module (``test_*.py``); what tests share lives in ``tests/support/`` (or a conftest).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 800

# Lowest first: a module may import its own package and the packages before it.
LAYERS = ("dcerpc", "ntlm", "rpcproxy", "bench", "deploy")
ENTRYPOINT = "deploy.container.entrypoint"
CORE = "rpcproxy.rpch"
CORE_MAY_IMPORT = frozenset({"rpcproxy.errors"})
ADAPTER = "rpcproxy.http"
ADAPTER_MAY_NOT_IMPORT = frozenset(
    {"rpcproxy.server", "rpcproxy.app", "rpcproxy.cli", "rpcproxy.workers"})

Edge = tuple[str, str, int]  # importer, imported, line of the import in the importer


def product_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every product module under ``root``."""
    found: dict[str, Path] = {}
    for package in LAYERS[:-1]:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    entrypoint = root / "deploy" / "container" / "entrypoint.py"
    if entrypoint.is_file():
        found[ENTRYPOINT] = entrypoint
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every dotted name an import statement anywhere in ``tree`` may load, with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from pkg import mod`` loads pkg.mod; ``from mod import name`` loads mod.
                yield f"{target}.{alias.name}", node.lineno


def import_edges(root: Path) -> tuple[dict[str, Path], list[Edge]]:
    """The product modules under ``root`` and every import edge between two of them."""
    modules = product_files(root)
    edges: set[Edge] = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in _imported_names(tree, module, _is_package(path)):
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add((module, target, line))
    return modules, sorted(edges)


def _rel(modules: dict[str, Path], root: Path, module: str) -> str:
    return str(modules[module].relative_to(root))


def cycles(root: Path) -> list[str]:
    """One line per import circle (a strongly connected component of more than one file)."""
    modules, edges = import_edges(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _ in edges:
        graph[a].add(b)
    # Tarjan's algorithm, iterative (no recursion limit on a deep chain).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    out: list[str] = []
    for component in sorted(components):
        members = set(component)
        inner = [f"{_rel(modules, root, a)}:{line} -> {_rel(modules, root, b)}"
                 for a, b, line in edges if a in members and b in members]
        out.append(f"import circle through {', '.join(_rel(modules, root, m) for m in component)}"
                   f" (edges: {'; '.join(inner)})")
    return out


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(root: Path) -> list[str]:
    """One line per import that breaks the layering."""
    modules, edges = import_edges(root)
    out: list[str] = []
    for a, b, line in edges:
        where = f"{_rel(modules, root, a)}:{line} imports {b}"
        if _layer(b) > _layer(a):
            out.append(f"{where}: {b.split('.')[0]} is above {a.split('.')[0]}")
        elif a == ENTRYPOINT and _layer(b) > _layer("rpcproxy"):
            out.append(f"{where}: the container entrypoint may import rpcproxy and below only")
        elif (_inside(a, CORE) and _inside(b, "rpcproxy") and not _inside(b, CORE)
                and b not in CORE_MAY_IMPORT):
            out.append(f"{where}: the sans-IO core imports only itself and rpcproxy.errors")
        elif _inside(a, ADAPTER) and b in ADAPTER_MAY_NOT_IMPORT:
            out.append(f"{where}: the HTTP adapter may not import {b}")
    return out


def big_files(root: Path) -> list[str]:
    """One line per product file over ``MAX_LINES`` lines."""
    modules = product_files(root)
    out: list[str] = []
    for path in sorted(modules.values()):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(root)}: {n} lines (at most {MAX_LINES})")
    return out


MOVE = "move what it shares into tests/support/"



def suite_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every Python file under ``root/tests``."""
    found: dict[str, Path] = {}
    for path in sorted((root / "tests").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_test_module(module: str) -> bool:
    return module.rpartition(".")[2].startswith("test_")


def imports_of_test_modules(root: Path) -> list[str]:
    """One line per import of a test module by a file under ``tests/``."""
    modules = suite_files(root)
    out: list[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        hits: dict[str, int] = {}
        for name, line in _imported_names(tree, module, _is_package(path)):
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and _is_test_module(target):
                hits.setdefault(target, line)
        for target, line in sorted(hits.items()):
            out.append(f"{path.relative_to(root)}:{line} imports test module {target}: {MOVE}")
    return out


# --- the checker proves itself on a synthetic tree -----------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture()
def bad_tree(tmp_path: Path) -> Path:
    return _tree(tmp_path, {
        "dcerpc/__init__.py": "",
        # upward: the lowest layer imports the proxy, and only under TYPE_CHECKING
        "dcerpc/pdu.py": "from typing import TYPE_CHECKING\n"
                         "if TYPE_CHECKING:\n    from rpcproxy.errors import ProtocolError\n",
        "ntlm/__init__.py": "",
        "ntlm/auth.py": "import dcerpc.pdu\n",
        "rpcproxy/__init__.py": "",
        "rpcproxy/errors.py": "import struct\n",
        # a circle of three, one arm function-local, one relative
        "rpcproxy/app.py": "def main() -> None:\n    from rpcproxy import cli\n",
        "rpcproxy/cli.py": "from . import admin\n",
        "rpcproxy/admin.py": "import rpcproxy.app\n",
        "rpcproxy/rpch/__init__.py": "",
        "rpcproxy/rpch/rts.py": "from rpcproxy.errors import ProtocolError\n"
                                "from ..config import Config\n",
        "rpcproxy/config.py": "from rpcproxy.rpch import rts\n",
        "rpcproxy/http/__init__.py": "",
        "rpcproxy/http/wire.py": "from rpcproxy.server import Server\n",
        "rpcproxy/server.py": "x = 1\n" * (MAX_LINES + 1),
        "bench/__init__.py": "",
        "bench/client.py": "from rpcproxy.rpch.rts import Kind\nimport aiohttp.web\n",
        "deploy/container/entrypoint.py": "import bench.client\nimport rpcproxy.cli\n",
    })


def test_checker_reports_a_circle(bad_tree: Path) -> None:
    found = cycles(bad_tree)
    assert len(found) == 2, found
    assert found[0].startswith(
        "import circle through rpcproxy/admin.py, rpcproxy/app.py, rpcproxy/cli.py ")
    assert "rpcproxy/app.py:2 -> rpcproxy/cli.py" in found[0]  # the function-local arm
    assert "rpcproxy/cli.py:1 -> rpcproxy/admin.py" in found[0]  # the relative arm
    assert found[1].startswith(
        "import circle through rpcproxy/config.py, rpcproxy/rpch/rts.py ")


def test_checker_reports_upward_imports(bad_tree: Path) -> None:
    assert upward_imports(bad_tree) == [
        "dcerpc/pdu.py:3 imports rpcproxy.errors: rpcproxy is above dcerpc",
        "deploy/container/entrypoint.py:1 imports bench.client: "
        "the container entrypoint may import rpcproxy and below only",
        "rpcproxy/http/wire.py:1 imports rpcproxy.server: "
        "the HTTP adapter may not import rpcproxy.server",
        "rpcproxy/rpch/rts.py:2 imports rpcproxy.config: "
        "the sans-IO core imports only itself and rpcproxy.errors",
    ]


def test_checker_reports_big_files(bad_tree: Path) -> None:
    assert big_files(bad_tree) == [f"rpcproxy/server.py: {MAX_LINES + 1} lines (at most 800)"]


def test_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "dcerpc/__init__.py": "", "dcerpc/pdu.py": "import struct\n",
        "ntlm/__init__.py": "from ntlm.auth import x\n", "ntlm/auth.py": "x = 1\n",
        "rpcproxy/__init__.py": "", "rpcproxy/errors.py": "from dcerpc.pdu import struct\n",
        "rpcproxy/rpch/__init__.py": "", "rpcproxy/rpch/rts.py": "from rpcproxy import errors\n",
        "bench/__init__.py": "", "bench/client.py": "from rpcproxy.rpch import rts\n",
        "deploy/container/entrypoint.py": "from rpcproxy.rpch import rts\n",
    })
    assert (cycles(root), upward_imports(root), big_files(root)) == ([], [], [])


def test_checker_reports_test_modules_imported(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "tests/__init__.py": "",
        "tests/conftest.py": "from tests.support.fakes import x\n",
        "tests/support/__init__.py": "",
        # a helper module leaning on a test module is as wrong as a test doing so
        "tests/support/fakes.py": "x = 1\nfrom tests.unit import test_a\n",
        "tests/unit/__init__.py": "",
        "tests/unit/test_a.py": "from tests.support.fakes import x\nimport rpcproxy.server\n",
        "tests/unit/test_connection.py": "y = 1\n",
        "tests/http/__init__.py": "",
        "tests/http/test_b.py": "from tests.unit.test_a import x\n",
        "tests/http/test_c.py": "from .test_b import x\n",  # relative
        "tests/http/test_d.py": "def f() -> None:\n    import tests.unit.test_a\n",  # local
    })
    found = imports_of_test_modules(root)
    assert found == [
        f"tests/http/test_b.py:1 imports test module tests.unit.test_a: {MOVE}",
        f"tests/http/test_c.py:1 imports test module tests.http.test_b: {MOVE}",
        f"tests/http/test_d.py:2 imports test module tests.unit.test_a: {MOVE}",
        f"tests/support/fakes.py:2 imports test module tests.unit.test_a: {MOVE}",
    ]

# --- the product ------------------------------------------------------------------------------


def test_the_checker_sees_the_product() -> None:
    modules, edges = import_edges(ROOT)
    assert {"dcerpc.pdu", "ntlm.http_auth", "rpcproxy.rpch.rts", "bench.dcerpc",
            ENTRYPOINT} <= set(modules)
    assert ("bench.dcerpc", "dcerpc.pdu") in {(a, b) for a, b, _ in edges}


def test_no_import_circle() -> None:
    found = cycles(ROOT)
    assert not found, "\n".join(found)


def test_no_upward_import() -> None:
    found = upward_imports(ROOT)
    assert not found, "\n".join(found)


def test_no_product_file_over_800_lines() -> None:
    found = big_files(ROOT)
    assert not found, "\n".join(found)


def test_no_test_module_imports_another() -> None:
    found = imports_of_test_modules(ROOT)
    assert not found, "\n".join(found)
