"""Where the fused Triton attention spends its time, and which launch configuration is fastest.

Two parts, both at the MViTv2-L stage shapes of ``bench.attention`` (bf16, B = 32 on CUDA):

1. ``profile``: the CUDA kernels of one forward+backward, from ``torch.profiler``, for the fused
   Triton kernel with fused rel terms (its default table) and for the SDPA-cuDNN path with fused
   rel terms (what ``auto`` runs): µs per call for every kernel, so the gap is located, not guessed.
2. ``sweep``: each of the three attention kernels (forward, dq, dk/dv) timed alone
   (``triton.testing.do_bench`` on prepared inputs) under every configuration in ``FWD``, ``DQ``
   and ``DKDV`` (changes to the default :class:`RelPosAttnConfig`). Every variant's outputs are
   compared with the default's (max|Δ| / max|default| ≤ 2e-2, bf16) before its time counts. The
   fastest valid variant of each kernel is combined and the whole forward+backward timed against
   the default and against SDPA-cuDNN with fused rel terms, in the same process.

    python -m bench.attention_tune [--stages 1,4] [--batch 32] [--out DIR] [--part profile,sweep]

Writes ``attention_tune_<device-slug>_<yyyymmdd>.{json,md}`` after every stage. On CPU (the Triton
interpreter, ``TRITON_INTERPRET=1``) it runs a tiny shape with one repetition: a check that the
script works, not a measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.attention import Shape, device_info_cache, make_inputs, stage_shapes
from bench.common import results_slug
from kernels.attention.reference import rel_matrix_impl

# changes to the default RelPosAttnConfig, per kernel (the default itself is "default")
FWD: dict[str, dict] = {
    "default": {},
    "m128n64w8s3": dict(fwd_stages=3),
    "m128n128w8s2": dict(fwd_block_n=128),
    "m64n64w4s2": dict(fwd_block_m=64, fwd_warps=4),
    "m128n64w4s2": dict(fwd_warps=4),
    "m64n128w4s2": dict(fwd_block_m=64, fwd_block_n=128, fwd_warps=4),
}
DQ: dict[str, dict] = {
    "default": {},
    "m64n64w4s3": dict(dq_stages=3),
    "m128n64w8s2": dict(dq_block_m=128, dq_warps=8),
    "m128n32w8s2": dict(dq_block_m=128, dq_block_n=32, dq_warps=8),
    "m64n32w4s2": dict(dq_block_n=32),
    "m128n64w4s2": dict(dq_block_m=128),
    "m64n128w8s2": dict(dq_block_n=128, dq_warps=8),
}
DKDV: dict[str, dict] = {
    "default": {},
    "w4": dict(dkdv_warps=4),
    "n128m64w8": dict(dkdv_block_n=128),
    "n128m32w8": dict(dkdv_block_n=128, dkdv_block_m=32),
    "n128m32w4": dict(dkdv_block_n=128, dkdv_block_m=32, dkdv_warps=4),
    "n64m32w4": dict(dkdv_block_m=32, dkdv_warps=4),
    "s3": dict(dkdv_stages=3),
    "n64m128w8": dict(dkdv_block_m=128),
    "pps8": dict(dkdv_programs_per_sm=8),
    "pps16": dict(dkdv_programs_per_sm=16),
    "pps64": dict(dkdv_programs_per_sm=64),
    "unpacked": dict(dkdv_packed_q=False),
    "split-w4": dict(dkdv_split=True, dkdv_warps=4),
}
TOL = 2e-2


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _time(call: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``call``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median"))
    call()
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def _fwdbwd_call(fn: Callable, s: Shape, inputs: list, dout: torch.Tensor) -> tuple[Callable, list]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]

    def call():
        for x in leaves:
            x.grad = None
        fn(*leaves[:3], s.q_thw, s.k_thw, *leaves[3:]).backward(dout)
    return call, leaves


def _providers() -> dict[str, Callable]:
    from bench.attention import _sdpa_provider
    from kernels.attention.triton_attn import relpos_attention_triton

    return {
        "triton+rel-triton": lambda *a, **kw: relpos_attention_triton(*a, rel_impl="triton", **kw),
        "sdpa-cudnn+rel-triton": _sdpa_provider("cudnn", rel_impl="triton"),
    }


def profile(s: Shape, inputs: list, dout: torch.Tensor, device: torch.device) -> list[dict]:
    """Per-kernel CUDA µs of one forward+backward, for each provider of :func:`_providers`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows = []
    for name, fn in _providers().items():
        call, _ = _fwdbwd_call(fn, s, inputs, dout)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        reps = 5
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            torch.cuda.synchronize()
        total = 0.0
        kernels = []
        for e in prof.key_averages():
            us = getattr(e, "device_time_total", None)
            if us is None:
                us = getattr(e, "cuda_time_total", 0.0)
            if us <= 0:
                continue
            kernels.append(dict(kernel=e.key[:90], us_per_call=us / reps, launches_per_call=e.count / reps))
        kernels = [k for k in kernels if not k["kernel"].startswith(("aten::", "autograd::", "cudaDeviceSynchronize"))]
        kernels.sort(key=lambda k: -k["us_per_call"])
        total = sum(k["us_per_call"] for k in kernels)
        rows.append(dict(provider=name, kernel_us_total=total, kernels=kernels))
        print(f"  profile {name}: {total / 1e3:.3f} ms of kernels per fwd+bwd", flush=True)
        for k in kernels[:12]:
            print(f"    {k['us_per_call']:9.1f} us  x{k['launches_per_call']:.0f}  {k['kernel']}", flush=True)
    return rows


