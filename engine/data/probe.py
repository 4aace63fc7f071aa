"""PyAV probe of video files and the validation pass that runs before training (issue 5).

Why: DALI's CPU video decoder handles only VP9/VP8/MJPEG and *silently* drops other codecs from a
file list (one stderr line, measured with DALI 2.4, DESIGN §4). So every file is probed here with
PyAV (FFmpeg) first, and each bad file is reported by name and reason; ``on_bad_file`` decides
whether that is an error or the file is skipped. Nothing is dropped silently.

The probe demuxes every packet of the video stream (no decoding, cheap) to count frames and test
for a constant frame rate, and decodes the first frame to catch corrupt streams and to read the
display rotation (``VideoInfo.rotation``, from the frame's display matrix: phone videos are
stored sideways with a "rotate" tag). Results are cached in a JSON file keyed by absolute path +
size + mtime, so a second pass over an unchanged dataset only stats the files. Reasons
(``BadFile.reason``): ``missing``, ``unreadable`` (including anything that is not a regular file,
such as a FIFO, which is never opened, and an I/O error while FFmpeg reads it: neither is cached, so
a file a network filesystem failed to serve once is not left out of later runs), ``empty``,
``not_video``, ``decode_error``, ``codec`` (the chosen reader cannot decode it, or FFmpeg itself has
no decoder for it), ``too_short`` (fewer frames than one clip spans; training under ``data.short_videos=bad`` only: otherwise the last frame repeats), ``vfr``
(variable frame rate where the reader needs constant), ``too_small`` (below NVDEC's minimum frame
size, GPU reader only), ``pix_fmt`` (not 8-bit 4:2:0, GPU reader only), ``key_start`` (a stream
cut before its first key frame: DALI readers only), ``rotated`` (a display rotation, which DALI's
decoders ignore: DALI readers only; PyAV applies it).

``validate_files(..., full=True)`` (``maskfeat data prepare --check --full``) also decodes every
frame of each good file (:func:`decode_all_frames`): a file corrupt in the middle passes the
default probe (first frame only) and fails there.

Known limits: frame counts come from packets (one packet = one frame for the codecs we meet;
B-frame reordering does not change the count); the VFR test allows 1% jitter of frame durations;
only the rotation part of a display matrix is used (a mirrored matrix is read as its rotation).
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
import tempfile
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import av
import numpy as np

DALI_CPU_CODECS = frozenset({"vp9", "vp8", "mjpeg"})
"""Codecs DALI's CPU decoder/reader decodes (measured, DESIGN §4)."""
NVDEC_CODECS = frozenset({"h264", "hevc", "vp9", "vp8", "mjpeg", "av1", "mpeg4"})
"""Codecs DALI's GPU (mixed, NVDEC) decoder lists as supported (DALI 2.x docs)."""
NVDEC_MIN_SIZE = {"vp9": (128, 128), "av1": (128, 128), "hevc": (144, 144)}
"""Smallest (width, height) NVDEC decodes per codec; others (48, 16). VP9: seen on an H100 (DALI 2.4 refuses
64x48 with "supported: 128x128", bench/results/gpu_check_*_2_engine_dali.log; H.264 at 64x48 decoded there).
AV1 and HEVC: NVIDIA's decoder caps for Turing and later, not measured here."""
NVDEC_MIN_DEFAULT = (48, 16)
NVDEC_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "nv12"})
"""Pixel formats the GPU reader is given: 8-bit 4:2:0, what every NVDEC decodes for every codec of
:data:`NVDEC_CODECS` (H.264 High 10, 4:2:2 and 4:4:4 are not decoded by NVDEC before Blackwell, per
NVIDIA's decoder support matrix; other depths of HEVC/VP9/AV1 are left to PyAV too, not measured)."""
LEAD_PACKETS = 32
"""Packets after the first key frame whose times may precede it (an open GOP's leading pictures)."""
CACHE_VERSION = 7
"""2: ``VideoInfo.rotation`` added; 3: ``pts_start``/``pts_step``; 4: ``cfr`` without the one-tick
allowance at a frame-interval time base; 5: discard-flagged packets and those before the first decoded
frame not counted, a variable rate's ``fps`` from its times, ``pix_fmt``; 6: the codec's name, not its
decoder's (AV1), only the first group of pictures cut to the first decoded frame, ``fps`` from evenly
spaced times; 7: no seek in MPEG program/transport/elementary streams (:data:`NO_SEEK_FORMATS`), a
display matrix that is no rotation read as none, cover art as ``not_video`` (older entries are probed again)."""
NO_SEEK_FORMATS = frozenset({"mpeg", "mpegts", "mpegvideo"})
"""FFmpeg demuxers whose frame times after a seek do not number the frames: MPEG-1/2 program streams
(.mpg, .vob) label the pictures after a seek 1-2 frames off while still stepping by one (measured: 31
of 93 clips of an MPEG-1 file with B-frames came back with other frames, no error), and in MPEG
transport streams (.ts, .m2ts, .mts) and MPEG video elementary streams (.m2v) the seek lands past the
wanted frame, so every clip was decoded twice. Their ``VideoInfo.pts_step`` is 0: the PyAV reader
decodes them from the start, counting frames."""


