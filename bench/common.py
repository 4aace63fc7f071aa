"""Small pieces the benchmarks share: result-file naming and the peak memory of one call."""
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
    allocation and free of the CPU allocator that ``torch.profiler`` records (its raw
    ``[memory]`` events, one per allocation or free, with its own timestamp). Memory not allocated
    through torch (numpy inside the Triton interpreter) is not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20
