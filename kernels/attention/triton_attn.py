"""Fused Triton attention for MViTv2 pooling attention with decomposed relative positions.

Semantics: DESIGN §3.5 and ``reference.py`` (the official SlowFast ``MultiScaleAttention``):

    logits[i, j] = scale·q_i·k_j + rel_t[i, t(j)] + rel_h[i, h(j)] + rel_w[i, w(j)]

for non-cls query i and key j (cls row and column: no bias), ``out = softmax(logits) @ v``.

Design (layered: kernels → launchers → ``autograd.Function`` → public function)
---------------------------------------------------------------------------------
* The three small factored terms ``rel_t/rel_h/rel_w`` (B, nh, Nq', Tk/Hk/Wk) are computed by
  torch in q's dtype by ``reference.rel_matrix`` (the reference's own einsums, cached distance
  indices), and concatenated into ``R`` (B, nh, Nq', KR), KR = Tk + Hk + Wk (Tk dropped without
  a temporal table). Autograd through these small einsums gives the table gradients and the
  rel-path part of dq from ``dR``.
* The kernels work on *augmented rows of width BA = next_pow2(hd + KR)*:
  ``q''_i = [c·q_i, log2(e)·R_i]`` (c = scale·log2 e; zeros on the cls row) is assembled in
  registers from two masked loads, and ``k'_j = [k_j, onehot_t(j), onehot_h(j), onehot_w(j)]``
  (zeros for cls; the one-hot block is cached per geometry) is built by torch (Nk is small: 393
  in MViTv2). One dot ``q''·k'ᵀ`` gives the log2-domain logits *with the bias included*. For
  MViTv2's hd = 72 and KR = 8 + 7 + 7 = 22 (hd 96 for S: 118) the extra columns live in the
  padding that a power-of-two block needs anyway (72 → 128), so the bias costs no extra
  tensor-core work, and no (Nq, Nk) tensor ever exists.
* Forward (``_fwd_kernel``): one program per (query tile, batch·head), online softmax over all
  key tiles (FlashAttention-2 style, exp2, fp32 statistics and accumulator). Saves ``out`` and
  the log2-domain log-sum-exp ``lse2`` (B, nh, Nq) only.
* Backward: ``delta = rowsum(dO·O)`` (``_delta_kernel``); ``_dq_kernel`` per query tile loops
  over key tiles and accumulates ``A = dS @ k'`` (BM, BA): its first hd columns are ``dq/scale``
  and the next KR columns are exactly ``dR[i, c] = Σ_j dS[i, j]·onehot_c(j)`` — the rel
  gradients fall out of the same matmul, without atomics. ``_dkdv_kernel`` per (key tile,
  query chunk, batch·head) accumulates dk, dv over the query tiles of its chunk and writes fp32
  partials; torch sums them over chunks in a fixed order. Chunking the query axis keeps the GPU
  busy when Nk is small and Nq large (MViTv2: Nk 393, Nq up to 25089). Its q'' rows are packed
  once by ``_pack_q_kernel`` into a transient (B, nh, Nq, BA) buffer so that the loop's loads
  feed the dots directly (software-pipelined) when ``dkdv_packed_q=True``; the default builds
  them in registers per tile (no buffer), the variant validated on an H100. Every reduction has a fixed order: backward is bitwise
  deterministic.
* Dot operands are loaded in the input dtype and fed to ``tl.dot`` unchanged (an fp32 round
  trip after the load defeated the pipelining: 2× slower backward on an H100); everything
  elementwise is fp32. bf16 is therefore *not* checkable in the interpreter (DESIGN §4): bf16 is
  tested on the GPU only. fp32 inputs use ``input_precision="ieee"``. Plain pointer arithmetic
  (no block pointers), no autotune, no libdevice; loop trip counts are constexpr (``N_KT``,
  ``TILES_PER_CHUNK``) because the triton 3.6 interpreter cannot loop to a runtime bound with
  numpy ≥ 2.4. Runs under ``TRITON_INTERPRET=1`` and on triton 3.6 – 3.9.

Configs (fixed table, :class:`RelPosAttnConfig`, :func:`_configs`): bf16/fp16 with BA ≤ 128:
forward 128×64 tiles / 8 warps / 2 stages; dq 64×64 / 4 warps; dk/dv 64×64 / 8 warps, query
chunks sized for ``dkdv_programs_per_sm`` programs per SM. fp32 or BA = 256: smaller tiles.
The interpreter uses 32×32 tiles. dk/dv runs 8 warps because its two (64, 128) fp32
accumulators do not fit 4 warps' registers: compiled offline (``python -m bench.sass``), the 4-warp
kernel spills 72 bytes per thread on sm_90 and 384 on sm_80 inside the query loop, the 8-warp one
none; the earlier GPU measurement below was of the 4-warp kernel (bench provider ``triton-w4``).

Measured (bench/results/attention_nvidia-h100-80gb-hbm3_20261127.md: one H100, torch 2.11,
triton 3.6, bf16, B = 32, hd 72, Nk 393, MViTv2-L stages 1-4, rel terms by PyTorch einsums):
forward + backward, unpacked dk/dv (8 warps) 20.3 / 11.1 / 7.6 / 4.8 ms, packed q'' 14.2 / 8.0 /
5.4 / 3.8 ms (now the CUDA default), the 4-warp unpacked kernel 18.3 / 10.0 / 7.0 / 4.5 ms (it
spills, yet beats the 8-warp one); reference 45.3 / 23.4 / 12.6 / 7.4, SDPA-cuDNN 11.9 / 6.7 / 4.3 /
3.2 ms. Forward alone this kernel is the fastest there: 3.39 ms at stage 1 (SDPA-cuDNN 3.70),
1.93 ms with the fused rel terms (rel_impl="triton"). The backward is where it loses to cuDNN.

Known limits: head dim ≤ 256 and hd + KR ≤ 512 (raises otherwise); hd 72 pads to 128 on the
P·V product (an hd 64 + 16 split is not done); fp32 inputs run ieee fp32 dots (exact, slow);
one compiled variant per (Nk, query-chunk length) — a handful for MViTv2's fixed stage shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels import launchable_on

from .reference import check_inputs, key_onehot, rel_matrix_impl

__all__ = ["relpos_attention_triton", "RelPosAttnConfig"]

LOG2E = 1.4426950408889634

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """fp32-accumulated a @ b; exact fp32 products when the operands are fp32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_q_aug(
    q_ptr, r_ptr, offs_m, offs_a, Nq, c_q,
    HD: tl.constexpr, KR: tl.constexpr, HAS_CLS: tl.constexpr,
):
    """(BM, BA) fp32 tile of q''_i = [c_q·q_i, log2e·R_{i−cls}] (zeros outside)."""
    row_ok = offs_m < Nq
    q = tl.load(
        q_ptr + offs_m[:, None] * HD + offs_a[None, :],
        mask=row_ok[:, None] & (offs_a[None, :] < HD), other=0.0,
    ).to(tl.float32)
    rp = offs_m - HAS_CLS  # row of R (non-cls query index)
    ra = offs_a - HD  # column of R
    r_ok = row_ok & (rp >= 0)
    r = tl.load(
        r_ptr + tl.maximum(rp, 0)[:, None] * KR + tl.maximum(ra, 0)[None, :],
        mask=r_ok[:, None] & (ra[None, :] >= 0) & (ra[None, :] < KR), other=0.0,
    ).to(tl.float32)
    return q * c_q + r * 1.4426950408889634


