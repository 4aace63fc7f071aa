"""``build_loader``: dataset listing -> validation -> epoch plan -> DALI pipeline -> torch batches.

Batch contract (issue 5): ``{"video": float32 (B, C, T, H, W) normalised on the target device,
"label": int64 (B,), "index": int64 (B,) dataset index, "valid": bool (B,) (False for padding
repeats, see ``sampler.py``)}``; test mode adds ``"video_id"`` (= dataset index, for aggregating
views) and ``"view"`` (``clip * num_crops + crop``). Image datasets yield ``"image"`` (B, C, H, W)
instead of ``"video"`` (see ``images.py``).

Modes: ``pretrain`` (split train: random window, RandomResizedCrop ``train_scale``, flip),
``finetune`` (split train: RandomResizedCrop ``finetune_scale``, flip, RandAugment, random
erasing, ``repeated_aug`` clips per video in the same batch, so a batch holds
``batch_size * repeated_aug`` clips), ``test`` (``num_clips x num_crops`` deterministic views per
video). Any mode on split val/test without ``test`` gives one centre clip, centre crop per video.
``data.drop_last`` drops the incomplete last batch in the training modes only: in ``test`` mode
every view is evaluated (the last batch is padded with ``valid=False`` repeats instead).

Classes: ``build_loader(..., classes=None)`` lists the split's own classes (use it for the
training split, which defines the run's classes; classes without any usable file are kept and
named in a warning). Evaluation loaders pass ``classes=<training class names>`` so that the
split's class folders are numbered by name through that list (``datasets.py``).

Epochs: ``set_epoch(e)`` picks the seeded order; iterating a loader to its end advances the epoch
by one. ``state_dict()`` is ``{"epoch", "batches_consumed", ...}``; after ``load_state_dict``
the next iteration yields exactly the remaining batches of that epoch (``set_epoch`` with the same
epoch keeps the position; another epoch restarts at batch 0).

Files left out (``data.on_bad_file=skip``): ``loader.report.bad`` lists the files the validation
pass rejected (``probe.BadFile``: path, reason, detail; ``loader.report.records()`` gives them as
dicts for a JSON record). A file that passed validation but fails to decode mid-epoch (corrupt
further in) raises :class:`~engine.data.errors.VideoDecodeError` under ``error``; under ``skip``
its clip is replaced by a clip of another video drawn from ``(seed, epoch, the failed clip,
attempt)`` (so the batches, their number and a resumed epoch are the same on every run and every
rank keeps in step) and marked ``valid=False`` (evaluation leaves it out); the file is named in one
warning and listed in ``loader.decode_failures`` (paths, in order of first failure).
A rank whose clip fails under ``error`` raises there; the other ranks are not told (they stop when
the launcher ends the job, or at their next collective's timeout).

Rotated videos (``VideoInfo.rotation``) are planned with their displayed sizes and decoded upright.
"""
from __future__ import annotations

import collections
import collections.abc
import hashlib
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig
from .datasets import Dataset, load_dataset, warn_empty_classes
from .errors import DataError, VideoDecodeError
from .pipeline import TRAIN_RERUN, FailureLog
from .probe import BadDatasetError, BadFile, ValidationReport, VideoInfo, reader_problem, validate_files
from .sampler import ClipSpec, PlanSettings, epoch_order, make_clip, shard_positions
from .transfer import to_device

log = logging.getLogger(__name__)
MODES = ("pretrain", "finetune", "test")


def default_cache_dir(cfg: DataConfig) -> str:
    """``cfg.cache_dir`` or ``$MASKFEAT_CACHE`` or ``~/.cache/maskfeat``."""
    return cfg.cache_dir or os.environ.get("MASKFEAT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "maskfeat")


ROOT_PROBE_CACHE = ".maskfeat_probe.json"


def probe_cache_path(cfg: DataConfig, root: str) -> str:
    """The probe cache: ``<cache dir>/probe_<hash of root>.json`` when ``data.cache_dir`` or
    ``$MASKFEAT_CACHE`` is set or the root is read-only, else ``<root>/.maskfeat_probe.json``."""
    if not (cfg.cache_dir or os.environ.get("MASKFEAT_CACHE")) and os.access(root, os.W_OK):
        return os.path.join(root, ROOT_PROBE_CACHE)
    tag = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:12]
    return os.path.join(default_cache_dir(cfg), f"probe_{tag}.json")