@dataclass
class VideoInfo:
    """What the probe learnt about one readable video file."""

    codec: str
    """FFmpeg decoder name of the first video stream (``h264``, ``vp9``, ...)."""
    width: int
    height: int
    num_frames: int
    """Frames counted from demuxed packets."""
    fps: float
    """Average frame rate of the stream."""
    cfr: bool
    """True when every frame duration is within 1% of the median (constant frame rate)."""
    rotation: int = 0
    """Display rotation, degrees counter-clockwise (0, 90, 180 or 270): the stored frames are turned
    by ``np.rot90(frame, rotation // 90)`` for display. ``width``/``height`` are the stored
    (coded) sizes; :meth:`displayed` gives the sizes as shown."""
    pts_start: int = 0
    """The smallest presentation time of the stream's packets (stream time-base units)."""
    pts_step: float = 0.0
    """The frames' mean spacing in time-base units, (last - first) / (frames - 1), when frame ``i``
    of the stream (in time order) is within a quarter step of ``pts_start + i * pts_step`` for every
    ``i`` (times rounded to their time base pass; a gap or a freeze does not); else 0, and 0 in the
    containers of :data:`NO_SEEK_FORMATS` whatever the times. The PyAV reader seeks only when it is
    set; otherwise it decodes from the start, counting frames."""
    pix_fmt: str = ""
    """FFmpeg's pixel format of the decoded frames (``yuv420p``, ``yuv420p10le``, ...)."""
    key_start: bool = True
    """Whether the stream's first packet is a key frame (False: cut without re-encoding, before one;
    True too when the container flags no key frame at all: unknown)."""

    @property
    def timeline(self) -> tuple[int, float] | None:
        """``(pts_start, pts_step)`` for the PyAV reader's seek (``pipeline.decode_clip_pyav``), or
        None when ``pts_step`` is 0 (uneven times, or a container it does not seek in: it then decodes
        from the start)."""
        return (self.pts_start, self.pts_step) if self.pts_step > 0 else None

    def displayed(self) -> "VideoInfo":
        """This info with ``width``/``height`` as displayed (swapped for 90 and 270 degrees)."""
        if self.rotation % 180 == 0:
            return self
        return dataclasses.replace(self, width=self.height, height=self.width)


def frame_rotation(frame) -> int:
    """The display rotation of a decoded PyAV frame in counter-clockwise degrees, one of 0, 90, 180,
    270 (``VideoFrame.rotation``: FFmpeg's ``av_display_rotation_get`` of the display matrix; a
    "rotate=90" tag, i.e. turn clockwise to show, reads -90 there and 270 here). A matrix that is no
    rotation (all zeros, a zero scale: FFmpeg gives NaN, which PyAV hands over as INT_MIN) is 0."""
    rot = float(getattr(frame, "rotation", 0) or 0)
    if not abs(rot) <= 360:
        return 0
    return int(round(rot / 90.0)) % 4 * 90


def is_cover_art(stream) -> bool:
    """Whether a PyAV video stream is an attached picture (an audio file's cover art). PyAV before 14.1
    has no ``Disposition`` (False there), and before 18 a ``Flag`` that ``int()`` refuses."""
    flag = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    try:
        return flag is not None and bool(stream.disposition & flag)
    except (TypeError, AttributeError):
        return False


