"""Tests of kernels.hog: reference semantics, Triton kernel parity with the float64 oracle.

On CPU the Triton kernel runs in the interpreter (tests/conftest.py), so interpreted shapes stay
small; the real training shapes and bf16 are GPU-marked (run by bench/gpu_check).

Oracle: ``hog_targets_reference(..., dtype=torch.float64)``. On integer-valued inputs gradients are
exact, so bins must match exactly; a single flipped bin moves a normalised value by ~0.1, far above
the tolerances used here (fp32 rounding of the sums only).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels.hog import (
    cells_to_tokens,
    hog_reference,
    hog_targets,
    hog_targets_reference,
    hog_targets_triton,
    tokens_to_cells,
    video_hog_targets,
)
from kernels.hog.reference import block_l2hys
from kernels.hog.triton_hog import SWEEP_CONFIGS, VARIANTS, _bin_ptx, boundary_directions, choose_tile

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def rand_frames(n: int, h: int, w: int, dtype=torch.uint8, seed: int = 0, high: int = 256) -> torch.Tensor:
    """Integer-valued frames (N, 3, H, W) in [0, high) of the given dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, 3, h, w), generator=g).to(dtype)


def assert_targets_close(got: torch.Tensor, want: torch.Tensor, norm: str = "cell_l2") -> None:
    """fp32 kernel vs float64 oracle: only summation rounding is allowed (no bin flips)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = want.abs().max().item() if norm == "none" else 1.0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * max(scale, 1e-30))


def run_triton(frames: torch.Tensor, token_stride: int, variant: str = "cells", **opts) -> torch.Tensor:
    """The default kernel through the public API; the other variants through the launcher."""
    if variant == "cells":
        return hog_targets(frames, token_stride, backend="triton", **opts)
    return hog_targets_triton(frames.unsqueeze(1), token_stride, variant=variant, **opts)


# --------------------------------------------------------------------------------------------
# Reference semantics (independent of the kernel)
# --------------------------------------------------------------------------------------------


def test_reference_edges_follow_official_orientation():
    """gx = left - right, gy = top - bottom, angle atan2(gx, gy): vertical edge -> bin 4, horizontal -> bin 0."""
    x = torch.zeros(1, 3, 16, 16)
    x[..., :, 8:] = 10.0  # vertical edge between columns 7 and 8: gx = -40 there, gy = 0
    hist = hog_reference(x, cell=8, norm="none", dtype=torch.float64)  # (1, 3, 9, 2, 2)
    # columns 7 and 8: gx = -40; atan2(-40, 0) = -pi/2 -> -4.5 -> floor -5 -> mod 9 = 4;
    # one column of 8 pixels of magnitude 40 per cell (reflect padding adds no edge at the borders)
    assert torch.equal(hist[0, :, 4], torch.full((3, 2, 2), 8 * 40.0, dtype=torch.float64))
    assert hist.sum().item() == 3 * 4 * 8 * 40
    y = x.transpose(2, 3).contiguous()  # horizontal edge: gx = 0, gy = -40 -> atan2(0, -40) = pi -> bin 0
    hist = hog_reference(y, cell=8, norm="none", dtype=torch.float64)
    assert hist[:, :, 0].sum().item() == hist.sum().item() == 3 * 4 * 8 * 40


def test_reference_signed_and_layout():
    x = torch.zeros(1, 3, 16, 16)
    x[..., :, 8:] = 10.0
    hist = hog_reference(x, cell=8, nbins=18, signed=True, norm="none", dtype=torch.float64)
    # signed: atan2(-40, 0) = -pi/2 -> -4.5 -> floor -5 -> mod 18 = 13
    assert hist[:, :, 13].sum().item() == hist.sum().item()
    # token layout: index ((c*nbins + bin)*s + cy)*s + cx, tokens in raster order
    g = torch.Generator().manual_seed(1)
    hist = torch.rand(2, 3, 5, 6, 4, generator=g, dtype=torch.float64)  # (N, 3, nbins, Hc, Wc)
    tok = cells_to_tokens(hist, token_stride=16, cell=8)  # s = 2: (2, 3*2, 3*5*4)
    assert tok.shape == (2, 6, 60)
    for n, c, b, yc, xc in [(0, 0, 0, 0, 0), (1, 2, 4, 5, 3), (0, 1, 3, 2, 1), (1, 0, 2, 3, 2)]:
        t, cy, cx = (yc // 2) * 2 + xc // 2, yc % 2, xc % 2
        assert tok[n, t, ((c * 5 + b) * 2 + cy) * 2 + cx] == hist[n, c, b, yc, xc]
    assert torch.equal(tokens_to_cells(tok, (3, 2), 5, 2), hist)


def test_reference_cell_l2_is_f_normalize_and_gaussian_window_sums_to_one():
    x = rand_frames(1, 32, 32, torch.float64)
    raw = hog_reference(x, norm="none", dtype=torch.float64)
    l2 = hog_reference(x, norm="cell_l2", dtype=torch.float64)
    torch.testing.assert_close(l2, raw / raw.norm(dim=2, keepdim=True).clamp_min(1e-12))
    win = hog_reference(x, gaussian_window=16, norm="none", dtype=torch.float64)
    assert win.sum() < raw.sum() / 100  # magnitudes multiplied by a window that sums to 1 per 16x16
    from kernels.hog.reference import gaussian_window_1d, gaussian_window_2d

    w1 = gaussian_window_1d(16)
    torch.testing.assert_close(torch.outer(w1, w1), gaussian_window_2d(16, torch.float64))
    assert abs(gaussian_window_2d(16, torch.float64).sum().item() - 1.0) < 1e-12


def test_block_l2hys_matches_naive_definition():
    g = torch.Generator().manual_seed(2)
    hist = torch.rand(1, 3, 4, 3, 4, generator=g, dtype=torch.float64) ** 4  # peaky, so clipping acts
    got = block_l2hys(hist)
    n, c, nb, hc, wc = hist.shape
    want = torch.zeros_like(hist)
    for ch in range(c):
        for i in range(hc):
            for j in range(wc):
                parts = []
                for bi in (i - 1, i):
                    for bj in (j - 1, j):
                        if 0 <= bi < hc - 1 and 0 <= bj < wc - 1:
                            blk = hist[0, ch, :, bi : bi + 2, bj : bj + 2]  # (nb, 2, 2)
                            v = blk / max(blk.norm().item(), 1e-12)
                            v = v.clamp(max=0.2)
                            v = v / max(v.norm().item(), 1e-12)
                            parts.append(v[:, i - bi, j - bj])
                want[0, ch, :, i, j] = torch.stack(parts).mean(0)
    assert (want == 0.2).sum() == 0 and (hist / hist.norm() > 0.2).any()
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Orientation binning without atan2: exhaustive over the uint8 gradient range
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbins,signed", [(9, False), (8, False), (12, False), (9, True), (8, True)])
def test_binning_without_atan2_is_exact_on_integer_gradients(nbins, signed):
    """Emulates the kernel's fold + cross-product tests (fp32, with and without FMA) for every
    integer pair |gx|, |gy| <= 1020 and compares with float64 floor(atan2 * nbins / period) mod nbins."""
    r = torch.arange(-1020, 1021, dtype=torch.float64)
    gx, gy = torch.meshgrid(r, r, indexing="ij")
    gx, gy = gx.flatten(), gy.flatten()
    keep = (gx != 0) | (gy != 0)  # zero gradients have zero magnitude: their bin does not matter
    gx, gy = gx[keep], gy[keep]
    period = 2 * math.pi if signed else math.pi
    want = torch.remainder(torch.floor(torch.atan2(gx, gy) / period * nbins), nbins).long()

    tab = boundary_directions(nbins, signed)
    fx32, fy32 = gx.float(), gy.float()
    lower = (fx32 < 0) | ((fx32 == 0) & (fy32 < 0))
    fx, fy = torch.where(lower, -fx32, fx32), torch.where(lower, -fy32, fy32)
    for fma in (False, True):
        got = torch.zeros_like(want)
        for k in range(1, nbins):
            cos_k, sin_k = tab[k, 0], tab[k, 1]
            if fma:  # fma(fx, cos, -(fy*sin)): exact product, one rounding (float64 holds it exactly)
                cross = (fx.double() * cos_k.double() - (fy * sin_k).double()).float()
            else:
                cross = fx * cos_k - fy * sin_k
            ge = cross >= 0
            if signed:
                ge = (lower | ge) if 2 * k < nbins else (lower & ge)
            got += ge.long()
        mism = (got != want).nonzero()
        assert mism.numel() == 0, f"fma={fma}: first mismatches (gx, gy) {[(gx[i].item(), gy[i].item()) for i in mism[:5, 0]]}"


def _run_bin_ptx(ptx: str, n: int, fx: np.ndarray, fy: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """A tiny interpreter for the PTX instructions ``_bin_ptx`` emits (fp32; fma through float64,
    exact for these operands): returns the (n, P) bin accumulators after one pixel each."""
    regs = {f"${i}": np.zeros_like(fx) for i in range(n)}
    regs.update({f"${n}": fx, f"${n + 1}": fy, f"${n + 2}": mag})
    preds: dict = {}

    def val(tok: str) -> np.ndarray:
        if tok.startswith("0f"):
            return np.frombuffer(bytes.fromhex(tok[2:])[::-1], dtype=np.float32)[0]
        return regs[tok]

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        guard = None
        if line.startswith("@"):
            guard, line = line[1:].split(" ", 1)
        op, rest = line.split(" ", 1)
        args = [a.strip() for a in rest.split(",")]
        if op == "mul.rn.f32":
            regs[args[0]] = (val(args[1]) * val(args[2])).astype(np.float32)
        elif op == "fma.rn.f32":
            exact = val(args[1]).astype(np.float64) * np.float64(val(args[2])) + val(args[3]).astype(np.float64)
            regs[args[0]] = exact.astype(np.float32)
        elif op in ("setp.ge.f32", "setp.ge.and.f32"):
            p, q = args[0].split("|")
            ge = val(args[1]) >= val(args[2])
            c = preds[args[3]] if op == "setp.ge.and.f32" else True
            preds[p], preds[q] = ge & c, ~ge & c
        elif op == "add.f32":
            assert guard is not None and args[0] == args[1]
            regs[args[0]] = np.where(preds[guard], regs[args[1]] + val(args[2]), regs[args[1]]).astype(np.float32)
        else:
            raise AssertionError(f"unexpected PTX instruction {op!r}")
    return np.stack([regs[f"${i}"] for i in range(n)])


@pytest.mark.parametrize("nbins", [9, 8, 4, 12])
def test_cells_ptx_binning_is_the_same_rule(nbins):
    """The inline PTX of variant "cells-ptx" (GPU only), run through a small interpreter on every
    integer gradient pair |gx|, |gy| <= 300 after the kernel's fold: each pixel lands in exactly
    the float64 ``floor(atan2 * nbins / pi)`` bin, with its magnitude."""
    ptx, constraints = _bin_ptx(nbins)
    assert constraints.count("=f") == nbins and constraints.endswith(str(nbins - 1))
    r = np.arange(-300, 301, dtype=np.float64)
    gx, gy = (a.ravel() for a in np.meshgrid(r, r, indexing="ij"))
    keep = (gx != 0) | (gy != 0)
    gx, gy = gx[keep], gy[keep]
    want = np.mod(np.floor(np.arctan2(gx, gy) / math.pi * nbins), nbins).astype(int)
    lower = (gx < 0) | ((gx == 0) & (gy < 0))
    fx, fy = np.where(lower, -gx, gx).astype(np.float32), np.where(lower, -gy, gy).astype(np.float32)
    mag = np.arange(1, fx.size + 1, dtype=np.float32)  # distinct, exact: shows which bin got which pixel
    acc = _run_bin_ptx(ptx, nbins, fx, fy, mag)  # (nbins, P)
    assert np.array_equal((acc != 0).sum(0), np.ones(fx.size, dtype=int))  # exactly one bin per pixel
    assert np.array_equal(acc.argmax(0), want)
    assert np.array_equal(acc.max(0), mag)


# --------------------------------------------------------------------------------------------
# Triton kernel (interpreted on CPU) vs float64 oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,h,w,ts,variant",
    [
        (1, 8, 8, 8, "cells"), (3, 16, 24, 8, "cells"), (2, 96, 160, 16, "cells"), (1, 224, 224, 16, "cells"),
        (1, 232, 232, 8, "cells"), (1, 8, 8, 8, "tile"), (3, 16, 24, 8, "tile"), (1, 32, 232, 8, "tile"),
    ],
    ids=["8x8", "N3-16x24", "N2-96x160", "224", "232-ts8", "tile-8x8", "tile-N3-16x24", "tile-32x232-ts8"],
)  # fmt: skip
def test_triton_matches_oracle_sizes(n, h, w, ts, variant):
    x = rand_frames(n, h, w, seed=h + w)
    assert_targets_close(run_triton(x, ts, variant), hog_targets_reference(x, ts, dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_triton_matches_oracle_dtypes(dtype, variant):
    x = rand_frames(2, 16, 48, dtype, seed=3)
    assert_targets_close(run_triton(x, 16, variant), hog_targets_reference(x, 16, dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("high", [2, 3])
@pytest.mark.parametrize("nbins,signed", [(9, False), (8, False), (4, True), (8, True)])
def test_triton_bin_edges_on_boundary_heavy_inputs(high, nbins, signed, variant):
    """Pixels in {0, 1(, 2)}: many gradients lie exactly on 0, 45, 90, 135 degrees (the atan2 wrap)."""
    x = rand_frames(1, 16, 32, seed=high * 100 + nbins, high=high)
    opts = dict(nbins=nbins, signed=signed, norm="none")
    want = hog_targets_reference(x, 16, dtype=torch.float64, **opts)
    assert_targets_close(run_triton(x, 16, variant, **opts), want, "none")


OPTIONS = [
    dict(nbins=4),
    dict(nbins=12, norm="none"),
    dict(nbins=18, signed=True),
    dict(nbins=7, signed=True, norm="none"),
    dict(cell=4),
    dict(cell=16, nbins=6),
    dict(gaussian_window=16),
    dict(gaussian_window=8, norm="none"),
    dict(gaussian_window=32, cell=4, norm="block_l2hys"),
    dict(norm="none"),
    dict(norm="block_l2hys"),
    dict(norm="block_l2hys", signed=True, nbins=8),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_triton_matches_oracle_options(opts, variant):
    ts = 32 if opts.get("cell") == 16 else 16
    x = rand_frames(1, 64, 32, seed=len(str(opts)))
    want = hog_targets_reference(x, ts, dtype=torch.float64, **opts)
    assert_targets_close(run_triton(x, ts, variant, **opts), want, opts.get("norm", "cell_l2"))


@pytest.mark.parametrize("block_px,max_ch,num_warps", [(2048, 1, None), (256, 1, 2), (512, 32, 2)])
def test_triton_tile_configs(block_px, max_ch, num_warps):
    """GPU-default tiling (one cell row per program) and others, in the interpreter."""
    x = rand_frames(2, 16, 96, seed=block_px)
    got = hog_targets_triton(x.unsqueeze(1), 8, variant="tile", block_px=block_px, max_ch=max_ch, num_warps=num_warps)
    assert_targets_close(got, hog_targets_reference(x, 8, dtype=torch.float64))


def test_triton_token_stride_not_power_of_two_cells():
    """s = token_stride / cell = 3 (tokens of 24 px over 8-px cells)."""
    x = rand_frames(2, 48, 72, seed=5)
    assert_targets_close(run_triton(x, 24), hog_targets_reference(x, 24, dtype=torch.float64))


def test_triton_strided_inputs_without_copy():
    g = torch.Generator().manual_seed(6)
    clip = torch.randint(0, 256, (2, 3, 5, 32, 48), generator=g).to(torch.uint8)  # (B, C, T, H, W)
    frames = clip[:, :, ::2].transpose(1, 2).reshape(-1, 3, 32, 48)  # (B*3, 3, H, W) copy, for the oracle
    want = hog_targets_reference(frames, 16, dtype=torch.float64).reshape(2, 3 * 6, 108)
    assert_targets_close(video_hog_targets(clip, 2, 16, backend="triton"), want)
    assert_targets_close(video_hog_targets(clip, 2, 16, backend="reference"), want)

    x = rand_frames(2, 32, 48, torch.float16, seed=7)
    cl = x.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    big = rand_frames(2, 64, 80, torch.float32, seed=8)
    crop = big[:, :, 8:40, 16:64]  # storage offset and row stride 80
    for variant in VARIANTS:
        assert_targets_close(run_triton(cl, 16, variant), hog_targets_reference(x, 16, dtype=torch.float64))
        want = hog_targets_reference(crop.contiguous(), 16, dtype=torch.float64)
        assert_targets_close(run_triton(crop, 16, variant), want)


def test_triton_offsets_inside_a_frame_past_2_31():
    """A channel-first clip of over 2**30 pixels per channel (518 frames of 1080p) viewed as frames:
    the channel offset 2 * stride_c passed 2**31 in 32-bit arithmetic and the kernels read out of
    bounds (the interpreter crashed; a GPU reads wrong pixels or faults). Offsets inside a frame are
    now 64-bit when they can reach 2**31 (``wide_offsets``). The 2 GiB buffer is never written but
    for the 3 x 16 x 16 pixels read, so only those pages are ever allocated."""
    from kernels.hog.triton_hog import wide_offsets

    h = w = 16
    sxc = 2**30 + 256
    store = torch.empty(2 * sxc + h * w, dtype=torch.uint8)
    x = rand_frames(1, h, w, seed=9)
    for c in range(3):
        store[c * sxc : c * sxc + h * w] = x[0, c].flatten()
    frames = store.as_strided((1, 1, 3, h, w), (3 * sxc, 3 * sxc, sxc, w, 1))
    assert wide_offsets(frames) and not wide_offsets(x.unsqueeze(1))
    want = hog_targets_reference(x, 16, dtype=torch.float64)
    for variant in VARIANTS:
        assert_targets_close(hog_targets_triton(frames, 16, variant=variant), want)


def test_triton_poisoned_output_is_fully_written():
    """NaN-filled out: every element must be overwritten, and nothing past the valid cells (29x29
    cells pad the last tiles; 2 x 5 x 29 = 290 cells end inside a 32-cell program)."""
    x = rand_frames(2, 232, 232, seed=9)[:, :, :40, :232]  # (2, 3, 40, 232): 5 x 29 cells
    want = hog_targets_reference(x, 8, dtype=torch.float64)
    assert choose_tile(5, 29, 8, 4096)[1] > 1  # tiles padded in W
    out = torch.full((2, 5 * 29, 27), float("nan"))
    assert hog_targets_triton(x.unsqueeze(1), 8, out=out, variant="tile") is out
    assert_targets_close(out, want)
    for num_warps in (1, 2):  # one cell per thread: 32 or 64 cells per program, the last one partial
        big = torch.full((2 * 5 * 29 * 27 + 64,), float("nan"))  # a guard zone after out
        out = big[: 2 * 5 * 29 * 27].view(2, 5 * 29, 27)
        assert hog_targets_triton(x.unsqueeze(1), 8, out=out, variant="cells", num_warps=num_warps) is out
        assert_targets_close(out, want)
        assert big[out.numel() :].isnan().all()
    out2 = torch.full((1, 4, 108), float("nan"))
    hog_targets_triton(rand_frames(1, 32, 32, seed=10).unsqueeze(1), 16, norm="block_l2hys", out=out2)
    assert torch.isfinite(out2).all()


# --------------------------------------------------------------------------------------------
# Natural images and the mean/std invariance
# --------------------------------------------------------------------------------------------


def natural_frames(h: int = 96, w: int = 128) -> torch.Tensor:
    """Crops of skimage's astronaut, chelsea and coffee: (3, 3, H, W) uint8."""
    data = pytest.importorskip("skimage.data")
    imgs = [data.astronaut()[100 : 100 + h, 150 : 150 + w], data.chelsea()[50 : 50 + h, 150 : 150 + w], data.coffee()[100 : 100 + h, 200 : 200 + w]]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x.double() - mean) / std).to(dtype)