def older_probe_caches(cfg: DataConfig, root: str) -> list[str]:
    """Probe caches at the other location (the root's, when the cache dir is used): read, never written."""
    old = os.path.join(root, ROOT_PROBE_CACHE)
    return [old] if old != probe_cache_path(cfg, root) and os.path.isfile(old) else []


def choose_reader(requested: str, infos: list[VideoInfo], device: torch.device) -> str:
    """The concrete decode path: ``gpu`` | ``cpu`` | ``pyav`` (see ``pipeline.py``). ``auto`` takes NVDEC on
    CUDA only when every file suits it (codec, frame size, 8-bit 4:2:0, constant frame rate), else PyAV."""
    from .pipeline import cuda_dali_usable

    if requested != "auto":
        if requested == "gpu" and not (device.type == "cuda" and cuda_dali_usable()):
            raise RuntimeError("data.reader=gpu needs a CUDA device and DALI with CUDA; use auto, cpu or pyav")
        return requested
    if device.type == "cuda" and cuda_dali_usable():
        unfit = [r for i in infos if (r := reader_problem(i, "gpu", 0)) is not None]
        if not unfit:
            return "gpu"
        log.info("data.reader=auto: PyAV rather than NVDEC: %d of %d files do not suit the GPU reader (first: %s: %s)",
                 len(unfit), len(infos), *unfit[0])
    # On CPU PyAV is the faster decoder for every codec (bench/results/data_cpu_*.md: VP9 clips
    # decode 2-3x faster through PyAV's frame-threaded FFmpeg than through DALI's CPU decoder), so
    # DALI's CPU decoder is used only when asked for (reader=cpu, VP9/VP8/MJPEG).
    return "pyav"


def resolve_root(cfg: DataConfig) -> str:
    """The dataset root; the demo dataset is prepared on first use when the root is empty."""
    if cfg.dataset == "demo" and not cfg.root:
        from .demo import demo_dataset

        return demo_dataset(os.path.join(default_cache_dir(cfg), "demo"))
    if not cfg.root:
        raise DataError(f"data.root is empty for dataset={cfg.dataset!r}")
    return cfg.root


@dataclass
class DatasetCheck:
    """A validated listing: the good subset, its probe infos, the report and the reader."""

    dataset: Dataset
    infos: list[VideoInfo]
    report: ValidationReport
    reader: str


