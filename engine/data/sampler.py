"""Epoch plans: sharding, seeded shuffling, clip windows and augmentation parameters (issue 5).

Everything random about a sample is drawn here, in Python, from generators keyed by
``(seed, epoch, position)`` and ``(seed, epoch, position, repeat)``: the temporal window, the RandomResizedCrop box, the flip and the
random-erasing box. DALI then applies them through argument inputs (``fn.resize`` ROI,
``fn.flip(horizontal=...)``). So an epoch is reproducible from the seed alone, a resumed loader
produces exactly the batches an uninterrupted one would have, and the crop statistics are testable.
RandAugment's choices (op, applied, level, sign per layer) are drawn here too, keyed like the
crop, and DALI only applies them.

Sharding policy: the epoch order (a seeded permutation, or several concatenated when
``clips_per_epoch`` exceeds the dataset) is padded at the end with its own first entries to a
multiple of ``world_size``, then rank r takes positions ``r, r+W, r+2W, ...`` (disjoint shards;
every sample at least once per epoch, at most ``W-1`` repeats overall). Each rank's last batch is
padded with repeats of its first items. Padded entries carry ``valid=False``. With ``drop_last`` the
order is cut to a multiple of ``W`` and incomplete batches are dropped instead (samples missed).

Semantics (SlowFast's Kinetics dataset and decoder): ``sampling_rate`` counts frames at
``target_fps`` (TARGET_FPS = 30), so a file at ``fps`` is sampled every ``step = sampling_rate *
fps / target_fps`` source frames (4 at 30 fps, 8 at 60, 3.33 at 25), frame ``i`` of a clip being
``floor(start + i * step)``; the clip covers ``extent = floor((T-1) * step) + 1`` frames and
``delta = max(num_frames - extent, 0)``. Training clips start at ``U(0, delta)`` (a float, as
SlowFast's ``random.uniform``), drawn once per video: the repeats of repeated augmentation share
the window (SlowFast decodes once and copies) and differ in crop, flip and erasing only.
RandomResizedCrop follows torchvision's rule (10 attempts of area ``U(scale)`` and log-uniform
ratio, then a centre crop with the ratio clamped); random erasing follows timm's
``RandomErasing`` (area [0.02, 1/3], log ratio [0.3, 1/0.3], one box per clip, same box on all
frames, per-pixel N(0,1) fill). Test views use SlowFast's ``USE_OFFSET_SAMPLING`` rule: clip ``i``
of ``K`` starts at ``i * floor(delta / (K - 1))`` (one clip: ``floor(delta / 2)``). Spatially,
3 crops take the short-side square at the start / centre / end of the long side (SlowFast scales
the short side to the crop size); 1 crop takes the centre square of ``test_crop_fraction`` of the
short side (SlowFast scales the short side to TRAIN_JITTER_SCALES[0] = 256 and crops 224 at the
centre: 0.875).

Not reproduced: SlowFast's decoder (``decoder.py``: ``get_start_end_idx`` over a clip of
``rate·T·fps/30`` frames, then ``temporal_sampling``) takes ``linspace(start, start + 63, 16)`` at
30 fps, i.e. 63/15 = 4.2 frames apart over 64 frames; here the step is exactly ``sampling_rate`` at
``target_fps``, as the paper states (61 frames).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .probe import VideoInfo
from .randaug import INC1_OPS


@dataclass
class ClipSpec:
    """One clip to produce: which file, which frames, which crop, which augmentation."""

    index: int
    """Dataset index of the video."""
    label: int
    frames: np.ndarray
    """Source frame indices, shape (T,), int32."""
    roi: tuple[float, float, float, float]
    """Crop box relative to the frame: (y0, x0, y1, x1) in [0, 1]."""
    flip: bool
    erase: tuple[int, int, int, int] | None
    """Random-erasing box in output pixels (top, left, h, w), or None."""
    view: int
    """Test view number ``clip * num_crops + crop`` (0 outside test mode)."""
    valid: bool
    """False for padding repeats (see module docstring)."""
    rand_aug: Optional[np.ndarray] = None
    """RandAugment draws (n, 4) float32: op index, applied (0/1), level, sign per layer; or None."""
    position: int = -1
    """Epoch-order position, where a draw needs it after loading (an image's crop box needs its size)."""


def epoch_order(n: int, epoch: int, seed: int, *, length: int = 0, shuffle: bool = True) -> np.ndarray:
    """Indices visited in ``epoch``: seeded permutations concatenated to ``length`` (0 = ``n``)."""
    if n <= 0:
        raise ValueError("empty dataset: nothing to sample")
    length = length or n
    if not shuffle:
        return np.arange(length, dtype=np.int64) % n
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    reps = math.ceil(length / n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:length].astype(np.int64)


def shard_positions(total: int, rank: int, world_size: int, batch_size: int,
                    drop_last: bool) -> list[list[tuple[int, bool]]]:
    """Batches of (position in the epoch order, valid) for ``rank`` (policy: module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if drop_last:
        per_rank = total // world_size
        mine = [(rank + i * world_size, True) for i in range(per_rank)]
        n_batches = per_rank // batch_size
        return [mine[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
    per_rank = math.ceil(total / world_size)
    mine = []
    for i in range(per_rank):
        pos = rank + i * world_size
        mine.append((pos % total, pos < total))
    n_batches = math.ceil(per_rank / batch_size)
    batches = []
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        k = 0
        while len(chunk) < batch_size:  # pad the last batch with this rank's first items
            chunk.append((mine[k % len(mine)][0], False))
            k += 1
        batches.append(chunk)
    return batches


def random_resized_crop(rng: np.random.Generator, height: int, width: int,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box as relative (y0, x0, y1, x1)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return y / height, x / width, (y + h) / height, (x + w) / width
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    y, x = (height - h) // 2, (width - w) // 2
    return y / height, x / width, (y + h) / height, (x + w) / width


def random_erasing_box(rng: np.random.Generator, size: int, prob: float) -> tuple[int, int, int, int] | None:
    """timm RandomErasing box (top, left, h, w) on a ``size`` x ``size`` output, or None."""
    if prob <= 0 or rng.random() >= prob:
        return None
    area = size * size
    log_r = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target = area * rng.uniform(0.02, 1 / 3)
        ar = math.exp(rng.uniform(*log_r))
        h = int(round(math.sqrt(target * ar)))
        w = int(round(math.sqrt(target / ar)))
        if w < size and h < size:
            top = int(rng.integers(0, size - h + 1))
            left = int(rng.integers(0, size - w + 1))
            return top, left, h, w
    return None


def square_crop(height: int, width: int, crop: int, num_crops: int,
                fraction: float = 1.0) -> tuple[float, float, float, float]:
    """SlowFast test crop as relative (y0, x0, y1, x1): 3 crops, the short-side square at the
    start/centre/end of the long side; 1 crop, the centre square of ``fraction`` of the short side."""
    if num_crops == 1:
        side = min(height, width) * fraction
        y, x = (height - side) / 2, (width - side) / 2
        return y / height, x / width, (y + side) / height, (x + side) / width
    side = min(height, width)
    frac = (0.0, 0.5, 1.0)[crop]
    if width >= height:
        x = int(round((width - side) * frac))
        return 0.0, x / width, 1.0, (x + side) / width
    y = int(round((height - side) * frac))
    return y / height, 0.0, (y + side) / height, 1.0


@dataclass
class PlanSettings:
    """What :func:`make_clip` needs to know about the mode."""

    num_frames: int
    sampling_rate: int
    crop_size: int
    train: bool
    """Random windows and augmentation (else deterministic views)."""
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333)
    flip: bool = True
    erase_prob: float = 0.0
    num_clips: int = 1
    num_crops: int = 1
    target_fps: float = 30.0
    """Frame rate ``sampling_rate`` counts at; 0 = the file's own frames (module docstring)."""
    test_crop_fraction: float = 0.875
    """1-crop test views: the centre square's side over the short side."""
    rand_augment: Optional[tuple[int, float, float]] = None
    """Training: (n, m, mstd) of timm's RandAugment, whose draws are made here (None: off)."""


_EPS = 1e-9  # keeps floor() of exact products (15 * 3.333... = 50) from falling one frame short


def frame_step(sampling_rate: int, fps: float, target_fps: float) -> float:
    """Source frames between two sampled frames: ``sampling_rate * fps / target_fps``
    (``sampling_rate`` itself when either rate is 0 or unknown)."""
    if target_fps > 0 and fps > 0:
        return sampling_rate * fps / target_fps
    return float(sampling_rate)


def clip_extent(num_frames: int, sampling_rate: int, fps: float, target_fps: float) -> int:
    """Source frames one clip covers: ``floor((T-1) * step) + 1``."""
    return int(math.floor((num_frames - 1) * frame_step(sampling_rate, fps, target_fps) + _EPS)) + 1


def clip_frames(num_frames_file: int, start: float, step: float, num_frames: int) -> np.ndarray:
    """Frame indices ``floor(start + i*step)`` (T,), clamped to the last frame (a too-short file repeats it)."""
    idx = np.floor(start + step * np.arange(num_frames) + _EPS).astype(np.int64)
    return np.minimum(idx, max(num_frames_file - 1, 0)).astype(np.int32)


def rand_augment_draws(rng: np.random.Generator, n: int, m: float, mstd: float, num_ops: int,
                       prob: float = 0.5) -> np.ndarray:
    """timm RandAugment's random choices for one clip, (n, 4) float32: per layer the op index
    ``U{0..num_ops-1}`` (with replacement), applied ``~ Bernoulli(prob)``, level
    ``clamp(N(m, mstd), 0, 10)`` and sign ``+-1`` (``engine/data/randaug.py`` applies them)."""
    u = rng.random(3 * n).tolist()  # op index, applied, sign (Python floats: small-array numpy costs more)
    g = rng.normal(m, mstd, size=n).tolist() if mstd > 0 else [float(m)] * n
    return np.array([(min(int(u[3 * i] * num_ops), num_ops - 1), float(u[3 * i + 1] < prob),
                      min(max(g[i], 0.0), 10.0), -1.0 if u[3 * i + 2] < 0.5 else 1.0) for i in range(n)], np.float32)


@functools.lru_cache(maxsize=256)
def _window_start(seed: int, epoch: int, position: int, delta: int) -> float:
    """The clip's start frame, ``U(0, delta)`` keyed by (seed, epoch, position): the repeats of
    repeated augmentation share it, and the cache builds its generator once for them."""
    return float(np.random.default_rng([seed, epoch, position, 0x7135]).uniform(0, delta))


def make_clip(s: PlanSettings, index: int, label: int, info: VideoInfo, *, seed: int, epoch: int,
              position: int, repeat: int, view: int, valid: bool) -> ClipSpec:
    """The ClipSpec of one sample: the window keyed by (seed, epoch, position), shared by the
    repeats; crop, flip and erasing keyed by (seed, epoch, position, repeat)."""
    step = frame_step(s.sampling_rate, info.fps, s.target_fps)
    rand_aug = None
    delta = max(info.num_frames - clip_extent(s.num_frames, s.sampling_rate, info.fps, s.target_fps), 0)
    if s.train:
        start = _window_start(seed, epoch, position, delta)
        rng = np.random.default_rng([seed, epoch, position, repeat, 0xC11B])  # one generator per clip
        roi = random_resized_crop(rng, info.height, info.width, s.scale, s.ratio)
        flip = bool(s.flip and rng.random() < 0.5)
        erase = random_erasing_box(rng, s.crop_size, s.erase_prob)
        if s.rand_augment is not None:
            n, m, mstd = s.rand_augment
            rand_aug = rand_augment_draws(rng, n, m, mstd, len(INC1_OPS))
    else:
        clip, crop = divmod(view, s.num_crops)
        start = float(clip * (delta // (s.num_clips - 1)) if s.num_clips > 1 else delta // 2)
        roi = square_crop(info.height, info.width, crop, s.num_crops, s.test_crop_fraction)
        flip, erase = False, None
    return ClipSpec(index=index, label=label, frames=clip_frames(info.num_frames, start, step, s.num_frames),
                    roi=roi, flip=flip, erase=erase, view=view, valid=valid, rand_aug=rand_aug)
