"""Fused Triton HOG: frames (B, T, 3, H, W) of any strides -> per-token targets (B*T, L, D), one launch.

Semantics: exactly :mod:`kernels.hog.reference` (official ``HOGLayerC``, DESIGN §3.1), computed in
fp32. Everything from the input pixels to the normalised per-token targets happens in registers of
one program; no (N, 3, nbins, H, W) tensor and no gradient image ever exists in memory.

Kernel design
-------------
Three variants of the same computation. Default (``variant="auto"``): ``"cells-ptx"`` for unsigned
orientation on a CUDA device, else ``"cells"`` (the interpreter, signed HOG).

``"cells"`` (``_hog_cells_kernel``): one thread per cell.
- Grid: 1-d over the flattened (frame, cell row, cell column) raster, CW = 32 * num_warps cells
  per program (GPU default: one warp), so no lane idles whatever H and W are (64x224x224, cell 8:
  50176 cells, 1568 programs).
- Each thread walks its cell's CELL + 2 pixel rows (the halo rows are re-read by the cells above
  and below: 1.25x the input bytes, from L1/L2), loading per row and channel three (CW, CELL)
  blocks, left / centre / right, with plain offsets from one base (the centre load vectorises;
  reflect padding is folded into the offsets of a cell's first and last column only). The
  vertical Sobel taps are rolling sums and differences of the previous rows.
- Per pixel and bin boundary: one sign test against a compile-time direction and one
  select-and-add into the pixel column's accumulator of that bin; the CELL columns are summed
  once per channel at the end, inside the thread. No cross-lane traffic, no shared memory.
- The 3 channels are a runtime loop: its body (rows x boundaries unrolled) is ~5k instructions,
  80 KiB of code; unrolled 3 times it would be 240 KiB (same dynamic count, 3x the code for the
  instruction caches).

``"cells-ptx"`` (the CUDA default for unsigned orientation): ``"cells"`` with the binning of each
pixel written as inline PTX (:func:`_bin_ptx`): per boundary a mul, an fma, one dual-output
``setp`` ("past boundary k" / "in bin k - 1", chained on "past k - 1") and a predicated add.
In Triton ops the same rule leaves LLVM's vectoriser packing a thread's comparison booleans into
bit fields; offline for sm_90 this variant issues 61 instead of 78 warp instructions per
channel-pixel and needs 166 instead of 223 registers. The interpreter cannot run PTX: the
generated PTX is checked on CPU by a small PTX interpreter in tests/kernels/test_hog.py (every
integer gradient pair), and on GPU against the oracle by the ``SWEEP_CONFIGS`` test.

``"tile"`` (``_hog_tokens_kernel``, opt-in): one program per (frame, tile of CH x CW cells).
- The tile is a 4-d register block (CH, cell, CW, cell); the 8 Sobel neighbours are 8 gathers
  with reflect-mirrored indices; per channel and bin the cell sums are two ``tl.sum`` calls, which
  compile to warp shuffles and shared-memory layout conversions (bench/sass.py counts them).

Both:
- Orientation without atan2: the gradient (gy, gx) is folded into the half plane of angles
  [0, pi) (flip when gx < 0, or gx == 0 and gy < 0, which is where atan2 wraps), then
  ``theta >= boundary_k`` is the sign test ``gx*cos_k - gy*sin_k >= 0``; bin b collects the pixels
  with ``theta >= boundary_b`` and not ``theta >= boundary_{b+1}``. Boundary directions that are
  multiples of 45 degrees use exact integer vectors ((1, 0), (1, 1), (0, 1), (-1, 1)); the others
  are fp32 cos/sin. Signed orientation adds the half-plane flag. On integer gradients this
  reproduces the float64 ``floor(atan2 * nbins / pi) mod nbins`` bin for every pair with
  |gx|, |gy| <= 1020 (the uint8 range), with and without FMA contraction, for nbins 2..18 and 36,
  signed and unsigned (exhaustive check, see tests/kernels/test_hog.py).
- Gaussian window: a tiny table of the normalised 1-d window; the weight is w[y % g] * w[x % g].
- Per (channel, cell) the nbins sums are L2-normalised (``x / max(‖x‖, 1e-12)``) and stored
  straight into the (N, L, D) layout with index ((c*nbins + bin)*s + cy)*s + cx.
- ``norm="block_l2hys"`` needs neighbouring cells across tiles: the kernel writes raw sums and a
  second, small PyTorch step normalises the (N, 3, nbins, Hc, Wc) cell histogram (a 1/(cell^2)
  sized tensor) with :func:`kernels.hog.reference.block_l2hys`. ``none`` and ``cell_l2`` are fully
  fused.

Measured (bench/results/hog_nvidia-h100-80gb-hbm3_20261127.md, one H100, triton 3.6,
``python -m bench.hog --device cuda --sweep``; 64x3x224x224 -> 64x196x108, eager reference 1.693 ms):
"cells-ptx" 0.036 ms uint8 (47x the eager reference, 416 GB/s = 14% of the measured 2954 GB/s copy
bandwidth), "cells" 0.057 ms (29.5x; 2 warps the same, 4 warps 0.073 ms), "tile" 0.123 ms (13.7x);
every configuration oracle-exact there (max abs diff 1.8e-7 vs the fp32 reference). Offline sm_90
counts (``python -m bench.sass``, bench/results/hog_sass_sm90_20261127.md): 61 / 78 / 208 warp
instructions per channel-pixel, issue floors 20 / 25 / 68 us; the measured times are 1.8x, 2.3x
and 1.8x those floors. The kernel is issue-bound, not bandwidth-bound (bench/NOTES.md).

Known limits: cell must be a power of two (4, 8, 16, ...); inputs uint8/fp16/bf16/fp32; output is
fp32; no autograd (targets are constants). On CPU the kernel runs only in the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), where bf16 is wrong (DESIGN §4).
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import cdiv, compiling_offline, interpreting, next_pow2, tensor_device
from kernels.hog.reference import (
    block_l2hys,
    cells_to_tokens,
    check_hog_args,
    gaussian_window_1d,
    is_int,
    tokens_to_cells,
)

INTERPRETED = interpreting()  # decided when @triton.jit runs below
VARIANTS = ("cells", "tile")  # kernel variants of hog_targets_triton; "auto" picks "cells" here and "cells-ptx" on CUDA
# "cells" with its binning in inline PTX: CUDA only (the interpreter cannot run PTX), unsigned
# orientation only; checked against the oracle by the GPU tests (SWEEP_CONFIGS)
GPU_ONLY_VARIANTS = ("cells-ptx",)
SUPPORTED_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
# Launch configurations (variant, block_px, max_ch, num_warps) worth timing on a GPU (None = the
# launcher's default); bench/hog.py --sweep times them, tests/kernels/test_hog.py checks each on GPU.
SWEEP_CONFIGS = [
    ("cells", None, None, None), ("cells", None, None, 2), ("cells", None, None, 4), ("cells-ptx", None, None, None),
    ("tile", 2048, 1, None), ("tile", 512, 32, 2), ("tile", 256, 1, 2),
]  # fmt: skip
_EXACT_DIRS = [(1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (-1.0, 1.0)]  # multiples of 45 degrees in [0, pi)


@triton.jit
def _fold_half_plane(gx, gy):
    """Fold (gx, gy) into angles [0, pi): atan2(gx, gy) is in [0, pi) iff gx > 0 or (gx == 0 and
    gy >= 0). Returns (lower, fx, fy), ``lower`` marking the flipped (signed: [pi, 2pi)) half."""
    lower = (gx < 0) | ((gx == 0) & (gy < 0))
    return lower, tl.where(lower, -gx, gx), tl.where(lower, -gy, gy)


@triton.jit
def _past_boundary(fx, fy, lower, dir_ptr, k: tl.constexpr, NBINS: tl.constexpr, SIGNED: tl.constexpr):
    """True where the orientation is at or past bin boundary k (exact comparison, no atan2)."""
    cos_k = tl.load(dir_ptr + 2 * k)
    sin_k = tl.load(dir_ptr + 2 * k + 1)
    ge = (fx * cos_k - fy * sin_k) >= 0
    if SIGNED:
        if 2 * k < NBINS:
            ge = lower | ge
        else:
            ge = lower & ge
    return ge


@triton.jit
def _hog_tokens_kernel(
    x_ptr,  # frames (B, T, 3, H, W), any strides
    out_ptr,  # targets (B*T, L, D) fp32, contiguous
    win_ptr,  # (WIN,) fp32 normalised 1-d Gaussian (unused when WIN == 0)
    dir_ptr,  # (NBINS, 2) fp32 boundary directions (cos, sin); row 0 unused
    T,
    H,
    W,
    Hc,
    Wc,
    tiles_w,
    tiles_h,
    Wt,
    L,
    sxb,
    sxt,
    sxc,
    sxh,
    sxw,
    CELL: tl.constexpr,
    NBINS: tl.constexpr,
    NBP: tl.constexpr,
    S: tl.constexpr,
    CH: tl.constexpr,
    CW: tl.constexpr,
    SIGNED: tl.constexpr,
    NORM_L2: tl.constexpr,
    WIN: tl.constexpr,
    WIDE: tl.constexpr = False,  # offsets inside a frame reach 2**31: 64-bit arithmetic (wide_offsets)
):
    D = 3 * NBINS * S * S
    pid = tl.program_id(0)
    tw = pid % tiles_w
    rest = pid // tiles_w
    th = rest % tiles_h
    n = rest // tiles_h  # frame index in [0, B*T)
    b = n // T
    t = n - b * T
    x_base = x_ptr + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt

    cy = th * CH + tl.arange(0, CH)  # (CH,) cell rows
    cx = tw * CW + tl.arange(0, CW)  # (CW,) cell columns
    y_ok = cy < Hc
    x_ok = cx < Wc
    r = tl.arange(0, CELL)
    ys = tl.where(y_ok[:, None], cy[:, None] * CELL + r[None, :], 0)  # (CH, CELL) pixel rows
    xs = tl.where(x_ok[:, None], cx[:, None] * CELL + r[None, :], 0)  # (CW, CELL) pixel columns
    # reflect padding by 1: -1 -> 1, H -> H - 2
    ym = tl.abs(ys - 1)
    yp = tl.where(ys + 1 >= H, 2 * H - 3 - ys, ys + 1)
    xm = tl.abs(xs - 1)
    xp = tl.where(xs + 1 >= W, 2 * W - 3 - xs, xs + 1)
    if WIDE:
        ym, ys, yp = ym.to(tl.int64), ys.to(tl.int64), yp.to(tl.int64)
        xm, xs, xp = xm.to(tl.int64), xs.to(tl.int64), xp.to(tl.int64)
    rm = (ym * sxh)[:, :, None, None]  # (CH, CELL, 1, 1)
    r0 = (ys * sxh)[:, :, None, None]
    rp = (yp * sxh)[:, :, None, None]
    cm = (xm * sxw)[None, None, :, :]  # (1, 1, CW, CELL)
    c0 = (xs * sxw)[None, None, :, :]
    cp = (xp * sxw)[None, None, :, :]

    if WIN > 0:
        wy = tl.load(win_ptr + ys % WIN)  # (CH, CELL)
        wx = tl.load(win_ptr + xs % WIN)  # (CW, CELL)
        wgt = wy[:, :, None, None] * wx[None, None, :, :]  # (CH, CELL, CW, CELL)

    bins = tl.arange(0, NBP)[:, None, None]  # (NBP, 1, 1)
    tok = (cy // S)[:, None] * Wt + (cx // S)[None, :]  # (CH, CW) token index
    sub = (cy % S)[:, None] * S + (cx % S)[None, :]  # (CH, CW) cy*s + cx inside the token
    out_base = out_ptr + n.to(tl.int64) * L * D
    st_mask = (bins < NBINS) & (y_ok[:, None] & x_ok[None, :])[None, :, :]  # (NBP, CH, CW)

    for c in tl.static_range(3):
        if WIDE:
            cb = x_base + tl.full((), c, tl.int64) * sxc
        else:
            cb = x_base + c * sxc
        p_mm = tl.load(cb + rm + cm).to(tl.float32)  # (CH, CELL, CW, CELL)
        p_m0 = tl.load(cb + rm + c0).to(tl.float32)
        p_mp = tl.load(cb + rm + cp).to(tl.float32)
        p_0m = tl.load(cb + r0 + cm).to(tl.float32)
        p_0p = tl.load(cb + r0 + cp).to(tl.float32)
        p_pm = tl.load(cb + rp + cm).to(tl.float32)
        p_p0 = tl.load(cb + rp + c0).to(tl.float32)
        p_pp = tl.load(cb + rp + cp).to(tl.float32)
        gx = (p_mm + 2.0 * p_0m + p_pm) - (p_mp + 2.0 * p_0p + p_pp)  # left - right
        gy = (p_mm + 2.0 * p_m0 + p_mp) - (p_pm + 2.0 * p_p0 + p_pp)  # top - bottom
        mag = tl.sqrt(gx * gx + gy * gy)
        if WIN > 0:
            mag = mag * wgt
        lower, fx, fy = _fold_half_plane(gx, gy)

        hist = tl.zeros((NBP, CH, CW), dtype=tl.float32)
        above = mag  # magnitudes of the pixels with theta >= boundary_{k-1} (all for k = 1)
        for k in tl.static_range(1, NBINS):
            ge = _past_boundary(fx, fy, lower, dir_ptr, k, NBINS, SIGNED)
            # rows of a cell first (held by one thread when CH == 1), then its columns (lanes)
            part = tl.sum(tl.sum(tl.where(ge, 0.0, above), axis=1), axis=2)  # (CH, CW) bin k-1
            hist += tl.where(bins == k - 1, part[None, :, :], 0.0)
            above = tl.where(ge, mag, 0.0)
        part = tl.sum(tl.sum(above, axis=1), axis=2)
        hist += tl.where(bins == NBINS - 1, part[None, :, :], 0.0)

        if NORM_L2:
            nrm = tl.sqrt(tl.sum(hist * hist, axis=0))  # (CH, CW)
            hist = hist / tl.maximum(nrm, 1e-12)[None, :, :]
        dst = tok[None, :, :] * D + (c * NBINS + bins) * (S * S) + sub[None, :, :]  # (NBP, CH, CW)
        tl.store(out_base + dst, hist, mask=st_mask)


@triton.jit
def _hog_cells_kernel(
    x_ptr,  # frames (B, T, 3, H, W), any strides
    out_ptr,  # targets (B*T, L, D) fp32, contiguous
    win_ptr,  # (WIN,) fp32 normalised 1-d Gaussian (unused when WIN == 0)
    n_cells,  # B*T*Hc*Wc
    T,
    H,
    Hc,
    Wc,
    Wt,
    L,
    sxb,
    sxt,
    sxc,
    sxh,
    sxw,
    CELL: tl.constexpr,
    NBINS: tl.constexpr,
    S: tl.constexpr,
    CW: tl.constexpr,  # cells per program (one per thread)
    COS: tl.constexpr,  # (NBINS,) boundary directions (cos, sin) folded into [0, pi); entry 0 unused
    SIN: tl.constexpr,
    SIGNED: tl.constexpr,
    NORM_L2: tl.constexpr,
    WIN: tl.constexpr,
    WIDE: tl.constexpr = False,  # offsets inside a frame reach 2**31: 64-bit arithmetic (wide_offsets)
    BIN_PTX: tl.constexpr = False,  # variant "cells-ptx": the binning as inline PTX (_bin_ptx)
    BIN_ASM: tl.constexpr = "",
    BIN_CONSTRAINTS: tl.constexpr = "",
):
    """One thread per cell: CW consecutive cells of the flattened (frame, cell row, cell column)
    raster per program, so no lane idles whatever H and W are. Each thread walks its cell's
    CELL + 2 pixel rows, CELL columns wide.

    Per pixel row and channel: 3 loads (left, centre, right; (CW, CELL) blocks with plain offsets),
    the vertical Sobel taps as rolling sums/differences of the previous rows, then per bin
    boundary one sign test (compile-time direction) and one select-and-add into the column's
    accumulator of that bin. A cell's columns are summed once per channel at the end, inside the
    thread: no cross-lane traffic, no shared memory.
    """
    D = 3 * NBINS * S * S
    g = tl.program_id(0) * CW + tl.arange(0, CW)  # (CW,) flat cell index
    g_ok = g < n_cells
    g = tl.minimum(g, n_cells - 1)  # the tail recomputes the last cell (never stored): no load masks
    cx = g % Wc
    rest = g // Wc
    cy = rest % Hc
    n = rest // Hc  # frame index in [0, B*T)
    b = n // T
    t = n - b * T
    x_base = x_ptr + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt  # (CW,)

    r = tl.arange(0, CELL)[None, :]  # (1, CELL) column in the cell: a per-register constant
    xs = cx[:, None] * CELL + r  # (CW, CELL) pixel columns, contiguous (W is a multiple of CELL)
    if WIDE:
        xs = xs.to(tl.int64)
    # reflect padding by 1 (-1 -> 1, W -> W - 2), written per (cell, column in cell) so that the
    # compiler folds it away for all but a cell's first and last column and the loads keep plain
    # offsets from one base
    first = (cx == 0)[:, None] & (r == 0)  # (CW, CELL) x == 0
    last = (cx == Wc - 1)[:, None] & (r == CELL - 1)  # x == W - 1
    c0 = xs * sxw
    cm = c0 + tl.where(first, sxw, -sxw)
    cp = c0 + tl.where(last, -sxw, sxw)
    if WIN > 0:
        wx = tl.load(win_ptr + xs % WIN)  # (CW, CELL)
    tok = (cy // S) * Wt + cx // S
    sub = (cy % S) * S + cx % S
    out_base = out_ptr + n.to(tl.int64) * L * D + tok * D + sub  # (CW,)

    for c in range(3):  # a runtime loop: the body (rows x bins, ~5k instructions) is compiled once
        if WIDE:
            cb = x_base + tl.full((), c, tl.int64) * sxc
        else:
            cb = x_base + c * sxc
        acc = ()
        for k in tl.static_range(NBINS):
            acc = acc + (tl.zeros((CW, CELL), dtype=tl.float32),)
        for rr in tl.static_range(CELL + 2):
            yy = tl.abs(cy * CELL - 1 + rr)  # (CW,) pixel row, reflect padding by 1
            yy = tl.where(yy >= H, 2 * H - 2 - yy, yy)
            if WIDE:
                yy = yy.to(tl.int64)
            row = (cb + yy * sxh)[:, None]  # (CW, 1)
            left = tl.load(row + cm).to(tl.float32)  # (CW, CELL)
            mid = tl.load(row + c0).to(tl.float32)
            right = tl.load(row + cp).to(tl.float32)
            d_new = left - right  # horizontal difference
            s_new = left + 2 * mid + right  # horizontal smoothing
            if rr == 0:
                d0 = d_new
                s0 = s_new
            elif rr == 1:
                d1 = d_new
                s1 = s_new
            else:
                gx = d0 + 2 * d1 + d_new  # left - right
                gy = s0 - s_new  # top - bottom
                lower, fx, fy = _fold_half_plane(gx, gy)
                mag = tl.sqrt(fx * fx + fy * fy)
                if WIN > 0:
                    mag = mag * (tl.load(win_ptr + (cy * CELL + rr - 2) % WIN)[:, None] * wx)  # row cy*CELL + rr - 2
                if BIN_PTX:  # the same rule in PTX: no booleans for LLVM to pack (variant "cells-ptx")
                    acc = tl.inline_asm_elementwise(
                        BIN_ASM, BIN_CONSTRAINTS, (fx, fy, mag) + acc, dtype=(tl.float32,) * NBINS, is_pure=True, pack=1
                    )
                else:
                    # bin k - 1 collects the pixels past boundary k - 1 (every pixel for k = 1) and not past k
                    new_acc = ()
                    for k in tl.static_range(1, NBINS):
                        ge = (fx * COS[k] - fy * SIN[k]) >= 0
                        if SIGNED:
                            if 2 * k < NBINS:
                                ge = lower | ge
                            else:
                                ge = lower & ge
                        if k == 1:
                            in_bin = ~ge
                        else:
                            in_bin = prev & ~ge
                        new_acc = new_acc + (tl.where(in_bin, acc[k - 1] + mag, acc[k - 1]),)
                        prev = ge
                    acc = new_acc + (tl.where(prev, acc[NBINS - 1] + mag, acc[NBINS - 1]),)
                d0 = d1
                d1 = d_new
                s0 = s1
                s1 = s_new
        parts = ()
        ss = tl.zeros((CW,), dtype=tl.float32)
        for k in tl.static_range(NBINS):
            part = tl.sum(acc[k], axis=1)  # (CW,) cell sums of bin k (inside one thread)
            parts = parts + (part,)
            ss += part * part
        den = tl.maximum(tl.sqrt(ss), 1e-12)
        for k in tl.static_range(NBINS):
            val = parts[k]
            if NORM_L2:
                val = val / den
            tl.store(out_base + (c * NBINS + k) * (S * S), val, mask=g_ok)


def choose_tile(
    hc: int, wc: int, cell: int, block_px: int = 2048, max_ch: int = 32, overhead_px: int = 512
) -> tuple[int, int]:
    """Pick (CH, CW), powers of two, CH <= max_ch, with CH*CW*cell^2 <= max(block_px, cell^2) pixels per channel.

    Minimises a cost model ``tiles * (pixels per tile + overhead_px)``: padded (wasted) cells cost
    their pixels, each program a fixed overhead. Ties go to the wider tile.
    """
    max_cells = max(1, block_px // (cell * cell))
    best = None
    for cw in (1, 2, 4, 8, 16, 32, 64):
        if cw > next_pow2(wc):
            break
        for ch in (1, 2, 4, 8, 16, 32):
            if ch > min(next_pow2(hc), max_ch) or ch * cw > max_cells:
                break
            tiles = math.ceil(hc / ch) * math.ceil(wc / cw)
            key = (tiles * (ch * cw * cell * cell + overhead_px), -cw)
            if best is None or key < best[0]:
                best = (key, ch, cw)
    return best[1], best[2]


def boundary_directions(nbins: int, signed: bool) -> torch.Tensor:
    """(nbins, 2) fp32 (cos, sin) of the bin boundaries folded into [0, pi); row 0 unused.

    Unsigned: boundary k is at k*pi/nbins. Signed: 2*pi*k/nbins, minus pi when that is >= pi (the
    kernel combines it with the half-plane flag). Multiples of pi/4 get exact integer directions.
    """
    tab = torch.zeros((nbins, 2), dtype=torch.float64)
    for k in range(1, nbins):
        num = (2 * k - nbins if 2 * k >= nbins else 2 * k) if signed else k  # angle = pi * num / nbins
        if (4 * num) % nbins == 0:
            tab[k] = torch.tensor(_EXACT_DIRS[(4 * num) // nbins])
        else:
            a = math.pi * num / nbins
            tab[k] = torch.tensor([math.cos(a), math.sin(a)])
    return tab.to(torch.float32)


def _f32_hex(x: float) -> str:
    """A PTX fp32 immediate: 0f + the IEEE bits."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", x))[0]


