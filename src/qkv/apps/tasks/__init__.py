"""``qkv train <task>``: small attention models for the applications attention serves, each trained on
this CPU in minutes on data that ships with Python or its packages (or is generated), each reporting
its metric beside a baseline.

A task is one module of this package that defines ``train(out=None, quick=False, seed=0, progress=False)
-> TaskResult``; its name is the module's name and its summary the first line of its docstring. Adding a
task is adding that module: :func:`tasks` finds it, ``qkv train NAME`` runs it and an unknown name lists
it, with no list to edit. Modules without ``train`` (``common``, ``decoder``, ``digit_scenes``,
``spoken``) are helpers the tasks share. The tasks today: ``lm`` (a byte-level GPT on the standard
library's source), ``vit`` (scikit-learn's digits), ``forecast`` (a trading-volume series matplotlib
ships), ``recsys`` (SASRec-style next item), ``speech`` (digit strings spoken by ``espeak-ng``),
``caption`` (scenes of digits) and ``molecule`` (atoms of generated molecules; RDKit, the ``chem`` extra).

A task module may also define ``missing() -> str | None``: what it needs and is not installed (then
``qkv train`` prints it and exits with status 2).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import time
from typing import Any

from .common import TaskResult

__all__ = ["TaskResult", "run_task", "tasks", "train_task"]


def tasks() -> dict[str, str]:
    """Every task of this package, by name, with its summary (the first line of the module's docstring,
    without a leading ``qkv train NAME``: label): the modules that define ``train``, in the order of their
    names."""
    found: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        mod = importlib.import_module(f".{info.name}", __name__)
        if callable(getattr(mod, "train", None)):
            first = (mod.__doc__ or "").strip().split("\n")[0]
            found[info.name] = first.removeprefix(f"``qkv train {info.name}``: ")
    return found


def train_task(
    task: str, out: str | None = None, quick: bool = False, seed: int = 0, progress: bool = False
) -> TaskResult:
    """Train ``task`` (a name of :func:`tasks`) and return its :class:`TaskResult`; ``out`` receives its files.

    Raises ``ValueError`` naming the valid tasks for an unknown one."""
    known = tasks()
    if task not in known:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(known)}")
    mod: Any = importlib.import_module(f".{task}", __name__)
    result: TaskResult = mod.train(out=out, quick=quick, seed=seed, progress=progress)
    return result


def run_task(task: str, out: str | None = None, quick: bool = False, seed: int = 0) -> int:
    """The ``qkv train`` entry point: train, print the metric beside its baseline; returns the exit code
    (2 for an unknown task)."""
    import sys

    known = tasks()
    if task not in known:
        lines = "".join(f"\n  {name:10s} {summary}" for name, summary in known.items())
        print(f"qkv train: unknown task {task!r}; choose one of:{lines}", file=sys.stderr)
        return 2
    mod: Any = importlib.import_module(f".{task}", __name__)
    need = mod.missing() if hasattr(mod, "missing") else None
    if need:
        print(f"qkv train {task}: {need}", file=sys.stderr)
        return 2
    out = out or f"qkv-train-{task}"
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    r = train_task(task, out=out, quick=quick, seed=seed, progress=True)
    print(f"{task}: {r.metric_name} {r.metric:.4g}  vs  baseline ({r.baseline_name}) {r.baseline:.4g}")
    for line in r.notes:
        print(f"  {line}")
    for f in r.files:
        print(f"  wrote {f}")
    print(f"  {len(r.losses)} steps, {time.perf_counter() - t0:.0f} s")
    return 0