@triton.jit
def _fwd_kernel(
    q_ptr, r_ptr, ka_ptr, v_ptr, o_ptr, lse_ptr,
    Nq, Nk, c_q,
    HD: tl.constexpr, KR: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr,
    HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_KT: tl.constexpr,
):
    # q (BH, Nq, HD), R (BH, Nq', KR), k' (BH, Nk, BA), v (BH, Nk, HD), o (BH, Nq, HD), lse (BH, Nq)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Nq_r = Nq - HAS_CLS
    q_ptr += bh * Nq * HD
    r_ptr += bh * Nq_r * KR
    ka_ptr += bh * Nk * BA
    v_ptr += bh * Nk * HD
    o_ptr += bh * Nq * HD
    lse_ptr += bh * Nq
    dt = ka_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BA)
    offs_d = tl.arange(0, BD)
    offs_n0 = tl.arange(0, BLOCK_N)
    qa = _load_q_aug(q_ptr, r_ptr, offs_m, offs_a, Nq, c_q, HD, KR, HAS_CLS).to(dt)  # (BM, BA)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    for it in range(N_KT):
        offs_n = it * BLOCK_N + offs_n0
        n_ok = offs_n < Nk
        kaT = tl.load(ka_ptr + offs_n[None, :] * BA + offs_a[:, None], mask=n_ok[None, :], other=0.0)  # (BA, BN)
        s = _mm(qa, kaT, IEEE)  # (BM, BN), log2 domain, bias included
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + offs_n[:, None] * HD + offs_d[None, :],
            mask=n_ok[:, None] & (offs_d[None, :] < HD), other=0.0,
        )  # (BN, BD)
        acc = acc * alpha[:, None] + _mm(p.to(dt), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    m_ok = offs_m < Nq
    tl.store(o_ptr + offs_m[:, None] * HD + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < HD))
    tl.store(lse_ptr + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, n_rows, HD: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta[r] = Σ_d o[r, d]·do[r, d] over all (BH·Nq) rows
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BD)
    mask = (offs_m[:, None] < n_rows) & (offs_d[None, :] < HD)
    o = tl.load(o_ptr + offs_m[:, None] * HD + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs_m[:, None] * HD + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_m, tl.sum(o * do, 1), mask=offs_m < n_rows)


