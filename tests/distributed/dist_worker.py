"""One rank of the spawned distributed tests: ``python dist_worker.py SCENARIO[,SCENARIO] RANK WORLD STORE_FILE``.

``check``: ring and Ulysses attention on local shards against the float64 single-process reference,
forward and backward, for several masks and layouts. ``large``: ring attention on scores of about 1e2,
1e4 and 1e8 in float32 and bfloat16. ``fail``: rank 1 raises inside
``fail_together`` while rank 0 waits in the ring; both must exit with ``RankFailedError``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qkv  # noqa: E402
import qkv.backends.ring as ring_mod  # noqa: E402
from oracle import FLOOR, low_precision_reference, oracle  # noqa: E402
from qkv.distributed import (  # noqa: E402
    SequenceParallelAttention,
    comm_stats,
    fail_together,
    ring_attention,
    ulysses_attention,
    zigzag_gather,
    zigzag_split,
)
from qkv.masks import causal, document, padding, sliding_window  # noqa: E402


def shard(x: torch.Tensor, layout: str, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    if layout == "zigzag":
        return zigzag_split(x, rank, world, dim=dim)
    return x.chunk(world, dim=dim)[rank]


def check_case(
    name: str,
    rank: int,
    world: int,
    *,
    strategy: str,
    layout: str,
    mask_fn,
    H: int = 4,
    Hkv: int = 4,
    dtype: torch.dtype = torch.float32,
    api: str = "function",
    ids: torch.Tensor | None = None,
    tile: int = 256,
    group: object = None,
    seed: int = 1234,
    size: float = 1.0,
) -> None:
    """``size`` scales the scores (``q`` is multiplied by it): then the floor of the rule scales with each
    tensor's magnitude, and the gradients' floor with ``size`` too (the backward recomputes
    ``exp(S - lse)`` from a float32 logsumexp); at 1e8 the gradients are checked finite only."""
    ring_mod.TILE = tile  # sub-tiles of partial chunk pairs (small: exercise the sub-tile plan)
    g = torch.Generator().manual_seed(seed)
    B, n, D = 2, 8, 8
    L = n * world
    q = (torch.randn(B, H, L, D, generator=g) * size).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    dout = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    full_mask = mask_fn(ids)
    ref = oracle(q, k, v, dout, mask=full_mask)
    base = low_precision_reference(q, k, v, dout, mask=full_mask)
    local_ids = None if ids is None else shard(ids, layout, rank, world, dim=-1)
    local_mask = mask_fn(local_ids)
    ql, kl, vl = (shard(t, layout, rank, world).clone().requires_grad_(True) for t in (q, k, v))
    if api == "function":
        fn = ring_attention if strategy == "ring" else ulysses_attention
        out = fn(ql, kl, vl, mask=local_mask, layout=layout, group=group)
    else:
        out = qkv.attention(ql, kl, vl, mask=local_mask, backend=strategy, layout=layout, group=group)
    out.backward(shard(dout, layout, rank, world))
    got = (out.detach(), ql.grad, kl.grad, vl.grad)
    for what, gt, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        r_l, b_l = shard(r, layout, rank, world), shard(b, layout, rank, world)
        assert torch.isfinite(gt).all(), f"{name} rank {rank}: {what} is not finite"
        if what != "out" and size > 1e4:
            continue
        err = (gt.double() - r_l).abs().max().item()
        floor = FLOOR[dtype] * (1.0 if size == 1.0 else max(1.0, r_l.abs().max().item()))
        floor *= 1.0 if what == "out" else size
        tol = 2 * (b_l.double() - r_l).abs().max().item() + floor
        assert err <= tol, f"{name} rank {rank}: {what} error {err:.3g} > {tol:.3g}"
    print(f"ok {name}", flush=True)


def check_module(rank: int, world: int, strategy: str) -> None:
    """SequenceParallelAttention on shards == the same weights on the whole sequence (float64 reference)."""
    torch.manual_seed(7)
    mod = SequenceParallelAttention(16, 4, 2, strategy=strategy, layout="zigzag").double()
    x = torch.randn(2, 8 * world, 16, dtype=torch.float64)
    B, L, E = x.shape
    q = mod.q_proj(x).view(B, L, 4, 4).transpose(1, 2)
    k, v = mod.kv_proj(x).view(B, L, 2, 2, 4).permute(2, 0, 3, 1, 4)
    o = qkv.attention(q, k, v, mask=causal(), backend="reference")
    want = mod.out_proj(o.transpose(1, 2).reshape(B, L, E))
    got = mod(zigzag_split(x, rank, world, dim=1), mask=causal())
    assert torch.allclose(got, zigzag_split(want, rank, world, dim=1), atol=1e-12), f"module {strategy} differs"
    back = zigzag_gather(got.detach(), dim=1)
    assert torch.allclose(back, want.detach(), atol=1e-12), "zigzag_gather is not the inverse of zigzag_split"
    print(f"ok module {strategy}", flush=True)


def scenario_check(rank: int, world: int) -> None:
    ids = torch.tensor([0] * 5 + [1] * (4 * world) + [2] * (4 * world - 5))  # 8 * world tokens, 3 documents
    doc_causal = lambda i: document(i) & causal()  # noqa: E731
    L = 8 * world  # padded rows and keys, per batch row, on global positions (some query rows see nothing)
    pad = padding([L - 5, L // 2 + 1], q_lengths=[L - 3, L // 2])
    cases = [
        ("ring dense zigzag", dict(strategy="ring", layout="zigzag", mask_fn=lambda i: None)),
        ("ring causal zigzag gqa", dict(strategy="ring", layout="zigzag", mask_fn=lambda i: causal(), Hkv=2)),
        ("ring causal contiguous mqa", dict(strategy="ring", layout="contiguous", mask_fn=lambda i: causal(), Hkv=1)),
        ("ring causal contiguous", dict(strategy="ring", layout="contiguous", mask_fn=lambda i: causal())),
        (
            "ring window contiguous",
            dict(strategy="ring", layout="contiguous", mask_fn=lambda i: sliding_window(5), tile=2),
        ),
        (
            "ring window zigzag backend",
            dict(strategy="ring", layout="zigzag", mask_fn=lambda i: sliding_window(3, 2), api="qkv.attention", tile=1),
        ),
        ("ring document causal zigzag", dict(strategy="ring", layout="zigzag", mask_fn=doc_causal, ids=ids, tile=2)),
        (
            "ring padding causal zigzag",
            dict(strategy="ring", layout="zigzag", mask_fn=lambda i: pad & causal(), tile=2),
        ),
        (
            "ring causal zigzag float64",
            dict(strategy="ring", layout="zigzag", mask_fn=lambda i: causal(), dtype=torch.float64, tile=2),
        ),
        ("ulysses causal zigzag gqa", dict(strategy="ulysses", layout="zigzag", mask_fn=lambda i: causal(), Hkv=2)),
        (
            "ring causal zigzag gqa bfloat16",
            dict(strategy="ring", layout="zigzag", mask_fn=lambda i: causal(), Hkv=2, dtype=torch.bfloat16, tile=2),
        ),
        (
            "ulysses window contiguous bfloat16",
            dict(strategy="ulysses", layout="contiguous", mask_fn=lambda i: sliding_window(5), dtype=torch.bfloat16),
        ),
        (
            "ulysses window contiguous backend",
            dict(strategy="ulysses", layout="contiguous", mask_fn=lambda i: sliding_window(5), api="qkv.attention"),
        ),
        (
            "ulysses document causal zigzag mqa",
            dict(strategy="ulysses", layout="zigzag", mask_fn=doc_causal, ids=ids, Hkv=1),
        ),
    ]
    for name, kw in cases:
        check_case(name, rank, world, **kw)  # type: ignore[arg-type]
    check_module(rank, world, "ring")
    check_module(rank, world, "ulysses")
    # a causal window of 5 keys over shards of 8 reaches only the previous rank: 2 ring steps, not world
    comm_stats.reset()
    q = torch.randn(1, 2, 8, 4)
    ring_attention(q, q, q, mask=sliding_window(5), layout="contiguous")
    kv_bytes = 2 * q.numel() * q.element_size()
    assert comm_stats.bytes_sent == kv_bytes * 1, f"window: sent {comm_stats.bytes_sent} bytes, want {kv_bytes}"
    comm_stats.reset()
    ring_attention(q, q, q, layout="contiguous")
    assert comm_stats.bytes_sent == kv_bytes * (world - 1), f"dense: sent {comm_stats.bytes_sent} bytes"
    print("ok traffic", flush=True)
    check_errors(world)
    if world == 4:  # two independent groups of two ranks, each with its own sequence
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        grp = groups[rank // 2]
        for strategy in ("ring", "ulysses"):
            check_case(
                f"{strategy} subgroup",
                dist.get_rank(grp),
                2,
                strategy=strategy,
                layout="zigzag",
                mask_fn=lambda i: causal(),
                Hkv=2,
                group=grp,
                seed=rank // 2,
            )


def check_errors(world: int) -> None:
    import pytest

    q = torch.randn(1, 2, 7, 4)
    with pytest.raises(ValueError, match="even local length"):
        ring_attention(q, q, q, layout="zigzag")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="tied to a layout of the whole sequence"):
        ring_attention(q, q, q, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="striped")

    class SameKind(qkv.masks.Mask):  # a user's mask holding per-position data of its shard
        name = "same_kind"

        def __init__(self, kinds: torch.Tensor) -> None:
            self.kinds = kinds

        def evaluate(self, s, b, h, qi, ki):  # type: ignore[no-untyped-def]
            return self.kinds[qi] == self.kinds[ki]

    kinds = SameKind(torch.arange(8) % 2)
    qw = torch.randn(1, 2 * world, 8, 4)
    for fn in (ring_attention, ulysses_attention):
        with pytest.raises(NotImplementedError, match="does not say how it maps to global positions"):
            fn(qw, qw, qw, mask=qkv.masks.causal() & kinds)
    with pytest.raises(NotImplementedError, match="does not say how it maps to global positions"):
        qkv.attention(q, q, q, backend="ring", mask=kinds)
    with pytest.raises(NotImplementedError, match="takes no score mod"):
        qkv.attention(q, q, q, backend="ring", score_mod=qkv.scores.alibi(2))
    q3 = torch.randn(1, 3 * world + 1, 8, 4)
    with pytest.raises(ValueError, match="divisible by the group size"):
        ulysses_attention(q3, q3, q3)
    print("ok errors", flush=True)


def scenario_large(rank: int, world: int) -> None:
    """Scores of about 1e2, 1e4 and 1e8 in float32 and bfloat16: every merge of partial results must
    subtract the running maximum. Masks that split each rank's keys into several runs."""
    ids = torch.tensor([0] * 5 + [1] * (4 * world) + [2] * (4 * world - 5))
    masks = {
        "document causal zigzag": dict(layout="zigzag", mask_fn=lambda i: document(i) & causal(), ids=ids, tile=2),
        "window contiguous": dict(layout="contiguous", mask_fn=lambda i: sliding_window(5), tile=2),
        "causal zigzag gqa": dict(layout="zigzag", mask_fn=lambda i: causal(), Hkv=2),
    }
    for size in (1e2, 1e4, 1e8):
        for dtype in (torch.float32, torch.bfloat16):
            for name, kw in masks.items():
                check_case(f"large {size:g} {dtype} {name}", rank, world, strategy="ring", dtype=dtype, size=size, **kw)  # type: ignore[arg-type]


def scenario_fail(rank: int, world: int) -> None:
    with fail_together():
        if rank == 1:
            raise ValueError("rank one fails on purpose")
        q = torch.randn(1, 2, 8, 4)
        ring_attention(q, q, q, mask=causal())  # waits on rank 1 until the group's timeout


def main() -> None:
    scenario, rank, world, store = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    timeout = timedelta(seconds=float(os.environ.get("QKV_TEST_TIMEOUT", "30")))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
    torch.set_num_threads(1)
    try:
        for name in scenario.split(","):  # "check,large": both in these processes, one gloo start-up
            {"check": scenario_check, "large": scenario_large, "fail": scenario_fail}[name](rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
