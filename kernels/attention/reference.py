"""Reference MViTv2 pooling attention with decomposed relative positions (DESIGN §3.5).

Semantics follow the official SlowFast ``MultiScaleAttention`` (``cal_rel_pos_spatial`` and
``cal_rel_pos_temporal``): logits are ``scale·q·kᵀ`` plus, for every non-cls query/key pair, the
dot products of the *unscaled* query with the three relative-position tables gathered at

    dist[i, j] = floor(i·q_ratio − j·k_ratio + (K−1)·k_ratio),
    q_ratio = max(K/Q, 1), k_ratio = max(Q/K, 1), table length 2·max(Q, K) − 1,

for each axis (t, h, w) with query length Q and key length K. The cls row and column get no bias.

(``rel_pos_index`` computes it with the official code's float32 arithmetic, which for
non-integer ratios differs from the exact floor at a few indices.) This module is the oracle every
other backend is checked against: it materialises the full (B, nh, Nq, Nk) logits exactly like
the official code. It also holds the small helpers that the
fast backends share (distance indices, the factored ``rel_t/rel_h/rel_w`` terms, input checks).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kernels import tensor_cache, tuned_for

Grid = Sequence[int]  # (T, H, W) of the non-cls tokens


@tensor_cache(maxsize=256)
def rel_pos_index(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(Q, K) int64 table index ``dist`` of DESIGN §3.5 for one axis, with the official code's
    arithmetic (``cal_rel_pos_spatial``/``_temporal``: float32 products and sum on the CPU, then
    ``.long()``). For the integer ratios of every MViTv2 recipe (56/7, 28/7, 14/7, 88/11, …) that
    is exactly ``floor(i·q_ratio − j·k_ratio + (K−1)·k_ratio)``; for other ratios (another input
    size: e.g. Q 78 against K 10 at 312 px) float32 rounding moves some indices by one, as in the
    official code, whose checkpoints were trained with them (a float64 floor missed 103 of 780
    there). Non-increasing in j and within [0, 2·max(Q, K) − 1) (rel_triton relies on both).

    Cached per (Q, K, device) — read-only — and built outside inference mode so that autograd
    may save it when a table is gathered with it."""
    q_ratio = max(k_len / q_len, 1.0)
    k_ratio = max(q_len / k_len, 1.0)
    with torch.inference_mode(False):
        dist = (
            torch.arange(q_len, dtype=torch.float32)[:, None] * q_ratio
            - torch.arange(k_len, dtype=torch.float32)[None, :] * k_ratio
        )
        dist += (k_len - 1) * k_ratio
        return dist.long().to(device)


