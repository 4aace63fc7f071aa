"""MaskFeat HOG targets: one public entry point over a PyTorch reference and a fused Triton kernel.

- :func:`hog_targets` frames (N, 3, H, W) -> per-token targets (N, L, D).
- :func:`video_hog_targets` clip (B, C=3, T, H, W) -> (B, T/temporal_stride * L, D) on frames
  0, s, 2s, ... (the temporal centres of 2-frame tokens for s = 2), read in place without a copy.

Semantics: DESIGN §3.1 and :mod:`kernels.hog.reference` (official ``HOGLayerC``). The Triton path
is :mod:`kernels.hog.triton_hog` (its default: "cells-ptx" on CUDA for unsigned orientation, else
"cells"; ``hog_targets_triton`` also offers the other variants, an ``out=`` tensor and launch parameters). ``backend="auto"`` uses Triton for
NVIDIA CUDA tensors of the dtypes it reads (uint8, fp16, bf16, fp32) and the reference otherwise (the CPU,
ROCm, other dtypes); ``"triton"`` on CPU works only under ``TRITON_INTERPRET=1`` (tests).
Targets carry no gradient.
"""
from __future__ import annotations

import torch

from kernels.hog.reference import (
    NORMS,
    block_l2hys,
    cells_to_tokens,
    check_hog_args,
    hog_reference,
    hog_targets_reference,
    is_int,
    tokens_to_cells,
)
from kernels.hog.triton_hog import SUPPORTED_DTYPES, hog_targets_triton

BACKENDS = ("auto", "reference", "triton")

__all__ = [
    "BACKENDS",
    "NORMS",
    "block_l2hys",
    "cells_to_tokens",
    "hog_reference",
    "hog_targets",
    "hog_targets_reference",
    "hog_targets_triton",
    "tokens_to_cells",
    "video_hog_targets",
]


def _resolve_backend(backend: str, x: torch.Tensor, cell: int) -> str:
    """``auto``: the Triton kernel for an NVIDIA CUDA tensor of a dtype it reads and a power-of-two
    ``cell``, else the reference (a ROCm GPU, whose build of the kernel was never run or measured;
    float64 or integer frames, which the reference takes on the GPU as on the CPU; a cell of 3, 6,
    12..., which the kernel refuses)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        nvidia = x.is_cuda and torch.version.hip is None
        return "triton" if nvidia and x.dtype in SUPPORTED_DTYPES and not cell & (cell - 1) else "reference"
    return backend


def hog_targets(
    frames: torch.Tensor,
    token_stride: int = 16,
    *,
    cell: int = 8,
    nbins: int = 9,
    gaussian_window: int = 0,
    signed: bool = False,
    norm: str = "cell_l2",
    backend: str = "auto",
) -> torch.Tensor:
    """HOG targets per token. frames (N, 3, H, W), uint8/fp16/bf16/fp32, any strides -> (N, L, D) fp32.

    L = (H/token_stride) * (W/token_stride) tokens in raster order; D = 3 * nbins * (token_stride/cell)^2
    with index ((c*nbins + bin)*s + cy)*s + cx, s = token_stride / cell.
    """
    check_hog_args(tuple(frames.shape), token_stride, cell, nbins, gaussian_window, norm, signed)
    if _resolve_backend(backend, frames, cell) == "reference":
        return hog_targets_reference(
            frames, token_stride, cell=cell, nbins=nbins, gaussian_window=gaussian_window, signed=signed, norm=norm
        )
    return hog_targets_triton(
        frames.unsqueeze(1),  # (N, 1, 3, H, W): a view
        token_stride,
        cell=cell,
        nbins=nbins,
        gaussian_window=gaussian_window,
        signed=signed,
        norm=norm,
    )


def video_hog_targets(
    clip: torch.Tensor,
    temporal_stride: int = 2,
    token_stride: int = 16,
    **kwargs,
) -> torch.Tensor:
    """Targets of a clip. clip (B, 3, T, H, W) -> (B, ceil(T/temporal_stride) * L, D) fp32.

    Uses frames ``clip[:, :, ::temporal_stride]`` (tokens in (t, h, w) raster order). Keyword
    arguments are those of :func:`hog_targets`. The Triton path reads the strided frames in place.
    """
    if clip.dim() != 5:
        raise ValueError(f"video_hog_targets expects a clip (B, C, T, H, W), got shape {tuple(clip.shape)}")
    if clip.shape[1] != 3:  # (the frames' check named the (B*T', C, H, W) shape it builds, not this one)
        hint = "; a (B, T, C, H, W) clip: pass clip.transpose(1, 2)" if clip.shape[2] == 3 else ""
        raise ValueError(f"video_hog_targets expects a clip (B, 3, T, H, W), got shape {tuple(clip.shape)}{hint}")
    if not is_int(temporal_stride) or temporal_stride < 1:
        raise ValueError(f"temporal_stride must be a positive int, got {temporal_stride!r}")
    unknown = set(kwargs) - {"cell", "nbins", "gaussian_window", "signed", "norm", "backend"}
    if unknown:
        raise TypeError(f"video_hog_targets got unexpected keyword arguments {sorted(unknown)}")
    bsz, c, t, h, w = clip.shape
    frames = clip[:, :, ::temporal_stride].transpose(1, 2)  # (B, T', 3, H, W), a view
    tp = frames.shape[1]
    opts = {"cell": 8, "nbins": 9, "gaussian_window": 0, "signed": False, "norm": "cell_l2"}
    opts.update({k: v for k, v in kwargs.items() if k != "backend"})
    check_hog_args(
        (bsz * tp, c, h, w), token_stride, opts["cell"], opts["nbins"], opts["gaussian_window"], opts["norm"],
        opts["signed"],
    )
    if _resolve_backend(kwargs.get("backend", "auto"), clip, opts["cell"]) == "reference":
        out = hog_targets_reference(frames.reshape(bsz * tp, c, h, w), token_stride, **opts)
    else:
        out = hog_targets_triton(frames, token_stride, **opts)  # (B*T', L, D)
    return out.reshape(bsz, tp * out.shape[1], out.shape[2])
