"""The reference stays whole: every public name is in the API pages under docs/api/, with a docstring.

A public name is one in the ``__all__`` of a module under ``src/qkv`` (the commands, ``qkv.apps`` and
``qkv.cli``, are not API). It is in the reference when a page documents it under that name (an ``automodule``
without ``:no-members:`` documents its module's ``__all__``; ``autofunction``, ``autoclass`` and ``autodata``
one name each) or documents the same object under another name (``qkv.nn.MultiHeadAttention`` is
``qkv.nn.attention.MultiHeadAttention``). ``./dev docs`` checks the same on what Sphinx actually rendered;
this test says it in ``./dev test``, without building the site.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
API = ROOT / "docs" / "api"
SHARED = (int, float, complex, str, bytes, bool, type(None))  # values Python may share between names


def public_modules() -> list[str]:
    names = []
    for f in sorted((SRC / "qkv").rglob("*.py")):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if not name.startswith(("qkv.apps", "qkv.cli", "qkv.__main__")):
            names.append(name)
    return names


def documented_names() -> set[str]:
    """The dotted names the API pages document."""
    names: set[str] = set()
    for page in sorted(API.glob("*.rst")):
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"^\.\. auto(module|function|class|data|exception):: (\S+)\n((?:   .*\n)*)", text, re.M):
            kind, target, options = m.groups()
            if kind != "module":
                names.add(target)
            elif ":no-members:" not in options:
                names.update(f"{target}.{n}" for n in importlib.import_module(target).__all__)
    return names


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    obj: object = importlib.import_module(parts[0])
    for p in parts[1:]:
        obj = getattr(obj, p)
    return obj


def has_docstring(modname: str, name: str, obj: object) -> bool:
    """Functions and classes: their own ``__doc__``. Data: a string right after the assignment, or a ``#:``
    comment before it, in the module that assigns it (as autodoc reads it)."""
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return bool(obj.__doc__ and obj.__doc__.strip())
    mod = importlib.import_module(modname)
    lines = inspect.getsource(mod).splitlines()
    tree = ast.parse("\n".join(lines))
    for i, node in enumerate(tree.body):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) or any(
            isinstance(t, ast.Tuple) and any(isinstance(e, ast.Name) and e.id == name for e in t.elts) for t in targets
        ):
            after = tree.body[i + 1] if i + 1 < len(tree.body) else None
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                return True
            return lines[node.lineno - 2].lstrip().startswith("#:")
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), mod.__package__ or modname)
            return has_docstring(source, name, obj)
    return False


def test_every_public_name_is_in_the_api_pages():
    names = documented_names()
    ids = {id(o) for o in map(resolve, names) if not isinstance(o, SHARED) and not inspect.ismodule(o)}
    missing = []
    for modname in public_modules():
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or f"{modname}.{name}" in names:
                continue
            if not isinstance(obj, SHARED) and id(obj) in ids:
                continue
            missing.append(f"{modname}.{name}")
    assert not missing, f"public names missing from docs/api/*.rst: {missing}"


def test_every_documented_name_exists_and_has_a_docstring():
    undocumented = []
    for dotted in sorted(documented_names()):
        modname, _, name = dotted.rpartition(".")
        obj = resolve(dotted)  # AttributeError: the page names something that does not exist
        if importlib.util.find_spec(modname) is None or not has_docstring(modname, name, obj):
            undocumented.append(dotted)
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_every_api_page_is_in_the_toctree():
    index = (API / "index.rst").read_text(encoding="utf-8")
    pages = {p.stem for p in API.glob("*.rst")} - {"index"}
    assert pages <= set(re.findall(r"^   (\w+)$", index, re.M))