@triton.jit
def _pack_q_kernel(
    q_ptr, r_ptr, qa_ptr, Nq, c_q,
    HD: tl.constexpr, KR: tl.constexpr, BA: tl.constexpr, HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # q'' (BH, Nq, BA) = [c_q·q, log2e·R, 0…] in q's dtype, for the dk/dv kernel's pipelined loads
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BA)
    qa = _load_q_aug(q_ptr + bh * Nq * HD, r_ptr + bh * (Nq - HAS_CLS) * KR, offs_m, offs_a, Nq, c_q,
                     HD, KR, HAS_CLS)
    tl.store(qa_ptr + bh * Nq * BA + offs_m[:, None] * BA + offs_a[None, :], qa.to(qa_ptr.dtype.element_ty),
             mask=(offs_m < Nq)[:, None])


@triton.jit
def _dq_kernel(
    q_ptr, r_ptr, ka_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dr_ptr,
    Nq, Nk, c_q, scale,
    HD: tl.constexpr, KR: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr,
    HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_KT: tl.constexpr,
):
    # A = dS @ k' (BM, BA): dq = scale·A[:, :HD], dR = A[:, HD:HD+KR]
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Nq_r = Nq - HAS_CLS
    q_ptr += bh * Nq * HD
    r_ptr += bh * Nq_r * KR
    ka_ptr += bh * Nk * BA
    v_ptr += bh * Nk * HD
    do_ptr += bh * Nq * HD
    lse_ptr += bh * Nq
    delta_ptr += bh * Nq
    dq_ptr += bh * Nq * HD
    dr_ptr += bh * Nq_r * KR
    dt = ka_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BA)
    offs_d = tl.arange(0, BD)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Nq
    qa = _load_q_aug(q_ptr, r_ptr, offs_m, offs_a, Nq, c_q, HD, KR, HAS_CLS).to(dt)  # (BM, BA)
    do = tl.load(do_ptr + offs_m[:, None] * HD + offs_d[None, :],
                 mask=m_ok[:, None] & (offs_d[None, :] < HD), other=0.0)  # (BM, BD)
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BA], dtype=tl.float32)
    for it in range(N_KT):
        offs_n = it * BLOCK_N + offs_n0
        n_ok = offs_n < Nk
        ka = tl.load(ka_ptr + offs_n[:, None] * BA + offs_a[None, :], mask=n_ok[:, None], other=0.0)
        # (BN, BA)
        s = _mm(qa, tl.trans(ka), IEEE)  # (BM, BN)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        vT = tl.load(v_ptr + offs_n[None, :] * HD + offs_d[:, None],
                     mask=n_ok[None, :] & (offs_d[:, None] < HD), other=0.0)  # (BD, BN)
        dp = _mm(do, vT, IEEE)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        acc += _mm(ds.to(dt), ka, IEEE)
    # dq (first HD columns, times scale)
    tl.store(dq_ptr + offs_m[:, None] * HD + offs_a[None, :], (acc * scale).to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_a[None, :] < HD))
    # dR (next KR columns), non-cls rows only
    rp = offs_m - HAS_CLS
    ra = offs_a - HD
    tl.store(dr_ptr + tl.maximum(rp, 0)[:, None] * KR + tl.maximum(ra, 0)[None, :], acc,
             mask=(m_ok & (rp >= 0))[:, None] & (ra[None, :] >= 0) & (ra[None, :] < KR))


