"""A task is one module of ``qkv.apps.tasks`` that defines ``train``: found, run and listed with no list to edit."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import qkv.apps.tasks as tasks_pkg
from qkv.apps.tasks import run_task, tasks, train_task

TOY = '''
"""``qkv train toytask``: a task written in one file for this test."""
from qkv.apps.tasks.common import TaskResult


def train(out=None, quick=False, seed=0, progress=False):
    return TaskResult(task="toytask", metric_name="answer", metric=42.0 + seed, baseline_name="none", baseline=0.0,
                      losses=[1.0, 0.5], files=[], notes=["quick" if quick else "full"])
'''


@pytest.fixture
def toy_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A task module in a folder of its own, added to the package's search path for one test."""
    (tmp_path / "toytask.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(tasks_pkg, "__path__", [*tasks_pkg.__path__, str(tmp_path)])
    yield "toytask"
    sys.modules.pop("qkv.apps.tasks.toytask", None)


def test_the_tasks_are_the_modules_that_define_train() -> None:
    found = tasks()
    assert list(found) == ["caption", "forecast", "lm", "molecule", "recsys", "speech", "vit"]
    assert not {"common", "decoder", "digit_scenes", "spoken"} & set(found)  # helpers, not tasks
    assert found["molecule"].startswith("attention over the atoms of a molecule")
    assert all(summary and not summary.startswith("``") for summary in found.values())


def test_a_task_in_one_new_module_is_found_run_and_listed(toy_task: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert tasks()[toy_task] == "a task written in one file for this test."
    result = train_task(toy_task, quick=True, seed=1)
    assert (result.metric, result.notes) == (43.0, ["quick"])
    assert run_task("no-such-task") == 2
    err = capsys.readouterr().err
    assert "unknown task 'no-such-task'" in err and "toytask" in err and "molecule" in err


def test_an_unknown_task_is_a_value_error_naming_the_tasks() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'.*lm"):
        train_task("nope")
