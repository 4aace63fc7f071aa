"""MViTv2 pooling-attention core with decomposed relative positions (DESIGN §3.5).

One public entry point, :func:`relpos_attention`, with a ``backend=`` choice:

- ``reference``: materialised logits, the official computation (``reference.py``);
- ``sdpa``: the exact augmented-operand factorisation through
  ``F.scaled_dot_product_attention`` (``sdpa.py``); ``xformers``: the same through
  ``xformers.ops.memory_efficient_attention`` where xformers really loads;
- ``triton``: the fused Triton kernel (``triton_attn.py``);
- ``auto``: the fastest exact backend for the device (see :func:`pick_backend`).

Residual pooling stays in the model.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from kernels import tuned_for

from .reference import REL_IMPLS, check_inputs, rel_pos_index, rel_table_len, rel_terms, rel_width, relpos_attention_reference

BACKENDS = ("auto", "reference", "sdpa", "xformers", "triton")

__all__ = [
    "BACKENDS",
    "REL_IMPLS",
    "relpos_attention",
    "relpos_attention_reference",
    "rel_pos_index",
    "rel_table_len",
    "rel_terms",
    "check_inputs",
    "pick_backend",
]


def pick_backend(q: torch.Tensor, rel_width: int = 0) -> str:
    """Backend used by ``auto``: the fastest exact backend measured for the device.

    CUDA, fp16/bf16: the fused Triton kernel (with its fused rel terms). On an H100 (bf16,
    forward+backward, MViTv2-L stages 1-4, B = 32,
    ``bench/results/attention_nvidia-h100-80gb-hbm3_20261127_final.md`` and ``…_split.md``) it
    took 5.35 / 2.85 / 2.02 / 1.68 ms (5.45 / 2.89 / 2.12 / 2.08 ms in the same file's ``auto``
    row, the same kernels: stages 3-4 vary that much from run to run, stage 4's 20-80 % range
    was 1.53-2.02 ms) against 6.87 / 3.49 / 2.14 / 2.10 ms for SDPA-cuDNN with the same fused rel
    terms (the previous ``auto``), 11.9 / 6.7 / 4.2 / 3.3 ms for SDPA-cuDNN alone and
    45.3 / 23.5 / 12.6 / 8.0 ms for the reference, with the least memory of the three at every
    stage. The lead is clear at stages 1-2 and within the noise at stage 4. Elsewhere (CPU; GPUs of other architectures than the one it was tuned and timed on,
    :func:`kernels.tuned_for`; fp32, whose Triton dots run in exact fp32; head dims over 256 or
    ``hd + rel_width`` over 512, which the kernel refuses) ``sdpa``: with cuDNN first where that was
    measured (:func:`_sdpa_order`: sm_90), in PyTorch's own order on other GPUs; on CPU it avoids
    materialising the (Nq, Nk) bias.
    """
    hd = q.shape[-1]
    if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and hd <= 256 and hd + rel_width <= 512
            and tuned_for(q.device)):
        return "triton"
    return "sdpa"


def _sdpa_order(q: torch.Tensor):
    """The SDPA backend order ``auto`` runs ``sdpa`` in: cuDNN first on the GPUs it was timed on
    (:func:`kernels.tuned_for`), else PyTorch's own order. PyTorch itself prefers cuDNN only on
    sm_90/sm_100 with a recent cuDNN (older ones had silent errors at sequence lengths not divisible
    by 128, as every MViTv2 length here is), and forcing it first on an A100 or an L4 overrode that."""
    return _cuda_sdpa_priority() if q.is_cuda and tuned_for(q.device) else contextlib.nullcontext()


def _cuda_sdpa_priority():
    """Context in which SDPA tries cuDNN, then flash, efficient and math (each only where it
    accepts the inputs). cuDNN beat flash by 1.1-1.3x in fwd+bwd at every MViTv2-L stage on the H100.
    Only the backends the caller left enabled are tried: an enclosing ``sdpa_kernel(MATH)`` (for
    reproducible runs) stays in force (``sdpa_kernel`` enables every backend it is given)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if not torch.compiler.is_compiling():  # (dynamo cannot trace the flag reads: a compiled graph keeps all four)
        order = [b for b, on in zip(order, (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(),
                                            cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())) if on]
    return sdpa_kernel(order, set_priority=True) if order else contextlib.nullcontext()


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    *,
    has_cls: bool = True,
    scale: Optional[float] = None,
    backend: str = "auto",
    rel_impl: str = "auto",
) -> torch.Tensor:
    """``softmax(scale·q·kᵀ + decomposed rel-pos bias) @ v``.

    q (B, nh, Nq, hd), k and v (B, nh, Nk, hd), cls at index 0 when ``has_cls``; ``q_thw`` and
    ``k_thw`` the (T, H, W) grids of the non-cls tokens; tables ``(2·max(Q,K)−1, hd)`` per axis
    (``rel_pos_t`` may be None when both T are 1). ``scale`` defaults to hd^-0.5.
    ``rel_impl`` (``sdpa`` and ``triton`` backends): ``"auto"`` (the Triton kernel on an sm_90 GPU,
    :func:`kernels.tuned_for`, else the einsums), ``"reference"`` (PyTorch einsums) or ``"triton"`` (the fused kernel of
    :mod:`kernels.attention.rel_triton`).
    Returns (B, nh, Nq, hd).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if rel_impl not in REL_IMPLS:
        raise ValueError(f"unknown rel_impl {rel_impl!r}; choose one of {REL_IMPLS}")
    auto = backend == "auto"
    if auto:
        try:
            width = rel_width(k_thw, rel_pos_t is not None)
        except (TypeError, IndexError, ValueError):  # a malformed k_thw: the backends' check says what is wrong
            check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
            raise
        backend = pick_backend(q, rel_width=width)
    args = (q, k, v, tuple(q_thw), tuple(k_thw), rel_pos_t, rel_pos_h, rel_pos_w)
    if backend == "reference":
        return relpos_attention_reference(*args, has_cls=has_cls, scale=scale)
    if backend == "sdpa":
        from .sdpa import relpos_attention_sdpa

        with _sdpa_order(q) if auto else contextlib.nullcontext():
            return relpos_attention_sdpa(*args, has_cls=has_cls, scale=scale, rel_impl=rel_impl)
    if backend == "xformers":
        from .sdpa import relpos_attention_xformers

        return relpos_attention_xformers(*args, has_cls=has_cls, scale=scale)
    from .triton_attn import relpos_attention_triton

    return relpos_attention_triton(*args, has_cls=has_cls, scale=scale, rel_impl=rel_impl)
