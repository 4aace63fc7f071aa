"""Launching a compiled Triton kernel again without the JIT's per-call work.

Every ``kernel[grid](*args, **kw)`` goes through ``JITFunction.run``: it binds the arguments to
the signature, specialises each one (dtype and 16-byte alignment of a tensor, an integer's
divisibility by 16), builds the cache key, looks the compiled kernel up and only then calls the
C launcher. For our attention kernels (23–52 parameters) that Python side cost 7–22 µs per
launch on this project's CPU machine, the C launcher's call ~1 µs (``bench.attention_host
--launcher offline``, bench/NOTES.md). One fwd+bwd makes 8–9 launches, and where the kernels are
short (MViTv2-L's stages 3–4, the recipe's 4 clips per GPU) the host sets the time.

:func:`launch` keeps, per kernel, the compiled kernel of each *call key* it has seen, and on a
repeated key does what ``JITFunction.run`` does once it has found the kernel: calls
``CompiledKernel.run`` with the grid, the current stream, the launch metadata and hooks, and the
argument list the JIT passes (every parameter in signature order, constexprs and defaults
included; the same code in triton 3.6 through 3.9). The call key is finer than Triton's
specialisation, so a hit can only reuse the kernel the JIT would have picked:

- a tensor argument: its dtype and its address modulo 16 (Triton reads the dtype and whether the
  address is a multiple of 16);
- any other positional argument: its type and value (Triton: an integer's width, ``== 1`` and
  divisibility by 16, a float's type);
- keyword arguments (constexprs, ``num_warps``, ``num_stages``, ``maxnreg``): names and values;
- the current CUDA device (compiled kernels are loaded per device).

Runtime arguments must come positionally; a kernel called with a non-constexpr keyword argument
is launched through the JIT every time. A first call, a new key, an unhashable argument, the
interpreter and bench.sass's capture driver go through ``kernel[grid]`` unchanged. What the JIT
re-reads on every call is fixed at a key's first launch: the ``TRITON_DEBUG`` /
instrumentation knobs, and its check that the globals a kernel reads have not changed (ours read
module constants only). ``tests/kernels/test_launch.py`` checks, for every launch of a fwd+bwd
compiled offline for sm_90, that the fast path hands the C launcher exactly the arguments the JIT
does, and that the key separates whatever Triton's specialisation separates.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from triton import knobs
from triton.runtime.driver import driver as _driver

from kernels import interpreting

_MAX_KEYS = 64  # call keys kept per kernel: a few per MViTv2 stage and dtype; cleared when full
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's axes 1 and 2 (axis 0: 2**31 - 1)
_INTERPRET = interpreting()  # the kernels are interpreter functions for the life of the process


class _Entry:
    """A compiled kernel and the constant tail of its argument list (constexprs and defaults)."""

    __slots__ = ("kernel", "tail")

    def __init__(self, kernel: Any, tail: tuple) -> None:
        self.kernel = kernel
        self.tail = tail


_NO_FAST = object()  # marks a kernel that takes a runtime argument by keyword: always the JIT's path
_caches: dict[int, Any] = {}  # id(JITFunction) -> {call key: _Entry} or _NO_FAST (module-level kernels: never freed)
enabled = True  # False: every launch goes through the JIT (a switch for comparing the two)


def call_key(device: int, args: tuple, kw: dict) -> tuple:
    """What a launch is cached under (see the module docstring); unhashable values raise TypeError.
    A tensor counts by its dtype and its address modulo 16 (finer than aligned or not)."""
    return (device, *kw.items(), *[(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else (type(a), a)
                                   for a in args])


def _tail(kernel: Any, args: tuple, kw: dict) -> Any:
    """The argument values after the positional ones, in signature order with defaults, as
    ``JITFunction.run`` passes them on; ``_NO_FAST`` if a runtime (non-constexpr) parameter came
    by keyword or the signature cannot be bound."""
    sig = inspect.signature(kernel.fn)
    params = {p.name: p for p in kernel.params}
    named = {k: v for k, v in kw.items() if k in sig.parameters}
    if any(not params[k].is_constexpr for k in named):
        return _NO_FAST
    try:
        bound = sig.bind(*args, **named)
    except TypeError:
        return _NO_FAST
    bound.apply_defaults()
    return tuple(bound.arguments.values())[len(args):]


def launch(kernel: Any, grid: tuple, *args: Any, **kw: Any) -> None:
    """``kernel[grid](*args, **kw)``, with the JIT's per-call work skipped on a repeated call key.
    A grid over CUDA's limits is a ValueError here (the interpreter has none; CUDA's error would
    name no kernel): callers split their batch with :func:`batch_step`."""
    if len(grid) > 1 and max(grid[1:]) > MAX_GRID_YZ:
        raise ValueError(f"{getattr(kernel, '__name__', kernel)}: grid {tuple(grid)} exceeds CUDA's {MAX_GRID_YZ} "
                         "on axis 1 or 2")
    if _INTERPRET or not enabled:
        kernel[grid](*args, **kw)
        return
    cache = _caches.get(id(kernel))
    if cache is _NO_FAST or getattr(_driver._active, "fast_launch", True) is False:
        kernel[grid](*args, **kw)
        return
    drv = _driver.active
    device = drv.get_current_device()
    try:
        key = call_key(device, args, kw)
    except TypeError:  # an unhashable argument
        kernel[grid](*args, **kw)
        return
    entry = cache.get(key) if cache is not None else None
    if entry is None:
        _fill(kernel, grid, key, cache, args, kw)
        return
    # what JITFunction.run does once it has found the kernel (triton 3.6-3.9)
    stream = drv.get_current_stream(device)
    k = entry.kernel
    full = args + entry.tail
    k.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, k.function,
          k.packed_metadata, k.launch_metadata(grid, stream, *full), knobs.runtime.launch_enter_hook,
          knobs.runtime.launch_exit_hook, *full)


def batch_step(B: int, per_item: int) -> int:
    """How many of B batch items one call may take when its grids put ``per_item`` programs per
    item on axis 1 or 2 (the attention kernels' B·nh): B itself when that fits in
    :data:`MAX_GRID_YZ`, else the largest count that does."""
    if per_item > MAX_GRID_YZ:
        raise ValueError(f"{per_item} heads per batch item exceed the kernels' grid limit {MAX_GRID_YZ}")
    return B if B * per_item <= MAX_GRID_YZ else MAX_GRID_YZ // per_item


def _fill(kernel: Any, grid: tuple, key: tuple, cache: Optional[dict], args: tuple, kw: dict) -> None:
    """Launch through the JIT and keep what it compiled under ``key``."""
    compiled = kernel[grid](*args, **kw)
    if not hasattr(compiled, "packed_metadata"):  # nothing compiled (a skipped launch, another runtime)
        return
    tail = _tail(kernel, args, kw)
    if tail is _NO_FAST:
        _caches[id(kernel)] = _NO_FAST
        return
    if cache is None or len(cache) >= _MAX_KEYS:
        cache = _caches[id(kernel)] = {}
    cache[key] = _Entry(compiled, tail)


def clear() -> None:
    """Forget every cached compiled kernel (``bench.attention_host`` after compiling for a stand-in target)."""
    _caches.clear()
