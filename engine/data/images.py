"""Image loader for the ImageNet-layout recipes (``dataset="image_folder"``), on DALI.

``root/<split>/<class>/<image>``; classes sorted. DALI's ``fn.decoders.image`` decodes; one
``fn.resize`` (bicubic, antialiased, as in the official ImageNet MaskFeat recipe) cuts a relative
box out of the decoded image to ``crop_size``^2; then flip and normalise to float32 ``(C, H, W)``.
The box is computed in Python (the feeder's ``finish``, in its worker threads) once the image's
size is known (read from its header with Pillow, EXIF orientation applied as DALI's decoder does):

- training (pretrain/finetune): torchvision's RandomResizedCrop (scale ``train_scale`` or
  ``finetune_scale``, ratio ``train_ratio``) and the flip, drawn from (seed, epoch, position), so a
  resumed epoch crops exactly as an uninterrupted one;
- evaluation: torchvision's ``Resize(S)`` + ``CenterCrop(crop_size)`` arithmetic: short side
  ``S = floor(crop_size / data.test_crop_fraction)`` (at 0.875 exactly the official
  ``int(crop_size * 256 / 224)``: 256 at 224, 438 at 384), long side ``int(S * long / short)``,
  crop corner ``int(round((resized - crop) / 2))`` (Python's round, half to even). Resampling the
  box straight to ``crop_size``^2 uses the same scale as resize-then-crop (measured equal to DALI's
  full resize + crop within 1/255, and within 0.1/255 on average of PIL's bicubic resize + that crop).

Batches: ``{"image": (B, C, H, W), "label", "index", "valid"}``; sharding, shuffling, epochs and
``state_dict`` are those of the video loader (``sampler.py``). Classes: ``classes`` maps an
evaluation split's class folders by name through the run's list (``datasets.py``); ``drop_last``
never applies in ``test`` mode.

Bad files. Validation checks that each file exists and is not empty; the ranks agree on the bad
ones (``loader.agree_across_ranks``); ``data.on_bad_file=error`` raises BadDatasetError, ``skip``
leaves them out with one warning (rank 0). While loading, each image is checked cheaply in the
feeder's worker before DALI sees it (:func:`image_size` with ``check=True``): Pillow must identify
it as a format DALI decodes (not GIF), a JPEG must hold its end-of-image marker after its first
scan (a truncated file does not), a PNG must walk to IEND with matching chunk CRCs, a WebP must be
as long as its RIFF header says; other formats (TIFF, BMP, PNM, JPEG 2000) get a full Pillow decode.
Measured on a 500x375 JPEG (47 kB): 0.07 ms for the check (0.02 ms for the header alone) against
0.88 ms for DALI's CPU decode of it (one thread); a 500x375 PNG's check (CRCs of 480 kB) 0.16 ms.
A file that fails raises :class:`~engine.data.errors.ImageDecodeError` naming it under ``error``
(exit 5 from ``maskfeat``); under ``skip`` it is replaced by an image drawn from (seed, epoch,
position, attempt), ``valid=False``, the number of batches unchanged, and is named once in a
warning and in ``loader.decode_failures``. A file that passes the check but still fails inside
DALI's decoder: the loader finds it among the in-flight images (Pillow full decode, then DALI
one image at a time) and raises ImageDecodeError naming it, or under ``skip`` restarts the epoch's
remaining batches with it marked bad, so it is replaced exactly as if the check had caught it.

Fine-tuning augments as timm's ``transforms_imagenet_train`` (the official ImageNet recipes):
RandomResizedCrop, flip, then RandAugment (``randaug.py``, the videos' implementation on (H, W, C)
images; its draws made with the flip, keyed by (seed, epoch, position)), normalisation, then random
erasing in pixel mode (``loader.random_erase``, box drawn with the flip, noise keyed by (seed, epoch,
batch, rank)). Known limits: RandAugment's geometric ops fill with grey 128 and resample
bilinearly, where timm fills with the mean colour (124, 116, 104) and uses bicubic (DALI's
``warp_affine`` has one fill value and no cubic); no repeated augmentation for images (warned when
set). Orientation comes from the EXIF block only, as DALI reads it (Pillow's XMP fallback is not
used).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig
from .datasets import load_dataset, warn_empty_classes
from .errors import DataError, ImageDecodeError
from .pipeline import FailureLog
from .probe import BadDatasetError, BadFile, ValidationReport, VideoInfo
from .randaug import INC1_OPS
from .sampler import ClipSpec, epoch_order, rand_augment_draws, random_erasing_box, random_resized_crop, shard_positions
from .transfer import to_device

log = logging.getLogger(__name__)

DALI_IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP"})
"""Pillow's names of the formats DALI's ``fn.decoders.image`` decodes (JPEG, PNG, TIFF, BMP, PNM,
JPEG 2000, WebP; not GIF)."""

_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHECKED = (b"IHDR", b"PLTE", b"IDAT")  # chunks whose CRC DALI's decoder (libpng) enforces


def _exif_orientation(raw: Optional[bytes]) -> int:
    """The Orientation tag of an EXIF block (1 without one, or when it does not parse)."""
    found = _exif_orientation_tag(raw)
    return 1 if found is None else found


def _exif_orientation_tag(raw: Optional[bytes]) -> Optional[int]:
    """The Orientation tag of an EXIF block as DALI reads it (measured with DALI 2.4), or None
    without one (a broken block, no tag: DALI keeps an earlier block's). A tag it cannot use counts
    as 1, the image as stored: an ASCII one (Pillow gives a str, and int() of "a" refused a file DALI
    decodes), an empty one. A BYTE/UNDEFINED tag counts by its first byte (Pillow gives bytes)."""
    if not raw:
        return None
    from PIL import Image

    ex = Image.Exif()
    try:
        ex.load(raw)
    except Exception:  # a broken EXIF block: DALI ignores it too
        return None
    if _ORIENTATION not in ex:
        return None
    value = ex.get(_ORIENTATION)
    if isinstance(value, (bytes, bytearray, tuple)):
        value = value[0] if value else 1
    if isinstance(value, str):
        return 1
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1


def _png_exif(buf: bytes, check: bool) -> Optional[bytes]:
    """The eXIf chunk's payload of a PNG, wherever it lies (DALI applies one after the image data
    too; Pillow's header parse stops at the first IDAT); of several, the last, which DALI applies.
    Walks chunk headers only, plus the CRCs of the critical chunks when ``check`` (libpng only warns
    about the others): raises ValueError for a truncated file, a bad critical CRC, a missing IEND or
    a second eXIf chunk (DALI's CPU decoder segfaults on one that undoes a turning first one: the
    whole process, every rank, under either ``on_bad_file``)."""
    exif, i, n = None, 8, len(buf)
    while True:
        if i + 8 > n:
            raise ValueError(f"truncated PNG: chunk header at byte {i} past the end ({n} bytes), no IEND")
        length = int.from_bytes(buf[i:i + 4], "big")
        kind = buf[i + 4:i + 8]
        end = i + 12 + length
        if end > n:
            raise ValueError(f"truncated PNG: {kind.decode('latin-1')} chunk at byte {i} ends past the end ({n} bytes)")
        if check and kind in _PNG_CHECKED and zlib.crc32(buf[i + 4:i + 8 + length]) != int.from_bytes(buf[end - 4:end], "big"):
            raise ValueError(f"corrupt PNG: bad CRC in the {kind.decode('latin-1')} chunk at byte {i}")
        if kind == b"eXIf":
            if check and exif is not None:
                raise ValueError(f"PNG with two eXIf chunks (the second at byte {i}): DALI's decoder crashes on "
                                 "such files")
            exif = buf[i + 8:i + 8 + length]
        if kind == b"IEND":
            return exif
        i = end


def _jpeg_orientation(buf: bytes) -> int:
    """A JPEG's EXIF orientation as DALI applies it: that of the last EXIF APP1 block before the first
    scan whose Orientation tag it reads (a later block without one, or broken, does not reset it);
    Pillow's ``info["exif"]`` is the first block only, so a file with two (an editor's added block)
    was planned otherwise than DALI turned it."""
    for raw in reversed(_jpeg_exif_blocks(buf)):
        found = _exif_orientation_tag(raw)
        if found is not None:
            return found
    return 1


def _jpeg_exif_blocks(buf: bytes) -> list[bytes]:
    """The payloads of a JPEG's EXIF APP1 segments before its first scan (``Exif\\0\\0`` and the
    TIFF block), in order."""
    exif, i, n = [], 2, len(buf)
    while i + 4 <= n and buf[i] == 0xFF:
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xDA:  # start of scan: no more header segments
            break
        length = int.from_bytes(buf[i + 2:i + 4], "big")
        if marker == 0xE1 and buf[i + 4:i + 10] == b"Exif\0\0":
            exif.append(buf[i + 4:i + 2 + length])
        i += 2 + length
    return exif


def _jpeg_check(buf: bytes) -> None:
    """Raise ValueError when a JPEG has no end-of-image marker after its first scan header (a
    truncated file). Walks the marker segments to the first SOS (skipping APP segments whole, so an
    EXIF thumbnail's own markers do not count); 0xFFD9 cannot occur inside entropy-coded data."""
    i, n = 2, len(buf)
    while True:
        if i + 4 > n:
            raise ValueError(f"truncated JPEG: no image data ({n} bytes, headers only)")
        if buf[i] != 0xFF:
            raise ValueError(f"corrupt JPEG: no marker at byte {i}")
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(buf[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan
            if buf.find(b"\xff\xd9", i + 2 + length) < 0:
                raise ValueError(f"truncated JPEG: no end-of-image marker ({n} bytes)")
            return
        i += 2 + length


def image_size(data: np.ndarray, check: bool = False) -> tuple[int, int]:
    """(height, width) of an encoded image as DALI's decoder outputs it: read from the header with
    Pillow (no decode), swapped for the EXIF orientations that turn it by 90 degrees (read for
    JPEG/MPO/TIFF/WebP by Pillow from the header, for PNG from its eXIf chunk by a chunk walk: Pillow's
    ``getexif`` decodes a PNG whose eXIf follows the image data).

    ``check``: also raise (ValueError, or Pillow's OSError) when DALI's decoder would fail on it,
    as far as cheap checks tell (module docstring)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # only the header is read; DALI has no such limit
    buf = data.tobytes()
    if buf.startswith(_PNG_SIGNATURE):  # read here, not by Pillow, which refuses a bad ancillary CRC libpng accepts
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            raise ValueError("corrupt PNG: no IHDR chunk after the signature")
        width, height = int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
        orientation = _exif_orientation(_png_exif(buf, check))
        return (width, height) if orientation in _TURNED else (height, width)
    try:
        im = Image.open(io.BytesIO(buf))
    except Image.UnidentifiedImageError:
        raise ValueError(f"not an image: Pillow recognises no image format in its first bytes {buf[:16]!r}") from None
    with im:
        width, height = im.size
        fmt = im.format
        if check and fmt not in DALI_IMAGE_FORMATS:
            raise ValueError(f"{fmt} image: DALI's image decoder reads only {', '.join(sorted(DALI_IMAGE_FORMATS))}")
        if fmt in ("JPEG", "MPO"):  # the last EXIF APP1 segment, which DALI applies (Pillow keeps the first)
            orientation = _jpeg_orientation(buf)
        elif fmt == "WEBP":  # the EXIF block only: DALI ignores Pillow's XMP fallback
            orientation = _exif_orientation(im.info.get("exif"))
        else:  # TIFF: Pillow already reports the size with the orientation applied, as DALI outputs it
            orientation = 1
        if check:
            if fmt in ("JPEG", "MPO"):
                _jpeg_check(buf)
            elif fmt == "WEBP":
                riff = int.from_bytes(buf[4:8], "little") + 8
                if len(buf) < riff:
                    raise ValueError(f"truncated WebP: {len(buf)} bytes, its header says {riff}")
            else:
                if fmt == "TIFF" and im.mode in TIFF_MODES_MISREAD and (im.mode != "1" or
                                                                      im.info.get("compression") == "raw"):
                    raise ValueError(f"TIFF of mode {im.mode} ({TIFF_MODES_MISREAD[im.mode]}): DALI's image decoder "
                                     "misreads it; convert it (e.g. to PNG) to use it")
                im.load()  # no cheap completeness check for these formats
    return (width, height) if orientation in _TURNED else (height, width)


TIFF_MODES_MISREAD = {"LA": "grey and alpha", "PA": "palette and alpha", "F": "32-bit float", "I": "32-bit integer",
                      "LAB": "CIELAB", "1": "1-bit, uncompressed"}
"""Pillow modes of TIFF images DALI 2.4's CPU decoder gets wrong: grey+alpha comes out with the alpha
as green and the next pixel's grey as blue, float as white, CIELAB in other colours, all without an
error; 32-bit integer ones and uncompressed 1-bit ones it refuses (a pipeline restart to find them;
1-bit ones compressed with Group 4, LZW, deflate or PackBits it reads right)."""


def centre_crop_box(height: int, width: int, crop: int, fraction: float) -> tuple[float, float, float, float]:
    """The evaluation crop as a box relative to the (height, width) image, (y0, x0, y1, x1):
    torchvision's ``Resize(floor(crop / fraction))`` then ``CenterCrop(crop)``, both in integers as
    torchvision computes them (long side truncated, corner rounded half to even)."""
    short = math.floor(crop / fraction)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rh, rw = short, int(short * width / height)
    top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
    return top / rh, left / rw, (top + crop) / rh, (left + crop) / rw


def pillow_problem(path: str) -> Optional[str]:
    """Why Pillow cannot fully decode ``path`` (or the cheap check refuses it); None if it can."""
    from PIL import Image

    try:
        data = np.fromfile(path, dtype=np.uint8)
        image_size(data, check=True)
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
    except Exception as e:  # Pillow raises many types for corrupt data
        return f"{type(e).__name__}: {e}"
    return None


def dali_decode_size(data: np.ndarray) -> tuple[int, int]:
    """(H, W) of the encoded image ``data`` as DALI's CPU image decoder outputs it, decoded alone
    (a one-image pipeline); its RuntimeError when it fails."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True), device="cpu",
                                 output_type=types.RGB)

    pipe = graph()
    pipe.build()
    return tuple(np.asarray(pipe.run()[0][0]).shape[:2])


def dali_problem(path: str) -> Optional[str]:
    """Why DALI's CPU image decoder fails on ``path`` alone; None if it decodes."""
    try:
        dali_decode_size(np.fromfile(path, dtype=np.uint8))
    except RuntimeError as e:
        return f"DALI: {_dali_reason(e)}"
    return None


def _dali_reason(error: Exception) -> str:
    """The informative line of a DALI pipeline error: the first after "encountered:" (e.g.
    "nvImageCodec failure: '#17'"), else one naming a failure, else the first."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    after = next((i + 1 for i, ln in enumerate(lines) if ln.endswith("encountered:")), None)
    if after is not None and after < len(lines):
        return lines[after][:300]
    return next((ln for ln in lines if "Failed to" in ln or "Assert on" in ln), lines[0] if lines else "")[:300]


class ImageLoader:
    """Iterable of image batches for one rank; same epoch/state API as VideoLoader."""

    def __init__(self, cfg: DataConfig, split: str, *, rank: int, world_size: int, device: torch.device,
                 mode: str, classes: Optional[Sequence[str]] = None):
        from .loader import agree_across_ranks, check_same_listing, resolve_root

        self.cfg, self.split, self.mode = cfg, split, mode
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        root = resolve_root(cfg)
        ds = load_dataset("image_folder", root, split, cfg.extensions, classes)
        check_same_listing(ds, split, root)  # every rank calls it
        report = ValidationReport()
        for p in ds.paths:
            try:
                size = os.path.getsize(p)
            except OSError as e:
                report.bad.append(BadFile(p, "unreadable", str(e)))
                continue
            if size == 0:
                report.bad.append(BadFile(p, "empty", "zero-length file"))
            else:
                report.good[p] = VideoInfo("image", 0, 0, 1, 0.0, True)
        report.bad = agree_across_ranks(report.bad)  # every rank calls it: all keep the same files
        for b in report.bad:
            report.good.pop(b.path, None)
        if report.bad and cfg.on_bad_file == "error":
            raise BadDatasetError(report)
        if report.bad and rank == 0:
            log.warning("data.on_bad_file=skip: %d of %d images of %s left out:\n%s", len(report.bad), len(ds.paths),
                        split, "\n".join(f"  {b}" for b in report.bad))
        if not report.good:
            raise BadDatasetError(report, skipping=True)
        self.report = report
        self.dataset = ds.subset([i for i, p in enumerate(ds.paths) if p in report.good])
        if classes is None and rank == 0:
            warn_empty_classes(self.dataset)
        self.class_names: list[str] = list(ds.class_names)
        self.num_classes: int = len(self.class_names)
        self.reader = "dali_image"
        self.train = split == "train" and mode != "test"
        self._decode_failed = FailureLog(
            "%s cannot be decoded (%s): data.on_bad_file=skip: it is replaced by other images (valid=False); "
            "reported once" if cfg.on_bad_file == "skip" else None)
        self.decode_failures: list[str] = self._decode_failed.paths
        """Files that failed to decode while loading (after validation), in order of first failure."""
        self._dali_bad: dict[str, str] = {}  # files only DALI's decoder refuses: replaced from then on (skip)
        self.epoch = 0
        self.batches_consumed = 0
        self._length = len(self._positions())
        finetune = self.train and mode == "finetune"
        self.rand_augment: Optional[tuple[int, float, float]] = (
            (cfg.rand_augment_n, cfg.rand_augment_m, cfg.rand_augment_mstd) if finetune and cfg.rand_augment else None)
        """(n, m, mstd) of timm's RandAugment in fine-tuning (None: off), as for videos."""
        self.erase_prob = cfg.random_erasing if finetune else 0.0
        if rank == 0 and finetune and cfg.repeated_aug > 1:
            log.warning("dataset=image_folder does not apply data.repeated_aug=%d (the official ImageNet recipes use "
                        "none; set data.repeated_aug=1 to silence this)", cfg.repeated_aug)

    def epoch_length(self) -> int:
        """Positions in one epoch: ``data.clips_per_epoch`` in training when set, else the dataset size."""
        return self.cfg.clips_per_epoch if (self.train and self.cfg.clips_per_epoch) else len(self.dataset)

    def _positions(self) -> list[list[tuple[int, bool]]]:
        return shard_positions(self.epoch_length(), self.rank, self.world_size, self.cfg.batch_for(self.mode),
                               self.cfg.drop_last and self.mode != "test")  # every test view is evaluated

    def _spec(self, i: int, epoch: int, pos: int, valid: bool, key: Sequence[int] = ()) -> ClipSpec:
        rng = np.random.default_rng([self.cfg.seed, epoch, pos, *key, 0x1A6E])
        flip = bool(self.train and self.cfg.flip and rng.random() < 0.5)
        rand_aug = rand_augment_draws(rng, *self.rand_augment, len(INC1_OPS)) if self.rand_augment else None
        erase = random_erasing_box(rng, self.cfg.crop_size, self.erase_prob) if self.erase_prob > 0 else None
        return ClipSpec(i, self.dataset.labels[i], np.zeros(1, np.int32), (0.0, 0.0, 1.0, 1.0), flip, erase, 0,
                        valid, rand_aug=rand_aug, position=pos)

    def plan(self, epoch: int):
        """This rank's batches of ``epoch`` as ClipSpecs, each batch planned when first read (a
        ``loader.EpochPlan``): planning an ImageNet epoch up front, with its augmentation draws,
        held the start of every epoch for 3 s at 8 ranks, 22 s on one GPU."""
        from .loader import EpochPlan

        order = epoch_order(len(self.dataset), epoch, self.cfg.seed, length=self.epoch_length(), shuffle=self.train)
        return EpochPlan(lambda chunk: [self._spec(int(order[pos]), epoch, pos, valid) for pos, valid in chunk],
                         self._positions())

    def replacement(self, epoch: int) -> Callable[[ClipSpec, int], ClipSpec]:
        """``replace(spec, attempt)``: the image loaded instead of ``spec`` when it fails to decode
        (``data.on_bad_file=skip``): image ``U(0, n)`` drawn from (seed, epoch, position, attempt),
        its flip likewise, ``valid=False``; its crop box is drawn on its own size."""
        n = len(self.dataset)

        def replace(spec: ClipSpec, attempt: int) -> ClipSpec:
            rng = np.random.default_rng([self.cfg.seed, epoch, spec.position, attempt, 0x5B6])
            return self._spec(int(rng.integers(n)), epoch, spec.position, False, key=(attempt, 0x5B6))

        return replace

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict:
        from .loader import loader_state

        return loader_state(self)

    def load_state_dict(self, state: dict) -> None:
        from .loader import restore_position

        restore_position(self, state)  # as the video loader's (this one restarted without the warning)

    def _finish(self, epoch: int, loaded: dict[int, str]) -> Callable[[ClipSpec, np.ndarray], ClipSpec]:
        """``finish(spec, data)`` for the feeder (runs in its workers): checks the encoded image
        ``data`` (:func:`image_size`, ``check=True``) and sets the spec's crop box: torchvision's
        RandomResizedCrop drawn from (seed, epoch, position) on the displayed size in training, the
        centre crop (:func:`centre_crop_box`) in evaluation. Records the path loaded at each
        position in ``loaded`` (a replacement's, when one was loaded)."""
        cfg, train = self.cfg, self.train
        scale = cfg.finetune_scale if self.mode == "finetune" else cfg.train_scale

        def finish(spec: ClipSpec, data: np.ndarray) -> ClipSpec:
            path = self.dataset.paths[spec.index]
            loaded[spec.position] = path
            if path in self._dali_bad:
                raise ValueError(f"DALI's image decoder fails on it ({self._dali_bad[path]})")
            height, width = image_size(data, check=True)
            if train:
                rng = np.random.default_rng([cfg.seed, epoch, spec.position, 0xC409])
                roi = random_resized_crop(rng, height, width, tuple(scale), tuple(cfg.train_ratio))
            else:
                roi = centre_crop_box(height, width, cfg.crop_size, cfg.test_crop_fraction)
            return dataclasses.replace(spec, roi=roi)

        return finish

    def _pipeline(self, feeder, batch_size: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        cfg = self.cfg

        ra = self.rand_augment

        @pipeline_def(batch_size=batch_size, num_threads=cfg.num_threads, device_id=None, seed=cfg.seed,
                      prefetch_queue_depth=cfg.prefetch, enable_conditionals=ra is not None)
        def graph():
            data, _, roi_start, roi_end, flip, label, index, _, valid, draws = fn.external_source(
                source=feeder, num_outputs=10, batch=True)
            img = fn.decoders.image(data, device="cpu", output_type=types.RGB)
            img = fn.resize(img, size=[cfg.crop_size, cfg.crop_size], roi_start=roi_start, roi_end=roi_end,
                            roi_relative=True, interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.flip(img, horizontal=flip)
            if ra is not None:  # after the crop and flip, as timm's transforms_imagenet_train
                from .randaug import timm_rand_augment

                img = timm_rand_augment(img, n=ra[0], m=ra[1], mstd=ra[2], shape=(cfg.crop_size, cfg.crop_size),
                                        draws=draws)
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                           mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std])
            return img, label, index, valid

        pipe = graph()  # (the feeder's frame indices and views are unused: pipeline.UNUSED_OUTPUTS_FILTER)
        pipe.build()
        return pipe

    def _dali_failure(self, paths: Sequence[str], error: Exception, rerun: str) -> dict[str, str]:
        """DALI's decoder failed on one of ``paths`` (the images in flight): the culprits are those DALI
        fails on alone, tried first for the files a full Pillow decode rejects (Pillow is stricter
        than DALI in places, e.g. a PNG's bad ancillary-chunk CRC: such a file DALI decodes is no
        culprit; it was named and, under ``skip``, excluded), then for the rest. Under ``error``
        raises ImageDecodeError naming them; under ``skip`` returns them (at least one new) for a
        restart."""
        paths = list(dict.fromkeys(paths))
        suspects = {p: why for p in paths if (why := pillow_problem(p)) is not None}
        culprits = {p: why for p, why in suspects.items() if dali_problem(p) is not None}
        if not culprits:
            culprits = {p: why for p in paths if p not in suspects and (why := dali_problem(p)) is not None}
        culprits = {p: why for p, why in culprits.items() if p not in self._dali_bad}
        why = _dali_reason(error)
        if not culprits:
            raise ImageDecodeError(
                f"DALI's image decoder failed ({why}) on one of the images in flight, but it decodes each of them "
                f"alone: {', '.join(paths)}") from error
        for path, err in culprits.items():
            self._decode_failed(path, err)
        if self.cfg.on_bad_file == "skip":
            return culprits
        named = "; ".join(f"{p} ({err})" for p, err in culprits.items())
        first = next(iter(culprits))
        raise ImageDecodeError(
            f"DALI's image decoder failed ({why}): {named} cannot be decoded, although it passed validation (which "
            f"checks only that the file exists and is not empty). Remove it (or set data.on_bad_file=skip: it is then "
            f"replaced by other images and reported), then {rerun}", path=first, error=culprits[first]) from error

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .loader import random_erase
        from .pipeline import TRAIN_RERUN, Feeder

        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        plan = self.plan(self.epoch)
        rerun = (TRAIN_RERUN if self.train else
                 "run again (a training run: --resume auto continues from its last checkpoint)")
        while True:  # one pass, or more when DALI's decoder refuses a file under skip (then restarted)
            batches = plan[self.batches_consumed:]
            if not batches:
                return
            loaded: dict[int, str] = {}
            feeder = Feeder(batches, self.dataset.paths, "bytes", 0, workers=self.cfg.num_threads,
                            depth=self.cfg.prefetch, finish=self._finish(self.epoch, loaded), media="image",
                            replace=self.replacement(self.epoch) if self.cfg.on_bad_file == "skip" else None,
                            on_failure=self._decode_failed, rerun=rerun)
            pipe = self._pipeline(feeder, len(batches[0]))
            it = DALIGenericIterator(pipe, ["image", "label", "index", "valid"],
                                     last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
                                     prepare_first_batch=False)
            done = 0
            try:
                for k, out in enumerate(it):
                    o = out[0]
                    image = o["image"].to(self.device, non_blocking=True)  # (B, C, H, W)
                    if self.erase_prob > 0:
                        random_erase(image, batches[k], (self.cfg.seed, self.epoch, self.batches_consumed, self.rank))
                    batch = {"image": image,
                             "label": to_device(o["label"].reshape(-1), self.device, torch.int64),
                             "index": to_device(o["index"].reshape(-1), self.device, torch.int64),
                             "valid": to_device(o["valid"].reshape(-1), self.device, torch.bool)}
                    for s in batches[k]:
                        loaded.pop(s.position, None)
                    self.batches_consumed += 1
                    done = k + 1
                    yield batch
                break
            except RuntimeError as e:
                if isinstance(e, DataError) or "decoders.image" not in str(e):
                    raise
                # the images DALI was given (replacements included): those finished and not yet handed out
                in_flight = [s.position for b in batches[done:feeder.next_batch] for s in b]
                paths = [loaded[p] for p in in_flight if p in loaded]
                self._dali_bad.update(self._dali_failure(paths, e, rerun))
            finally:
                feeder.close()
                del it, pipe
        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
