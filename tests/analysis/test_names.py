"""Every public name of qkv.analysis means one thing: each submodule is reachable as itself (no function of
the same name hides it), no name stands for two different objects in two modules, and every public
function, class and constant a module defines is declared in its ``__all__``."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import qkv.analysis

SRC = Path(qkv.analysis.__file__).parent
MODULES = sorted(f.stem for f in SRC.glob("*.py") if f.stem != "__init__")
SHARED = (int, float, complex, str, bytes, bool, type(None))


def test_every_submodule_is_itself_under_its_own_name():
    shadowed = {}
    for name in MODULES:
        mod = importlib.import_module(f"qkv.analysis.{name}")
        got = getattr(qkv.analysis, name)
        if got is not mod:
            shadowed[name] = type(got).__name__
    assert not shadowed, f"qkv.analysis.<module> is something else: {shadowed}"


def test_no_name_stands_for_two_objects():
    seen: dict[str, list[tuple[str, object]]] = {}
    for name in ["", *MODULES]:
        modname = f"qkv.analysis.{name}".rstrip(".")
        mod = importlib.import_module(modname)
        for n in mod.__all__:
            seen.setdefault(n, []).append((modname, getattr(mod, n)))

    def same(a: object, b: object) -> bool:  # Python may share a small int or a str between two names
        return a == b if isinstance(a, SHARED) and isinstance(b, SHARED) else a is b

    clashes = {n: [m for m, _ in where] for n, where in seen.items() if not all(same(o, where[0][1]) for _, o in where)}
    assert not clashes, f"one name, different objects: {clashes}"


def _defined_constants(path: Path) -> set[str]:
    """UPPER_CASE names assigned at the top level of a module."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_")}
    return names


def test_every_public_definition_is_declared():
    undeclared = []
    for name in MODULES:
        mod = importlib.import_module(f"qkv.analysis.{name}")
        public = set(mod.__all__)
        for n, obj in vars(mod).items():
            defined_here = (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == mod.__name__
            if defined_here and not n.startswith("_") and n not in public:
                undeclared.append(f"{mod.__name__}.{n}")
        undeclared += [f"{mod.__name__}.{n}" for n in _defined_constants(SRC / f"{name}.py") - public]
    assert not undeclared, f"public-looking names missing from their module's __all__: {undeclared}"
