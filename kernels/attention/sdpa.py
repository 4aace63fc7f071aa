"""MViTv2 relative-position attention through stock flash/efficient kernels (DESIGN §3.5).

The decomposed bias factors exactly into augmented operands, so any attention kernel without a
bias input computes it:

    q' = [scale·q, rel_t, rel_h, rel_w, 0…]      (B, nh, Nq, D')
    k' = [k, onehot_t(j), onehot_h(j), onehot_w(j), 0…]   (B, nh, Nk, D')
    v' = [v, 0…]                                   (B, nh, Nk, D')
    out = softmax(q'·k'ᵀ) @ v'  (softmax scale 1), sliced back to hd

so ``q'_i·k'_j = scale·q_i·k_j + rel_t[i, t(j)] + rel_h[i, h(j)] + rel_w[i, w(j)]``, which is
the official logit of ``reference.py``. The cls query gets zeros in the extra entries and the cls
key gets zeros too, so the cls row and column get no bias. The extra width is Tk + Hk + Wk
(MViTv2-L 16×4: 8 + 7 + 7 = 22 at KV length 393, so D' = 72 + 22 → 96).

Layout decision, measured on torch 2.13 CPU (and per PyTorch's documented CUDA constraints):
the flash kernel (CPU and CUDA) requires q, k and v to share the last dimension; the CUDA
efficient and flash kernels want it a multiple of 8 (flash: ≤ 256). So q', k' *and* v are
zero-padded to one common width D' = round_up(hd + Tk + Hk + Wk, 8), and the output is sliced
back to hd. Padding v costs a little extra bandwidth (D'/hd) but lets every SDPA backend (math,
flash, efficient, cuDNN) and xformers accept the same operands. When D' > 256 the CUDA flash
kernel refuses and SDPA falls back to another backend on its own. Measured: on CPU (torch 2.13)
math and flash accept the padded operands (flash refuses a v narrower than q/k); on an H100
(torch 2.11) math, flash, efficient and cuDNN all accept them at hd 72 (D' 96) and hd 96 (D' 120).

Gradients: the rel terms are einsums of q with gathered tables (as ``reference.rel_terms``), so
autograd carries gradients to q (through both the scaled and the rel-term paths), k, v and the
three tables; the one-hot part of k' is a constant. The distance indices and the one-hot key
suffix are cached per geometry/device (fewer small launches per call: at the MViTv2 sizes on an
H100 the call is launch-bound, see bench/results).

Precision: tables may be fp32 master weights while q is bf16/fp16; they are cast to q's dtype and
the rel terms are computed in q's dtype, as the reference does. The reference then rounds
``scale·q·kᵀ`` and the bias to q's dtype *before* adding them; here the sum happens inside the
kernel's fp32 accumulator (only ``scale·q`` and the rel terms are rounded). Low-precision results
therefore differ from the low-precision reference by rounding, and are usually closer to the
float64 oracle (H100, bf16, MViTv2-L/S stage shapes: output max error 4–6e-3 of max|out| against
the fp32 reference, where the bf16 reference has 1–2e-2). In fp32/fp64 the two agree to rounding.

Known limits: the (B, nh, Nq, D') and (B, nh, Nk, D') augmented copies are materialised (small
next to the (Nq, Nk) logits the reference builds). xformers does not run on CPU here and its
wheel targets another torch build; ``relpos_attention_xformers`` raises a RuntimeError with the
reason wherever it does not really run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import Grid, check_inputs, key_onehot, rel_matrix_impl, rel_width

__all__ = [
    "augment_operands",
    "augmented_width",
    "relpos_attention_sdpa",
    "relpos_attention_xformers",
    "xformers_available",
]

PAD_MULTIPLE = 8  # CUDA flash/efficient kernels want a head dim that is a multiple of 8


def augmented_width(hd: int, k_thw: Grid, has_t: bool) -> int:
    """Common head dim D' of q', k', v': hd + (Tk if has_t) + Hk + Wk rounded up to 8."""
    width = hd + rel_width(k_thw, has_t)
    return -(-width // PAD_MULTIPLE) * PAD_MULTIPLE


def augment_operands(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    *,
    has_cls: bool = True,
    scale: Optional[float] = None,
    rel_impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (q', k', v') of DESIGN §3.5, all (B, nh, N, D') in q's dtype; softmax scale is 1.

    Inputs are checked (ValueError on inconsistency). Differentiable in q, k, v and the tables.
    ``rel_impl``: how the rel terms are computed (``reference.rel_matrix_impl``).
    """
    q_thw, k_thw = tuple(q_thw), tuple(k_thw)
    check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    B, nh, Nq, hd = q.shape
    Nk = k.shape[2]
    scale = hd**-0.5 if scale is None else scale
    has_t = rel_pos_t is not None
    D = augmented_width(hd, k_thw, has_t)
    E = rel_width(k_thw, has_t)
    pad = D - hd - E

    rel = rel_matrix_impl(rel_impl, q.device)(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)  # (B, nh, Nq', E)
    rel = F.pad(rel, (0, pad, 1 if has_cls else 0, 0))  # (B, nh, Nq, E + pad): cls query gets no bias
    q_aug = torch.cat([q * scale, rel], dim=-1)  # (B, nh, Nq, D')
    suffix = key_onehot(k_thw, has_t, has_cls, E + pad, q.dtype, q.device)  # (Nk, E + pad)
    k_aug = torch.cat([k, suffix.expand(B, nh, Nk, E + pad)], dim=-1)  # (B, nh, Nk, D')
    v_aug = F.pad(v, (0, D - hd))  # (B, nh, Nk, D')
    return q_aug, k_aug, v_aug


