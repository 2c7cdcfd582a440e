"""``flex``: PyTorch FlexAttention (``torch.nn.attention.flex_attention``), compiled once per shape and
mask structure.

FlexAttention compiles a ``mask_mod`` and a ``score_mod`` into one fused kernel that visits only the
key blocks a ``BlockMask`` lists: forward and backward on CUDA (Triton), an inference kernel on the
CPU (C++). What qkv adds around it:

* **Block masks from the mask's own tile classification.** The ``BlockMask`` of a qkv mask is built
  from :meth:`qkv.masks.Mask.block_kinds` (empty, full or partial per block, from the mask's formula:
  no ``Lq x Lk`` evaluation for named masks), not from ``create_block_mask``'s dense evaluation, and
  has the same structure (a block that hangs over the end of the sequence is never full, as there).
  It is cached in :data:`qkv.backends.plan.PLANS` per (mask key, shape, device, block size), so the
  layers of a model and the steps of a loop share it; the key follows the mask's data (a ``mask_mod``
  by a fingerprint of what it reads), and a cached ``BlockMask`` handed to another mask object with
  the same key gets that mask's own ``mask_mod``, so partial blocks read the current call's data.
* **Score mods** become Flex ``score_mod`` functions (:meth:`qkv.scores.ScoreMod.score_mod`), masks
  ``mask_mod`` functions that already use bottom-right aligned positions when ``Lq != Lk``.
* **Compile bookkeeping.** One ``torch.compile(flex_attention)`` per device type is shared by every
  call (static shapes on the CPU, PyTorch's automatic dynamic shapes on CUDA: see :data:`DYNAMIC`);
  qkv records which (mask structure, score mod structure, dtype, head dims, shape) already ran, so
  :func:`qkv.explain` says when a call will compile, and :data:`STATS` counts block masks built and
  real compiles. Structure is what ``torch.compile`` guards on: types, numbers, tensor dtypes and
  ranks, function code; not tensor contents (new document ids reuse the kernel).
* **Rows that see nothing** give zeros (Flex's own behaviour, checked by the tests), **weights on
  demand** through :mod:`qkv.backends.weights` (from Flex's logsumexp where it returns one), and the
  logsumexp itself with the ``return_lse`` option.

Where it runs: CUDA, forward and backward. On the CPU, inference only: FlexAttention has no CPU
backward, so a request that needs gradients is declined (``tiled`` serves it). A first call compiles
for 6-30 s on a CPU, so ``auto`` picks ``flex`` on the CPU only when the caller opted in to compiling
(:func:`allow_compile`, or the environment variable ``QKV_FLEX_COMPILE=1``) or when the kernel for
that request already ran. Asking for ``backend="flex"`` by name always may compile.

Options (keyword arguments of :func:`qkv.attention`):

* ``compile`` (bool, default True): False runs FlexAttention uncompiled (PyTorch's reference
  implementation, which builds the ``Lq x Lk`` scores: for tests and debugging, any dtype).
* ``block_size`` (int, default :data:`BLOCK`): the ``BlockMask``'s block (a power of two >= 16).
* ``return_lse`` (bool): return ``(out, lse)`` with the row logsumexp ``(B, H, Lq)`` in float32
  (``-inf`` for rows that see nothing). The compiled CPU kernel computes none (torch raises): there
  it needs ``compile=False``.
* ``weights_heads`` / ``weights_rows``: see :mod:`qkv.backends.weights`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import shutil
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..masks import FULL, PARTIAL, Mask, Shape
from ..scores import ScoreMod
from .base import Backend, Request, tracing
from .kernels import FUSED_CALL_S, FUSED_FLOPS, compute_dtype, sink_forward
from .plan import PLANS
from .registry import register
from .weights import OPTIONS as WEIGHT_OPTIONS
from .weights import weights

try:
    from torch.nn.attention import flex_attention as _fa
except ImportError:  # pragma: no cover - torch < 2.5
    _fa = None  # type: ignore[assignment]

__all__ = [
    "BLOCK",
    "DYNAMIC",
    "ENV",
    "STATS",
    "Flex",
    "FlexPlan",
    "Stats",
    "allow_compile",
    "block_mask",
    "compile_allowed",
]

log = logging.getLogger(__name__)

BLOCK = 128
"""Default ``BlockMask`` block size (FlexAttention's own default)."""
ENV = "QKV_FLEX_COMPILE"
"""Environment variable that opts in to compiling on the CPU (``1``, ``true``, ``yes`` or ``on``)."""
RECOMPILE_LIMIT = 64
"""Kernels ``torch.compile`` may keep for qkv's FlexAttention calls in one process. Each mask and
score mod structure is one, and on the CPU each shape; beyond PyTorch's default of 8 dynamo would fall
back to the uncompiled ``Lq x Lk`` implementation, so qkv raises the limit for its own calls (only)
and declines past this many."""

_OPTIONS = frozenset({"compile", "block_size", "return_lse"}) | WEIGHT_OPTIONS
_TRUE = ("1", "true", "yes", "on")
_allow = os.environ.get(ENV, "").strip().lower() in _TRUE


def allow_compile(flag: bool = True) -> bool:
    """Let ``auto`` pick ``flex`` on the CPU even when its kernel must be compiled first (6-30 s per
    new shape and mask structure); returns the previous setting. Off by default unless the
    environment variable ``QKV_FLEX_COMPILE`` is ``1``. On CUDA ``auto`` may always pick ``flex``.

    CPU kernels are compiled per exact shape (:data:`DYNAMIC`), so opt in for workloads that repeat
    their shapes (a model over fixed-length batches), not for decoding with a growing KV cache,
    where every step is a new key length."""
    global _allow
    if not isinstance(flag, bool):
        raise TypeError(f"allow_compile: flag must be a bool, got {type(flag).__name__}")
    old, _allow = _allow, flag
    return old


def compile_allowed() -> bool:
    """Whether ``auto`` may compile a FlexAttention kernel on the CPU (see :func:`allow_compile`)."""
    return _allow


@dataclass
class Stats:
    """What the backend did in this process (tests and benchmarks read it)."""

    block_masks: int = 0
    """``BlockMask`` objects built (each is cached per mask, shape, device and block size)."""
    calls: int = 0
    """Calls of the compiled kernel."""
    compiles: int = 0
    """Calls during which ``torch.compile`` compiled a new graph (read from dynamo's counters)."""

    def reset(self) -> None:
        self.block_masks = self.calls = self.compiles = 0


STATS = Stats()
"""This process's counts (:class:`Stats`): block masks built, kernel calls, real compiles."""


# ------------------------------------------------------------------------------------------------
# block masks from the mask's tile classification


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """``(num_blocks, indices)`` of a ``(..., nq, nk)`` 0/1 block matrix, as FlexAttention orders them
    (the listed blocks first, ascending, then the others): int32."""
    d = dense.to(torch.int32)
    return (
        d.sum(dim=-1).to(torch.int32).contiguous(),
        torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32).contiguous(),
    )


