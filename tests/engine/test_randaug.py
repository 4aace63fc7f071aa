"""Tests of engine/data/randaug.py (timm ``rand-m7-mstd0.5-inc1`` in DALI) on small CPU pipelines.

References are numpy transcriptions of timm's level -> parameter maps and of PIL's pixel formulas
(no PIL needed): the LUT and blend ops must match exactly, the affine ops to 1 level where the
source pixel lies inside the frame; the random structure (p=0.5 per op, uniform op choice with
replacement, level ~ clamp(N(m, mstd), 0, 10), one draw per clip) is checked statistically."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

import nvidia.dali.fn as fn  # noqa: E402
from nvidia.dali import pipeline_def  # noqa: E402

from engine.data.randaug import INC1_OPS, apply_op, timm_rand_augment  # noqa: E402

T, H, W = 2, 16, 20
LEVELS = np.array([0.0, 1.0, 3.3, 5.6, 7.0, 9.1, 10.0, 6.2], np.float32)
SIGNS = np.array([1, -1, 1, -1, 1, -1, -1, 1], np.float32)


def clips(batch: int, seed: int = 0, lo: int = 20, hi: int = 230, t: int = T) -> np.ndarray:
    """Random uint8 clips (B, T, H, W, 3); channel 0 gets a ramp so channel ranges differ."""
    rng = np.random.default_rng(seed)
    x = rng.integers(lo, hi, (batch, t, H, W, 3)).astype(np.int32)
    x[..., 0] = np.clip(x[..., 0] + np.arange(W) * 4 - 30, 0, 255)
    return x.astype(np.uint8)


def feeder(batch: np.ndarray):
    """External-source callback giving the same batch every iteration."""
    return lambda: list(batch)


def run(graph, feeds: list[np.ndarray], iters: int = 1, seed: int = 0, layouts=None) -> list[list[np.ndarray]]:
    """Build a CPU pipeline whose inputs are ``feeds`` (batch-major arrays, fed every iteration) and
    ``graph(*inputs) -> outputs``; returns per output the list of (B, ...) arrays per iteration."""
    batch = len(feeds[0])
    layouts = layouts or ["FHWC"] + [""] * (len(feeds) - 1)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=seed, enable_conditionals=True)
    def pipe():
        ins = [fn.external_source(source=feeder(a), batch=True, layout=lay) for a, lay in zip(feeds, layouts)]
        out = graph(*ins)
        return tuple(out) if isinstance(out, (list, tuple)) else out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        p = pipe()
        p.build()
        res = [p.run() for _ in range(iters)]
    return [[np.stack([np.asarray(t[i]) for i in range(batch)]) for t in [r[k] for r in res]]
            for k in range(len(res[0]))]


# ---- numpy references (timm's maps, PIL's formulas) ----

def grey(x: np.ndarray) -> np.ndarray:
    """PIL RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, keeps a channel axis."""
    return (x.astype(np.int64) @ np.array([19595, 38470, 7471]) + 32768)[..., None] >> 16


def blend(d, x: np.ndarray, f: np.float32) -> np.ndarray:
    """PIL Image.blend on uint8 in float32: trunc(d + f (x - d)) clipped to [0, 255]."""
    d = np.asarray(d, np.float32)
    v = d + np.float32(f) * (x.astype(np.float32) - d)
    return np.clip(np.floor(v), 0, 255).astype(np.uint8)


def factor(level: np.float32, sign: np.float32) -> np.float32:
    return np.float32(1.0) + np.float32(sign) * (np.float32(level) * np.float32(0.09))


def ref_op(name: str, clip: np.ndarray, level: float, sign: float) -> np.ndarray:
    """timm op ``name`` on a (T, H, W, 3) clip, frame by frame as SlowFast."""
    lv = float(level) / 10.0
    x = clip.astype(np.int64)
    if name == "Invert":
        return (255 - x).astype(np.uint8)
    if name == "PosterizeIncreasing":
        bits = 4 - int(lv * 4)
        return (x & (~(2 ** (8 - bits) - 1) & 0xFF)).astype(np.uint8)
    if name == "SolarizeIncreasing":
        thr = 256 - int(lv * 256)
        return np.where(x < thr, x, 255 - x).astype(np.uint8)
    if name == "SolarizeAdd":
        add = int(lv * 110)
        return np.where(x < 128, np.minimum(255, x + add), x).astype(np.uint8)
    if name == "AutoContrast":
        lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
        return np.where(hi > lo, (x - lo) * 255 // np.maximum(hi - lo, 1), x).astype(np.uint8)
    if name == "Equalize":  # DALI / OpenCV formula (documented difference from PIL)
        out = np.empty_like(clip)
        for t in range(clip.shape[0]):
            for c in range(3):
                ch = clip[t, :, :, c]
                h = np.bincount(ch.ravel(), minlength=256)
                cdf, cmin = np.cumsum(h), h[np.flatnonzero(h)[0]]
                lut = np.clip(np.round((cdf - cmin) * 255.0 / max(ch.size - cmin, 1)), 0, 255)
                out[t, :, :, c] = lut[ch]
        return out
    f = factor(level, sign)
    if name == "BrightnessIncreasing":
        return blend(0, clip, f)
    if name == "ColorIncreasing":
        return blend(grey(clip), clip, f)
    if name == "ContrastIncreasing":
        centre = np.floor(grey(clip).mean(axis=(1, 2, 3), keepdims=True) + 0.5)
        return blend(centre, clip, f)
    if name == "SharpnessIncreasing":
        k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
        s = sum(k[i, j] * x[:, i:H - 2 + i, j:W - 2 + j] for i in range(3) for j in range(3))
        degenerate = x.copy()
        degenerate[:, 1:-1, 1:-1] = np.floor(s / 13.0 + 0.5)
        return blend(degenerate, clip, f)
    raise KeyError(name)


def affine_matrix(name: str, level: float, sign: float) -> np.ndarray:
    """PIL's output->input affine matrix of the geometric timm op (timm's parameter maps)."""
    lv = float(level) / 10.0 * float(sign)
    if name == "Rotate":  # PIL Image.rotate(deg): about (W/2, H/2), matrix from -radians(deg)
        a = -math.radians(lv * 30.0)
        m = np.array([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]])
        cx, cy = W / 2.0, H / 2.0
        m[0, 2] = m[0, 0] * -cx + m[0, 1] * -cy + cx
        m[1, 2] = m[1, 0] * -cx + m[1, 1] * -cy + cy
        return m
    if name == "ShearX":
        return np.array([[1, lv * 0.3, 0], [0, 1, 0]])
    if name == "ShearY":
        return np.array([[1, 0, 0], [lv * 0.3, 1, 0]])
    if name == "TranslateXRel":
        return np.array([[1, 0, lv * 0.45 * W], [0, 1, 0]])
    if name == "TranslateYRel":
        return np.array([[1, 0, 0], [0, 1, lv * 0.45 * H]])
    raise KeyError(name)


def ref_warp(clip: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling at ``m @ (x + .5, y + .5, 1) - .5``: (values, source inside, source > 1 px out)."""
    yy, xx = np.mgrid[0:H, 0:W]
    sx = m[0, 0] * (xx + 0.5) + m[0, 1] * (yy + 0.5) + m[0, 2] - 0.5
    sy = m[1, 0] * (xx + 0.5) + m[1, 1] * (yy + 0.5) + m[1, 2] - 0.5
    inside = (sx >= 0) & (sx <= W - 1) & (sy >= 0) & (sy <= H - 1)
    x0 = np.clip(np.floor(sx).astype(int), 0, W - 2)
    y0 = np.clip(np.floor(sy).astype(int), 0, H - 2)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    c = clip.astype(np.float64)
    v = ((1 - fy) * ((1 - fx) * c[:, y0, x0] + fx * c[:, y0, x0 + 1])
         + fy * ((1 - fx) * c[:, y0 + 1, x0] + fx * c[:, y0 + 1, x0 + 1]))
    outside = (sx < -1) | (sx > W) | (sy < -1) | (sy > H)
    return v, inside, outside


