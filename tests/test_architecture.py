"""The house's floors (docs/architecture.md): a module imports only from its own floor or below, the import graph has
no cycle, every registered method has its one docs page, and ``import longctx`` / the CLI's ``--help`` load neither
torch nor transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from longctx.patches import registry

# source folder -> installed package (pyproject's package-dir)
ROOTS = {REPO / "longctx": "longctx", REPO / "patches": "longctx.patches", REPO / "eval": "longctx.eval"}
FLOORS = [  # (prefix, floor); the longest matching prefix decides
    ("longctx.core", 1), ("longctx.data", 1),
    ("longctx.kernels", 2),
    ("longctx.patches", 3), ("longctx.models", 3),
    ("longctx.api", 4), ("longctx.registry", 4), ("longctx.loading", 4),
    ("longctx.cli", 5), ("longctx.eval", 5), ("longctx.export", 5),
]
FACADE = "longctx"  # longctx/__init__.py: imports nothing when imported; its names load their modules lazily


def modules() -> dict[str, Path]:
    found = {}
    for root, package in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "longctx" and parts and parts[0] in ("patches", "eval"):
                continue  # not in the source tree (installed from patches/, eval/)
            found[name] = path
    return found


def floor(module: str) -> int:
    best = max((p for p, _ in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS and docs/architecture.md")
    return dict(FLOORS)[best]


def imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """The longctx modules ``name`` imports (relative imports resolved), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in out if m in known and m != name}


def test_no_module_imports_a_higher_floor():
    wrong = []
    for name, path in modules().items():
        if name == FACADE:
            continue
        for target in imports(name, path):
            if target != FACADE and floor(target) > floor(name):
                wrong.append(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
            if target == FACADE and floor(name) < 4:
                wrong.append(f"{name} (floor {floor(name)}) imports the public API")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("top_level_only", [True, False])
def test_the_import_graph_has_no_cycle(top_level_only):
    graph = {name: imports(name, path, top_level_only) for name, path in modules().items()}
    graph = {n: {t for t in targets if not n.startswith(t + ".")} for n, targets in graph.items()}  # a package's
    # own __init__ is imported with any of its modules: not an edge of the design
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == FACADE:
                continue
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, [node]):
            break
    assert not cycle, " -> ".join(cycle)


def test_every_method_has_its_docs_page_and_its_module_declares_it():
    for name, spec in registry.items():
        page = REPO / "docs" / "methods" / f"{name}.md"
        assert page.exists(), f"docs/methods/{name}.md is missing (CONTRIBUTING.md: adding a method)"
        text = page.read_text()
        assert f"`{name}`" in text
        missing = [p for p, _, _ in spec.parameters() if f"`{p}`" not in text]
        assert not missing, f"docs/methods/{name}.md does not document {missing}"
        assert spec.apply.__module__.startswith("longctx.patches."), name


def test_import_longctx_and_cli_help_stay_light():
    code = ("import sys, longctx, longctx.cli; print(sorted(m for m in ('torch', 'transformers') if m in "
            "sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "longctx.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "export" in helped.stdout and "eval" in helped.stdout