def test_natural_images_statistically():
    """Normalised fp32 natural images: gradients are no longer exact, so pixels near a bin edge (most
    often axis-aligned ones at the atan2 wrap, frequent in flat regions) may change bin. The kernel's
    distance to the float64 oracle must stay within about twice that of the official fp32 reference."""
    x = normalise(natural_frames())
    want = hog_targets_reference(x, 16, dtype=torch.float64)
    err = (run_triton(x, 16).double() - want).abs()
    ref_err = (hog_targets_reference(x, 16).double() - want).abs()  # the fp32 reference's own error
    assert torch.isfinite(err).all()
    assert err.mean() < 2 * ref_err.mean() + 1e-5, (err.mean(), ref_err.mean())
    assert (err > 1e-3).float().mean() < 2 * (ref_err > 1e-3).float().mean() + 1e-3
    assert err.max() < 0.5


@pytest.mark.parametrize("variant", VARIANTS)
def test_flat_regions_are_zero_targets_on_every_backend(variant):
    """A flat region (letterbox bars, a plain background) has no gradient: its target is 0 in the
    fp32 reference as in the kernels. The official ``F.conv2d`` Sobel left a rounding residue on
    flat normalised frames for 144 of the 256 grey levels (this CPU), which the cell L2 made a unit
    vector in an arbitrary bin: CPU and GPU training had different targets there."""
    from kernels.hog.reference import sobel

    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, 3, 16, 16)
    flat = normalise(levels)
    assert hog_targets_reference(flat, 16).abs().max() == 0
    assert run_triton(flat, 16, variant).abs().max() == 0
    # and a letterboxed natural frame: its bars' cells are 0, the picture's are not
    nat = natural_frames(96, 128)[:1].clone()
    nat[..., :32, :] = 16
    x = normalise(nat)
    for got in (hog_targets_reference(x, 16), run_triton(x, 16, variant)):
        rows = got.view(1, 6, 8, -1)
        assert rows[:, :1].abs().max() == 0 and (rows[:, 3:].norm(dim=-1) > 0.5).all()
    # the sums are the official convolution's, in exact arithmetic
    p = torch.nn.functional.pad(rand_frames(2, 16, 24, torch.float64, seed=5), (1, 1, 1, 1), mode="reflect")
    wx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=torch.float64).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    gx, gy = sobel(p)
    assert torch.equal(gx, torch.nn.functional.conv2d(p, wx, groups=3))
    assert torch.equal(gy, torch.nn.functional.conv2d(p, wx.transpose(2, 3), groups=3))