EXACT_OPS = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
             "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_op_list_is_timm_inc1():
    assert set(EXACT_OPS + GEOMETRIC_OPS) == set(INC1_OPS) and len(INC1_OPS) == 15


def test_pixel_ops_match_timm_parameter_maps_exactly():
    x = clips(len(LEVELS))
    outs = run(lambda v, lv, sg: [apply_op(nm, v, lv, sg, shape=(H, W)) for nm in EXACT_OPS],
               [x, LEVELS, SIGNS])
    for nm, (got,) in zip(EXACT_OPS, outs):
        assert got.dtype == np.uint8 and got.shape == x.shape
        for b in range(len(LEVELS)):
            want = ref_op(nm, x[b], LEVELS[b], SIGNS[b])
            np.testing.assert_array_equal(got[b], want, err_msg=f"{nm} level={LEVELS[b]} sign={SIGNS[b]}")
    posterized = outs[EXACT_OPS.index("PosterizeIncreasing")][0]
    assert (posterized[LEVELS == 10.0] == 0).all()  # timm keeps 0 bits at level 10 (DALI's own clamps to 1)


def test_geometric_ops_match_pil_affine_maps():
    x = clips(len(LEVELS))
    outs = run(lambda v, lv, sg: [apply_op(nm, v, lv, sg, shape=(H, W)) for nm in GEOMETRIC_OPS],
               [x, LEVELS, SIGNS])
    for nm, (got,) in zip(GEOMETRIC_OPS, outs):
        for b in range(len(LEVELS)):
            want, inside, outside = ref_warp(x[b], affine_matrix(nm, LEVELS[b], SIGNS[b]))
            d = np.abs(got[b].astype(np.float64) - want)[:, inside]
            assert d.max() <= 1.0, (nm, LEVELS[b], SIGNS[b], d.max())
            assert (got[b][:, outside] == 128).all()  # fill value
            if LEVELS[b] > 1:
                assert outside.any() or nm == "Rotate"


