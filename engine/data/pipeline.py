"""DALI graphs of the video pipeline: a Python feeder -> decoder -> one augmentation graph.

Three decode paths, chosen per dataset by :func:`engine.data.loader.choose_reader`:
- ``pyav``: PyAV (FFmpeg, any codec) decodes the clip's frames in a thread pool; the uint8 frames
  (T, H, W, 3) enter DALI through ``fn.external_source``.
- ``cpu``: the encoded file bytes and the frame indices enter through ``fn.external_source`` and
  ``fn.decoders.video`` (DALI's FFmpeg-based CPU decoder: VP9/VP8/MJPEG only) decodes them.
- ``gpu``: as ``cpu`` but ``fn.decoders.video(device="mixed")`` decodes on NVDEC (H.264, HEVC,
  VP9, AV1, ...), and the augmentation runs on the GPU.

Why a feeder rather than ``fn.readers.video`` / ``fn.experimental.readers.video``: those readers
enumerate fixed sequences with their own shuffling buffer, so they can neither draw one random
window per video per epoch (SlowFast semantics) nor resume mid-epoch exactly; the decoders take
per-sample frame indices from the feeder (``sampler.py``), which keeps both exact. Measured here
(DALI 2.4 CPU): ``fn.decoders.video`` with ``frames=`` per-sample argument input works on CPU for
VP9/MJPEG; ``fn.resize`` with per-sample relative ROI, ``fn.flip``, the RandAugment ops and
``fn.crop_mirror_normalize`` to ``CFHW`` accept (F, H, W, C) sequences and apply the same
parameters to every frame of a sample. Also measured: DALI's CPU decoder is 2-3x slower than PyAV
on the same VP9 clips (bench/results/data_cpu_*.md; ``fn.experimental.readers.video`` is as slow),
so ``reader=auto`` uses PyAV on CPU. Known limit: the ``gpu`` path is untested on this CPU
machine (the GPU validation machine has no DALI).

Augmentation graph (same after every decoder): ``fn.resize`` of the relative ROI to
``crop_size``^2 (antialiased linear; this is short-side scaling + RandomResizedCrop in one
resampling), ``fn.flip(horizontal=...)``, optional timm RandAugment (``randaug.py``: timm's
``rand-m7-mstd0.5-inc1``, one draw per clip), ``fn.crop_mirror_normalize`` to
float32 ``(C, T, H, W)`` with mean/std x 255. Random erasing runs afterwards in torch (loader).

Display rotation (phone videos stored sideways with a rotation tag, ``VideoInfo.rotation``): the
``pyav`` path turns the decoded frames upright (``np.rot90``) before they enter DALI. The DALI
decoders ignore it, so the validation pass refuses rotated files for ``cpu``/``gpu``
(``probe.reader_problem``, reason ``rotated``; ``reader=auto`` then takes PyAV).

Files that fail to decode mid-epoch (they passed validation, which decodes the first frame only):
:class:`Feeder` raises :class:`~engine.data.errors.VideoDecodeError` naming the file (exit 5 from
``maskfeat``), or, with a ``replace`` function (``data.on_bad_file=skip``), loads the replacement
clip it returns instead (deterministic, so batches, their count and a resumed epoch are unchanged)
and reports the file through ``on_failure``. Known limit: for ``cpu``/``gpu`` the decoding happens
inside DALI, where a failure cannot be replaced; the feeder only reads bytes there. The image
loader (``images.py``) reuses :class:`Feeder` with ``decode="bytes"`` and ``media="image"``.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import av
import numpy as np

from .errors import ImageDecodeError, VideoDecodeError
from .probe import decoded_frames, rotate_frame
from .sampler import ClipSpec

UNUSED_OUTPUTS_FILTER = dict(action="ignore", message=r".*(is|are) not used.*", module=r"nvidia\.dali")
"""DALI warns while building a pipeline that outputs of the feeder are not used (frame indices under
pyav, RandAugment draws without it, indices and views for images): ignored, the filter installed once
at import. Each build used to install it in a ``warnings.catch_warnings()``, whose exit resets Python's
once-per-location memory, so every library warning (torch's deprecations, DeepSpeed's) came back
every epoch on every rank."""
warnings.filterwarnings(**UNUSED_OUTPUTS_FILTER)

MAX_REPLACEMENTS = 8
"""``on_bad_file=skip``: replacement clips tried for a clip that fails to decode, before giving up."""

log = logging.getLogger(__name__)


class FailureLog:
    """A loader's record of the files that failed to decode after validation (a Feeder's
    ``on_failure``; called from its worker threads): ``paths`` in order of first failure, each file
    once; ``warning`` (a %-format taking the path and the error; None: silent) is logged once per file."""

    def __init__(self, warning: str | None):
        self.paths: list[str] = []
        self._warning = warning
        self._lock = threading.Lock()

    def __call__(self, path: str, error: str) -> None:
        with self._lock:
            if path in self.paths:
                return
            self.paths.append(path)
        if self._warning is not None:
            log.warning(self._warning, path, error)


def _decode_pass(path: str, wanted: set[int], first_wanted: int, short_side: int,
                 timeline: tuple[int, float] | None, rotation: int = 0) -> dict[int, np.ndarray] | None:
    """One decoding pass. Without ``timeline`` it decodes from the start, counting frames (the
    sampler's indices are positions in the stream). With ``timeline = (pts_start, pts_step)``
    (``VideoInfo``: the probe found the stream's times evenly spaced, no gap) it seeks to the key
    frame before ``first_wanted`` and numbers frames ``round((pts - pts_start) / pts_step)``;
    it returns None when the seek landed after ``first_wanted`` or the numbers do not step by one
    (the caller then counts from the start)."""
    got: dict[int, np.ndarray] = {}
    container = av.open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        h0, w0 = stream.codec_context.height, stream.codec_context.width
        scale = short_side / min(h0, w0)
        w, h = (w0, h0) if scale >= 1 else (max(2, round(w0 * scale)), max(2, round(h0 * scale)))
        if timeline is not None:
            t0, step = timeline
            # half a step early: the wanted frame's time is within half a step of t0 + i * step
            try:
                container.seek(t0 + max(0, int((first_wanted - 0.5) * step)), stream=stream, backward=True,
                               any_frame=False)
            except av.error.FFmpegError:  # a stream that does not start on a key frame: count instead
                return None
        idx, last = -1, None
        for frame in decoded_frames(container, stream):
            last = frame
            if timeline is not None:
                if frame.pts is None:
                    return None
                at = int(round((frame.pts - t0) / step))
                if (idx < 0 and at > first_wanted) or (idx >= 0 and at != idx + 1):
                    return None
                idx = at
            else:
                idx += 1
            if idx in wanted and idx not in got:
                got[idx] = rotate_frame(frame.to_ndarray(format="rgb24", width=w, height=h), rotation)  # (H, W, 3)
                if len(got) == len(wanted):
                    break
        else:  # the stream ended first (fewer frames decode than packets counted): the last frame repeats
            past = [m for m in wanted if m > idx] if timeline is None and last is not None else []
            if past:
                img = rotate_frame(last.to_ndarray(format="rgb24", width=w, height=h), rotation)
                got.update((m, img) for m in past)
        return got
    finally:
        container.close()


def decode_clip_pyav(path: str, frames: np.ndarray, short_side: int, rotation: int = 0,
                     timeline: tuple[int, float] | None = None) -> np.ndarray:
    """Decode the frames ``frames`` (any order, repeats allowed) of ``path`` with PyAV.

    With ``timeline`` (``VideoInfo.timeline`` of a probed file whose times are evenly spaced) it
    seeks to the key frame before the first wanted frame when that is past the start, else (or
    when the times after the seek do not number frames one by one) it decodes from the start
    counting frames: the sampler's indices are positions in the stream, which times give only when
    evenly spaced with no gap (a dropped frame's missing time shifted every later frame of a seek
    by one). Frames whose short side exceeds ``short_side`` are scaled down to it, then turned
    upright by ``rotation`` (degrees counter-clockwise, ``VideoInfo.rotation``). Returns uint8
    (T, H, W, 3), H x W as displayed.
    """
    wanted = set(int(f) for f in frames)
    first = min(wanted)
    got = _decode_pass(path, wanted, first, short_side, timeline, rotation) if first > 0 and timeline else None
    if got is None or len(got) < len(wanted):
        got = _decode_pass(path, wanted, first, short_side, None, rotation)
    if not got:  # (the counting pass gives every wanted frame: those past the end are the stream's last)
        raise RuntimeError(f"{path}: no frame decoded")
    return np.ascontiguousarray(np.stack([got[int(f)] for f in frames]))  # (T, H, W, 3); stack keeps rot90's strides


def read_bytes(path: str) -> np.ndarray:
    """The encoded file as a uint8 array (input of ``fn.decoders.video``)."""
    return np.fromfile(path, dtype=np.uint8)


_NO_DRAWS = np.zeros((0, 4), np.float32)  # a clip without RandAugment


def _clip_key(spec: ClipSpec) -> tuple[int, bytes]:
    """What one PyAV decode of ``spec`` depends on: its file and frames (``Feeder``'s shared decodes)."""
    return spec.index, np.asarray(spec.frames).tobytes()


TRAIN_RERUN = "rerun with --resume auto (it continues from the last checkpoint, or, with none yet, starts afresh)"
"""How a training run that stopped on a bad file goes on (the end of the decode error's message)."""


class Feeder:
    """Batch callback of ``fn.external_source``: turns planned batches of ClipSpecs into arrays.

    Clips are loaded in a thread pool, ``depth`` batches ahead of DALI's request. Raises
    StopIteration after the last planned batch (the end of the epoch for DALI).

    ``finish(spec, data)``: the spec to report for a loaded sample, when part of it can only be
    drawn from the data (an image's crop box needs its size). A clip that fails to load (or to
    finish): ``on_failure(path, error)`` is called (from a worker thread); then
    without ``replace`` a :class:`VideoDecodeError` is raised (``rerun`` ends its message: what to
    run after removing the file), with ``replace`` the clip ``replace(spec, attempt)`` is loaded
    in its place (attempts 0, 1, ... up to :data:`MAX_REPLACEMENTS`) and its spec is what the batch
    reports (label, index, view, valid).

    ``media``: ``"video"`` (clips of videos) or ``"image"`` (``images.py``, ``decode="bytes"``: one
    encoded image per sample): words the failure messages (an image has no frames, and its
    validation checks less) and picks the exception (:class:`ImageDecodeError` for images). A
    message suggests ``data.on_bad_file=skip`` only without ``replace`` (skip not set).
    """

    def __init__(self, batches: list[list[ClipSpec]], paths: list[str], decode: str,
                 short_side: int, workers: int, depth: int, *, rotations: list[int] | None = None,
                 timelines: list[tuple[int, float] | None] | None = None,
                 replace: Callable[[ClipSpec, int], ClipSpec] | None = None,
                 on_failure: Callable[[str, str], None] | None = None,
                 rerun: str = TRAIN_RERUN,
                 finish: Callable[[ClipSpec, np.ndarray], ClipSpec] | None = None, media: str = "video"):
        if media not in ("video", "image"):
            raise ValueError(f"media must be 'video' or 'image', got {media!r}")
        self.media = media
        self.batches = batches
        self.paths = paths
        self.decode = decode
        self.short_side = short_side
        self.rotations = rotations
        self.timelines = timelines
        self.replace = replace
        self.on_failure = on_failure
        self.rerun = rerun
        self.finish = finish
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="maskfeat-data")
        self.depth = max(1, depth)
        self.queue: deque[tuple[list[ClipSpec], list[Future]]] = deque()
        self.next_batch = 0
        # clips of one batch with the same file and frames (the repeats of repeated augmentation share
        # their window, as in SlowFast, which decodes once): decoded once, key -> [uses left, Future]
        self._shared: dict[tuple[int, bytes], list] = {}
        self._shared_lock = threading.Lock()

    def _decode_pyav(self, spec: ClipSpec) -> np.ndarray:
        path = self.paths[spec.index]
        rotation = self.rotations[spec.index] if self.rotations is not None else 0
        timeline = self.timelines[spec.index] if self.timelines is not None else None
        key = _clip_key(spec)
        with self._shared_lock:
            entry = self._shared.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    del self._shared[key]
                owner = entry is not None and entry[1] is None
                if owner:
                    entry[1] = Future()
        if entry is None:  # (a clip of its own, or a replacement)
            return decode_clip_pyav(path, spec.frames, self.short_side, rotation, timeline)
        if not owner:  # the first use is decoding it (in another thread, already running)
            return entry[1].result()
        try:
            data = decode_clip_pyav(path, spec.frames, self.short_side, rotation, timeline)
        except BaseException as e:
            entry[1].set_exception(e)
            raise
        entry[1].set_result(data)
        return data

    def _read(self, spec: ClipSpec) -> tuple[ClipSpec, np.ndarray]:
        data = self._decode_pyav(spec) if self.decode == "pyav" else read_bytes(self.paths[spec.index])
        return (spec, data) if self.finish is None else (self.finish(spec, data), data)

    def _failed(self, spec: ClipSpec, e: Exception) -> str:
        path, err = self.paths[spec.index], f"{type(e).__name__}: {e}"
        if self.on_failure is not None:
            self.on_failure(path, err)
        return err

    def _load(self, spec: ClipSpec) -> tuple[ClipSpec, np.ndarray]:
        try:
            return self._read(spec)
        except Exception as e:
            err = self._failed(spec, e)
            if self.replace is None:
                path = self.paths[spec.index]
                if self.media == "image":
                    raise ImageDecodeError(
                        f"{path}: the image cannot be decoded ({err}), although it passed validation (which checks "
                        f"only that the file exists and is not empty). Remove the file (or set "
                        f"data.on_bad_file=skip: it is then replaced by other images and reported), then {self.rerun}",
                        path=path, error=err) from e
                raise VideoDecodeError(
                    f"{path}: decoding frames {int(np.min(spec.frames))}..{int(np.max(spec.frames))} failed ({err}), "
                    f"although the file passed validation (which decodes its first frame only): it is corrupt "
                    f"further in. Remove the file (or set data.on_bad_file=skip: its clips are then replaced by "
                    f"other videos' clips and the file is reported), then {self.rerun}. `maskfeat data prepare "
                    f"--check --full DATA_ROOT` decodes every frame of every file to find any others",
                    path=path, error=err) from e
        tried = [self.paths[spec.index]]
        for attempt in range(MAX_REPLACEMENTS):
            sub = self.replace(spec, attempt)
            try:
                return self._read(sub)
            except Exception as e:
                self._failed(sub, e)
                tried.append(self.paths[sub.index])
        if self.media == "image":
            raise ImageDecodeError(f"{tried[0]} failed to decode, and so did the {MAX_REPLACEMENTS} replacement images "
                                   f"tried ({', '.join(dict.fromkeys(tried[1:]))}); too many files are corrupt: "
                                   f"remove them, then {self.rerun}", path=tried[0])
        raise VideoDecodeError(f"{tried[0]} failed to decode, and so did the {MAX_REPLACEMENTS} replacement clips "
                               f"tried ({', '.join(dict.fromkeys(tried[1:]))}); too many files are corrupt: check them "
                               f"with `maskfeat data prepare --check --full DATA_ROOT`, remove them, then {self.rerun}",
                               path=tried[0])

    def _fill(self) -> None:
        while len(self.queue) < self.depth and self.next_batch < len(self.batches):
            specs = self.batches[self.next_batch]
            if self.decode == "pyav":
                keys = collections.Counter(_clip_key(s) for s in specs)
                with self._shared_lock:
                    for key, n in keys.items():
                        if n > 1:
                            entry = self._shared.setdefault(key, [0, None])
                            entry[0] += n
            self.queue.append((specs, [self.pool.submit(self._load, s) for s in specs]))
            self.next_batch += 1

    def __call__(self):
        self._fill()
        if not self.queue:
            raise StopIteration
        _, futures = self.queue.popleft()
        loaded = [f.result() for f in futures]
        specs = [spec for spec, _ in loaded]  # a replaced clip reports its replacement's spec
        data = [arr for _, arr in loaded]
        self._fill()
        return (
            data,
            [s.frames for s in specs],
            [np.array(s.roi[:2], np.float32) for s in specs],
            [np.array(s.roi[2:], np.float32) for s in specs],
            [np.array(s.flip, np.int32) for s in specs],
            [np.array(s.label, np.int64) for s in specs],
            [np.array(s.index, np.int64) for s in specs],
            [np.array(s.view, np.int64) for s in specs],
            [np.array(s.valid, np.uint8) for s in specs],
            [s.rand_aug if s.rand_aug is not None else _NO_DRAWS for s in specs],
        )

    def close(self) -> None:
        """Cancel the decodes not started and drop the queued clips now: DALI's graph keeps this
        feeder alive in reference cycles until the garbage collector runs, and with it depth ×
        batch decoded clips after a loop that broke off (``max_steps``, a stop) went on to save."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.queue.clear()
        self.batches = []
        with self._shared_lock:
            self._shared.clear()


OUTPUTS = ("video", "label", "index", "view", "valid")


def build_pipeline(feeder: Callable, *, decode: str, batch_size: int, num_threads: int,
                   device_id: int | None, crop_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                   rand_augment: tuple[int, float, float] | None, seed: int, prefetch: int):
    """The DALI pipeline (outputs: :data:`OUTPUTS`); ``rand_augment`` = (n, m, mstd) on timm's 0..10
    scale, or None."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, enable_conditionals=rand_augment is not None)
    def graph():
        data, frames, roi_start, roi_end, flip, label, index, view, valid, draws = fn.external_source(
            source=feeder, num_outputs=10, batch=True,
            layout=["FHWC" if decode == "pyav" else "", "", "", "", "", "", "", "", "", ""])
        if decode == "pyav":
            video = data.gpu() if on_gpu else data
        else:
            video = fn.decoders.video(data, frames=frames, device="mixed" if decode == "gpu" else "cpu")
            if decode == "cpu" and on_gpu:
                video = video.gpu()
        video = fn.resize(video, size=[crop_size, crop_size], roi_start=roi_start, roi_end=roi_end,
                          roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR)
        video = fn.flip(video, horizontal=flip)
        if rand_augment is not None:
            from .randaug import timm_rand_augment

            n, m, mstd = rand_augment
            # the draws come from the sampler (keyed by seed, epoch, position, repeat), so a resumed
            # epoch augments exactly as an uninterrupted one
            video = timm_rand_augment(video, n=n, m=m, mstd=mstd, shape=(crop_size, crop_size), draws=draws)
        video = fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="CFHW",
                                         mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
        return video, label, index, view, valid

    pipe = graph()  # (DALI's "not used" warnings: UNUSED_OUTPUTS_FILTER)
    pipe.build()
    return pipe


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def cuda_dali_usable() -> bool:
    """True when a CUDA device is present and DALI can use it (the ``gpu`` path)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except Exception:
        return False
    return dali_available() and os.environ.get("MASKFEAT_DALI_NO_GPU", "") != "1"