def test_mean_std_normalisation_does_not_change_targets():
    x = rand_frames(2, 32, 48, torch.float64, seed=11)
    base = hog_targets_reference(x, 16, dtype=torch.float64)
    # exact affine map (integer mean, power-of-two std): all float64 gradients exact -> identical bins
    exact = (x - torch.tensor([3.0, 100.0, 250.0]).view(1, 3, 1, 1)) / torch.tensor([4.0, 64.0, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(hog_targets_reference(exact, 16, dtype=torch.float64), base, rtol=1e-12, atol=1e-12)
    # ImageNet mean/std on natural images: 8-bit images have many exactly horizontal gradients
    # (gx == 0); after normalisation gx is a rounding residue of either sign and those pixels wrap
    # between bin 0 and bin nbins-1 (DESIGN §3.1 pitfall). Measured here: mean |diff| ~1e-3, ~0.5%
    # of values move by > 0.05, every token keeps cosine similarity > 0.99.
    nat = natural_frames()
    pairs = {
        "float64 reference": (
            hog_targets_reference(nat, 16, dtype=torch.float64),
            hog_targets_reference(normalise(nat, torch.float64), 16, dtype=torch.float64),
        ),
        "triton uint8 vs normalised fp32": (run_triton(nat, 16).double(), run_triton(normalise(nat), 16).double()),
    }
    for name, (a, b) in pairs.items():
        err = (a - b).abs()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert err.mean() < 3e-3, name
        assert (err > 0.05).float().mean() < 0.02, name
        assert cos.min() > 0.99, name


# --------------------------------------------------------------------------------------------
# API and errors
# --------------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_is_reference_and_shapes(monkeypatch):
    import kernels.hog as H

    def no_triton(*a, **k):
        raise AssertionError("backend='auto' on a CPU tensor took the Triton kernel")

    monkeypatch.setattr(H, "hog_targets_triton", no_triton)  # (the values alone would match the interpreter's)
    x = rand_frames(2, 32, 48, seed=12)
    got = hog_targets(x)
    assert got.shape == (2, 6, 108) and got.dtype == torch.float32
    torch.testing.assert_close(got, hog_targets_reference(x, 16))
    clip = torch.randint(0, 256, (2, 3, 4, 16, 16), dtype=torch.uint8)
    assert video_hog_targets(clip).shape == (2, 2 * 1, 108)
    assert video_hog_targets(clip, temporal_stride=1, token_stride=8, nbins=6).shape == (2, 4 * 4, 3 * 6)
    y = x.float().requires_grad_()
    assert not hog_targets(y, backend="reference").requires_grad  # targets, as the Triton kernel's


def test_reference_under_cpu_autocast_is_fp32_and_unchanged():
    """Regression: under torch.autocast F.conv2d ran in bf16 although the reference converts
    frames to fp32, so scatter_add_ of bf16 magnitudes into the fp32 histogram raised
    "scatter(): Expected self.dtype to be equal to src.dtype" (and the Sobel would have been
    bf16). The reference now runs with autocast disabled: same fp32 targets as without it."""
    x = rand_frames(2, 32, 48, seed=13)
    clip = torch.randint(0, 256, (1, 3, 4, 32, 32), dtype=torch.uint8)
    opts = dict(norm="block_l2hys", signed=True, gaussian_window=16)
    want = [hog_targets(x), hog_targets(x.float()), hog_targets(x, **opts), video_hog_targets(clip)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [hog_targets(x), hog_targets(x.float()), hog_targets(x, **opts), video_hog_targets(clip)]
        assert torch.is_autocast_enabled("cpu")  # restored after the reference
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((1, 3, 30, 32), {}, "multiples of cell"),
        ((1, 3, 24, 32), {}, "multiples of token_stride"),
        ((1, 4, 32, 32), {}, "3 \\(RGB\\) channels"),
        ((3, 32, 32), {}, "shape \\(N, 3, H, W\\)"),
        ((1, 3, 32, 32), {"norm": "l2"}, "norm must be one of"),
        ((1, 3, 32, 32), {"token_stride": 12}, "multiple of cell"),
        ((1, 3, 32, 32), {"backend": "cuda"}, "backend must be one of"),
        ((1, 3, 32, 48), {"gaussian_window": 32}, "multiples of gaussian_window"),
        ((1, 3, 32, 32), {"gaussian_window": 1}, "gaussian_window must be"),
        ((1, 3, 32, 32), {"nbins": 1}, "nbins must be"),
        ((1, 3, 8, 8), {"token_stride": 8, "norm": "block_l2hys"}, "at least 2x2 cells"),
        # a bool is not an int, and "no" is not False (they passed, then failed inside the kernels, or
        # computed signed HOG); one-pixel frames fail alike in both backends (the reference in torch)
        ((1, 3, 32, 32), {"cell": True, "token_stride": 2}, "cell must be a positive int"),
        ((1, 3, 32, 32), {"token_stride": True}, "token_stride must be"),
        ((1, 3, 32, 32), {"signed": "no"}, "signed must be True or False"),
        ((1, 3, 1, 4), {"cell": 1, "token_stride": 1}, "reflect padding needs H, W >= 2"),
    ],
)
def test_errors(shape, kwargs, match):
    x = torch.zeros(shape, dtype=torch.uint8)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=match):
            hog_targets(x, **{"backend": backend, **kwargs})


