"""``maskfeat data prepare SRC DST``: re-encode a video dataset into a DALI-friendly form (issue 5).

Each video is decoded with PyAV and re-encoded with a short side of at most ``--short-side`` (no
upscaling, except VP9 below NVDEC's 128x128, scaled up to it when ``--short-side`` is at least
that; even sizes; limited-range yuv420p, full-range input such as MJPEG converted), a
constant frame rate (``--fps``; 0 keeps the source's rate as the probe measures it, the frames'
spacing that training samples by (``VideoInfo.fps``), not the container's declared average; each output frame is the
source frame nearest to its time, so variable-rate input becomes constant and timestamps rounded
to milliseconds or jittered keep every frame), a short GOP
(``--gop``, key frame every N frames, for fast seeking), turned upright when the source has a display
rotation (phone videos; the output has none), and VP9 (``.webm``, decodable by DALI's CPU
and GPU decoders) or H.264 (``.mp4``, GPU/NVDEC or PyAV). A frame whose timestamp is missing or not
after the previous frame's is placed one source frame interval after it, so a file whose
timestamps never increase (all 0) is timed by frame count (frame i at i/rate) instead of being
collapsed to one frame. Without ``--fps`` the output must have the source's number of frames
(within 5 %, at least 2 frames); a file that does not is reported as failed.

SRC layouts (the same as the loader's, engine/data/datasets.py):
- Kinetics-style lists ``SRC/{train,val,test}.csv`` (``path label`` lines): each list is
  re-written under DST with the new names; ``classes.json``/``classnames.json`` as in SRC.
- Split folders ``SRC/{train,val,test}/<class>/<video>`` (the README's fine-tuning layout): one
  list per split present (``DST/train.csv``, ``DST/val.csv``, ...) with ONE class index, the
  sorted class folders of ``train`` (of the first split present if there is no ``train``). A
  class folder of val/test that train lacks is a data error, raised before anything is encoded.
  SRC may hold nothing but split folders next to each other.
- Class folders ``SRC/<class>/<video>``: ``DST/train.csv`` with every file.

DST gets the files at their relative paths (``external/...`` for listed files outside SRC), the
lists with paths relative to DST and ``classes.json`` (:func:`datasets.write_class_index`).
Whitespace in an output name is replaced by ``_`` (list files cannot hold it; the source files
keep their names) and reported; two sources that would get the same output name (``a b.mp4``
and ``a_b.mp4``, or ``v.mp4`` and ``v.avi``), or two folders (``a b/`` and ``a_b/``), are a data
error. Work runs in a process pool with a tqdm bar on a terminal, a progress line a minute elsewhere
(a SLURM log); outputs are written under a temporary name (``.<name>.<run token>.part<pid>``) and
renamed (no temporary file is left on failure; those of a process killed by a signal are removed
when its pool has ended, or at the next run), and existing outputs are skipped, so an interrupted
run resumes (with the same settings: ``DST/.prepare.json`` records them per codec, and a run with
others over existing outputs is a data error, not a mixed dataset). Ctrl-C cancels the videos not
started (exit 130). A worker process that dies (the OOM killer, a crash in FFmpeg) does not stop the run: the
others go on in a new pool, and the file whose process dies again alone is reported as failed.
DST must be writable (a data error before any encoding). ``--check`` only
runs the layout checks and the validation pass over SRC's listing and prints each bad file
with its reason; ``--check --full`` also decodes every frame of every file on the CPU (a file
corrupt in the middle passes the plain check, which decodes the first frame only). Files are
listed by extension (``--extensions``, default :data:`datasets.KNOWN_VIDEO_EXTENSIONS`, case
ignored); video files of other extensions are counted in a warning, and class folders without
files are named in a warning. A file without a video stream, or that is not a regular file (a
FIFO is never opened), is reported as failed with that reason.

Exit status of ``prepare_main``: 0 done, 1 some files failed to encode (they are left out of the
lists) or are bad (``--check``), 2 usage, 5 data error (SRC missing, empty or inconsistent; DST not
writable), 130 interrupted.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import av

import numpy as np

from .config import DataConfig
from .datasets import (KNOWN_VIDEO_EXTENSIONS, Dataset, check_no_split_lookalikes, empty_classes, read_list_file,
                       scan_class_folders, subfolders, warn_loose_files, write_class_index, write_list_file)
from .errors import DataError
from .probe import (NVDEC_MIN_SIZE, ValidationReport, decoded_frames, frame_rotation, is_cover_art, not_regular_file,
                    probe_video, validate_files)

log = logging.getLogger(__name__)

CODECS = {"vp9": ("libvpx-vp9", "webm", ".webm"), "h264": ("libx264", "mp4", ".mp4")}
VIDEO_EXTENSIONS = KNOWN_VIDEO_EXTENSIONS
"""Default of ``--extensions``: every video extension FFmpeg reads (the output is VP9/H.264 anyway)."""
SPLITS = ("train", "val", "test")
FRAME_COUNT_TOLERANCE = 0.05
"""Without ``--fps``, output and source frame counts may differ by this fraction (at least 2 frames)."""
DEFAULT_CRF = {"vp9": 32, "h264": 23}
EXIT_FAILED, EXIT_DATA_ERROR = 1, 5  # argparse exits 2 on a usage error
EPS = 1e-6
"""Seconds: timestamps this close count as equal (float pts vs. output frame times)."""


class EncodeError(RuntimeError):
    """A source file that cannot be re-encoded, for a reason stated in full by the message."""


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _rotate_yuv420p(img: av.VideoFrame, rotation: int) -> av.VideoFrame:
    """A yuv420p frame (even sizes) turned by ``rotation`` degrees counter-clockwise, plane by plane."""
    k = (rotation // 90) % 4
    if k == 0:
        return img
    h, w = img.height, img.width
    flat = img.to_ndarray().reshape(-1)  # Y (h*w), then U and V (h/2*w/2 each)
    ny, nc = h * w, (h // 2) * (w // 2)
    y = np.rot90(flat[:ny].reshape(h, w), k)
    u = np.rot90(flat[ny:ny + nc].reshape(h // 2, w // 2), k)
    v = np.rot90(flat[ny + nc:ny + 2 * nc].reshape(h // 2, w // 2), k)
    out_w = y.shape[1]
    packed = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(-1, out_w)  # (H' * 3/2, W')
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(packed), format="yuv420p")


def _count_packets(path: str) -> int:
    """Frames stored in a file we wrote (one packet per frame for VP9/webm and H.264/mp4)."""
    with av.open(path) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


NAME_MAX = 255
"""Bytes in one file name (Linux filesystems)."""

RUN_TOKEN_ENV = "MASKFEAT_PREPARE_RUN"
"""Environment variable (set by :func:`prepare_dataset` for its worker processes) naming the run in
its temporary file names (``.<name>.<token>.part<pid>``)."""


def encode_video(src: str, dst: str, *, codec: str = "vp9", short_side: int = 320, fps: float = 0.0,
                 gop: int = 16, crf: Optional[int] = None) -> int:
    """Re-encode ``src`` to ``dst`` (see module docstring); returns frames written. Atomic: ``dst``
    appears only when complete and the temporary file is removed on any failure. ``crf``: the
    encoder's quality (lower is better), default 32 for VP9 and 23 for H.264 (it was ignored for
    H.264).

    Raises RuntimeError when nothing decodes, when the written file does not hold every encoded
    frame, or (``fps`` 0) when the frame count differs from the source's beyond
    :data:`FRAME_COUNT_TOLERANCE`.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    encoder, fmt, _ = CODECS[codec]
    name = os.path.basename(dst)
    if len(os.fsencode(name)) > NAME_MAX:
        raise ValueError(f"the output name {name!r} is {len(os.fsencode(name))} bytes, over the filesystem's "
                         f"{NAME_MAX}: shorten the source file's name")
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    # the run's token in the name: two runs in separate pid namespaces (containers) sharing DST have workers
    # of the same pids, which wrote one temporary file together (and one run's cleanup removed the other's)
    run = os.environ.get(RUN_TOKEN_ENV, "")
    tag = f".{run}.part{os.getpid()}" if run else f".part{os.getpid()}"
    tmp_name = f".{name}{tag}"
    if len(os.fsencode(tmp_name)) > NAME_MAX:  # a long (CJK, downloaded-title) name: a short temporary one
        import hashlib

        tmp_name = f".{hashlib.sha1(os.fsencode(name)).hexdigest()[:20]}{tag}"
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), tmp_name)
    try:
        written, decoded = _encode(src, tmp, encoder, fmt, codec, short_side, fps, gop,
                                   crf if crf is not None else DEFAULT_CRF[codec])
        if written == 0:
            raise RuntimeError(f"{src}: no frames decoded")
        stored = _count_packets(tmp)
        if stored != written:
            raise RuntimeError(f"{src}: the encoder stored {stored} of {written} frames")
        if fps <= 0 and abs(written - decoded) > max(2, FRAME_COUNT_TOLERANCE * decoded):
            raise RuntimeError(f"{src}: wrote {written} frames for {decoded} source frames (timestamps "
                               f"inconsistent with the average frame rate; pass --fps to resample)")
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return written


