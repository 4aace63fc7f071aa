"""Fused Triton HOG: frames (B, T, 3, H, W) of any strides -> per-token targets (B*T, L, D), one launch.

Semantics: exactly :mod:`kernels.hog.reference` (official ``HOGLayerC``, DESIGN §3.1), computed in
fp32. Everything from the input pixels to the normalised per-token targets happens in registers of
one program; no (N, 3, nbins, H, W) tensor and no gradient image ever exists in memory.

Kernel design
-------------
- Grid: 1-d, one program per (frame, tile of CH x CW cells); tiles in raster order inside a frame.
  CH and CW are powers of two chosen by :func:`choose_tile` (about ``block_px`` pixels per channel).
  GPU default: one cell row per tile (CH = 1), block_px = 2048, about 8 pixels per thread; for
  224x224, cell 8: CW = 32 (8 x 256 px, 28 of 32 cells valid), num_warps = 8, 28 programs per
  frame, 1792 programs for 64 frames.
- Each program loops over the 3 channels. The tile is a 4-d register block (CH, cell, CW, cell)
  (cell row, row in cell, cell column, column in cell), so the cell sums are two ``tl.sum`` calls
  and never need a reshape. With Triton's default blocked layout for (1, 8, CW, 8) the lanes of a
  warp should cover (4 cells x 8 columns) and warps split CW, so each thread holds the 8 rows of
  one column: the row sum (done first) stays in registers and the column sum is a 3-step warp
  shuffle (expected from the layout rules; not inspected in the compiled code). The 8 Sobel neighbours are 8 gathers with reflect-mirrored row and
  column indices (the halo comes from L1/L2; input strides are arbitrary, no copy is made).
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
- Per (channel, cell) the nbins sums are gathered into a (NBP, CH, CW) block (NBP = nbins rounded
  up to a power of two), L2-normalised (``x / max(‖x‖, 1e-12)``) and stored straight into the
  (N, L, D) layout with index ((c*nbins + bin)*s + cy)*s + cx.
- Variant ``"rows"`` (opt-in, ``hog_targets_triton(..., variant="rows")``): one program per
  (frame, cell row, CW cells), walking the cell's rows + 2 halo rows; each pixel row is 3 gathers
  (left, centre, right) instead of 8, the vertical Sobel taps are rolling per-row sums and
  differences, and the nbins per-column accumulators (a Triton tuple) are reduced over the cell's
  columns once at the end. Same results; it uses tuples of tensors (triton >= 3.2).
- ``norm="block_l2hys"`` needs neighbouring cells across tiles: the kernel writes raw sums and a
  second, small PyTorch step normalises the (N, 3, nbins, Hc, Wc) cell histogram (a 1/(cell^2)
  sized tensor) with :func:`kernels.hog.reference.block_l2hys`. ``none`` and ``cell_l2`` are fully
  fused.

Measured (bench/results/hog_nvidia-h100-80gb-hbm3_20261127.md, H100, triton 3.6, an earlier
revision of this file: 4x4-cell tiles and rows summed after columns): 0.20 ms for 64x3x224x224 uint8
-> 8.3x the eager reference, 74 GB/s = 2.5% of the measured copy bandwidth; best swept tile
0.14 ms. The current defaults (one cell row per tile, rows summed first) and the "rows" variant
were written after that run and are not yet timed on a GPU (``python -m bench.hog --sweep``).

Known limits: cell must be a power of two (4, 8, 16, ...); inputs uint8/fp16/bf16/fp32; output is
fp32; no autograd (targets are constants). On CPU the kernel runs only in the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), where bf16 is wrong (DESIGN §4).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.hog.reference import block_l2hys, cells_to_tokens, check_hog_args, gaussian_window_1d, tokens_to_cells

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # decided when @triton.jit runs below
VARIANTS = ("tile", "rows")  # kernel variants of hog_targets_triton; "tile" is the default
SUPPORTED_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
# Launch configurations (variant, block_px, max_ch, num_warps) worth timing on a GPU (None = the
# launcher's default); bench/hog.py --sweep times them, tests/kernels/test_hog.py checks each on GPU.
SWEEP_CONFIGS = [
    ("tile", 2048, 1, None), ("tile", 1024, 1, 4), ("tile", 2048, 1, 4), ("tile", 512, 32, 2), ("tile", 256, 1, 2),
    ("rows", 2048, 1, None), ("rows", 2048, 1, 1), ("rows", 2048, 1, 4),
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
def _hog_rows_kernel(
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
    CW: tl.constexpr,
    BW: tl.constexpr,  # CW * CELL pixel columns
    SIGNED: tl.constexpr,
    NORM_L2: tl.constexpr,
    WIN: tl.constexpr,
):
    """Row-streaming variant: one program per (frame, cell row, CW cells); walks the cell's rows.

    Each pixel row is loaded once per channel as 3 column-shifted vectors (left, centre, right);
    the vertical Sobel taps are the rolling horizontal sums/differences of the previous rows. The
    nbins per-column accumulators (a tuple of (CW*CELL,) vectors) are reduced over the cell's
    columns once at the end, so the per-pixel work has no cross-thread communication.
    """
    D = 3 * NBINS * S * S
    pid = tl.program_id(0)
    tw = pid % tiles_w
    rest = pid // tiles_w
    cy = rest % Hc  # cell row
    n = rest // Hc
    b = n // T
    t = n - b * T
    x_base = x_ptr + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt

    xs = tw * BW + tl.arange(0, BW)  # (BW,) pixel columns
    xs = tl.where(xs < W, xs, 0)
    xm = tl.abs(xs - 1)
    xp = tl.where(xs + 1 >= W, 2 * W - 3 - xs, xs + 1)
    cm = xm * sxw
    c0 = xs * sxw
    cp = xp * sxw
    if WIN > 0:
        wx = tl.load(win_ptr + xs % WIN)  # (BW,)
    cx = tw * CW + tl.arange(0, CW)  # (CW,) cell columns
    tok = (cy // S) * Wt + cx // S
    sub = (cy % S) * S + cx % S
    out_base = out_ptr + n.to(tl.int64) * L * D + tok * D + sub  # (CW,)
    st_mask = cx < Wc

    for c in range(3):  # a runtime loop: keeps the unrolled body (rows x bins) compiled once
        cb = x_base + c * sxc
        acc = ()
        for k in tl.static_range(NBINS):
            acc = acc + (tl.zeros((BW,), dtype=tl.float32),)
        for rr in tl.static_range(CELL + 2):
            yy = cy * CELL - 1 + rr  # reflect padding by 1
            yy = tl.abs(yy)
            yy = tl.where(yy >= H, 2 * H - 2 - yy, yy)
            row = cb + yy * sxh
            left = tl.load(row + cm).to(tl.float32)
            mid = tl.load(row + c0).to(tl.float32)
            right = tl.load(row + cp).to(tl.float32)
            d_new = left - right  # horizontal difference
            s_new = left + 2.0 * mid + right  # horizontal smoothing
            if rr == 0:
                d0 = d_new
                s0 = s_new
            elif rr == 1:
                d1 = d_new
                s1 = s_new
            else:
                gx = d0 + 2.0 * d1 + d_new  # left - right
                gy = s0 - s_new  # top - bottom
                mag = tl.sqrt(gx * gx + gy * gy)
                if WIN > 0:
                    mag = mag * (tl.load(win_ptr + (cy * CELL + rr - 2) % WIN) * wx)  # pixel row cy*CELL + rr - 2
                lower, fx, fy = _fold_half_plane(gx, gy)
                above = mag
                new_acc = ()
                for k in tl.static_range(1, NBINS):
                    ge = _past_boundary(fx, fy, lower, dir_ptr, k, NBINS, SIGNED)
                    new_acc = new_acc + (acc[k - 1] + tl.where(ge, 0.0, above),)
                    above = tl.where(ge, mag, 0.0)
                acc = new_acc + (acc[NBINS - 1] + above,)
                d0 = d1
                d1 = d_new
                s0 = s1
                s1 = s_new
        parts = ()
        ss = tl.zeros((CW,), dtype=tl.float32)
        for k in tl.static_range(NBINS):
            part = tl.sum(tl.reshape(acc[k], (CW, CELL)), axis=1)  # (CW,) cell sums of bin k
            parts = parts + (part,)
            ss += part * part
        den = tl.maximum(tl.sqrt(ss), 1e-12)
        for k in tl.static_range(NBINS):
            val = parts[k]
            if NORM_L2:
                val = val / den
            tl.store(out_base + (c * NBINS + k) * (S * S), val, mask=st_mask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


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
        if cw > _next_pow2(wc):
            break
        for ch in (1, 2, 4, 8, 16, 32):
            if ch > min(_next_pow2(hc), max_ch) or ch * cw > max_cells:
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
    variant: str = "tile",
) -> torch.Tensor:
    """Launch the fused kernel. frames (B, T, 3, H, W) any strides -> (B*T, L, D) fp32.

    Options as :func:`kernels.hog.hog_targets`. ``out`` (B*T, L, D) fp32 contiguous may be passed (tests poison it); it is
    returned. ``block_px`` (pixels per channel per program; default 2048, 4096 when interpreted),
    ``max_ch`` (cell rows per tile; default 1, 32 when interpreted) and ``num_warps`` (default: about
    8 pixels per thread) set the tile and the program size.
    """
    if frames.dim() != 5:
        raise ValueError(f"hog_targets_triton expects frames (B, T, 3, H, W), got shape {tuple(frames.shape)}")
    bsz, t, c, h, w = frames.shape
    check_hog_args((bsz * t, c, h, w), token_stride, cell, nbins, gaussian_window, norm)
    if frames.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton HOG supports {SUPPORTED_DTYPES}, got {frames.dtype}")
    if cell & (cell - 1):
        raise ValueError(f"triton HOG needs a power-of-two cell, got {cell}")
    if h < 2 or w < 2:
        raise ValueError(f"reflect padding needs H, W >= 2, got {h}x{w}")
    if not frames.is_cuda and not INTERPRETED:
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
    dirs = boundary_directions(nbins, signed).to(frames.device)
    win = gaussian_window_1d(gaussian_window, torch.float32).to(frames.device) if gaussian_window else dirs
    if block_px is None:  # the interpreter pays per op, not per element: fewer, bigger programs
        block_px = 4096 if INTERPRETED else 2048
    if max_ch is None:  # on GPU one cell row per tile keeps a cell's rows in one thread's registers
        max_ch = 32 if INTERPRETED else 1
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    common = dict(SIGNED=bool(signed), NORM_L2=(norm == "cell_l2"), WIN=gaussian_window)
    if variant == "rows":
        _, cw = choose_tile(hc, wc, cell, block_px, 1)
        tiles_w = triton.cdiv(wc, cw)
        _hog_rows_kernel[(n * hc * tiles_w,)](
            frames, out, win, dirs,
            t, h, w, hc, wc, tiles_w, wt, l,
            *frames.stride(),
            CELL=cell, NBINS=nbins, S=s, CW=cw, BW=cw * cell, **common,
            num_warps=num_warps or min(8, max(1, cw * cell // 128)),  # about 2 columns per thread
        )  # fmt: skip
    else:
        ch, cw = choose_tile(hc, wc, cell, block_px, max_ch)
        tiles_h, tiles_w = triton.cdiv(hc, ch), triton.cdiv(wc, cw)
        _hog_tokens_kernel[(n * tiles_h * tiles_w,)](
            frames, out, win, dirs,
            t, h, w, hc, wc, tiles_w, tiles_h, wt, l,
            *frames.stride(),
            CELL=cell, NBINS=nbins, NBP=_next_pow2(nbins), S=s, CH=ch, CW=cw, **common,
            num_warps=num_warps or min(8, max(1, ch * cw * cell * cell // 256)),  # about 8 px per thread
        )  # fmt: skip
    if norm == "block_l2hys":  # the one unfused step: needs neighbouring cells (see module docstring)
        cells = tokens_to_cells(out, (ht, wt), nbins, s)  # (N, 3, nbins, Hc, Wc)
        out.copy_(cells_to_tokens(block_l2hys(cells), token_stride, cell))
    return out
    ch, cw = choose_tile(hc, wc, cell, block_px, max_ch)
    if num_warps is None:  # about 8 pixels per thread per channel (8 gathers each stay in registers)
        num_warps = min(8, max(1, ch * cw * cell * cell // 256))
    tiles_h, tiles_w = triton.cdiv(hc, ch), triton.cdiv(wc, cw)
    grid = (n * tiles_h * tiles_w,)
    _hog_tokens_kernel[grid](
        frames, out, win, dirs,
        t, h, w, hc, wc, tiles_w, tiles_h, wt, l,
        *frames.stride(),
        CELL=cell, NBINS=nbins, NBP=_next_pow2(nbins), S=s, CH=ch, CW=cw,
        SIGNED=bool(signed), NORM_L2=(norm == "cell_l2"), WIN=gaussian_window,
        num_warps=num_warps,
    )  # fmt: skip
    if norm == "block_l2hys":
        cells = tokens_to_cells(out, (ht, wt), nbins, s)  # (N, 3, nbins, Hc, Wc)
        out.copy_(cells_to_tokens(block_l2hys(cells), token_stride, cell))
    return out