@triton.jit
def _dkdv_kernel(
    q_ptr, r_ptr, ka_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    Nq, Nk, c_q, inv_log2e, n_bh,
    HD: tl.constexpr, KR: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr,
    HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_CHUNK: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr, PACKED: tl.constexpr,
):
    # partial dk, dv (chunk, BH, Nk, HD) fp32 for key tile pid_n over the query tiles of one chunk;
    # DO_DK / DO_DV select the outputs (two launches halve the accumulator registers); PACKED: q_ptr
    # is the packed q'' (BH, Nq, BA) of _pack_q_kernel, loaded straight into the dots (pipelined)
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    Nq_r = Nq - HAS_CLS
    if PACKED:
        q_ptr += bh * Nq * BA
    else:
        q_ptr += bh * Nq * HD
    r_ptr += bh * Nq_r * KR
    ka_ptr += bh * Nk * BA
    v_ptr += bh * Nk * HD
    do_ptr += bh * Nq * HD
    lse_ptr += bh * Nq
    delta_ptr += bh * Nq
    out_off = (chunk.to(tl.int64) * n_bh + bh) * Nk * HD
    dk_ptr += out_off
    dv_ptr += out_off
    dt = ka_ptr.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BA)
    offs_d = tl.arange(0, BD)
    offs_m0 = tl.arange(0, BLOCK_M)
    n_ok = offs_n < Nk
    ka = tl.load(ka_ptr + offs_n[:, None] * BA + offs_a[None, :], mask=n_ok[:, None], other=0.0)
    # ka (BN, BA)
    v = tl.load(v_ptr + offs_n[:, None] * HD + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < HD), other=0.0)  # (BN, BD)

    if DO_DK:
        dk = tl.zeros([BLOCK_N, BA], dtype=tl.float32)
    if DO_DV:
        dv = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    m_begin = chunk * (TILES_PER_CHUNK * BLOCK_M)
    for it in range(TILES_PER_CHUNK):  # tiles past Nq are fully masked (p = 0)
        offs_m = m_begin + it * BLOCK_M + offs_m0
        m_ok = offs_m < Nq
        if PACKED:
            qaT = tl.load(q_ptr + offs_m[None, :] * BA + offs_a[:, None], mask=m_ok[None, :], other=0.0)  # (BA, BM)
        else:
            qaT = tl.trans(_load_q_aug(q_ptr, r_ptr, offs_m, offs_a, Nq, c_q, HD, KR, HAS_CLS).to(dt))
        do = tl.load(do_ptr + offs_m[:, None] * HD + offs_d[None, :],
                     mask=m_ok[:, None] & (offs_d[None, :] < HD), other=0.0)  # (BM, BD)
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        sT = _mm(ka, qaT, IEEE)  # (BN, BM)
        pT = tl.exp2(sT - lse[None, :])
        pT = tl.where(m_ok[None, :], pT, 0.0)
        if DO_DV:
            dv += _mm(pT.to(dt), do, IEEE)
        if DO_DK:
            dpT = _mm(v, tl.trans(do), IEEE)  # (BN, BM)
            dsT = pT * (dpT - delta[None, :])
            dk += _mm(dsT.to(dt), tl.trans(qaT), IEEE)
    if DO_DK:
        # q'' carries c_q = scale·log2e, so dk = (dSᵀ q'')[:, :HD] / log2e
        tl.store(dk_ptr + offs_n[:, None] * HD + offs_a[None, :], dk * inv_log2e,
                 mask=n_ok[:, None] & (offs_a[None, :] < HD))
    if DO_DV:
        tl.store(dv_ptr + offs_n[:, None] * HD + offs_d[None, :], dv,
                 mask=n_ok[:, None] & (offs_d[None, :] < HD))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel-written buffer (uninitialised; tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class RelPosAttnConfig:
    """Tile sizes and launch parameters of the three kernels (fixed table, no autotune)."""

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 2
    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    dkdv_block_m: int = 64
    dkdv_block_n: int = 64
    dkdv_warps: int = 8  # 4 spills (module docstring)
    dkdv_stages: int = 2
    dkdv_chunks: Optional[int] = None  # query chunks of the dk/dv kernel; None: fill the GPU
    dkdv_split: bool = False  # dk and dv in two launches (fewer registers, 5 instead of 4 dots)
    # pack q'' once (transient (B, nh, Nq, BA) buffer) for pipelined loads: on in the CUDA bf16/fp16
    # table (_configs, measured faster); off here, so the interpreter tests cover both paths
    dkdv_packed_q: bool = False
    dkdv_programs_per_sm: int = 32  # query chunks: aim for this many dk/dv programs per SM


def _configs(ba: int, dtype: torch.dtype, device: torch.device) -> RelPosAttnConfig:
    """Fixed config table by augmented width BA and dtype; small tiles in the interpreter."""
    if device.type != "cuda":
        return RelPosAttnConfig(32, 32, 4, 1, 32, 32, 4, 1, 32, 32, 4, 1)
    if dtype == torch.float32 or ba > 128:
        # fp32 operands or 256-wide rows: halve the tiles to stay within registers / shared memory
        return RelPosAttnConfig(64, 32, 4, 2, 32, 32, 4, 2, 32, 32, 4, 2)
    return RelPosAttnConfig(dkdv_packed_q=True)  # 1.3-1.4x the unpacked fwd+bwd on an H100 (module docstring)


def _k_aug(k: torch.Tensor, k_thw: tuple, kt: int, ba: int, has_cls: bool) -> torch.Tensor:
    """k' = [k, onehot_t(j), onehot_h(j), onehot_w(j), 0…] (B, nh, Nk, BA) in k's dtype."""
    B, nh, Nk, hd = k.shape
    onehot = key_onehot(tuple(k_thw), kt > 0, has_cls, ba - hd, k.dtype, k.device)  # (Nk, BA − hd)
    return torch.cat([k, onehot.expand(B, nh, Nk, ba - hd)], dim=-1)


def _next_pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _check_device(q: torch.Tensor) -> None:
    if launchable_on(q.device):
        return
    raise RuntimeError(
        f"relpos_attention_triton needs a CUDA tensor (got {q.device}); on CPU set TRITON_INTERPRET=1 "
        "before importing the kernels (tests do) or use backend='sdpa'"
    )


def _fwd(q, r, ka, v, hd, kr, has_cls, scale, cfg):
    """q (B, nh, Nq, hd), R (B, nh, Nq', KR), k' (B, nh, Nk, BA), v → out (B, nh, Nq, hd), lse2 (B, nh, Nq)."""
    B, nh, Nq, _ = q.shape
    Nk, ba = ka.shape[2], ka.shape[3]
    o = _empty(*q.shape, dtype=q.dtype, device=q.device)
    lse = _empty(B, nh, Nq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Nq, cfg.fwd_block_m), B * nh)
    _fwd_kernel[grid](
        q, r, ka, v, o, lse, Nq, Nk, scale * LOG2E,
        HD=hd, KR=kr, BA=ba, BD=_next_pow2(hd), HAS_CLS=int(has_cls), IEEE=q.dtype == torch.float32,
        BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, N_KT=triton.cdiv(Nk, cfg.fwd_block_n), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse


def _dkdv_chunks(cfg: RelPosAttnConfig, q: torch.Tensor, n_q_tiles: int, n_kv_programs: int) -> int:
    if cfg.dkdv_chunks is not None:
        return max(1, min(cfg.dkdv_chunks, n_q_tiles))
    if q.device.type != "cuda":
        return 1
    target = cfg.dkdv_programs_per_sm * torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(n_q_tiles, triton.cdiv(target, n_kv_programs)))


