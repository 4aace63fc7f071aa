"""``maskfeat data prepare SRC DST``: re-encode a video dataset into a DALI-friendly form (issue 5).

Each video is decoded with PyAV and re-encoded with a short side of at most ``--short-side`` (no
upscaling; even sizes), a constant frame rate (``--fps``; 0 keeps the source's average rate; frames
are picked by presentation time, so variable-rate input becomes constant), a short GOP
(``--gop``, key frame every N frames, for fast seeking) and VP9 (``.webm``, decodable by DALI's CPU
and GPU decoders) or H.264 (``.mp4``, GPU/NVDEC or PyAV). Work runs in a process pool with a tqdm
bar; outputs are written under a temporary name and renamed, and existing outputs are skipped, so
an interrupted run resumes. SRC is a Kinetics-style root (``train.csv``/``val.csv``/``test.csv``)
or a folder of class sub-folders; DST gets the mirrored files, list files with ``path label`` lines
(class folders: ``train.csv`` with every file) and ``classes.json``. ``--check`` only runs the
validation pass over SRC and prints each bad file with its reason (exit status 1 if any).
Files that fail to encode are reported and left out of the lists (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction

import av

from .datasets import Dataset, read_list_file, scan_class_folders, write_list_file
from .probe import validate_files

CODECS = {"vp9": ("libvpx-vp9", "webm", ".webm"), "h264": ("libx264", "mp4", ".mp4")}
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def encode_video(src: str, dst: str, *, codec: str = "vp9", short_side: int = 320, fps: float = 0.0,
                 gop: int = 16, crf: int = 32) -> int:
    """Re-encode ``src`` to ``dst`` (see module docstring); returns frames written. Atomic."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    encoder, fmt, _ = CODECS[codec]
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.part{os.getpid()}")
    written = 0
    with av.open(src) as inp:
        sin = inp.streams.video[0]
        sin.thread_type = "AUTO"
        w0, h0 = sin.codec_context.width, sin.codec_context.height
        s = min(1.0, short_side / min(w0, h0))
        w, h = _even(w0 * s), _even(h0 * s)
        src_rate = sin.average_rate or sin.guessed_rate or Fraction(25)
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(src_rate).limit_denominator(1001)
        out = av.open(tmp, "w", format=fmt)
        try:
            so = out.add_stream(encoder, rate=rate)
            so.width, so.height, so.pix_fmt = w, h, "yuv420p"
            so.codec_context.gop_size = gop
            so.options = ({"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": str(crf), "b": "0"}
                          if codec == "vp9" else {"preset": "veryfast", "crf": "23"})
            t0 = None
            prev = None
            last_t = 0.0

            def emit(frame: av.VideoFrame) -> None:
                nonlocal written
                img = frame.reformat(width=w, height=h, format="yuv420p")
                img.pts, img.time_base = written, 1 / rate  # constant frame rate in output time
                for packet in so.encode(img):
                    out.mux(packet)
                written += 1

            for frame in inp.decode(sin):
                t = float(frame.time) if frame.time is not None else written / float(rate)
                t0 = t if t0 is None else t0
                t -= t0
                while prev is not None and written / float(rate) < t:  # output times shown by prev
                    emit(prev)
                prev, last_t = frame, t
            if prev is not None:
                end = last_t + 1.0 / float(src_rate)
                while written / float(rate) < end - 1e-9 or written == 0:
                    emit(prev)
            for packet in so.encode():
                out.mux(packet)
        finally:
            out.close()
    if written == 0:
        os.remove(tmp)
        raise RuntimeError(f"{src}: no frames decoded")
    os.replace(tmp, dst)
    return written


def _job(args: tuple[str, str, str, int, float, int]) -> tuple[str, str]:
    src, dst, codec, short_side, fps, gop = args
    try:
        encode_video(src, dst, codec=codec, short_side=short_side, fps=fps, gop=gop)
        return src, ""
    except Exception as e:  # reported per file by the caller
        return src, f"{type(e).__name__}: {e}"


