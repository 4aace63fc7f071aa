"""Fused Triton version of the decomposed relative-position terms ``R`` (forward and backward).

What: :func:`rel_matrix_triton` computes the query side of the augmented operands of DESIGN §3.5,
``R = [rel_t, rel_h, rel_w]`` (B, nh, Nq', E), Nq' = T·H·W non-cls queries, E = (Tk with a
temporal table) + Hk + Wk, where for a non-cls query i at (t, h, w) and a key coordinate j

    rel_t[i, j] = q_i · Rt[dist_t(t, j)],  rel_h[i, j] = q_i · Rh[dist_h(h, j)],  rel_w likewise,

with the *unscaled* query and the tables cast to q's dtype first. Semantics source and oracle:
``reference.rel_matrix`` (same signature, same result up to rounding: this module accumulates in
fp32 and rounds once); the distances are ``reference.rel_pos_index`` (passed to the kernels as
small int32 (Q, K) tables, never recomputed in-kernel).

Design (kernels → launchers → ``autograd.Function`` → public function)
------------------------------------------------------------------------
* ``_rel_fwd_kernel``: one program per (block of BLOCK_M non-cls rows, batch·head). The q block
  (BM, BD), BD = next_pow2(hd), is loaded once in q's dtype. Per axis, the block's rows use a
  contiguous *window* of table rows starting at ``start = min_i dist[pos_i, K−1]`` (dist rises
  with pos and falls with j), at most LP rows long (LP computed on the host for the geometry:
  :func:`_windows`; 128 for w, 64 for h, 16 for t at MViTv2-L stage 1). One tensor-core dot
  ``S = q @ Tab[start : start+LP]ᵀ`` (BM, LP) fp32, then ``R[i, j] = S[i, dist[pos_i, j] − start]``
  with ``tl.gather`` (warp shuffles), stored in q's dtype. Products are exact and sums fp32,
  as in the reference's own matmul.
* ``_rel_dq_kernel``: ``dq[i] = Σ_axis Σ_j dR[i, col(axis, j)]·Tab_axis[dist[pos(i), j]]`` as
  per-row table-row gathers and FMAs on CUDA cores (a one-hot-matrix-times-window tensor-core
  form was tried: building the (BM, LP) one-hot cost more than it saved), fp32 accumulator, one
  program per (block of all Nq rows, batch·head); the cls row is written as zeros (autograd adds
  this to the attention's own dq), or, with ``ACC`` (the fused attention kernel's autograd,
  :func:`rel_backward` with ``dq``), the sum is added in place to the attention's dq. Tables are
  read as fp32 copies of the q-dtype-rounded tables (same values, no conversions), and hd is split into two exact power-of-two pieces (72 = 64 + 8,
  96 = 64 + 32) so that no work lands on padding; gathers need no mask (a masked row gathers
  table row 0 times dR = 0).
* Table gradients, deterministic and without atomics, in two stages.
  ``_rel_dtab_kernel`` (stage 1): for each axis and coordinate p, the rows whose coordinate on that
  axis is p (t: H·W contiguous rows; h: T runs of W rows; w: T·H rows of stride W) are split into
  chunks of ROWS rows; one program per (axis, p, chunk, group of up to 8 batch·heads, :func:`_dtab_bh`)
  accumulates ``P[j, :] = Σ_bh Σ_rows dR[row, col(j)]·q[row, :]`` as a (KP, BD) fp32 ``tl.dot``
  over BLOCK_R-row tiles, batch·heads in order, and writes it to an fp32 partial buffer
  (groups, Q, chunks, K, hd). All three axes run in one launch with the items of one group
  adjacent, so that q and dR, read three times, come from HBM about once (L2 hits). Stage 2,
  ``_rel_dtab_finish_kernel``: one program per table row (all three tables in one launch) sums,
  in a fixed order, the partials of the (q, k) pairs whose distance is that row (a cached
  (Σ L, P_MAX) pair table, :func:`_table_pairs`), over the groups and chunks, in fp32, and
  stores the row in the table's dtype (``index_add_`` is not deterministic on CUDA; this was
  twelve torch ops - sums, casts and a float64 one-hot matmul - until the host cost of so many
  small launches was measured, ``bench/attention_host.py``).
* The tables are read rounded to q's dtype (the forward) and as fp32 copies of those values (the
  dq code); :func:`prepare_tables` writes both from one launch in the forward, and the backward
  keeps the fp32 copy.
* q may have any strides; the host tells the compiler the power of two dividing them
  (``tl.multiple_of``), without which the q rows (144 B apart at hd 72) load element by element
  (3× the table-gradient instructions, measured offline).
* The per-row work of the forward and dq kernels is in ``_rel_fwd_rows`` / ``_rel_dq_rows``, with
  their launch arguments from :func:`fwd_rows_args` / :func:`dq_rows_args`: the fused attention
  kernels call the same code on their own query tiles (``triton_attn``, ``fuse_rel_*``); the
  forward's tiles are this kernel's row blocks, with the cls row put last (same table windows).
* Every kernel writes disjoint outputs; reductions have a fixed order: forward and backward are
  bitwise deterministic. Plain pointer arithmetic, no block pointers, no autotune, no libdevice;
  every loop trip count is constexpr (DESIGN §4). Runs under ``TRITON_INTERPRET=1`` and on
  triton 3.6 – 3.9 (``tl.gather``: triton ≥ 3.2). fp32 inputs: the forward dot runs
  ``input_precision="tf32x3"`` (an exact "ieee" dot lowers to CUDA-core FMAs with ~23 KB of
  stack per thread at these shapes), the table-gradient dot "ieee".

Bytes at MViTv2-L stage 1 (B 32, nh 2, q_thw (8, 56, 56), k_thw (8, 7, 7), hd 72, bf16, E 22):
q = 32·2·25089·72·2 B = 231 MB, R = dR = 32·2·25088·22·2 B = 70.6 MB, dq 231 MB, partials
(32·2 / 8 groups)·(8·7·8 + 56·7 + 56·7)·72·4 B = 2.8 MB (22.7 MB with one batch·head per program).
Forward q + R = 0.30 GB; dq dR + dq = 0.30 GB; table stage 1 q + dR + partials = 0.30 GB from HBM
(0.9 GB through L2); stage 2 reads 2.8 MB.
At ~3 TB/s that is ~0.1 ms per kernel.

Measured offline (``bench.sass`` compile for sm_90, triton 3.6, bf16 q, fp32 tables, B = 1
captured; the issue floor scales to B = 32: warp instructions / (132 SMs · 4 schedulers ·
1.755 GHz), a lower bound, not a timing): forward 64 rows / 4 warps: 135 regs, no spill, 48 KB
shared, 2013 instructions per thread, floor 218 µs; dq 32 rows / 4 warps: 150 regs, no spill,
1319 instructions, floor 286 µs; table stage 1 (64-row tiles, 4 warps, 3 stages): 72 regs, no
spill, 64 KB shared, ~85 µs (from the loop-body size; one batch·head per program then, 8 now:
``bench/results/attention_rel_dtab_sass_sm90_20261128.md``). So forward and dq are bound by
instruction issue at ~2–3× their byte time. On an H100 at that shape (B = 32,
``bench/results/attention_tune_nvidia-h100-80gb-hbm3_20261127_2.md``): forward 0.64 ms, dq
0.72 ms (3× and 2.5× the floors above), table gradients ~0.25 ms (profile); none of the tile or
warp variants swept there was faster at both stage 1 and stage 4, so the table stays.

Known limits: hd ≤ 256; one compiled variant per grid geometry (constexpr shapes), a handful for
MViTv2's fixed stages; the forward's table window (LP) grows with the table for the axis along
which a block's rows vary (w: the whole table, 2·max(W, Wk) − 1 rows) — fine for MViTv2 (≤ 111
rows) but a (BM, LP) fp32 tile per program for very large grids. bf16 is not checkable in the
interpreter (DESIGN §4), nor are tf32x3 and the alignment hints: they run on the GPU tests only.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels import (
    cdiv, compiling_offline, empty_buffer, first_order_only, interpreting, next_pow2, require_launchable, tensor_device,
)
from kernels.launch import batch_step, launch

from .reference import check_inputs, rel_pos_index, rel_table_len

__all__ = ["rel_matrix_triton", "RelTritonConfig"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """fp32-accumulated a @ b. PREC (fp32 operands only): 1 exact ("ieee", CUDA-core FMAs),
    2 "tf32x3" (tensor cores, three tf32 products: ~fp32 accuracy); 0 for fp16/bf16 operands."""
    if PREC == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif PREC == 2:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _q_rows(bh, rows, n_heads, sq_b, sq_h, sq_n, VEC: tl.constexpr):
    """(R,) int64 element offsets of q rows ``rows`` of batch·head ``bh``. VEC: a power of two
    dividing every stride (host-checked), told to the compiler so that row loads vectorise. The
    division by the runtime head count is done in 32 bits (B·nh < 2³¹; in 64 bits it made the
    table-gradient loop body, where it runs once per trip, 24–31 instructions longer on sm_90)."""
    b = bh.to(tl.int32) // n_heads
    h = bh.to(tl.int32) - b * n_heads
    off = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64) * sq_n
    if VEC > 1:
        off = tl.multiple_of(off, VEC)
    return off


@triton.jit
def _window_start(pos, m_ok, dist_ptr, K: tl.constexpr, L: tl.constexpr):
    """Smallest table row the block's valid rows use: min_i dist[pos_i, K−1] (dist falls with j)."""
    last = tl.load(dist_ptr + pos * K + (K - 1), mask=m_ok, other=0)  # (BM,)
    return tl.min(tl.where(m_ok, last, L), 0)