def test_ops_keep_layout_for_clips_and_images():
    x = clips(2)
    lv, sg = LEVELS[4:6], SIGNS[4:6]
    for data, layout in ((x, "FHWC"), (x[:, 0], "HWC")):
        @pipeline_def(batch_size=2, num_threads=1, device_id=None, seed=0, enable_conditionals=True)
        def pipe():
            v = fn.external_source(source=lambda: list(data), batch=True, layout=layout)
            a = fn.external_source(source=lambda: list(lv), batch=True)
            s = fn.external_source(source=lambda: list(sg), batch=True)
            return tuple(apply_op(nm, v, a, s, shape=(H, W)) for nm in INC1_OPS) + (
                timm_rand_augment(v, n=2, m=7, mstd=0.5, shape=(H, W)),)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            p = pipe()
            p.build()
            out = p.run()
        for t in out:
            assert t.layout() == layout and np.asarray(t[0]).shape == data.shape[1:]


def test_per_op_probability_and_uniform_choice():
    """n=1, mstd=0: each output is the input (p=0.5) or exactly one op's output (1/15 each)."""
    batch, iters = 64, 16
    x = clips(batch, seed=1)
    (outs,) = run(lambda v: timm_rand_augment(v, n=1, m=7, mstd=0.0, shape=(H, W)), [x], iters=iters, seed=5)
    counts = {nm: 0 for nm in EXACT_OPS}
    counts["identity"] = counts["other"] = 0
    signs = {+1: 0, -1: 0}
    for got in outs:
        for b in range(batch):
            if np.array_equal(got[b], x[b]):
                counts["identity"] += 1
                continue
            hits = [(nm, s) for nm in EXACT_OPS for s in (1, -1)
                    if np.array_equal(got[b], ref_op(nm, x[b], 7.0, s))]
            names = {nm for nm, _ in hits}
            assert len(names) <= 1, names
            if not hits:
                counts["other"] += 1
            else:
                counts[hits[0][0]] += 1
                if hits[0][0] in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing"):
                    assert len(hits) == 1
                    signs[hits[0][1]] += 1
    total = batch * iters
    assert abs(counts["identity"] / total - 0.5) < 0.06, counts
    for nm in EXACT_OPS:  # expected total / 30 ~ 34, sd ~ 5.7
        assert 12 <= counts[nm] <= 60, (nm, counts)
    assert abs(counts["other"] / total - 0.5 * len(GEOMETRIC_OPS) / 15) < 0.05, counts
    assert min(signs.values()) > 0.3 * sum(signs.values()), signs


def test_two_layers_identity_fraction():
    """n=2: unchanged iff both layers skip (1/4) or both apply Invert (1/4 * 1/15^2)."""
    batch, iters = 64, 16
    x = clips(batch, seed=2)
    (outs,) = run(lambda v: timm_rand_augment(v, n=2, m=7, mstd=0.5, shape=(H, W)), [x], iters=iters, seed=9)
    same = np.mean([np.array_equal(o[b], x[b]) for o in outs for b in range(batch)])
    assert abs(same - (0.25 + 0.25 / 225)) < 0.05, same


def solarize_k(got: np.ndarray, ramp: np.ndarray) -> np.ndarray:
    """Recover timm's int(25.6 level) from a solarized 0..255 ramp clip: 256 - first inverted value."""
    inverted = got[:, 0, :, :, 0].reshape(len(got), 256) != ramp.ravel()  # (B, 256): value v inverted?
    first = np.where(inverted.any(1), inverted.argmax(1), 256)
    return 256 - first


def test_magnitude_is_gaussian_clamped_per_call():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = np.broadcast_to(ramp[None, :, :, None], (64, 2, 16, 16, 3)).copy()
    only = ("SolarizeIncreasing",)
    aug = (lambda m, s: lambda v: timm_rand_augment(v, n=1, m=m, mstd=s, shape=(16, 16), prob=1.0, ops=only))
    (g7,) = run(aug(7, 0.5), [x], iters=8, seed=3)
    (g0,) = run(aug(7, 0.0), [x], iters=1, seed=3)
    (g10,) = run(aug(10, 0.5), [x], iters=4, seed=3)
    k7 = np.concatenate([solarize_k(g, ramp) for g in g7])
    level = (k7 + 0.5) / 25.6
    assert abs(level.mean() - 7.0) < 0.1 and 0.4 < level.std() < 0.6, (level.mean(), level.std())
    assert len(np.unique(k7)) > 10
    assert (solarize_k(g0[0], ramp) == int(7.0 / 10 * 256)).all()
    k10 = np.concatenate([solarize_k(g, ramp) for g in g10])
    assert k10.max() == 256 and abs(np.mean(k10 == 256) - 0.5) < 0.15  # clamp at 10: half the draws


def test_one_draw_per_clip_and_seeded():
    x = clips(32, seed=3, t=4)
    x[:] = x[:, :1]  # static clips: every frame identical
    aug = lambda v: timm_rand_augment(v, n=2, m=7, mstd=0.5, shape=(H, W))  # noqa: E731
    (a,) = run(aug, [x], iters=2, seed=11)
    (b,) = run(aug, [x], iters=2, seed=11)
    (c,) = run(aug, [x], iters=1, seed=12)
    for got in a:
        assert (got == got[:, :1]).all()  # same ops and parameters for all frames of a clip
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kwargs", [dict(n=-1), dict(m=11), dict(mstd=-0.5), dict(prob=1.5),
                                    dict(shape=(16,)), dict(ops=("Nope",)), dict(ops=())])
def test_bad_arguments(kwargs):
    args = dict(n=2, m=7, mstd=0.5, shape=(H, W)) | kwargs
    with pytest.raises(ValueError):
        timm_rand_augment(None, **args)


@pytest.mark.gpu
def test_gpu_ops_match_the_cpu_ops():
    """Every op on DALI's GPU backend against the CPU one, with the same per-sample draws (the
    loader's path: CPU draws from the sampler, clips on the GPU). Run by bench/gpu_check."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run by bench/gpu_check)")
    n_ops = len(INC1_OPS)
    x = clips(n_ops, seed=3)  # (B, T, H, W, 3): sample b gets op b
    draws = np.zeros((n_ops, 2, 4), np.float32)
    draws[:, 0] = np.stack([np.arange(n_ops), np.ones(n_ops), np.full(n_ops, 7.3), np.tile([1.0, -1.0], 8)[:n_ops]], 1)
    draws[:, 1, 3] = 1.0  # the second layer is drawn but not applied
    outs = {}
    for device_id in (None, 0):
        @pipeline_def(batch_size=n_ops, num_threads=1, device_id=device_id, seed=0, enable_conditionals=True)
        def pipe():
            v = fn.external_source(source=feeder(x), batch=True, layout="FHWC")
            d = fn.external_source(source=feeder(draws), batch=True)
            if device_id is not None:
                v = v.gpu()
            return timm_rand_augment(v, n=2, m=7.0, mstd=0.5, shape=(H, W), draws=d)

        p = pipe()
        p.build()
        out = p.run()[0]
        out = out.as_cpu() if device_id is not None else out
        outs[device_id] = np.stack([np.asarray(out[i]) for i in range(n_ops)])
    diff = np.abs(outs[None].astype(np.int16) - outs[0].astype(np.int16)).reshape(n_ops, -1).max(1)
    assert (diff <= 1).all(), dict(zip(INC1_OPS, diff.tolist()))