@functools.lru_cache(maxsize=None)
def _bin_ptx(nbins: int) -> tuple[str, str]:
    """(PTX, constraints) of the unsigned binning of one pixel for ``tl.inline_asm_elementwise``.

    Operands: $0..$(n-1) the bin accumulators (outputs, tied to the inputs $(n+3)..), $n = fx,
    $(n+1) = fy, $(n+2) = mag. Per boundary k: v = fma(fx, cos_k, fy * -sin_k) (the FMA form of the
    sign test, exact on integer gradients: tests/kernels/test_hog.py), then one dual-output setp,
    ``p_k|q_k = (v >= 0) and p_(k-1)``: p_k marks "past boundary k", q_k "in bin k - 1", and a
    predicated add of the magnitude. Four instructions per boundary."""
    cos, sin = _boundary_constants(nbins, False)
    n = nbins
    fx, fy, mag = f"${n}", f"${n + 1}", f"${n + 2}"
    lines = ["{", f".reg .pred p<{n}>, q<{n}>;", ".reg .f32 t, v;"]
    for k in range(1, n):
        lines += [
            f"mul.rn.f32 t, {fy}, {_f32_hex(-sin[k])};",
            f"fma.rn.f32 v, {fx}, {_f32_hex(cos[k])}, t;",
            f"setp.ge.f32 p{k}|q{k}, v, 0f00000000;" if k == 1 else f"setp.ge.and.f32 p{k}|q{k}, v, 0f00000000, p{k - 1};",
            f"@q{k} add.f32 ${k - 1}, ${k - 1}, {mag};",
        ]
    lines += [f"@p{n - 1} add.f32 ${n - 1}, ${n - 1}, {mag};", "}"]
    constraints = ",".join(["=f"] * n + ["f"] * 3 + [str(i) for i in range(n)])
    return "\n".join(lines), constraints


