"""Image loader for the ImageNet-layout recipes (``dataset="image_folder"``), on DALI.

``root/<split>/<class>/<image>``; classes sorted. Training (pretrain/finetune): DALI's
``fn.decoders.image`` -> ``fn.random_resized_crop`` (scale ``train_scale`` or ``finetune_scale``,
ratio ``train_ratio``, bicubic as in the official ImageNet MaskFeat recipe) -> flip -> normalise to
float32 ``(C, H, W)``. The crop box and the flip are drawn in Python from (seed, epoch, position),
the box once the image's size is known (read from its header with Pillow, EXIF orientation
applied as DALI's decoder does), and cut by ``fn.resize`` on the relative box, so a resumed epoch
crops exactly as an uninterrupted one. Evaluation: resize the short side to
``crop_size / 0.875`` and take the centre ``crop_size`` square. Batches:
``{"image": (B, C, H, W), "label", "index", "valid"}``; sharding, shuffling, epochs and
``state_dict`` are those of the video loader (``sampler.py``). Known limits: images are checked
for existence and non-zero size only (no decode probe); no RandAugment
or random erasing for images yet. Classes: ``classes`` maps an evaluation split's class folders
by name through the run's list (``datasets.py``); ``drop_last`` never applies in ``test`` mode.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig
from .datasets import load_dataset, warn_empty_classes
from .probe import BadDatasetError, BadFile, ValidationReport, VideoInfo
from .sampler import ClipSpec, epoch_order, random_resized_crop, shard_positions
from .transfer import to_device


def image_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image as DALI's decoder outputs it: read from the header with
    Pillow (no decode), swapped for the EXIF orientations that turn it by 90 degrees."""
    from PIL import Image

    with Image.open(io.BytesIO(data.tobytes())) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class ImageLoader:
    """Iterable of image batches for one rank; same epoch/state API as VideoLoader."""

    def __init__(self, cfg: DataConfig, split: str, *, rank: int, world_size: int, device: torch.device,
                 mode: str, classes: Optional[Sequence[str]] = None):
        from .loader import resolve_root

        self.cfg, self.split, self.mode = cfg, split, mode
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        ds = load_dataset("image_folder", resolve_root(cfg), split, cfg.extensions, classes)
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
        if report.bad and cfg.on_bad_file == "error":
            raise BadDatasetError(report)
        self.report = report
        self.dataset = ds.subset([i for i, p in enumerate(ds.paths) if p in report.good])
        if classes is None and rank == 0:
            warn_empty_classes(self.dataset)
        self.class_names: list[str] = list(ds.class_names)
        self.num_classes: int = len(self.class_names)
        self.reader = "dali_image"
        self.train = split == "train" and mode != "test"
        self.epoch = 0
        self.batches_consumed = 0
        self._length = len(self._positions())

    def epoch_length(self) -> int:
        """Positions in one epoch: ``data.clips_per_epoch`` in training when set, else the dataset size."""
        return self.cfg.clips_per_epoch if (self.train and self.cfg.clips_per_epoch) else len(self.dataset)

    def _positions(self) -> list[list[tuple[int, bool]]]:
        return shard_positions(self.epoch_length(), self.rank, self.world_size, self.cfg.batch_size,
                               self.cfg.drop_last and self.mode != "test")  # every test view is evaluated

    def plan(self, epoch: int) -> list[list[ClipSpec]]:
        order = epoch_order(len(self.dataset), epoch, self.cfg.seed, length=self.epoch_length(), shuffle=self.train)
        out = []
        for chunk in self._positions():
            specs = []
            for pos, valid in chunk:
                i = int(order[pos])
                rng = np.random.default_rng([self.cfg.seed, epoch, pos, 0x1A6E])
                flip = bool(self.train and self.cfg.flip and rng.random() < 0.5)
                specs.append(ClipSpec(i, self.dataset.labels[i], np.zeros(1, np.int32), (0.0, 0.0, 1.0, 1.0),
                                      flip, None, 0, valid, position=pos))
            out.append(specs)
        return out

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.cfg.seed,
                "rank": self.rank, "world_size": self.world_size, "num_batches": len(self)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        if int(state.get("world_size", self.world_size)) != self.world_size or state.get("seed", self.cfg.seed) != self.cfg.seed:
            self.batches_consumed = 0  # positions do not map across world sizes/seeds: restart the epoch

    def _crop_box(self, epoch: int) -> Callable[[ClipSpec, np.ndarray], ClipSpec]:
        """``finish(spec, data)`` for the feeder: the training crop box of the encoded image ``data``,
        torchvision's RandomResizedCrop drawn from (seed, epoch, position) on the image's displayed size."""
        cfg = self.cfg
        scale = cfg.finetune_scale if self.mode == "finetune" else cfg.train_scale

        def finish(spec: ClipSpec, data: np.ndarray) -> ClipSpec:
            height, width = image_size(data)
            rng = np.random.default_rng([cfg.seed, epoch, spec.position, 0xC409])
            roi = random_resized_crop(rng, height, width, tuple(scale), tuple(cfg.train_ratio))
            return dataclasses.replace(spec, roi=roi)

        return finish

    def _pipeline(self, feeder, batch_size: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        cfg, train = self.cfg, self.train

        @pipeline_def(batch_size=batch_size, num_threads=cfg.num_threads, device_id=None, seed=cfg.seed,
                      prefetch_queue_depth=cfg.prefetch)
        def graph():
            data, _, roi_start, roi_end, flip, label, index, _, valid, _ = fn.external_source(
                source=feeder, num_outputs=10, batch=True)
            img = fn.decoders.image(data, device="cpu", output_type=types.RGB)
            if train:
                img = fn.resize(img, size=[cfg.crop_size, cfg.crop_size], roi_start=roi_start, roi_end=roi_end,
                                roi_relative=True, interp_type=types.INTERP_CUBIC, antialias=True)
                img = fn.flip(img, horizontal=flip)
                crop = None
            else:
                img = fn.resize(img, resize_shorter=round(cfg.crop_size / 0.875), interp_type=types.INTERP_CUBIC,
                                antialias=True)
                crop = [cfg.crop_size, cfg.crop_size]
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                           mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std])
            return img, label, index, valid

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is not used.*")
            pipe = graph()
            pipe.build()
        return pipe

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .pipeline import Feeder

        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        batches = self.plan(self.epoch)[self.batches_consumed:]
        if not batches:
            return
        feeder = Feeder(batches, self.dataset.paths, "bytes", 0, workers=self.cfg.num_threads,
                        depth=self.cfg.prefetch, finish=self._crop_box(self.epoch) if self.train else None)
        pipe = self._pipeline(feeder, len(batches[0]))
        it = DALIGenericIterator(pipe, ["image", "label", "index", "valid"],
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
                                 prepare_first_batch=False)
        try:
            for out in it:
                o = out[0]
                batch = {"image": o["image"].to(self.device, non_blocking=True),  # (B, C, H, W)
                         "label": to_device(o["label"].reshape(-1), self.device, torch.int64),
                         "index": to_device(o["index"].reshape(-1), self.device, torch.int64),
                         "valid": to_device(o["valid"].reshape(-1), self.device, torch.bool)}
                self.batches_consumed += 1
                yield batch
        finally:
            feeder.close()
        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
