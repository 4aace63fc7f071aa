"""Triton depthwise 3-D convolution (MViTv2's q/k/v pooling), forward and backward, no bias.

What: :func:`depthwise_conv3d_triton` computes ``F.conv3d(x, weight, None, stride, padding, 1, C)``
for x (N, C, T, H, W) fp32/fp16/bf16 of any strides and weight (C, 1, kt, kh, kw) of x's dtype;
output (N, C, To, Ho, Wo) contiguous in x's dtype; differentiable in x and the weight. Semantics
source and oracle: :mod:`kernels.pool.reference`.

Design (kernels → launchers → ``autograd.Function`` → public function)
------------------------------------------------------------------------
Every kernel takes a 1-d grid over (plane or channel, chunk) pairs, chunk fastest, so that all
N·C planes are busy whatever the plane size, and no grid axis meets the 65535 limit. Kernel
size, stride and padding are constexprs (MViTv2 has four geometries); T, H, W and the output
sizes are runtime values. Plane bases are int64 (N·C·T·H·W may exceed 2³¹); offsets inside one
plane are int32 (the launcher refuses planes whose span reaches 2³¹ elements).

* ``_pool_fwd_kernel``: one program per (plane n·C + c, block of BLOCK output positions of that
  plane, flattened (to, ho, wo)). The KT·KH·KW taps are unrolled; per tap one masked load of x
  (the bounds and row offsets of t and h are hoisted out of the inner loops) times the tap's
  scalar weight, accumulated in fp32; one store in x's dtype.
* ``_pool_dgrad_kernel``: the input gradient as a gather, no atomics: one program per (plane,
  block of input positions). For input index i along an axis and tap k the output index is
  ``(i + p − k) / s``, an integer only for k ≡ i + p (mod s): the kernel visits just those taps,
  k = (i + p) mod s + j·s for j < ⌈K / s⌉ (:func:`_tap`), with the tap's weight gathered per
  position (a per-program scalar at stride 1). At MViTv2's (1, 4, 4) and (1, 8, 8) strides that
  is 3 taps instead of 27, at (1, 2, 2) 12. fp32 accumulation, stored in x's dtype (contiguous).
* Weight gradient, deterministic and without atomics, in two stages.
  ``_pool_wgrad_kernel`` (stage 1): per channel c the reduction runs over N × (To·Ho·Wo); its
  (plane, block) pairs are cut into chunks of ITERS consecutive pairs; one program per
  (channel, chunk) keeps one fp32 accumulator vector per tap (a tuple, as the HOG kernel does),
  sums each once at the end and writes the chunk's KT·KH·KW partials to an fp32 buffer
  (C, chunks, taps). ``_pool_wgrad_finish_kernel`` (stage 2): one program per channel sums the
  partials over the chunks in a fixed order and stores the row in the weight's dtype. The chunking
  depends on the shape and the device type only (the interpreter's plan differs from a GPU's), so
  every bit of the result is the same on every run.

Bytes (the floor): forward reads x and writes y, dgrad reads dy and writes dx, wgrad reads x and
dy (the partials are ≤ 1.5 MB at MViTv2-L's shapes); the re-reads of x's halo come from L1/L2.
Per convolution fwd+bwd: 3·|x| + 3·|y| element reads/writes. MViTv2-L, B 4, bf16, block 0's
q-pooling (8, 72, 8, 56, 56) stride 1: |x| = |y| = 28.9 MB, 173 MB, 40 µs at ~4.3 TB/s; its
k/v-pooling (stride (1, 8, 8), y 64×): 3·28.9 + 3·0.45 = 88 MB, 20 µs. Over all of MViTv2-L's
poolings in one pre-training step (B 4): 6.7 GB, ~1.4 ms at 4.8 TB/s (1.56 ms at the 4.3 TB/s a
device-to-device copy reaches).

Offline for sm_90 (``bench.sass``, triton 3.6, bf16, B 4; no spills, ≤ 255 registers): the kernels
are bound by instruction issue, not bytes: ~12–15 warp instructions per (tap, position) (masked
loads, 64-bit addresses, conversions). Issue floor over one step's poolings 21.3 ms (warp
instructions / (132 SMs · 4 schedulers · 1.755 GHz)), against the 64 ms torch's kernels took on an
H200; block 0's stride-1 q-pooling: fwd 203, dgrad 215, wgrad 227 µs.

Launch parameters are a fixed table (:func:`_plan`, lru-cached per shape): on a GPU blocks of
128–1024 positions chosen to waste the fewest lanes on a plane's tail (4 warps; wgrad 64–256
positions with 1–4 warps, 2 positions per thread, so that 27 accumulators fit in registers, 4
blocks per program); in the
interpreter, which pays per operation and not per element, blocks of up to 4096 positions.

Timed on an H200 (fifteenth session, ``bench/results/pool_conv_nvidia-h200_20261128_triton.md``):
``backend="auto"`` of :func:`kernels.pool.depthwise_conv3d` runs these kernels for the large
inputs only (:func:`kernels.pool.auto_backend`). Plain pointer
arithmetic, no block pointers, no autotune, no atomics; every loop trip count is constexpr
(triton 3.6 – 3.9, ``TRITON_INTERPRET=1`` on CPU, where fp32→bf16 conversion truncates instead of
rounding to nearest: bf16 results there are up to one ulp off, DESIGN §4).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import cdiv, compiling_offline, empty_buffer, first_order_only, next_pow2, require_launchable, tensor_device
from kernels.launch import launch

from .reference import IntOr3, check_inputs

__all__ = ["depthwise_conv3d_triton", "DTYPES"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_I32 = 2**31


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _split_out(o, Ho, Wo):
    """(to, ho, wo) of flattened output positions ``o`` of one plane."""
    ow = o % Wo
    r = o // Wo
    return r // Ho, r % Ho, ow


@triton.jit
def _tile(n_chunks, NC, C, BC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of the fwd / dgrad grid (plane blocks × chunks, chunk fastest): its BC
    planes (n·C + c) with their validity, n and c, and its BLOCK flattened positions."""
    pid = tl.program_id(0)
    pb = pid // n_chunks
    chunk = pid - pb * n_chunks
    plane = pb * BC + tl.arange(0, BC)
    n = plane // C
    return plane, plane < NC, n, plane - n * C, chunk * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _pool_fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    NC, C, T, H, W, To, Ho, Wo, n_chunks,
    sxn, sxc, sxt, sxh, sxw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BC: tl.constexpr, BLOCK: tl.constexpr,
):
    # x (N, C, T, H, W) strided, w (C, KT·KH·KW) contiguous, y (N, C, To, Ho, Wo) contiguous;
    # one program: BC planes (n·C + c) × BLOCK output positions (flattened (to, ho, wo))
    NTAP: tl.constexpr = KT * KH * KW
    plane, p_ok, n, c, o = _tile(n_chunks, NC, C, BC, BLOCK)
    P = To * Ho * Wo
    ok = o < P
    ot, oh, ow = _split_out(o, Ho, Wo)
    x_base = x_ptr + (n.to(tl.int64) * sxn + c.to(tl.int64) * sxc)[:, None]  # (BC, 1)
    w_row = w_ptr + c * NTAP  # (BC,)
    acc = tl.zeros((BC, BLOCK), dtype=tl.float32)
    for kt in tl.static_range(KT):
        it = ot * ST + (kt - PT)
        m_t = ok & (it >= 0) & (it < T)
        for kh in tl.static_range(KH):
            ih = oh * SH + (kh - PH)
            m_th = m_t & (ih >= 0) & (ih < H)
            row = it * sxt + ih * sxh
            for kw in tl.static_range(KW):
                iw = ow * SW + (kw - PW)
                m = m_th & (iw >= 0) & (iw < W)
                wv = tl.load(w_row + ((kt * KH + kh) * KW + kw), mask=p_ok, other=0.0).to(tl.float32)
                xv = tl.load(x_base + (row + iw * sxw)[None, :], mask=p_ok[:, None] & m[None, :],
                             other=0.0).to(tl.float32)
                acc += xv * wv[:, None]
    dst = y_ptr + (plane.to(tl.int64) * P)[:, None] + o[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & ok[None, :])