def rotate_frame(img: np.ndarray, rotation: int) -> np.ndarray:
    """``img`` (H, W, ...) turned for display by ``rotation`` degrees counter-clockwise (a view)."""
    k = (rotation // 90) % 4
    return np.rot90(img, k) if k else img


@dataclass
class ProbeResult:
    """Probe outcome of one path: ``info`` when readable, else ``reason`` + ``detail``."""

    path: str
    info: VideoInfo | None = None
    reason: str = ""
    detail: str = ""


@dataclass
class BadFile:
    """A file rejected by the validation pass."""

    path: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} ({self.detail})"


@dataclass
class ValidationReport:
    """Result of :func:`validate_files`: good infos (by path), bad files, cache statistics."""

    good: dict[str, VideoInfo] = field(default_factory=dict)
    bad: list[BadFile] = field(default_factory=list)
    cached: int = 0
    probed: int = 0

    def records(self) -> list[dict]:
        """The bad files as ``{"path", "reason", "detail"}`` dicts (for JSON records such as eval.json)."""
        return [{"path": b.path, "reason": b.reason, "detail": b.detail} for b in self.bad]

    def summary(self) -> str:
        lines = [f"validated {len(self.good) + len(self.bad)} files: {len(self.good)} good, "
                 f"{len(self.bad)} bad ({self.probed} probed, {self.cached} from cache)"]
        lines += [f"  bad: {b}" for b in self.bad]
        return "\n".join(lines)


class BadDatasetError(RuntimeError):
    """Raised when ``on_bad_file='error'`` and the validation pass found bad files, or when no good
    file is left (``skipping=True``: ``on_bad_file='skip'`` already, so the hint is not to set it)."""

    def __init__(self, report: ValidationReport, skipping: bool = False):
        self.report = report
        if not report.good and not report.bad:
            hint = ("(no file to read: the listing is empty, a list file with no entries or only a header and "
                    "comments, or folders with no video in them)")
        elif skipping or not report.good:  # (with on_bad_file=error too: skip would leave nothing either)
            reasons = sorted({b.reason for b in report.bad})
            hint = (f"(no usable file is left: every file is bad ({', '.join(reasons)}); data.on_bad_file=skip "
                    "would leave nothing either: fix or replace them"
                    + ("; too_short: each file is shorter than one clip, num_frames x sampling_rate at target_fps "
                       "(data.short_videos=pad trains on such files with their last frame repeated)"
                       if "too_short" in reasons else "") + ")")
        else:
            hint = "(set data.on_bad_file=skip to leave them out and go on with the others)"
        super().__init__(report.summary() + "\n" + hint)


def _frame_durations_cfr(pts: np.ndarray) -> bool:
    """True when sorted presentation timestamps advance by a constant step: within 1 %, or one tick
    of the time base (33/34 ms at 29.97 fps), but never a quarter step (a time base of one frame
    interval, where a tick is a frame: the tick allowance took 1, 1, 2, 1 -- a dropped frame -- for
    constant)."""
    if len(pts) < 3:
        return True
    d = np.diff(np.sort(pts))
    d = d[d > 0]
    if len(d) == 0:
        return False
    med = float(np.median(d))
    return bool(np.all(np.abs(d - med) <= max(0.01 * med, min(1.0, 0.25 * med))))


def _even_step(pts: np.ndarray) -> float:
    """The mean spacing of the presentation times when frame ``i`` (in time order) lies within a
    quarter step of ``first + i * step`` for every ``i`` (times rounded to their time base pass: 33
    and 34 ms at 29.97 fps; a missing or frozen frame's full step does not), else 0."""
    t = np.sort(pts)
    if len(t) < 2 or t[-1] == t[0]:
        return 0.0
    step = float(t[-1] - t[0]) / (len(t) - 1)
    off = np.abs((t - t[0]) - np.arange(len(t)) * step)
    return step if float(off.max()) <= 0.25 * step else 0.0