def _bwd_delta(o: torch.Tensor, do: torch.Tensor, hd: int) -> torch.Tensor:
    """delta = rowsum(dO·O) (B, nh, Nq) fp32."""
    B, nh, Nq, _ = o.shape
    delta = _empty(B, nh, Nq, dtype=torch.float32, device=o.device)
    _delta_kernel[(triton.cdiv(B * nh * Nq, 64),)](o, do, delta, B * nh * Nq, HD=hd, BD=_next_pow2(hd), BLOCK_M=64)
    return delta


def _bwd_dq(q, r, ka, v, do, lse, delta, hd, kr, has_cls, scale, cfg):
    """dq (B, nh, Nq, hd) and dR (B, nh, Nq', KR) in the input dtypes."""
    B, nh, Nq, _ = q.shape
    Nk, ba = ka.shape[2], ka.shape[3]
    dq = _empty(*q.shape, dtype=q.dtype, device=q.device)
    dr = _empty(*r.shape, dtype=r.dtype, device=r.device)
    grid = (triton.cdiv(Nq, cfg.dq_block_m), B * nh)
    _dq_kernel[grid](
        q, r, ka, v, do, lse, delta, dq, dr, Nq, Nk, scale * LOG2E, scale,
        HD=hd, KR=kr, BA=ba, BD=_next_pow2(hd), HAS_CLS=int(has_cls), IEEE=q.dtype == torch.float32,
        BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, N_KT=triton.cdiv(Nk, cfg.dq_block_n), num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, dr


def _bwd_dkdv(q, r, ka, v, do, lse, delta, hd, kr, has_cls, scale, cfg):
    """dk, dv (B, nh, Nk, hd) in the input dtype: fp32 partials per query chunk, summed in a fixed order."""
    B, nh, Nq, _ = q.shape
    Nk, ba = ka.shape[2], ka.shape[3]
    hc = int(has_cls)
    n_q_tiles = triton.cdiv(Nq, cfg.dkdv_block_m)
    n_k_tiles = triton.cdiv(Nk, cfg.dkdv_block_n)
    chunks = _dkdv_chunks(cfg, q, n_q_tiles, n_k_tiles * B * nh)
    tiles_per_chunk = triton.cdiv(n_q_tiles, chunks)
    if tiles_per_chunk > 4:  # round to a multiple of 4: fewer compiled variants, ≤ 3 masked tiles
        tiles_per_chunk = 4 * triton.cdiv(tiles_per_chunk, 4)
    chunks = triton.cdiv(n_q_tiles, tiles_per_chunk)
    dk_part = _empty(chunks, B, nh, Nk, hd, dtype=torch.float32, device=q.device)
    dv_part = _empty(chunks, B, nh, Nk, hd, dtype=torch.float32, device=q.device)
    grid = (n_k_tiles, chunks, B * nh)
    q_in = q
    if cfg.dkdv_packed_q:
        q_in = _empty(B, nh, Nq, ba, dtype=q.dtype, device=q.device)
        _pack_q_kernel[(triton.cdiv(Nq, 64), B * nh)](q, r, q_in, Nq, scale * LOG2E, HD=hd, KR=kr, BA=ba,
                                                      HAS_CLS=hc, BLOCK_M=64)
    for do_dk, do_dv in ((True, False), (False, True)) if cfg.dkdv_split else ((True, True),):
        _dkdv_kernel[grid](
            q_in, r, ka, v, do, lse, delta, dk_part, dv_part, Nq, Nk, scale * LOG2E, 1.0 / LOG2E, B * nh,
            HD=hd, KR=kr, BA=ba, BD=_next_pow2(hd), HAS_CLS=hc, IEEE=q.dtype == torch.float32,
            BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n, TILES_PER_CHUNK=tiles_per_chunk,
            DO_DK=do_dk, DO_DV=do_dv, PACKED=cfg.dkdv_packed_q, num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
        )
    # fixed-order reduction over query chunks: deterministic
    dk = (dk_part[0] if chunks == 1 else dk_part.sum(0)).to(q.dtype)
    dv = (dv_part[0] if chunks == 1 else dv_part.sum(0)).to(q.dtype)
    return dk, dv


def _bwd(do, q, r, ka, v, o, lse, hd, kr, has_cls, scale, cfg):
    """Gradients dq (B, nh, Nq, hd), dk, dv (B, nh, Nk, hd) and dR (B, nh, Nq', KR) in the input dtypes."""
    do = do.to(q.dtype).contiguous()
    delta = _bwd_delta(o, do, hd)
    dq, dr = _bwd_dq(q, r, ka, v, do, lse, delta, hd, kr, has_cls, scale, cfg)
    dk, dv = _bwd_dkdv(q, r, ka, v, do, lse, delta, hd, kr, has_cls, scale, cfg)
    return dq, dk, dv, dr


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class _RelPosAttnFn(torch.autograd.Function):
    """out = attention(q, k, v, R) where R = [rel_t, rel_h, rel_w] (B, nh, Nq', KR)."""

    @staticmethod
    def forward(ctx, q, k, v, r, k_thw, kt, has_cls, scale, cfg):
        B, nh, Nq, hd = q.shape
        kr = r.shape[-1]
        ba = _next_pow2(hd + kr)
        q, v, r = q.contiguous(), v.contiguous(), r.contiguous()
        ka = _k_aug(k, k_thw, kt, ba, has_cls)  # (B, nh, Nk, BA)
        o, lse = _fwd(q, r, ka, v, hd, kr, has_cls, scale, cfg)
        ctx.save_for_backward(q, r, ka, v, o, lse)
        ctx.meta = (hd, kr, has_cls, scale, cfg)
        return o

    @staticmethod
    def backward(ctx, do):
        q, r, ka, v, o, lse = ctx.saved_tensors
        hd, kr, has_cls, scale, cfg = ctx.meta
        dq, dk, dv, dr = _bwd(do, q, r, ka, v, o, lse, hd, kr, has_cls, scale, cfg)
        return dq, dk, dv, dr, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def relpos_attention_triton(
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
    config: Optional[RelPosAttnConfig] = None,
    rel_impl: str = "auto",
) -> torch.Tensor:
    """Fused ``softmax(scale·q·kᵀ + decomposed rel-pos bias) @ v`` (DESIGN §3.5).

    q (B, nh, Nq, hd), k and v (B, nh, Nk, hd) in fp16/bf16/fp32, cls at index 0 when
    ``has_cls``; grids (T, H, W) of the non-cls tokens; tables ``(2·max(Q, K) − 1, hd)``
    (``rel_pos_t`` None when both T are 1). Returns (B, nh, Nq, hd) in q's dtype. Differentiable
    in q, k, v and the three tables; backward is deterministic. ``config`` overrides the tile
    table (tests use it to force query chunking). ``rel_impl``: how the factored bias terms R are
    computed (``reference.rel_matrix_impl``: PyTorch einsums or the fused Triton kernel).
    """
    check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    _check_device(q)
    if q.dtype not in _DOT_DTYPES:
        raise ValueError(f"relpos_attention_triton supports float16, bfloat16 and float32; got {q.dtype}")
    B, nh, Nq, hd = q.shape
    if hd > 256:
        raise ValueError(f"head dim {hd} > 256 is not supported by the Triton kernel")
    q_thw, k_thw = tuple(int(x) for x in q_thw), tuple(int(x) for x in k_thw)
    scale = hd**-0.5 if scale is None else float(scale)
    # factored bias terms (tiny): R = [rel_t, rel_h, rel_w] (B, nh, Nq', KR)
    r = rel_matrix_impl(rel_impl, q.device)(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    kt = 0 if rel_pos_t is None else k_thw[0]
    if hd + r.shape[-1] > 512:
        raise ValueError(f"head dim {hd} + rel width {r.shape[-1]} > 512 is not supported by the Triton kernel")
    cfg = config if config is not None else _configs(_next_pow2(hd + r.shape[-1]), q.dtype, q.device)
    return _RelPosAttnFn.apply(q, k, v, r, k_thw, kt, has_cls, scale, cfg)
