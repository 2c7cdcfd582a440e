"""Keys for what may be cached: tensors by their contents, functions by everything they can read.

A plan (which tiles of a mask are empty, full or partial; a FlexAttention ``BlockMask``; the kinds of a
ring's blocks) made for one call may serve another exactly when the mask allows the same pairs. For a
named mask that is a matter of its parameters and the contents of the tensors it holds
(:func:`content_key`). For a FlexAttention ``mask_mod`` it is a matter of everything the function can
read: FlexAttention's own idiom reads the document ids of the current batch from a tensor it closes
over or names as a global, and changes them between calls. :func:`fingerprint` follows what a function
can reach and keys all of it:

* a Python function: its code (by value), its closure cells, its defaults, and the globals its code
  names (also those of functions and comprehensions nested in it); builtins by identity;
* bound methods (the function and ``__self__``), ``functools.partial`` (function, args, keywords),
  callable and plain objects (their class, ``vars()`` and ``__slots__``), lists, tuples, dicts, sets;
* modules, ``nn.Module`` instances and classes of the user's own code as namespaces: the attributes
  that some code the walk reached names (``cfg.WINDOW``, ``self.doc_ids``), a class's dunder methods
  (operators call them without naming them; not those that build, show or write an object), and an
  ``nn.Module``'s ``forward`` where the module may be called (not when the ``mask_mod`` is a method of
  it);
* leaves: tensors and numpy arrays by contents (dtype, shape and their bytes, or a SHA-256 digest of
  them above :data:`SMALL_BYTES`; dims a tensor is broadcast along are read once), numbers, strings,
  bytes, ``None``, enums, a :class:`qkv.masks.Mask` by its :meth:`~qkv.masks.Mask.cache_key`; code and
  callable objects of libraries (torch, numpy, transformers, the standard library, qkv: torch ops,
  ``operator.itemgetter``) by identity, since they do not change at run time (a closure a library
  function made is still followed into its cells).

What the walk cannot read with certainty makes the fingerprint unknowable (:class:`Unkeyable`, with
the reason and where it was met): an object whose state lives in C (a ``torch.Generator``, a lock, an
iterator), a call of ``globals()``/``eval``/``exec``, a tensor while ``torch.compile`` traces (its
values are not known then), more than :data:`MAX_NODES` objects or :data:`MAX_BYTES` of tensor data.
Callers then build their plan again for the call and keep nothing.

Attributes of a namespace are read by the names the code spells (``getattr(cfg, name)`` with a name
computed at run time is not seen); that is the one approximation, and why modules are read that way:
a script's ``__main__`` holds the model, the data and the optimizer, which a mask does not read. The
function must, as FlexAttention requires, be a function of what it reads (no randomness of its own).
"""

from __future__ import annotations

import builtins
import dis
import enum
import functools
import hashlib
import sys
import types
from collections import OrderedDict, defaultdict, deque
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_BYTES",
    "MAX_NODES",
    "SMALL_BYTES",
    "Ref",
    "Unkeyable",
    "content_key",
    "fingerprint",
    "fingerprint_or_none",
    "keyed_by_cache_key",
]

SMALL_BYTES = 64 << 10
"""Tensors of at most this many bytes (8192 int64 ids) are keyed by their bytes, exactly; larger ones by a
SHA-256 digest of them (about 1.8 GB/s on one core of the Xeon of the README's figures). A cache of 512
plans then holds at most 32 MiB of keys per tensor a mask holds."""
MAX_NODES = 20_000
"""Objects a fingerprint may visit; beyond, it gives up (the plan is then built for the call)."""
MAX_DEPTH = 48
"""Nesting a fingerprint may follow."""
MAX_BYTES = 64 << 20
"""Bytes of tensors one function's fingerprint may digest (about 35 ms); beyond, it gives up."""


class Unkeyable(Exception):
    """A key cannot be made: the message says what the walk could not read, and where."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
        self.path: list[str] = []

    def __str__(self) -> str:
        return f"{self.why} (at {' > '.join(self.path)})" if self.path else self.why


def _tracing() -> bool:
    return torch.compiler.is_compiling()


class Ref:
    """An object keyed by identity and held by reference (so that its ``id`` is not reused while a key
    holds it): library code, modules, classes."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"<ref {getattr(self.obj, '__qualname__', type(self.obj).__name__)}>"


# ------------------------------------------------------------------------------------------------
# tensors


_NUMPY_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
     torch.float64}
)  # fmt: skip