def probe_video(path: str) -> ProbeResult:
    """Probe one file with PyAV: open, demux all packets of the first video stream, decode one frame."""
    if not os.path.lexists(path) or not os.path.exists(path):
        return ProbeResult(path, reason="missing", detail="no such file" + _spelt_otherwise(path))
    irregular = not_regular_file(path)
    if irregular:
        return ProbeResult(path, reason="unreadable", detail=irregular)
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as e:
        return ProbeResult(path, reason="unreadable", detail=f"{type(e).__name__}: {e}")
    if not head:
        return ProbeResult(path, reason="empty", detail="zero-length file")
    try:
        container = av.open(path)
    except Exception as e:  # FFmpeg raises many error types for non-media input
        if isinstance(e, OSError) and _read_fails(path):  # EIO, ESTALE on a network filesystem: never cached
            return ProbeResult(path, reason="unreadable", detail=f"{type(e).__name__}: {e}")
        return ProbeResult(path, reason="not_video", detail=f"FFmpeg cannot open it: {e}")
    try:
        if not container.streams.video:
            return ProbeResult(path, reason="not_video", detail="no video stream")
        stream = container.streams.video[0]
        if is_cover_art(stream):  # FFmpeg lists cover art as video
            return ProbeResult(path, reason="not_video", detail="its first video stream is cover art (an "
                                                                "attached picture, as audio files have)")
        if stream.codec_context is None:  # PyAV: a codec this FFmpeg has no decoder for (an unknown FourCC)
            return ProbeResult(path, reason="codec", detail="FFmpeg found no decoder for its video stream (an "
                                                            "unknown codec, or a file cut short)")
        # the codec's name, not its decoder's (AV1 decodes with libdav1d: "libdav1d" failed every codec check)
        codec = getattr(stream.codec_context.codec, "canonical_name", None) or stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        pts: list[int] = []
        keys: list[int] = []  # positions in `pts` of key-frame packets
        try:
            for packet in container.demux(stream):
                # a discard-flagged packet (the pre-roll of a cut made without re-encoding) decodes to no frame
                if packet.size and packet.pts is not None and not packet.is_discard:
                    if packet.is_keyframe:
                        keys.append(len(pts))
                    pts.append(int(packet.pts))
        except Exception as e:
            if isinstance(e, OSError) and _read_fails(path):  # an I/O error while reading, not the content
                return ProbeResult(path, reason="unreadable", detail=f"read failed after {len(pts)} packets: "
                                                                     f"{type(e).__name__}: {e}")
            return ProbeResult(path, reason="decode_error", detail=f"demux failed after {len(pts)} packets: {e}")
        try:
            container.seek(0, stream=stream, backward=True, any_frame=False)
            first = next(iter(container.decode(stream)), None)
        except Exception as e:
            return ProbeResult(path, reason="decode_error", detail=f"first frame does not decode: {e}")
        if first is None or width <= 0 or height <= 0 or not pts:
            return ProbeResult(path, reason="decode_error", detail="no decodable frame")
        if first.pts is not None:  # frames at the start (before the first key frame and its leading
            # pictures, up to the second key frame or LEAD_PACKETS after the first) with times before the
            # first that decodes (a stream cut before its key frame) are dropped by the decoder: frame 0 is
            # the first decoded one on both paths (later times may restart: a concatenation)
            head = min(keys[1] if len(keys) > 1 else len(pts), (keys[0] if keys else 0) + LEAD_PACKETS)
            pts = [p for i, p in enumerate(pts) if i >= head or p >= first.pts] or pts
        times = np.asarray(pts, dtype=np.int64)
        cfr, step = _frame_durations_cfr(times), _even_step(times)
        fps = _rate_from_times(times, step, cfr, stream.time_base, fps)
        seekable = not NO_SEEK_FORMATS.intersection((container.format.name or "").split(","))
        info = VideoInfo(codec=codec, width=int(width), height=int(height), num_frames=len(pts), fps=fps,
                         cfr=cfr, rotation=frame_rotation(first), pix_fmt=first.format.name,
                         pts_start=int(times.min()), pts_step=step if seekable else 0.0,
                         key_start=not keys or keys[0] == 0)
        return ProbeResult(path, info=info)
    finally:
        container.close()