def relpos_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    *,
    has_cls: bool = True,
    scale: Optional[float] = None,
    rel_impl: str = "auto",
) -> torch.Tensor:
    """``softmax(scale·q·kᵀ + bias) @ v`` through ``F.scaled_dot_product_attention`` on the
    augmented operands. q (B, nh, Nq, hd), k/v (B, nh, Nk, hd) → (B, nh, Nq, hd) in q's dtype.

    SDPA picks its backend itself; restrict it from outside with
    ``torch.nn.attention.sdpa_kernel`` (the benchmark does, per backend). ``rel_impl``: see
    :func:`augment_operands`."""
    hd = q.shape[-1]
    q_aug, k_aug, v_aug = augment_operands(
        q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls=has_cls, scale=scale, rel_impl=rel_impl
    )
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)  # (B, nh, Nq, D')
    return out[..., :hd]


_XFORMERS_REASON: dict[str, Optional[str]] = {}  # device string -> None if usable, else why not


def _xformers_probe(device: torch.device) -> Optional[str]:
    """None if xformers' memory_efficient_attention imports and runs correctly on ``device``,
    else a sentence saying why not. Cached per device."""
    key = str(device)
    if key in _XFORMERS_REASON:
        return _XFORMERS_REASON[key]
    reason: Optional[str] = None
    if device.type != "cuda":
        reason = f"xformers memory_efficient_attention has no {device.type} kernels (CUDA only)"
    else:
        try:
            import xformers.ops as xops

            g = torch.Generator(device="cpu").manual_seed(0)
            qkv = [torch.randn(1, 16, 1, 16, generator=g).to(device, torch.float16) for _ in range(3)]
            out = xops.memory_efficient_attention(*qkv, scale=1.0)  # (B, N, nh, hd) layout
            want = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in qkv), scale=1.0)
            err = (out.float().transpose(1, 2) - want).abs().max().item()
            if not err < 1e-2:
                reason = f"xformers ran but disagrees with SDPA (max abs err {err:.3g})"
        except Exception as exc:  # ImportError, missing C++ ops, ABI mismatch with this torch
            reason = f"xformers does not run here: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    _XFORMERS_REASON[key] = reason
    return reason


def xformers_available(device) -> bool:
    """True when xformers loads and its memory-efficient attention really runs on ``device``."""
    return _xformers_probe(torch.device(device)) is None


def relpos_attention_xformers(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    *,
    has_cls: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The same augmented factorisation through ``xformers.ops.memory_efficient_attention``.

    Raises RuntimeError (with the reason) where xformers does not really run, e.g. on CPU."""
    reason = _xformers_probe(q.device)
    if reason is not None:
        raise RuntimeError(f"attention backend 'xformers' unavailable on {q.device}: {reason}")
    import xformers.ops as xops

    hd = q.shape[-1]
    q_aug, k_aug, v_aug = augment_operands(
        q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls=has_cls, scale=scale
    )
    # xformers wants (B, N, nh, D')
    out = xops.memory_efficient_attention(
        q_aug.transpose(1, 2), k_aug.transpose(1, 2), v_aug.transpose(1, 2), scale=1.0
    )  # (B, Nq, nh, D')
    return out.transpose(1, 2)[..., :hd]