@functools.lru_cache(maxsize=None)
def _boundary_constants(nbins: int, signed: bool) -> tuple[tuple, tuple]:
    """The boundary directions as two tuples of Python floats (cos, sin): constexprs of the cells kernel."""
    cos, sin = boundary_directions(nbins, signed).T.tolist()
    return tuple(cos), tuple(sin)


@functools.lru_cache(maxsize=64)
def _device_tables(
    nbins: int, signed: bool, gaussian_window: int, device: torch.device
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(boundary directions (nbins, 2), Gaussian window (g,) or None) on the device, made once per
    device and options: no host-to-device copy per call."""
    dirs = boundary_directions(nbins, signed).to(device)
    win = gaussian_window_1d(gaussian_window, torch.float32).to(device) if gaussian_window else None
    return dirs, win


def wide_offsets(frames: torch.Tensor) -> bool:
    """Whether an element's offset inside one frame (B, T, 3, H, W)[b, t] can reach 2**31, past
    32-bit arithmetic (a channel-first clip of over 2**30 pixels per channel, viewed as frames):
    the kernels then compute those offsets in 64 bits (batch and time offsets always are)."""
    _, _, c, h, w = frames.shape
    _, _, sxc, sxh, sxw = frames.stride()
    return (c - 1) * sxc + (h + 1) * sxh + (w + 1) * sxw >= 2**31


def hog_targets_triton(
    frames: torch.Tensor,
    token_stride: int = 16,
    *,
    cell: int = 8,
    nbins: int = 9,
    gaussian_window: int = 0,
    signed: bool = False,
    norm: str = "cell_l2",
    out: torch.Tensor | None = None,
    block_px: int | None = None,
    max_ch: int | None = None,
    num_warps: int | None = None,
    variant: str = "auto",
) -> torch.Tensor:
    """Launch the fused kernel. frames (B, T, 3, H, W) any strides -> (B*T, L, D) fp32.

    Options as :func:`kernels.hog.hog_targets`. ``out`` (B*T, L, D) fp32 contiguous may be passed (tests poison it); it is
    returned. ``variant``: ``"auto"`` (``"cells-ptx"`` for unsigned orientation on a CUDA device, the
    fastest measured; else ``"cells"``), ``"cells"``, ``"cells-ptx"`` (CUDA, unsigned) or ``"tile"`` (module docstring). ``num_warps``: program
    size (cells: 32 cells per warp; default 1 warp, 8 when interpreted). Tile only: ``block_px``
    (pixels per channel per program; default 2048, 4096 when interpreted) and ``max_ch`` (cell rows
    per tile; default 1, 32 when interpreted).
    """
    if frames.dim() != 5:
        raise ValueError(f"hog_targets_triton expects frames (B, T, 3, H, W), got shape {tuple(frames.shape)}")
    bsz, t, c, h, w = frames.shape
    check_hog_args((bsz * t, c, h, w), token_stride, cell, nbins, gaussian_window, norm, signed)
    if frames.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton HOG supports {SUPPORTED_DTYPES}, got {frames.dtype}")
    if cell & (cell - 1):
        raise ValueError(f"triton HOG needs a power-of-two cell, got {cell}")
    for name, v in (("num_warps", num_warps), ("block_px", block_px), ("max_ch", max_ch)):
        # (num_warps=3 failed inside the kernel's compile, max_ch=0 with a TypeError in choose_tile)
        if v is not None and (not is_int(v) or v < 1 or (name == "num_warps" and v & (v - 1))):
            raise ValueError(f"{name} must be {'a power of two' if name == 'num_warps' else 'an int'} >= 1, got {v!r}")
    if not frames.is_cuda and not INTERPRETED and not compiling_offline():
        raise RuntimeError(
            "backend='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing kernels.hog (or use backend='reference')"
        )
    s = token_stride // cell
    hc, wc = h // cell, w // cell
    ht, wt = h // token_stride, w // token_stride
    n, l, d = bsz * t, ht * wt, 3 * nbins * s * s
    if out is None:
        out = torch.empty((n, l, d), dtype=torch.float32, device=frames.device)
    elif out.shape != (n, l, d) or out.dtype != torch.float32 or not out.is_contiguous() or out.device != frames.device:
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(n, l, d)} on {frames.device}")
    if n == 0:
        return out
    dirs, win = _device_tables(nbins, bool(signed), gaussian_window, frames.device)
    win = dirs if win is None else win  # any valid pointer when there is no window
    if block_px is None:  # the interpreter pays per op, not per element: fewer, bigger programs
        block_px = 4096 if INTERPRETED else 2048
    if max_ch is None:  # on GPU one cell row per tile keeps a cell's rows in one thread's registers
        max_ch = 32 if INTERPRETED else 1
    if variant == "auto":
        # (inline PTX is NVIDIA's: on ROCm, LLVM aborts the process compiling it)
        nvidia = frames.is_cuda and torch.version.hip is None
        variant = "cells-ptx" if nvidia and not INTERPRETED and not signed else "cells"
    if variant not in VARIANTS + GPU_ONLY_VARIANTS:
        raise ValueError(f"variant must be 'auto' or one of {VARIANTS + GPU_ONLY_VARIANTS}, got {variant!r}")
    if variant == "cells-ptx" and (INTERPRETED or signed or torch.version.hip is not None):
        raise ValueError("variant 'cells-ptx' (inline PTX) needs an NVIDIA CUDA device, not the interpreter or ROCm, "
                         "and signed=False")
    common = dict(SIGNED=bool(signed), NORM_L2=(norm == "cell_l2"), WIN=gaussian_window,
                  WIDE=wide_offsets(frames))
    with tensor_device(frames):  # Triton launches on the current device
        if variant in ("cells", "cells-ptx"):
            if variant == "cells-ptx":
                common["BIN_ASM"], common["BIN_CONSTRAINTS"] = _bin_ptx(nbins)
                common["BIN_PTX"] = True
            num_warps = num_warps or (8 if INTERPRETED else 1)  # the interpreter pays per op: wide programs
            cw = 32 * num_warps  # one cell per thread
            cos, sin = _boundary_constants(nbins, bool(signed))
            _hog_cells_kernel[(cdiv(n * hc * wc, cw),)](
                frames, out, win,
                n * hc * wc, t, h, hc, wc, wt, l,
                *frames.stride(),
                CELL=cell, NBINS=nbins, S=s, CW=cw, COS=cos, SIN=sin, **common, num_warps=num_warps,
            )  # fmt: skip
        else:
            ch, cw = choose_tile(hc, wc, cell, block_px, max_ch)
            tiles_h, tiles_w = cdiv(hc, ch), cdiv(wc, cw)
            _hog_tokens_kernel[(n * tiles_h * tiles_w,)](
                frames, out, win, dirs,
                t, h, w, hc, wc, tiles_w, tiles_h, wt, l,
                *frames.stride(),
                CELL=cell, NBINS=nbins, NBP=next_pow2(nbins), S=s, CH=ch, CW=cw, **common,
                num_warps=num_warps or min(8, max(1, ch * cw * cell * cell // 256)),  # about 8 px per thread
            )  # fmt: skip
    if norm == "block_l2hys":  # the one unfused step: needs neighbouring cells (see module docstring)
        cells = tokens_to_cells(out, (ht, wt), nbins, s)  # (N, 3, nbins, Hc, Wc)
        out.copy_(cells_to_tokens(block_l2hys(cells), token_stride, cell))
    return out