def _rate_from_times(times: np.ndarray, step: float, cfr: bool, time_base, declared: float) -> float:
    """The frame rate the sampler counts frames with: the frames' spacing. The container's declared
    rate when it agrees with evenly spaced times (within 1 %; exact, as a fraction); else the
    times' own rate: a long last frame made an MP4's declared average 13.8 for 30 fps frames, and
    Matroska declares its default duration's rate for a variable-rate file. A discontinuous stream
    (a gap of over 10 frames: a timestamp reset of a concatenation, a freeze) keeps the declared one."""
    if len(times) < 2 or not time_base:
        return declared
    if step > 0:  # (1 %: a few frames' times rounded to milliseconds are off by ~0.2 % from 29.97)
        rate = float(1 / (step * time_base))
        return declared if declared > 0 and abs(rate - declared) <= 1e-2 * rate else rate
    if cfr:
        return declared
    d = np.diff(np.sort(times))
    d = d[d > 0]
    if not len(d) or d.max() > 10 * np.median(d):
        return declared
    return float((len(times) - 1) / ((times.max() - times.min()) * time_base))


def _spelt_otherwise(path: str) -> str:
    """A hint when ``path`` exists spelt another way: Windows separators, or the name's other Unicode
    normal form (macOS writes names decomposed, NFD; a list typed or made elsewhere has them NFC)."""
    if "\\" in path and os.path.exists(path.replace("\\", "/")):
        return "; with / for \\ it exists: write the list's paths with /"
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, path)
        if other != path and os.path.exists(other):
            return (f"; its Unicode {form} spelling exists (names copied from macOS are NFD): write the list's "
                    f"paths as the files are named")
    return ""