def validate_dataset(cfg: DataConfig, split: str = "train", *, device: torch.device | str = "cpu",
                     progress: bool = False, classes: Optional[Sequence[str]] = None, mode: str = "pretrain",
                     agree: Optional[Callable[[list[BadFile]], list[BadFile]]] = None) -> DatasetCheck:
    """The validation pass: list the split, probe every file with PyAV (parallel, cached by
    size+mtime), choose the reader, and check each file against it (codec, length, frame rate).

    Bad files are logged by name and reason; with ``on_bad_file='error'`` a BadDatasetError lists
    them all, with ``'skip'`` they are left out of the returned dataset. ``classes``: the run's
    class list, through which the split's classes are mapped (``datasets.load_dataset``); without
    it the split defines the classes and those left without files are named in a warning.
    ``mode``: in ``test`` a file shorter than one clip is kept (its clips repeat the last frame, as
    SlowFast evaluates such videos); in training too under ``data.short_videos=pad`` (named in a
    warning), else it is ``too_short``. ``agree``: maps this rank's bad
    files to those of every rank (:func:`agree_across_ranks`), so that all ranks keep the same files.
    """
    device = torch.device(device)
    root = resolve_root(cfg)
    ds = load_dataset(cfg.dataset, root, split, cfg.extensions, classes)
    if agree is not None:
        check_same_listing(ds, split, root)
    workers = cfg.validation_workers or cfg.num_threads
    cache = probe_cache_path(cfg, root)

    pad = mode == "test" or cfg.short_videos == "pad"

    def min_frames(info: VideoInfo) -> int:
        return 1 if pad else cfg.clip_extent(info.fps)

    # first pass with the codec-agnostic reader to learn codecs, then check for the chosen reader
    base = validate_files(ds.paths, reader="pyav", min_frames=min_frames, workers=workers,
                          cache_path=cache, progress=progress, cache_read_also=older_probe_caches(cfg, root))
    reader = choose_reader(cfg.reader, list(base.good.values()), device)
    report = base if reader == "pyav" else validate_files(
        ds.paths, reader=reader, min_frames=min_frames, workers=workers, cache_path=cache)
    report.probed, report.cached = base.probed, base.cached
    if agree is not None:
        report.bad = agree(report.bad)
        for b in report.bad:
            report.good.pop(b.path, None)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:  # the same list on every rank
        for b in report.bad:
            log.warning("bad file %s", b)
    if report.bad and cfg.on_bad_file == "error":
        raise BadDatasetError(report)
    keep = [i for i, p in enumerate(ds.paths) if p in report.good]
    if not keep:
        raise BadDatasetError(report, skipping=True)
    good = ds.subset(keep)
    if classes is None:
        warn_empty_classes(good)
    infos = [report.good[p] for p in good.paths]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        if reader == "pyav":
            warn_decoded_from_start(good.paths, infos)
        if mode != "test":
            warn_padded(cfg, split, good.paths, infos)
    return DatasetCheck(good, infos, report, reader)


def warn_padded(cfg: DataConfig, split: str, paths: Sequence[str], infos: Sequence[VideoInfo]) -> None:
    """Name the training files shorter than one clip (kept under ``data.short_videos=pad``)."""
    short = cfg.shorter_than_a_clip(dict(zip(paths, infos)))
    if short:
        path, n, need = short[0]
        log.warning("%d of %d %s files are shorter than one clip (first: %s, %d frames, a clip spans %d): their "
                    "clips repeat the last frame, as SlowFast's do; data.short_videos=bad makes them bad files (refused, or "
                    "left out under data.on_bad_file=skip)",
                    len(short), len(paths), split, path, n, need)


LONG_UNEVEN_FRAMES = 300
"""Frames (10 s at 30 fps) past which a file PyAV cannot seek in is worth re-encoding."""


def warn_decoded_from_start(paths: list[str], infos: list[VideoInfo]) -> None:
    """Warn about long files PyAV does not seek in (``VideoInfo.timeline`` is None: uneven frame
    times, from a variable frame rate or a gap, or an MPEG program/transport stream,
    ``probe.NO_SEEK_FORMATS``): each of their clips is decoded from the first frame, a cost that
    grows with the video's length; ``maskfeat data prepare`` re-encodes them (WebM or MP4, constant rate)."""
    slow = [(p, i) for p, i in zip(paths, infos) if i.timeline is None and i.num_frames > LONG_UNEVEN_FRAMES]
    if slow:
        log.warning("%d of %d files (first: %s, %d frames) cannot be seeked in (uneven frame times, or an MPEG "
                    "program, transport or elementary stream): every clip of theirs is decoded from the first frame, slower the "
                    "longer they are; `maskfeat data prepare` re-encodes them (WebM or MP4, constant rate)",
                    len(slow), len(paths), slow[0][0], slow[0][1].num_frames)


def loader_state(loader) -> dict:
    """``state_dict`` of the video and image loaders: the position (epoch, batches consumed) and the
    layout that gives it a meaning (:func:`restore_position` compares it)."""
    return {"epoch": loader.epoch, "batches_consumed": loader.batches_consumed, "rank": loader.rank,
            **_layout(loader)}


def _layout(loader) -> dict:
    return {"world_size": loader.world_size, "seed": loader.cfg.seed, "num_batches": len(loader),
            "batch_size": loader.cfg.batch_size, "epoch_length": loader.epoch_length(),
            "dataset_len": len(loader.dataset)}