@triton.jit
def _fwd_axis(
    q, pos, m_ok, offs_d, d_ok, r_row, dist_ptr, tab_ptr,
    HD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
    COL0: tl.constexpr, PREC: tl.constexpr,
):
    """Columns COL0 … COL0+K−1 of R for one axis: R[i, COL0+j] = q_i · Tab[dist[pos_i, j]].

    S = q @ Tab[start : start+LP]ᵀ (BM, LP) on tensor cores over the block's table window, then
    R[i, j] = S[i, dist[pos_i, j] − start] (``tl.gather``)."""
    offs_j = tl.arange(0, KP)
    offs_l = tl.arange(0, LP)
    valid = m_ok[:, None] & (offs_j < K)[None, :]
    idx = tl.load(dist_ptr + pos[:, None] * K + offs_j[None, :], mask=valid, other=0)  # (BM, KP)
    start = _window_start(pos, m_ok, dist_ptr, K, L)
    lrow = start + offs_l  # (LP,) table rows of the window
    tab_t = tl.load(tab_ptr + lrow[None, :] * HD + offs_d[:, None],
                    mask=d_ok[:, None] & (lrow < L)[None, :], other=0.0)  # (BD, LP)
    s = _mm(q, tab_t, PREC)  # (BM, LP) fp32
    val = tl.gather(s, tl.where(valid, idx - start, 0), 1)  # (BM, KP)
    tl.store(r_row[:, None] + (COL0 + offs_j)[None, :], val.to(r_row.dtype.element_ty), mask=valid)