def _encode(src: str, tmp: str, encoder: str, fmt: str, codec: str, short_side: int, fps: float, gop: int,
            crf: int) -> tuple[int, int]:
    """Encode ``src`` into ``tmp``; returns (frames written, frames decoded)."""
    written = decoded = 0
    with av.open(src) as inp:
        if not inp.streams.video:
            kinds = sorted({st.type for st in inp.streams})
            raise EncodeError(f"{src}: no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
        sin = inp.streams.video[0]
        if is_cover_art(sin):
            raise EncodeError(f"{src}: its first video stream is cover art (an attached picture, as audio files have)")
        if sin.codec_context is None:  # PyAV: no decoder in this FFmpeg (an unknown FourCC)
            raise EncodeError(f"{src}: FFmpeg has no decoder for its video stream")
        sin.thread_type = "AUTO"
        w0, h0 = sin.codec_context.width, sin.codec_context.height
        # non-square pixels (anamorphic DV, DVD, AVCHD 1440x1080 shown at 16:9): the output has square
        # ones, at the shape the file is shown at (the loader and DALI crop stored pixels, and an
        # output of the stored size with no aspect tag would show squeezed)
        # FFmpeg's rule (av_guess_sample_aspect_ratio): the container's ratio (an MP4 pasp box, Matroska's
        # display size) first, which VP9 and AV1 have only there; else the bitstream's
        sar = sin.sample_aspect_ratio or sin.codec_context.sample_aspect_ratio
        if sar is not None and sar > 0 and sar != 1:
            w0 = w0 * float(sar)
        s = min(1.0, short_side / min(w0, h0))
        # NVDEC refuses VP9 under 128x128, and one such file takes a dataset's `auto` reader off the
        # GPU: a smaller source is scaled up to it (unless --short-side itself asks for less)
        floor = max(NVDEC_MIN_SIZE.get(codec, (0, 0)))
        if short_side >= floor > min(w0, h0) * s:
            s = floor / min(w0, h0)
        w, h = _even(w0 * s), _even(h0 * s)  # scaled size as stored; the output is turned upright
        # (the frames before the first that decodes are left out, as the probe and the loader count: a
        # VP9 stream cut before its first key frame raised on them)
        source = decoded_frames(inp, sin)
        head = next(source, None)
        rotation = frame_rotation(head) if head is not None else 0
        frames = itertools.chain([head], source) if head is not None else iter(())
        # the probe's rate (the frames' spacing, as the loader samples them): the declared average of an
        # MP4 whose last frame lasts 4 s was 13.7 for 30 fps frames, and Matroska declares 30 for a
        # variable rate averaging 24 (both failed the frame-count check)
        info = probe_video(src).info
        src_rate = (Fraction(info.fps) if info is not None and info.fps > 0 else None) \
            or sin.average_rate or sin.guessed_rate or Fraction(25)
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(src_rate).limit_denominator(1001)
        step = 1.0 / float(src_rate)  # one source frame interval: the time of a frame without a usable pts
        out = av.open(tmp, "w", format=fmt)
        try:
            so = out.add_stream(encoder, rate=rate)
            so.width, so.height = (h, w) if rotation % 180 else (w, h)
            so.pix_fmt = "yuv420p"
            so.codec_context.gop_size = gop
            so.codec_context.colorspace, so.codec_context.color_range = 5, 1  # BT.601 (BT470BG), limited range
            so.options = ({"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": str(crf), "b": "0"}
                          if codec == "vp9" else {"preset": "veryfast", "crf": str(crf)})
            t0 = 0.0
            prev = None
            last_t = 0.0

            def emit(frame: av.VideoFrame) -> None:
                nonlocal written
                # full-range input (MJPEG's yuvj420p) is converted to the limited range that yuv420p
                # streams are decoded as; without the ranges swscale copies the levels unchanged. BT.709
                # input (HD video) is converted to BT.601, which the output is tagged with: its YUV was
                # copied and the untagged output decoded as BT.601, shifting the colours (red 200 -> 185)
                img = frame.reformat(width=w, height=h, format="yuv420p", src_color_range=frame.color_range or None,
                                     dst_color_range="MPEG", dst_colorspace="ITU601")
                img = _rotate_yuv420p(img, rotation)
                img.pts, img.time_base = written, 1 / rate  # constant frame rate in output time
                for packet in so.encode(img):
                    out.mux(packet)
                written += 1

            for frame in frames:
                decoded += 1
                raw = float(frame.time) if frame.time is not None else None
                if prev is None:  # times are relative to the first frame
                    t0, t = (raw or 0.0), 0.0
                elif raw is None or raw - t0 <= last_t:  # missing or not increasing: count frames
                    t = last_t + step
                else:
                    t = raw - t0
                # each output time shows the source frame nearest to it: prev up to the midpoint between
                # prev and this frame, a tie included (so 2x gives 0 0 1 1 ...). Up to this frame's time,
                # a frame whose timestamp was rounded up -- Matroska's milliseconds, a phone's jitter --
                # lost its slot to a repeat of prev
                while prev is not None and written / float(rate) < (last_t + t) / 2 + EPS:
                    emit(prev)
                prev, last_t = frame, t
            if prev is not None:  # the last frame: to the midpoint with a next one a source interval later
                end = last_t + step / 2  # (a tie there is the last frame's too: 30 -> 60 fps gives 2n frames)
                while written / float(rate) < end + EPS or written == 0:
                    emit(prev)
            for packet in so.encode():
                out.mux(packet)
        finally:
            out.close()
    return written, decoded


def _job(args: tuple[str, str, str, int, float, int]) -> tuple[str, str]:
    src, dst, codec, short_side, fps, gop = args
    if not os.path.exists(src):
        return src, (f"a symbolic link to {os.readlink(src)}, which does not exist" if os.path.islink(src) else
                     "no such file")
    irregular = not_regular_file(src)
    if irregular:  # a FIFO would block the open forever
        return src, irregular
    if os.path.getsize(src) == 0:
        return src, "empty (zero-length file)"
    try:
        encode_video(src, dst, codec=codec, short_side=short_side, fps=fps, gop=gop)
        return src, ""
    except EncodeError as e:
        return src, str(e).removeprefix(f"{src}: ")
    except Exception as e:  # reported per file by the caller
        return src, f"{type(e).__name__}: {e}"


def _split_folder_listings(src: str, splits: list[str], extensions: tuple[str, ...]) -> dict[str, Dataset]:
    """``SRC/<split>/<class>/<video>``: one listing per split, numbered by the reference split's
    (train's) class folders; a class folder the reference split lacks is a ClassListError."""
    ref = "train" if "train" in splits else splits[0]
    warn_loose_files(src, extensions, "its split folders")
    found = {ref: scan_class_folders(os.path.join(src, ref), extensions)}
    names = found[ref].class_names
    for s in splits:
        if s != ref:
            found[s] = scan_class_folders(os.path.join(src, s), extensions, classes=names)
    return {s: found[s] for s in splits}


def _listings(src: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> dict[str, Dataset]:
    """Split name -> listing of SRC (layouts in the module docstring). Raises DataError."""
    if not os.path.isdir(src):
        raise DataError(f"source folder {src} not found")
    try:
        lists = {s: p for s in SPLITS if os.path.isfile(p := os.path.join(src, f"{s}.csv"))}
        if lists:  # the other lists through train's classes, as fine-tuning reads them (a val label train
            ref = "train" if "train" in lists else next(iter(lists))  # lacks passed here, then was refused there)
            found = {ref: read_list_file(lists[ref], src)}
            found.update({s: read_list_file(p, src, found[ref].class_names) for s, p in lists.items() if s != ref})
            return {s: found[s] for s in lists}
        sub = subfolders(src)
        splits = [s for s in SPLITS if s in sub]
        if not splits:
            check_no_split_lookalikes(src)
            return {"train": scan_class_folders(src, extensions)}
        others = [d for d in sub if d not in SPLITS]
        if others:
            raise DataError(f"{src} mixes split folders ({', '.join(splits)}) with other folders "
                            f"({', '.join(others)}): expected SRC/<split>/<class>/<video> or SRC/<class>/<video>")
        return _split_folder_listings(src, splits, extensions)
    except OSError as e:  # an unreadable folder (datasets.py raises DataError for bad lists, empty folders)
        raise DataError(str(e)) from e


_WHITESPACE = re.compile(r"\s")


def _output_names(src: str, splits: dict[str, Dataset], ext: str) -> tuple[dict[str, str], dict[str, str]]:
    """Source path -> output path relative to DST, and the subset whose name had whitespace replaced.
    Raises DataError when two sources get the same output name, or two folders the same output folder
    (``a b/`` and ``a_b/``: two classes merged into one folder of the lists). One file listed under two
    spellings of its path (``../ext/v.mp4`` and ``/data/ext/v.mp4``) is one output."""
    mapping: dict[str, str] = {}
    renamed: dict[str, str] = {}
    owner: dict[str, str] = {}
    folders: dict[str, str] = {}  # output folder -> the source folder it comes from
    by_file: dict[str, str] = {}  # real path -> its output
    for ds in splits.values():
        for p in ds.paths:
            if p in mapping:
                continue
            real = os.path.realpath(p)
            if real in by_file:
                mapping[p] = by_file[real]
                continue
            rel = os.path.relpath(p, src)
            if rel.startswith(".."):  # listed outside SRC: keep it inside DST
                rel = os.path.join("external", rel.replace("..", "up").lstrip(os.sep))
            out = os.path.splitext(rel)[0] + ext
            clean = _WHITESPACE.sub("_", out)
            if clean in owner:
                raise DataError(f"{owner[clean]} and {p} would both be prepared as {clean}; rename one of them")
            folder = os.path.dirname(rel)
            while folder:
                out_folder = _WHITESPACE.sub("_", folder)
                if folders.setdefault(out_folder, folder) != folder:
                    raise DataError(f"the folders {folders[out_folder]!r} and {folder!r} of {src} would both be "
                                    f"prepared as {out_folder!r} (whitespace becomes '_'); rename one of them")
                folder = os.path.dirname(folder)
            owner[clean] = p
            mapping[p] = by_file[real] = clean
            if clean != out:
                renamed[p] = clean
    return mapping, renamed


def _write_list(path: str, entries: list[tuple[str, int]]) -> None:
    """:func:`datasets.write_list_file`, leaving no temporary file behind when it fails."""
    try:
        write_list_file(path, entries)
    except BaseException:
        tmp = f"{path}.tmp{os.getpid()}"  # write_list_file's temporary name
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` did."""

    failures: dict[str, str] = field(default_factory=dict)
    """Source path -> error, for files that could not be encoded (left out of the lists)."""
    renamed: dict[str, str] = field(default_factory=dict)
    """Source path -> output path relative to DST, for names whose whitespace was replaced by ``_``."""
    lists: dict[str, int] = field(default_factory=dict)
    """Split -> number of entries written to ``DST/<split>.csv``."""
    class_names: list[str] = field(default_factory=list)


def prepare_dataset(src: str, dst: str, *, codec: str = "vp9", short_side: int = 320, fps: float = 0.0,
                    gop: int = 16, workers: int = 2, progress: bool = True,
                    extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> PrepareResult:
    """Re-encode every listed file of ``src`` into ``dst`` and write the lists (module docstring).

    Layout problems raise :class:`DataError` before anything is encoded or written."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    overlap = dst_inside_src(src, dst)
    if overlap:
        raise ValueError(overlap)
    splits = _listings(src, extensions)
    _warn_empty_classes(splits)
    mapping, renamed = _output_names(src, splits, CODECS[codec][2])
    source: dict[str, str] = {}  # output -> its source (the first spelling of a file listed twice)
    for p, rel in mapping.items():
        source.setdefault(rel, p)
    todo = [(p, os.path.join(dst, rel), codec, short_side, fps, gop) for rel, p in source.items()
            if not os.path.isfile(os.path.join(dst, rel))]
    names = next(iter(splits.values())).class_names  # train's (or the first split's): the others are read through them
    result = PrepareResult(renamed=renamed, class_names=list(names))
    problem = folder_write_problem(dst)  # (every file used to be tried, then the lists' write failed)
    if problem:
        raise DataError(f"DST {dst} cannot be written ({problem}): choose a writable output folder")
    check_settings(dst, codec, {"short_side": short_side, "fps": fps, "gop": gop}, existing=len(source) - len(todo))
    remove_stale_parts(dst)
    if todo:
        from engine.logging import work_progress

        workers = max(1, workers)
        before = os.environ.get(RUN_TOKEN_ENV)
        os.environ[RUN_TOKEN_ENV] = os.urandom(4).hex()  # (each pool sets it in its workers: _pool)
        try:
            with work_progress(len(todo), "prepare", "video", enabled=progress) as bar:
                pending = todo
                while pending:  # a worker process that dies (killed: out of memory?) breaks the pool: a new one
                    ended, pending = _run_jobs(pending, workers, result.failures, bar)
                    if pending and not ended:  # it died before any job ended: the culprit is among the first
                        for t in pending[:workers]:
                            _run_alone(t, result.failures)  # each in its own process: one that dies again is named
                            bar.update(1)
                        pending = pending[workers:]
        finally:
            if before is None:
                os.environ.pop(RUN_TOKEN_ENV, None)
            else:
                os.environ[RUN_TOKEN_ENV] = before
    failed = {mapping[f] for f in result.failures}  # (by output: a file listed under two spellings)
    for split, ds in splits.items():
        entries = [(mapping[p], l) for p, l in zip(ds.paths, ds.labels) if mapping[p] not in failed]
        _write_list(os.path.join(dst, f"{split}.csv"), entries)
        result.lists[split] = len(entries)
    for extra in ("classnames.json",):
        if os.path.isfile(os.path.join(src, extra)):
            shutil.copyfile(os.path.join(src, extra), os.path.join(dst, extra))
    write_class_index(os.path.join(dst, "classes.json"), result.class_names)
    return result


SETTINGS_FILE = ".prepare.json"
"""In DST: the encoding settings of its videos (codec, short side, fps, GOP), compared by each run."""


def check_settings(dst: str, codec: str, settings: dict[str, Any], existing: int) -> None:
    """Record ``settings`` (short side, fps, GOP) of ``codec``'s outputs in ``DST/.prepare.json`` (one
    entry per codec: each has its own file names), or compare them with the entry there: a run with
    other settings would skip the ``existing`` outputs (their names are taken) and mix two encodings
    silently (a re-run at ``--short-side 403`` kept every 320 px video). DataError then. An entry with
    no output of its codec left is replaced; a DST with outputs and no entry (an older version's) is
    left unrecorded: their settings are unknown."""
    import json

    path = os.path.join(dst, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        record = {}
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): delete it if DST's videos are to be kept as they are") from e
    if not isinstance(record, dict) or not all(isinstance(v, dict) for v in record.values()):
        raise DataError(f"{path} is not a settings record: delete it if DST's videos are to be kept as they are")
    saved = record.get(codec)
    if saved is not None:
        other = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if not other:
            return
        if existing:
            said = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in sorted(other.items()))
            raise DataError(f"DST {dst} holds {codec} videos prepared with other settings: {said}. Existing outputs "
                            "are skipped, so the dataset would mix both: use a new DST, re-run with the recorded "
                            f"settings, or delete DST's {codec} videos and {SETTINGS_FILE}")
    elif existing:
        log.warning("DST %s holds %d %s output(s) of an earlier prepare that recorded no settings: they are kept "
                    "as they are, whatever their encoding", dst, existing, codec)
        return
    from engine.checkpoint import write_text_atomic

    os.makedirs(dst, exist_ok=True)
    write_text_atomic(path, json.dumps({**record, codec: settings}, sort_keys=True))


def _run_jobs(todo: list, workers: int, failures: dict[str, str], bar) -> tuple[int, list]:
    """Encode ``todo`` in ``workers`` processes, recording failures. Returns how many jobs ended and
    the jobs left undone, in submission order, when a worker process died (the pool is then broken).
    Ctrl-C cancels the jobs not started (the running ones stop too: their processes get the same
    signal and remove their temporary files)."""
    from concurrent.futures.process import BrokenProcessPool

    ex = _pool(workers)
    futures: dict = {}
    ended, lost, unsubmitted = 0, set(), []
    pids: set[int] = set()  # the pool's processes (their temporary files are orphans once they ended)
    try:
        for i, t in enumerate(todo):  # (submitting 240k jobs takes a second: a worker can die meanwhile)
            try:
                futures[ex.submit(_job, t)] = t
            except BrokenProcessPool:
                unsubmitted = todo[i:]
                break
        for fut in as_completed(futures):
            pids.update(getattr(ex, "_processes", None) or ())
            try:
                s, err = fut.result()
            except BrokenProcessPool:
                lost.add(fut)
                continue
            ended += 1
            if err:
                failures[s] = err
            bar.update(1)
    finally:
        pids.update(getattr(ex, "_processes", None) or ())
        ex.shutdown(wait=True, cancel_futures=True)
        # a worker killed by a signal (the OOM killer; SIGTERM from SLURM) never removed its temporary file,
        # and the next run waited STALE_PART_S before it did; every process of this pool has ended now
        _remove_parts_of({os.path.dirname(t[1]) for t in todo}, pids, os.environ.get(RUN_TOKEN_ENV, ""))
    return ended, [t for f, t in futures.items() if f in lost] + unsubmitted


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers name their temporary files with this run's token (set in each
    worker: a forkserver's workers keep the environment the server started with, another run's)."""
    return ProcessPoolExecutor(workers, initializer=_set_run_token, initargs=(os.environ.get(RUN_TOKEN_ENV, ""),))


def _set_run_token(token: str) -> None:
    if token:
        os.environ[RUN_TOKEN_ENV] = token
    else:
        os.environ.pop(RUN_TOKEN_ENV, None)


def _remove_parts_of(folders: set[str], pids: set[int], run: str) -> None:
    """Remove the temporary files of this run's (ended) processes ``pids`` in ``folders`` (``run``: its
    token; a run in another pid namespace has processes of the same numbers)."""
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            m = _PART.match(name)
            if m is not None and int(m.group(1)) in pids and (not run or f".{run}.part" in name):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


def _run_alone(job: tuple, failures: dict[str, str]) -> None:
    from concurrent.futures.process import BrokenProcessPool

    with _pool(1) as ex:
        fut = ex.submit(_job, job)
        pids = set(getattr(ex, "_processes", None) or ())
        try:
            s, err = fut.result()
        except BrokenProcessPool:
            s, err = job[0], "the process encoding it died (killed by a signal: out of memory?)"
    _remove_parts_of({os.path.dirname(job[1])}, pids, os.environ.get(RUN_TOKEN_ENV, ""))
    if err:
        failures[s] = err


_PART = re.compile(r"^\..+\.part(\d+)$")


STALE_PART_S = 600
"""A temporary file not written to for this long, whose process is gone, is a leftover."""


def remove_stale_parts(dst: str) -> int:
    """Remove the temporary files (``.<name>.part<pid>``) that an encoding process killed by a
    signal left in ``dst`` (its own cleanup never ran): those whose process is not running here
    and that nothing wrote to for :data:`STALE_PART_S` (a ``prepare`` on another host sharing DST,
    or in another pid namespace, writes its own continuously). Returns how many were removed."""
    import time

    removed, now = 0, time.time()
    for folder, _, files in os.walk(dst):
        for name in files:
            m = _PART.match(name)
            if m is None:
                continue
            try:
                if now - os.stat(os.path.join(folder, name)).st_mtime < STALE_PART_S:
                    continue
            except OSError:
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # alive: not ours to remove
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, ValueError):
                continue  # alive (another user's), or not a pid
            try:
                os.remove(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def folder_write_problem(path: str) -> str:
    """Create ``path`` and write a file there (:func:`engine.checkpoint.write_problem`); why that fails,
    or "" when it works. Checked before any work that ends by writing there."""
    from engine.checkpoint import write_problem

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return str(e.strerror or e)
    e = write_problem(path)
    return str(e.strerror or e) if e else ""


def dst_inside_src(src: str, dst: str) -> str:
    """Why ``dst`` cannot be the output root of ``src`` (the same folder or one inside it, after
    resolving links), or "" when it can. Outputs written there would land beside the sources (VP9:
    ``.webm`` next to each ``.mp4``, the lists into SRC) or be taken for done (H.264: ``.mp4`` outputs
    at the sources' own paths, so nothing is encoded)."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if d == s:
        return f"DST {dst} is SRC {src}: choose an output folder outside SRC"
    if os.path.commonpath([s, d]) == s:
        return f"DST {dst} is inside SRC {src}: choose an output folder outside SRC"
    return ""


def build_prepare_parser() -> argparse.ArgumentParser:
    """The argument parser of ``maskfeat data prepare``."""
    ap = argparse.ArgumentParser(
        prog="maskfeat data prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-encode a video dataset (VP9 or H.264, short side <= --short-side, constant frame rate,\n"
                    "short GOP) so that DALI decodes it fast; --check only validates SRC.",
        epilog="SRC layouts: SRC/{train,val,test}.csv (Kinetics lists); SRC/{train,val,test}/<class>/<video>\n"
               "(one DST/<split>.csv per split, one class index: train's class folders); SRC/<class>/<video>\n"
               "(DST/train.csv). DST mirrors SRC and gets classes.json; whitespace in output names becomes '_'.\n"
               "Without --fps a file whose output frame count differs from its source's is reported as failed.\n"
               "--check decodes the first frame of each file; --check --full decodes every frame (slower).\n"
               "Rotated phone videos are written upright.\n"
               "Exit status: 0 done, 1 some files failed (left out of the lists) or are bad (--check), 2 usage,\n"
               "5 data error (SRC missing, empty or inconsistent, or DST not writable; nothing is encoded),\n"
               "130 interrupted (run the same command again to finish).")
    ap.add_argument("src", help="Kinetics-style root (train/val/test.csv), folder of split folders "
                                "(train/val/test/<class>/) or folder of class sub-folders")
    ap.add_argument("dst", nargs="?", default="", help="output root (not needed with --check)")
    ap.add_argument("--codec", choices=sorted(CODECS), default="vp9",
                    help="vp9 (.webm; DALI CPU and GPU) or h264 (.mp4; GPU/NVDEC or PyAV)")
    ap.add_argument("--short-side", type=int, default=320, help="at most this many pixels (no upscaling, except VP9 under NVDEC's 128x128 when this is at least 128)")
    ap.add_argument("--fps", type=float, default=0.0, help="constant output rate; 0 keeps the source rate")
    ap.add_argument("--gop", type=int, default=16, help="key frame interval in frames")
    ap.add_argument("--workers", type=int, default=usable_cpus(),
                    help="encoding processes (default: the CPUs this process may use, %(default)s here)")
    ap.add_argument("--min-frames", type=int, default=1,
                    help="--check: frames one clip needs, whatever the file's frame rate (see --config)")
    ap.add_argument("--config", default=None,
                    help="--check: a training recipe (YAML): files shorter than one of its clips, by the file's "
                         "own frame rate as training counts them (data.num_frames x data.sampling_rate at "
                         "data.target_fps: 61 frames at 30 fps, 121 at 60 fps for 16x4), are named (their last "
                         "frame repeats in training) or, under its data.short_videos=bad, bad")
    ap.add_argument("--check", action="store_true", help="only validate SRC (first frame of each file); print bad files")
    ap.add_argument("--full", action="store_true",
                    help="with --check: decode every frame of every file on the CPU (slower; finds files corrupt "
                         "in the middle)")
    ap.add_argument("--extensions", default=",".join(VIDEO_EXTENSIONS),
                    help="comma-separated file extensions listed in class folders, case ignored (default: %(default)s)")
    return ap


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM or cpuset allocation; ``os.cpu_count``
    counts the whole node: 128 encoders on a node where 8 CPUs were given). A CPU quota (``docker
    --cpus``, a Kubernetes limit) does not show here: pass ``--workers`` there."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity on macOS)
        return os.cpu_count() or 1


def parse_extensions(text: str) -> tuple[str, ...]:
    """``"mp4,.MTS, 3gp"`` -> ``(".mp4", ".mts", ".3gp")``; raises ValueError when empty."""
    exts = tuple(dict.fromkeys("." + e.strip().lstrip(".").lower() for e in text.split(",") if e.strip().lstrip(".")))
    if not exts:
        raise ValueError(f"no extension in {text!r}")
    return exts


def _warn_empty_classes(splits: dict[str, Dataset]) -> None:
    """Print a warning naming the class folders of each split listing that hold no video file (a
    class another split has but this split lacks a folder for is not named)."""
    for split, ds in splits.items():
        empty = [n for n in empty_classes(ds) if os.path.isdir(os.path.join(ds.source, n))]
        if empty:
            print(f"warning: {ds.source or split}: {len(empty)} class(es) without video files: "
                  f"{', '.join(empty[:20])}{' ...' if len(empty) > 20 else ''}", file=sys.stderr)


def _short_training_files_are_bad(cfg: DataConfig, report: ValidationReport, splits: dict[str, Dataset]) -> None:
    """``--check --config`` of a recipe with ``data.short_videos=bad``: the training split's good files
    shorter than one clip become bad (``too_short``), as training's validation makes them; those of
    val/test stay good (evaluation keeps them, padded: they were reported bad, and a user would have
    deleted valid validation videos)."""
    from .probe import BadFile

    train = set(splits["train"].paths) if "train" in splits else set()
    short = cfg.shorter_than_a_clip({p: i for p, i in report.good.items() if p in train})
    for path, n, need in short:
        del report.good[path]
        report.bad.append(BadFile(path, "too_short", f"{n} frames, one clip needs {need}"))


def _note_short(cfg: DataConfig, report: ValidationReport) -> None:
    """``--check --config`` of a recipe that pads: name the good files shorter than one of its clips."""
    short = cfg.shorter_than_a_clip(report.good)
    for path, n, need in short[:20]:
        print(f"  short: {path} ({n} frames, one clip spans {need})")
    if short:
        print(f"note: {len(short)} file(s) shorter than one clip of the recipe{' (20 named)' if len(short) > 20 else ''}: "
              "training repeats their last frame, as SlowFast does (data.short_videos=bad makes them bad files)")


def prepare_main(argv: list[str]) -> int:
    """Command line of ``maskfeat data prepare`` (module docstring); returns the exit status."""
    ap = build_prepare_parser()
    args = ap.parse_args(argv)
    for name in ("short_side", "gop", "workers", "min_frames"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.fps) or args.fps < 0:  # (nan passed: every run then differed from its record)
        ap.error(f"--fps must be 0 (keep the source rate) or positive, got {args.fps}")
    if args.full and not args.check:  # (before DST's check: `prepare SRC --full` was told DST is required)
        ap.error("--full goes with --check (prepare itself decodes every frame)")
    if not args.check and not args.dst:
        ap.error("DST is required unless --check")
    if not args.check and dst_inside_src(args.src, args.dst):
        ap.error(dst_inside_src(args.src, args.dst))
    if args.config:
        if not args.check:
            ap.error("--config goes with --check")
        if args.min_frames != 1:
            ap.error("--config and --min-frames both say how long a clip is: give one")
        from engine.config import ConfigError, load_config

        try:
            data_cfg = load_config(args.config).data
        except ConfigError as e:
            ap.error(f"--config: {e}")
    try:
        extensions = parse_extensions(args.extensions)
    except ValueError as e:
        ap.error(f"--extensions: {e}")
    try:
        if args.check:
            splits = _listings(args.src, extensions)
            _warn_empty_classes(splits)
            try:  # a name collision matters to prepare only (a folder dataset trains on SRC as it is): said, and
                _output_names(args.src, splits, CODECS[args.codec][2])  # the check goes on (it stopped with exit 5)
            except DataError as e:
                print(f"note: `data prepare` of SRC would stop: {e}", file=sys.stderr)
            paths = list(dict.fromkeys(p for ds in splits.values() for p in ds.paths))
            report = validate_files(paths, reader="pyav", min_frames=args.min_frames, workers=args.workers,
                                    progress=True, full=args.full)
            if args.config and data_cfg.short_videos == "bad":  # training's files only: evaluation keeps them
                _short_training_files_are_bad(data_cfg, report, splits)
            print(report.summary())
            if args.config and data_cfg.short_videos != "bad":
                _note_short(data_cfg, report)
            if not args.full:
                print("(the first frame of each file was decoded; --full decodes every frame)")
            _note_missing_val(list(splits))
            return EXIT_FAILED if report.bad else 0
        res = prepare_dataset(args.src, args.dst, codec=args.codec, short_side=args.short_side, fps=args.fps,
                              gop=args.gop, workers=args.workers, extensions=extensions)
    except DataError as e:
        print(f"maskfeat data prepare: data error: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt:
        print("maskfeat data prepare: interrupted" + ("" if args.check else
              "; the videos written so far are kept (each is complete): run the same command again to encode the "
              "rest and write the lists"), file=sys.stderr)
        return 130
    for s, err in sorted(res.failures.items()):
        print(f"failed: {s}: {err}", file=sys.stderr)
    if res.renamed:
        first = next(iter(res.renamed.items()))
        print(f"{len(res.renamed)} output names had whitespace replaced by '_' (e.g. {first[0]} -> {first[1]})")
    lists = ", ".join(f"{s}.csv {n}" for s, n in res.lists.items())
    print(f"prepared into {args.dst}: {lists}; {len(res.class_names)} classes ({len(res.failures)} failures)")
    _note_missing_val(list(res.lists))
    return EXIT_FAILED if res.failures else 0


def _note_missing_val(splits: list[str]) -> None:
    """Say what fine-tuning will miss when there is no val split (it evaluates finetune.eval_split,
    val by default, and refuses to start without it)."""
    if "val" not in splits:
        use = ("finetune.eval_split=test" if "test" in splits else
               "finetune.eval_split=train (accuracy on the training videos)")
        print(f"note: no val split (only {', '.join(splits)}): fine-tuning evaluates finetune.eval_split, val by "
              f"default; add SRC/val (or val.csv), or set {use}")
