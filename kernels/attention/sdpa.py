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
kernel refuses and SDPA falls back to another backend on its own.

Gradients: the rel terms are einsums of q with gathered tables (``reference.rel_terms``), so
autograd carries gradients to q (through both the scaled and the rel-term paths), k, v and the
three tables; the one-hot part of k' is a constant.

Precision: tables may be fp32 master weights while q is bf16/fp16; they are cast to q's dtype and
the rel terms are computed in q's dtype, as the reference does. The reference then rounds
``scale·q·kᵀ`` and the bias to q's dtype *before* adding them; here the sum happens inside the
kernel's fp32 accumulator (only ``scale·q`` and the rel terms are rounded). Low-precision results
therefore differ from the low-precision reference by rounding, and are usually closer to the
float64 oracle. In fp32/fp64 the two agree to rounding.

Known limits: the (B, nh, Nq, D') and (B, nh, Nk, D') augmented copies are materialised (small
next to the (Nq, Nk) logits the reference builds). xformers does not run on CPU here and its
wheel targets another torch build; ``relpos_attention_xformers`` raises a RuntimeError with the
reason wherever it does not really run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import Grid, check_inputs, rel_terms

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
    Tk, Hk, Wk = k_thw
    width = hd + (Tk if has_t else 0) + Hk + Wk
    return -(-width // PAD_MULTIPLE) * PAD_MULTIPLE


def _key_onehots(k_thw: Grid, has_t: bool, has_cls: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """(Nk, E) constant: per key the one-hot of its t, h and w coordinate (cls row all zeros).

    E = (Tk if has_t) + Hk + Wk; keys are ordered t-major, then h, then w (as the tokens are)."""
    Tk, Hk, Wk = k_thw
    t, h, w = torch.meshgrid(
        torch.arange(Tk, device=device), torch.arange(Hk, device=device), torch.arange(Wk, device=device), indexing="ij"
    )
    parts = [F.one_hot(h.reshape(-1), Hk), F.one_hot(w.reshape(-1), Wk)]  # (Nk', Hk), (Nk', Wk)
    if has_t:
        parts.insert(0, F.one_hot(t.reshape(-1), Tk))  # (Nk', Tk)
    onehot = torch.cat(parts, dim=-1).to(dtype)  # (Nk', E)
    if has_cls:
        onehot = F.pad(onehot, (0, 0, 1, 0))  # (Nk, E): cls key gets no bias
    return onehot


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (q', k', v') of DESIGN §3.5, all (B, nh, N, D') in q's dtype; softmax scale is 1.

    Inputs are checked (ValueError on inconsistency). Differentiable in q, k, v and the tables.
    """
    check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    B, nh, Nq, hd = q.shape
    Nk = k.shape[2]
    scale = hd**-0.5 if scale is None else scale
    has_t = rel_pos_t is not None
    D = augmented_width(hd, k_thw, has_t)

    # tables may be fp32 master weights while q is bf16/fp16: rel terms in q's dtype
    rel_pos_h, rel_pos_w = rel_pos_h.to(q.dtype), rel_pos_w.to(q.dtype)
    rel_pos_t = rel_pos_t.to(q.dtype) if has_t else None
    rel_t, rel_h, rel_w = rel_terms(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    rel = torch.cat(([rel_t] if has_t else []) + [rel_h, rel_w], dim=-1)  # (B, nh, Nq', E)
    E = rel.shape[-1]
    if has_cls:
        rel = F.pad(rel, (0, 0, 1, 0))  # (B, nh, Nq, E): cls query gets no bias
    pad = D - hd - E
    q_aug = F.pad(torch.cat([q * scale, rel], dim=-1), (0, pad))  # (B, nh, Nq, D')

    onehot = _key_onehots(k_thw, has_t, has_cls, q.dtype, q.device)  # (Nk, E)
    onehot = F.pad(onehot, (0, pad)).expand(B, nh, Nk, E + pad)  # (B, nh, Nk, D' - hd)
    k_aug = torch.cat([k, onehot], dim=-1)  # (B, nh, Nk, D')
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
) -> torch.Tensor:
    """``softmax(scale·q·kᵀ + bias) @ v`` through ``F.scaled_dot_product_attention`` on the
    augmented operands. q (B, nh, Nq, hd), k/v (B, nh, Nk, hd) → (B, nh, Nq, hd) in q's dtype.

    SDPA picks its backend itself; restrict it from outside with
    ``torch.nn.attention.sdpa_kernel`` (the benchmark does, per backend)."""
    hd = q.shape[-1]
    q_aug, k_aug, v_aug = augment_operands(
        q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls=has_cls, scale=scale
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
            reason = f"xformers does not run here: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
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
