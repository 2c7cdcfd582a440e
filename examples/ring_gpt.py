"""Train a small GPT with its sequence split over processes (ring or Ulysses attention), or with
data parallelism (DDP), on this CPU:

    torchrun --nproc_per_node=2 examples/ring_gpt.py --steps 20               # --mode ring (default)
    torchrun --nproc_per_node=2 examples/ring_gpt.py --steps 20 --mode ddp
    torchrun --nproc_per_node=2 examples/ring_gpt.py --steps 20 --strategy ulysses

The task is generated: each sequence counts from a random start with a random stride modulo the
vocabulary, so predicting the next token needs attention to earlier tokens (to read the stride).

``--mode ring``: every rank sees the same batch but only its zigzag shard of each sequence
(``qkv.distributed.zigzag_split``); attention is exact over the whole sequence through
``SequenceParallelAttention``; the parameter gradients (each rank's share of the loss) are summed
with ``all_reduce``. ``--mode ddp``: every rank trains on its own batch of whole sequences and
``DistributedDataParallel`` averages the gradients; attention runs locally (the same layer over a
process group of one). Any rank that fails makes every rank stop with the reason (``fail_together``).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.distributed import SequenceParallelAttention, fail_together, global_positions, zigzag_split
from qkv.masks import causal


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, strategy: str, group: object) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SequenceParallelAttention(dim, heads, kv_heads, strategy=strategy, layout="zigzag", group=group)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), mask=causal())
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + learned position embeddings, pre-norm decoder blocks, a linear head."""

    def __init__(
        self, vocab: int, max_len: int, dim: int, heads: int, kv_heads: int, layers: int, strategy: str, group: object
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, strategy, group) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx: Tensor, positions: Tensor) -> Tensor:
        """``idx (B, n)`` this rank's tokens at global ``positions (n,)`` -> logits ``(B, n, vocab)``."""
        x = self.tok(idx) + self.pos(positions)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def batch(step: int, seed: int, B: int, L: int, vocab: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets ``(B, L)``: arithmetic sequences modulo ``vocab``."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    start = torch.randint(0, vocab, (B, 1), generator=g)
    stride = torch.randint(1, 8, (B, 1), generator=g)
    seq = (start + stride * torch.arange(L + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["ring", "ddp"], default="ring")
    p.add_argument("--strategy", choices=["ring", "ulysses"], default="ring", help="sequence-parallel attention")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=128, help="global sequence length")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep traffic on 127.0.0.1 on a single machine
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    vocab, L = 32, args.seq_len
    if args.mode == "ring" and L % (2 * world):
        raise SystemExit(f"--seq-len {L} must be divisible by 2 * world = {2 * world} in ring mode")
    # ddp: attention over a process group of one (each rank holds whole sequences)
    solo = [dist.new_group([r]) for r in range(world)][rank]
    group = None if args.mode == "ring" else solo
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = TinyGPT(vocab, L, args.dim, args.heads, args.kv_heads, args.layers, args.strategy, group)
    train: nn.Module = model
    if args.mode == "ddp":
        train = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        with fail_together(timeout=timedelta(seconds=60)):
            if args.mode == "ring":
                x, y = batch(step, args.seed, args.batch, L, vocab)  # the same batch on every rank
                xl, yl = zigzag_split(x, rank, world, dim=1), zigzag_split(y, rank, world, dim=1)
                pos = global_positions("zigzag", rank, world, L // world)
                logits = train(xl, pos)
                loss = F.cross_entropy(logits.flatten(0, 1), yl.flatten(), reduction="sum") / y.numel()
                loss.backward()
                for prm in model.parameters():  # each rank holds its share of every gradient: sum them
                    if prm.grad is not None:
                        dist.all_reduce(prm.grad)
                correct = (logits.argmax(-1) == yl).sum().float()
            else:
                x, y = batch(step, args.seed * 1000 + rank + 1, args.batch, L, vocab)  # a batch per rank
                logits = train(x, torch.arange(L))
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / world  # DDP averages the grads
                loss.backward()
                correct = (logits.argmax(-1) == y).sum().float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats = torch.stack([loss.detach(), correct])
            dist.all_reduce(stats)
        if rank == 0 and (step % 5 == 0 or step == 1 or step == args.steps):
            tokens = args.batch * L * (world if args.mode == "ddp" else 1)
            print(
                f"[{args.mode}/{args.strategy if args.mode == 'ring' else 'local'} x{world}] step {step:4d}"
                f"  loss {stats[0].item():.4f}  next-token accuracy {stats[1].item() / tokens:.3f}"
                f"  {(time.perf_counter() - t0) / step * 1000:.0f} ms/step",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