def restore_position(loader, state: dict) -> None:
    """``load_state_dict`` of the video and image loaders: resume at ``state["epoch"]`` after
    ``state["batches_consumed"]`` batches (a ValueError outside the epoch). A state saved with
    another layout (world size, seed, per-rank batch, positions per epoch, dataset length, or number
    of batches per epoch) cannot map to the same positions: the epoch restarts at batch 0, with a
    warning (``engine.runner`` maps such a position itself, ``map_data_position``, before it calls
    this). The layout is compared before the range: a count from a smaller world size was a
    ValueError, one from a larger per-rank batch skipped samples, and so did one from another
    per-rank batch with the same number of batches (states of before held no batch size; the keys a
    state lacks are not compared)."""
    consumed = int(state["batches_consumed"])
    loader.epoch = int(state["epoch"])
    now = _layout(loader)
    other = {k: state[k] for k in now if k in state and state[k] != now[k]}
    if other:
        log.warning("loader state from another layout (%s; now %s): restarting epoch %d at batch 0",
                    ", ".join(f"{k}={v}" for k, v in other.items()),
                    ", ".join(f"{k}={now[k]}" for k in other), loader.epoch)
        loader.batches_consumed = 0
        return
    if not 0 <= consumed <= len(loader):  # (a negative count replayed the epoch's end)
        raise ValueError(f"batches_consumed={consumed} outside [0, {len(loader)}]")
    loader.batches_consumed = consumed


