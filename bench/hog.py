"""Benchmark of the MaskFeat HOG target (DESIGN §3.1, §6): eager reference vs fused Triton kernel.

Providers, side by side in one process on one device:

- ``reference``: the official eager computation (``kernels.hog.hog_targets_reference``, fp32);
- ``reference+compile``: the same function through ``torch.compile`` (skipped, with the reason,
  where compilation fails);
- ``triton``: the fused kernel (``kernels.hog.hog_targets(..., backend="triton")``, default
  variant: ``"cells-ptx"`` on CUDA), and ``triton (cells variant)`` (``hog_targets_triton(..., variant="cells")``,
  the portable kernel), CUDA only; on
  CPU it runs in the Triton interpreter, which is not a benchmark, so it is timed only on a tiny
  shape (2 x 3 x 64 x 64) labelled as such, next to the reference on the same tiny shape;
- ``skimage-hog (different function)``: on CPU only, for context: ``skimage.feature.hog`` per frame
  (9 orientations, 8x8 cells, 1x1 blocks, max over channels, central differences; DESIGN §3.1 says
  why it is not the same function).

Shapes (DESIGN §6): 64 frames of 3x224x224 (8 clips x 8 centre frames), uint8 and bf16 (bf16 only
on CUDA; on CPU fp32 instead, labelled), token stride 16 -> targets (64, 196, 108) fp32.

Bytes that must move (the roofline for a fused kernel; nothing else needs to touch memory):
    bytes = N*3*H*W*sizeof(input)   (each input pixel read once)
          + N*L*D*4                 (each fp32 target written once)
GB/s = bytes / median time. "% copy" compares with a device copy measured in the same process:
``dst.copy_(src)`` of a 256 MiB tensor, counted as 2 * 256 MiB (read + write) per copy.

Timing: median of ``triton.testing.do_bench`` on CUDA, median of repeated ``time.perf_counter`` runs
on CPU. Peak memory: ``torch.cuda.max_memory_allocated`` around one call minus what was allocated
before (inputs excluded); "n/a" on CPU.

    python -m bench.hog [--device cpu|cuda] [--out DIR] [--quick] [--sweep]

Every provider's targets are checked against the float64 oracle on the first frames; the run exits
3 (after writing its files) when one of ours is off. ``× best other``: the fastest provider that is
not ours over ours (DESIGN §6's ratio to the best alternative).

``--sweep`` (CUDA) also times every launch configuration of ``kernels.hog.triton_hog.SWEEP_CONFIGS``
on the uint8 shape and stores them in the JSON (and one line of the notes).

writes ``hog_<device-slug>_<yyyymmdd>.{json,md}`` to --out (default bench/results), rewritten after
every measurement so a run cut short by a time limit still leaves its results. The CUDA run is
sized to finish in well under 90 s on an H100 (torch.compile dominates).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.common import peak_mib, results_slug, write_files

N_FRAMES, H, W, TOKEN_STRIDE = 64, 224, 224, 16
ORACLE_FRAMES, ORACLE_TOL = 4, 2e-5
"""Frames checked against the float64 oracle, and the largest difference of ours (the tests' rtol 1e-5
plus atol 2e-6 on targets of at most 1: integer-valued frames bin exactly, DESIGN §5)."""
# --sweep times kernels.hog.triton_hog.SWEEP_CONFIGS (each is checked against the oracle by the GPU
# test test_gpu_tile_configs in tests/kernels/test_hog.py).
COPY_BYTES = 256 * 2**20


def time_ms(call: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median milliseconds of ``call``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
    call()  # warm-up
    times: list[float] = []
    t_start = time.perf_counter()
    budget, min_reps = (0.5, 3) if quick else (2.0, 5)
    while len(times) < min_reps or (time.perf_counter() - t_start < budget and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, quick: bool) -> float:
    """Measured device copy bandwidth, GB/s, counting bytes read + written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick)
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def moved_bytes(frames: torch.Tensor, out_shape: tuple[int, int, int]) -> int:
    """Input read once + fp32 targets written once (see module docstring)."""
    n, l, d = out_shape
    return frames.numel() * frames.element_size() + n * l * d * 4