@triton.jit
def _tap(num, n_out, j: tl.constexpr, K: tl.constexpr, S: tl.constexpr):
    """The j-th tap that input index i (``num = i + pad``, ≥ 0) meets along one axis: its kernel
    index k, output index o = (num − k) / S, and whether k < K and o ∈ [0, n_out). With stride S
    only taps k ≡ num (mod S) give an integer o: k = num mod S + j·S, j < ⌈K / S⌉ (one tap per
    axis for S ≥ K instead of K masked ones). For S = 1, k = j is a compile-time constant."""
    if S == 1:
        o = num - j
        return j, o, (o >= 0) & (o < n_out)
    else:
        k = num % S + j * S
        o = num // S - j
        return k, o, (k < K) & (o >= 0) & (o < n_out)


@triton.jit
def _pool_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    NC, C, T, H, W, To, Ho, Wo, n_chunks,
    sdn, sdc, sdt, sdh, sdw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BC: tl.constexpr, BLOCK: tl.constexpr,
):
    # dy (N, C, To, Ho, Wo) strided, w (C, KT·KH·KW) contiguous, dx (N, C, T, H, W) contiguous;
    # one program: BC planes × BLOCK input positions (flattened (t, h, w))
    NTAP: tl.constexpr = KT * KH * KW
    JT: tl.constexpr = (KT + ST - 1) // ST
    JH: tl.constexpr = (KH + SH - 1) // SH
    JW: tl.constexpr = (KW + SW - 1) // SW
    plane, p_ok, n, c, i = _tile(n_chunks, NC, C, BC, BLOCK)
    P_in = T * H * W
    ok = i < P_in
    iw = i % W
    r = i // W
    ih = r % H
    it = r // H
    dy_base = dy_ptr + (n.to(tl.int64) * sdn + c.to(tl.int64) * sdc)[:, None]  # (BC, 1)
    w_row = (w_ptr + c * NTAP)[:, None]  # (BC, 1)
    acc = tl.zeros((BC, BLOCK), dtype=tl.float32)
    for jt in tl.static_range(JT):
        kt, ot, v_t = _tap(it + PT, To, jt, KT, ST)
        m_t = ok & v_t
        for jh in tl.static_range(JH):
            kh, oh, v_h = _tap(ih + PH, Ho, jh, KH, SH)
            m_th = m_t & v_h
            row = ot * sdt + oh * sdh
            for jw in tl.static_range(JW):
                kw, ow, v_w = _tap(iw + PW, Wo, jw, KW, SW)
                m = (p_ok[:, None] & (m_th & v_w)[None, :])  # (BC, BLOCK)
                # the tap's weight: a per-program scalar at stride 1, else gathered per position (L1)
                if ST * SH * SW == 1:
                    wv = tl.load(w_row + ((kt * KH + kh) * KW + kw), mask=p_ok[:, None], other=0.0).to(tl.float32)
                else:
                    wv = tl.load(w_row + ((kt * KH + kh) * KW + kw), mask=m, other=0.0).to(tl.float32)
                g = tl.load(dy_base + (row + ow * sdw)[None, :], mask=m, other=0.0).to(tl.float32)
                acc += g * wv
    dst = dx_ptr + (plane.to(tl.int64) * P_in)[:, None] + i[None, :]
    tl.store(dst, acc.to(dx_ptr.dtype.element_ty), mask=p_ok[:, None] & ok[None, :])


