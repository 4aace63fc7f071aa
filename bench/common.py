"""Small pieces the benchmarks share: result-file naming, the peak memory of one call, and the CUDA
kernels of one call."""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch


def results_slug(device: torch.device, name: str) -> str:
    """The device part of a result file's name: ``cpu``, or the GPU name in lower-case-dashes."""
    return "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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
        kernels.append(dict(kernel=e.key[:90], us_per_call=us / reps, launches_per_call=e.count / reps))
    return sorted(kernels, key=lambda k: -k["us_per_call"])
