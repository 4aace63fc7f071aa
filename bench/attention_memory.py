"""Peak memory of one attention forward+backward per provider, measured without a GPU.

Why this works on a CPU: the big buffers of every provider here are (B, nh, ·, ·) tensors, so
peak memory is linear in B·nh, and a slice of one clip's heads (or of one head, ``SLICE``) at the
real Nq, Nk and hd of each MViTv2 stage, scaled to B·nh, has the same ratio to the reference as
the B = 32 GPU run. The fused Triton kernel runs in the interpreter, which allocates exactly
what the CUDA launchers allocate (the kernels write into
``torch.empty`` buffers), with the one GPU-dependent choice pinned to what an H100 picks: the
number of query chunks of the dk/dv kernel at the real B·nh (``triton_attn.dkdv_split``, 132
SMs), i.e. the number of fp32 dk/dv partials. Dtype: fp16 q/k/v (the bytes of bf16, which the
interpreter cannot run, DESIGN §4), fp32 tables as in training. Checked against the H100 (the
code of the fourth session, ``bench/results/attention_memory_cpu_20261127_before.md`` vs
``attention_nvidia-h100-80gb-hbm3_20261127_final.md``, MViTv2-L stages 1–4 at B = 32, one
clip's heads each): reference 6966 / 3483 / 1742 / 872 MiB here, 6962 / 3481 / 1743 / 871 on the
GPU; fused kernel 970 / 554 / 405 / 313 here, 970 / 564 / 405 / 314 on the GPU. ``bench.attention`` measures the GPU itself
(``torch.cuda.max_memory_allocated``).

Peak: ``bench.common.cpu_peak_mib``, the running sum in time order of every allocation and free
that ``torch.profiler`` records, over one call with the inputs already allocated; ``floor`` is what
every provider must allocate (the output and the gradients of q, k, v and the tables).

    python -m bench.attention_memory [--model L|S|all] [--stages 1,2,3,4] [--batch 32] [--slice N] [--out DIR]

writes ``attention_memory_cpu_<yyyymmdd>.{json,md}`` to --out (default bench/results) after
every shape.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (kernels below)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from bench.attention import K_GRID, MODELS, Q_GRIDS, Shape, make_inputs  # noqa: E402
from bench.common import cpu_peak_mib  # noqa: E402
from kernels.attention.reference import relpos_attention_reference  # noqa: E402
from kernels.attention.triton_attn import default_config, dkdv_split, relpos_attention_triton  # noqa: E402

H100_SMS = 132
# all heads of one clip are measured where nh·Nq ≤ SLICE (MViTv2-L stages 3–4), one head elsewhere
# (stages 1–2: minutes per call in the interpreter); the few allocations whose size does not
# scale with B·nh (table-sized copies and reductions, ~0.1 MiB) are scaled with the rest, which
# overstates the peak by at most that × B·nh / heads (~3 MiB at stage 4, < 1 % at stages 1–2)
SLICE = 16384
PROVIDERS = ("reference", "triton")
DTYPE = torch.float16  # the bytes of bf16 (which the interpreter cannot run), tables fp32 as in training


def gpu_chunks(s: Shape, batch: int, n_sms: int = H100_SMS) -> int:
    """dk/dv query chunks the fused kernel runs on a GPU with ``n_sms`` SMs at batch ``batch``
    (bf16 table)."""
    cfg = default_config(s.hd, sum(s.k_thw), torch.bfloat16, torch.device("cuda"))
    return dkdv_split(cfg, s.Nq, s.Nk, batch * s.nh, n_sms)[0]


def measure(s: Shape, provider: str, chunks: int, slice_limit: int = SLICE) -> dict:
    """Peak extra CPU memory of one fwd+bwd of shape s (MiB, at its B·nh), from one clip's worth
    of heads (B = 1; one head where nh·Nq > ``slice_limit``)."""
    heads = s.nh if s.nh * s.Nq <= slice_limit else 1
    fn, kwargs = relpos_attention_reference, {}
    if provider == "triton":  # the CUDA path: fused rel terms, the H100's query chunking
        cpu_cfg = default_config(s.hd, sum(s.k_thw), DTYPE, torch.device("cpu"))
        fn, kwargs = relpos_attention_triton, dict(config=dataclasses.replace(cpu_cfg, dkdv_chunks=chunks), rel_impl="triton")

    def run(slice_: Shape, measured: bool) -> tuple[float, list]:
        inputs, dout = make_inputs(slice_, DTYPE, torch.device("cpu"))
        leaves = [x.requires_grad_(True) for x in inputs]

        def call():
            fn(*leaves[:3], slice_.q_thw, slice_.k_thw, *leaves[3:], **kwargs).backward(dout)

        return (cpu_peak_mib(call) if measured else call()), leaves

    run(dataclasses.replace(s, B=1, nh=1), False)  # warm: the one-hot table and geometry caches
    t0 = time.perf_counter()
    peak, leaves = run(dataclasses.replace(s, B=1, nh=heads), True)
    scale = s.B * s.nh / heads
    q, k, v, *tables = leaves
    per_slice = sum(x.numel() * x.element_size() for x in (q, q, k, v))  # output, dq, dk, dv
    floor = (scale * per_slice + sum(t.numel() * t.element_size() for t in tables)) / 2**20
    return dict(heads_measured=heads, peak_mib=peak * scale, floor_mib=floor, seconds=time.perf_counter() - t0)


def write_report(out: Path, stem: str, meta: dict, rows: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    lines = [
        "# Attention peak memory of one forward+backward, measured on the CPU",
        "",
        f"- date {meta['date']}; command `{meta['command']}`",
        f"- torch {meta['torch']}, triton {meta['triton']}; fp16 q/k/v, fp32 tables; fused kernel in the Triton interpreter with the "
        f"dk/dv query chunks an H100 ({H100_SMS} SMs) picks at B = {meta['batch']}",
        "- peak: CPU allocator events recorded by torch.profiler over one fwd+bwd (inputs excluded), measured on one "
        "clip's heads (or one head) and scaled to B·nh (module docstring); floor: the output and all gradients (what "
        "every provider allocates); ratio: peak / reference peak",
        "",
        "| shape | provider | chunks | heads measured | peak MiB | floor MiB | peak/floor | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {r["shape"]: r["peak_mib"] for r in rows if r["provider"] == "reference"}
    for r in rows:
        ratio = r["peak_mib"] / ref[r["shape"]] if r["shape"] in ref else float("nan")
        lines.append(
            f"| {r['shape']} | {r['provider']} | {r['chunks'] or '—'} | {r['heads_measured']} | {r['peak_mib']:.1f} "
            f"| {r['floor_mib']:.1f} | {r['peak_mib'] / r['floor_mib']:.2f} | {ratio:.3f} |"
        )
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["L", "S", "all"], default="L")
    ap.add_argument("--stages", default="1,2,3,4", help="comma list of stages (1 = the largest)")
    ap.add_argument("--batch", type=int, default=32, help="GPU batch whose dk/dv chunking to reproduce")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--slice", type=int, default=SLICE,
                    help="measure all heads of one clip where nh·Nq ≤ this, else one head (60000: every MViTv2 stage)")
    args = ap.parse_args(argv)
    stages = sorted({int(x) for x in args.stages.split(",") if x})
    if not stages or min(stages) < 1 or max(stages) > len(Q_GRIDS):
        raise SystemExit(f"--stages must name stages 1…{len(Q_GRIDS)}; got {args.stages!r}")
    import triton

    today = datetime.date.today().strftime("%Y%m%d")
    meta = dict(date=today, command="python -m bench.attention_memory " + " ".join(sys.argv[1:] if argv is None else argv),
                torch=torch.__version__, triton=triton.__version__, batch=args.batch)
    rows: list[dict] = []
    path = None
    for model in (["L", "S"] if args.model == "all" else [args.model]):
        cfg = MODELS[model]
        for stage in stages:
            s = Shape(model, stage, args.batch, cfg["heads"][stage - 1], cfg["hd"], Q_GRIDS[stage - 1], K_GRID)
            chunks = gpu_chunks(s, args.batch)
            for provider in PROVIDERS:
                r = measure(s, provider, chunks, args.slice)
                rows.append(dict(shape=s.label, provider=provider, chunks=chunks if provider == "triton" else None, **r))
                print(f"{s.label} {provider:10s} peak {r['peak_mib']:.1f} MiB  floor {r['floor_mib']:.1f} MiB  "
                      f"({r['heads_measured']} heads measured, {r['seconds']:.0f} s)", flush=True)
                path = write_report(Path(args.out), f"attention_memory_cpu_{today}", meta, rows)
    if path is not None:
        print(path.read_text())


if __name__ == "__main__":
    main()
