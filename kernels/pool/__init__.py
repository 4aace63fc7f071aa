"""MViTv2's pooling convolution (depthwise 3-D, no bias): one public entry point over torch and Triton.

:func:`depthwise_conv3d` computes ``F.conv3d(x, weight, None, stride, padding, 1, C)`` for
x (N, C, T, H, W) and weight (C, 1, kt, kh, kw), with a ``backend=`` choice:

- ``torch``: that torch call (:mod:`kernels.pool.reference`); on a contiguous CUDA input torch
  runs its own depthwise-3D kernels (``at::native::conv_depthwise3d_cuda_*``);
- ``triton``: the Triton kernels of :mod:`kernels.pool.triton_pool` (forward, input gradient and
  a deterministic, atomic-free weight gradient, fp32 accumulation); on CPU only under
  ``TRITON_INTERPRET=1`` (tests);
- ``auto``: ``torch`` everywhere, for now. The Triton kernels have never run on a GPU: on an H200
  torch's depthwise kernels took 64 ms of the 159 ms of GPU kernels in one MViTv2-L step (~46×
  their 1.4 ms byte floor, bench/NOTES.md), but ``auto`` switches only once ``python -m bench.pool_conv`` has timed the
  ``triton`` layout against ``contiguous`` on a GPU.
"""
from __future__ import annotations

import torch

from .reference import IntOr3, check_inputs, depthwise_conv3d_reference

BACKENDS = ("auto", "torch", "triton")

__all__ = ["BACKENDS", "depthwise_conv3d", "depthwise_conv3d_reference", "check_inputs"]


def depthwise_conv3d(
    x: torch.Tensor, weight: torch.Tensor, stride: IntOr3 = 1, padding: IntOr3 = 0, backend: str = "auto"
) -> torch.Tensor:
    """Depthwise 3-D convolution without bias: (N, C, T, H, W) → (N, C, To, Ho, Wo) in x's dtype.

    Same result shape as ``F.conv3d(x, weight, None, stride, padding, 1, C)``; ``stride`` and
    ``padding`` are ints or (t, h, w) triples. Bad shapes, dtypes, devices or backends raise a
    ValueError. ``backend``: see the module docstring (``auto`` = ``torch`` until the Triton
    kernels have been timed on a GPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        from .triton_pool import depthwise_conv3d_triton  # imports triton only when asked for

        return depthwise_conv3d_triton(x, weight, stride, padding)
    return depthwise_conv3d_reference(x, weight, stride, padding)