def test_cells_ptx_variant_refuses_the_interpreter():
    x = rand_frames(1, 16, 16)
    with pytest.raises(ValueError, match="cells-ptx"):
        hog_targets_triton(x.unsqueeze(1), 16, variant="cells-ptx")


def test_triton_specific_errors():
    x = torch.zeros(1, 3, 24, 24, dtype=torch.uint8)
    hog_targets(x, 12, cell=6, backend="reference")  # any cell works in the reference
    with pytest.raises(ValueError, match="power-of-two cell"):
        hog_targets(x, 12, cell=6, backend="triton")
    with pytest.raises(ValueError, match="triton HOG supports"):
        hog_targets(x.to(torch.int32), 8, backend="triton")
    with pytest.raises(ValueError, match="variant must be"):
        hog_targets_triton(x.unsqueeze(1), 8, variant="fast")
    with pytest.raises(ValueError, match="out must be"):
        hog_targets_triton(x.unsqueeze(1), 8, out=torch.empty(1, 9, 26))
    with pytest.raises(ValueError, match="clip \\(B, C, T, H, W\\)"):
        video_hog_targets(x)
    with pytest.raises(TypeError, match="unexpected keyword"):
        video_hog_targets(x.unsqueeze(2), bins=9)
    # a (B, T, C, H, W) clip is named as given (the message showed the (B*T', C, H, W) it built)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\), got shape \(1, 16, 3, 32, 32\); .*transpose\(1, 2\)"):
        video_hog_targets(torch.zeros(1, 16, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="temporal_stride must be a positive int, got True"):
        video_hog_targets(x.unsqueeze(2), temporal_stride=True)
    for opts, match in (({"num_warps": 3}, "num_warps must be a power of two >= 1"),
                        ({"variant": "tile", "max_ch": 0}, "max_ch must be an int >= 1"),
                        ({"variant": "tile", "block_px": 0}, "block_px must be an int >= 1")):
        with pytest.raises(ValueError, match=match):  # (a compile error / a TypeError in choose_tile)
            hog_targets_triton(x.unsqueeze(1), 8, **opts)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import kernels.hog.triton_hog as th

    monkeypatch.setattr(th, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        hog_targets(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), backend="triton")


# --------------------------------------------------------------------------------------------
# GPU (bench/gpu_check): bf16 and the real training shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size_matches_oracle(dtype):
    """64 x 3 x 224 x 224 (8 clips x 8 centre frames), integer-valued, every input dtype (tile variant: uint8, bf16)."""
    x = rand_frames(64, 224, 224, seed=13).cuda().to(dtype)  # integers <= 255 are exact in bf16
    want = hog_targets_reference(x, 16, dtype=torch.float64)
    assert_targets_close(hog_targets(x), want)  # auto -> triton, default variant
    if dtype in (torch.uint8, torch.bfloat16):  # the training dtypes (each variant compiles per dtype)
        assert_targets_close(hog_targets_triton(x.unsqueeze(1), 16, variant="tile"), want)


GPU_TILE_OPTIONS = [dict(nbins=18, signed=True), dict(cell=4), dict(gaussian_window=8, norm="none")]


@pytest.mark.gpu
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gpu_options_and_odd_sizes(opts):
    ts = 32 if opts.get("cell") == 16 else 16
    for n, h, w in [(3, 96, 160), (2, 224, 224), (1, 256, 96)]:
        x = rand_frames(n, h, w, torch.bfloat16, seed=h).cuda()
        want = hog_targets_reference(x, ts, dtype=torch.float64, **opts)
        assert_targets_close(hog_targets(x, ts, **opts), want, opts.get("norm", "cell_l2"))
        if opts in GPU_TILE_OPTIONS:  # a few option sets for the opt-in variant (compile time)
            got = hog_targets_triton(x.unsqueeze(1), ts, variant="tile", **opts)
            assert_targets_close(got, want, opts.get("norm", "cell_l2"))
    x = rand_frames(2, 232, 232, seed=14).cuda()
    assert_targets_close(hog_targets(x, 8), hog_targets_reference(x, 8, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("variant", ["auto", "tile"])
def test_gpu_frames_on_another_device(variant):
    """Frames on cuda:1 while cuda:0 is current: the kernel launches on cuda:1 (Triton uses the
    current device, triton-lang/triton#2441) and matches the oracle."""
    x = rand_frames(4, 96, 160, torch.bfloat16, seed=5).to("cuda:1")
    want = hog_targets_reference(x, 16, dtype=torch.float64)
    with torch.cuda.device(0):
        got = hog_targets_triton(x.unsqueeze(1), 16, variant=variant)
    assert got.device == x.device
    assert_targets_close(got, want)


@pytest.mark.gpu
def test_gpu_video_clip_strided_and_poisoned():
    g = torch.Generator().manual_seed(15)
    clip = torch.randint(0, 256, (8, 3, 16, 224, 224), generator=g).to(torch.uint8).cuda()
    clip = clip.to(torch.bfloat16).to(memory_format=torch.channels_last_3d)  # (B, C, T, H, W), C innermost
    frames = clip[:, :, ::2].transpose(1, 2).reshape(-1, 3, 224, 224)
    want = hog_targets_reference(frames, 16, dtype=torch.float64).reshape(8, 8 * 196, 108)
    assert_targets_close(video_hog_targets(clip), want)
    out = torch.full((64, 196, 108), float("nan"), device="cuda")
    hog_targets_triton(clip[:, :, ::2].transpose(1, 2), 16, out=out)
    assert_targets_close(out.view(8, 8 * 196, 108), want)


@pytest.mark.gpu
def test_gpu_natural_images_statistically():
    """As test_natural_images_statistically, at 224x224 and in fp32 and bf16."""
    x = normalise(natural_frames(224, 224)).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        want = hog_targets_reference(xd, 16, dtype=torch.float64)
        err = (hog_targets(xd).double() - want).abs()
        ref_err = (hog_targets_reference(xd, 16).double() - want).abs()
        assert err.mean() < 2 * ref_err.mean() + 1e-5, (dtype, err.mean(), ref_err.mean())
        assert (err > 1e-3).float().mean() < 2 * (ref_err > 1e-3).float().mean() + 1e-3
        assert err.max() < 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("variant,block_px,max_ch,num_warps", SWEEP_CONFIGS)
def test_gpu_tile_configs(variant, block_px, max_ch, num_warps):
    """Every configuration that bench/hog.py --sweep times gives oracle-exact targets."""
    cfg = dict(variant=variant, block_px=block_px, max_ch=max_ch, num_warps=num_warps)
    x = rand_frames(8, 224, 224, seed=16).cuda()
    want = hog_targets_reference(x, 16, dtype=torch.float64)
    assert_targets_close(hog_targets_triton(x.unsqueeze(1), 16, **cfg), want)


def test_auto_dispatch_by_vendor_and_dtype(monkeypatch):
    """``auto`` sent every CUDA tensor to Triton: on ROCm its default variant (inline NVIDIA PTX) made
    LLVM abort the process, and float64 or integer frames, which the reference takes on the CPU,
    were refused on the GPU. A stand-in tensor: only ``is_cuda`` and ``dtype`` decide."""
    from types import SimpleNamespace as NS

    from kernels.hog import _resolve_backend

    for dtype in (torch.uint8, torch.float16, torch.bfloat16, torch.float32):
        assert _resolve_backend("auto", NS(is_cuda=True, dtype=dtype), 8) == "triton"
    for dtype in (torch.float64, torch.int16, torch.int32):
        assert _resolve_backend("auto", NS(is_cuda=True, dtype=dtype), 8) == "reference"
    assert _resolve_backend("auto", NS(is_cuda=False, dtype=torch.float32), 8) == "reference"
    for cell in (3, 6, 12):  # the kernel refuses a cell that is no power of two; the reference takes it
        assert _resolve_backend("auto", NS(is_cuda=True, dtype=torch.float32), cell) == "reference"
    assert _resolve_backend("auto", NS(is_cuda=True, dtype=torch.float32), 1) == "triton"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert _resolve_backend("auto", NS(is_cuda=True, dtype=torch.float32), 8) == "reference"
    assert _resolve_backend("triton", NS(is_cuda=True, dtype=torch.float32), 8) == "triton"  # still forced
    frames = torch.zeros(1, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="needs an NVIDIA CUDA device"):
        hog_targets_triton(frames, 16, variant="cells-ptx")
