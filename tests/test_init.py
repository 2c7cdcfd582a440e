"""``import qkv`` stays light (modules, models, analysis and commands load on first use, PEP 562),
``qkv.nn``, ``qkv.models``, ``qkv.analysis``, ``qkv.distributed`` work after a bare ``import qkv``, and
``qkv.BACKENDS`` is read afresh each time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import qkv

SRC = os.path.dirname(os.path.dirname(os.path.abspath(qkv.__file__)))


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    return r.stdout


@pytest.mark.slow
def test_import_qkv_loads_no_module_layer_no_plotting_and_no_dynamo():
    out = _python(
        "import sys, qkv\n"
        # torch._dynamo: seconds of import, paid by every spawned rank and command if qkv loaded it
        "heavy = ('qkv.nn', 'qkv.models', 'qkv.analysis', 'qkv.apps', 'matplotlib', 'tokenizers', 'safetensors',"
        " 'torch._dynamo')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "print(qkv.nn.MultiHeadAttention.__name__, qkv.models.GPT.__name__, qkv.analysis.capture.__name__,"
        " qkv.distributed.SequenceParallelAttention.__name__)\n"
    )
    first, second = out.splitlines()
    assert first == "[]"
    assert second == "MultiHeadAttention GPT capture SequenceParallelAttention"


def test_lazy_names_are_listed_and_unknown_names_raise():
    assert {"nn", "models", "analysis", "distributed", "attention", "masks"} <= set(dir(qkv))
    assert qkv.nn is sys.modules["qkv.nn"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qkv.nope  # noqa: B018


def test_backends_is_current_when_read(tmp_path):
    """Not a snapshot of import time: a backend registered later, and ``ring``/``ulysses`` once
    ``torch.distributed`` is initialised (a one-process gloo group), appear; unregistered ones go."""
    import torch.distributed as dist

    from qkv import backends

    assert qkv.BACKENDS == backends.available() and "BACKENDS" in dir(qkv)
    from qkv import BACKENDS  # the from-import works too (PEP 562) and copies the tuple of the moment

    assert BACKENDS == qkv.BACKENDS
    late = type("Late", (backends.Backend,), {"name": "late"})()
    backends.register(late)
    try:
        assert "late" in qkv.BACKENDS
    finally:
        backends.unregister("late")
    assert "late" not in qkv.BACKENDS
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    assert "ring" not in qkv.BACKENDS and not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert {"ring", "ulysses"} <= set(qkv.BACKENDS)
    finally:
        dist.destroy_process_group()
    assert "ring" not in qkv.BACKENDS
