"""A command whose optional dependency is missing exits with status 2 and one line naming the extra to install
(the module hidden by ``sys.modules[name] = None``, in a fresh interpreter); other import errors still raise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import qkv
from qkv.apps import COMMANDS, run_command

SRC = os.path.dirname(os.path.dirname(os.path.abspath(qkv.__file__)))


def _qkv_without(module: str, argv: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; sys.modules[{module!r}] = None; from qkv.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False
    )


@pytest.mark.parametrize(
    ("module", "argv", "package"),
    [("num2words", ["demo", "--quick"], "num2words"), ("sklearn", ["train", "vit", "--quick"], "scikit-learn")],
)
@pytest.mark.slow
def test_missing_extra_exits_2_with_one_line(tmp_path, module, argv, package):
    r = _qkv_without(module, argv + ["--out", str(tmp_path / "out")], str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "it/s" not in ln and "step/s" not in ln]
    assert len(lines) == 1, r.stderr
    assert package in lines[0] and "pip install 'qkv[demo]'" in lines[0] and lines[0].startswith(f"qkv {argv[0]}:")
    assert "Traceback" not in r.stderr


def test_other_import_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setitem(COMMANDS, "nothing", ("qkv_there_is_no_such_module", "run"))
    with pytest.raises(ModuleNotFoundError, match="qkv_there_is_no_such_module"):
        run_command("nothing")


def test_every_subcommand_reaches_a_command_function():
    import importlib

    from qkv.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for module, function in COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), function))
