"""``qkv train <task>``: small attention models for the applications attention serves, each trained on
this CPU in minutes on data that ships with Python or its packages (or is generated), each reporting
its metric beside a baseline.

- ``lm``: a byte-level GPT on the Python standard library's own source text (:mod:`qkv.apps.tasks.lm`);
- ``vit``: a ViT on scikit-learn's 8x8 handwritten digits, with attention-rollout maps (:mod:`qkv.apps.tasks.vit`);
- ``forecast``: an attention forecaster on Google's daily trading volume that matplotlib ships
  (:mod:`qkv.apps.tasks.forecast`);
- ``recsys``: SASRec-style next-item prediction on generated histories (:mod:`qkv.apps.tasks.recsys`);
- ``speech``: spoken digit strings synthesised by ``espeak-ng``, recognised by an attention encoder-decoder
  (:mod:`qkv.apps.tasks.speech`);
- ``caption``: scenes of handwritten digits captioned by a patch encoder and a word decoder with
  cross-attention (:mod:`qkv.apps.tasks.caption`);
- ``molecule``: attention over the atoms of generated molecules, a label defined by SMARTS substructures, and
  how much attention lands on them (:mod:`qkv.apps.tasks.molecule`; needs RDKit, the ``chem`` extra).

A task module may define ``missing() -> str | None``: what it needs and is not installed (then
``qkv train`` prints it and exits with status 2).
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from .common import TaskResult

__all__ = ["TASKS", "TaskResult", "run_task", "train_task"]

TASKS = ("lm", "vit", "forecast", "recsys", "speech", "caption", "molecule")


def train_task(
    task: str, out: str | None = None, quick: bool = False, seed: int = 0, progress: bool = False
) -> TaskResult:
    """Train ``task`` (one of :data:`TASKS`) and return its :class:`TaskResult`; ``out`` receives its files.

    Raises ``ValueError`` naming the valid tasks for an unknown one."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    mod: Any = importlib.import_module(f".{task}", __name__)
    result: TaskResult = mod.train(out=out, quick=quick, seed=seed, progress=progress)
    return result


def run_task(task: str, out: str | None = None, quick: bool = False, seed: int = 0) -> int:
    """The ``qkv train`` entry point: train, print the metric beside its baseline; returns the exit code
    (2 for an unknown task)."""
    import sys

    if task not in TASKS:
        print(f"qkv train: unknown task {task!r}; choose one of: {', '.join(TASKS)}", file=sys.stderr)
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
