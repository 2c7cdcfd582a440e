"""The house's layer order, read from the imports (``ast``, including imports inside functions):

    masks, scores  <-  backends  <-  attention  <-  nn  <-  models  <-  analysis  <-  apps  <-  cli

A module imports only from its own layer or the layers below it, and no two modules import each
other through any chain (no circles). ``qkv/__init__.py`` and ``qkv.distributed`` (public faces that
re-export) sit at the top of what they re-export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qkv

SRC = Path(qkv.__file__).parent

#: the layer of every module, by the longest matching prefix of its dotted name
LAYERS: dict[str, int] = {
    "qkv.fingerprint": 0,
    "qkv.masks": 0,
    "qkv.patterns": 0,
    "qkv.scores": 0,
    "qkv.backends": 1,
    "qkv.attention": 2,
    "qkv.nn": 3,
    "qkv.distributed": 3,
    "qkv.models": 4,
    "qkv.hf": 4,
    "qkv.analysis": 5,
    "qkv.apps": 6,
    "qkv.cli": 7,
    "qkv": 8,  # the package's __init__: re-exports, imported by nobody inside
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = ["qkv", *p.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The qkv modules ``name`` imports (resolved to modules, not names inside them)."""
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t.startswith("qkv") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {n: _imports(n, p, known) for n, p in known.items()}


def test_no_import_runs_up_a_layer():
    bad = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _graph().items()
        for b in deps
        if _layer(b) > _layer(a) and not (a == "qkv" or b == "qkv")
    ]
    assert not bad, "imports that run back up a layer:\n" + "\n".join(sorted(bad))


def test_nothing_inside_imports_the_package_root():
    bad = [a for a, deps in _graph().items() if "qkv" in deps and a != "qkv"]
    assert not bad, f"modules that import qkv/__init__ (the public face): {bad}"


def test_no_import_circles():
    graph = _graph()
    # a package importing its own submodules (to register or re-export them) is not a circle unless a
    # submodule imports the package back, which the graph then shows as a cycle through both
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_layer_table_covers_every_module():
    for name in _modules():
        assert _layer(name) is not None
