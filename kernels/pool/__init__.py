"""MViTv2's pooling convolution (depthwise 3-D, no bias): one public entry point over torch and Triton.

:func:`depthwise_conv3d` computes ``F.conv3d(x, weight, None, stride, padding, 1, C)`` for
x (N, C, T, H, W) and weight (C, 1, kt, kh, kw), with a ``backend=`` choice:

- ``torch``: that torch call (:mod:`kernels.pool.reference`); on a contiguous CUDA input torch
  runs its own depthwise-3D kernels (``at::native::conv_depthwise3d_cuda_*``);
- ``triton``: the Triton kernels of :mod:`kernels.pool.triton_pool` (forward, input gradient and
  a deterministic, atomic-free weight gradient, fp32 accumulation); on CPU only under
  ``TRITON_INTERPRET=1`` (tests);
- ``auto``: ``triton`` for an input on an sm_90 GPU (:func:`kernels.tuned_for`) in bf16 or fp16 of
  at least ``AUTO_TRITON_MIN_NUMEL`` (2²³) elements, ``torch`` otherwise (:func:`auto_backend`). Timed on an H200 (bf16, fwd+bwd
  per call, host included, ``bench/results/pool_conv_nvidia-h200_20261128_triton.md``): each
  MViTv2-L pooling of ≥ 14.4 M input elements at B 4 ran 1.3–2.7× faster through Triton (the
  poolings of stage 1 and of the first blocks of stages 2 and 3, 12 per step: 16.4 → 8.8 ms of
  a step's 82.6); the 3.6 M ones (stage 3's other 105 per step) 1.46–1.76× slower, presumably
  because a call's time is then its host time (~0.5 ms for the Triton path's four launches
  against torch's two ops: that file has no host column, so this is not measured). At 7.2 M
  two were faster, one even and one 2× slower, so the threshold sits above them. The step with
  *every* pooling on Triton (``bench.model_step --backends auto+tpool``): GPU kernels 159.6 →
  131.0 ms, but the host then set the pace (191.4 against 197.5 ms). With this rule only the 12
  large poolings move: predicted ~−7 ms per step, where the ``auto`` step's host (152.6 ms) and
  GPU kernels (159.6 ms) both fall short of its 197.5 ms (the gap is not explained); the step
  with the rule is not yet timed.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels import tuned_for

from .reference import IntOr3, check_inputs, depthwise_conv3d_reference

BACKENDS = ("auto", "torch", "triton")
AUTO_TRITON_MIN_NUMEL = 1 << 23  # auto: the Triton kernels from this many input elements (module docstring)
_AUTO_DTYPES = (torch.bfloat16, torch.float16)  # what auto sends to Triton (bf16 timed; fp16: the same bytes)

__all__ = ["AUTO_TRITON_MIN_NUMEL", "BACKENDS", "auto_backend", "autocast_dtype", "depthwise_conv3d",
           "depthwise_conv3d_reference", "check_inputs"]


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs a convolution of ``x`` in (as ``F.conv3d`` under ``torch.autocast``),
    None outside autocast, for float64 (which autocast leaves alone) and on devices it does not know
    (meta)."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev) if x.is_floating_point() else None


def auto_backend(x: torch.Tensor, dtype: Optional[torch.dtype] = None, *, min_numel: Optional[int] = None,
                 device_type: Optional[str] = None) -> str:
    """The backend ``auto`` runs for input ``x``: "triton" for a 5-D CUDA tensor (not ROCm, nor a GPU
    of another architecture than sm_90 (:func:`kernels.tuned_for`): untimed there) convolved in bf16/fp16 with at least ``AUTO_TRITON_MIN_NUMEL`` elements whose planes the
    kernels can address, else "torch" (the module docstring has the measurements).

    ``dtype``: the dtype the convolution runs in, default x's (``models.mvit.PoolConv3d`` passes the
    autocast dtype, which it casts to; this function's own ``auto`` does not cast, and sends an fp32
    input to torch, which autocasts it). ``min_numel`` / ``device_type``: the threshold and the
    device type to decide with instead of the real ones (``bench.model_step`` takes a small step's
    decisions as the full-size step's, and counts CUDA's path on a CPU)."""
    if (device_type or x.device.type) != "cuda" or torch.version.hip is not None:
        return "torch"
    if x.device.type == "cuda" and not tuned_for(x.device):  # timed on NVIDIA sm_90 only (kernels.tuned_for)
        return "torch"
    least = AUTO_TRITON_MIN_NUMEL if min_numel is None else min_numel
    if (dtype or x.dtype) not in _AUTO_DTYPES or x.numel() < least:
        return "torch"
    from .triton_pool import plane_fits  # imports triton only here

    return "triton" if x.dim() == 5 and plane_fits(x) else "torch"


def depthwise_conv3d(
    x: torch.Tensor, weight: torch.Tensor, stride: IntOr3 = 1, padding: IntOr3 = 0, backend: str = "auto"
) -> torch.Tensor:
    """Depthwise 3-D convolution without bias: (N, C, T, H, W) → (N, C, To, Ho, Wo) in x's dtype
    (under ``torch.autocast``, in the autocast dtype, as ``F.conv3d``: :func:`autocast_dtype`).

    Same result shape as ``F.conv3d(x, weight, None, stride, padding, 1, C)``; ``stride`` and
    ``padding`` are ints or (t, h, w) triples. Bad shapes, dtypes, devices or backends raise a
    ValueError. ``backend``: see the module docstring (``auto``: :func:`auto_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # (not a tensor: the reference's checks say what is wrong)
        backend = auto_backend(x) if isinstance(x, torch.Tensor) else "torch"
    if backend == "triton":
        from .triton_pool import depthwise_conv3d_triton  # imports triton only when asked for

        cast = autocast_dtype(x) if isinstance(x, torch.Tensor) else None
        if cast is not None:  # as torch's convolution under autocast: every backend gives one dtype
            x, weight = x.to(cast), weight.to(cast)
        return depthwise_conv3d_triton(x, weight, stride, padding)
    return depthwise_conv3d_reference(x, weight, stride, padding)
