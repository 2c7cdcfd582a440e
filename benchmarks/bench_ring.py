"""Ring and Ulysses attention on 1, 2 and 4 processes of this machine: time per step, traffic, memory.

    python benchmarks/bench_ring.py            # about 2-3 minutes on 2 quiet cores
    python benchmarks/bench_ring.py --quick    # smaller lengths, under a minute

For each process count R (gloo over 127.0.0.1, one process per rank, one thread each, so R=4
oversubscribes a 2-core machine), one causal self-attention layer (zigzag layout, B=1, H=4,
D=64) runs forward + backward on local shards of a global sequence of L tokens:

- time per step: median over repeats of the slowest rank's forward+backward;
- traffic: bytes this rank sent (counted in the ring code, ``qkv.distributed.comm_stats``) in the
  forward and in the backward, against the theory ``2 (R-1)/R · L · D`` elements per head (K and V
  around the ring once) in float32;
- memory: peak resident memory above the process's baseline (``ru_maxrss``) at each length; a line
  ``bytes = a + b · L`` fitted on the measured points gives the longest sequence that fits the
  per-process budget (``--budget-mib``, default 1024).
R=1 is the same code with no communication: the single-process peer every ratio is taken against.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

B, H, D = 1, 4, 64


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(rank: int, world: int, lengths: list[int], repeats: int, strategy: str) -> None:
    import torch
    import torch.distributed as dist

    from qkv.distributed import comm_stats, ring_attention, ulysses_attention
    from qkv.masks import causal

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)  # one core per process: R=1 is one core, R=2 two, R=4 oversubscribes 2 cores
    fn = ring_attention if strategy == "ring" else ulysses_attention
    # warm up on a small problem so the baseline includes the libraries and the kernels' workspaces
    base_q = torch.randn(B, H, 64, D, requires_grad=True)
    fn(base_q, base_q, base_q, mask=causal()).sum().backward()
    base = _rss_bytes()
    rows = []
    for L in lengths:
        n = L // world
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(True) for _ in range(3))
        dout = torch.randn(B, H, n, D, generator=g)
        times, fwd_bytes, bwd_bytes = [], 0, 0
        for rep in range(repeats + 1):
            dist.barrier()
            comm_stats.reset()
            t0 = time.perf_counter()
            out = fn(q, k, v, mask=causal())
            fwd = comm_stats.bytes_sent
            out.backward(dout)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rep:  # the first is a warm-up
                times.append(dt.item())
            fwd_bytes, bwd_bytes = fwd, comm_stats.bytes_sent - fwd
            q.grad = k.grad = v.grad = None
        mem = torch.tensor([_rss_bytes() - base], dtype=torch.float64)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        rows.append(
            dict(L=L, ms=1000 * statistics.median(times), fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes, mem=mem.item())
        )
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, lengths: list[int], repeats: int, strategy: str) -> list[dict[str, float]]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--world",
        str(world),
        "--repeats",
        str(repeats),
        "--strategy",
        strategy,
        "--lengths",
        *map(str, lengths),
    ]
    procs = [
        subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for r in range(world)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"a rank failed (R={world}, {strategy}):\n{out[-3000:]}")
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    rows: list[dict[str, float]] = json.loads(line[len("RESULT ") :])
    return rows


def fit_max_length(rows: list[dict[str, float]], budget: float) -> tuple[float, float, int]:
    """Least-squares ``mem = a + b L`` and the largest L with ``mem <= budget``."""
    xs, ys = [r["L"] for r in rows], [r["mem"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    a = my - b * mx
    return a, b, int((budget - a) / b) if b > 0 else -1


def main() -> None:
    p = argparse.ArgumentParser(description="ring / Ulysses attention scaling on this machine")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget-mib", type=float, default=1024)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--strategy", default="ring", help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=int, nargs="*", help="global sequence lengths")
    args = p.parse_args()
    if args.worker:
        worker(args.rank, args.world, args.lengths, args.repeats, args.strategy)
        return
    lengths = args.lengths or ([512, 1024, 2048] if args.quick else [1024, 2048, 4096])
    budget = args.budget_mib * 2**20
    print(
        f"causal attention, zigzag layout, B={B} H={H} D={D} float32, forward+backward; {os.cpu_count()} cores;"
        f" memory budget {args.budget_mib:g} MiB per process"
    )
    results = {}
    for strategy, worlds in (("ring", (1, 2, 4)), ("ulysses", (2, 4))):
        for world in worlds:
            results[strategy, world] = launch(world, lengths, args.repeats, strategy)
    base = {r["L"]: r["ms"] for r in results["ring", 1]}
    print(
        f"\n{'strategy':8} {'R':>2} {'L':>6} {'ms/step':>9} {'vs R=1':>7} {'fwd MiB/rank':>12} {'theory':>8}"
        f" {'bwd MiB/rank':>12} {'peak MiB':>9}"
    )
    for (strategy, world), rows in results.items():
        for r in rows:
            theory = 2 * (world - 1) / world * r["L"] * D * B * H * 4  # bytes, K and V once around the ring
            print(
                f"{strategy:8} {world:>2} {r['L']:>6} {r['ms']:>9.1f} {base[r['L']] / r['ms']:>6.2f}x"
                f" {r['fwd_bytes'] / 2**20:>12.2f} {theory / 2**20:>8.2f} {r['bwd_bytes'] / 2**20:>12.2f}"
                f" {r['mem'] / 2**20:>9.1f}"
            )
    print(f"\nlongest sequence within {args.budget_mib:g} MiB per process (fit mem = a + b*L on the points above):")
    for (strategy, world), rows in results.items():
        a, b, lmax = fit_max_length(rows, budget)
        print(
            f"  {strategy:8} R={world}: {b:8.0f} bytes per global token, intercept {a / 2**20:6.1f} MiB"
            f" -> L_max ~ {lmax:,}"
        )


if __name__ == "__main__":
    main()
