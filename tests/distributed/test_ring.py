"""Ring and Ulysses attention, spawned on 2 and 4 gloo ranks over 127.0.0.1, against the float64 reference.

The cases themselves live in ``dist_worker.py`` (one process per rank, started here with a file store
in ``tmp_path``); single-process checks of the layout helpers and argument errors are below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from qkv.distributed import global_positions, zigzag_split, zigzag_unshuffle

WORKER = Path(__file__).with_name("dist_worker.py")


def _launch(scenario: str, world: int, tmp_path: Path, timeout: float, extra_env: dict[str, str] | None = None):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(r), str(world), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[int], list[str]]:
    """The ``check`` and ``large`` scenarios run by the same two ranks: one start of two processes
    (torch, qkv and gloo: ~3 s of CPU each) instead of two."""
    return _launch("check,large", 2, tmp_path_factory.mktemp("two_ranks"), timeout=240)


def _each_rank_passed(codes: list[int], outs: list[str], world: int) -> None:
    for r, (c, out) in enumerate(zip(codes, outs)):
        assert c == 0, f"rank {r} of {world} failed:\n{out[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_ulysses_match_reference(world: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    codes, outs = request.getfixturevalue("two_ranks") if world == 2 else _launch("check", world, tmp_path, 120)
    _each_rank_passed(codes, outs, world)
    for out in outs:
        checks = out.count("ok ") - out.count("ok large ")
        assert checks == 18 + 2 * (world == 4), out  # + subgroup cases on 4 ranks


@pytest.mark.slow
def test_ring_with_large_scores(two_ranks: tuple[list[int], list[str]]) -> None:
    """Scores of 1e2, 1e4, 1e8 (float32, bfloat16) merged across 2 ranks: finite, within the 2x rule."""
    codes, outs = two_ranks
    _each_rank_passed(codes, outs, 2)
    for out in outs:
        assert out.count("ok large ") == 3 * 2 * 3, out


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank_fast(tmp_path: Path) -> None:
    codes, outs = _launch("fail", 2, tmp_path, timeout=60, extra_env={"QKV_TEST_TIMEOUT": "3"})
    for r, (c, out) in enumerate(zip(codes, outs)):
        assert c != 0, f"rank {r} should have failed:\n{out[-3000:]}"
        assert "RankFailedError" in out and "rank 1: ValueError: rank one fails on purpose" in out, out[-3000:]


def test_zigzag_split_positions_and_inverse() -> None:
    x = torch.arange(2 * 3 * 24).view(2, 3, 24, 1)
    world = 3
    shards = [zigzag_split(x, r, world) for r in range(world)]
    assert shards[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    assert shards[1][0, 0, :, 0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    assert torch.equal(zigzag_unshuffle(shards), x)
    for r in range(world):
        assert torch.equal(global_positions("zigzag", r, world, 8), shards[r][0, 0, :, 0])
        assert global_positions("contiguous", r, world, 8).tolist() == list(range(8 * r, 8 * r + 8))
    with pytest.raises(ValueError, match="divisible by 2 \\* world = 6"):
        zigzag_split(torch.zeros(1, 1, 10, 2), 0, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        global_positions("striped", 0, 2, 8)


def test_ring_backend_needs_a_process_group() -> None:
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="backend 'ring' is not available"):
        qkv.attention(q, q, q, backend="ring")
