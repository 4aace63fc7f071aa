"""Typed configuration of the video/image data pipeline (issue 5, DESIGN §3.6 for the defaults).

Defaults are the MaskFeat K400 pre-training recipe: 16 frames at stride 4, RandomResizedCrop
scale [0.5, 1] ratio [3/4, 4/3] to 224, horizontal flip, mean 0.45 / std 0.225. Fine-tuning and
test fields follow the official MViTv2-S fine-tuning recipe (timm RandAugment m7 mstd0.5 inc1, random
erasing 0.25, repeated augmentation x2, RandomResizedCrop [0.08, 1], 10 clips x 1 crop at test).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .datasets import KNOWN_VIDEO_EXTENSIONS

DATASETS = ("demo", "kinetics", "folder", "image_folder")
READERS = ("auto", "gpu", "cpu", "pyav")
BAD_FILE_POLICIES = ("error", "skip")
SHORT_VIDEO_POLICIES = ("pad", "bad")
# the video loader seeds DALI (a signed 64-bit seed) with seed * 1000003 + epoch * 1009 + batch + rank * 7919
MAX_DATA_SEED = (2**63 - 2**40) // 1000003


@dataclass
class DataConfig:
    """Data pipeline settings; every field has a typed default (see module docstring)."""

    root: str = field(default="", metadata={"path": True})
    """Dataset root (a leading ``~`` is expanded). With ``dataset="demo"`` and an empty root the
    packaged clips are used."""
    dataset: str = "demo"
    """``demo`` | ``kinetics`` (SlowFast lists ``train.csv``/``val.csv``/``test.csv`` with
    ``path label`` per line, paths relative to root) | ``folder`` (one sub-folder per class; a
    ``train``/``val``/``test`` sub-folder is used for the split when present) | ``image_folder``
    (ImageNet layout ``root/{train,val}/<class>/<image>``)."""
    num_frames: int = 16
    """T: frames per clip."""
    sampling_rate: int = 4
    """Temporal stride between sampled frames, in frames at ``target_fps``."""
    target_fps: float = 30.0
    """Frame rate ``sampling_rate`` counts at (SlowFast's TARGET_FPS): a file at ``fps`` is sampled
    every ``sampling_rate*fps/target_fps`` source frames, so a clip lasts the same time whatever
    the file's rate (16x4 at 30: 2 s). 0 = count the file's own frames."""
    crop_size: int = 224
    """Output spatial size (H = W)."""
    short_side: int = 320
    """Decode short side: PyAV frames larger than this are scaled down while decoding; the
    crop window is relative, so the result equals scale-then-crop (one resize instead of two).
    Never below what the crops take (:meth:`decode_short_side`: 352 px crops decode at 403), so no
    reader upsamples a frame the DALI readers (full resolution) would not."""
    train_scale: tuple[float, float] = (0.5, 1.0)
    """RandomResizedCrop area fraction range in pre-training."""
    train_ratio: tuple[float, float] = (0.75, 1.3333)
    """RandomResizedCrop aspect ratio (w/h) range, sampled log-uniformly."""
    flip: bool = True
    """Random horizontal flip (p = 0.5) at training time."""
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    """Per-channel mean of [0, 1] pixels."""
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)
    """Per-channel std of [0, 1] pixels."""
    batch_size: int = 8
    """Videos per batch per rank (with repeated augmentation a batch holds ``batch_size*repeated_aug`` clips)."""
    num_threads: int = 2
    """DALI CPU threads and PyAV decode threads per rank."""
    reader: str = "auto"
    """``auto`` (NVDEC when CUDA and DALI's CUDA build are present, else PyAV, measured faster on
    CPU) | ``gpu`` | ``cpu`` (DALI's CPU decoder, VP9/VP8/MJPEG only) | ``pyav`` (any codec)."""
    on_bad_file: str = "error"
    """What the validation pass does with a bad file: ``error`` (raise, listing all) | ``skip``
    (drop it, and report it by name and reason)."""
    short_videos: str = "pad"
    """Training on a video shorter than one clip (fewer frames than ``clip_extent`` at its rate):
    ``pad`` repeats its last frame, as SlowFast does (its decoder clamps the clip's frame indices to
    the last frame; the window starts at 0) | ``bad``: it is a bad file (``too_short``), which
    ``on_bad_file`` refuses or leaves out. Evaluation always repeats the last frame."""
    validation_workers: int = 0
    """Threads for the validation pass; 0 means ``num_threads``."""
    cache_dir: str = field(default="", metadata={"path": True})
    """Where the probe cache and the demo clips live (a leading ``~`` is expanded). "" =
    ``$MASKFEAT_CACHE``, else ``~/.cache/maskfeat`` for the demo clips and
    ``<root>/.maskfeat_probe.json`` for the probe cache (the cache dir when the root is read-only)."""
    prefetch: int = 2
    """Batches decoded ahead of the consumer (PyAV path) and DALI prefetch queue depth."""
    drop_last: bool = False
    """Drop the last incomplete batch per rank instead of padding it with repeats."""
    clips_per_epoch: int = 0
    """Samples (videos) per epoch; 0 = dataset size. Larger values draw further seeded
    permutations (the demo uses this to sample many random clips from a few videos)."""
    # fine-tuning augmentation
    finetune_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range in fine-tuning."""
    rand_augment: bool = True
    """RandAugment as timm's ``rand-m{m}-n{n}-mstd{mstd}-inc1`` (``engine/data/randaug.py``; each
    drawn op applies with probability 0.5; one draw per clip, the same for all its frames)."""
    rand_augment_n: int = 2
    """RandAugment: operations per sample (drawn with replacement from the 15 ops of timm's inc1 list)."""
    rand_augment_m: float = 7.0
    """RandAugment magnitude on timm's 0..10 scale (each op's level ~ clamp(N(m, mstd), 0, 10))."""
    rand_augment_mstd: float = 0.5
    """RandAugment magnitude noise std (timm's ``mstd``; 0 = a fixed magnitude)."""
    random_erasing: float = 0.25
    """Random erasing probability (timm "pixel" mode, one box shared by all frames)."""
    repeated_aug: int = 2
    """Repeated augmentation: clips drawn per video per batch in fine-tuning (SlowFast semantics)."""
    # test
    num_clips: int = 10
    """Test: temporal views per video (uniformly spaced windows)."""
    num_crops: int = 1
    """Test: spatial views per temporal view (1 = centre, 3 = both ends and centre of the long side)."""
    test_crop_fraction: float = 0.875
    """Test with 1 crop: the centre square's side as a fraction of the short side (SlowFast scales
    the short side to 256 and crops 224: 0.875). 3 crops always take the whole short side."""
    eval_batch_size: int = 0
    """Test: views (clips, or images) per batch per rank; 0 = ``batch_size``. Evaluation keeps no
    activations for a backward, so it takes several times the training batch (SlowFast's
    TEST.BATCH_SIZE 64 on 8 GPUs: 8 per GPU, where the S recipe trains 2 videos per GPU)."""
    seed: int = 0
    """Seed of shuffling, clip windows and augmentation parameters."""
    extensions: tuple[str, ...] = field(default=KNOWN_VIDEO_EXTENSIONS)
    """File extensions recognised as videos in folder datasets (case ignored): every container
    FFmpeg reads, e.g. .mp4 .mkv .mov .MTS .3gp .mpg .wmv (each file is probed anyway)."""

    def __post_init__(self) -> None:
        """Checks of each field; comparisons are written so that NaN fails them."""
        for name in ("train_scale", "train_ratio", "finetune_scale", "mean", "std", "extensions"):
            setattr(self, name, tuple(getattr(self, name)))  # YAML gives lists
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("path") and isinstance(value, str):
                setattr(self, f.name, os.path.expanduser(value))
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"data.{f.name} must be finite, got {value!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset={self.dataset!r}: expected one of {DATASETS}")
        if self.reader not in READERS:
            raise ValueError(f"data.reader={self.reader!r}: expected one of {READERS}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"data.on_bad_file={self.on_bad_file!r}: expected one of {BAD_FILE_POLICIES}")
        if self.short_videos not in SHORT_VIDEO_POLICIES:
            raise ValueError(f"data.short_videos={self.short_videos!r}: expected one of {SHORT_VIDEO_POLICIES}")
        for name in ("num_frames", "sampling_rate", "crop_size", "batch_size", "num_threads",
                     "repeated_aug", "num_clips", "prefetch", "short_side"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_crops not in (1, 3):
            raise ValueError(f"data.num_crops must be 1 or 3, got {self.num_crops}")
        for name in ("train_scale", "finetune_scale", "train_ratio"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ValueError(f"data.{name}={getattr(self, name)}: need 0 < lo <= hi")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"data.random_erasing must be in [0, 1], got {self.random_erasing}")
        if not 0.0 < self.test_crop_fraction <= 1.0:
            raise ValueError(f"data.test_crop_fraction must be in (0, 1], got {self.test_crop_fraction}")
        if not self.target_fps >= 0:
            raise ValueError(f"data.target_fps must be >= 0 (0: the file's own frames), got {self.target_fps}")
        if not self.rand_augment_mstd >= 0:
            raise ValueError(f"data.rand_augment_mstd must be >= 0, got {self.rand_augment_mstd}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"data.{name}: expected 3 values (R, G, B), got {getattr(self, name)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"data.std must be > 0 in every channel (pixels are divided by it), got {self.std}")
        if not (all(0 <= m <= 1 for m in self.mean) and all(s <= 1 for s in self.std)):
            raise ValueError(f"data.mean={self.mean} / data.std={self.std}: these are statistics of pixels in [0, 1] "
                             "(mean in [0, 1], std in (0, 1]); values in 0-255 units (mmaction2/mmpretrain style) "
                             "must be divided by 255")
        for name in ("clips_per_epoch", "rand_augment_n", "validation_workers", "seed", "eval_batch_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.seed > MAX_DATA_SEED:  # DALI's seed is a signed 64-bit integer: seed * 1000003 + ... (loader)
            raise ValueError(f"data.seed must be at most {MAX_DATA_SEED}, got {self.seed}")
        if not 0 <= self.rand_augment_m <= 10:
            raise ValueError(f"data.rand_augment_m must be in [0, 10], got {self.rand_augment_m}")

    def batch_for(self, mode: str) -> int:
        """Positions per batch per rank in ``mode`` (``eval_batch_size`` in test mode when set)."""
        return (self.eval_batch_size or self.batch_size) if mode == "test" else self.batch_size

    def decode_short_side(self) -> int:
        """PyAV's decode short side: ``short_side``, raised to ``ceil(crop_size / test_crop_fraction)``
        when smaller (the 1-crop test view and full-frame training crops would otherwise be
        upsampled from frames decoded smaller than the crop)."""
        return max(self.short_side, math.ceil(self.crop_size / self.test_crop_fraction - 1e-9))

    def clip_extent(self, fps: float) -> int:
        """Source frames one clip covers in a file at ``fps``: ``floor((T-1)*step) + 1``."""
        from .sampler import clip_extent

        return clip_extent(self.num_frames, self.sampling_rate, fps, self.target_fps)

    def shorter_than_a_clip(self, infos: Mapping[str, Any]) -> list[tuple[str, int, int]]:
        """``(path, frames, frames one clip spans)`` of the files (path -> ``VideoInfo``) shorter than one
        clip at their own rate."""
        spans = {p: self.clip_extent(i.fps) for p, i in infos.items()}
        return [(p, i.num_frames, spans[p]) for p, i in infos.items() if i.num_frames < spans[p]]
