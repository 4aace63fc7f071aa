"""Fused Triton attention for MViTv2 pooling attention with decomposed relative positions.

Semantics: DESIGN §3.5 and ``reference.py`` (the official SlowFast ``MultiScaleAttention``):

    logits[i, j] = scale·q_i·k_j + rel_t[i, t(j)] + rel_h[i, h(j)] + rel_w[i, w(j)]

for non-cls query i and key j (cls row and column: no bias), ``out = softmax(logits) @ v``.

Design (layered: kernels → launchers → ``autograd.Function`` → public function)
---------------------------------------------------------------------------------
* The three small factored terms ``rel_t/rel_h/rel_w`` (B, nh, Nq', Tk/Hk/Wk), concatenated
  into ``R`` (B, nh, Nq', KR), KR = Tk + Hk + Wk (Tk dropped without a temporal table), come
  from the fused rel-term kernels of ``rel_triton`` (``rel_impl="triton"``, the CUDA default)
  inside this module's autograd function (:class:`_RelPosAttnFusedFn`): backward hands them the
  ``dR`` of the dq kernel, and their dq kernel *adds* q's rel-path gradient in place to the
  attention's dq (no second (B, nh, Nq, hd) tensor, no separate add). ``rel_impl="reference"``
  uses the reference's einsums instead (autograd-tracked, :class:`_RelPosAttnFn`).
* The kernels work on *augmented rows*: ``q''_i = [c·q_i, log2(e)·R_i]`` (c = scale·log2 e;
  zeros on the cls row), assembled in registers from two masked loads, and
  ``k'_j = [k_j, onehot_t(j), onehot_h(j), onehot_w(j)]`` (zeros for cls), from k and one small
  (Nk, ·) one-hot table shared by every batch·head (cached per geometry, :func:`_key_table`):
  packed into a (B, nh, Nk, ·) tensor where Nq ≥ 2·Nk (:func:`pack_k_rows`; pure loads in the key loops;
  little memory next to q), assembled in the kernels' registers otherwise (no k' in memory; at
  MViTv2-L stage 4, Nq = Nk, the packed rows would cost as much as q): :func:`_pack_k`. One dot
  ``q''·k'ᵀ`` gives the log2-domain logits *with the bias included*; no (Nq, Nk) tensor ever
  exists.
* ``fuse_rel_fwd``, ``fuse_rel_dq`` (:func:`fused_rel_config` sets both; without ``config``, on
  only for large calls where k' is not packed: :func:`call_config`): the
  rel-term forward and q-gradient run *inside* the attention kernels instead of as two separate
  kernels (``rel_triton``'s row code, :func:`rel_triton._rel_fwd_rows` /
  :func:`rel_triton._rel_dq_rows`). The forward kernel first writes R's rows of its query tile
  (kept for the backward), then, after a barrier, reads them back into q'' (its tiles are then
  the rel forward's blocks of non-cls rows, the cls row moved to the end, so the table windows
  are the separate kernel's); the dq kernel, after storing its dq and dR rows and a barrier, adds
  q's rel-path gradient to them. The values are the separate kernels' bit for bit; what goes is
  one launch and one HBM round trip of q (forward) and of dq and dR (backward) per call.
  Uncapped, the dq kernel takes 186 registers at MViTv2-L stage 1 (2 programs per SM instead of
  3), the forward 162 there but 186 at stage 4, so ``fused_rel_config`` caps them at 168
  (:func:`regs_for`): no spills in any loop on sm_90 offline (the dq kernel spills 64 bytes
  outside its loop). Timed on an H200 (``triton+rel-inside``): faster only where k' is not packed
  and the GPU, not the host, sets the pace.
* Rows are *split into two power-of-two column blocks* where that beats padding to one
  (:func:`_widths`, ``split=True``): q''/k' rows of hd + KR = 72 + 22 = 94 columns are 64 + 32
  (not 128), v/dO/o rows of hd 72 are 64 + 16. Each product runs as two dots (the second K or N
  only 16–32 wide), so the tensor cores do 25–38 % less work on padding; on an H100 this cut
  the forward 1.22 → 0.94 ms, dq 1.82 → 1.39 and dk/dv 1.84 → 1.68 ms at stage 1
  (``bench/results/attention_tune_nvidia-h100-80gb-hbm3_20261127_2.md``, "nosplit" rows).
* Forward (``_fwd_kernel``): one program per (query tile, batch·head), online softmax over all
  key tiles (FlashAttention-2 style, exp2, fp32 statistics and accumulator). Saves ``out`` and
  the log2-domain log-sum-exp ``lse2`` (B, nh, Nq) only. With ``fwd_tail`` / ``dq_tail``
  (opt-in; exact on an H200, ``test_gpu_key_tail``, and no faster there beyond the noise: forward
  0.94 → 0.92 ms, dq 1.37 → 1.39 ms at MViTv2-L stage 1) the forward and dq key loops end with one
  narrower tile where the last keys fit one (:func:`_key_tiles`: MViTv2's Nk 393 as six 64-key
  tiles and 16 keys, not a seventh 64-key tile holding 9).
* Backward: ``_dq_kernel`` per query tile loops over key tiles and accumulates ``A = dS @ k'``:
  its first hd columns are ``dq/scale`` and the next KR columns are exactly
  ``dR[i, c] = Σ_j dS[i, j]·onehot_c(j)`` — the rel gradients fall out of the same matmul,
  without atomics. It also computes ``delta = rowsum(dO·O)`` and writes it with the q'' rows it
  builds anyway into a transient packed (B, nh, Nq, A1+A2) buffer (no separate delta or packing
  kernel: −0.4 ms at stage 1). ``_dkdv_kernel`` per (key tile, query chunk, batch·head) loads
  those packed rows straight into its dots (software-pipelined) and accumulates dk, dv over the
  query tiles of its chunk. With one chunk it writes the final dk, dv in the input dtype; with
  several it writes fp32 partials, and the last of a key tile's chunk programs to finish (an int32
  count per key tile that the dq kernel zeroed) adds them in chunk order straight into the input
  dtype: no fp32 sum tensor and no separate launch (a sum kernel took 12.5 / 17 µs at MViTv2-L
  stages 1 / 2 on an H200). Chunking the query axis keeps the GPU busy when Nk is
  small and Nq large (MViTv2: Nk 393, Nq up to 25089); it is used only where the key tiles alone
  give fewer than 8 programs per SM (:func:`dkdv_split`), because the partials cost memory
  (chunks × B·nh·Nk·hd × 8 bytes) and masked tiles. Every reduction has a fixed order: backward is
  bitwise deterministic for a given shape on a given GPU model (the chunk count, and so dk/dv's
  summation grouping, follows the SM count and B·nh: another batch size or GPU model may differ in
  the last bits; the tables' gradients do not, :func:`rel_triton._dtab_bh`). The two kernels recompute S and dP each (7 products where cuDNN's
  one-pass backward does 5). A one-pass form, with dq summed over the key tiles in their order,
  was prototyped. On sm_90 offline it took more instructions per tile pair than the two kernels
  together (1401–1678 against 1322) and +B·nh·Nq·(A1+A2)·4 bytes, so it was not kept
  (bench/NOTES.md, sixteenth session).
* Dot operands are loaded in the input dtype and fed to ``tl.dot`` unchanged (an fp32 round
  trip after the load defeated the pipelining: 2× slower backward on an H100); everything
  elementwise is fp32. bf16 is therefore *not* checkable in the interpreter (DESIGN §4): bf16 is
  tested on the GPU only. fp32 inputs use ``input_precision="ieee"``. Plain pointer arithmetic
  (no block pointers), no autotune, no libdevice; loop trip counts are constexpr (``N_KT``,
  ``TILES_PER_CHUNK``) because the triton 3.6 interpreter cannot loop to a runtime bound with
  numpy ≥ 2.4. Runs under ``TRITON_INTERPRET=1`` and on triton 3.6 – 3.9.
* On CUDA every tile loop runs at least two trips and at least two pipeline stages
  (:func:`_trips`, :func:`_check_config`): Triton 3.6 miscompiles the *unpipelined* 4-warp dk/dv
  loop on sm_90 (a one-trip loop, or ``num_stages=1``: plain loads staged through shared memory
  instead of ``cp.async``), which gave an illegal memory access or NaN gradients on an H100
  (``bench/results/attention_tune_nvidia-h100-80gb-hbm3_20261127_ima.log``,
  ``gpu_tests_…_ima.log``); the pipelined loop of the same kernel is exact there. A second, fully
  masked tile contributes nothing.

Configs (fixed table, :class:`RelPosAttnConfig`, :func:`_configs`; ``python -m bench.attention_tune``
timed every variant on an H100): bf16/fp16 with rows ≤ 128 wide: forward 64×64 tiles / 4 warps /
2 stages; dq 64 queries × 32 keys / 4 warps / 3 stages; dk/dv 64×64 / 4 warps / 3 stages, query
chunks sized for 8 programs per SM (16 on the H100 run below; 8 makes MViTv2-L stage 3 one
chunk, like stage 4, where one chunk was 1.5× faster than two: ``attention_tune_…_2.md``; not
yet timed on a GPU). 8 warps were 1.5–2.2× slower for dq and dk/dv. fp32 or rows wider than 128:
smaller tiles. The interpreter uses 32×32 tiles. On an H200 the same sweep at MViTv2-L stages 1–2
found no variant or combination faster than this table by more than the noise
(``bench/results/attention_tune_nvidia-h200_20261128_s1.md``, ``_s2.md``).

Measured (one H100, torch 2.11, triton 3.6, bf16, B = 32, hd 72, Nk 393, MViTv2-L stages 1–4,
forward + backward, ``bench/results/attention_nvidia-h100-80gb-hbm3_20261127_final.md``; that
version still built k' in memory, summed fp32 dk/dv with torch and chunked for 16 programs per SM): this
kernel with its fused rel terms 5.35 / 2.85 / 2.02 / 1.68 ms, peak 970 / 564 / 405 / 314 MiB;
SDPA-cuDNN with the same fused rel terms 6.87 / 3.49 / 2.14 / 2.10 ms; the reference 45.3 / 23.5 /
12.6 / 8.0 ms, 6962 / 3481 / 1743 / 871 MiB. The same day, all providers
(``…_split.md``, dq/dk-dv then at 2 stages): SDPA-cuDNN alone 11.9 / 6.7 / 4.2 / 3.3 ms, flex
53.8 / 27.1 / 14.1 ms. Kernel times at stage 1 (``attention_tune_…_2.md``): forward 0.94, dq 1.31,
dk/dv 1.44 ms, rel terms 0.64 + 0.72 + ~0.25 ms.

Memory beyond the output and the gradients: R and dR (B·nh·Nq·KR each), the packed q'' rows
(B·nh·Nq·(A1+A2), backward only), lse and delta (fp32, B·nh·Nq), and with several query chunks
the fp32 dk/dv partials. ``python -m bench.attention_memory`` measures it per stage on the CPU.

Known limits: head dim ≤ 256 and hd + KR ≤ 512 (raises otherwise); fp32 inputs run ieee fp32
dots (exact, slow); one compiled variant per (Nk, query-chunk length) — a handful for MViTv2's
fixed stage shapes.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from kernels import cdiv, empty_buffer, first_order_only, interpreting, next_pow2, require_launchable, tensor_device
from kernels.launch import batch_step, launch

from .reference import check_inputs, key_onehot, rel_matrix, rel_width, resolve_rel_impl
from .rel_triton import (
    RelTables, _rel_dq_rows, _rel_fwd_rows, dq_rows_args, fwd_rows_args, prepare_tables, rel_backward, rel_forward, rel_setup,
)

__all__ = ["relpos_attention_triton", "RelPosAttnConfig"]

LOG2E = 1.4426950408889634

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, fp32-accumulated; exact fp32 products when the operands are fp32."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _q_aug(
    q_ptr, r_ptr, offs_m, C0: tl.constexpr, NC: tl.constexpr, Nq, c_q,
    HD: tl.constexpr, KR: tl.constexpr, HAS_CLS: tl.constexpr,
):
    """(BM, NC) fp32 columns C0 … C0+NC of q''_i = [c_q·q_i, log2e·R_{i−cls}, 0…] (zeros outside)."""
    offs_a = C0 + tl.arange(0, NC)
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
def _rows(ptr, offs_r, r_ok, C0: tl.constexpr, NC: tl.constexpr, WIDTH: tl.constexpr, VALID: tl.constexpr):
    """(R, NC) tile of a row-major (·, WIDTH) matrix: columns C0 … C0+NC, zeros past VALID or a bad row."""
    offs_c = C0 + tl.arange(0, NC)
    return tl.load(ptr + offs_r[:, None] * WIDTH + offs_c[None, :],
                   mask=r_ok[:, None] & (offs_c[None, :] < VALID), other=0.0)


@triton.jit
def _rows_t(ptr, offs_r, r_ok, C0: tl.constexpr, NC: tl.constexpr, WIDTH: tl.constexpr, VALID: tl.constexpr):
    """The transposed (NC, R) tile of :func:`_rows`, loaded in that layout."""
    offs_c = C0 + tl.arange(0, NC)
    return tl.load(ptr + offs_r[None, :] * WIDTH + offs_c[:, None],
                   mask=r_ok[None, :] & (offs_c[:, None] < VALID), other=0.0)


@triton.jit
def _k_aug(k_ptr, e_ptr, offs_n, n_ok, C0: tl.constexpr, NC: tl.constexpr, KW: tl.constexpr, E: tl.constexpr,
           TRANS: tl.constexpr):
    """Columns C0 … C0+NC of the key rows k'_j = [k_j, e_j] as a (BN, NC) tile, (NC, BN) when TRANS:
    k (·, KW) per batch·head, e (Nk, E) the keys' one-hot rows shared by all of them. KW = hd: k'
    is assembled here (no k' in memory); KW = A1+A2: k holds the packed k' rows (pure loads)."""
    if C0 + NC <= KW:
        if TRANS:
            x = _rows_t(k_ptr, offs_n, n_ok, C0, NC, KW, KW)
        else:
            x = _rows(k_ptr, offs_n, n_ok, C0, NC, KW, KW)
    else:
        offs_c = C0 + tl.arange(0, NC)
        if TRANS:
            rows, cols, ok = offs_n[None, :], offs_c[:, None], n_ok[None, :]
        else:
            rows, cols, ok = offs_n[:, None], offs_c[None, :], n_ok[:, None]
        x = tl.load(e_ptr + rows * E + tl.maximum(cols - KW, 0), mask=ok & (cols >= KW), other=0.0)
        if C0 < KW:  # the block straddles k and e: each column is one of the two, the other adds 0
            x += tl.load(k_ptr + rows * KW + cols, mask=ok & (cols < KW), other=0.0)
    return x


@triton.jit
def _store_cols(ptr, x, offs_r, r_ok, C0: tl.constexpr, NC: tl.constexpr, WIDTH: tl.constexpr, VALID: tl.constexpr):
    """Store the (R, NC) tile x as columns C0 … C0+NC (those < VALID) of a row-major (·, WIDTH) matrix."""
    offs_c = C0 + tl.arange(0, NC)
    tl.store(ptr + offs_r[:, None] * WIDTH + offs_c[None, :], x.to(ptr.dtype.element_ty),
             mask=r_ok[:, None] & (offs_c[None, :] < VALID))


@triton.jit
def _heads_base(bh, Nq, HD: tl.constexpr, NH: tl.constexpr):
    """Offset of batch·head ``bh``'s first row in a (B, nh, Nq, HD) tensor whose memory is (B, Nq, NH, HD)
    (rows NH·HD apart): NH = nh is the token-major layout the model's ``transpose(1, 2)`` makes a view
    of, NH = 1 the contiguous (B, nh, Nq, HD) one."""
    return (bh // NH) * Nq * (NH * HD) + (bh % NH) * HD


@triton.jit
def _fwd_keys(
    n0, qa1, qa2, k_ptr, e_ptr, v_ptr, Nk, m_i, l_i, acc1, acc2,
    HD: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, KW: tl.constexpr,
    E: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One online-softmax step of the forward over keys n0 … n0+BLOCK_N (those < Nk)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    s = _mm(qa1, _k_aug(k_ptr, e_ptr, offs_n, n_ok, 0, A1, KW, E, True), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
    if A2 > 0:
        s = _mm(qa2, _k_aug(k_ptr, e_ptr, offs_n, n_ok, A1, A2, KW, E, True), s, IEEE)
    # s: (BM, BN) log2-domain logits, bias included
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pd = p.to(k_ptr.dtype.element_ty)
    acc1 = _mm(pd, _rows(v_ptr, offs_n, n_ok, 0, D1, HD, HD), acc1 * alpha[:, None], IEEE)
    if D2 > 0:
        acc2 = _mm(pd, _rows(v_ptr, offs_n, n_ok, D1, D2, HD, HD), acc2 * alpha[:, None], IEEE)
    return m_new, l_i, acc1, acc2


@triton.jit
def _fwd_kernel(
    q_ptr, r_ptr, k_ptr, e_ptr, v_ptr, o_ptr, lse_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr,
    Nq, Nk, c_q,
    HD: tl.constexpr, KR: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    KW: tl.constexpr, HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_KT: tl.constexpr, TAIL_N: tl.constexpr = 0, O_NH: tl.constexpr = 1,
    FUSE_REL: tl.constexpr = False,
    R_HD: tl.constexpr = 1, R_BD: tl.constexpr = 1, R_HQ: tl.constexpr = 1, R_WQ: tl.constexpr = 1,
    R_NQR: tl.constexpr = 1, R_KT: tl.constexpr = 1, R_KH: tl.constexpr = 1, R_KW: tl.constexpr = 1,
    R_E: tl.constexpr = 1, R_VEC: tl.constexpr = 1, R_KPT: tl.constexpr = 1, R_KPH: tl.constexpr = 1,
    R_KPW: tl.constexpr = 1, R_LT: tl.constexpr = 1, R_LH: tl.constexpr = 1, R_LW: tl.constexpr = 1,
    R_LPT: tl.constexpr = 1, R_LPH: tl.constexpr = 1, R_LPW: tl.constexpr = 1, R_HAS_T: tl.constexpr = 1,
    R_HAS_CLS: tl.constexpr = 1, R_PREC: tl.constexpr = 0,
):
    # q (BH, Nq, HD), R (BH, Nq', KR), k (BH, Nk, KW), e (Nk, E), v (BH, Nk, HD), lse (BH, Nq), o (B, nh, Nq, HD)
    # in memory (B, Nq, O_NH, HD) (_heads_base)
    # FUSE_REL: this program first writes R's rows of its query tile (rel_triton._rel_fwd_rows, the
    # tables tt/th/tw in q's dtype, the distance tables dt/dh/dw; R_*: fwd_rows_args), then reads them back
    E: tl.constexpr = A1 + A2 - HD
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if FUSE_REL:
        # tiles of BLOCK_M non-cls rows, as in rel_triton's forward (the same table windows), the
        # cls row last: tile position p holds query row p + 1, and the last position, Nq − 1, row 0
        _rel_fwd_rows(
            q_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, r_ptr + bh * (Nq - HAS_CLS) * KR, bh,
            offs_m, offs_m < Nq - HAS_CLS, Nq * HD, 0, HD, 1, 1,
            R_HD, R_BD, R_HQ, R_WQ, R_NQR, R_KT, R_KH, R_KW, R_E, R_VEC, R_KPT, R_KPH, R_KPW,
            R_LT, R_LH, R_LW, R_LPT, R_LPH, R_LPW, R_HAS_T, R_HAS_CLS, R_PREC,
        )
        tl.debug_barrier()  # the rows this program stored are read below by all of its threads
        if HAS_CLS:
            offs_m += 1
            offs_m = tl.where(offs_m == Nq, 0, offs_m)
    q_ptr += bh * Nq * HD
    r_ptr += bh * (Nq - HAS_CLS) * KR
    k_ptr += bh * Nk * KW
    v_ptr += bh * Nk * HD
    o_ptr += _heads_base(bh, Nq, HD, O_NH)
    lse_ptr += bh * Nq
    dt = k_ptr.dtype.element_ty

    m_ok = offs_m < Nq
    qa1 = _q_aug(q_ptr, r_ptr, offs_m, 0, A1, Nq, c_q, HD, KR, HAS_CLS).to(dt)  # (BM, A1)
    qa2 = qa1  # stand-in when there is no second column block (A2 = 0: never read)
    if A2 > 0:
        qa2 = _q_aug(q_ptr, r_ptr, offs_m, A1, A2, Nq, c_q, HD, KR, HAS_CLS).to(dt)  # (BM, A2)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, 16], dtype=tl.float32)  # stand-in (D2 = 0: carried unchanged, folded away)
    if D2 > 0:
        acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    for it in range(N_KT):
        m_i, l_i, acc1, acc2 = _fwd_keys(it * BLOCK_N, qa1, qa2, k_ptr, e_ptr, v_ptr, Nk, m_i, l_i, acc1, acc2,
                                         HD, A1, A2, D1, D2, KW, E, IEEE, BLOCK_M, BLOCK_N)
    if TAIL_N > 0:  # the last keys in a narrower tile (_key_tiles)
        m_i, l_i, acc1, acc2 = _fwd_keys(N_KT * BLOCK_N, qa1, qa2, k_ptr, e_ptr, v_ptr, Nk, m_i, l_i, acc1, acc2,
                                         HD, A1, A2, D1, D2, KW, E, IEEE, BLOCK_M, TAIL_N)
    _store_cols(o_ptr, acc1 / l_i[:, None], offs_m, m_ok, 0, D1, O_NH * HD, HD)
    if D2 > 0:
        _store_cols(o_ptr, acc2 / l_i[:, None], offs_m, m_ok, D1, D2, O_NH * HD, HD)
    tl.store(lse_ptr + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _store_dq_dr(acc, C0: tl.constexpr, NC: tl.constexpr, offs_m, m_ok, dq_ptr, dr_ptr, scale,
                 HD: tl.constexpr, KR: tl.constexpr, HAS_CLS: tl.constexpr):
    """Columns C0 … C0+NC of A = dS @ k': those < HD are dq/scale, the next KR are dR (non-cls rows)."""
    _store_cols(dq_ptr, acc * scale, offs_m, m_ok, C0, NC, HD, HD)
    offs_c = C0 + tl.arange(0, NC)
    rp = offs_m - HAS_CLS
    ra = offs_c - HD
    tl.store(dr_ptr + tl.maximum(rp, 0)[:, None] * KR + tl.maximum(ra, 0)[None, :], acc.to(dr_ptr.dtype.element_ty),
             mask=(m_ok & (rp >= 0))[:, None] & (ra[None, :] >= 0) & (ra[None, :] < KR))


@triton.jit
def _dq_keys(
    n0, qa1, qa2, do1, do2, lse, delta, k_ptr, e_ptr, v_ptr, Nk, acc1, acc2,
    HD: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, KW: tl.constexpr,
    E: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One step of the dq kernel over keys n0 … n0+BLOCK_N (those < Nk): acc += dS @ k'."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    ka1 = _k_aug(k_ptr, e_ptr, offs_n, n_ok, 0, A1, KW, E, False)  # (BN, A1)
    s = _mm(qa1, tl.trans(ka1), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
    if A2 > 0:
        ka2 = _k_aug(k_ptr, e_ptr, offs_n, n_ok, A1, A2, KW, E, False)  # (BN, A2)
        s = _mm(qa2, tl.trans(ka2), s, IEEE)
    p = tl.exp2(s - lse[:, None])
    p = tl.where(n_ok[None, :], p, 0.0)
    dp = _mm(do1, _rows_t(v_ptr, offs_n, n_ok, 0, D1, HD, HD), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
    if D2 > 0:
        dp = _mm(do2, _rows_t(v_ptr, offs_n, n_ok, D1, D2, HD, HD), dp, IEEE)
    ds = (p * (dp - delta[:, None])).to(k_ptr.dtype.element_ty)
    acc1 = _mm(ds, ka1, acc1, IEEE)
    if A2 > 0:
        acc2 = _mm(ds, ka2, acc2, IEEE)
    return acc1, acc2


@triton.jit
def _dq_kernel(
    q_ptr, r_ptr, k_ptr, e_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dr_ptr, qa_ptr,
    tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, cnt_ptr,
    Nq, Nk, c_q, scale,
    HD: tl.constexpr, KR: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    KW: tl.constexpr, HAS_CLS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_KT: tl.constexpr, TAIL_N: tl.constexpr = 0, O_NH: tl.constexpr = 1,
    DO_NH: tl.constexpr = 1, FUSE_REL: tl.constexpr = False,
    R_HD: tl.constexpr = 1, R_D1: tl.constexpr = 1, R_REM: tl.constexpr = 0, R_D2: tl.constexpr = 1,
    R_HQ: tl.constexpr = 1, R_WQ: tl.constexpr = 1, R_NQR: tl.constexpr = 1, R_KT: tl.constexpr = 1,
    R_KH: tl.constexpr = 1, R_KW: tl.constexpr = 1, R_E: tl.constexpr = 1, R_HAS_T: tl.constexpr = 1,
    R_HAS_CLS: tl.constexpr = 1, N_CNT: tl.constexpr = 0, CNT_P: tl.constexpr = 1,
):
    # A = dS @ k' (BM, A1+A2): dq = scale·A[:, :HD], dR = A[:, HD:HD+KR]. Also writes, for the dk/dv
    # kernel, delta = rowsum(dO·O) (BH, Nq) and the packed q'' rows (BH, Nq, A1+A2) it builds anyway,
    # and (N_CNT > 0, first query tile) zeros its N_CNT int32 counts per BH at cnt_ptr (CNT_P ≥ N_CNT).
    # o and dO: (B, nh, Nq, HD) in the layouts O_NH and DO_NH name (_heads_base).
    # FUSE_REL: then adds q's rel-path gradient to the dq rows it stored (rel_triton._rel_dq_rows
    # from the dR rows it stored; fp32 tables tt/th/tw, distance tables dt/dh/dw; R_*: dq_rows_args)
    WA: tl.constexpr = A1 + A2
    E: tl.constexpr = WA - HD
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Nq_r = Nq - HAS_CLS
    q_ptr += bh * Nq * HD
    r_ptr += bh * Nq_r * KR
    k_ptr += bh * Nk * KW
    v_ptr += bh * Nk * HD
    o_ptr += _heads_base(bh, Nq, HD, O_NH)
    do_ptr += _heads_base(bh, Nq, HD, DO_NH)
    lse_ptr += bh * Nq
    delta_ptr += bh * Nq
    dq_ptr += bh * Nq * HD
    dr_ptr += bh * Nq_r * KR
    qa_ptr += bh * Nq * WA
    dt = k_ptr.dtype.element_ty

    if N_CNT > 0:
        if pid_m == 0:  # the dk/dv kernel's per-key-tile counts of this batch·head start at 0
            offs_c = tl.arange(0, CNT_P)
            tl.store(cnt_ptr + bh * N_CNT + offs_c, tl.zeros([CNT_P], dtype=tl.int32), mask=offs_c < N_CNT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq
    qa1 = _q_aug(q_ptr, r_ptr, offs_m, 0, A1, Nq, c_q, HD, KR, HAS_CLS).to(dt)  # (BM, A1)
    _store_cols(qa_ptr, qa1, offs_m, m_ok, 0, A1, WA, WA)
    qa2 = qa1  # stand-ins when there is no second column block (never read)
    acc2 = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    if A2 > 0:
        qa2 = _q_aug(q_ptr, r_ptr, offs_m, A1, A2, Nq, c_q, HD, KR, HAS_CLS).to(dt)  # (BM, A2)
        _store_cols(qa_ptr, qa2, offs_m, m_ok, A1, A2, WA, WA)
        acc2 = tl.zeros([BLOCK_M, A2], dtype=tl.float32)
    do1 = _rows(do_ptr, offs_m, m_ok, 0, D1, DO_NH * HD, HD)  # (BM, D1)
    do2 = do1
    delta = tl.sum(do1.to(tl.float32) * _rows(o_ptr, offs_m, m_ok, 0, D1, O_NH * HD, HD).to(tl.float32), 1)
    if D2 > 0:
        do2 = _rows(do_ptr, offs_m, m_ok, D1, D2, DO_NH * HD, HD)  # (BM, D2)
        delta += tl.sum(do2.to(tl.float32) * _rows(o_ptr, offs_m, m_ok, D1, D2, O_NH * HD, HD).to(tl.float32), 1)
    tl.store(delta_ptr + offs_m, delta, mask=m_ok)
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)

    acc1 = tl.zeros([BLOCK_M, A1], dtype=tl.float32)
    for it in range(N_KT):
        acc1, acc2 = _dq_keys(it * BLOCK_N, qa1, qa2, do1, do2, lse, delta, k_ptr, e_ptr, v_ptr, Nk, acc1, acc2,
                              HD, A1, A2, D1, D2, KW, E, IEEE, BLOCK_M, BLOCK_N)
    if TAIL_N > 0:  # the last keys in a narrower tile (_key_tiles)
        acc1, acc2 = _dq_keys(N_KT * BLOCK_N, qa1, qa2, do1, do2, lse, delta, k_ptr, e_ptr, v_ptr, Nk, acc1, acc2,
                              HD, A1, A2, D1, D2, KW, E, IEEE, BLOCK_M, TAIL_N)
    _store_dq_dr(acc1, 0, A1, offs_m, m_ok, dq_ptr, dr_ptr, scale, HD, KR, HAS_CLS)
    if A2 > 0:
        _store_dq_dr(acc2, A1, A2, offs_m, m_ok, dq_ptr, dr_ptr, scale, HD, KR, HAS_CLS)
    if FUSE_REL:
        tl.debug_barrier()  # the dq and dR rows stored above are read back by all of this program's threads
        _rel_dq_rows(dr_ptr, tt_ptr, th_ptr, tw_ptr, dt_ptr, dh_ptr, dw_ptr, dq_ptr, offs_m,
                     R_HD, R_D1, R_REM, R_D2, R_HQ, R_WQ, R_NQR, R_KT, R_KH, R_KW, R_E, R_HAS_T, R_HAS_CLS,
                     BLOCK_M, True)


@triton.jit
def _dkdv_kernel(
    qa_ptr, k_ptr, e_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cnt_ptr, dk_out_ptr, dv_out_ptr,
    Nq, Nk, inv_log2e, n_bh,
    HD: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, KW: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_CHUNK: tl.constexpr, DO_NH: tl.constexpr = 1,
    CHUNKS: tl.constexpr = 1,
):
    # dk, dv (chunk, BH, Nk, HD) for key tile pid_n over the query tiles of one chunk: the final
    # gradients in the input dtype when there is one chunk (CHUNKS = 1), else fp32 partials; then
    # the last of a key tile's CHUNKS programs to finish (an int32 count per (BH, key tile) at
    # cnt_ptr, zeroed by _dq_kernel) sums them in chunk order into dk_out, dv_out (BH, Nk, HD) in
    # the input dtype (_sum_partials). qa_ptr: the packed q'' rows (BH, Nq, A1+A2) written by
    # _dq_kernel, loaded straight into the dots; dO (B, nh, Nq, HD) in the layout DO_NH names (_heads_base)
    WA: tl.constexpr = A1 + A2
    E: tl.constexpr = WA - HD
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    qa_ptr += bh * Nq * WA
    k_ptr += bh * Nk * KW
    v_ptr += bh * Nk * HD
    do_ptr += _heads_base(bh, Nq, HD, DO_NH)
    lse_ptr += bh * Nq
    delta_ptr += bh * Nq
    dk_part = dk_ptr  # chunk 0's partials (CHUNKS > 1: read back below)
    dv_part = dv_ptr
    out_off = (chunk.to(tl.int64) * n_bh + bh) * Nk * HD
    dk_ptr += out_off
    dv_ptr += out_off
    dt = k_ptr.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    offs_m0 = tl.arange(0, BLOCK_M)
    ka1 = _k_aug(k_ptr, e_ptr, offs_n, n_ok, 0, A1, KW, E, False)  # (BN, A1)
    v1 = _rows(v_ptr, offs_n, n_ok, 0, D1, HD, HD)  # (BN, D1)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    if A2 > 0:
        ka2 = _k_aug(k_ptr, e_ptr, offs_n, n_ok, A1, A2, KW, E, False)  # (BN, A2)
    if D2 > 0:
        v2 = _rows(v_ptr, offs_n, n_ok, D1, D2, HD, HD)  # (BN, D2)
        dk2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
    m_begin = chunk * (TILES_PER_CHUNK * BLOCK_M)
    for it in range(TILES_PER_CHUNK):  # tiles past Nq are fully masked (p = 0)
        offs_m = m_begin + it * BLOCK_M + offs_m0
        m_ok = offs_m < Nq
        qa1T = _rows_t(qa_ptr, offs_m, m_ok, 0, A1, WA, WA)  # (A1, BM)
        sT = _mm(ka1, qa1T, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
        if A2 > 0:
            sT = _mm(ka2, _rows_t(qa_ptr, offs_m, m_ok, A1, A2, WA, WA), sT, IEEE)
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        pT = tl.exp2(sT - lse[None, :])
        pT = tl.where(m_ok[None, :], pT, 0.0)
        pTd = pT.to(dt)
        do1 = _rows(do_ptr, offs_m, m_ok, 0, D1, DO_NH * HD, HD)  # (BM, D1)
        dv1 = _mm(pTd, do1, dv1, IEEE)
        dpT = _mm(v1, tl.trans(do1), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
        if D2 > 0:
            do2 = _rows(do_ptr, offs_m, m_ok, D1, D2, DO_NH * HD, HD)  # (BM, D2)
            dv2 = _mm(pTd, do2, dv2, IEEE)
            dpT = _mm(v2, tl.trans(do2), dpT, IEEE)
        dsT = (pT * (dpT - delta[None, :])).to(dt)
        # dk = dSᵀ q (first HD columns of q''); the same registers as qa1T when the splits agree
        if D1 == A1:
            dk1 = _mm(dsT, tl.trans(qa1T), dk1, IEEE)
        else:
            dk1 = _mm(dsT, _rows(qa_ptr, offs_m, m_ok, 0, D1, WA, HD), dk1, IEEE)
        if D2 > 0:
            dk2 = _mm(dsT, _rows(qa_ptr, offs_m, m_ok, D1, D2, WA, HD), dk2, IEEE)
    # q'' carries c_q = scale·log2e, so dk = (dSᵀ q'')[:, :HD] / log2e
    _store_cols(dk_ptr, dk1 * inv_log2e, offs_n, n_ok, 0, D1, HD, HD)
    _store_cols(dv_ptr, dv1, offs_n, n_ok, 0, D1, HD, HD)
    if D2 > 0:
        _store_cols(dk_ptr, dk2 * inv_log2e, offs_n, n_ok, D1, D2, HD, HD)
        _store_cols(dv_ptr, dv2, offs_n, n_ok, D1, D2, HD, HD)
    if CHUNKS > 1:
        # after the loop (a barrier or atomic inside it stops Triton from pipelining it): every
        # thread's partial stores, then the count (one thread, gpu scope); the last program to
        # arrive reads the other programs' partials (through L2: .cg) after its own barrier
        tl.debug_barrier()
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)  # (BH, key tile), from the ids again
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == CHUNKS - 1:
            tl.debug_barrier()
            first = tl.program_id(2).to(tl.int64) * Nk * HD  # this batch·head's rows in chunk 0's partials and in out
            stride = tl.cast(n_bh, tl.int64) * Nk * HD  # (a constexpr when B·nh = 1: no .to) from one chunk's partials to the next (64-bit: c·stride)
            _sum_partials(dk_part + first, stride, dk_out_ptr + first, offs_n, n_ok, 0, D1, HD, CHUNKS)
            _sum_partials(dv_part + first, stride, dv_out_ptr + first, offs_n, n_ok, 0, D1, HD, CHUNKS)
            if D2 > 0:
                _sum_partials(dk_part + first, stride, dk_out_ptr + first, offs_n, n_ok, D1, D2, HD, CHUNKS)
                _sum_partials(dv_part + first, stride, dv_out_ptr + first, offs_n, n_ok, D1, D2, HD, CHUNKS)


@triton.jit
def _sum_partials(part_ptr, stride, out_ptr, offs_n, n_ok, C0: tl.constexpr, NC: tl.constexpr, HD: tl.constexpr,
                  CHUNKS: tl.constexpr):
    """Columns C0 … C0+NC of rows ``offs_n`` of out (·, HD) = Σ_c part_c in chunk order, fp32 from
    0.0, stored in out's dtype: the CHUNKS fp32 partials (·, HD)
    ``stride`` elements apart from ``part_ptr``. Read with .cg (L2, not this SM's L1: other programs
    wrote them). Up to 16 chunks the loop is unrolled (the loads issued together); beyond, a
    loop (B·nh = 1 on an H100 gives 131 chunks: unrolled, 3.6 KB of spills per thread and a 75 s
    compile); the same sums in the same order either way."""
    offs_c = C0 + tl.arange(0, NC)
    off = offs_n[:, None] * HD + offs_c[None, :]
    ok = n_ok[:, None] & (offs_c[None, :] < HD)
    acc = tl.zeros([offs_n.shape[0], NC], dtype=tl.float32)
    if CHUNKS <= 16:
        for c in tl.static_range(CHUNKS):
            acc += tl.load(part_ptr + c * stride + off, mask=ok, other=0.0, cache_modifier=".cg")
    else:
        for c in range(CHUNKS):
            acc += tl.load(part_ptr + c * stride + off, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pack_k_kernel(k_ptr, e_ptr, out_ptr, Nk, HD: tl.constexpr, WA: tl.constexpr, BW: tl.constexpr,
                   BLOCK: tl.constexpr):
    # out (BH, Nk, WA) = the packed k' rows [k_j, e_j]: k (BH, Nk, HD), e (Nk, WA − HD) shared by
    # every batch·head; one program per BLOCK rows of one batch·head, each row one BW-wide load pair
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BW)
    ok = (rows < Nk)[:, None]
    in_k = (cols < HD)[None, :]
    in_row = (cols < WA)[None, :]
    out = out_ptr + bh * Nk * WA + rows[:, None] * WA + cols[None, :]
    # two masked copies, no arithmetic: k's −0.0 stays −0.0 (bit for bit the cat)
    tl.store(out, tl.load(k_ptr + bh * Nk * HD + rows[:, None] * HD + cols[None, :], mask=ok & in_k), mask=ok & in_k)
    e_ok = ok & in_row & ~in_k
    tl.store(out, tl.load(e_ptr + rows[:, None] * (WA - HD) + (cols - HD)[None, :], mask=e_ok), mask=e_ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
_empty = empty_buffer  # every kernel-written buffer (tests poison it with NaN)


@dataclass(frozen=True)
class RelPosAttnConfig:
    """Tile sizes and launch parameters of the three kernels (fixed table, no autotune). The
    defaults are the CUDA bf16/fp16 table (``bench.attention_tune`` on an H100, module docstring)."""

    fwd_block_m: int = 64
    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 2
    dq_block_m: int = 64
    dq_block_n: int = 32
    dq_warps: int = 4
    dq_stages: int = 3
    dkdv_block_m: int = 64
    dkdv_block_n: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 3
    dkdv_chunks: Optional[int] = None  # query chunks of the dk/dv kernel; None: fill the GPU
    dkdv_programs_per_sm: int = 8  # query chunks: aim for this many dk/dv programs per SM
    # split row widths into two powers of two (q''/k' 94 → 64 + 32, v/dO 72 → 64 + 16) instead of
    # padding each to one (128): less tensor-core work on padding, two dots where there was one
    split: bool = True
    # k' rows packed in memory, (B, nh, Nk, A1+A2), built by torch in the forward and kept for the
    # backward, instead of assembled in the kernels from k and the shared one-hot table: pure
    # loads in the forward and dq key loops (the assembly puts an add between the load and the dot:
    # +27 / +20 registers in those kernels offline on sm_90, 3 → 2 programs per SM) for
    # B·nh·Nk·(A1+A2) more memory. None: packed when Nq ≥ 2·Nk (:func:`_pack_k`)
    pack_k: Optional[bool] = None
    # with rel_impl "triton": compute R inside the forward kernel (each query tile writes its rows,
    # kept for the backward) / add q's rel-path gradient inside the dq kernel, instead of in the
    # separate rel-term kernels (rel_triton's forward and dq: a third of the kernel time at
    # MViTv2-L stage 1 on an H100). Same values bit for bit (on an H200); faster there only for
    # large calls where k' is not packed, where call_config turns it on
    fuse_rel_fwd: bool = False
    fuse_rel_dq: bool = False
    fwd_maxnreg: Optional[int] = None  # register cap per thread of the forward kernel (None: ptxas decides)
    dq_maxnreg: Optional[int] = None  # the same for the dq kernel
    # the forward's last keys in one narrower tile after the loop (16 of 64 at Nk 393, where a
    # full last tile holds 9 valid keys: 448 → 400 key columns, −11 % of the key loop's work;
    # _key_tiles). Off: exact on an H200 (test_gpu_key_tail) but no faster there beyond the noise
    # (bench/results/attention_tune_nvidia-h200_20261128_s1.md, _s2.md)
    fwd_tail: bool = False
    dq_tail: bool = False  # the same for the dq kernel's 32-key tiles (416 → 400 key columns)


def _configs(wa: int, dtype: torch.dtype, device: torch.device) -> RelPosAttnConfig:
    """Fixed config table by augmented row width and dtype; small tiles in the interpreter."""
    if device.type != "cuda":
        return RelPosAttnConfig(32, 32, 4, 1, 32, 32, 4, 1, 32, 32, 4, 1)
    if dtype == torch.float32 or wa > 128:
        # fp32 operands or rows wider than 128: halve the tiles to stay within registers / shared memory
        return RelPosAttnConfig(64, 32, 4, 2, 32, 32, 4, 2, 32, 32, 4, 2)
    return RelPosAttnConfig()


def default_config(hd: int, kr: int, dtype: torch.dtype, device: torch.device) -> RelPosAttnConfig:
    """The table a call with head dim ``hd`` and rel width ``kr`` runs without ``config``."""
    return _default_config(hd, kr, dtype, device.type == "cuda")


@functools.lru_cache(maxsize=None)
def _default_config(hd: int, kr: int, dtype: torch.dtype, cuda: bool) -> RelPosAttnConfig:
    """:func:`default_config`, one frozen object per entry (building one costs µs on every call)."""
    return _configs(_Dims.of(hd, kr, True).wa, dtype, torch.device("cuda" if cuda else "cpu"))


def fuse_rel_on(device: torch.device) -> bool:
    """Whether :func:`call_config` may put the rel terms inside the kernels on ``device``: CUDA,
    where it was timed (``bench.model_step --count-only`` counts CUDA's path on a CPU through it)."""
    return device.type == "cuda"


FUSE_REL_MIN_ROWS = 1 << 17  # B·nh·Nq from which call_config puts the rel terms inside the kernels


def call_config(hd: int, kr: int, dtype: torch.dtype, device: torch.device, nq: int, nk: int, bh: int,
                rel_on_triton: bool) -> RelPosAttnConfig:
    """The table a call of ``bh`` = B·nh heads of Nq queries and Nk keys runs without ``config``:
    :func:`default_config`, with the rel terms inside the forward and dq kernels
    (:func:`fused_rel_config`) on CUDA in fp16/bf16 where the rel terms run in Triton, k' is not
    packed (Nq < 2·Nk) and the call has at least ``FUSE_REL_MIN_ROWS`` query rows (B·nh·Nq).

    Two measured points decide it, on an H200, MViTv2-L's Nq = Nk = 393, nh 16, bf16 fwd+bwd
    (bench/results/attention_nvidia-h200_20261128_relinside.md and the B 4 table of
    gpu_check_nvidia-h200_20261128_first.log): at B 32 (201 k rows, the GPU sets the pace) fused
    took 1.05 ms against 1.43 (1.25 in another run); at B 4 (25 k rows, the host sets the pace)
    1.18 against 0.99 ms. Where k' is packed (Nq ≥ 2·Nk) fused was 5 % slower at B 32 (5.52 →
    5.82, 2.72 → 2.88, 1.42 → 1.49 ms at stages 1-3). Other shapes with Nq < 2·Nk (fine-tuning's
    stage transitions, MViTv2-S, the 40×3 variant) are untimed; the threshold puts them on the
    side their size suggests."""
    cfg = default_config(hd, kr, dtype, device)
    if (fuse_rel_on(device) and dtype != torch.float32 and rel_on_triton and bh * nq >= FUSE_REL_MIN_ROWS
            and not _pack_k(cfg, nq, nk)):
        return _fused_rel_config_cached(cfg)
    return cfg


def regs_for(programs_per_sm: int, warps: int) -> int:
    """The most registers per thread that still let ``programs_per_sm`` programs of ``warps`` warps
    share one SM's 64 K registers (allocated in steps of 8 per thread, at most 255): 168 for 3 of 4 warps."""
    return min(255, (65536 // (programs_per_sm * warps * 32)) // 8 * 8)


def fused_rel_config(cfg: RelPosAttnConfig) -> RelPosAttnConfig:
    """``cfg`` with the rel terms inside the forward and dq kernels (``fuse_rel_fwd``,
    ``fuse_rel_dq``), capped at the
    registers of 3 programs per SM: uncapped, the fused dq kernel takes 186 registers at MViTv2-L
    stage 1 and the forward 186 at stage 4 (2 programs per SM); capped at 168 the forward spills
    nothing and the dq kernel 64 bytes, outside its loop (sm_90 offline, ``bench.sass``)."""
    return dataclasses.replace(cfg, fuse_rel_fwd=True, fuse_rel_dq=True, fwd_maxnreg=regs_for(3, cfg.fwd_warps),
                               dq_maxnreg=regs_for(3, cfg.dq_warps))


_fused_rel_config_cached = functools.lru_cache(maxsize=None)(fused_rel_config)  # one object per table


def _widths(width: int, split: bool) -> tuple[int, int]:
    """(W1, W2): a row of ``width`` columns as a power-of-two block W1 and, when that saves columns
    over padding to one power of two, a second one W2 ≥ 16 (else W2 = 0 and W1 = next_pow2)."""
    full = next_pow2(width, 16)
    w1 = 1 << (width.bit_length() - 1)  # largest power of two ≤ width
    if not split or w1 < 16 or w1 == width:
        return full, 0
    w2 = next_pow2(width - w1, 16)
    return (w1, w2) if w1 + w2 < full else (full, 0)


@dataclass(frozen=True)
class _Dims:
    """Column blocks of one call: q''/k' rows as A1 + A2 columns (≥ hd + KR), v/dO/o rows as D1 + D2 (≥ hd)."""

    hd: int
    kr: int
    a1: int
    a2: int
    d1: int
    d2: int

    @classmethod
    @functools.lru_cache(maxsize=None)
    def of(cls, hd: int, kr: int, split: bool) -> "_Dims":
        return cls(hd, kr, *_widths(hd + kr, split), *_widths(hd, split))

    @property
    def wa(self) -> int:
        return self.a1 + self.a2

    def constexprs(self) -> dict:
        return dict(HD=self.hd, A1=self.a1, A2=self.a2, D1=self.d1, D2=self.d2)


def _pack_k(cfg: RelPosAttnConfig, nq: int, nk: int) -> bool:
    """Whether k' is packed in memory (``cfg.pack_k``; None: when Nq ≥ 2·Nk). With many more
    queries than keys (MViTv2-L stages 1–3) the packed rows cost little next to q (2–33 % of its
    bytes) and keep the measured, faster kernels; at Nq ≈ Nk (stage 4) they would cost as much as
    q, and memory decides (bench/NOTES.md)."""
    return cfg.pack_k if cfg.pack_k is not None else nq >= 2 * nk


def pack_k_rows(k: torch.Tensor, e: torch.Tensor, dims: _Dims) -> torch.Tensor:
    """The packed k' rows (B, nh, Nk, A1+A2) = ``torch.cat([k, e.expand(B, nh, Nk, ·)], -1)`` for a
    contiguous k (B, nh, Nk, hd) and the keys' one-hot table e (Nk, A1+A2 − hd), bit for bit, in one
    Triton launch. torch's cat of the broadcast e took 14 / 26 µs at MViTv2-L stages 1 / 2 on an
    H200 (a non-vectorised copy, ``attention_tune_…_s1.md``, ``_s2.md``) for 8.5 / 17 MB moved."""
    B, nh, Nk, hd = k.shape
    out = _empty(B, nh, Nk, dims.wa, dtype=k.dtype, device=k.device)
    block = 32
    launch(_pack_k_kernel, (cdiv(Nk, block), B * nh), k, e, out, Nk, HD=hd, WA=dims.wa, BW=next_pow2(dims.wa, 16),
           BLOCK=block, num_warps=4)
    return out


def _key_table(k: torch.Tensor, k_thw: tuple, kt: int, dims: _Dims, has_cls: bool) -> torch.Tensor:
    """e (Nk, A1+A2 − hd) in k's dtype: per key its one-hot t (when kt > 0), h and w coordinate,
    then zeros; the cls row all zeros; cached per geometry and shared by every batch·head. The
    kernels read k'_j = [k_j, e_j] from k and this, or from the packed rows (:func:`_pack_k`)."""
    return key_onehot(tuple(k_thw), kt > 0, has_cls, dims.wa - dims.hd, k.dtype, k.device)


def _trips(n: int, block: int, device: torch.device) -> int:
    """Trip count of a kernel's tile loop over n items: cdiv(n, block), at least 2 on a GPU.

    Triton 3.6 miscompiles these kernels' unpipelined tile loop (a loop of one trip, or
    num_stages = 1) at 4 warps on sm_90: the dk/dv kernel hit an illegal memory access or wrote
    NaN on an H100 (bench/NOTES.md; cf. triton-lang/triton#10573). A second, fully masked tile
    keeps the loop pipelined and contributes nothing (p = 0)."""
    return max(2 if device.type == "cuda" else 1, cdiv(n, block))


def _key_tiles(nk: int, block_n: int, tail: bool, device: torch.device) -> tuple[int, int]:
    """(N_KT, TAIL_N) of a key loop (forward, dq): N_KT tiles of ``block_n`` keys, then, when
    ``tail`` and the remainder fits a narrower power of two (≥ 16), one tile of TAIL_N keys after
    the loop (0: none; the last full tile is masked as before). The loop keeps ≥ 2 trips on a GPU
    (:func:`_trips`)."""
    full, rem = divmod(nk, block_n)
    width = next_pow2(rem, 16) if rem else 0
    if not tail or width == 0 or width >= block_n or full < (2 if device.type == "cuda" else 1):
        return _trips(nk, block_n, device), 0
    return full, width


def _check_config(cfg: RelPosAttnConfig, device: torch.device) -> None:
    if device.type == "cuda" and min(cfg.fwd_stages, cfg.dq_stages, cfg.dkdv_stages) < 2:
        raise ValueError(
            "relpos_attention_triton needs num_stages ≥ 2 for every kernel on CUDA: the unpipelined tile loop is "
            f"miscompiled by Triton on sm_90 (see _trips); got {cfg}"
        )


def _launch(warps: int, stages: int, maxnreg: Optional[int]) -> dict:
    """Launch options: warps, pipeline stages and, when given, a register cap per thread (ptxas
    spills above it; Triton ignores it in the interpreter)."""
    return dict(num_warps=warps, num_stages=stages, **({} if maxnreg is None else dict(maxnreg=maxnreg)))


def _rel_args(q, rel, rows_args, **kw) -> tuple:
    """(the six rel-table pointers, R_* constexprs) of a fused kernel: ``rel`` = (tables, geometry)
    runs the rel terms inside it (``rows_args``: rel_triton's argument builder, given ``kw``);
    None passes q as an unused stand-in and no constexprs (the kernel's defaults: FUSE_REL off)."""
    if rel is None:
        return (q,) * 6, {}
    tensors, consts = rows_args(q, *rel, **kw)
    return tensors, dict(FUSE_REL=True, **{f"R_{name}": value for name, value in consts.items()})


def _fwd(q, r, k, e, v, dims: _Dims, has_cls, scale, cfg, rel=None):
    """q (B, nh, Nq, hd), R (B, nh, Nq', KR), k (B, nh, Nk, hd) or the packed k' rows
    (B, nh, Nk, A1+A2), the keys' one-hot table e (Nk, A1+A2 − hd), v → out (B, nh, Nq, hd),
    lse2 (B, nh, Nq). With ``rel`` = (``rel_triton.RelTables``, rel geometry) the kernel writes R itself (r: an
    uninitialised buffer of R's shape). o's memory is token-major, (B, Nq, nh, hd), the layout the
    model reads it in: its ``o.transpose(1, 2).reshape(B, Nq, C)`` is then a view, and the gradient
    that comes back through it has the same layout, which backward reads as it is."""
    B, nh, Nq, hd = q.shape
    Nk = k.shape[2]
    o = _empty(B, Nq, nh, hd, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = _empty(B, nh, Nq, dtype=torch.float32, device=q.device)
    tabs, rel_consts = _rel_args(q, rel, fwd_rows_args, block=cfg.fwd_block_m)
    launch(
        _fwd_kernel, (cdiv(Nq, cfg.fwd_block_m), B * nh),
        q, r, k, e, v, o, lse, *tabs, Nq, Nk, scale * LOG2E,
        **_kernel_kw("fwd", dims, cfg, k.shape[-1], has_cls, q.dtype == torch.float32, Nk, q.device.type, nh),
        **rel_consts,
    )
    return o, lse


@functools.lru_cache(maxsize=256)
def _kernel_kw(kernel: str, dims: _Dims, cfg: RelPosAttnConfig, kw: int, has_cls: bool, ieee: bool, nk: int,
               device_type: str, o_nh: int, do_nh: int = 1) -> dict:
    """The constexprs and launch options of the forward (``kernel="fwd"``) or dq kernel, computed
    once per shape and config (each call rebuilt these dicts: µs of host per launch). ``o_nh``,
    ``do_nh``: the layouts of o and dO (:func:`_heads_layout`; dO: dq only). Read-only: callers
    unpack it."""
    block_m, block_n, tail, warps, stages, maxnreg = (
        (cfg.fwd_block_m, cfg.fwd_block_n, cfg.fwd_tail, cfg.fwd_warps, cfg.fwd_stages, cfg.fwd_maxnreg)
        if kernel == "fwd" else
        (cfg.dq_block_m, cfg.dq_block_n, cfg.dq_tail, cfg.dq_warps, cfg.dq_stages, cfg.dq_maxnreg))
    n_kt, tail_n = _key_tiles(nk, block_n, tail, torch.device(device_type))
    return dict(KR=dims.kr, **dims.constexprs(), KW=kw, HAS_CLS=int(has_cls), IEEE=ieee, BLOCK_M=block_m,
                BLOCK_N=block_n, N_KT=n_kt, TAIL_N=tail_n, O_NH=o_nh, **({} if kernel == "fwd" else dict(DO_NH=do_nh)),
                **_launch(warps, stages, maxnreg))


def _bwd_dq(q, r, k, e, v, o, do, do_nh, lse, dims: _Dims, has_cls, scale, cfg, rel=None, counts=None):
    """dq (B, nh, Nq, hd), dR (B, nh, Nq', KR) in the input dtypes, and what the dk/dv kernel
    reads: delta (B, nh, Nq) fp32 and the packed q'' rows (B, nh, Nq, A1+A2). o is :func:`_fwd`'s
    (token-major), dO in the layout ``do_nh`` (:func:`_heads_layout`). With ``rel`` =
    (``RelTables``, rel geometry) dq includes q's rel-path gradient. ``counts``: the dk/dv kernel's
    int32 counts (B·nh, key tiles) when it runs query chunks, zeroed here (:func:`_bwd_dkdv`)."""
    B, nh, Nq, _ = q.shape
    Nk = k.shape[2]
    dq = _empty(*q.shape, dtype=q.dtype, device=q.device)
    dr = _empty(*r.shape, dtype=r.dtype, device=r.device)
    delta = _empty(B, nh, Nq, dtype=torch.float32, device=q.device)
    qa = _empty(B, nh, Nq, dims.wa, dtype=q.dtype, device=q.device)
    tabs, rel_consts = _rel_args(q, rel, dq_rows_args)
    n_cnt = 0 if counts is None else counts.shape[1]
    launch(
        _dq_kernel, (cdiv(Nq, cfg.dq_block_m), B * nh),
        q, r, k, e, v, o, do, lse, delta, dq, dr, qa, *tabs, delta if counts is None else counts,
        Nq, Nk, scale * LOG2E, scale,
        **_kernel_kw("dq", dims, cfg, k.shape[-1], has_cls, q.dtype == torch.float32, Nk, q.device.type, nh, do_nh),
        **rel_consts, **({} if n_cnt == 0 else dict(N_CNT=n_cnt, CNT_P=next_pow2(n_cnt))),
    )
    return dq, dr, delta, qa


def dkdv_split(cfg: RelPosAttnConfig, nq: int, nk: int, n_bh: int, n_sms: Optional[int]) -> tuple[int, int]:
    """(query chunks, query tiles per chunk) of the dk/dv kernel for Nq, Nk and B·nh on a GPU with
    ``n_sms`` SMs (None: the interpreter, one chunk unless ``cfg.dkdv_chunks`` says otherwise).
    Chunks aim for ``cfg.dkdv_programs_per_sm`` programs per SM; the query tiles are shared out as
    evenly as the chunk count allows (fewer than ``chunks`` fully masked tiles in all: a masked
    tile still runs its four dots), ≥ 2 per chunk on a GPU (:func:`_trips`). One compiled variant
    per tiles-per-chunk value, i.e. per MViTv2 stage. Pure: ``bench.attention_memory`` asks it what
    an H100 would run."""
    n_q_tiles = cdiv(nq, cfg.dkdv_block_m)
    n_kv_programs = max(1, cdiv(nk, cfg.dkdv_block_n) * n_bh)  # (an empty batch launches nothing)
    if cfg.dkdv_chunks is not None:
        chunks = max(1, min(cfg.dkdv_chunks, n_q_tiles))
    elif n_sms is None:
        chunks = 1
    else:
        chunks = max(1, min(n_q_tiles, cdiv(cfg.dkdv_programs_per_sm * n_sms, n_kv_programs)))
    tiles_per_chunk = max(2 if n_sms is not None else 1, cdiv(n_q_tiles, chunks))
    return cdiv(n_q_tiles, tiles_per_chunk), tiles_per_chunk


def _n_sms(device: torch.device) -> Optional[int]:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _bwd_dkdv(qa, k, e, v, do, do_nh, lse, delta, dims: _Dims, cfg, counts=None, plan=None):
    """dk, dv (B, nh, Nk, hd) in the input dtype: written by the kernel when there is one query
    chunk, else fp32 partials per chunk that the last program of each key tile to finish sums in
    chunk order (deterministic) in the same launch. dO in the layout ``do_nh``
    (:func:`_heads_layout`). ``counts``: zeroed int32 (B·nh, key tiles) for the chunked case, as
    :func:`_dkdv_counts` makes them and the dq kernel zeros them; None: zeroed here (a torch fill).
    ``plan``: :func:`_dkdv_plan`'s result when the caller has it already."""
    B, nh, Nq, _ = qa.shape
    Nk = k.shape[2]
    chunks, kw = plan if plan is not None else _dkdv_plan(qa, k, dims, cfg, do_nh)
    out = _empty(2, B, nh, Nk, dims.hd, dtype=qa.dtype, device=qa.device)  # dk, dv
    if chunks == 1:
        part, counts = out, lse  # lse: a stand-in, never read
    else:
        part = _empty(2, chunks, B * nh * Nk * dims.hd, dtype=torch.float32, device=qa.device)
        if counts is None:
            counts = _dkdv_counts(B * nh, Nk, cfg, qa.device)
            counts.zero_()
    launch(
        _dkdv_kernel, (cdiv(Nk, cfg.dkdv_block_n), chunks, B * nh),
        qa, k, e, v, do, lse, delta, part[0], part[1], counts, out[0], out[1], Nq, Nk, 1.0 / LOG2E, B * nh, **kw,
    )
    return out[0], out[1]


def _dkdv_counts(n_bh: int, nk: int, cfg: RelPosAttnConfig, device: torch.device) -> torch.Tensor:
    """The dk/dv kernel's int32 count per (batch·head, key tile), uninitialised: how many of the
    key tile's query-chunk programs have stored their partials."""
    return _empty(n_bh, cdiv(nk, cfg.dkdv_block_n), dtype=torch.int32, device=device)


def _dkdv_plan(q: torch.Tensor, k: torch.Tensor, dims: _Dims, cfg: RelPosAttnConfig, do_nh: int) -> tuple[int, dict]:
    """:func:`_dkdv_kw` for q (or the packed q'' rows) (B, nh, Nq, ·) and k (B, nh, Nk, ·) on q's device."""
    B, nh, Nq, _ = q.shape
    return _dkdv_kw(dims, cfg, k.shape[-1], q.dtype == torch.float32, Nq, k.shape[2], B * nh, _n_sms(q.device), do_nh)


@functools.lru_cache(maxsize=256)
def _dkdv_kw(dims: _Dims, cfg: RelPosAttnConfig, kw: int, ieee: bool, nq: int, nk: int, n_bh: int,
             n_sms: Optional[int], do_nh: int) -> tuple[int, dict]:
    """(query chunks, constexprs and launch options) of the dk/dv kernel, computed once per shape
    and config (:func:`dkdv_split`). The dict is read-only: callers unpack it."""
    chunks, tiles_per_chunk = dkdv_split(cfg, nq, nk, n_bh, n_sms)
    return chunks, dict(**dims.constexprs(), KW=kw, IEEE=ieee, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n,
                        TILES_PER_CHUNK=tiles_per_chunk, DO_NH=do_nh, CHUNKS=chunks, num_warps=cfg.dkdv_warps,
                        num_stages=cfg.dkdv_stages)


def _bwd(do, q, r, k, v, o, lse, dims: _Dims, k_thw, kt, has_cls, scale, cfg, rel=None):
    """Gradients dq (B, nh, Nq, hd), dk, dv (B, nh, Nk, hd) and dR (B, nh, Nq', KR) in the input
    dtypes; with ``rel`` = (``RelTables``, rel geometry), dq includes q's rel-path gradient."""
    do = do.to(q.dtype)
    do_nh = _heads_layout(do)
    if do_nh == 0:  # neither layout the kernels read
        do, do_nh = do.contiguous(), 1
    e = _key_table(k, k_thw, kt, dims, has_cls)
    plan = _dkdv_plan(q, k, dims, cfg, do_nh)  # once per backward: the dq kernel zeros the counts it needs
    counts = _dkdv_counts(q.shape[0] * q.shape[1], k.shape[2], cfg, q.device) if plan[0] > 1 else None
    dq, dr, delta, qa = _bwd_dq(q, r, k, e, v, o, do, do_nh, lse, dims, has_cls, scale, cfg, rel, counts)
    dk, dv = _bwd_dkdv(qa, k, e, v, do, do_nh, lse, delta, dims, cfg, counts, plan)
    return dq, dk, dv, dr


def _heads_layout(x: torch.Tensor) -> int:
    """How the kernels read x (B, nh, Nq, hd) (their ``_heads_base``): 1 when contiguous, nh when its
    memory is token-major (B, Nq, nh, hd) (the forward's output and, through the model's transpose
    back to (B, Nq, C), its gradient), 0 when neither."""
    if x.is_contiguous():
        return 1
    return x.shape[1] if x.transpose(1, 2).is_contiguous() else 0


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def _attn_forward(q, k, v, r, k_thw, kt, has_cls, scale, cfg, rel=None) -> tuple:
    """(o, what backward needs) for contiguous q, k, v, r; the saved k is the packed k' rows
    where :func:`_pack_k` packs them. ``rel``: see :func:`_fwd`."""
    dims = _Dims.of(q.shape[-1], r.shape[-1], cfg.split)
    e = _key_table(k, k_thw, kt, dims, has_cls)
    if _pack_k(cfg, q.shape[2], k.shape[2]):
        k = pack_k_rows(k, e, dims)  # (B, nh, Nk, A1+A2)
    o, lse = _fwd(q, r, k, e, v, dims, has_cls, scale, cfg, rel)
    return o, (q, r, k, v, o, lse), (dims, k_thw, kt, has_cls, scale, cfg)


class _RelPosAttnFn(torch.autograd.Function):
    """out = attention(q, k, v, R) where R = [rel_t, rel_h, rel_w] (B, nh, Nq', KR) comes from
    autograd-tracked PyTorch (``rel_impl="reference"``)."""

    @staticmethod
    def forward(ctx, q, k, v, r, k_thw, kt, has_cls, scale, cfg):
        o, saved, ctx.meta = _attn_forward(q.contiguous(), k.contiguous(), v.contiguous(), r.contiguous(), k_thw, kt, has_cls, scale, cfg)
        ctx.save_for_backward(*saved)
        return o

    @staticmethod
    @first_order_only("relpos_attention (backend triton)")
    def backward(ctx, do):
        dq, dk, dv, dr = _bwd(do, *ctx.saved_tensors, *ctx.meta)
        return dq, dk, dv, dr, None, None, None, None, None


class _RelPosAttnFusedFn(torch.autograd.Function):
    """out = attention(q, k, v, tables) with R computed by the fused rel-term kernels
    (``rel_triton``) inside: q's rel-path gradient is added in place to the attention's own dq
    (no second (B, nh, Nq, hd) tensor and no separate add), the tables' gradients come from dR.
    With ``cfg.fuse_rel_fwd`` / ``cfg.fuse_rel_dq`` the rel-term forward / q-gradient run inside
    the attention's forward / dq kernel; the tables' gradients stay a separate kernel."""

    @staticmethod
    def forward(ctx, q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, g, rel_cfg, k_thw, kt, has_cls, scale, cfg):
        q, tables = q.contiguous(), (rel_pos_t, rel_pos_h, rel_pos_w)
        tabs = prepare_tables(q, tables, g)
        if cfg.fuse_rel_fwd:
            rel = (tabs, g)
            r = _empty(*q.shape[:2], g.nqr, g.e, dtype=q.dtype, device=q.device)  # written by the forward kernel
        else:
            rel, r = None, rel_forward(q, tabs, g, rel_cfg)
        o, saved, meta = _attn_forward(q, k.contiguous(), v.contiguous(), r, k_thw, kt, has_cls, scale, cfg, rel)
        ctx.save_for_backward(*saved, *tables)
        ctx.meta, ctx.rel = meta, (g, rel_cfg, tabs.f32)
        return o

    @staticmethod
    @first_order_only("relpos_attention (backend triton)")
    def backward(ctx, do):
        *saved, rel_pos_t, rel_pos_h, rel_pos_w = ctx.saved_tensors
        (g, rel_cfg, f32), fused = ctx.rel, ctx.meta[-1].fuse_rel_dq
        tabs = RelTables((rel_pos_t, rel_pos_h, rel_pos_w), None, f32)
        dq, dk, dv, dr = _bwd(do, *saved, *ctx.meta, rel=(tabs, g) if fused else None)
        q = saved[0]
        grads = rel_backward(dr, q, tabs, g, rel_cfg, (not fused, *ctx.needs_input_grad[3:6]), dq=dq)
        return grads[0], dk, dv, *grads[1:], None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
REFUSE_INTERPRETED_BF16 = True
"""Refuse bf16 inputs in Triton's interpreter (it computes them wrongly); off only while launches
are stubbed (``bench.attention_host.triton_launches``: counting what a CUDA step would issue)."""


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
    in q, k, v and the three tables; backward is deterministic (for a shape on a GPU model: module
    docstring). ``config`` overrides the tile
    table (tests use it to force query chunking). ``rel_impl``: how the factored bias terms R are
    computed (``reference.rel_matrix_impl``: PyTorch einsums or the fused Triton kernel).
    """
    check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    require_launchable(q, "relpos_attention_triton", "backend='sdpa'", RuntimeError)
    if q.dtype not in _DOT_DTYPES:
        raise ValueError(f"relpos_attention_triton supports float16, bfloat16 and float32; got {q.dtype}")
    if q.dtype == torch.bfloat16 and interpreting() and REFUSE_INTERPRETED_BF16:  # numpy has no bfloat16: garbage
        raise ValueError("relpos_attention_triton in bfloat16 runs on a GPU only: Triton's interpreter computes it "
                         "wrongly (outputs of 1e8 measured); use float16/float32 on the CPU, or backend='sdpa'")
    B, nh, Nq, hd = q.shape
    if hd > 256:
        raise ValueError(f"head dim {hd} > 256 is not supported by the Triton kernel")
    q_thw, k_thw = tuple(int(x) for x in q_thw), tuple(int(x) for x in k_thw)
    scale = hd**-0.5 if scale is None else float(scale)
    kt = 0 if rel_pos_t is None else k_thw[0]
    kr = rel_width(k_thw, rel_pos_t is not None)  # width of the factored bias terms R = [rel_t, rel_h, rel_w]
    if hd + kr > 512:
        raise ValueError(f"head dim {hd} + rel width {kr} > 512 is not supported by the Triton kernel")
    step = batch_step(B, nh)
    if step < B:  # more programs than a CUDA grid axis takes: the batch in parts (its items are independent;
        # the tables' gradients are then summed over the parts in the tables' dtype: bf16/fp16 tables
        # round once per part, fp32 ones as the whole batch up to summation order)
        return torch.cat([
            relpos_attention_triton(q[i:i + step], k[i:i + step], v[i:i + step], q_thw, k_thw, rel_pos_t, rel_pos_h,
                                    rel_pos_w, has_cls=has_cls, scale=scale, config=config, rel_impl=rel_impl)
            for i in range(0, B, step)
        ])
    rel_on_triton = resolve_rel_impl(rel_impl, q.device) == "triton"
    cfg = config if config is not None else call_config(hd, kr, q.dtype, q.device, Nq, k.shape[2], B * nh, rel_on_triton)
    _check_config(cfg, q.device)
    if (cfg.fuse_rel_fwd or cfg.fuse_rel_dq) and not rel_on_triton:
        raise ValueError("fuse_rel_fwd / fuse_rel_dq run the Triton rel-term code inside the attention kernels: "
                         f"they need rel_impl='triton' (got {rel_impl!r} on {q.device})")
    with tensor_device(q):  # Triton launches on the current device
        if rel_on_triton:
            g, rel_cfg = rel_setup(q, q_thw, k_thw, (rel_pos_t, rel_pos_h, rel_pos_w), has_cls, checked=True)
            return _RelPosAttnFusedFn.apply(q, k, v, rel_pos_t, rel_pos_h, rel_pos_w, g, rel_cfg, k_thw, kt, has_cls, scale, cfg)
        r = rel_matrix(q, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)  # (B, nh, Nq', KR), autograd-tracked
        return _RelPosAttnFn.apply(q, k, v, r, k_thw, kt, has_cls, scale, cfg)