def _listings(src: str) -> dict[str, Dataset]:
    """Split name -> listing of SRC (Kinetics lists if present, else class folders as ``train``)."""
    lists = {s: os.path.join(src, f"{s}.csv") for s in ("train", "val", "test")}
    found = {s: read_list_file(p, src) for s, p in lists.items() if os.path.isfile(p)}
    return found or {"train": scan_class_folders(src, VIDEO_EXTENSIONS)}


def prepare_dataset(src: str, dst: str, *, codec: str = "vp9", short_side: int = 320, fps: float = 0.0,
                    gop: int = 16, workers: int = 2, progress: bool = True) -> dict[str, str]:
    """Re-encode every listed file of ``src`` into ``dst`` and write the lists; returns failures {src: error}."""
    ext = CODECS[codec][2]
    splits = _listings(src)
    mapping: dict[str, str] = {}
    for ds in splits.values():
        for p in ds.paths:
            rel = os.path.relpath(p, src)
            if rel.startswith(".."):  # listed outside SRC: keep it inside DST
                rel = os.path.join("external", rel.replace("..", "up").lstrip(os.sep))
            mapping[p] = os.path.splitext(rel)[0] + ext
    todo = [(p, os.path.join(dst, rel), codec, short_side, fps, gop) for p, rel in mapping.items()
            if not os.path.isfile(os.path.join(dst, rel))]
    failures: dict[str, str] = {}
    if todo:
        from tqdm import tqdm

        with ProcessPoolExecutor(max(1, workers)) as ex, tqdm(total=len(todo), desc="prepare", unit="video",
                                                               disable=not progress) as bar:
            for fut in as_completed([ex.submit(_job, t) for t in todo]):
                s, err = fut.result()
                if err:
                    failures[s] = err
                bar.update(1)
    names = next(iter(splits.values())).class_names
    for split, ds in splits.items():
        write_list_file(os.path.join(dst, f"{split}.csv"),
                        [(mapping[p], l) for p, l in zip(ds.paths, ds.labels) if p not in failures])
    for extra in ("classnames.json",):
        if os.path.isfile(os.path.join(src, extra)):
            shutil.copyfile(os.path.join(src, extra), os.path.join(dst, extra))
    with open(os.path.join(dst, "classes.json"), "w") as f:
        json.dump(names, f)
    return failures


def prepare_main(argv: list[str]) -> int:
    """Command line of ``maskfeat data prepare`` (module docstring)."""
    ap = argparse.ArgumentParser(prog="maskfeat data prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Kinetics-style root (train/val/test.csv) or folder of class sub-folders")
    ap.add_argument("dst", nargs="?", default="", help="output root (not needed with --check)")
    ap.add_argument("--codec", choices=sorted(CODECS), default="vp9")
    ap.add_argument("--short-side", type=int, default=320)
    ap.add_argument("--fps", type=float, default=0.0, help="constant output rate; 0 keeps the source rate")
    ap.add_argument("--gop", type=int, default=16, help="key frame interval in frames")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-frames", type=int, default=1, help="--check: frames one clip needs")
    ap.add_argument("--check", action="store_true", help="only validate SRC; print bad files")
    args = ap.parse_args(argv)
    if args.check:
        paths = [p for ds in _listings(args.src).values() for p in ds.paths]
        report = validate_files(paths, reader="pyav", min_frames=args.min_frames, workers=args.workers,
                                progress=True)
        print(report.summary())
        return 1 if report.bad else 0
    if not args.dst:
        ap.error("DST is required unless --check")
    failures = prepare_dataset(args.src, args.dst, codec=args.codec, short_side=args.short_side, fps=args.fps,
                               gop=args.gop, workers=args.workers)
    for s, err in sorted(failures.items()):
        print(f"failed: {s}: {err}", file=sys.stderr)
    print(f"prepared into {args.dst} ({len(failures)} failures)")
    return 1 if failures else 0