_SEQ_LENGTHS = (
    _fa is not None
    and hasattr(_fa, "BlockMask")
    and hasattr(_fa.BlockMask, "from_kv_blocks")
    and "seq_lengths" in inspect.signature(_fa.BlockMask.from_kv_blocks).parameters
)


def _from_kv_blocks(
    kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, block: int, mask_mod: Any, Lq: int, Lk: int
) -> Any:
    kw: dict[str, Any] = {"BLOCK_SIZE": block, "mask_mod": mask_mod}
    if _SEQ_LENGTHS:
        kw["seq_lengths"] = (Lq, Lk)
    return _fa.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kw)


def block_mask(mask: Mask, shape: Shape, block: int = BLOCK) -> Any:
    """The FlexAttention ``BlockMask`` of ``mask`` on a problem of ``shape`` (on ``shape.device``).

    Built from :meth:`~qkv.masks.Mask.block_kinds`: partial blocks become ``kv_num_blocks`` /
    ``kv_indices`` (the ``mask_mod`` is evaluated in them), full blocks ``full_kv_num_blocks`` /
    ``full_kv_indices`` (no ``mask_mod``), empty blocks nothing. A block that hangs over the end of
    the queries or keys is never full (as ``create_block_mask`` pads with False), so the kernel
    masks the overhang. Its batch and head dims are the mask's own (1 when it does not depend on
    them; Flex broadcasts). Named masks never evaluate ``Lq x Lk`` elements; custom ones evaluate
    their tiles once. Not cached: :meth:`Flex.plan` caches it.
    """
    if _fa is None:  # pragma: no cover - torch < 2.5
        raise NotImplementedError("FlexAttention needs torch >= 2.5")
    kinds = mask.block_kinds(shape, block, block)
    nq, nk = kinds.shape[-2:]
    # a block over the end of the queries or keys is never full (no in-place write: this traces)
    edge = torch.zeros(nq, nk, dtype=torch.bool, device=kinds.device)
    if shape.Lq % block:
        edge = edge | (torch.arange(nq, device=kinds.device) == nq - 1).view(-1, 1)
    if shape.Lk % block:
        edge = edge | (torch.arange(nk, device=kinds.device) == nk - 1).view(1, -1)
    kinds = torch.where(edge & (kinds == FULL), torch.full_like(kinds, PARTIAL), kinds)
    if not tracing():  # traced, the mask's tensors are the graph's, on the device of the queries
        mask.to(shape.device)
        STATS.block_masks += 1
    kv_num, kv_idx = _ordered(kinds == PARTIAL)
    full_num, full_idx = _ordered(kinds == FULL)
    mod = mask.mask_mod(shape.Lq, shape.Lk, shape.B, shape.H)
    return _from_kv_blocks(kv_num, kv_idx, full_num, full_idx, block, mod, shape.Lq, shape.Lk)


