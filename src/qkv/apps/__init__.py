"""The commands: ``qkv demo``, ``qkv train <task>``, ``qkv bench``, ``qkv inspect``. The only code of
qkv that prints (the library returns values, logs and reports progress through callbacks).

- :mod:`qkv.apps.demo`: train translators with and without attention, write a report folder;
- :mod:`qkv.apps.tasks`: small attention models on data that ships with Python or its packages;
- :mod:`qkv.apps.bench`: time and memory of the backends against their peers;
- :mod:`qkv.apps.inspect`: a real pretrained encoder's heads on a text.

:func:`run_command` runs one by name; a missing optional dependency ends it with exit status 2 and a
one-line message naming the extra to install, not a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["COMMANDS", "EXTRAS", "run_command"]

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("qkv.apps.demo", "run_demo"),
    "train": ("qkv.apps.tasks", "run_task"),
    "bench": ("qkv.apps.bench", "run_bench"),
    "inspect": ("qkv.apps.inspect", "run_inspect"),
}
"""Command name -> (module, function returning the exit status)."""

EXTRAS: dict[str, tuple[str, str]] = {
    "num2words": ("num2words", "demo"),
    "sklearn": ("scikit-learn", "demo"),
    "rdkit": ("rdkit", "chem"),
}
"""Top-level module of an optional dependency -> (its PyPI name, the extra of ``pyproject.toml`` that
installs it)."""


def run_command(command: str, *args: Any, **kwargs: Any) -> int:
    """Run ``command`` (a key of :data:`COMMANDS`) with ``args`` and ``kwargs``; return its exit status.

    Exit status 2 with one line on stderr when an optional dependency of :data:`EXTRAS` is missing."""
    module, function = COMMANDS[command]
    try:
        run = getattr(importlib.import_module(module), function)
        return int(run(*args, **kwargs) or 0)
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRAS:
            raise
        package, extra = EXTRAS[top]
        print(
            f"qkv {command}: this command needs {package}, which is not installed;"
            f" install it with: pip install 'qkv[{extra}]'",
            file=sys.stderr,
        )
        return 2
