"""Small pieces the benchmarks share: result-file naming, the peak memory of one call, and the CUDA
kernels of one call, by name and by what they do."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


def command_line(module: str, argv: Optional[list] = None) -> str:
    """The command that reproduces this run, with ``TRITON_INTERPRET=1`` in front when it is set."""
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return f"{env}python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def require_interpreter_on_cpu(device: torch.device, what: str) -> None:
    """Exit with one line when ``what`` needs the Triton kernels on a CPU outside the interpreter."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(f"{what} runs the Triton kernels, which run on a CPU only in Triton's interpreter: "
                         "rerun with TRITON_INTERPRET=1 in the environment")


def results_slug(device: torch.device, name: str) -> str:
    """The device part of a result file's name: ``cpu``, or the GPU name in lower-case-dashes."""
    return "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


MIN_SAMPLES = {True: 10, False: 20}
"""Timed calls per measurement on CUDA at least (``--quick`` or not)."""


def do_bench_min(call: Callable[[], object], *, quick: bool, leaves: Sequence[torch.Tensor] = (),
                 base_rep_ms: Optional[float] = None, quantiles: Sequence[float] = (0.5, 0.2, 0.8)) -> list[float]:
    """``triton.testing.do_bench`` quantiles (ms) over at least :data:`MIN_SAMPLES` calls. It times
    ``int(rep / its own estimate)`` calls: one for a 44 ms call in a 30 ms budget, so a median could
    be a single call. ``leaves``: tensors whose ``.grad`` is cleared before each call.
    ``base_rep_ms``: the budget short calls get (default 30 ms quick, 50 ms otherwise)."""
    import triton.testing

    estimate_ms = math.inf
    for _ in range(2):  # as the timed calls: gradients cleared first
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        estimate_ms = min(estimate_ms, (time.perf_counter() - t0) * 1e3)
    # do_bench adds an L2 flush per call to its estimate: a margin keeps the count at MIN_SAMPLES
    # (exactly MIN x our estimate gave 9 of 10 for a 44 ms call)
    base = base_rep_ms if base_rep_ms is not None else (30 if quick else 50)
    rep = max(base, 1.25 * MIN_SAMPLES[quick] * estimate_ms + 1)
    out = triton.testing.do_bench(call, warmup=10 if quick else 25, rep=rep, grad_to_none=list(leaves) or None,
                                  quantiles=list(quantiles))
    return [float(x) for x in (out if isinstance(out, (list, tuple)) else [out])]


def peak_mib(call: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak extra CUDA memory of one call (MiB) beyond what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_mib(call: Callable[[], object]) -> float:
    """Peak extra CPU memory of one call (MiB): the running sum, in time order, of every
    allocation and free of the CPU allocator that ``torch.profiler`` records on this thread (its
    raw ``[memory]`` events, one per allocation or free, with its own timestamp; CPU autograd runs
    the backward on the calling thread, other threads' frees must not count against the call).

    The Triton interpreter leaves a launch's tensor arguments in reference cycles until the
    garbage collector runs (a GPU launch keeps no reference), which would free buffers at
    arbitrary later points. So the collector is off during the call and runs after every
    interpreted launch: buffers are freed when their last reference goes, as on a GPU. Memory not
    allocated through torch (numpy inside the interpreter) is not counted."""
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:  # no triton: nothing interpreted
        GridExecutor = None
    launch = GridExecutor.__call__ if GridExecutor is not None else None

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect()

    gc.collect()
    gc.disable()
    if GridExecutor is not None:
        GridExecutor.__call__ = launch_then_collect
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("cpu_peak_mib"):
                call()
    finally:
        if GridExecutor is not None:
            GridExecutor.__call__ = launch
        gc.enable()
    events = prof.profiler.kineto_results.events()
    thread = next(e.start_thread_id() for e in events if e.name() == "cpu_peak_mib")
    current = peak = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes()) for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU and e.start_thread_id() == thread
    ):
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def cuda_kernels(call: Callable[[], object], reps: int = 5) -> list[dict]:
    """The CUDA kernels of one ``call`` (warmed up by the caller), from ``torch.profiler`` over
    ``reps`` calls: name (90 characters), µs per call and launches per call, longest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if us <= 0 or e.key.startswith(("aten::", "autograd::", "cudaDeviceSynchronize")):
            continue
        kernels.append(dict(kernel=e.key[:90], category=kernel_category(e.key), us_per_call=us / reps,
                            launches_per_call=e.count / reps))
    return sorted(kernels, key=lambda k: -k["us_per_call"])


# (category, name fragments), first match wins: SDPA's attention kernels before cuDNN's convolutions
# (cuDNN names both), convolutions before GEMMs (cuDNN's implicit-GEMM convolutions say "gemm"),
# copies before the elementwise kernels that implement them (a direct copy is an elementwise kernel)
_CATEGORIES = (
    ("attention (SDPA)", ("sdpa", "fmha", "flash", "attention")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "cudnn")),
    ("GEMM", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitkreduce")),
    ("layer norm", ("layer_norm", "layernorm", "gammabeta")),
    ("softmax", ("softmax",)),
    ("copy / cat", ("copy", "catarray", "memcpy")),
    ("fill", ("fill", "memset")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "gelu")),
)


def kernel_category(name: str) -> str:
    """What part of a training step a CUDA kernel named ``name`` (the profiler's key) does:
    our Triton kernels by their function names (``attention (ours)``, ``HOG (ours)``,
    ``pooling (ours)``), library
    kernels by fragments of theirs (:data:`_CATEGORIES`), else ``other``. A step's GPU time per
    category says which part a kernel of our own would have to replace (``bench.model_step``)."""
    ours = _our_kernels().get(name)
    if ours is not None:
        return ours
    low = name.lower()
    for category, fragments in _CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def _our_kernels() -> dict[str, str]:
    """{Triton kernel function name: category} of every kernel in ``kernels``."""
    global _OURS
    if _OURS is None:
        from triton.runtime.jit import KernelInterface  # a JITFunction, or an InterpretedFunction

        from kernels.attention import rel_triton, triton_attn
        from kernels.hog import triton_hog
        from kernels.pool import triton_pool

        groups = (("attention (ours)", (triton_attn, rel_triton)), ("HOG (ours)", (triton_hog,)),
                  ("pooling (ours)", (triton_pool,)))
        _OURS = {
            name: category
            for category, modules in groups
            for module in modules
            for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and name.endswith("_kernel")
        }
    return _OURS


_OURS: Optional[dict[str, str]] = None


def by_category(kernels: list[dict]) -> list[dict]:
    """``cuda_kernels``' rows summed per category: category, µs per call, launches per call, longest first."""
    out: dict[str, dict] = {}
    for k in kernels:
        row = out.setdefault(k["category"], dict(category=k["category"], us_per_call=0.0, launches_per_call=0.0))
        row["us_per_call"] += k["us_per_call"]
        row["launches_per_call"] += k["launches_per_call"]
    return sorted(out.values(), key=lambda r: -r["us_per_call"])


def write_files(out_dir: Path, stem: str, payload: dict, lines: list[str]) -> tuple[Path, Path]:
    """Every bench's result pair: ``stem``.json (``payload``) and ``stem``.md (``lines``) in
    ``out_dir``, made if missing. Returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=1))
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath
