"""timm's RandAugment ``rand-m{M}-mstd{S}-inc1`` as a DALI graph (fine-tuning augmentation).

Semantics come from timm's ``timm/data/auto_augment.py`` as copied into SlowFast
(``slowfast/datasets/rand_augment.py``; the MaskFeat fine-tuning configs use
``AUG.AA_TYPE: rand-m7-mstd0.5-inc1``, i.e. n=2 layers, m=7, mstd=0.5, the "increasing" op list):

- ``n`` layers; each layer picks one op uniformly from the 15 ops of
  ``_RAND_INCREASING_TRANSFORMS`` (:data:`INC1_OPS`), independently per layer, i.e. *with*
  replacement (timm: ``np.random.choice(ops, n, replace=choice_weights is None)``, and ``rand-...``
  without ``w`` leaves ``choice_weights=None``);
- the picked op is applied with probability 0.5 (``AugmentOp(prob=0.5)``), else skipped;
- its level is ``gauss(m, mstd)`` clamped to [0, 10] (``mstd == 0``: exactly ``m``), drawn per op
  call, continuous (no magnitude bins); ops with a signed parameter negate it with probability 0.5;
- level -> parameter as timm's ``LEVEL_TO_ARG`` (``L = level / 10``):
  Rotate ``+-30 L`` degrees about the frame centre; ShearX/Y factor ``+-0.3 L``;
  TranslateX/YRel ``+-0.45 L`` of the frame width/height; PosterizeIncreasing keeps
  ``4 - int(4 L)`` bits (0 bits = black, as timm); SolarizeIncreasing inverts values
  ``>= 256 - int(256 L)``; SolarizeAdd adds ``int(110 L)`` to values < 128;
  Color/Contrast/Brightness/SharpnessIncreasing use the PIL ImageEnhance factor ``1 +- 0.9 L``;
  AutoContrast, Equalize, Invert take no parameter.
- One draw per sample: a ``(T, H, W, C)`` clip (DALI layout ``FHWC``) is one DALI sample, so every
  frame of a clip gets the same ops and parameters (SlowFast applies each ``AugmentOp`` call to
  the whole frame list).
  Per-frame statistics stay per frame as in PIL (AutoContrast/Equalize histograms, the Contrast
  mean).

Pixel maps follow PIL: AutoContrast ``floor((x - lo) * 255 / (hi - lo))`` per channel (integer
exact); Color/Contrast/Brightness/Sharpness blend a degenerate image ``d`` with the input as
``trunc(d + f (x - d))`` clipped to [0, 255] (PIL's ``Image.blend``), with PIL's grey
``(19595 R + 38470 G + 7471 B + 2^15) >> 16``, Contrast's centre ``int(mean(grey) + 0.5)`` per frame,
Sharpness's degenerate = PIL's SMOOTH 3x3 filter (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13) with the
one-pixel border left unfiltered. Geometric ops use PIL's affine matrices (output -> input, pixel
centres at +0.5) through ``fn.warp_affine``.

Measured against PIL 13 (the timm op functions applied frame by frame, bilinear resampling,
uint8 clips of 2x24x32): AutoContrast, Invert, Posterize, Solarize, SolarizeAdd, Color, Contrast,
Brightness and Sharpness are bit-identical; Rotate/Shear/Translate are within 1 level wherever the
source point lies inside the frame. Speed (this 2-core CPU, 2 DALI threads, 30 batches of 8 clips
of 16x224x224): 423 ms per batch vs 561 ms for DALI's ``auto_aug.rand_augment`` (n=2, bin 21/31).

Remaining differences from timm/SlowFast (known limits):
- Order: SlowFast runs RandAugment on the full decoded frames *before* RandomResizedCrop; here it
  runs after the crop + flip on ``crop_size``^2 frames (so translations are relative to the crop,
  and AutoContrast/Equalize/Contrast statistics are those of the crop).
- Interpolation of Rotate/Shear/Translate: bilinear (DALI's ``warp_affine`` has no cubic);
  SlowFast passes ``AUG.INTERPOLATION`` (default bicubic). DALI blends border samples with the fill
  value, PIL switches to the fill hard at the edge of the source; fill value 128 as SlowFast's
  (its ``aa_params`` set no ``img_mean``, so timm's ``_FILL`` = 128 is used).
- Equalize is DALI's ``fn.equalize`` (OpenCV's LUT ``round(255 (cdf - cdf_min) / (N - cdf_min))``
  per frame and channel); PIL uses ``(cdf_prev + step // 2) // step`` with
  ``step = (N - count(max value)) // 255``. Measured on 224x224 frames: within 2 levels for spread
  histograms, up to ~25 levels when many pixels sit at the channel maximum (PIL leaves that bin out
  of ``step``); on tiny frames (N/255 small) PIL's integer ``step`` saturates early and the maps
  differ by up to ~90 levels. DALI has no per-sample histogram op to do PIL's map cheaply.
- Float32 parameter arithmetic: ``int(...)`` thresholds and blend truncation may land on the other
  side of an integer where PIL's float64 (level maps) or float32 (blend) rounding differs; the
  Sharpness filter result is rounded to nearest before blending.
- Random streams: the loader passes ``draws`` made by ``sampler.rand_augment_draws`` from numpy
  generators keyed by (seed, epoch, position, repeat), so a resumed epoch augments exactly as an
  uninterrupted one; without ``draws`` they come from DALI's generators (the pipeline seed). Either
  way not Python's ``random``: the same distribution, not the same draws. ``m`` may be fractional (timm parses an int); newer timm's
  ``mstd > 100`` (uniform magnitude) is not in SlowFast's copy and not implemented.
- Tested on CPU only (tests/engine/test_randaug.py); the GPU path uses the same DALI patterns as
  DALI's own ``auto_aug`` (per-sample tables as device constants indexed by CPU ints, CPU per-sample
  scalars in GPU arithmetic, CPU matrices as ``warp_affine`` argument inputs) but is unrun.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

MAX_LEVEL = 10.0
FILL_VALUE = 128

INC1_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
"""timm's ``_RAND_INCREASING_TRANSFORMS`` (the ``inc1`` list), in timm's order."""

# PIL's RGB -> L weights (ITU-R 601-2 luma, 16-bit fixed point, rounded): L = (w . rgb + 2^15) >> 16
_GREY_WEIGHTS = np.array([19595, 38470, 7471], np.int32)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL ImageFilter.SMOOTH


def _dali():
    """DALI's ``fn``, ``math`` and ``types`` modules (imported lazily: DALI is optional)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    return fn, dmath, types


@dataclass(frozen=True)
class _Ctx:
    """Static settings shared by the ops: frame size (H, W), warp fill and interpolation."""

    shape: tuple[int, int]
    fill_value: int
    interp_type: Any


def _const(value: np.ndarray, like):
    """A constant on the device of the DataNode ``like`` (tables indexed per sample, masks)."""
    fn, dmath, types = _dali()
    return types.Constant(value, device=like.device or "cpu")


def _to_uint8_trunc(x):
    """PIL's blend store: truncate toward zero (floor for the values >= 0 that matter), clip to [0, 255]."""
    fn, dmath, types = _dali()
    return fn.cast(dmath.clamp(dmath.floor(x), 0.0, 255.0), dtype=types.UINT8)


def _blend(degenerate, data, factor):
    """PIL ``Image.blend(degenerate, data, factor)`` on uint8: ``trunc(d + f (x - d))`` clipped."""
    fn, dmath, types = _dali()
    d = fn.cast(degenerate, dtype=types.FLOAT)
    x = fn.cast(data, dtype=types.FLOAT)
    return _to_uint8_trunc(d + factor * (x - d))


def _grey(data):
    """PIL's ``convert("L")`` as int32 with a kept channel axis: (..., H, W, 1)."""
    fn, dmath, types = _dali()
    w = _const(_GREY_WEIGHTS, data)
    s = fn.reductions.sum(fn.cast(data, dtype=types.INT32) * w, axis_names="C", keep_dims=True)
    return (s + 32768) // 65536


def _enhance_factor(level, sign):
    """timm's ``_enhance_increasing_level_to_arg``: ``1 + sign * 0.9 * level / 10``."""
    return 1.0 + sign * (level * (0.9 / MAX_LEVEL))


def _warp(data, matrix, ctx: _Ctx):
    """PIL ``img.transform(size, AFFINE, matrix)``: ``matrix`` (2, 3) maps output -> input pixels."""
    fn, dmath, types = _dali()
    interp = types.INTERP_LINEAR if ctx.interp_type is None else ctx.interp_type
    return fn.warp_affine(data, matrix=matrix, fill_value=ctx.fill_value, interp_type=interp,
                          inverse_map=True)


def _unit(i: int, j: int) -> np.ndarray:
    e = np.zeros((2, 3), np.float32)
    e[i, j] = 1.0
    return e


_IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], np.float32)


def rotation_matrix_terms(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, C) with PIL's ``rotate(deg)`` output->input matrix = cos(t) A + sin(t) B + C, t = deg in rad.

    PIL: ``M = [[cos t, -sin t], [sin t, cos t]]`` about the centre ``(W/2, H/2)``.
    """
    h, w = shape
    cx, cy = w / 2.0, h / 2.0
    a = np.array([[1, 0, -cx], [0, 1, -cy]], np.float32)
    b = np.array([[0, -1, cy], [1, 0, -cx]], np.float32)
    c = np.array([[0, 0, cx], [0, 0, cy]], np.float32)
    return a, b, c


# --- the ops: (data, level, sign, ctx) -> data; level in [0, 10] and sign in {-1, +1} are per-sample
# float32 CPU DataNodes; data is uint8 (T, H, W, C) or (H, W, C) on CPU or GPU.


def _auto_contrast(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    x = fn.cast(data, dtype=types.INT32)
    lo = fn.cast(fn.reductions.min(data, axis_names="HW", keep_dims=True), dtype=types.INT32)
    hi = fn.cast(fn.reductions.max(data, axis_names="HW", keep_dims=True), dtype=types.INT32)
    diff = hi - lo
    spread = fn.cast(diff > 0, dtype=types.INT32)  # 0 where a channel is flat: PIL keeps it
    scaled = ((x - lo) * 255) // (diff + 1 - spread)
    return fn.cast(spread * scaled + (1 - spread) * x, dtype=types.UINT8)


def _equalize(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    return fn.equalize(data)


def _invert(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    return types.Constant(255, dtype=types.UINT8) - data


def _rotate(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    t = sign * level * (30.0 / MAX_LEVEL * np.pi / 180.0)  # radians
    a, b, c = rotation_matrix_terms(ctx.shape)
    matrix = dmath.cos(t) * types.Constant(a) + dmath.sin(t) * types.Constant(b) + types.Constant(c)
    return _warp(data, matrix, ctx)


def _posterize(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    # timm: keep 4 - int(4 L) bits; k = int(4 L) in 0..4 -> mask keeps the top 4 - k bits
    k = fn.cast(dmath.clamp(dmath.floor(level * (4.0 / MAX_LEVEL)), 0.0, 4.0), dtype=types.INT32)
    masks = np.array([(0xFF << (4 + j)) & 0xFF for j in range(5)], np.uint8)
    return data & _const(masks, data)[k]


def _solarize(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    # timm: threshold 256 - int(256 L); PIL inverts values >= threshold
    k = fn.cast(dmath.clamp(dmath.floor(level * (256.0 / MAX_LEVEL)), 0.0, 256.0), dtype=types.INT32)
    thresholds = np.arange(256, -1, -1, dtype=np.int32)  # [k] = 256 - k
    keep = data < _const(thresholds, data)[k]
    inverted = keep ^ True
    return keep * data + inverted * (types.Constant(255, dtype=types.UINT8) - data)


def _solarize_add(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    # timm: add int(110 L) to values < 128 (min(255, .) never binds: 127 + 110 < 255)
    k = fn.cast(dmath.clamp(dmath.floor(level * (110.0 / MAX_LEVEL)), 0.0, 110.0), dtype=types.INT32)
    adds = np.arange(111, dtype=np.uint8)
    low = data < types.Constant(128, dtype=types.UINT8)
    return data + low * _const(adds, data)[k]


def _color(data, level, sign, ctx: _Ctx):
    return _blend(_grey(data), data, _enhance_factor(level, sign))


def _contrast(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    mean = fn.reductions.mean(fn.cast(_grey(data), dtype=types.FLOAT), axis_names="HW", keep_dims=True)
    centre = dmath.floor(mean + 0.5)  # PIL: int(mean + 0.5), one per frame
    return _blend(centre, data, _enhance_factor(level, sign))


def _brightness(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    return _to_uint8_trunc(fn.cast(data, dtype=types.FLOAT) * _enhance_factor(level, sign))


def _sharpness(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    h, w = ctx.shape
    smooth = fn.filter(data, _const(_SMOOTH, data), dtype=types.FLOAT)
    smooth = dmath.floor(smooth + 0.5)  # PIL stores the SMOOTH result as uint8 (round to nearest)
    inner = np.zeros((h, w, 1), np.float32)  # PIL's 3x3 filter copies the 1-px border unfiltered
    inner[1:-1, 1:-1] = 1.0
    x = fn.cast(data, dtype=types.FLOAT)
    m = _const(inner, data)
    degenerate = m * smooth + (1.0 - m) * x
    return _to_uint8_trunc(degenerate + _enhance_factor(level, sign) * (x - degenerate))


def _shear_x(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    f = sign * level * (0.3 / MAX_LEVEL)
    return _warp(data, types.Constant(_IDENTITY) + f * types.Constant(_unit(0, 1)), ctx)


def _shear_y(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    f = sign * level * (0.3 / MAX_LEVEL)
    return _warp(data, types.Constant(_IDENTITY) + f * types.Constant(_unit(1, 0)), ctx)


def _translate_x(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    pixels = sign * level * (0.45 / MAX_LEVEL * ctx.shape[1])
    return _warp(data, types.Constant(_IDENTITY) + pixels * types.Constant(_unit(0, 2)), ctx)


def _translate_y(data, level, sign, ctx: _Ctx):
    fn, dmath, types = _dali()
    pixels = sign * level * (0.45 / MAX_LEVEL * ctx.shape[0])
    return _warp(data, types.Constant(_IDENTITY) + pixels * types.Constant(_unit(1, 2)), ctx)


OPS: dict[str, Callable] = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color,
    "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
"""Op name (timm's) -> DALI implementation ``(data, level, sign, ctx) -> data``."""


def _make_ctx(shape, fill_value: int, interp_type) -> _Ctx:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, (int, np.integer)) and s >= 3 for s in shape)):
        raise ValueError(f"shape must be (H, W) with ints >= 3 (the frame size of the samples), got {shape!r}")
    if not isinstance(fill_value, (int, np.integer)) or not 0 <= fill_value <= 255:
        raise ValueError(f"fill_value must be an int in [0, 255], got {fill_value!r}")
    return _Ctx((int(shape[0]), int(shape[1])), int(fill_value), interp_type)


def apply_op(name: str, data, level, sign, *, shape: tuple[int, int], fill_value: int = FILL_VALUE,
             interp_type=None):
    """Apply the timm op ``name`` with per-sample ``level`` (float32 DataNode, 0..10) and ``sign``
    (float32 DataNode, +-1; ignored by unsigned ops) to uint8 ``data`` (T, H, W, C) or (H, W, C).

    Runs inside a DALI pipeline definition; ``shape`` = (H, W) of the frames. Returns uint8 data of the
    same shape and layout.
    """
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {tuple(OPS)}")
    return OPS[name](data, level, sign, _make_ctx(shape, fill_value, interp_type))


def _select(ops: Sequence[Callable], idx, lo: int, hi: int, data, level, sign, ctx: _Ctx):
    """``ops[idx](data, ...)`` per sample by binary conditional split (needs enable_conditionals)."""
    if lo == hi:
        return ops[lo](data, level, sign, ctx)
    mid = (lo + hi) // 2
    if idx <= mid:
        out = _select(ops, idx, lo, mid, data, level, sign, ctx)
    else:
        out = _select(ops, idx, mid + 1, hi, data, level, sign, ctx)
    return out


def _dali_draws(num_ops: int, m: float, mstd: float, prob: float):
    """One layer's (op index, applied, level, sign) from DALI's seeded generators; all drawn before
    the op split, so every sample draws the same streams whatever it picks."""
    fn, dmath, types = _dali()
    idx = fn.random.uniform(values=list(range(num_ops)), dtype=types.INT32)
    apply = fn.random.coin_flip(probability=prob, dtype=types.BOOL)
    sign = 1.0 - 2.0 * fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
    if mstd > 0:
        level = dmath.clamp(fn.random.normal(mean=m, stddev=mstd), 0.0, MAX_LEVEL)
    else:
        level = fn.random.uniform(values=[m])  # a per-sample constant
    return idx, apply, level, sign


def _given_draws(draws, i: int):
    """Layer ``i``'s (op index, applied, level, sign) from the (n, 4) float32 ``draws`` of each sample."""
    fn, _, types = _dali()
    return (fn.cast(draws[i, 0], dtype=types.INT32), fn.cast(draws[i, 1], dtype=types.BOOL),
            draws[i, 2], draws[i, 3])


def timm_rand_augment(video, *, n: int, m: float, mstd: float, shape: tuple[int, int], prob: float = 0.5,
                      ops: Sequence[str] = INC1_OPS, fill_value: int = FILL_VALUE, interp_type=None,
                      draws=None):
    """timm ``rand-m{m}-n{n}-mstd{mstd}-inc1`` RandAugment of a batch of uint8 clips (see module doc).

    Call inside a DALI pipeline definition built with ``enable_conditionals=True``. ``video``: uint8
    DataNode of (T, H, W, C) clips (or (H, W, C) images), CPU or GPU; ``shape`` = (H, W) of every
    sample. Per sample and layer: op index ~ U{0..len(ops)-1}, applied with probability ``prob``,
    level ~ clamp(N(m, mstd), 0, 10), sign ~ +-1; all frames of a sample share the draws.
    Random draws use the pipeline seed, unless ``draws`` gives them: a float32 CPU DataNode of
    (n, 4) per sample (op index, applied 0/1, level, sign per layer; ``sampler.rand_augment_draws``),
    which makes the augmentation a function of the sample alone (an exact mid-epoch resume).
    """
    _dali()  # a clear error without DALI, before any argument check
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not 0.0 <= float(m) <= MAX_LEVEL:
        raise ValueError(f"m must be in [0, {MAX_LEVEL}], got {m!r}")
    if not float(mstd) >= 0.0:
        raise ValueError(f"mstd must be >= 0, got {mstd!r}")
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    unknown = [o for o in ops if o not in OPS]
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty subset of {tuple(OPS)}, got unknown {unknown}")
    ctx = _make_ctx(shape, fill_value, interp_type)
    fns = [OPS[o] for o in ops]
    for i in range(int(n)):
        if draws is None:
            idx, apply, level, sign = _dali_draws(len(fns), float(m), float(mstd), float(prob))
        else:
            idx, apply, level, sign = _given_draws(draws, i)
        if apply:
            video = _select(fns, idx, 0, len(fns) - 1, video, level, sign, ctx)
        else:
            video = video
    return video