@triton.jit
def _rel_fwd_rows(
    q_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, r_ptr, bh, offs_m, m_ok,
    sq_b, sq_h, sq_n, sq_d, n_heads,
    HD: tl.constexpr, BD: tl.constexpr, HQ: tl.constexpr, WQ: tl.constexpr, NQR: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, E: tl.constexpr, VEC: tl.constexpr,
    KPT: tl.constexpr, KPH: tl.constexpr, KPW: tl.constexpr,
    LT: tl.constexpr, LH: tl.constexpr, LW: tl.constexpr, LPT: tl.constexpr, LPH: tl.constexpr, LPW: tl.constexpr,
    HAS_T: tl.constexpr, HAS_CLS: tl.constexpr, PREC: tl.constexpr,
):
    """Rows ``offs_m`` (non-cls indices in [0, NQR); those where ``m_ok`` is false are skipped) of R
    for batch·head ``bh``; r_ptr points at bh's (Nq', E) block. The window of table rows each
    axis's dot covers (LP*) must have been sized for how ``offs_m`` is blocked (:func:`_windows`)."""
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < HD
    q_off = _q_rows(bh, offs_m + HAS_CLS, n_heads, sq_b, sq_h, sq_n, VEC)  # (BM,)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD), q's dtype
    t = offs_m // (HQ * WQ)
    h = (offs_m // WQ) % HQ
    w = offs_m % WQ
    r_row = r_ptr + offs_m * E  # (BM,) row pointers
    if HAS_T:
        _fwd_axis(q, t, m_ok, offs_d, d_ok, r_row, dt_ptr, tt_ptr, HD, KT, KPT, LT, LPT, 0, PREC)
    _fwd_axis(q, h, m_ok, offs_d, d_ok, r_row, dh_ptr, th_ptr, HD, KH, KPH, LH, LPH, KT, PREC)
    _fwd_axis(q, w, m_ok, offs_d, d_ok, r_row, dw_ptr, tw_ptr, HD, KW, KPW, LW, LPW, KT + KH, PREC)


@triton.jit
def _rel_fwd_kernel(
    q_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, r_ptr,
    sq_b, sq_h, sq_n, sq_d, n_heads,
    HD: tl.constexpr, BD: tl.constexpr, HQ: tl.constexpr, WQ: tl.constexpr, NQR: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, E: tl.constexpr, VEC: tl.constexpr,
    KPT: tl.constexpr, KPH: tl.constexpr, KPW: tl.constexpr,
    LT: tl.constexpr, LH: tl.constexpr, LW: tl.constexpr, LPT: tl.constexpr, LPH: tl.constexpr, LPW: tl.constexpr,
    HAS_T: tl.constexpr, HAS_CLS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # q (B, nh, Nq, hd) strided, tables (L, hd) in q's dtype, dist (Q, K) int32, R (B·nh, Nq', E)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # non-cls row index
    _rel_fwd_rows(
        q_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, r_ptr + bh * NQR * E, bh,
        offs_m, offs_m < NQR, sq_b, sq_h, sq_n, sq_d, n_heads,
        HD, BD, HQ, WQ, NQR, KT, KH, KW, E, VEC, KPT, KPH, KPW, LT, LH, LW, LPT, LPH, LPW, HAS_T, HAS_CLS, PREC,
    )


@triton.jit
def _dq_axis(
    acc1, acc2, pos, m_ok, offs_d1, offs_d2, dr_row, dist_ptr, tab_ptr,
    HD: tl.constexpr, D1: tl.constexpr, REM: tl.constexpr, D2: tl.constexpr,
    K: tl.constexpr, COL0: tl.constexpr,
):
    """acc (BM, hd) += Σ_j dR[i, COL0+j] · Tab[dist[pos_i, j]] for one axis (fp32 tables), with the
    head dim in two exact pieces: acc1 columns [0, D1), acc2 columns [D1, D1+REM) (REM ≤ D2)."""
    for j in tl.static_range(K):
        idx = tl.load(dist_ptr + pos * K + j, mask=m_ok, other=0)  # (BM,) valid table row even if masked
        g = tl.load(dr_row + (COL0 + j), mask=m_ok, other=0.0).to(tl.float32)  # (BM,), 0 when masked
        row = tab_ptr + idx * HD  # (BM,) table row pointers
        acc1 += g[:, None] * tl.load(row[:, None] + offs_d1[None, :])  # (BM, D1)
        if REM == D2:
            acc2 += g[:, None] * tl.load(row[:, None] + D1 + offs_d2[None, :])  # (BM, D2)
        elif REM > 0:
            acc2 += g[:, None] * tl.load(row[:, None] + D1 + offs_d2[None, :],
                                         mask=(offs_d2 < REM)[None, :], other=0.0)
    return acc1, acc2


@triton.jit
def _rel_dq_rows(
    dr_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, dq_ptr, offs_n,
    HD: tl.constexpr, D1: tl.constexpr, REM: tl.constexpr, D2: tl.constexpr,
    HQ: tl.constexpr, WQ: tl.constexpr, NQR: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, E: tl.constexpr,
    HAS_T: tl.constexpr, HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    """q's rel-path gradient of the BLOCK_M rows ``offs_n`` (rows of q, cls included) of one batch·head:
    dR (Nq', E) at dr_ptr, dq (Nq, hd) at dq_ptr; the cls row gets zeros (ACC: adds to dq)."""
    NQ: tl.constexpr = NQR + HAS_CLS
    offs_d1 = tl.arange(0, D1)
    offs_d2 = tl.arange(0, D2)
    n_ok = offs_n < NQ
    rp = offs_n - HAS_CLS  # non-cls row index (−1 on the cls row)
    m_ok = n_ok & (rp >= 0)
    rp = tl.maximum(rp, 0)
    t = rp // (HQ * WQ)
    h = (rp // WQ) % HQ
    w = rp % WQ
    dr_row = dr_ptr + rp * E
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    if HAS_T:
        acc1, acc2 = _dq_axis(acc1, acc2, t, m_ok, offs_d1, offs_d2, dr_row, dt_ptr, tt_ptr, HD, D1, REM, D2, KT, 0)
    acc1, acc2 = _dq_axis(acc1, acc2, h, m_ok, offs_d1, offs_d2, dr_row, dh_ptr, th_ptr, HD, D1, REM, D2, KH, KT)
    acc1, acc2 = _dq_axis(acc1, acc2, w, m_ok, offs_d1, offs_d2, dr_row, dw_ptr, tw_ptr, HD, D1, REM, D2, KW,
                          KT + KH)
    out = dq_ptr + offs_n[:, None] * HD  # (BM, 1) row pointers
    if ACC:
        acc1 += tl.load(out + offs_d1[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
    tl.store(out + offs_d1[None, :], acc1.to(dq_ptr.dtype.element_ty), mask=n_ok[:, None])
    if REM > 0:
        if ACC:
            acc2 += tl.load(out + D1 + offs_d2[None, :], mask=n_ok[:, None] & (offs_d2 < REM)[None, :],
                            other=0.0).to(tl.float32)
        tl.store(out + D1 + offs_d2[None, :], acc2.to(dq_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_d2 < REM)[None, :])


@triton.jit
def _rel_dq_kernel(
    dr_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, dq_ptr,
    HD: tl.constexpr, D1: tl.constexpr, REM: tl.constexpr, D2: tl.constexpr,
    HQ: tl.constexpr, WQ: tl.constexpr, NQR: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, E: tl.constexpr,
    HAS_T: tl.constexpr, HAS_CLS: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    # dR (B·nh, Nq', E), fp32 tables (L, hd) → dq (B·nh, Nq, hd) with Nq = Nq' + cls; the cls row gets zeros.
    # ACC: add to what dq holds (the attention kernel's own dq) instead of overwriting it.
    # hd = D1 + REM: D1 the largest power of two ≤ hd, REM ≤ D2 = next_pow2(REM) (no work on padding)
    bh = tl.program_id(1).to(tl.int64)
    _rel_dq_rows(
        dr_ptr + bh * NQR * E, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, dq_ptr + bh * (NQR + HAS_CLS) * HD,
        tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M),
        HD, D1, REM, D2, HQ, WQ, NQR, KT, KH, KW, E, HAS_T, HAS_CLS, BLOCK_M, ACC,
    )


@triton.jit
def _dtab_axis(
    q_ptr, dr_ptr, p_ptr, item, grp, n_bh, n_heads, sq_b, sq_h, sq_n, sq_d,
    Q: tl.constexpr, K: tl.constexpr, INNER: tl.constexpr, CNT: tl.constexpr, CHUNKS: tl.constexpr,
    COL0: tl.constexpr, E: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, HAS_CLS: tl.constexpr, PREC: tl.constexpr, VEC: tl.constexpr,
    NQR: tl.constexpr, BH_PER: tl.constexpr,
):
    """P[grp, p, c, j, :] = Σ_{bh of group grp} Σ_{rows k of chunk c with coordinate p} dR[bh, row, COL0+j]·q[bh, row, :]
    (fp32), the group's BH_PER batch·heads (those < n_bh) in order, each over its row tiles in order.

    The rows with coordinate p on this axis, in order, are k ↦ (k // INNER)·Q·INNER + p·INNER +
    k % INNER for k < CNT (INNER = product of the grid sizes after this axis)."""
    p = item // CHUNKS
    c = item % CHUNKS
    offs_j = tl.arange(0, KP)
    offs_d = tl.arange(0, BD)
    offs_r = tl.arange(0, BLOCK_R)
    j_ok = offs_j < K
    d_ok = offs_d < HD
    NT: tl.constexpr = ROWS // BLOCK_R  # row tiles per batch·head
    acc = tl.zeros([KP, BD], dtype=tl.float32)
    for it in range(BH_PER * NT):  # one loop (pipelined across batch·heads)
        bh = grp * BH_PER + it // NT
        k = c * ROWS + (it % NT) * BLOCK_R + offs_r
        k_ok = k < tl.where(bh < n_bh, CNT, 0)  # no rows for a group's batch·heads past n_bh
        # (not `& (bh < n_bh)`: a scalar mask term is "unsupported dtype" in triton 3.9's interpreter)
        row = (k // INNER) * (Q * INNER) + p * INNER + k % INNER  # (BR,) non-cls row
        drT = tl.load(dr_ptr + bh * (NQR * E) + row[None, :] * E + (COL0 + offs_j)[:, None],
                      mask=j_ok[:, None] & k_ok[None, :], other=0.0)  # (KP, BR)
        q_off = _q_rows(bh, row + HAS_CLS, n_heads, sq_b, sq_h, sq_n, VEC)  # (BR,)
        qt = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * sq_d,
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (BR, BD)
        acc += _mm(drT, qt, PREC)
    out = p_ptr + ((grp * Q + p) * CHUNKS + c) * (K * HD)
    tl.store(out + offs_j[:, None] * HD + offs_d[None, :], acc, mask=j_ok[:, None] & d_ok[None, :])


@triton.jit
def _rel_dtab_kernel(
    q_ptr, dr_ptr, pt_ptr, ph_ptr, pw_ptr,
    sq_b, sq_h, sq_n, sq_d, n_heads, n_bh,
    HD: tl.constexpr, BD: tl.constexpr, TQ: tl.constexpr, HQ: tl.constexpr, WQ: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, E: tl.constexpr,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, N_T: tl.constexpr, N_H: tl.constexpr,
    KPT: tl.constexpr, KPH: tl.constexpr, KPW: tl.constexpr,
    HAS_T: tl.constexpr, HAS_CLS: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr, VEC: tl.constexpr, BH_PER: tl.constexpr,
):
    # items of one group of BH_PER batch·heads: [t: N_T = TQ·CT | h: N_H = HQ·CH | w: WQ·CW] (HAS_T
    # False: N_T = 0); partials P_t (G, TQ, CT, KT, hd), P_h (G, HQ, CH, KH, hd), P_w (G, WQ, CW, KW, hd)
    # fp32, G = cdiv(B·nh, BH_PER) groups
    pid = tl.program_id(0)
    grp = tl.program_id(1).to(tl.int64)
    NQR: tl.constexpr = TQ * HQ * WQ
    args = (grp, n_bh, n_heads, sq_b, sq_h, sq_n, sq_d)
    if pid < N_T:
        _dtab_axis(q_ptr, dr_ptr, pt_ptr, pid, *args,
                   TQ, KT, HQ * WQ, HQ * WQ, CT, 0, E, HD, BD, KPT, ROWS, BLOCK_R, HAS_CLS, PREC, VEC, NQR, BH_PER)
    elif pid < N_T + N_H:
        _dtab_axis(q_ptr, dr_ptr, ph_ptr, pid - N_T, *args,
                   HQ, KH, WQ, TQ * WQ, CH, KT, E, HD, BD, KPH, ROWS, BLOCK_R, HAS_CLS, PREC, VEC, NQR, BH_PER)
    else:
        _dtab_axis(q_ptr, dr_ptr, pw_ptr, pid - N_T - N_H, *args,
                   WQ, KW, 1, TQ * HQ, CW, KT + KH, E, HD, BD, KPW, ROWS, BLOCK_R, HAS_CLS, PREC, VEC, NQR, BH_PER)


@triton.jit
def _prepare_tables_kernel(
    tt_ptr, th_ptr, tw_ptr, low_ptr, f32_ptr, LT: tl.constexpr, LH: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
):
    # one table row per program, rows [t (LT; 0 without a temporal table) | h (LH) | w]: the row
    # rounded to q's dtype (low_ptr's element type) as the forward reads it, and the same values
    # in fp32 as the dq code reads them; both (Ltot, hd)
    pid = tl.program_id(0)
    offs = tl.arange(0, BD)
    ok = offs < HD
    if pid < LT:
        x = tl.load(tt_ptr + pid * HD + offs, mask=ok, other=0.0).to(tl.float32)
    elif pid < LT + LH:
        x = tl.load(th_ptr + (pid - LT) * HD + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        x = tl.load(tw_ptr + (pid - LT - LH) * HD + offs, mask=ok, other=0.0).to(tl.float32)
    low = x.to(low_ptr.dtype.element_ty)
    tl.store(low_ptr + pid * HD + offs, low, mask=ok)
    tl.store(f32_ptr + pid * HD + offs, low.to(tl.float32), mask=ok)


@triton.jit
def _dtab_finish_axis(
    p_ptr, out_ptr, pair_ptr, pid, row,
    G: tl.constexpr, Q: tl.constexpr, C: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
    P_MAX: tl.constexpr, BLOCK_GC: tl.constexpr,
):
    """Gradient row ``row`` of one table: Σ over the (q, k) pairs with dist[q, k] = row (P_MAX
    slots of ``pair_ptr`` row ``pid``, q·K + k, −1 = empty), in order, of Σ over the groups and
    chunks of the partials P (G, Q, C, K, hd), in order; fp32, stored in the table's dtype."""
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < HD
    offs_gc = tl.arange(0, BLOCK_GC)
    GC: tl.constexpr = G * C
    acc = tl.zeros([BD], dtype=tl.float32)
    for j in range(P_MAX):
        pr = tl.load(pair_ptr + pid * P_MAX + j)  # scalar
        base = ((tl.maximum(pr, 0) // K) * (C * K) + tl.maximum(pr, 0) % K) * HD
        n_gc = tl.where(pr >= 0, GC, 0)  # (a bound, not `& (pr >= 0)`: triton 3.9's interpreter rejects a scalar mask term)
        for gc0 in range(0, GC, BLOCK_GC):
            gc = gc0 + offs_gc
            off = (gc // C) * (Q * C * K * HD) + (gc % C) * (K * HD) + base  # (BLOCK_GC,)
            x = tl.load(p_ptr + off[:, None] + offs_d[None, :], mask=(gc < n_gc)[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(x, 0)
    tl.store(out_ptr + row * HD + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _rel_dtab_finish_kernel(
    pt_ptr, ph_ptr, pw_ptr, gt_ptr, gh_ptr, gw_ptr, pair_ptr,
    G: tl.constexpr, TQ: tl.constexpr, HQ: tl.constexpr, WQ: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
    LT: tl.constexpr, LH: tl.constexpr, HAS_T: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
    P_MAX: tl.constexpr, BLOCK_GT: tl.constexpr, BLOCK_GH: tl.constexpr, BLOCK_GW: tl.constexpr,
):
    # stage 2 of the table gradients: one program per table row, [t (LT; 0 without a temporal
    # table) | h (LH) | w], from _rel_dtab_kernel's partials (G, Q, C, K, hd) per axis
    pid = tl.program_id(0)
    if HAS_T:
        if pid < LT:
            _dtab_finish_axis(pt_ptr, gt_ptr, pair_ptr, pid, pid, G, TQ, CT, KT, HD, BD, P_MAX, BLOCK_GT)
    if pid >= LT:
        if pid < LT + LH:
            _dtab_finish_axis(ph_ptr, gh_ptr, pair_ptr, pid, pid - LT, G, HQ, CH, KH, HD, BD, P_MAX, BLOCK_GH)
        else:
            _dtab_finish_axis(pw_ptr, gw_ptr, pair_ptr, pid, pid - LT - LH, G, WQ, CW, KW, HD, BD, P_MAX, BLOCK_GW)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelTritonConfig:
    """Launch parameters (fixed table, no autotune; see :func:`_config`)."""

    fwd_block_m: int = 64  # non-cls rows per forward program
    fwd_warps: int = 4
    dq_block_m: int = 32  # rows per dq program
    dq_warps: int = 4
    dtab_block_r: int = 64  # rows per tl.dot tile of the table-gradient kernel
    dtab_rows: int = 512  # upper bound of rows per table-gradient program (rounded to the grid)
    dtab_warps: int = 4
    dtab_stages: int = 3  # software pipelining of the row-tile loop
    dtab_bh: int = 8  # at most this many batch·heads summed (in order) by one table-gradient program …
    dtab_min_programs: int = 1024  # … while that leaves the launch at least this many programs (_dtab_bh)


def _config(device: torch.device, dtype: torch.dtype) -> RelTritonConfig:
    """Small tiles in the interpreter (several partial tiles at test sizes); the GPU table otherwise
    (fp32: the exact table-gradient dot runs on CUDA cores, smaller tiles keep its shared memory low)."""
    return _config_table(device.type == "cuda" or compiling_offline(), dtype == torch.float32)


@functools.lru_cache(maxsize=None)
def _config_table(gpu: bool, fp32: bool) -> RelTritonConfig:
    """The table :func:`_config` picks (one frozen object per entry: building one costs µs per call)."""
    if not gpu:
        return RelTritonConfig(16, 4, 16, 4, 16, 64, 4, 1)
    if fp32:
        return RelTritonConfig(dtab_block_r=32, dtab_stages=2)
    return RelTritonConfig()


_empty = empty_buffer  # every kernel-written buffer (tests poison it with NaN)


@functools.lru_cache(maxsize=256)
def _dist_i32(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(Q, K) int32 ``rel_pos_index`` for the kernels (cached, read-only)."""
    with torch.inference_mode(False):
        return rel_pos_index(q_len, k_len, device).to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _table_pairs(g: "_Geom", device: torch.device) -> tuple:
    """(pairs, P_MAX) for the table-gradient finish: pairs (Σ L, P_MAX) int32, row l of each table
    present (t only with a temporal table, then h, w) in turn, holds the q·K + k with
    dist[q, k] = l in row-major order, then −1 (cached, read-only)."""
    rows: list[list[int]] = []
    for q_len, k_len in list(zip(g.q_thw, g.k_thw))[0 if g.has_t else 1:]:
        dist = rel_pos_index(q_len, k_len).reshape(-1).tolist()  # (Q·K,) on the CPU
        per = [[] for _ in range(2 * max(q_len, k_len) - 1)]
        for pair, l in enumerate(dist):
            per[l].append(pair)
        rows += per
    p_max = max(1, max(len(r) for r in rows))
    with torch.inference_mode(False):
        return torch.tensor([r + [-1] * (p_max - len(r)) for r in rows], dtype=torch.int32, device=device), p_max


@dataclass(frozen=True)
class _Geom:
    """Static geometry of one call (hashable: it selects the compiled variant)."""

    q_thw: tuple  # (Tq, Hq, Wq)
    k_thw: tuple  # (Tk, Hk, Wk)
    has_t: bool  # a temporal table is present
    has_cls: bool

    @property
    def kt(self) -> int:
        return self.k_thw[0] if self.has_t else 0

    @property
    def e(self) -> int:
        return self.kt + self.k_thw[1] + self.k_thw[2]

    @property
    def nqr(self) -> int:
        return math.prod(self.q_thw)

    @property
    def lens(self) -> tuple:
        """(L_t, L_h, L_w): the table lengths (``reference.rel_table_len``), L_t = 0 without a temporal table."""
        lt, lh, lw = (rel_table_len(q, k) for q, k in zip(self.q_thw, self.k_thw))
        return (lt if self.has_t else 0), lh, lw

    def constexprs(self) -> dict:
        """The grid constexprs that the forward and dq row code both take."""
        return dict(HQ=self.q_thw[1], WQ=self.q_thw[2], NQR=self.nqr, KT=self.kt, KH=self.k_thw[1],
                    KW=self.k_thw[2], E=self.e, HAS_T=self.has_t, HAS_CLS=int(self.has_cls))


def _dists(g: _Geom, device: torch.device) -> list:
    """int32 distance tables (t, h, w); t is a stand-in (the h table) without a temporal table."""
    d_h = _dist_i32(g.q_thw[1], g.k_thw[1], device)
    d_w = _dist_i32(g.q_thw[2], g.k_thw[2], device)
    d_t = _dist_i32(g.q_thw[0], g.k_thw[0], device) if g.has_t else d_h
    return [d_t, d_h, d_w]


class RelTables(NamedTuple):
    """The tables of one call as the kernels read them (:func:`prepare_tables`)."""

    orig: tuple  # (t | None, h, w) as given: the gradients take their shapes and dtypes
    low: Optional[list]  # [t, h, w] rounded to q's dtype (the reference's rounding): forward code
    f32: list  # the same values in fp32: the dq code reads them without conversions


def prepare_tables(q: torch.Tensor, tables: Sequence[Optional[torch.Tensor]], g: _Geom) -> RelTables:
    """The tables rounded to q's dtype, and in fp32, from one launch (torch casts per table were
    nine launches per forward+backward, each costing the host more than its work:
    bench/attention_host.py). The h table stands in for an absent t table (never read then)."""
    tabs = [t.contiguous() for t in tables if t is not None]
    hd = q.shape[-1]
    lt, lh, lw = g.lens
    n = lt + lh + lw
    low = _empty(n, hd, dtype=q.dtype, device=q.device)
    f32 = _empty(n, hd, dtype=torch.float32, device=q.device)
    launch(_prepare_tables_kernel, (n,), tabs[0], tabs[-2], tabs[-1], low, f32, LT=lt, LH=lh, HD=hd,
           BD=next_pow2(hd, 16), num_warps=1)

    def split(buf):
        t, h, w = buf[:lt], buf[lt:lt + lh], buf[lt + lh:]
        return [t if g.has_t else h, h, w]
    return RelTables(tuple(tables), split(low), split(f32))


@functools.lru_cache(maxsize=64)
def _windows(g: _Geom, block: int) -> tuple:
    """(LP_t, LP_h, LP_w): per axis, the most table rows one forward block can use
    (dist[pos_max, 0] − dist[pos_min, K−1] + 1 over the block), as a power of two ≥ 16. Blocks are
    ``block`` consecutive non-cls rows starting at multiples of ``block`` (also the fused
    attention forward's query tiles, which put the cls row last)."""
    Tq, Hq, Wq = g.q_thw
    rp = torch.arange(g.nqr)
    blk = rp // block
    nb = int(blk[-1]) + 1
    coords = (rp // (Hq * Wq), (rp // Wq) % Hq, rp % Wq)  # (Nq',) t, h, w of each row
    out = []
    for a in range(3):
        Q, K = g.q_thw[a], g.k_thw[a]
        dist = rel_pos_index(Q, K)  # (Q, K) on the CPU
        lo = torch.full((nb,), Q, dtype=torch.long).scatter_reduce(0, blk, coords[a], "amin")
        hi = torch.zeros(nb, dtype=torch.long).scatter_reduce(0, blk, coords[a], "amax")
        out.append(next_pow2(int((dist[hi, 0] - dist[lo, K - 1]).max()) + 1, 16))
    return tuple(out)


def _q_vec(q: torch.Tensor) -> int:
    """Largest power of two (≤ 16) dividing q's batch, head and token strides (1 if hd is strided)."""
    if q.stride(3) != 1:
        return 1
    g = math.gcd(math.gcd(q.stride(0), q.stride(1)), q.stride(2))
    return math.gcd(g, 16) if g else 16


def fwd_rows_args(q: torch.Tensor, tabs: RelTables, g: _Geom, block: int) -> tuple:
    """(tensors, constexprs) that :func:`_rel_fwd_rows` takes after q_ptr for blocks of ``block``
    non-cls rows (:func:`_windows`): the tables in q's dtype, the distance tables, and the
    geometry; also what the fused attention forward passes (``triton_attn``)."""
    consts = _fwd_rows_consts(g, block, q.shape[-1], q.dtype == torch.float32, _q_vec(q))
    return (*tabs.low, *_dists(g, q.device)), consts


@functools.lru_cache(maxsize=256)
def _fwd_rows_consts(g: _Geom, block: int, hd: int, fp32: bool, vec: int) -> dict:
    """:func:`fwd_rows_args`' constexprs, computed once per geometry (read-only: callers unpack it)."""
    lp = _windows(g, block)
    lt, lh, lw = g.lens
    return dict(
        HD=hd, BD=next_pow2(hd, 16), **g.constexprs(), VEC=vec,
        KPT=next_pow2(g.kt, 2), KPH=next_pow2(g.k_thw[1], 2), KPW=next_pow2(g.k_thw[2], 2),
        LT=lt if g.has_t else lh, LH=lh, LW=lw, LPT=lp[0], LPH=lp[1], LPW=lp[2],  # (h stands in for an absent t)
        PREC=2 if fp32 else 0,
    )


def dq_rows_args(q: torch.Tensor, tabs: RelTables, g: _Geom) -> tuple:
    """(tensors, constexprs) that :func:`_rel_dq_rows` takes after dr_ptr: fp32 copies of the
    q-dtype-rounded tables (same values, no conversions in the kernel), the distance tables, and
    the geometry, with hd split into two exact power-of-two pieces D1 + REM (REM ≤ D2)."""
    return (*tabs.f32, *_dists(g, q.device)), _dq_rows_consts(g, q.shape[-1])


@functools.lru_cache(maxsize=256)
def _dq_rows_consts(g: _Geom, hd: int) -> dict:
    """:func:`dq_rows_args`' constexprs, computed once per geometry (read-only: callers unpack it)."""
    d1 = 1 << (hd.bit_length() - 1)  # largest power of two ≤ hd
    return dict(HD=hd, D1=d1, REM=hd - d1, D2=next_pow2(hd - d1) if hd > d1 else 2, **g.constexprs())


def _fwd(q: torch.Tensor, tabs: RelTables, g: _Geom, cfg: RelTritonConfig) -> torch.Tensor:
    """q (B, nh, Nq, hd), the prepared tables → R (B, nh, Nq', E) in q's dtype."""
    B, nh, _, hd = q.shape
    r = _empty(B, nh, g.nqr, g.e, dtype=q.dtype, device=q.device)
    tensors, consts = fwd_rows_args(q, tabs, g, cfg.fwd_block_m)
    grid = (cdiv(g.nqr, cfg.fwd_block_m), B * nh)
    launch(
        _rel_fwd_kernel, grid,
        q, *tensors, r, *q.stride(), nh, **consts, BLOCK_M=cfg.fwd_block_m, num_warps=cfg.fwd_warps,
    )
    return r


def _bwd_q(
    dr: torch.Tensor, q: torch.Tensor, tabs: RelTables, g: _Geom, cfg: RelTritonConfig,
    dq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dR (B, nh, Nq', E) contiguous, the prepared tables → dq (B, nh, Nq, hd) in q's dtype, zero cls row;
    added in place to ``dq`` (contiguous, q's shape and dtype) when it is given."""
    B, nh, Nq, hd = q.shape
    acc = dq is not None
    if not acc:
        dq = _empty(B, nh, Nq, hd, dtype=q.dtype, device=q.device)
    tensors, consts = dq_rows_args(q, tabs, g)
    grid = (cdiv(Nq, cfg.dq_block_m), B * nh)
    launch(_rel_dq_kernel, grid, dr, *tensors, dq, **consts, BLOCK_M=cfg.dq_block_m, ACC=acc, num_warps=cfg.dq_warps)
    return dq


def _dtab_rows(g: _Geom, cfg: RelTritonConfig) -> int:
    """Rows per table-gradient program: the smallest per-coordinate row count, rounded up to
    BLOCK_R and capped (so that h and w coordinates take one program each at MViTv2 shapes)."""
    counts = [g.nqr // n for a, n in enumerate(g.q_thw) if a > 0 or g.has_t]
    rows = min(min(counts), cfg.dtab_rows)
    return cfg.dtab_block_r * cdiv(rows, cfg.dtab_block_r)


def _dtab_bh(cfg: RelTritonConfig, n_items: int, n_bh: int) -> int:
    """Batch·heads per table-gradient program: the largest power of two ≤ ``cfg.dtab_bh`` that
    leaves ≥ ``cfg.dtab_min_programs`` programs (``n_items`` per group). Summing several batch·heads
    in the kernel shrinks the fp32 partials — and torch's reduction of them, which took ~0.16 ms at
    MViTv2-L stage 4 on an H100 (B·nh = 512 partials per table row, ``attention_tune_…_2.md``
    profile: 3 of its 5 ``reduce_kernel`` launches) — by that factor. Depends on the shape only, not
    the GPU, so the summation order (and every bit of the result) is the same on every device."""
    per = 1
    while per * 2 <= min(cfg.dtab_bh, n_bh) and n_items * cdiv(n_bh, per * 2) >= cfg.dtab_min_programs:
        per *= 2
    return per


def _bwd_tables(
    dr: torch.Tensor, q: torch.Tensor, tables: Sequence[Optional[torch.Tensor]], g: _Geom, cfg: RelTritonConfig
) -> list:
    """dR (B, nh, Nq', E) contiguous, q → gradients of the three tables in their own dtypes."""
    B, nh, _, hd = q.shape
    plan = _dtab_plan(g, cfg, B, nh, hd, q.dtype == torch.float32, _q_vec(q))
    parts = [None if shape is None else _empty(*shape, dtype=torch.float32, device=q.device)
             for shape in plan.part_shapes]  # (groups, Q, chunks, K, hd) per axis
    launch(
        _rel_dtab_kernel, plan.grid,
        q, dr, parts[0] if g.has_t else parts[1], parts[1], parts[2], *q.stride(), nh, B * nh, **plan.consts,
    )
    pairs, p_max = _table_pairs(g, q.device)
    grads = [None if tables[a] is None else _empty(*tables[a].shape, dtype=tables[a].dtype, device=q.device)
             for a in range(3)]
    launch(
        _rel_dtab_finish_kernel, plan.finish_grid,
        parts[0] if g.has_t else parts[1], parts[1], parts[2], grads[0] if g.has_t else grads[1], grads[1], grads[2],
        pairs, P_MAX=p_max, **plan.finish_consts,
    )
    return grads


class _DtabPlan(NamedTuple):
    """What :func:`_bwd_tables` launches, minus the tensors (read-only: the dicts are unpacked)."""

    part_shapes: tuple  # per axis (groups, Q, chunks, K, hd), None for an absent temporal table
    grid: tuple
    consts: dict  # the table-gradient kernel's constexprs and launch options
    finish_grid: tuple
    finish_consts: dict  # the finish kernel's, but P_MAX


@functools.lru_cache(maxsize=256)
def _dtab_plan(g: _Geom, cfg: RelTritonConfig, B: int, nh: int, hd: int, fp32: bool, vec: int) -> _DtabPlan:
    """:func:`_bwd_tables`' launch geometry, computed once per shape (pure integer arithmetic)."""
    Tq, Hq, Wq = g.q_thw
    rows = _dtab_rows(g, cfg)
    ks = [g.kt, g.k_thw[1], g.k_thw[2]]
    counts = [g.nqr // n for n in g.q_thw]
    chunks = [cdiv(c, rows) for c in counts]
    n_items = (Tq * chunks[0] if g.has_t else 0) + Hq * chunks[1] + Wq * chunks[2]
    bh_per = _dtab_bh(cfg, n_items, B * nh)
    groups = cdiv(B * nh, bh_per)
    shapes = tuple((groups, g.q_thw[a], chunks[a], ks[a], hd) if (a > 0 or g.has_t) else None for a in range(3))
    consts = dict(
        HD=hd, BD=next_pow2(hd, 16), TQ=Tq, HQ=Hq, WQ=Wq, KT=g.kt, KH=ks[1], KW=ks[2], E=g.e,
        CT=chunks[0], CH=chunks[1], CW=chunks[2], N_T=Tq * chunks[0] if g.has_t else 0, N_H=Hq * chunks[1],
        KPT=next_pow2(g.kt, 16), KPH=next_pow2(ks[1], 16), KPW=next_pow2(ks[2], 16),
        HAS_T=g.has_t, HAS_CLS=int(g.has_cls), ROWS=rows, BLOCK_R=cfg.dtab_block_r,
        PREC=1 if fp32 else 0, VEC=vec, BH_PER=bh_per,
        num_warps=cfg.dtab_warps, num_stages=cfg.dtab_stages,
    )
    lt, lh, lw = g.lens
    block_gc = [min(32, next_pow2(groups * c)) for c in chunks]
    finish = dict(
        G=groups, TQ=Tq, HQ=Hq, WQ=Wq, KT=g.kt, KH=ks[1], KW=ks[2], CT=chunks[0], CH=chunks[1], CW=chunks[2],
        LT=lt, LH=lh, HAS_T=g.has_t, HD=hd, BD=next_pow2(hd, 16),
        BLOCK_GT=block_gc[0], BLOCK_GH=block_gc[1], BLOCK_GW=block_gc[2], num_warps=4,
    )
    return _DtabPlan(shapes, (n_items, groups), consts, (lt + lh + lw,), finish)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def rel_forward(q: torch.Tensor, tabs: RelTables, g: _Geom, cfg: RelTritonConfig) -> torch.Tensor:
    """R (B, nh, Nq', E) in q's dtype from the prepared tables, outside autograd (inputs checked by
    the caller)."""
    return _fwd(q, tabs, g, cfg)


def rel_backward(
    dr: torch.Tensor, q: torch.Tensor, tabs: RelTables, g: _Geom, cfg: RelTritonConfig,
    needs: Sequence[bool], dq: Optional[torch.Tensor] = None,
) -> tuple:
    """(dq, d_rel_pos_t, d_rel_pos_h, d_rel_pos_w) from dR; ``needs``: which of the four to compute
    (``tabs.low`` is not read: backward may keep only ``orig`` and ``f32``).
    With ``dq`` given (contiguous, q's shape and dtype), q's gradient is added to it in place."""
    dr = dr.to(q.dtype).contiguous()  # (B, nh, Nq', E)
    dq_out = _bwd_q(dr, q, tabs, g, cfg, dq) if needs[0] else dq
    d_tabs = [None, None, None]
    if any(needs[1:4]):
        d_tabs = _bwd_tables(dr, q, tabs.orig, g, cfg)
        d_tabs = [d if needs[1 + a] else None for a, d in enumerate(d_tabs)]
    return dq_out, *d_tabs


class _RelMatrixFn(torch.autograd.Function):
    """R = rel_matrix(q, tables) with fused kernels; gradients for q and the three tables."""

    @staticmethod
    def forward(ctx, q, rel_pos_t, rel_pos_h, rel_pos_w, g, cfg):
        tables = (rel_pos_t, rel_pos_h, rel_pos_w)
        tabs = prepare_tables(q, tables, g)
        r = rel_forward(q, tabs, g, cfg)
        ctx.save_for_backward(q, *tables)
        ctx.meta, ctx.f32 = (g, cfg), tabs.f32
        return r

    @staticmethod
    @first_order_only("relpos_attention (rel terms in Triton)")
    def backward(ctx, dr):
        q, *tables = ctx.saved_tensors
        g, cfg = ctx.meta
        grads = rel_backward(dr, q, RelTables(tuple(tables), None, ctx.f32), g, cfg, ctx.needs_input_grad[:4])
        return *grads, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _check(
    q: torch.Tensor,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    tables: Sequence[Optional[torch.Tensor]],
    has_cls: bool,
) -> None:
    """Raise a ValueError for bad shapes, dtypes or devices (reference.check_inputs with k/v stand-ins)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (B, nh, N, hd) tensor; got {getattr(q, 'shape', type(q))}")
    if len(q_thw) != 3 or len(k_thw) != 3:
        raise ValueError(f"q_thw and k_thw must be (T, H, W); got {tuple(q_thw)} and {tuple(k_thw)}")
    B, nh, _, hd = q.shape
    kv = q.new_empty(()).expand(B, nh, math.prod(k_thw) + int(has_cls), hd)  # no memory
    check_inputs(q, kv, kv, q_thw, k_thw, *tables, has_cls)
    if q.dtype not in _DTYPES:
        raise ValueError(f"rel_matrix_triton supports float16, bfloat16 and float32; got {q.dtype}")
    if hd > 256:
        raise ValueError(f"head dim {hd} > 256 is not supported by rel_matrix_triton")
    require_launchable(q, "rel_matrix_triton", "rel_impl='reference' (reference.rel_matrix)")
    from . import triton_attn  # (it imports this module) the one switch of the bench's stubbed launches

    if q.dtype == torch.bfloat16 and interpreting() and triton_attn.REFUSE_INTERPRETED_BF16:
        raise ValueError("rel_matrix_triton in bfloat16 runs on a GPU only: Triton's interpreter computes it wrongly "
                         "(errors of 1e10 measured); use float16/float32 on the CPU, or rel_impl='reference'")


def rel_matrix_triton(
    q: torch.Tensor,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    rel_pos_t: Optional[torch.Tensor],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    has_cls: bool,
) -> torch.Tensor:
    """Fused ``reference.rel_matrix``: R = [rel_t, rel_h, rel_w] (B, nh, Nq', E) in q's dtype.

    q (B, nh, Nq, hd) fp16/bf16/fp32 (any strides), cls at index 0 when ``has_cls``; ``q_thw``,
    ``k_thw`` the (T, H, W) grids of the non-cls tokens; tables ``(2·max(Q, K) − 1, hd)`` per axis
    in any float dtype, cast to q's dtype before use (``rel_pos_t`` None when both T are 1: then
    E = Hk + Wk, else Tk + Hk + Wk). Differentiable in q (gradient (B, nh, Nq, hd), zero cls row)
    and the tables (gradients in the tables' dtypes); backward is deterministic.
    """
    g, cfg = rel_setup(q, q_thw, k_thw, (rel_pos_t, rel_pos_h, rel_pos_w), has_cls)
    B, nh = q.shape[:2]
    step = batch_step(B, nh)
    if step < B:  # more programs than a CUDA grid axis takes: the batch in parts (its items are independent;
        # the tables' gradients are then summed over the parts in the tables' dtype: bf16/fp16 tables
        # round once per part, fp32 ones as the whole batch up to summation order)
        return torch.cat([rel_matrix_triton(q[i:i + step], q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
                          for i in range(0, B, step)])
    with tensor_device(q):  # Triton launches on the current device
        return _RelMatrixFn.apply(q, rel_pos_t, rel_pos_h, rel_pos_w, g, cfg)


def rel_setup(
    q: torch.Tensor, q_thw: Sequence[int], k_thw: Sequence[int], tables: Sequence[Optional[torch.Tensor]], has_cls: bool,
    checked: bool = False,
) -> tuple:
    """Check the inputs (ValueError; ``checked``: the caller has already run ``check_inputs`` on
    them, with its k and v, and the dtype, head-dim and device checks of the Triton attention) and
    return the call's geometry and launch table, for :func:`rel_forward` / :func:`rel_backward`
    (used by the fused attention kernel's autograd)."""
    if not checked:
        _check(q, q_thw, k_thw, tables, has_cls)
    g = _Geom(tuple(int(x) for x in q_thw), tuple(int(x) for x in k_thw), tables[0] is not None, bool(has_cls))
    return g, _config(q.device, q.dtype)
