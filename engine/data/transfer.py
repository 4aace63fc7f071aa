"""Host-to-device copies that do not make the CPU wait for the GPU.

``t.to(cuda_device)`` from ordinary (pageable) CPU memory synchronises the stream: the CPU waits
until the GPU has finished everything queued before the copy. Once per batch (labels, indices,
masks) that stops the CPU from queueing the next step while the GPU finishes the last one, and at
MViTv2-L's recipe batch the CPU's queueing is about as long as the GPU's work (bench/NOTES.md).
:func:`to_device` copies through pinned memory instead, without waiting: PyTorch's caching host
allocator keeps the pinned block until the copy has run, and the source is always a block of our
own (a tensor pinned by someone else, e.g. a loader's reused buffer, is copied first).
"""
from __future__ import annotations

from typing import Optional

import torch


def to_device(t: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` on ``device`` (in ``dtype`` when given); from the CPU to CUDA without a host wait."""
    if dtype is not None and t.dtype != dtype and t.device.type == "cpu":
        t = t.to(dtype)  # converted on the CPU: a new tensor of ours, and fewer bytes to copy for bools
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device, dtype=dtype)
    if t.is_pinned():  # pinned memory we do not own could be reused before the copy runs
        t = t.clone()
    return t.pin_memory().to(device, non_blocking=True)