@triton.jit
def _pool_wgrad_kernel(
    x_ptr, dy_ptr, part_ptr,
    N, C, T, H, W, To, Ho, Wo, n_blocks, n_chunks,
    sxn, sxc, sxt, sxh, sxw,
    sdn, sdc, sdt, sdh, sdw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    # part (C, n_chunks, KT·KH·KW) fp32: chunk g of channel c sums, per tap, x_window · dy over the
    # (plane n, block b) pairs q = n·n_blocks + b in [g·ITERS, (g+1)·ITERS); one program: BC channels
    NTAP: tl.constexpr = KT * KH * KW
    pid = tl.program_id(0)
    cb = pid // n_chunks
    g = pid - cb * n_chunks
    chan = cb * BC + tl.arange(0, BC)
    c_ok = (chan < C)[:, None]  # (BC, 1)
    P = To * Ho * Wo
    acc = ()
    for j in tl.static_range(NTAP):
        acc = acc + (tl.zeros((BC, BLOCK), dtype=tl.float32),)
    for step in tl.static_range(ITERS):
        q = g * ITERS + step
        n = q // n_blocks
        b = q - n * n_blocks
        o = b * BLOCK + tl.arange(0, BLOCK)
        ok = (o < P) & (n < N)
        ot, oh, ow = _split_out(o, Ho, Wo)
        x_base = x_ptr + (n.to(tl.int64) * sxn + chan.to(tl.int64) * sxc)[:, None]  # (BC, 1)
        dy_base = dy_ptr + (n.to(tl.int64) * sdn + chan.to(tl.int64) * sdc)[:, None]
        dy = tl.load(dy_base + (ot * sdt + oh * sdh + ow * sdw)[None, :], mask=c_ok & ok[None, :],
                     other=0.0).to(tl.float32)
        new = ()
        for kt in tl.static_range(KT):
            it = ot * ST + (kt - PT)
            m_t = ok & (it >= 0) & (it < T)
            for kh in tl.static_range(KH):
                ih = oh * SH + (kh - PH)
                m_th = m_t & (ih >= 0) & (ih < H)
                row = it * sxt + ih * sxh
                for kw in tl.static_range(KW):
                    iw = ow * SW + (kw - PW)
                    m = m_th & (iw >= 0) & (iw < W)
                    xv = tl.load(x_base + (row + iw * sxw)[None, :], mask=c_ok & m[None, :], other=0.0).to(tl.float32)
                    new = new + (acc[(kt * KH + kh) * KW + kw] + xv * dy,)
        acc = new
    out = part_ptr + (chan.to(tl.int64) * n_chunks + g) * NTAP  # (BC,)
    for j in tl.static_range(NTAP):
        tl.store(out + j, tl.sum(acc[j], axis=1), mask=chan < C)


@triton.jit
def _pool_wgrad_finish_kernel(
    part_ptr, dw_ptr, n_chunks,
    NTAP: tl.constexpr, TP: tl.constexpr, BG: tl.constexpr, G_ITERS: tl.constexpr,
):
    # dw[c, j] = Σ_g part[c, g, j] in a fixed order (blocks of BG chunks, then one tree sum)
    c = tl.program_id(0)
    offs_j = tl.arange(0, TP)
    offs_g = tl.arange(0, BG)
    base = part_ptr + c.to(tl.int64) * n_chunks * NTAP
    acc = tl.zeros((BG, TP), dtype=tl.float32)
    for step in tl.static_range(G_ITERS):
        gg = step * BG + offs_g
        acc += tl.load(base + gg[:, None] * NTAP + offs_j[None, :],
                       mask=(gg < n_chunks)[:, None] & (offs_j < NTAP)[None, :], other=0.0)
    tot = tl.sum(acc, axis=0)
    tl.store(dw_ptr + c * NTAP + offs_j, tot.to(dw_ptr.dtype.element_ty), mask=offs_j < NTAP)


# ----------------------------------------------------------------------------------------------
# launch plans
# ----------------------------------------------------------------------------------------------
class _Geom(NamedTuple):
    """Kernel, stride and padding as (t, h, w) triples: the constexprs of every kernel."""

    kernel: tuple
    stride: tuple
    padding: tuple

    def constexprs(self) -> dict:
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = self
        return dict(KT=kt, KH=kh, KW=kw, ST=st, SH=sh, SW=sw, PT=pt, PH=ph, PW=pw)

    def out_thw(self, thw) -> tuple:
        return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(thw, self.kernel, self.stride, self.padding))