@tensor_cache(maxsize=256)
def key_onehot(k_thw: tuple, has_t: bool, has_cls: bool, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(Nk, width) key side of the augmented operands of DESIGN §3.5, cached per geometry.

    Per key, the one-hot of its t (only when ``has_t``), h and w coordinate, then zeros up to
    ``width``; the cls key row is all zeros (no bias). Keys are ordered t-major, then h, then w,
    as the tokens are. Read-only; built outside inference mode."""
    Tk, Hk, Wk = k_thw
    with torch.inference_mode(False):
        t, h, w = torch.meshgrid(*(torch.arange(n) for n in k_thw), indexing="ij")
        parts = [F.one_hot(h.reshape(-1), Hk), F.one_hot(w.reshape(-1), Wk)]  # (Nk', Hk), (Nk', Wk)
        if has_t:
            parts.insert(0, F.one_hot(t.reshape(-1), Tk))  # (Nk', Tk)
        onehot = torch.cat(parts, dim=-1).to(dtype)  # (Nk', E)
        if width < onehot.shape[1]:
            raise ValueError(f"key one-hot width {width} < {onehot.shape[1]} coordinates")
        onehot = F.pad(onehot, (0, width - onehot.shape[1], 1 if has_cls else 0, 0))  # (Nk, width)
        return onehot.to(device)


def rel_table_len(q_len: int, k_len: int) -> int:
    """Length a relative-position table must have for this axis: 2·max(Q, K) − 1."""
    return 2 * max(q_len, k_len) - 1


def rel_width(k_thw: Sequence[int], has_t: bool) -> int:
    """Width E of the factored bias terms R = [rel_t, rel_h, rel_w]: (Tk with a temporal table) + Hk + Wk."""
    return (k_thw[0] if has_t else 0) + k_thw[1] + k_thw[2]


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    has_cls: bool,
) -> None:
    """Raise a ValueError naming the first inconsistency between tensors, grids and tables."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, nh, N, hd); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (len(q_thw) != 3 or len(k_thw) != 3
            or not all(type(n) is int or isinstance(n, numbers.Integral) and not isinstance(n, bool)
                       for n in (*q_thw, *k_thw))):
        raise ValueError(f"q_thw and k_thw must be (T, H, W) of ints; got {tuple(q_thw)} and {tuple(k_thw)}")
    if min(q_thw) < 1 or min(k_thw) < 1:
        raise ValueError(f"grid sizes must be positive; got q_thw={tuple(q_thw)}, k_thw={tuple(k_thw)}")
    B, nh, Nq, hd = q.shape
    if (k.shape[:2] != (B, nh) or v.shape[:2] != (B, nh) or k.shape[-1] != hd or v.shape[-1] != hd
            or k.shape[2] != v.shape[2]):
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "q, k, v must be (B, nh, N, hd) with one B, nh and hd, and k, v one N")
    extra = 1 if has_cls else 0
    if Nq != math.prod(q_thw) + extra:
        raise ValueError(f"q has {Nq} tokens but q_thw={tuple(q_thw)} (+{extra} cls) gives {math.prod(q_thw) + extra}")
    if k.shape[2] != math.prod(k_thw) + extra:
        raise ValueError(f"k has {k.shape[2]} tokens but k_thw={tuple(k_thw)} (+{extra} cls) gives {math.prod(k_thw) + extra}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")
    dev = q.get_device()  # a CUDA index is cheaper to compare than torch.device objects, per call;
    # -1 (CPU, meta, ...) is compared in full
    if k.get_device() != dev or v.get_device() != dev or dev < 0 and not (k.device == v.device == q.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    for name, table, axis in (("rel_pos_t", rel_pos_t, 0), ("rel_pos_h", rel_pos_h, 1), ("rel_pos_w", rel_pos_w, 2)):
        if table is None:
            if axis == 0 and q_thw[0] == 1 and k_thw[0] == 1:
                continue
            raise ValueError(f"{name} is required for q_thw={tuple(q_thw)}, k_thw={tuple(k_thw)}")
        want = rel_table_len(q_thw[axis], k_thw[axis])
        if not table.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor; got {table.dtype}")
        if table.get_device() != dev or dev < 0 and table.device != q.device:
            raise ValueError(f"{name} is on {table.device} but q is on {q.device}")
        if table.dim() != 2 or table.shape != (want, hd):
            raise ValueError(
                f"{name} must be ({want}, {hd}) for Q={q_thw[axis]}, K={k_thw[axis]}; got {tuple(table.shape)} "
                "(interpolate tables to the grid first: models.mvit.resize_rel_pos)"
            )


def rel_terms(
    q: torch.Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    has_cls: bool,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The factored bias terms of DESIGN §3.5 for the non-cls queries.

    Returns ``rel_t`` (B, nh, Nq', Tk) (None without a temporal table), ``rel_h`` (B, nh, Nq', Hk)
    and ``rel_w`` (B, nh, Nq', Wk) with Nq' = Tq·Hq·Wq, so that
    ``bias[i, j] = rel_t[i, t(j)] + rel_h[i, h(j)] + rel_w[i, w(j)]``.
    """
    B, nh, _, hd = q.shape
    Tq, Hq, Wq = q_thw
    Tk, Hk, Wk = k_thw
    r_q = q[:, :, 1:] if has_cls else q
    r_q = r_q.reshape(B, nh, Tq, Hq, Wq, hd)  # (B, nh, Tq, Hq, Wq, hd)
    Rh = rel_pos_h[rel_pos_index(Hq, Hk, q.device)]  # (Hq, Hk, hd)
    Rw = rel_pos_w[rel_pos_index(Wq, Wk, q.device)]  # (Wq, Wk, hd)
    Nq = Tq * Hq * Wq  # explicit (not -1): an empty batch has no size to infer
    rel_h = torch.einsum("bnthwc,hkc->bnthwk", r_q, Rh).reshape(B, nh, Nq, Hk)
    rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, Rw).reshape(B, nh, Nq, Wk)
    rel_t = None
    if rel_pos_t is not None:
        Rt = rel_pos_t[rel_pos_index(Tq, Tk, q.device)]  # (Tq, Tk, hd)
        rel_t = torch.einsum("bnthwc,tkc->bnthwk", r_q, Rt).reshape(B, nh, Nq, Tk)
    return rel_t, rel_h, rel_w


def rel_matrix(
    q: torch.Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    has_cls: bool,
) -> torch.Tensor:
    """Query side of the augmented operands: R = [rel_t, rel_h, rel_w] (B, nh, Nq', E), E =
    (Tk with a temporal table) + Hk + Wk, with the tables cast to q's dtype first (fp32 master
    tables under bf16/fp16 activations), as the reference computes in mixed precision."""
    tables = [t.to(q.dtype) if t is not None else None for t in (rel_pos_t, rel_pos_h, rel_pos_w)]
    terms = rel_terms(q, q_thw, k_thw, *tables, has_cls)
    return torch.cat([t for t in terms if t is not None], dim=-1)


REL_IMPLS = ("auto", "reference", "triton")  # implementations of rel_matrix (the fast backends' rel_impl=)


def rel_matrix_impl(impl: str, device: torch.device):
    """``rel_matrix`` (``"reference"``, PyTorch einsums) or its fused Triton version
    (``"triton"``, :mod:`kernels.attention.rel_triton`; same signature and semantics). ``"auto"``:
    the Triton version on an sm_90 GPU (:func:`kernels.tuned_for`; measured faster on an H100: bf16 fwd+bwd at the MViTv2-L stages,
    SDPA-cuDNN 11.9 -> 6.8 ms at stage 1, bench/results/attention_nvidia-h100-80gb-hbm3_20261127.md),
    the einsums elsewhere (on CPU Triton runs only in the interpreter)."""
    if resolve_rel_impl(impl, device) == "reference":
        return rel_matrix
    from .rel_triton import rel_matrix_triton

    return rel_matrix_triton


def resolve_rel_impl(impl: str, device: torch.device) -> str:
    """The implementation ``rel_impl=impl`` runs on ``device``: ``"reference"`` or ``"triton"``."""
    if impl not in REL_IMPLS:
        raise ValueError(f"rel_impl must be one of {REL_IMPLS}, got {impl!r}")
    if impl == "auto":  # the fused kernel where it was timed (kernels.tuned_for), else the einsums
        return "triton" if tuned_for(device) else "reference"
    return impl


def relpos_attention_reference(
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
    upcast: bool = False,
) -> torch.Tensor:
    """Materialised ``softmax(scale·q·kᵀ + bias) @ v`` exactly as the official code computes it.

    q (B, nh, Nq, hd), k/v (B, nh, Nk, hd); returns (B, nh, Nq, hd) in q's dtype. ``upcast``
    computes in float64 (the oracle) and casts back. Differentiable in q, k, v and the tables.
    """
    check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        rel_pos_h, rel_pos_w = rel_pos_h.double(), rel_pos_w.double()
        rel_pos_t = rel_pos_t.double() if rel_pos_t is not None else None
    else:
        # tables may be fp32 master weights while q is bf16 (mixed precision): compute in q's dtype
        rel_pos_h, rel_pos_w = rel_pos_h.to(q.dtype), rel_pos_w.to(q.dtype)
        rel_pos_t = rel_pos_t.to(q.dtype) if rel_pos_t is not None else None
    B, nh, Nq, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    Tk, Hk, Wk = k_thw
    s = 1 if has_cls else 0

    attn = (q * scale) @ k.transpose(-2, -1)  # (B, nh, Nq, Nk)
    rel_t, rel_h, rel_w = rel_terms(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    bias = rel_h[..., None, :, None] + rel_w[..., None, None, :]  # (B, nh, Nq', 1, Hk, Wk)
    if rel_t is not None:
        bias = bias + rel_t[..., :, None, None]  # (B, nh, Nq', Tk, Hk, Wk)
    bias = bias.expand(B, nh, Nq - s, Tk, Hk, Wk).reshape(B, nh, Nq - s, Tk * Hk * Wk)
    attn_sp = attn[:, :, s:, s:] + bias
    if has_cls:
        attn = torch.cat([attn[:, :, :1], torch.cat([attn[:, :, 1:, :1], attn_sp], dim=-1)], dim=2)
    else:
        attn = attn_sp
    attn = attn.softmax(dim=-1)
    return (attn @ v).to(out_dtype)
