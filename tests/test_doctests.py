"""The examples in the docstrings and in the docs pages run as written (doctest).

Every module under ``src/qkv`` whose source holds a ``>>>`` example is one test; every Markdown page under
``docs/`` with ``pycon`` blocks is one test (its blocks run in order, sharing names, as a reader would type
them). Options: ``ELLIPSIS`` (``...`` stands for any text, for machine-dependent figures such as
``qkv.explain``'s estimates) and ``NORMALIZE_WHITESPACE``.
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    names = []
    for f in sorted((SRC / "qkv").rglob("*.py")):
        if ">>> " in f.read_text(encoding="utf-8"):
            names.append(".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"))
    return names


def _pages_with_examples() -> list[Path]:
    return [p for p in sorted((ROOT / "docs").rglob("*.md")) if "```pycon" in p.read_text(encoding="utf-8")]


def _run(test: doctest.DocTest, runner: doctest.DocTestRunner, out: io.StringIO) -> None:
    runner.run(test, out=out.write)


def test_there_are_examples_to_run():
    assert {"qkv.attention", "qkv.masks", "qkv.scores"} <= set(_modules_with_examples())


@pytest.mark.parametrize("modname", _modules_with_examples())
def test_docstring_examples(modname):
    mod = importlib.import_module(modname)
    tests = doctest.DocTestFinder(exclude_empty=True).find(mod, modname)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    for t in sorted(tests, key=lambda t: t.name):
        _run(t, runner, out)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{modname} has '>>> ' in its source but doctest found no example"
    assert result.failed == 0, out.getvalue()


def pycon_only(text: str) -> str:
    """The page with every line outside its ```pycon blocks blanked: doctest's line numbers stay the page's."""
    lines, inside = [], False
    for line in text.splitlines():
        if re.match(r"^```pycon\s*$", line):
            inside = True
            lines.append("")
        elif inside and re.match(r"^```\s*$", line):
            inside = False
            lines.append("")
        else:
            lines.append(line if inside else "")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_examples(page):
    text = pycon_only(page.read_text(encoding="utf-8"))
    test = doctest.DocTestParser().get_doctest(text, {}, page.name, str(page), 0)
    assert test.examples, f"{page} has ```pycon blocks but no >>> example"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    _run(test, runner, out)
    assert runner.summarize(verbose=False).failed == 0, out.getvalue()