def _gpu(device: torch.device) -> bool:
    return device.type == "cuda" or compiling_offline()


def _block(size: int, gpu: bool, choices=(128, 256, 512, 1024)) -> int:
    """Positions per program for a plane of ``size``: in the interpreter the whole plane up to 4096;
    on a GPU the block of ``choices`` with the fewest lanes lost on the plane's tail, counting a
    fixed cost of 64 lanes per program (ties: the larger block)."""
    if not gpu:
        return min(4096, next_pow2(size, 16))
    return min(choices, key=lambda b: (cdiv(size, b) * (b + 64), -b))


def _planes(count: int, block: int, gpu: bool, elems: int = 1 << 16) -> int:
    """Planes (or channels) per program: one on a GPU; in the interpreter, which pays per operation
    and not per element, as many as fit ``elems`` elements per tile."""
    return 1 if gpu else max(1, min(next_pow2(count), elems // block))


_FINISH_BLOCK = 64  # chunks the finish kernel sums per step of its loop (G_ITERS steps cover them all)


class _Plan(NamedTuple):
    """What one call launches (read-only), per shape."""

    fwd: tuple  # (BC, BLOCK, programs, chunks per plane block, num_warps)
    dgrad: tuple  # (BC, BLOCK, programs, chunks per plane block, num_warps)
    wgrad: tuple  # (BC, BLOCK, blocks per plane, ITERS, chunks per channel, programs, num_warps)
    finish: tuple  # (TP, BG, G_ITERS)


@functools.lru_cache(maxsize=256)
def _plan(in_thw: tuple, out_thw: tuple, N: int, C: int, ntap: int, gpu: bool) -> _Plan:
    p_in, p_out = in_thw[0] * in_thw[1] * in_thw[2], out_thw[0] * out_thw[1] * out_thw[2]
    bf, bd = _block(p_out, gpu), _block(p_in, gpu)
    cf, cd = _planes(N * C, bf, gpu), _planes(N * C, bd, gpu)
    # wgrad: on a GPU 2 positions per thread (27 fp32 accumulators each) and 4 blocks per program
    bw = _block(p_out, gpu, (64, 128, 256))
    cw = _planes(C, bw, gpu, 1 << 15)
    nb = cdiv(p_out, bw)
    iters = min(4 if gpu else 8, N * nb)
    n_chunks = cdiv(N * nb, iters)
    bg = min(_FINISH_BLOCK, next_pow2(n_chunks))
    return _Plan(
        fwd=(cf, bf, cdiv(N * C, cf) * cdiv(p_out, bf), cdiv(p_out, bf), 4),
        dgrad=(cd, bd, cdiv(N * C, cd) * cdiv(p_in, bd), cdiv(p_in, bd), 4),
        wgrad=(cw, bw, nb, iters, n_chunks, cdiv(C, cw) * n_chunks, max(1, bw // 64)),
        finish=(next_pow2(ntap, 2), bg, cdiv(n_chunks, bg)),
    )


_empty = empty_buffer  # every kernel-written buffer (tests poison it with NaN)


def _span(t: torch.Tensor, dims=(2, 3, 4)) -> int:
    """Largest element offset inside one (n, c) plane of ``t``."""
    return sum((t.shape[d] - 1) * t.stride(d) for d in dims)


def plane_fits(t: torch.Tensor) -> bool:
    """Whether every (n, c) plane of the 5-D ``t`` is addressable with the kernels' int32 offsets."""
    return t.shape[2] * t.shape[3] * t.shape[4] < _I32 and _span(t) < _I32


def _check_plane(t: torch.Tensor, name: str) -> None:
    if not plane_fits(t):
        raise ValueError(f"depthwise_conv3d_triton: one (T, H, W) plane of {name} {tuple(t.shape)} with strides "
                         f"{t.stride()} spans 2^31 elements or more (plane offsets are int32)")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _forward(x: torch.Tensor, w2: torch.Tensor, g: _Geom) -> torch.Tensor:
    """x (N, C, T, H, W) strided, w2 (C, taps) contiguous → y (N, C, To, Ho, Wo) contiguous."""
    N, C, T, H, W = x.shape
    To, Ho, Wo = g.out_thw((T, H, W))
    y = _empty(N, C, To, Ho, Wo, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    bc, block, programs, chunks, warps = _plan((T, H, W), (To, Ho, Wo), N, C, w2.shape[1], _gpu(x.device)).fwd
    launch(_pool_fwd_kernel, (programs,), x, w2, y, N * C, C, T, H, W, To, Ho, Wo, chunks, *x.stride(),
           **g.constexprs(), BC=bc, BLOCK=block, num_warps=warps)
    return y


def _dgrad(dy: torch.Tensor, w2: torch.Tensor, g: _Geom, in_thw: tuple) -> torch.Tensor:
    """dy (N, C, To, Ho, Wo) strided → dx (N, C, T, H, W) contiguous in dy's dtype."""
    N, C, To, Ho, Wo = dy.shape
    T, H, W = in_thw
    dx = _empty(N, C, T, H, W, dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    bc, block, programs, chunks, warps = _plan(tuple(in_thw), (To, Ho, Wo), N, C, w2.shape[1], _gpu(dy.device)).dgrad
    launch(_pool_dgrad_kernel, (programs,), dy, w2, dx, N * C, C, T, H, W, To, Ho, Wo, chunks, *dy.stride(),
           **g.constexprs(), BC=bc, BLOCK=block, num_warps=warps)
    return dx


def _wgrad(x: torch.Tensor, dy: torch.Tensor, g: _Geom, w_dtype: torch.dtype) -> torch.Tensor:
    """x, dy strided → dw (C, 1, kt, kh, kw) in ``w_dtype``: fp32 partials per (channel, chunk),
    then a fixed-order sum (deterministic, no atomics)."""
    N, C, T, H, W = x.shape
    To, Ho, Wo = dy.shape[2:]
    ntap = g.kernel[0] * g.kernel[1] * g.kernel[2]
    dw = _empty(C, 1, *g.kernel, dtype=w_dtype, device=x.device)
    if N == 0:
        return dw.zero_()
    plan = _plan((T, H, W), (To, Ho, Wo), N, C, ntap, _gpu(x.device))
    bc, block, nb, iters, chunks, programs, warps = plan.wgrad
    parts = _empty(C, chunks, ntap, dtype=torch.float32, device=x.device)
    launch(_pool_wgrad_kernel, (programs,), x, dy, parts, N, C, T, H, W, To, Ho, Wo, nb, chunks,
           *x.stride(), *dy.stride(), **g.constexprs(), BC=bc, BLOCK=block, ITERS=iters, num_warps=warps)
    tp, bg, g_iters = plan.finish
    launch(_pool_wgrad_finish_kernel, (C,), parts, dw, chunks, NTAP=ntap, TP=tp, BG=bg, G_ITERS=g_iters,
           num_warps=4)
    return dw


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class _DepthwiseConv3dFn(torch.autograd.Function):
    """y = conv3d(x, weight, None, stride, padding, groups=C) with Triton kernels both ways."""

    @staticmethod
    def forward(ctx, x, weight, g):
        w2 = weight.detach().reshape(weight.shape[0], -1).contiguous()  # (C, taps): a view when contiguous
        y = _forward(x, w2, g)
        ctx.save_for_backward(x, weight)
        ctx.g = g
        return y

    @staticmethod
    @first_order_only("depthwise_conv3d (backend triton)")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        g = ctx.g
        if dy.dtype != x.dtype:  # autograd hands the output's dtype; kept for safety
            dy = dy.to(x.dtype)
        if not plane_fits(dy):  # a gradient strided wider than x (forward accepted x): compact it
            dy = dy.contiguous()
        dx = dw = None
        with tensor_device(dy):
            if ctx.needs_input_grad[0]:
                dx = _dgrad(dy, weight.reshape(weight.shape[0], -1).contiguous(), g, tuple(x.shape[2:]))
            if ctx.needs_input_grad[1]:
                dw = _wgrad(x, dy, g, weight.dtype)
        return dx, dw, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def depthwise_conv3d_triton(x: torch.Tensor, weight: torch.Tensor, stride: IntOr3 = 1, padding: IntOr3 = 0) -> torch.Tensor:
    """``F.conv3d(x, weight, None, stride, padding, 1, C)`` with the Triton kernels (module docstring).

    x (N, C, T, H, W) fp32/fp16/bf16, any strides; weight (C, 1, kt, kh, kw) of x's dtype and
    device. Returns (N, C, To, Ho, Wo) contiguous in x's dtype. Differentiable in x and the weight
    (fp32 accumulation; the weight gradient is deterministic)."""
    kernel, st, pad = check_inputs(x, weight, stride, padding)
    if x.dtype not in DTYPES:
        raise ValueError(f"depthwise_conv3d_triton supports float16, bfloat16 and float32; got {x.dtype}")
    require_launchable(x, "depthwise_conv3d_triton", "backend='torch'")
    _check_plane(x, "x")
    g = _Geom(kernel, st, pad)
    with tensor_device(x):  # Triton launches on the current device
        return _DepthwiseConv3dFn.apply(x, weight, g)
