"""Sphinx configuration of qkv's reference site (``./dev docs`` builds it into ``docs/_build/html``).

Offline by design: no intersphinx (it would fetch inventories), no MathJax (a CDN script), the
bundled alabaster theme. ``nitpicky`` plus ``-W`` turn every reference that does not resolve into an
error, so a docstring that names something that does not exist fails the build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from sphinx.util import logging

logger = logging.getLogger("qkv.docs")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

project = "qkv"
author = "the qkv authors"
copyright = "the qkv authors, MIT licence"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # an "Attributes:" section is a field list: the attributes are documented once, as members
napoleon_custom_sections = [("Options", "params_style")]  # a backend's keyword arguments, listed like Args

myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "qkv"
html_theme_options = {"page_width": "1280px", "sidebar_width": "240px", "show_relbars": True}
html_static_path: list[str] = []

# Names outside qkv: no inventory is fetched (offline), so references to them stay plain text.
nitpick_ignore_regex = [
    ("py:.*", r"(torch|numpy|np|collections|typing|os|pathlib|datetime|transformers|tokenizers|matplotlib)(\..+)?"),
    ("py:class", r"Tensor|Module"),  # torch's, named by string annotations under ``if TYPE_CHECKING``
    ("py:class", r"qkv\..*\.T"),  # type variables
]


def _import_dotted(path: str) -> Any:
    """The Python object a dotted ``qkv...`` name denotes, or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):  # import the longest module prefix, then read attributes as Python
        try:
            importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    try:
        obj: Any = importlib.import_module(parts[0])
        for attr in parts[1:]:  # ``qkv.analysis.capture`` is the function that shadows its module
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return None
    return obj


_SHARED = (int, float, complex, str, bytes, bool, type(None))  # values Python may share between names


def _documented(env: Any) -> dict[int, str]:
    """id of each documented object (function, class, method, property, a data object such as a dict)
    -> the name it is documented under."""
    out: dict[int, str] = {}
    for name in env.get_domain("py").objects:
        obj = _import_dotted(name)
        if obj is not None and not isinstance(obj, _SHARED) and not inspect.ismodule(obj):
            out.setdefault(id(obj), name)
    return out


def _candidates(node: Any) -> list[str]:
    """The dotted names a reference may mean: itself when it starts with ``qkv.``; otherwise the name
    looked up where the reference stands (class, then module) and where its docstring was written
    (a function documented as ``qkv.analysis.attention_flow`` is written in ``qkv.analysis.measures``)."""
    target = node.get("reftarget", "").lstrip(".~")
    if target.startswith("qkv."):
        return [target]
    scopes = []
    mod, cls = node.get("py:module"), node.get("py:class")
    if mod and cls:
        scopes.append(f"{mod}.{cls}")
    if mod:
        scopes.append(mod)
    written = re.search(r"docstring of ([\w.]+)", str(node.source or ""))
    if written:
        parts = written.group(1).split(".")
        for i in range(len(parts), 0, -1):
            scope = ".".join(parts[:i])
            scopes.append(scope)
            obj = _import_dotted(scope)
            if inspect.isfunction(obj) and obj.__module__.startswith("qkv."):
                owner = obj.__qualname__.rpartition(".")[0]  # a method's class
                scopes += [f"{obj.__module__}.{owner}", obj.__module__] if owner else [obj.__module__]
            elif inspect.isclass(obj):  # and the classes it inherits docstrings from
                scopes += [c.__module__ for c in obj.__mro__ if c.__module__.startswith("qkv.")]
    return [f"{s}.{target}" for s in scopes]


def _resolve_reexport(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference that Sphinx's own lookup missed, to the object Python would find for it:
    ``qkv.analysis.measures.head_table`` (the defining module's path) or ``flow_graph`` in a docstring
    of ``qkv.analysis.measures`` goes to the same object where the reference documents it
    (``qkv.analysis.head_table``, ``qkv.analysis.measures.flow_graph``). A name that denotes no object,
    or an object documented nowhere, stays unresolved, and ``nitpicky`` reports it."""
    if node.get("refdomain") != "py":
        return None
    if not hasattr(env, "_qkv_documented"):
        env._qkv_documented = _documented(env)
    py = env.get_domain("py")
    for path in _candidates(node):
        if path in py.objects:
            name = path
        else:
            obj = _import_dotted(path)
            name = env._qkv_documented.get(id(obj)) if obj is not None else None
        if name is not None:
            return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)
    return None


def _dataclass_signature(app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None,
                         return_annotation: str | None) -> tuple[str | None, str | None] | None:
    """A dataclass field with ``default_factory`` shows as ``=<factory>``, which Sphinx cannot parse
    (it then splits the signature at every comma); show the factory's call instead."""
    if signature and "<factory>" in signature and dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.default_factory is not dataclasses.MISSING:
                call = f"{getattr(f.default_factory, '__name__', 'factory')}()"
                signature = re.sub(rf"(\b{f.name}: [^=]*?=\s*)<factory>", rf"\g<1>{call}", signature, count=1)
        return signature, return_annotation
    return None


def _napoleon_skipping_attributes(app: Any) -> None:
    """napoleon reads an attribute's docstring as ``type: description``; ours are prose (``Forward
    operations if every pair met: 2 B H Lq Lk (D + Dv)``), so it only formats functions, classes and
    modules here."""
    from sphinx.ext.napoleon import _process_docstring

    for listener in list(app.events.listeners["autodoc-process-docstring"]):
        if listener.handler is _process_docstring:
            app.disconnect(listener.id)

    def process(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
        if what not in ("attribute", "data", "property"):
            _process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)


def _public_modules() -> list[str]:
    """Every module of the library (``qkv.apps`` and ``qkv.cli`` are commands, not API)."""
    src = ROOT / "src"
    names = []
    for f in sorted((src / "qkv").rglob("*.py")):
        name = ".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        if not name.startswith(("qkv.apps", "qkv.cli", "qkv.__main__")):
            names.append(name)
    return names


def _check_coverage(app: Any, env: Any) -> None:
    """Every name in the ``__all__`` of every public module is in the reference: documented under that
    name, or (a function or class re-exported) as the same object under another name. autodoc skips a
    name it finds no documentation for without a word; this says which, so ``-W`` fails the build."""
    documented = set(env.get_domain("py").objects)
    ids = _documented(env)
    for modname in _public_modules():
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or f"{modname}.{name}" in documented:
                continue
            if not isinstance(obj, _SHARED) and id(obj) in ids:  # the same object, documented elsewhere
                continue
            logger.warning(f"{modname}.{name} is in __all__ but not in the API reference (docs/api/)")


def setup(app: Any) -> None:
    _napoleon_skipping_attributes(app)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-process-signature", _dataclass_signature)
    app.connect("env-check-consistency", _check_coverage)