def _read_fails(path: str) -> bool:
    """Whether reading ``path`` to its end with plain Python fails: FFmpeg reports a cut-short
    Matroska/WebM file as EIO too, and that is the file's content, bad on every run (cached), where a
    read that fails here is the storage (a network filesystem's EIO/ESTALE: checked again next run)."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 23):
                pass
    except OSError:
        return True
    return False


def not_regular_file(path: str) -> str:
    """Why ``path`` (after symlinks) is not a regular file (a FIFO would block the open forever), or
    ``""`` when it is one (or cannot be stat'ed: the open reports that)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode):
        return ""
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")
    return f"{kind}, not a regular file; not opened"


def decoded_frames(container, stream, packets: Optional[dict] = None):
    """``container.decode(stream)``, but packets that fail to decode before the first frame are
    skipped: a stream cut before its first key frame (a copy without re-encoding) starts with frames
    that reference missing ones, which H.264 drops and VP9 raises on; the probe numbers frames from
    the first that decodes either way. ``packets``: a dict that gets ``"last_pts"``, the latest time
    of the packets demuxed so far."""
    started = False
    for packet in container.demux(stream):
        if packets is not None and packet.size and packet.pts is not None:
            packets["last_pts"] = max(packets.get("last_pts", packet.pts), packet.pts)
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            if started:
                raise
            continue
        for frame in frames:
            started = True
            yield frame


def decode_all_frames(path: str) -> tuple[int, str]:
    """Decode every frame of the first video stream with PyAV (CPU). Returns ``(frames decoded,
    error)``, ``error`` being ``""`` when the whole stream decoded."""
    irregular = not_regular_file(path)
    if irregular:
        return 0, irregular
    n, last, packets = 0, None, {}
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return 0, "no video stream"
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in decoded_frames(container, stream, packets):
                n += 1
                last = frame.pts if last is None or frame.pts is None else max(last, frame.pts)
    except Exception as e:  # FFmpeg raises many error types for corrupt data
        return n, f"frame {n + 1} does not decode: {type(e).__name__}: {e}"
    if n == 0:
        return 0, "no frame decodes"
    if last is not None and last < packets.get("last_pts", last):
        # the latest packets gave no frame: an MP4 cut short after its index, whose cut packets the threaded
        # decoder drops without an error (a packet that decodes to nothing inside the stream, as an MPEG-4
        # "not coded" frame, is no error: the reader repeats the frame before it)
        return n, "the last frames do not decode: the stream ends early (a file cut short?)"
    return n, ""


def reader_problem(info: VideoInfo, reader: str, min_frames: int) -> tuple[str, str] | None:
    """Why ``reader`` cannot produce a clip of ``min_frames`` source frames from this file, or None.

    ``reader`` is a concrete path: ``cpu`` (DALI CPU decoder), ``gpu`` (NVDEC, needs constant frame
    rate like ``fn.readers.video``) or ``pyav`` (any FFmpeg codec).
    """
    if reader == "cpu" and info.codec not in DALI_CPU_CODECS:
        return "codec", (f"{info.codec} cannot be decoded by DALI's CPU decoder (only "
                         f"{sorted(DALI_CPU_CODECS)}); use reader=pyav or `maskfeat data prepare --codec vp9`")
    if reader == "gpu" and info.codec not in NVDEC_CODECS:
        return "codec", f"{info.codec} is not decodable by NVDEC ({sorted(NVDEC_CODECS)})"
    if reader == "gpu":
        min_w, min_h = NVDEC_MIN_SIZE.get(info.codec, NVDEC_MIN_DEFAULT)
        if info.width < min_w or info.height < min_h:
            return "too_small", (f"{info.width}x{info.height} is below NVDEC's minimum {min_w}x{min_h} for "
                                 f"{info.codec}; use reader=pyav (auto does)")
        if info.pix_fmt and info.pix_fmt not in NVDEC_PIX_FMTS:
            return "pix_fmt", (f"pixel format {info.pix_fmt}: the GPU reader takes 8-bit 4:2:0 only "
                               f"({', '.join(sorted(NVDEC_PIX_FMTS))}); use reader=pyav (auto does) or re-encode "
                               f"with `maskfeat data prepare`")
    if info.num_frames < min_frames:
        return "too_short", f"{info.num_frames} frames, one clip needs {min_frames}"
    if reader == "gpu" and not info.cfr:
        return "vfr", "variable frame rate; the GPU reader needs constant (re-encode with `maskfeat data prepare`)"
    if reader in ("cpu", "gpu") and not info.key_start:
        return "key_start", ("starts before its first key frame (a cut without re-encoding), which DALI's decoders "
                             "fail on (VP9 on the CPU reader); use reader=pyav (auto does) or re-encode with "
                             "`maskfeat data prepare`")
    if reader in ("cpu", "gpu") and info.rotation:
        return "rotated", (f"display rotation {info.rotation} degrees, which DALI's decoders ignore (the clip would be "
                           f"sideways); use reader=pyav (auto does) or re-encode upright with `maskfeat data prepare`")
    return None


_UMASK = os.umask(0o022)  # read once at import (setting it is the only way to read it), then put back
os.umask(_UMASK)


DECODER_BUILD = f"av {av.__version__}, libavcodec {av.library_versions.get('libavcodec')}"
"""The PyAV and FFmpeg build a cached bad-file verdict was reached with (``ProbeCache``)."""


class ProbeCache:
    """JSON cache of probe results keyed by absolute path, valid while size and mtime match; a bad
    file's verdict (``codec``: no decoder, ``decode_error``, ...) only for the PyAV/FFmpeg build that
    reached it (:data:`DECODER_BUILD`): another one may read the file, and a root's cache is shared by
    every machine that trains on it."""

    def __init__(self, path: str | None, read_also: Sequence[str] = ()):
        """``read_also``: older cache files whose entries are used where ``path`` has none (a cache
        that moved); only ``path`` is written."""
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        for p in reversed([q for q in (path, *read_also) if q]):
            self._entries.update(self._read(p))

    @staticmethod
    def _read(path: str) -> dict[str, dict]:
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                return dict(data.get("entries", {}))
        except (OSError, ValueError):
            pass  # a corrupt cache is rebuilt, never trusted
        return {}

    @staticmethod
    def key(path: str) -> tuple[int, int] | None:
        """(size, mtime in ns) of ``path``, what an entry is valid for; None when it cannot be stat'ed."""
        return ProbeCache._key(os.path.abspath(path))

    @staticmethod
    def _key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def get(self, path: str) -> ProbeResult | None:
        ap = os.path.abspath(path)
        key = self._key(ap)
        e = self._entries.get(ap)
        if key is None or e is None or (e["size"], e["mtime_ns"]) != key:
            return None
        if e.get("reason") and e.get("build") != DECODER_BUILD:
            return None
        info = VideoInfo(**e["info"]) if e.get("info") else None
        return ProbeResult(path, info=info, reason=e.get("reason", ""), detail=e.get("detail", ""))

    def put(self, res: ProbeResult, before: tuple[int, int] | None = None) -> None:
        """Remember ``res``; ``before``: the file's key (:meth:`key`) taken before it was probed, when
        the result is kept only if the file did not change meanwhile (a copy still being written)."""
        ap = os.path.abspath(res.path)
        key = self._key(ap)
        if key is None or res.reason in ("missing", "unreadable") or (before is not None and before != key):
            return  # transient conditions are re-checked every time
        with self._lock:
            self._entries[ap] = {"size": key[0], "mtime_ns": key[1],
                                 "info": asdict(res.info) if res.info else None,
                                 "reason": res.reason, "detail": res.detail}
            if res.reason:
                self._entries[ap]["build"] = DECODER_BUILD

    def save(self) -> None:
        """Write the cache through a temporary file of a unique name beside it, then rename: every
        rank of a job saves, on a shared filesystem into the same place, and in containers the
        ranks of different nodes can have the same pid (a pid-named temporary file was renamed away
        under another rank, which then died). A save that fails is only a warning: the cache is
        a speed-up, and the next run probes again."""
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: the cache in a shared root is for everyone
            with self._lock, os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": self._entries}, f)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as e:
            print(f"warning: could not save the probe cache {self.path}: {e}", file=sys.stderr, flush=True)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def validate_files(paths: Sequence[str], *, reader: str = "pyav",
                   min_frames: int | Callable[[VideoInfo], int] = 1,
                   workers: int = 2, cache_path: str | None = None,
                   progress: bool = False, full: bool = False,
                   cache_read_also: Sequence[str] = ()) -> ValidationReport:
    """Probe ``paths`` in parallel (threads; PyAV releases the GIL while demuxing/decoding) and
    sort them into good and bad for the concrete ``reader`` (see :func:`reader_problem`);
    ``min_frames`` may depend on the file (a clip covers more frames of a faster file).
    ``full``: also decode every frame of each good file (:func:`decode_all_frames`, not cached); a
    file that fails is bad with reason ``decode_error``. ``cache_read_also``: see :class:`ProbeCache`."""
    cache = ProbeCache(cache_path, cache_read_also)
    report = ValidationReport()
    results: dict[str, ProbeResult] = {}
    todo: list[str] = []
    for p in dict.fromkeys(paths):  # unique, order kept
        hit = cache.get(p)
        if hit is not None:
            results[p] = hit
            report.cached += 1
        else:
            todo.append(p)
    if todo:
        from engine.logging import work_progress

        def probe(path: str) -> tuple[ProbeResult, tuple[int, int] | None]:
            before = cache.key(path)  # a file that changes while it is probed is not cached
            return probe_video(path), before

        try:  # what was probed is kept when the pass stops (Ctrl-C, an error): a retry does not redo it
            with ThreadPoolExecutor(max(1, workers)) as ex, work_progress(len(todo), "probe", "file", progress) as bar:
                for res, before in ex.map(probe, todo):
                    results[res.path] = res
                    cache.put(res, before)
                    bar.update(1)
        finally:
            cache.save()
        report.probed = len(todo)
    for p in dict.fromkeys(paths):
        res = results[p]
        if res.info is None:
            report.bad.append(BadFile(p, res.reason, res.detail))
            continue
        need = min_frames(res.info) if callable(min_frames) else min_frames
        problem = reader_problem(res.info, reader, need)
        if problem is not None:
            report.bad.append(BadFile(p, *problem))
        else:
            report.good[p] = res.info
    if full and report.good:
        _full_decode(report, workers, progress)
    return report


def _full_decode(report: ValidationReport, workers: int, progress: bool) -> None:
    """Decode every frame of ``report.good``'s files; move those that fail, or whose last packets decode
    to no frame (an MP4 cut short after its index: the threaded decoder ends early without an error, and
    clips past the end failed in training), to ``report.bad``."""
    todo = list(report.good)
    from engine.logging import work_progress

    failed: dict[str, str] = {}
    with ThreadPoolExecutor(max(1, workers)) as ex, work_progress(len(todo), "decode", "file", progress) as bar:
        for p, (n, err) in zip(todo, ex.map(decode_all_frames, todo)):
            if err:
                failed[p] = f"{err} ({n} of {report.good[p].num_frames} frames decoded; a full decode fails)"
            bar.update(1)
    for p in todo:
        if p in failed:
            del report.good[p]
            report.bad.append(BadFile(p, "decode_error", failed[p]))