@dataclass(frozen=True)
class FlexPlan:
    """What ``flex`` decides before computing a request: its ``BlockMask`` (``None``: no mask, every
    block full) and the share of (query block, key block) pairs it visits."""

    shape: Shape
    block: int
    block_mask: Any
    live: float
    """Fraction of block pairs not empty (averaged over batch rows and heads)."""
    partial: float
    """Fraction of block pairs where the ``mask_mod`` is evaluated."""
    source: Any = field(default=None, compare=False, repr=False)
    """A weak reference to the mask whose ``mask_mod`` the ``BlockMask`` evaluates."""

    @property
    def blocks(self) -> int:
        return -(-self.shape.Lq // self.block) * -(-self.shape.Lk // self.block)


def _for_mask(plan: FlexPlan, mask: Mask | None) -> FlexPlan:
    """``plan`` with a ``BlockMask`` that evaluates ``mask``'s own ``mask_mod``. A plan cached under a
    key is shared by every mask object with that key, but its ``mask_mod`` reads the tensors of the
    mask it was built from, which may since have changed (a buffer reused for the next batch): the
    block lists follow the key, the ``mask_mod`` must follow the request."""
    if mask is None or plan.block_mask is None or (plan.source is not None and plan.source() is mask):
        return plan
    s = plan.shape
    mask.to(s.device)
    bm = copy.copy(plan.block_mask)
    bm.mask_mod = mask.mask_mod(s.Lq, s.Lk, s.B, s.H)
    return dataclasses.replace(plan, block_mask=bm, source=weakref.ref(mask))


def _build(mask: Mask | None, shape: Shape, block: int) -> FlexPlan:
    if mask is None or mask.is_full or shape.Lq == 0 or shape.Lk == 0:
        return FlexPlan(shape, block, None, 1.0, 0.0)
    bm = block_mask(mask, shape, block)
    if tracing():  # the shares are read from the block mask's values: estimated from the structure
        live, partial = _static_fractions(mask, shape, block)
        return FlexPlan(shape, block, bm, live, partial)
    nk = max(1, bm.kv_indices.shape[-1])  # key blocks per query block
    partial = float(bm.kv_num_blocks.double().mean()) / nk
    full = float(bm.full_kv_num_blocks.double().mean()) / nk
    return FlexPlan(shape, block, bm, partial + full, partial, weakref.ref(mask))


def _static_fractions(mask: Mask | None, shape: Shape, block: int) -> tuple[float, float]:
    """``(live, partial)`` shares of block pairs estimated from the mask's structure alone, for requests
    traced into a graph (which serves every batch of a shape, whatever its ids or lengths): a sliding
    window (``causal()`` included) visits about its width plus a block of each key row, with about two
    partial blocks (its edges); a mask whose blocks depend on tensor values (documents, padding) is
    taken to visit every block, each with its ``mask_mod``."""
    if mask is None or mask.is_full or shape.Lk == 0:
        return 1.0, 0.0
    w = mask.window()
    if w is None:
        return 1.0, 1.0
    left, right = (shape.Lk if x is None else min(x, shape.Lk) for x in w)
    live = min(1.0, (left + right + 1 + block) / shape.Lk)
    return live, min(live, 2 * block / shape.Lk)


# ------------------------------------------------------------------------------------------------
# compiled kernels: one torch.compile, and the record of what it compiled


def _structure(x: Any, depth: int = 0) -> Hashable:
    """What ``torch.compile`` guards on when ``x`` is captured by a ``mask_mod`` or ``score_mod``:
    types, numbers and strings by value, tensors by dtype, rank and device (their contents and sizes
    are inputs), functions by code and closure. Used only to predict whether a call compiles."""
    if depth > 8:
        return ("deep", id(x))
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return x
    if isinstance(x, Tensor):
        return ("tensor", str(x.dtype), x.dim(), x.device.type, x.requires_grad)
    if isinstance(x, (tuple, list)):
        return tuple(_structure(y, depth + 1) for y in x)
    if isinstance(x, dict):
        return tuple(sorted((str(k), _structure(v, depth + 1)) for k, v in x.items()))
    if isinstance(x, (Mask, ScoreMod)):
        return (type(x).__qualname__, _structure(vars(x), depth + 1))
    code = getattr(x, "__code__", None)
    if code is not None:
        cells = tuple(_structure(c.cell_contents, depth + 1) for c in (getattr(x, "__closure__", None) or ()))
        return ("fn", code, cells, _structure(getattr(x, "__defaults__", None), depth + 1))
    return ("object", id(x))


_KERNEL_VERSIONS = itertools.count()


class _Kernels:
    """Which kernels ran: per kernel key, the shapes seen and whether a new shape ran without a
    compile (then dynamo's kernel is dynamic and covers other shapes of the same kind)."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.shapes: OrderedDict[Hashable, set[tuple[int, ...]]] = OrderedDict()
        self.dynamic: dict[Hashable, set[tuple[bool, ...]]] = {}
        self._sigs: set[tuple[int, ...]] = set()  # every shape in `shapes`, whatever its key
        self._kinds: set[tuple[bool, ...]] = set()  # every kind in `dynamic`, whatever its key
        self.version = next(_KERNEL_VERSIONS)
        """Changes with every :meth:`record` and :meth:`clear`, and differs between two record objects."""

    @staticmethod
    def _kind(sig: tuple[int, ...]) -> tuple[bool, ...]:
        return tuple(n == 1 for n in sig)  # dynamo specialises sizes 0 and 1

    def maybe_ready(self, sig: tuple[int, ...]) -> bool:
        """False when no kernel key can be :meth:`ready` for shape ``sig``: then no key need be computed
        (``auto`` asks this of every request on the CPU). True says only: ask :meth:`ready`."""
        return sig in self._sigs or (bool(self._kinds) and self._kind(sig) in self._kinds)

    def ready(self, key: Hashable, sig: tuple[int, ...]) -> bool:
        if sig in self.shapes.get(key, ()):
            return True
        return self._kind(sig) in self.dynamic.get(key, ())

    def record(self, key: Hashable, sig: tuple[int, ...], compiled: bool) -> None:
        seen = self.shapes.setdefault(key, set())
        self.shapes.move_to_end(key)
        if not compiled and seen and sig not in seen:
            kind = self._kind(sig)
            self.dynamic.setdefault(key, set()).add(kind)
            self._kinds.add(kind)
        seen.add(sig)
        self._sigs.add(sig)
        self.version = next(_KERNEL_VERSIONS)
        evicted = False
        while len(self.shapes) > self.size:
            old, _ = self.shapes.popitem(last=False)
            self.dynamic.pop(old, None)
            evicted = True
        if evicted:  # the unions shrink with what was evicted (they may over-state, never under-state)
            self._sigs = set().union(*self.shapes.values())
            self._kinds = set().union(*self.dynamic.values())

    def __len__(self) -> int:
        return len(self.shapes)

    def clear(self) -> None:
        self.shapes.clear()
        self.dynamic.clear()
        self._sigs.clear()
        self._kinds.clear()
        self.version = next(_KERNEL_VERSIONS)


KERNELS = _Kernels()
"""The kernels the compiled FlexAttention ran in this process."""

DYNAMIC: dict[str, bool | None] = {"cpu": False, "cuda": None}
"""``torch.compile(flex_attention, dynamic=...)`` per device type. On the CPU, static: one kernel per
exact shape, because the CPU template fails to lower a ``mask_mod`` whose captured numbers (the
lengths that set the bottom-right offset, a window) dynamo has made symbolic (torch 2.13: "'Mul'
object has no attribute 'get_name'"). On CUDA, PyTorch's automatic dynamic shapes: the first shape
static, later ones one dynamic kernel (``benchmarks/gpu_check.py --static`` sets it to False)."""
_compiled_fns: dict[bool | None, Callable[..., Any]] = {}


def _flex_call(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Any:
    """``flex_attention`` behind a function of qkv's own: ``torch.compile`` keeps its kernels (and
    counts them against its recompile limit) per code object, so qkv's kernels neither crowd out nor
    are crowded out by a caller's own ``torch.compile(flex_attention)``."""
    return _fa.flex_attention(q, k, v, **kw)


def _compiled(device_type: str) -> Callable[..., Any]:
    dyn = DYNAMIC.get(device_type)
    if dyn not in _compiled_fns:
        _compiled_fns[dyn] = torch.compile(_flex_call, dynamic=dyn)
    return _compiled_fns[dyn]


def _graphs() -> int:
    """dynamo's count of graphs compiled so far in this process (-1 where torch does not say)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - depends on the installed torch
        return -1


@functools.cache
def _limit_name() -> str | None:
    """The name of dynamo's per-function recompile limit in this torch (renamed in 2.6), or None. Read on
    first use, not at import: ``torch._dynamo`` costs seconds to import, and ``import qkv`` stays without it
    (every spawned rank and command pays for that import)."""
    cfg = torch._dynamo.config
    return next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n)), None)


@contextlib.contextmanager
def _recompile_limit() -> Iterator[None]:
    """Raise dynamo's per-function recompile limit to :data:`RECOMPILE_LIMIT` for qkv's own call
    (set and restored directly: ``config.patch`` costs more than a small kernel)."""
    cfg, name = torch._dynamo.config, _limit_name()
    old = getattr(cfg, name) if name else RECOMPILE_LIMIT
    if name is None or old >= RECOMPILE_LIMIT:
        yield
        return
    setattr(cfg, name, RECOMPILE_LIMIT)
    try:
        yield
    finally:
        setattr(cfg, name, old)


@functools.cache
def _cpu_compile_blocker() -> str | None:
    """Why the CPU cannot compile FlexAttention here (it needs AVX2 and a C++ compiler), or None."""
    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    if not any(c in cap for c in ("AVX2", "AVX512")):
        return f"compiled FlexAttention on the CPU needs AVX2 (this CPU: {cap})"
    cxx = os.environ.get("CXX", "c++")
    if not any(shutil.which(c) for c in (cxx, "c++", "g++", "clang++")):
        return "compiled FlexAttention on the CPU needs a C++ compiler (none found on PATH)"
    return None


# ------------------------------------------------------------------------------------------------
# the backend

#: constants of the cost model. CPU: fp32 fitted to the README's quiet run (compiled FlexAttention
#: 32.0 ms on the causal window 256 at 8k, H=4: 3.4 GFLOP on the blocks it visits); bf16 from the
#: bf16/fp32 time ratio ``benchmarks/bench_flex.py`` measured on an AMD EPYC without AMX (1.39; CPUs
#: with AMX run bf16 about 4x faster than fp32); fp16 a guess. On CUDA no rate was measured in this
#: repository: FlexAttention is taken to run at ``CUDA_VS_FUSED`` of the rate ``sdpa``'s cost model
#: gives its fused kernel (PyTorch's published 85-90 % of FlashAttention), so that only the work each
#: skips decides between them.
CPU_FLOPS = {torch.float32: 110e9, torch.bfloat16: 80e9, torch.float16: 60e9}
"""Floating-point operations per second of the compiled CPU kernel on the blocks it visits."""
EAGER_FLOPS = 20e9
"""Rate of the uncompiled implementation (it builds and masks the whole ``Lq x Lk`` scores)."""
CUDA_VS_FUSED = 0.85
"""FlexAttention's rate on CUDA as a share of ``sdpa``'s fused kernel."""
CALL_S = 120e-6
"""Fixed seconds per call (plan lookup, dynamo's guards, the ``BlockMask`` pytree)."""
PARTIAL_PAIR_S = 0.3e-9
"""Extra seconds per (query, key) pair of a partial block (the ``mask_mod`` evaluated)."""
WEIGHTS_PAIR_S = 3e-9
"""Seconds per weight recomputed on demand."""


def _option(req: Request, name: str, default: Any) -> Any:
    return req.options.get(name, default)


def _block(req: Request) -> int:
    b = _option(req, "block_size", BLOCK)
    if not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {b!r}")
    return b


def _flag(req: Request, name: str, default: bool) -> bool:
    val = _option(req, name, default)
    if not isinstance(val, bool):
        raise TypeError(f"{name} must be a bool, got {type(val).__name__}")
    return val


def _score_mod_needs_grad(sm: ScoreMod, req: Request) -> bool:
    """Whether the score mod's result carries a gradient (it holds a tensor that requires grad):
    evaluated on one element, so it costs nothing."""
    if not torch.is_grad_enabled():
        return False
    dev = req.q.device
    one = torch.zeros((), dtype=torch.long, device=dev).view(1, 1, 1, 1)
    score = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev)
    try:
        out = sm.apply(req.shape, score, one, one, one, one)
    except Exception:  # a score mod that only runs under vmap: let the kernel try it
        return False
    return isinstance(out, Tensor) and out.requires_grad


class Flex(Backend):
    """PyTorch FlexAttention with qkv's masks and score mods; see the module docstring."""

    name = "flex"
    options = _OPTIONS
    takes_sinks = True  # by the logsumexp correction of the kernel core, after the kernel (inference)

    def available(self) -> bool:
        return _fa is not None and hasattr(_fa, "BlockMask") and hasattr(_fa.BlockMask, "from_kv_blocks")

    # ---- what it serves ----------------------------------------------------------------------
    def compiled(self, req: Request) -> bool:
        """Whether ``req`` runs the compiled kernel (else FlexAttention's uncompiled implementation)."""
        return _flag(req, "compile", True)

    def supports(self, req: Request) -> str | None:
        opts = req.options
        if opts:  # each option is checked (a wrong type or value raises) before anything is declined
            compiled = self.compiled(req)
            _block(req)
            lse = _flag(req, "return_lse", False)
        else:
            compiled, lse = True, False
        if req.dropout_p > 0:
            return "FlexAttention has no dropout (sdpa and reference apply it)"
        if opts and (opts.get("weights_heads") is not None or opts.get("weights_rows") is not None) and not (
            req.return_weights
        ):
            return "weights_heads/weights_rows need return_weights=True"
        if lse and req.return_weights:
            return "return_lse and return_weights together: ask for one of them"
        grad = req.requires_grad
        if req.sinks is not None and grad:
            return (
                "flex adds sinks by a logsumexp correction after the kernel, and gradients through"
                " FlexAttention's logsumexp are not taken here; tiled (by the same correction) and sdpa compute them"
            )
        kind = req.device.type
        if kind not in ("cuda", "cpu"):
            return f"qkv runs FlexAttention on CUDA and the CPU, not on {kind}"
        if kind == "cpu" and grad:
            return "FlexAttention has no backward on the CPU (torch raises); tiled computes gradients there"
        if req.score_mod is not None and _score_mod_needs_grad(req.score_mod, req):
            return (
                f"score mod {req.score_mod.name} holds tensors that require grad, whose gradients qkv does not"
                " take through FlexAttention; tiled and reference compute them"
            )
        if not compiled:
            return None
        if req.dtype == torch.float64:
            return "compiled FlexAttention takes float32, bfloat16 and float16 (compile=False runs float64)"
        if tracing():  # the caller's torch.compile compiles the kernel, with its own backend and limits
            return None
        if kind == "cpu":
            why = _cpu_compile_blocker()
            if why is not None:
                return why + "; compile=False runs the uncompiled implementation"
            if lse or req.sinks is not None:
                return (
                    "the compiled CPU kernel of FlexAttention computes no logsumexp (torch raises), which"
                    f" {'sinks need' if not lse else 'return_lse asks for'}; compile=False returns it"
                )
        if STATS.compiles >= RECOMPILE_LIMIT and not self.ready(req):
            return (
                f"flex already compiled {STATS.compiles} kernels in this process (qkv.backends.flex.RECOMPILE_LIMIT);"
                " another would exceed torch.compile's recompile limit"
            )
        return None

    def choice_state(self) -> Hashable:
        """What ``auto``'s choice for a plain request reads beyond it: whether compiling is allowed, the
        kernels compiled so far (their record's version) and whether the recompile limit is reached."""
        return (compile_allowed(), KERNELS.version, STATS.compiles >= RECOMPILE_LIMIT)

    def traceable(self, req: Request) -> str | None:
        if req.return_weights:
            return "its weights on demand are cut into chunks from the logsumexp's values"
        return None  # the BlockMask is built in the graph from the mask's block classification

    def auto_blocker(self, req: Request) -> str | None:
        if tracing():
            if req.device.type == "cpu" and self.compiled(req) and not compile_allowed():
                return (
                    "on the CPU inductor compiles a FlexAttention kernel per shape and mask structure (6-30 s"
                    f" more); opt in with qkv.backends.flex.allow_compile(True) or {ENV}=1"
                )
            return None
        if not compile_allowed() and req.device.type == "cpu" and self.compiled(req) and not self.ready(req):
            return (
                "flex would compile its kernel for this shape first (6-30 s on a CPU); opt in with"
                f" qkv.backends.flex.allow_compile(True) or {ENV}=1"
            )
        return None

    # ---- what it decides ---------------------------------------------------------------------
    def plan(self, req: Request) -> FlexPlan:
        """The cached :class:`FlexPlan` (with its ``BlockMask``) of the request's mask, shape and block."""
        b = _block(req)
        if tracing():  # built in the graph: a document mask's BlockMask follows the ids of each batch
            return _build(req.mask, req.shape, b)
        plan = PLANS.get(req.mask, ("flex", req.shape, b), lambda: _build(req.mask, req.shape, b))
        return _for_mask(plan, req.mask)

    def kernel_key(self, req: Request) -> Hashable:
        """What names the compiled kernel of ``req``, apart from its shape (no plan needed: ``auto``
        asks it of every request without building a ``BlockMask``)."""
        mask = None if req.mask is None or req.mask.is_full else _structure(req.mask)
        sm = None if req.score_mod is None else _structure(req.score_mod)
        lse = (
            _flag(req, "return_lse", False)
            or req.sinks is not None
            or (req.return_weights and req.device.type != "cpu")
        )
        dev = req.device
        return (dev.type, dev.index, req.dtype, req.H, req.Hkv, req.D, req.Dv, _block(req), mask, sm, lse)

    @staticmethod
    def _sig(req: Request) -> tuple[int, ...]:
        return (req.B, req.Lq, req.Lk)

    def ready(self, req: Request) -> bool:
        """Whether the compiled kernel for ``req`` already ran (a call will not compile). The kernel key
        is computed only where a kernel of this shape (or a dynamic one of its kind) ran at all."""
        sig = self._sig(req)
        return KERNELS.maybe_ready(sig) and KERNELS.ready(self.kernel_key(req), sig)

    def _fractions(self, req: Request) -> tuple[float, float]:
        if tracing():
            return _static_fractions(req.mask, req.shape, _block(req))
        plan = self.plan(req)
        return plan.live, plan.partial

    def cost(self, req: Request) -> float:
        live, partial = self._fractions(req)
        pairs = req.B * req.H * req.Lq * req.Lk
        work = req.flops * live
        if not self.compiled(req):
            s = req.flops / EAGER_FLOPS + pairs * 4 * PARTIAL_PAIR_S
        elif req.device.type == "cuda":
            s = work / (FUSED_FLOPS * CUDA_VS_FUSED) + FUSED_CALL_S
        else:
            s = work / CPU_FLOPS.get(req.dtype, min(CPU_FLOPS.values()))
        s += pairs * partial * PARTIAL_PAIR_S + CALL_S
        if req.requires_grad:
            s *= 3.0
        if req.return_weights:
            s += req.B * req.H * req.Lq * req.Lk * WEIGHTS_PAIR_S
        return s

    def describe(self, req: Request) -> str:
        if tracing():
            live, partial = self._fractions(req)
            what = "no mask: every block" if req.mask is None or req.mask.is_full else (
                f"mask {req.mask!r}: a BlockMask built in the graph, ~{live:.0%} of blocks visited by its structure"
            )
            return f"FlexAttention in the caller's compiled graph; {what}"
        plan = self.plan(req)
        if plan.block_mask is None:
            what = "no mask: every block"
        else:
            what = (
                f"mask {req.mask!r}: a BlockMask of {plan.block}x{plan.block} blocks, {plan.live:.0%} of"
                f" {plan.blocks} visited ({plan.partial:.0%} with the mask_mod)"
            )
        if not self.compiled(req):
            kernel = "FlexAttention uncompiled (Lq x Lk scores)"
        elif self.ready(req):
            kernel = "compiled FlexAttention, kernel ready"
        else:
            secs = "6-30 s" if req.device.type == "cpu" else "seconds"
            kernel = f"compiled FlexAttention, WILL COMPILE first ({secs}, once per shape bucket and mask structure)"
        extra = "; weights recomputed from the logsumexp, a chunk of rows at a time" if req.return_weights else ""
        return f"{kernel}; {what}{extra}"

    # ---- computing ---------------------------------------------------------------------------
    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        why = self.supports(req)
        if why is not None:
            raise NotImplementedError(why)
        plan = plan if isinstance(plan, FlexPlan) else self.plan(req)
        compiled = self.compiled(req)
        want_lse = (
            _flag(req, "return_lse", False)
            or req.sinks is not None
            or (req.return_weights and not (compiled and req.device.type == "cpu"))
        )
        q, k, v = req.q, req.k, req.v
        if not req.requires_grad:  # FlexAttention refuses CPU inputs that require grad even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        if tracing() and req.device.type == "cpu":
            # inductor's CPU template reads a 4-D layout from its inputs' buffers (torch 2.13), which a
            # projection viewed as heads does not have: "not enough values to unpack (expected 4, got 2)"
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        score_mod = None
        if req.score_mod is not None:
            score_mod = req.score_mod.to(req.device).score_mod(req.Lq, req.Lk, req.B, req.H)
        kw: dict[str, Any] = {"score_mod": score_mod, "block_mask": plan.block_mask, "scale": req.scale}
        if req.groups > 1:
            kw["enable_gqa"] = True
        if not compiled or torch.compiler.is_compiling():
            out, lse = self._call(_fa.flex_attention, q, k, v, kw, want_lse)
        else:
            key, sig = self.kernel_key(req), self._sig(req)
            before = _graphs()
            with _recompile_limit():
                out, lse = self._call(_compiled(req.device.type), q, k, v, kw, want_lse)
            grew = _graphs() != before
            STATS.calls += 1
            STATS.compiles += int(grew)
            if grew and KERNELS.ready(key, sig):
                log.warning("flex: torch.compile compiled again for a kernel qkv took as ready (%s)", sig)
            KERNELS.record(key, sig, grew)
        sinks = None
        if req.sinks is not None:  # the sink joins the denominator: out' = out * exp(lse - lse')
            assert lse is not None
            acc = torch.promote_types(req.dtype, torch.float32)  # float64 stays float64
            sinks = req.sinks.to(acc)
            o_acc, lse = sink_forward(out.to(acc), lse.to(acc), sinks)
            out = o_acc.to(req.dtype)
        if req.return_weights:
            dt = compute_dtype(req.dtype)
            w = weights(req, req.q.to(dt), req.k.to(dt), lse, dt, plan.block, None if sinks is None else sinks.to(dt))
            return out, w.to(req.dtype)
        if _flag(req, "return_lse", False):
            assert lse is not None
            return out, lse
        return out

    @staticmethod
    def _call(
        fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any], lse: bool
    ) -> tuple[Tensor, Tensor | None]:
        quiet = contextlib.nullcontext() if tracing() else warnings.catch_warnings()  # traced: no warning
        with quiet:
            if not tracing():
                warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            if not lse:
                return fn(q, k, v, **kw), None
            aux = getattr(_fa, "AuxRequest", None)
            if aux is not None:
                out, extra = fn(q, k, v, return_aux=aux(lse=True), **kw)
                return out, extra.lse
            out, lse_t = fn(q, k, v, return_lse=True, **kw)
            return out, lse_t


register(Flex())