class EpochPlan(collections.abc.Sequence):
    """An epoch's batches of ClipSpecs, each planned when first read: planning a whole Kinetics
    epoch up front (tens of µs per clip) held up the start of every epoch for seconds; now the
    feeder plans a batch as it queues its decoding. A slice is a plan of the same kind. The last
    ``keep`` batches planned are kept (the loader reads a batch again when DALI hands it out)."""

    def __init__(self, make: Callable[[list[tuple[int, bool]]], list[ClipSpec]],
                 chunks: list[list[tuple[int, bool]]], keep: int = 64):
        self._make, self._chunks, self._keep = make, chunks, keep
        self._recent: collections.OrderedDict[int, list[ClipSpec]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return EpochPlan(self._make, self._chunks[k], self._keep)
        k = range(len(self._chunks))[k]  # negative indices, and IndexError past the end
        if k not in self._recent:
            self._recent[k] = self._make(self._chunks[k])
            if len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        return self._recent[k]


class VideoLoader:
    """Iterable of batches for one rank (module docstring gives the contract)."""

    def __init__(self, cfg: DataConfig, check: DatasetCheck, *, split: str, mode: str, rank: int,
                 world_size: int, device: torch.device):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg = cfg
        self.dataset = check.dataset
        self.infos = check.infos
        self._shown = [i.displayed() for i in check.infos]  # sizes as displayed: crops are planned on them
        self.report = check.report
        self._decode_failed = FailureLog(
            "%s fails to decode (%s) although it passed validation: data.on_bad_file=skip: its clips are replaced "
            "by clips of other videos (valid=False); reported once" if cfg.on_bad_file == "skip" else None)
        self.decode_failures: list[str] = self._decode_failed.paths
        """Files that failed to decode while loading (after validation), in order of first failure."""
        self.reader = check.reader
        self.split, self.mode = split, mode
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.class_names: list[str] = list(check.dataset.class_names)
        self.num_classes: int = len(self.class_names)
        train = split == "train" and mode != "test"
        self.test_views = mode == "test"
        finetune = train and mode == "finetune"
        self.repeats = cfg.repeated_aug if finetune else 1
        self.views = cfg.num_clips * cfg.num_crops if self.test_views else 1
        self.settings = PlanSettings(
            num_frames=cfg.num_frames, sampling_rate=cfg.sampling_rate, crop_size=cfg.crop_size,
            train=train, scale=cfg.finetune_scale if finetune else cfg.train_scale,
            ratio=cfg.train_ratio, flip=cfg.flip, erase_prob=cfg.random_erasing if finetune else 0.0,
            num_clips=cfg.num_clips if self.test_views else 1,
            num_crops=cfg.num_crops if self.test_views else 1, target_fps=cfg.target_fps,
            test_crop_fraction=cfg.test_crop_fraction,
            rand_augment=((cfg.rand_augment_n, cfg.rand_augment_m, cfg.rand_augment_mstd)
                          if finetune and cfg.rand_augment else None))
        self.rand_augment = self.settings.rand_augment
        self.shuffle = train
        self.epoch = 0
        self.batches_consumed = 0
        self._length = len(self._positions())

    # ---- plan -------------------------------------------------------------------------------
    def epoch_length(self) -> int:
        """Positions in one epoch: ``data.clips_per_epoch`` in training when set, else the dataset size
        (times the views per video in test mode)."""
        n = len(self.dataset) * self.views
        return self.cfg.clips_per_epoch if (self.shuffle and self.cfg.clips_per_epoch) else n

    def _positions(self) -> list[list[tuple[int, bool]]]:
        # test mode evaluates every view: never drop, pad the last batch (valid=False) instead
        return shard_positions(self.epoch_length(), self.rank, self.world_size,
                               self.cfg.batch_for("test" if self.test_views else "train"),
                               self.cfg.drop_last and not self.test_views)

    def plan(self, epoch: int) -> "EpochPlan":
        """All batches of ``epoch`` for this rank, as ClipSpecs (deterministic; each batch is planned
        when first read)."""
        n = len(self.dataset)
        if self.test_views:
            order = np.arange(n * self.views, dtype=np.int64)
        else:
            order = epoch_order(n, epoch, self.cfg.seed, length=self.epoch_length(), shuffle=self.shuffle)

        def batch(chunk: list[tuple[int, bool]]) -> list[ClipSpec]:
            specs = []
            for pos, valid in chunk:
                index, view = divmod(int(order[pos]), self.views)
                for r in range(self.repeats):
                    specs.append(make_clip(self.settings, index, self.dataset.labels[index], self._shown[index],
                                           seed=self.cfg.seed, epoch=epoch, position=pos, repeat=r,
                                           view=view, valid=valid))
            return specs

        return EpochPlan(batch, self._positions())

    def replacement(self, epoch: int) -> Callable[[ClipSpec, int], ClipSpec]:
        """``replace(spec, attempt)``: the clip loaded instead of ``spec`` when it fails to decode
        (``data.on_bad_file=skip``): a clip of video ``U(0, n)`` drawn from (seed, epoch, the failed
        clip's index, view, frames, crop and flip, attempt), so the same on every run; ``valid=False``."""
        n = len(self.dataset)

        def replace(spec: ClipSpec, attempt: int) -> ClipSpec:
            key = zlib.crc32(np.asarray(spec.frames, np.int64).tobytes() + np.asarray(spec.roi, np.float64).tobytes()
                             + bytes([bool(spec.flip)]))
            rng = np.random.default_rng([self.cfg.seed, epoch, spec.index, spec.view, key, attempt, 0x5B5])
            index = int(rng.integers(n))
            position = int(rng.integers(1 << 40))
            return make_clip(self.settings, index, self.dataset.labels[index], self._shown[index],
                             seed=self.cfg.seed, epoch=epoch, position=position, repeat=0, view=spec.view,
                             valid=False)

        return replace

    def _dali_decode_error(self, in_flight: Sequence[list[ClipSpec]], rerun: str, error: Exception) -> Exception:
        """DALI's decoder (``cpu``/``gpu``) failed on one of the ``in_flight`` batches: find the file by
        decoding those clips with PyAV and return a VideoDecodeError naming it (else ``error``).
        ``on_bad_file=skip`` cannot replace a clip inside DALI: the message says to use reader=pyav."""
        from .pipeline import decode_clip_pyav

        culprits: dict[str, str] = {}
        for spec in (s for batch in in_flight for s in batch):
            path = self.dataset.paths[spec.index]
            if path in culprits:
                continue
            try:
                decode_clip_pyav(path, spec.frames, self.cfg.decode_short_side(), timeline=self.infos[spec.index].timeline)
            except Exception as e:  # FFmpeg raises many error types for corrupt data
                culprits[path] = f"{type(e).__name__}: {e}"
        if not culprits:
            return error
        for path, err in culprits.items():
            self._decode_failed(path, err)
        lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Failed to" in ln or "Assert on" in ln), lines[0] if lines else "")
        named = "; ".join(f"{p} ({err})" for p, err in culprits.items())
        return VideoDecodeError(
            f"DALI's {self.reader} video decoder failed ({why[:300]}); PyAV fails on the same frames of "
            f"{named}, although it passed validation (which decodes the first frame only): it is corrupt further in. "
            f"Remove it, then {rerun}. data.on_bad_file=skip cannot replace clips inside DALI's decoder; "
            f"data.reader=pyav replaces them. `maskfeat data prepare --check --full DATA_ROOT` finds any others",
            path=next(iter(culprits)), error=culprits[next(iter(culprits))])

    # ---- public API ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the seeded order of ``epoch``; keeps a resumed position if the epoch is unchanged."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batches_consumed = 0

    def state_dict(self) -> dict:
        return loader_state(self)

    def load_state_dict(self, state: dict) -> None:
        restore_position(self, state)

    def __iter__(self) -> Iterator[dict]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .pipeline import OUTPUTS, Feeder, build_pipeline

        if self.batches_consumed >= len(self):  # a finished epoch: move on
            self.epoch += 1
            self.batches_consumed = 0
        batches = self.plan(self.epoch)[self.batches_consumed:]
        if not batches:
            return
        decode = self.reader
        train = self.shuffle
        feeder = Feeder(batches, self.dataset.paths, decode, self.cfg.decode_short_side(),
                        workers=self.cfg.num_threads, depth=self.cfg.prefetch,
                        rotations=[i.rotation for i in self.infos],
                        timelines=[i.timeline for i in self.infos],
                        replace=self.replacement(self.epoch) if self.cfg.on_bad_file == "skip" else None,
                        on_failure=self._decode_failed,
                        rerun=(TRAIN_RERUN if train else
                               "run again (a training run: --resume auto continues from its last checkpoint)"))
        on_gpu = self.device.type == "cuda" and decode == "gpu"
        pipe = build_pipeline(
            feeder, decode=decode, batch_size=len(batches[0]), num_threads=self.cfg.num_threads,
            device_id=(self.device.index or 0) if on_gpu else None, crop_size=self.cfg.crop_size,
            mean=self.cfg.mean, std=self.cfg.std, rand_augment=self.rand_augment,
            seed=self.cfg.seed * 1000003 + self.epoch * 1009 + self.batches_consumed + self.rank * 7919,
            prefetch=self.cfg.prefetch)
        it = DALIGenericIterator(pipe, list(OUTPUTS), last_batch_policy=LastBatchPolicy.PARTIAL,
                                 auto_reset=False, prepare_first_batch=False)
        done = 0
        try:
            for k, out in enumerate(it):
                batch = self._to_batch(out[0], batches[k])
                self.batches_consumed += 1  # counted when handed out: a checkpoint after this step resumes after it
                done = k + 1
                yield batch
        except RuntimeError as e:
            if decode == "pyav" or isinstance(e, DataError) or "decoders.video" not in str(e):
                raise
            raise self._dali_decode_error(batches[done:feeder.next_batch], feeder.rerun, e) from e
        finally:
            feeder.close()
            del it, pipe
        if self.batches_consumed >= len(self):
            self.epoch += 1
            self.batches_consumed = 0

    def _to_batch(self, out: dict, specs: list[ClipSpec]) -> dict:
        video = out["video"].to(self.device, non_blocking=True)  # (B, C, T, H, W)
        if self.settings.erase_prob > 0:
            self._erase(video, specs)
        batch = {"video": video,
                 "label": to_device(out["label"].reshape(-1), self.device, torch.int64),
                 "index": to_device(out["index"].reshape(-1), self.device, torch.int64),
                 "valid": to_device(out["valid"].reshape(-1), self.device, torch.bool)}
        if self.test_views:
            batch["video_id"] = batch["index"].clone()
            batch["view"] = to_device(out["view"].reshape(-1), self.device, torch.int64)
        return batch

    def _erase(self, video: torch.Tensor, specs: list[ClipSpec]) -> None:
        random_erase(video, specs, (self.cfg.seed, self.epoch, self.batches_consumed, self.rank))


def random_erase(x: torch.Tensor, specs: Sequence[ClipSpec], key: Sequence[int]) -> None:
    """timm RandomErasing, pixel mode, in place: N(0, 1) noise in each sample's ``spec.erase`` box
    (top, left, h, w) of the last two dimensions of ``x`` ((B, C, T, H, W) clips: the same box on
    every frame; (B, C, H, W) images). The noise is keyed by ``key`` = (seed, epoch, batch, rank):
    reproducible on resume, and different on every rank (without the rank, each rank's box of the
    same batch got the same noise)."""
    gen = torch.Generator(device=x.device)
    seq = np.random.SeedSequence([*(int(k) for k in key), 0xE4A5E])
    gen.manual_seed(int(seq.generate_state(1, np.uint64)[0]))
    for b, s in enumerate(specs):
        if s.erase is None:
            continue
        top, left, h, w = s.erase
        box = x[b, ..., top:top + h, left:left + w]
        box.copy_(torch.randn(box.shape, generator=gen, device=x.device, dtype=x.dtype))


def check_same_listing(ds: Dataset, split: str, root: str) -> None:
    """DataError on every rank unless all ranks listed the same files, labels and classes (all ranks
    call this; a no-op without a process group of more than one rank). Each rank lists the split
    itself: a file or class folder missing from one node's copy was never a bad file there, so
    the ranks ran with different datasets (another video at the same index, overlapping shards,
    or another epoch length and collectives out of step). One digest per rank is exchanged, of the
    paths relative to ``root`` (the same dataset mounted at another path on another node is the
    same)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    h = hashlib.sha256()
    for path, label in zip(ds.paths, ds.labels):
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    h.update("\n".join(ds.class_names).encode())
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (h.hexdigest(), len(ds.paths), len(ds.class_names)))
    if len({digest for digest, _, _ in parts}) > 1:
        per_rank = "; ".join(f"rank {r}: {n} files, {k} classes" for r, (_, n, k) in enumerate(parts))
        raise DataError(f"the ranks list different {split} files or classes ({per_rank}): every node must see "
                        "the same dataset (a node-local copy that differs, or a list file edited meanwhile?)")


def agree_across_ranks(bad: list[BadFile]) -> list[BadFile]:
    """The bad files of every rank (all ranks call this; a no-op without a process group of more
    than one rank). Each rank validates on its own; a file one node cannot read (a node-local copy,
    a transient error) would otherwise leave the ranks with different datasets: different epoch
    lengths and shards, collectives out of step, or one rank exiting while the others wait."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return bad
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [(b.path, b.reason, b.detail) for b in bad])
    out = {b.path: b for b in bad}  # this rank's own findings first, then the others' in rank order
    for r, part in enumerate(parts):
        for path, reason, detail in part:
            if path not in out:
                out[path] = BadFile(path, reason, f"{detail} (on rank {r})")
    return list(out.values())


def build_loader(cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", mode: str = "pretrain",
                 classes: Optional[Sequence[str]] = None):
    """Validate the split's files and return the loader for this rank (module docstring).
    ``classes``: the run's class list for an evaluation split (None: the split's own classes)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    if cfg.dataset == "image_folder":
        from .images import ImageLoader

        return ImageLoader(cfg, split, rank=rank, world_size=world_size, device=device, mode=mode, classes=classes)
    check = validate_dataset(cfg, split, device=device, classes=classes, mode=mode, agree=agree_across_ranks,
                             progress=rank == 0)  # a first probe of Kinetics takes minutes: rank 0 shows it
    if rank == 0:
        n, k = len(check.dataset), check.dataset.num_classes
        log.info("data %s/%s: %d video%s, %d class%s, reader=%s; %s", cfg.dataset, split, n, "" if n == 1 else "s",
                 k, "" if k == 1 else "es", check.reader, check.report.summary().splitlines()[0])
    return VideoLoader(cfg, check, split=split, mode=mode, rank=rank, world_size=world_size, device=device)