def make_frames(n: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).to(dtype).to(device)  # (N, 3, H, W)


def skimage_hog_frames(frames_np) -> None:
    """skimage.feature.hog on each (H, W, 3) frame: a different function, for context only."""
    from skimage.feature import hog

    for f in frames_np:
        hog(f, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1), channel_axis=-1, feature_vector=False)


def device_info(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device.type,
        "name": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_report(out_dir: Path, stem: str, meta: dict, rows: list[dict], notes: list[str]) -> tuple[Path, Path]:
    lines = [
        f"# HOG targets benchmark — {meta['device_info']['name']}",
        "",
        f"- date: {meta['date']}; command: `{meta['command']}`",
        f"- torch {meta['device_info']['torch']}, triton {meta['device_info']['triton']}, cuda {meta['device_info']['cuda']}",
        f"- measured copy bandwidth: {meta['copy_gbs']:.1f} GB/s (read + write of a 256 MiB tensor)",
        f"- 1-min load average at start: {meta['device_info']['load_average_1min']} "
        f"({meta['device_info']['cpu_threads']} torch threads; CPU timings on a shared machine are noisy)",
        "- bytes that must move = N*3*H*W*sizeof(input) + N*L*D*4 (input read once, fp32 targets written once)",
        "",
        f"- check: max abs diff against the float64 oracle on the first {ORACLE_FRAMES} frames (integer-valued "
        f"frames: exact up to summation rounding); ours must be within {ORACLE_TOL:g} (the benchmark exits 3 "
        "otherwise); the fp32 reference may flip a bin near an edge",
        "- × best other: the fastest provider that is not ours (reference, reference+compile; whatever its "
        "oracle check: the fp32 reference is the official computation) over ours",
        "",
        "| shape | input | provider | median ms | GB/s | % copy | × reference | × best other | peak MiB "
        "| max abs diff vs reference | vs oracle | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r.get("ok")
        lines.append(
            f"| {r['shape']} | {r['label']} | {r['provider']} | {r['ms']:.3f} | {fmt(r['gbs'], '.3g')} | "
            f"{fmt(r['pct_copy'], '.3g')} | {fmt(r['speedup_vs_reference'], '.1f')} | "
            f"{fmt(r.get('speedup_vs_best_other'), '.1f')} | {fmt(r['peak_mib'], '.1f')} | "
            f"{fmt(r['max_abs_diff'], '.2e')} | {fmt(r.get('oracle_diff'), '.2e')} | "
            f"{'n/a' if ok is None else 'yes' if ok else 'NO'} |"
        )
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return write_files(out_dir, stem, {**meta, "results": rows, "notes": notes}, lines)


def bench_shape(
    label: str,
    frames: torch.Tensor,
    providers: dict[str, Callable[[torch.Tensor], Optional[torch.Tensor]]],
    device: torch.device,
    quick: bool,
    copy_gbs: float,
    notes: list[str],
) -> list[dict]:
    """Time every provider on one input; ratios relative to ``reference``."""
    from kernels.hog import hog_targets_reference

    rows: list[dict] = []
    ref_out = providers["reference"](frames)
    out_shape = tuple(ref_out.shape)
    nbytes = moved_bytes(frames, out_shape)
    k = min(ORACLE_FRAMES, frames.shape[0])
    oracle = hog_targets_reference(frames[:k], TOKEN_STRIDE, dtype=torch.float64)
    ref_ms = None
    for name, fn in providers.items():
        try:
            out = fn(frames)
            diff = None if out is None else (out.float() - ref_out).abs().max().item()
            oracle_diff = None if out is None else (out[:k].double() - oracle).abs().max().item()
            ms = time_ms(lambda: fn(frames), device, quick)
        except Exception as exc:  # a provider that cannot run here is reported, not fatal (but one of ours fails the run)
            notes.append(f"{label} {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            if is_ours(name):
                CRASHED.append(f"{label} {name} ({type(exc).__name__})")
            print(f"  {name:34s} skipped: {type(exc).__name__}", flush=True)
            continue
        if name == "reference":
            ref_ms = ms
        same_fn = out is not None
        gbs = nbytes / (ms * 1e-3) / 1e9 if same_fn else None
        rows.append({
            "shape": f"{frames.shape[0]}x3x{frames.shape[2]}x{frames.shape[3]} -> {out_shape[0]}x{out_shape[1]}x{out_shape[2]}",
            "input": str(frames.dtype).replace("torch.", ""),
            "label": label,
            "provider": name,
            "ms": ms,
            "bytes": nbytes if same_fn else None,
            "gbs": gbs,
            "pct_copy": None if gbs is None else 100 * gbs / copy_gbs,
            "speedup_vs_reference": None if ref_ms is None else ref_ms / ms,
            "peak_mib": peak_mib(lambda: fn(frames), device),
            "max_abs_diff": diff,
            "oracle_diff": oracle_diff,
            "ok": None if oracle_diff is None else oracle_diff <= ORACLE_TOL,
        })  # fmt: skip
        r = rows[-1]
        print(f"  {name:34s} {ms:9.3f} ms  {gbs or 0:8.1f} GB/s  x{r['speedup_vs_reference'] or 0:.1f}  "
              f"oracle diff {fmt(oracle_diff, '.1e')}{'' if r['ok'] is not False else '  MISMATCH'}", flush=True)
    others = [r["ms"] for r in rows if not is_ours(r["provider"]) and r["bytes"] is not None]
    for r in rows:
        r["speedup_vs_best_other"] = min(others) / r["ms"] if others and is_ours(r["provider"]) else None
    return rows


def is_ours(provider: str) -> bool:
    """Our kernels' rows (``triton``, ``triton (cells variant)``, ``triton (interpreter)``)."""
    return provider.startswith("triton")


def fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


CRASHED: list[str] = []
"""Our providers that raised instead of computing (this process's; they fail the run as a mismatch does)."""


def failed_checks(rows: list[dict]) -> list[str]:
    """Our rows whose targets differ from the float64 oracle beyond ORACLE_TOL, and our providers
    that raised (:data:`CRASHED`)."""
    return [f"{r['label']} {r['provider']} (oracle diff {r['oracle_diff']:.2e})" for r in rows
            if is_ours(r["provider"]) and r.get("ok") is False] + [f"{c}: raised" for c in CRASHED]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--sweep", action="store_true", help="CUDA: also time every launch configuration of SWEEP_CONFIGS (uint8), each with its largest difference from the reference recorded (correctness: the kernel tests)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.hog decorates its kernel
    from kernels.hog import hog_targets, hog_targets_reference

    t_start = time.perf_counter()
    CRASHED.clear()  # (this run's)
    info = device_info(device)
    slug = results_slug(device, info["name"])
    today = datetime.date.today().strftime("%Y%m%d")
    copy_gbs = copy_bandwidth_gbs(device, args.quick)
    meta = {
        "date": today,
        "command": "python -m bench.hog " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_info": info,
        "copy_gbs": copy_gbs,
        "token_stride": TOKEN_STRIDE,
        "options": {"cell": 8, "nbins": 9, "gaussian_window": 0, "signed": False, "norm": "cell_l2"},
    }
    print(f"HOG bench on {info['name']}: copy {copy_gbs:.1f} GB/s", flush=True)
    out_dir, stem = Path(args.out), f"hog_{slug}_{today}"
    rows: list[dict] = []
    notes: list[str] = []

    def reference(x: torch.Tensor) -> torch.Tensor:
        return hog_targets_reference(x, TOKEN_STRIDE)

    compiled = torch.compile(hog_targets_reference, dynamic=False)

    def reference_compile(x: torch.Tensor) -> torch.Tensor:
        return compiled(x, TOKEN_STRIDE)

    def triton_fused(x: torch.Tensor) -> torch.Tensor:
        return hog_targets(x, TOKEN_STRIDE, backend="triton")

    def triton_cells(x: torch.Tensor) -> torch.Tensor:
        from kernels.hog import hog_targets_triton

        return hog_targets_triton(x.unsqueeze(1), TOKEN_STRIDE, variant="cells")

    dtypes = [torch.uint8, torch.bfloat16] if device.type == "cuda" else [torch.uint8, torch.float32]
    for dtype in dtypes:
        frames = make_frames(N_FRAMES, H, W, dtype, device)
        label = "bf16" if dtype == torch.bfloat16 else ("fp32 (CPU stand-in for bf16)" if dtype == torch.float32 else "uint8")
        providers: dict[str, Callable] = {"reference": reference}
        if time.perf_counter() - t_start < 45:  # keep the CUDA run well under 90 s
            providers["reference+compile"] = reference_compile
        else:
            notes.append(f"{label} reference+compile: skipped to stay within the time budget")
        if device.type == "cuda":
            providers["triton"] = triton_fused  # default variant ("cells-ptx" on CUDA)
            providers["triton (cells variant)"] = triton_cells
        else:
            frames_np = frames.permute(0, 2, 3, 1).numpy()
            providers["skimage-hog (different function)"] = lambda x, f=frames_np: skimage_hog_frames(f)
        print(f"{N_FRAMES}x3x{H}x{W} {label}", flush=True)
        rows += bench_shape(label, frames, providers, device, args.quick, copy_gbs, notes)
        meta["elapsed_s"] = time.perf_counter() - t_start
        write_report(out_dir, stem, meta, rows, notes)

    if args.sweep and device.type == "cuda":
        from kernels.hog import hog_targets_triton
        from kernels.hog.triton_hog import SWEEP_CONFIGS

        frames = make_frames(N_FRAMES, H, W, torch.uint8, device).unsqueeze(1)  # (N, 1, 3, H, W)
        ref_out = reference(frames[:, 0])
        sweep: list[dict] = []
        for variant, block_px, max_ch, num_warps in SWEEP_CONFIGS:
            cfg = dict(variant=variant, block_px=block_px, max_ch=max_ch, num_warps=num_warps)
            try:
                diff = (hog_targets_triton(frames, TOKEN_STRIDE, **cfg).float() - ref_out).abs().max().item()
                ms = time_ms(lambda c=cfg: hog_targets_triton(frames, TOKEN_STRIDE, **c), device, True)
            except Exception as exc:  # a variant that fails to compile here is reported, not fatal
                print(f"  sweep {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                sweep.append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            gbs = moved_bytes(frames, (N_FRAMES, (H // 16) * (W // 16), 108)) / (ms * 1e-3) / 1e9
            sweep.append({**cfg, "ms": ms, "gbs": gbs, "max_abs_diff": diff})
            print(f"  sweep {cfg}: {ms:.4f} ms {gbs:.1f} GB/s max abs diff {diff:.2e}", flush=True)
            meta["triton_sweep_uint8"] = sweep
            write_report(out_dir, stem, meta, rows, notes)
        meta["triton_sweep_uint8"] = sweep
        notes.append("triton sweep (uint8, 64 frames): " + ", ".join(
            f"{r['variant']} {r['block_px']}px/ch<={r['max_ch']}/{r['num_warps']}w "
            + (f"{r['ms']:.4f} ms (max abs diff {r['max_abs_diff']:.1e})" if "ms" in r else "failed")
            for r in sweep
        ))

    if device.type == "cpu":
        notes.append(
            "triton on CPU runs in the Triton interpreter (not a benchmark): timed only on the tiny "
            "2x3x64x64 uint8 shape, next to the reference on the same shape"
        )
        notes.append("skimage-hog computes a different function (DESIGN §3.1): no GB/s or diff is reported for it")
        tiny = make_frames(2, 64, 64, torch.uint8, device)
        print("tiny 2x3x64x64 uint8 (triton interpreted)", flush=True)
        rows += bench_shape(
            "tiny, triton interpreted", tiny, {"reference": reference, "triton (interpreter)": triton_fused},
            device, True, copy_gbs, notes,
        )  # fmt: skip
    meta["elapsed_s"] = time.perf_counter() - t_start
    jpath, mpath = write_report(out_dir, stem, meta, rows, notes)
    print(f"wrote {jpath} and {mpath} ({meta['elapsed_s']:.0f} s)")
    failed = failed_checks(rows)
    if failed:  # timed and written, but a wrong kernel must not pass as a benchmark run
        print(f"MISMATCH against the oracle: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
