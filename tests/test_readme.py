"""The README stays true: its Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has a Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "auto ->" in capsys.readouterr().out
