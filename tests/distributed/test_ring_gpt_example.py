"""examples/ring_gpt.py: under torchrun, sequence-parallel training gives the losses of one process;
the DDP mode trains too. The three runs go concurrently to save wall time."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ring_gpt.py"
ARGS = ["--steps", "5", "--seq-len", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **extra}


def _direct(world: int, *args: str) -> list[subprocess.Popen[str]]:
    """Start the example's ranks by hand (the environment torchrun would set), rank 0 first."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), *ARGS, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(world)
    ]


def _losses(procs: list[subprocess.Popen[str]]) -> list[float]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])  # five processes start torch at once on two cores
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", outs[0])]


@pytest.mark.slow
def test_ring_gpt_example() -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE)]
    ring2 = [
        subprocess.Popen([*torchrun, *ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    ]
    ring1 = _direct(1)
    ddp2 = _direct(2, "--mode", "ddp")
    two, one, ddp = _losses(ring2), _losses(ring1), _losses(ddp2)
    assert len(one) == len(two) == len(ddp) == 2  # steps 1 and 5
    for a, b in zip(one, two):  # the sequence split over two ranks trains exactly like one process
        assert abs(a - b) < 1e-3, (one, two)
    assert two[-1] < two[0] and ddp[-1] < ddp[0]