def _tensor_bytes(t: Tensor, traced: bool | None = None) -> Any:
    """``t``'s logical contents as a C-contiguous numpy array on the CPU (a view where it can be).
    ``traced``: whether this runs inside ``torch.compile`` (``None``: ask)."""
    if traced is None:
        traced = _tracing()
    if traced:
        raise Unkeyable("its tensors are not read while torch.compile traces")
    if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
        raise Unkeyable(f"it holds a tensor of type {type(t).__name__}, whose contents qkv does not read")
    if t.layout != torch.strided or t.is_meta or t.is_quantized:
        raise Unkeyable(f"it holds a {t.layout} / meta / quantized tensor, whose contents qkv does not read")
    x = t.detach().cpu()
    if x.dtype in _NUMPY_DTYPES:
        a = x.numpy()
        return a if a.flags.c_contiguous else a.copy()
    if x.is_complex():
        x = x.resolve_conj().resolve_neg()
    return x.contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(a: Any) -> tuple[str, bytes]:
    """The bytes of a C-contiguous array (exact), or their SHA-256 digest above :data:`SMALL_BYTES`."""
    if a.nbytes <= SMALL_BYTES:
        return "b", a.tobytes()
    return "h", hashlib.sha256(a.data.cast("B") if a.ndim else a.tobytes()).digest()


def content_key(t: Tensor) -> Hashable:
    """The key of a tensor by its contents: ``(dtype, shape, bytes)``, or a SHA-256 digest of the bytes
    above :data:`SMALL_BYTES`. Its device is not part of it (equal contents allow the same pairs).

    Raises :class:`Unkeyable` while ``torch.compile`` traces (the values are not known then) and for
    tensors whose contents are not plain data (subclasses, meta, sparse, quantized)."""
    c, bdims = _compact(t)
    return ("tensor", str(t.dtype), tuple(t.shape), bdims, _digest(_tensor_bytes(c)))


