"""Mutation testing of qkv's core with mutmut 3: ``./dev mutants [--group G] [--only GLOB] [--jobs N]``.

Not part of CI: every surviving mutant costs a run of the tests that reach its function, which is slow
on two cores. Each group is mutated against its own test files:

    masks     src/qkv/masks/*.py            tests/masks/
    scores    src/qkv/scores.py             tests/test_scores.py
    backends  src/qkv/backends/*.py         tests/backends/, tests/test_attention.py
    measures  src/qkv/analysis/measures.py  tests/analysis/test_measures.py

A group runs in its own scratch folder ``.mutants/<group>/`` (git-ignored): a copy of ``src/`` and
``tests/`` and a ``pyproject.toml`` with the group's ``[tool.mutmut]`` table. mutmut keeps its results
there, so a rerun only tests the mutants of functions that changed. ``--only`` takes mutmut's mutant
names with ``*`` (``qkv.backends.tiled.x_merge*``, ``qkv.scores.xǁ_Alibiǁ*``); ``--core`` is the
curated subset of numerically critical functions that a run on two cores can finish in reasonable
time. The tests that compile with ``torch.compile`` (FlexAttention) are deselected: mutmut's
trampolines do not compile. At the end it prints, per mutated file, how many mutants were killed,
survived, timed out or reached no test, and writes the survivors' diffs to
``.mutants/<group>/survivors.txt``.
"""

from __future__ import annotations

import argparse
import filecmp
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).with_name("mutmut")

GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "masks": (["src/qkv/masks/*.py"], ["tests/masks/"]),
    "scores": (["src/qkv/scores.py"], ["tests/test_scores.py"]),
    "backends": (["src/qkv/backends/*.py"], ["tests/backends/", "tests/test_attention.py"]),
    "measures": (["src/qkv/analysis/measures.py"], ["tests/analysis/test_measures.py"]),
}

CORE: dict[str, list[str]] = {
    "masks": ["qkv.masks.positional.xǁ_Windowǁ*", "qkv.masks.base.xǁMaskǁblock_kinds*"],
    "scores": ["qkv.scores.xǁ_Alibiǁ*", "qkv.scores.x_alibi*", "qkv.scores.xǁ_Softcapǁ*"],
    "backends": [
        "qkv.backends.tiled.x_merge*",
        "qkv.backends.tiled.x__eager_span*",
        "qkv.backends.reference.x_softmax_rows*",
        "qkv.backends.sdpa.*",
    ],
    "measures": [
        "qkv.analysis.measures.x_head_entropy*",
        "qkv.analysis.measures.x_mean_distance*",
        "qkv.analysis.measures.x_mass_on*",
        "qkv.analysis.measures.x_offset_mass*",
        "qkv.analysis.measures.x__head_mean*",
    ],
}
"""``--core``: the functions whose bugs give wrong numbers (softmax, merge, masks' tile kinds, measures)."""

STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", None: "not checked"}
TIMEOUT_CODES = {-24, 24, 36, 152, 255}


def _status(code: int | None) -> str:
    if code in TIMEOUT_CODES:
        return "timeout"
    return STATUS.get(code, "other")


def _toml_list(xs: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def _prepare(group: str) -> Path:
    """Sync ``src/`` and ``tests/`` into the group's scratch folder and write its ``pyproject.toml``."""
    mutate, tests = GROUPS[group]
    work = ROOT / ".mutants" / group
    work.mkdir(parents=True, exist_ok=True)
    for d in ("src", "tests"):
        shutil.copytree(
            ROOT / d, work / d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis")
        )
    # mutmut copies a file it does not mutate only when its copy is missing: drop stale copies
    copied = work / "mutants" / "src"
    if copied.is_dir():
        for f in copied.rglob("*.py"):
            rel = f.relative_to(work / "mutants")
            if not any(fnmatch.fnmatch(str(rel), p) for p in mutate):
                src = ROOT / rel
                if not src.exists() or not filecmp.cmp(src, f, shallow=False):
                    f.unlink()
    table = (
        "\n[tool.mutmut]\n"
        'source_paths = ["src/"]\n'
        f"only_mutate = {_toml_list(mutate)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-k", "not flex"]\n'
        'process_isolation = "forkserver"\n'
        "timeout_constant = 10.0\n"
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + table)
    return work


def _summary(work: Path, only: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Counts of each status per mutated file (mutants matching ``only``, or all), and the survivors."""
    counts: dict[str, dict[str, int]] = {}
    survivors: list[str] = []
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        name = str(meta.relative_to(work / "mutants"))[: -len(".meta")]
        c = counts.setdefault(name, {})
        for key, code in data["exit_code_by_key"].items():
            if only and not any(fnmatch.fnmatch(key, p) for p in only):
                continue
            s = _status(code)
            c[s] = c.get(s, 0) + 1
            if s == "survived":
                survivors.append(key)
    return {k: v for k, v in counts.items() if v}, survivors


def run_group(group: str, only: list[str], jobs: int) -> int:
    work = _prepare(group)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ""}
    print(f"== mutants: {group} ({', '.join(GROUPS[group][0])} against {', '.join(GROUPS[group][1])})", flush=True)
    cmd = [str(MUTMUT), "run", "--max-children", str(jobs), *only]
    with open(work / "mutmut.log", "w") as log:
        rc = subprocess.call(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    counts, survivors = _summary(work, only)
    with open(work / "survivors.txt", "w") as fh:
        for key in survivors:
            diff = subprocess.run([str(MUTMUT), "show", key], cwd=work, env=env, capture_output=True, text=True).stdout
            fh.write(diff + "\n")
    cols = ("killed", "survived", "timeout", "no tests", "not checked", "other")
    print(f"{'file':<34}" + "".join(f"{c:>12}" for c in cols))
    for name, c in counts.items():
        print(f"{name:<34}" + "".join(f"{c.get(k, 0):>12}" for k in cols))
    print(f"survivors' diffs: {work / 'survivors.txt'}; mutmut's log: {work / 'mutmut.log'} (exit {rc})", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./dev mutants", description=__doc__.split("\n")[0])
    p.add_argument("--group", action="append", choices=sorted(GROUPS), help="group(s) to mutate (default: all)")
    p.add_argument(
        "--only", action="append", default=[], help="mutant-name glob(s), e.g. 'qkv.backends.tiled.x_merge*'"
    )
    p.add_argument("--core", action="store_true", help="only the curated subset of numerically critical functions")
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    a = p.parse_args(argv)
    if not MUTMUT.exists():
        print(f"mutmut is not installed in {MUTMUT.parent}: pip install -e '.[mutants]'", file=sys.stderr)
        return 2
    rc = 0
    for g in a.group or sorted(GROUPS):
        only = list(a.only) + (CORE[g] if a.core else [])
        only = [o for o in only if o.startswith(_module_prefix(g))] if a.only or a.core else []
        if (a.only or a.core) and not only:
            continue
        rc |= run_group(g, only, a.jobs)
    return rc


def _module_prefix(group: str) -> str:
    return {"masks": "qkv.masks.", "scores": "qkv.scores.", "backends": "qkv.backends.", "measures": "qkv.analysis."}[
        group
    ]


if __name__ == "__main__":
    raise SystemExit(main())
