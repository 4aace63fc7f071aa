"""Small pieces the benchmarks share: result-file naming and peak CUDA memory of one call."""
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