def _compact(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``t`` without the dims it is broadcast along (stride 0, an ``expand``), and those dims: the key of
    an expanded mask reads its data once, not once per repeat (equal keys still mean equal contents)."""
    bdims = tuple(i for i, (st, n) in enumerate(zip(t.stride(), t.shape)) if st == 0 and n > 1)
    if not bdims:
        return t, ()
    return t[tuple(slice(0, 1) if i in bdims else slice(None) for i in range(t.dim()))], bdims


def _array_key(a: Any) -> Hashable:
    import numpy as np

    if a.dtype.hasobject:
        raise Unkeyable("it holds a numpy array of Python objects")
    return ("ndarray", a.dtype.str, a.shape, _digest(np.ascontiguousarray(a)))


# ------------------------------------------------------------------------------------------------
# code


_LIBRARIES = frozenset({"torch", "numpy", "qkv", "transformers", "builtins", "triton", "sympy"}) | frozenset(
    getattr(sys, "stdlib_module_names", ())
)


def _is_library(module: object) -> bool:
    """Whether code or classes from ``module`` (a dotted name) are taken as fixed at run time."""
    if not isinstance(module, str):
        return False
    top = module.partition(".")[0]
    return top in _LIBRARIES and top != "__main__"


_DYNAMIC = frozenset({"globals", "locals", "vars", "eval", "exec", "__import__"})
"""Builtins through which a function reads names qkv cannot list."""

_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL", "STORE_NAME", "DELETE_NAME"})
_ATTR_OPS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM", "LOAD_SUPER_ATTR"})

_CODE_NAMES: dict[int, tuple[types.CodeType, tuple[str, ...], frozenset[str], tuple[str, ...]]] = {}


def _code_names(code: types.CodeType) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]:
    """``(globals, attribute names, imported modules)`` that ``code`` and the code nested in it read
    (attribute names include string constants, which ``getattr(x, "name")`` reads). Memoized per code."""
    got = _CODE_NAMES.get(id(code))
    if got is not None and got[0] is code:
        return got[1], got[2], got[3]
    glob: set[str] = set()
    attrs: set[str] = set()
    imports: set[str] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in _GLOBAL_OPS:
                glob.add(str(ins.argval))
            elif ins.opname in _ATTR_OPS:
                attrs.add(str(ins.argval))
            elif ins.opname == "IMPORT_NAME":
                imports.add(str(ins.argval))
        for k in c.co_consts:
            if isinstance(k, types.CodeType):
                todo.append(k)
            elif isinstance(k, str) and k.isidentifier():
                attrs.add(k)
    out = (tuple(sorted(glob)), frozenset(attrs), tuple(sorted(imports)))
    if len(_CODE_NAMES) > 4096:
        _CODE_NAMES.clear()
    _CODE_NAMES[id(code)] = (code, *out)
    return out


# ------------------------------------------------------------------------------------------------
# the walk


_BY_VALUE = (int, bool, str, bytes, complex, type(None), type(Ellipsis), type(NotImplemented), types.CodeType)
_TORCH_VALUES = (torch.dtype, torch.device, torch.layout, torch.memory_format)
_C_DESCRIPTORS = (
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)


_PY_BASES = (object, tuple, list, dict, set, frozenset, int, float, str, bytes, types.SimpleNamespace)
_HEAPTYPE = 1 << 9


def _pure_python(t: type) -> bool:
    """Whether instances of ``t`` keep all their state where Python reads it (``__dict__``, slots, or the
    contents of a built-in container or number they subclass), not in C."""
    return all(k in _PY_BASES or k.__flags__ & _HEAPTYPE for k in t.__mro__)


_NOT_READ = frozenset(
    {"__init__", "__new__", "__del__", "__repr__", "__str__", "__format__", "__init_subclass__", "__set_name__",
     "__setattr__", "__delattr__", "__setitem__", "__delitem__", "__reduce__", "__reduce_ex__", "__getstate__",
     "__setstate__", "__copy__", "__deepcopy__", "__post_init__", "__dir__", "__sizeof__"}
)  # fmt: skip
"""Dunder methods that build, show, copy or write an object: not called by reading one."""

_KEYED: list[type] = []


def keyed_by_cache_key(cls: type) -> type:
    """Register a class whose instances name themselves with ``cache_key()`` (``None``: no key, then
    ``cache_blocker()`` says why): :class:`qkv.masks.Mask` registers itself, so a ``mask_mod`` that reads
    a mask is keyed by the mask's key."""
    _KEYED.append(cls)
    return cls


class _Walk:
    def __init__(self, max_bytes: int | None) -> None:
        self.nodes = 0
        self.bytes = 0
        self.max_bytes = max_bytes
        self.seen: dict[int, int] = {}
        self.keep: list[object] = []  # every object visited stays alive: no id is reused during the walk
        self.names: set[str] = set()  # attribute names that some code the walk reached spells
        self.spaces: list[tuple[object, Mapping[str, Any], set[str]]] = []
        self.space_ids: dict[int, int] = {}

    @staticmethod
    def fail(why: str) -> Unkeyable:
        return Unkeyable(why)

    def child(self, label: str, x: object, depth: int) -> Hashable:
        try:
            return self.key(x, depth + 1)
        except Unkeyable as e:  # the path is put together only when the walk fails
            e.path.insert(0, label)
            raise

    # ---- one object ------------------------------------------------------------------------
    def key(self, x: Any, depth: int) -> Hashable:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(f"it reaches more than {MAX_NODES} objects")
        if depth > MAX_DEPTH:
            raise self.fail(f"it nests deeper than {MAX_DEPTH} levels")
        t = type(x)
        if t in _BY_VALUE:
            return (t, x)
        if t is float:
            return (float, x.hex())
        if isinstance(x, _TORCH_VALUES):
            return (t, x)
        if isinstance(x, enum.Enum):
            return ("enum", Ref(x))
        i = id(x)
        seen = self.seen.get(i)
        if seen is not None:
            return ("seen", seen)
        self.seen[i] = len(self.seen)
        self.keep.append(x)
        return self.compound(x, t, depth)

    def compound(self, x: Any, t: type, depth: int) -> Hashable:
        if isinstance(x, Tensor):
            c, bdims = _compact(x)
            a = _tensor_bytes(c, traced=False)
            self.bytes += a.nbytes
            if self.max_bytes is not None and self.bytes > self.max_bytes:
                raise self.fail(f"it reads more than {self.max_bytes >> 20} MiB of tensors")
            return ("tensor", str(x.dtype), tuple(x.shape), bdims, _digest(a))
        mod = getattr(t, "__module__", None)
        if mod == "numpy":
            import numpy as np

            if isinstance(x, np.ndarray):
                self.bytes += x.nbytes
                return _array_key(x)
            if isinstance(x, np.generic):
                return ("np", x.dtype.str, x.tobytes())
        if isinstance(x, types.FunctionType):
            return self.function(x, depth)
        if isinstance(x, types.MethodType):
            owner = x.__self__
            if isinstance(owner, torch.nn.Module):  # a model's method: its attributes by name, its forward not
                self.keep.append(owner)
                self.module(owner, called=False)
                return ("method", self.child("__func__", x.__func__, depth), ("nn.Module", Ref(owner)))
            return ("method", self.child("__func__", x.__func__, depth), self.child("__self__", owner, depth))
        if isinstance(x, (types.BuiltinFunctionType, types.MethodWrapperType)):
            s = x.__self__
            if s is None or isinstance(s, types.ModuleType):
                return ("builtin", Ref(x))
            return ("bound", x.__name__, self.child(x.__name__, s, depth))
        if isinstance(x, _C_DESCRIPTORS):
            return ("descriptor", Ref(x))
        if isinstance(x, types.ModuleType):
            if not _is_library(x.__name__):
                self.space(x, vars(x), set())
            return ("module", Ref(x))
        if isinstance(x, type):
            if not _is_library(x.__module__):
                self.klass(x, instance=False)
            return ("class", Ref(x))
        if isinstance(x, (staticmethod, classmethod)):
            return (t, self.child("__func__", x.__func__, depth))
        if isinstance(x, property):
            return (t, *(self.child(n, getattr(x, n), depth) for n in ("fget", "fset", "fdel")))
        if isinstance(x, functools.partial):
            return (
                "partial",
                self.child("func", x.func, depth),
                self.child("args", x.args, depth),
                self.child("keywords", x.keywords, depth),
                self.state(x, t, depth),
            )
        if _KEYED and isinstance(x, tuple(_KEYED)):
            keyed: Any = x
            k = keyed.cache_key()
            if k is None:
                raise self.fail(f"it reads {x!r}, which has no key: {keyed.cache_blocker()}")
            return ("keyed", k)
        if isinstance(x, torch.nn.Module):
            self.module(x, called=True)
            return ("nn.Module", Ref(x))
        if t in (tuple, list, deque) or t is torch.Size:
            return (t, tuple(self.child(f"[{j}]", y, depth) for j, y in enumerate(x)))
        if t in (dict, OrderedDict, defaultdict, types.MappingProxyType):
            out = tuple((self.child("key", k, depth), self.child(f"[{k!r}]", v, depth)) for k, v in x.items())
            extra = self.child("default_factory", x.default_factory, depth) if t is defaultdict else None
            return (t, out, extra)
        if t in (set, frozenset):
            return (t, frozenset(self.child("element", y, depth) for y in x))
        if t in (range, slice):
            return (t, self.child("start", x.start, depth), self.child("stop", x.stop, depth), x.step)
        if t is types.CellType:
            try:
                return ("cell", self.child("cell", x.cell_contents, depth))
            except ValueError:
                return ("cell", "empty")
        if _is_library(mod) and callable(x):  # library code, taken as fixed (torch ops, operator.itemgetter)
            return ("callable", Ref(x))
        if not _pure_python(t):
            raise self.fail(f"it reads a {mod}.{t.__qualname__} object, whose state lives in C where qkv cannot read it")
        # a Python object: its class (the user's: its named attributes and dunder methods), its contents,
        # its attributes and slots
        self.klass(t)
        inner: Hashable = None
        if isinstance(x, (tuple, list)):
            inner = tuple(self.child(f"[{j}]", y, depth) for j, y in enumerate(x))
        elif isinstance(x, dict):
            inner = tuple((self.child("key", k, depth), self.child(f"[{k!r}]", v, depth)) for k, v in x.items())
        elif isinstance(x, (set, frozenset)):
            inner = frozenset(self.child("element", y, depth) for y in x)
        elif isinstance(x, (int, float, str, bytes)):
            inner = (t.__mro__[1], x)
        return ("object", Ref(t), inner, self.state(x, t, depth))

    def state(self, x: Any, t: type, depth: int) -> Hashable:
        """``vars(x)`` and the values of its ``__slots__``."""
        d = getattr(x, "__dict__", None)
        out: list[Hashable] = []
        if d:
            out.append(tuple((n, self.child(f".{n}", v, depth)) for n, v in d.items()))
        for c in t.__mro__:
            for n in c.__dict__.get("__slots__", ()) if "__slots__" in c.__dict__ else ():
                if n in ("__dict__", "__weakref__"):
                    continue
                try:
                    v = object.__getattribute__(x, n)
                except AttributeError:
                    out.append((n, "unset"))
                    continue
                out.append((n, self.child(f".{n}", v, depth)))
        return tuple(out)

    def function(self, f: types.FunctionType, depth: int) -> Hashable:
        library = _is_library(f.__module__)
        if library and not f.__closure__:
            return ("function", Ref(f))
        code = f.__code__
        glob_names, attrs, imports = _code_names(code)
        self.names |= attrs
        closure = tuple(
            self.child(f"closure {n}", c, depth) for n, c in zip(code.co_freevars, f.__closure__ or ())
        )
        parts: list[Hashable] = [
            code,
            closure,
            self.child("defaults", f.__defaults__, depth),
            self.child("kwdefaults", f.__kwdefaults__, depth),
        ]
        if f.__dict__:
            parts.append(self.child("attributes", f.__dict__, depth))
        if not library:
            g, b = f.__globals__, getattr(f, "__builtins__", vars(builtins))
            glob: list[Hashable] = []
            for n in glob_names:
                if n in g:
                    glob.append((n, self.child(f"global {n}", g[n], depth)))
                elif n in b:
                    if n in _DYNAMIC:
                        raise self.fail(f"{f.__qualname__} calls {n}(), which reads names qkv cannot list")
                    glob.append((n, "builtin", Ref(b[n])))
                else:
                    glob.append((n, "missing"))
            for n in imports:
                glob.append(("import " + n, self.child(f"import {n}", sys.modules.get(n.partition(".")[0]), depth)))
            parts.append(tuple(glob))
        return ("function", *parts)

    # ---- namespaces: read by the attribute names the code spells --------------------------------
    def space(self, ns: object, items: Mapping[str, Any], always: set[str]) -> None:
        """Read ``ns``'s attributes by name at the end (:meth:`finish`); ``always``: names read even when no
        code spells them (methods Python calls implicitly). Met again, its ``always`` grows."""
        i = self.space_ids.get(id(ns))
        if i is not None:
            self.spaces[i][2].update(always)
            return
        self.space_ids[id(ns)] = len(self.spaces)
        self.keep.append(ns)
        self.spaces.append((ns, items, set(always)))

    def module(self, m: torch.nn.Module, called: bool) -> None:
        """An ``nn.Module`` as a namespace: its submodules, buffers, parameters and attributes by name."""
        if id(m) not in self.space_ids:
            items = {**m._modules, **m._buffers, **m._parameters}
            items.update((n, v) for n, v in vars(m).items() if n not in ("_modules", "_buffers", "_parameters"))
            self.space(m, items, set())
        self.klass(type(m), called=called)

    def klass(self, c: type, instance: bool = True, called: bool = True) -> None:
        """The user's classes in ``c``'s MRO as namespaces. Their dunder methods are read (operators call
        them unnamed), except those that build, show or write an object when ``c`` is only the class of
        an ``instance`` met; an ``nn.Module``'s ``forward`` when it may be ``called``."""
        for k in c.__mro__:
            if k is object or _is_library(k.__module__):
                continue
            d = vars(k)
            implicit = {n for n, v in d.items() if n.startswith("__") and n.endswith("__") and callable(v)}
            if instance:
                implicit -= _NOT_READ
            if called and issubclass(k, torch.nn.Module):
                implicit.add("forward")
            self.space(k, d, implicit)

    def finish(self) -> Hashable:
        """The named attributes of every namespace met, until no new code names another."""
        done: list[set[str]] = []
        out: list[Hashable] = []
        changed = True
        while changed:
            changed = False
            i = 0
            while i < len(self.spaces):
                if i == len(done):
                    done.append(set())
                ns, items, always = self.spaces[i]
                want = sorted((self.names | always) & items.keys() - done[i])
                for n in want:
                    done[i].add(n)
                    changed = True
                    out.append((i, n, self.child(f"{getattr(ns, '__name__', type(ns).__name__)}.{n}", items[n], 0)))
                i += 1
        return tuple(out)


def fingerprint(obj: object, max_bytes: int | None = MAX_BYTES) -> Hashable:
    """A hashable key that is equal for two calls exactly when ``obj`` (a function, usually a FlexAttention
    ``mask_mod``) would compute the same thing: everything it can read, walked as the module docstring
    says. Tensors count by contents, so a tensor changed in place, a global rebound or a closure cell
    rebound all change the key.

    Args:
        obj: any object; a function is followed into its code, closure, defaults and globals.
        max_bytes: bytes of tensor data it may digest (``None``: no limit).

    Raises:
        Unkeyable: with the reason, when something it reaches cannot be read with certainty.
    """
    if _tracing():
        raise Unkeyable("its values are not read while torch.compile traces")
    w = _Walk(max_bytes)
    try:
        main = w.key(obj, 0)
        spaces = w.finish()
    except RecursionError as e:
        raise Unkeyable("it nests too deeply to walk") from e
    except Unkeyable as e:
        e.path.insert(0, getattr(obj, "__qualname__", type(obj).__name__))
        raise
    return (main, spaces)


def fingerprint_or_none(obj: object, max_bytes: int | None = MAX_BYTES) -> tuple[Hashable | None, str | None]:
    """``(key, None)``, or ``(None, reason)`` when :func:`fingerprint` cannot key ``obj``."""
    try:
        return fingerprint(obj, max_bytes), None
    except Unkeyable as e:
        return None, str(e)