def sweep(s: Shape, inputs: list, dout: torch.Tensor, device: torch.device) -> dict:
    """Per-kernel times of every FWD / DQ / DKDV variant, then the best combination end to end."""
    from kernels.attention import triton_attn as ta

    q, k, v, t, h, w = inputs
    hd = s.hd
    scale = hd**-0.5
    r = rel_matrix_impl("auto", device)(q, s.q_thw, s.k_thw, t, h, w, True).contiguous()
    kr = r.shape[-1]
    ba = ta._next_pow2(hd + kr)
    ka = ta._k_aug(k, s.k_thw, s.k_thw[0], ba, True)
    base = ta._configs(ba, q.dtype, device)
    do = dout.contiguous()

    def variants(table: dict[str, dict]):
        for name, change in table.items():
            yield name, dataclasses.replace(base, **change)

    out: dict = dict(fwd=[], dq=[], dkdv=[])
    ref_o = ref_lse = None
    for name, cfg in variants(FWD):
        try:
            o, lse = ta._fwd(q, r, ka, v, hd, kr, True, scale, cfg)
            if ref_o is None:
                ref_o, ref_lse = o, lse
            err = _rel_err(o, ref_o)
            ms = _time(lambda: ta._fwd(q, r, ka, v, hd, kr, True, scale, cfg), device)
            out["fwd"].append(dict(variant=name, ms=ms, err=err, ok=err <= TOL))
        except Exception as exc:  # a variant that cannot compile (shared memory, registers) is reported
            out["fwd"].append(dict(variant=name, ms=None, err=None, ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
        print(f"  fwd  {name:14s} {out['fwd'][-1]}", flush=True)
    o, lse = ref_o, ref_lse
    delta = ta._bwd_delta(o, do, hd)
    ref = None
    for name, cfg in variants(DQ):
        try:
            got = ta._bwd_dq(q, r, ka, v, do, lse, delta, hd, kr, True, scale, cfg)
            ref = ref or got
            err = max(_rel_err(a, b) for a, b in zip(got, ref))
            ms = _time(lambda: ta._bwd_dq(q, r, ka, v, do, lse, delta, hd, kr, True, scale, cfg), device)
            out["dq"].append(dict(variant=name, ms=ms, err=err, ok=err <= TOL))
        except Exception as exc:
            out["dq"].append(dict(variant=name, ms=None, err=None, ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
        print(f"  dq   {name:14s} {out['dq'][-1]}", flush=True)
    ref = None
    for name, cfg in variants(DKDV):
        try:
            got = ta._bwd_dkdv(q, r, ka, v, do, lse, delta, hd, kr, True, scale, cfg)
            ref = ref or got
            err = max(_rel_err(a, b) for a, b in zip(got, ref))
            ms = _time(lambda: ta._bwd_dkdv(q, r, ka, v, do, lse, delta, hd, kr, True, scale, cfg), device)
            out["dkdv"].append(dict(variant=name, ms=ms, err=err, ok=err <= TOL))
        except Exception as exc:
            out["dkdv"].append(dict(variant=name, ms=None, err=None, ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
        print(f"  dkdv {name:14s} {out['dkdv'][-1]}", flush=True)

    best = {}
    change: dict = {}
    for part, table in (("fwd", FWD), ("dq", DQ), ("dkdv", DKDV)):
        ok = [row for row in out[part] if row["ok"]]
        if ok:
            best[part] = min(ok, key=lambda row: row["ms"])["variant"]
            change.update(table[best[part]])
    best_cfg = dataclasses.replace(base, **change)
    from kernels.attention.triton_attn import relpos_attention_triton

    ends = {
        "triton+rel-triton (default)": lambda *a, **kw: relpos_attention_triton(*a, rel_impl="triton", **kw),
        "triton+rel-triton (best)": lambda *a, **kw: relpos_attention_triton(*a, rel_impl="triton", config=best_cfg, **kw),
        "sdpa-cudnn+rel-triton": _providers()["sdpa-cudnn+rel-triton"] if device.type == "cuda" else None,
    }
    out["best"] = dict(best, config=dataclasses.asdict(best_cfg))
    out["fwdbwd"] = []
    for name, fn in ends.items():
        if fn is None:
            continue
        call, _ = _fwdbwd_call(fn, s, inputs, dout)
        out["fwdbwd"].append(dict(provider=name, ms=_time(call, device)))
        print(f"  fwd+bwd {name}: {out['fwdbwd'][-1]['ms']:.3f} ms", flush=True)
    return out


def write(out_dir: Path, stem: str, meta: dict, stages: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(meta, stages=stages), indent=1))
    lines = [f"# Fused attention: kernel profile and launch sweep — {meta['device_info']['name']}", "",
             f"- date {meta['date']}; command `{meta['command']}`",
             f"- torch {meta['device_info']['torch']}, triton {meta['device_info']['triton']}; bf16 on CUDA; "
             "times: do_bench median (ms); err: max|Δ|/max|default| of the kernel's outputs", ""]
    for st in stages:
        lines += [f"## {st['shape']}", ""]
        for prof in st.get("profile", []):
            lines += [f"### profile: {prof['provider']} — {prof['kernel_us_total'] / 1e3:.3f} ms of kernels per fwd+bwd", "",
                      "| µs per call | launches | kernel |", "|---|---|---|"]
            lines += [f"| {k['us_per_call']:.1f} | {k['launches_per_call']:.0f} | `{k['kernel']}` |" for k in prof["kernels"][:15]]
            lines.append("")
        sw = st.get("sweep")
        if sw:
            for part in ("fwd", "dq", "dkdv"):
                lines += [f"### {part}", "", "| variant | ms | err | ok |", "|---|---|---|---|"]
                for row in sw[part]:
                    ms = f"{row['ms']:.3f}" if row["ms"] is not None else row.get("error", "")
                    err = f"{row['err']:.1e}" if row["err"] is not None else ""
                    lines.append(f"| {row['variant']} | {ms} | {err} | {'yes' if row['ok'] else 'no'} |")
                lines.append("")
            lines += [f"best: {', '.join(f'{k} {v}' for k, v in sw['best'].items() if k != 'config')}", "",
                      "| fwd+bwd | ms |", "|---|---|"]
            lines += [f"| {row['provider']} | {row['ms']:.3f} |" for row in sw["fwdbwd"]]
            lines.append("")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="1,4", help="MViTv2-L stages, comma list")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--part", default="profile,sweep")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = set(args.part.split(","))
    if not parts <= {"profile", "sweep"}:
        raise SystemExit(f"--part takes profile and/or sweep, got {args.part!r}")
    wanted = {int(x) for x in args.stages.split(",")}
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [s for s in stage_shapes(["L"], device, args.batch) if s.stage in wanted]
    else:  # the interpreter: a tiny shape that exercises every code path, no timing value
        dtype = torch.float32
        shapes = [Shape("L", 4, 1, 2, 72, (2, 4, 4), (2, 2, 2))]
    info = device_info_cache(device)
    stem = f"attention_tune_{results_slug(device, info['name'])}_{datetime.date.today():%Y%m%d}"
    meta = dict(date=f"{datetime.date.today():%Y%m%d}", device_info=info,
                command="python -m bench.attention_tune " + " ".join(sys.argv[1:] if argv is None else argv))
    stages = []
    for s in shapes:
        print(s.label, flush=True)
        inputs, dout = make_inputs(s, dtype, device)
        row: dict = dict(shape=s.label)
        if "profile" in parts and device.type == "cuda":
            row["profile"] = profile(s, inputs, dout, device)
        if "sweep" in parts:
            row["sweep"] = sweep(s, inputs, dout, device)
        stages.append(row)
        write(Path(args.out), stem, meta, stages)
    print(f"wrote {Path(args.out) / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
