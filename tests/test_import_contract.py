"""The import contract of the package: no cycles (in-function imports included, so none
hides one), and the layers depend downwards only.

* ``core`` imports nothing of medfed outside ``core``;
* ``algorithms`` and ``privacy`` never import ``server``;
* ``data`` never imports ``site`` or ``server``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import medfed

ROOT = Path(medfed.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ("medfed", *f.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module ``name`` refers to (``medfed.a.b`` or an attribute of one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every medfed module that ``module`` imports, at the top or inside a function."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n) if n.startswith("medfed") else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _in(module: str, layer: str) -> bool:
    return module == f"medfed.{layer}" or module.startswith(f"medfed.{layer}.")


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if d == "medfed":  # the package itself: importing any module runs it first, by design
                continue
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_depend_downwards():
    broken = []
    for m, deps in GRAPH.items():
        for d in deps - {"medfed"}:
            if _in(m, "core") and not _in(d, "core"):
                broken.append(f"{m} -> {d} (core imports nothing of medfed)")
            if (_in(m, "algorithms") or _in(m, "privacy")) and _in(d, "server"):
                broken.append(f"{m} -> {d} (algorithms and privacy never import server)")
            if _in(m, "data") and (_in(d, "site") or _in(d, "server")):
                broken.append(f"{m} -> {d} (data never imports site or server)")
    assert not broken, "\n".join(broken)


def test_the_contract_can_fail():
    """The checks see imports inside functions and relative ones (so they would catch one)."""
    assert "medfed.server.loop" in GRAPH["medfed.server.runner"]  # top level
    assert "medfed.data.sites" in GRAPH["medfed.server.runner"]  # inside run_job
    assert _in("medfed.core.codec", "core") and not _in("medfed.corex", "core")
