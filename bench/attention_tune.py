"""Where the fused Triton attention spends its time, and which launch configuration is fastest.

Two parts, both at the MViTv2-L stage shapes of ``bench.attention`` (bf16, B = 32 on CUDA):

1. ``profile``: the CUDA kernels of one forward+backward, from ``torch.profiler``, for the fused
   Triton kernel with fused rel terms (its default table, what ``auto`` runs), the same with the
   rel terms inside its forward and dq kernels (``triton+rel-inside``), and the SDPA-cuDNN path
   with fused rel terms: µs per call for every kernel, so the gap is located, not guessed.
2. ``sweep``: each kernel timed alone (``triton.testing.do_bench`` on prepared inputs) under every
   configuration in its table: the three attention kernels (``FWD``, ``DQ``, ``DKDV``: changes to
   the default :class:`RelPosAttnConfig`, the row layout ``split`` included) and the three rel-term
   kernels (``REL_FWD``, ``REL_DQ``, ``REL_DTAB``: changes to ``RelTritonConfig``), and the rel
   terms separate or inside the attention kernels (``REL_INSIDE_FWD``/``_DQ``: ``fwd_rel`` = rel forward +
   attention forward, ``dq_rel`` = dq + rel dq, against the same work in one kernel). Every variant's
   outputs are compared with the default's (max|Δ| / max|default| ≤ 2e-2, bf16) before its time
   counts. The fastest valid variant of each kernel is combined and the whole forward+backward
   timed against the defaults and against SDPA-cuDNN with fused rel terms (with the default and
   with the best rel-term table: those kernels serve both paths), in the same process.

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
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.attention import Shape, device_info_cache, make_inputs, stage_shapes
from bench.attention_host import make_call
from bench.common import command_line, cuda_kernels, require_interpreter_on_cpu, results_slug

# changes to the default RelPosAttnConfig (attention kernels) and RelTritonConfig (rel-term
# kernels), per kernel; "default" is the table the code uses on CUDA
FWD: dict[str, dict] = {
    "default": {},
    "nosplit": dict(split=False),
    "m128w4": dict(fwd_block_m=128),
    "m128w8": dict(fwd_block_m=128, fwd_warps=8),
    "n128": dict(fwd_block_n=128),
    "n32": dict(fwd_block_n=32),
    "s3": dict(fwd_stages=3),
    "packk": dict(pack_k=True),
    "asmk": dict(pack_k=False),
    "r168": dict(fwd_maxnreg=168),  # 3 programs per SM where the kernel takes more (k' assembled: 185)
    "tail": dict(fwd_tail=True),  # the last keys in a 16-key tile after the loop (Nk 393: 6·64 + 16)
    "m128 tail": dict(fwd_block_m=128, fwd_tail=True),
}
DQ: dict[str, dict] = {
    "default": {},
    "nosplit": dict(split=False),
    "n64": dict(dq_block_n=64),
    "n16": dict(dq_block_n=16),
    "m32": dict(dq_block_m=32),
    "m128w8": dict(dq_block_m=128, dq_warps=8),
    "m128w4": dict(dq_block_m=128),
    "w8": dict(dq_warps=8),
    "s2": dict(dq_stages=2),
    "s4": dict(dq_stages=4),
    "packk": dict(pack_k=True),
    "asmk": dict(pack_k=False),
    "r168": dict(dq_maxnreg=168),  # the same (k' assembled: 172)
    "tail": dict(dq_tail=True),
}
DKDV: dict[str, dict] = {
    "default": {},
    "nosplit": dict(split=False),
    "w8": dict(dkdv_warps=8),
    "m32": dict(dkdv_block_m=32),
    "n32": dict(dkdv_block_n=32),
    "m128w8": dict(dkdv_block_m=128, dkdv_warps=8),
    "n128w8": dict(dkdv_block_n=128, dkdv_warps=8),
    "s2": dict(dkdv_stages=2),
    "s4": dict(dkdv_stages=4),
    "pps4": dict(dkdv_programs_per_sm=4),
    "pps16": dict(dkdv_programs_per_sm=16),
}
REL_FWD: dict[str, dict] = {
    "default": {},
    "m32": dict(fwd_block_m=32),
    "m128": dict(fwd_block_m=128),
    "w8": dict(fwd_warps=8),
    "m128w8": dict(fwd_block_m=128, fwd_warps=8),
    "w2": dict(fwd_warps=2),
}
REL_DQ: dict[str, dict] = {
    "default": {},
    "m16": dict(dq_block_m=16),
    "m64": dict(dq_block_m=64),
    "w2": dict(dq_warps=2),
    "m64w8": dict(dq_block_m=64, dq_warps=8),
    "m128w8": dict(dq_block_m=128, dq_warps=8),
    "m16w2": dict(dq_block_m=16, dq_warps=2),
}
REL_DTAB: dict[str, dict] = {
    "default": {},
    "r32": dict(dtab_block_r=32),
    "r128": dict(dtab_block_r=128),
    "w8": dict(dtab_warps=8),
    "s2": dict(dtab_stages=2),
    "rows256": dict(dtab_rows=256),
    "rows1024": dict(dtab_rows=1024),
    "bh1": dict(dtab_bh=1),  # one batch·head per program (before the seventh session): 8× the partials
    "bh4": dict(dtab_bh=4),
    "bh16": dict(dtab_bh=16, dtab_min_programs=512),
}
# the rel-term forward and q-gradient as separate kernels ("default") or inside the attention's
# forward / dq kernel (RelPosAttnConfig.fuse_rel_fwd / fuse_rel_dq; "inside r168": with the register
# caps of triton_attn.fused_rel_config, 3 programs per SM at 4 warps), timed as fwd_rel = rel
# forward + attention forward and dq_rel = dq + rel dq
REL_INSIDE_FWD: dict[str, dict] = {
    "default": {},
    "inside": dict(fuse_rel_fwd=True),
    "inside r168": dict(fuse_rel_fwd=True, fwd_maxnreg=168),
}
REL_INSIDE_DQ: dict[str, dict] = {
    "default": {},
    "inside": dict(fuse_rel_dq=True),
    "inside r168": dict(fuse_rel_dq=True, dq_maxnreg=168),
}
TOL = 2e-2


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _time(call: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of ``call``: the do_bench median on CUDA, one call after a warm-up elsewhere."""
    if device.type == "cuda":
        from bench.common import do_bench_min

        return do_bench_min(call, quick=True, base_rep_ms=40, quantiles=(0.5,))[0]  # at least 10 calls
    call()
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def _providers() -> dict[str, Callable]:
    from bench.attention import _sdpa_provider, rel_inside
    from kernels.attention.triton_attn import relpos_attention_triton

    return {
        "triton+rel-triton": lambda *a, **kw: relpos_attention_triton(*a, rel_impl="triton", **kw),
        "triton+rel-inside": rel_inside,
        "sdpa-cudnn+rel-triton": _sdpa_provider("cudnn", rel_impl="triton"),
    }


def profile(s: Shape, inputs: list, dout: torch.Tensor, device: torch.device) -> list[dict]:
    """Per-kernel CUDA µs of one forward+backward, for each provider of :func:`_providers`."""
    rows = []
    for name, fn in _providers().items():
        call = make_call(fn, s, inputs, dout, "fwdbwd")
        for _ in range(3):
            call()
        kernels = cuda_kernels(call)
        total = sum(k["us_per_call"] for k in kernels)
        rows.append(dict(provider=name, kernel_us_total=total, kernels=kernels))
        print(f"  profile {name}: {total / 1e3:.3f} ms of kernels per fwd+bwd", flush=True)
        for k in kernels[:12]:
            print(f"    {k['us_per_call']:9.1f} us  x{k['launches_per_call']:.0f}  {k['kernel']}", flush=True)
    return rows


def _variants(part: str, table: dict[str, dict], make: Callable, device: torch.device) -> list[dict]:
    """Time every variant of one kernel. ``make(change)`` runs it once and returns (outputs, call);
    outputs are compared with the "default" variant's, call is what is timed."""
    rows, ref = [], None
    for name, change in table.items():
        try:
            if ref is None and name != "default":  # (the next variant became the reference: err 0, ok; and
                # is not even built: its compile would spend the device call's time on a discarded row)
                raise RuntimeError("no reference to check against: the default variant failed")
            got, call = make(change)
            ref = ref if ref is not None else got
            err = max(_rel_err(a, b) for a, b in zip(got, ref) if a is not None)
            rows.append(dict(variant=name, ms=_time(call, device), err=err, ok=err <= TOL))
        except Exception as exc:  # a variant that cannot compile (shared memory, registers) is reported
            rows.append(dict(variant=name, ms=None, err=None, ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
            if "illegal memory access" in str(exc):  # the CUDA context is lost: every later result would be too
                print(f"  {part:8s} {name:10s} {rows[-1]}", flush=True)
                raise
        print(f"  {part:8s} {name:10s} {rows[-1]}", flush=True)
    return rows


def _best(rows: list[dict], table: dict[str, dict], keep: Callable[[dict], bool] = lambda change: True) -> str:
    ok = [row for row in rows if row["ok"] and keep(table[row["variant"]])]
    return min(ok, key=lambda row: row["ms"])["variant"] if ok else "default"


def sweep(s: Shape, inputs: list, dout: torch.Tensor, device: torch.device,
          save: Optional[Callable[[dict], None]] = None) -> dict:
    """Per-kernel times of every variant, then the best combination end to end. ``save(partial)``
    is called with what is done after each kernel's variants and each end-to-end row, so a run cut
    short by its time limit keeps its files."""
    from kernels.attention import rel_triton as rt
    from kernels.attention import triton_attn as ta

    q, k, v, t, h, w = inputs
    tables = (t, h, w)
    hd, scale = s.hd, s.hd**-0.5
    g, rbase = rt.rel_setup(q, s.q_thw, s.k_thw, tables, True)
    tabs = rt.prepare_tables(q, tables, g)  # what the rel-term code reads
    r = rt.rel_forward(q, tabs, g, rbase)
    kr = r.shape[-1]
    layouts = {split: ta._Dims.of(hd, kr, split) for split in (True, False)}
    base = ta._configs(layouts[True].wa, q.dtype, device)
    do, do_nh = dout, ta._heads_layout(dout)  # token-major, as training hands it back (bench.attention.make_inputs)
    per_split = {}  # split -> (dims, key one-hot table, {pack_k: key rows}): what a variant of that layout reads
    for split, dims in layouts.items():
        e = ta._key_table(k, s.k_thw, s.k_thw[0], dims, True)
        per_split[split] = (dims, e, {False: k, True: torch.cat([k, e.expand(*k.shape[:3], e.shape[-1])], -1)})
    o, lse = ta._fwd(q, r, k, per_split[True][1], v, layouts[True], True, scale, base)
    for split, (dims, e, _) in per_split.items():  # + the packed q'' rows and delta of each layout
        _, dr, delta, qa = ta._bwd_dq(q, r, k, e, v, o, do, do_nh, lse, dims, True, scale, dataclasses.replace(base, split=split))
        per_split[split] += (qa, delta)

    def layout(change):
        """A variant's config and what its kernels read: row layout, key one-hot table, the key rows
        (packed or not, as :func:`triton_attn._pack_k` says), and the packed q'' rows and delta."""
        cfg = dataclasses.replace(base, **change)
        dims, e, keys, qa, delta = per_split[cfg.split]
        return cfg, dims, e, keys[ta._pack_k(cfg, s.Nq, s.Nk)], qa, delta

    def fwd(change):
        cfg, dims, e, kk, _, _ = layout(change)
        return ta._fwd(q, r, kk, e, v, dims, True, scale, cfg), lambda: ta._fwd(q, r, kk, e, v, dims, True, scale, cfg)

    def dq(change):
        cfg, dims, e, kk, _, _ = layout(change)

        def call():
            return ta._bwd_dq(q, r, kk, e, v, o, do, do_nh, lse, dims, True, scale, cfg)
        return call()[:3], call  # dq, dR, delta (the packed rows differ in width between layouts)

    def dkdv(change):
        cfg, dims, e, kk, qa, delta = layout(change)

        def call():
            return ta._bwd_dkdv(qa, kk, e, v, do, do_nh, lse, delta, dims, cfg)
        return call(), call

    def fwd_rel(change):
        cfg, dims, e, kk, _, _ = layout(change)

        def call():
            if cfg.fuse_rel_fwd:  # the forward kernel writes R
                rr = torch.empty_like(r)
                return (*ta._fwd(q, rr, kk, e, v, dims, True, scale, cfg, (tabs, g)), rr)
            rr = rt._fwd(q, tabs, g, rbase)
            return (*ta._fwd(q, rr, kk, e, v, dims, True, scale, cfg), rr)
        return call(), call

    def dq_rel(change):
        cfg, dims, e, kk, _, _ = layout(change)

        def call():
            if cfg.fuse_rel_dq:  # the dq kernel adds q's rel-path gradient
                return ta._bwd_dq(q, r, kk, e, v, o, do, do_nh, lse, dims, True, scale, cfg, (tabs, g))[:2]
            dq_, dr_, _, _ = ta._bwd_dq(q, r, kk, e, v, o, do, do_nh, lse, dims, True, scale, cfg)
            return rt._bwd_q(dr_, q, tabs, g, rbase, dq_), dr_
        return call(), call

    def rel_fwd(change):
        cfg = dataclasses.replace(rbase, **change)
        return (rt._fwd(q, tabs, g, cfg),), lambda: rt._fwd(q, tabs, g, cfg)

    def rel_dq(change):
        cfg = dataclasses.replace(rbase, **change)
        return (rt._bwd_q(dr, q, tabs, g, cfg),), lambda: rt._bwd_q(dr, q, tabs, g, cfg)

    def rel_dtab(change):
        cfg = dataclasses.replace(rbase, **change)
        return rt._bwd_tables(dr, q, tables, g, cfg), lambda: rt._bwd_tables(dr, q, tables, g, cfg)

    parts = dict(fwd=(FWD, fwd), dq=(DQ, dq), dkdv=(DKDV, dkdv),
                 rel_fwd=(REL_FWD, rel_fwd), rel_dq=(REL_DQ, rel_dq), rel_dtab=(REL_DTAB, rel_dtab),
                 fwd_rel=(REL_INSIDE_FWD, fwd_rel), dq_rel=(REL_INSIDE_DQ, dq_rel))
    out: dict = {}
    for part, (table, make) in parts.items():
        out[part] = _variants(part, table, make, device)
        if save is not None:
            save(out)

    # best of each kernel; the attention kernels share one row layout (split): the best dk/dv's
    best = {"dkdv": _best(out["dkdv"], DKDV)}
    split = DKDV[best["dkdv"]].get("split", base.split)
    change: dict = dict(DKDV[best["dkdv"]])
    for part, table in (("fwd", FWD), ("dq", DQ)):
        best[part] = _best(out[part], table, lambda c: c.get("split", base.split) == split)
        change.update(table[best[part]])
    # the launch-table winners alone: the fifteenth session's stage-1 "best" (5.514 against the
    # default's 5.481 ms) also moved the rel forward inside, so it could not say which change lost
    separate_cfg = dataclasses.replace(base, **change)
    for part, table in (("fwd_rel", REL_INSIDE_FWD), ("dq_rel", REL_INSIDE_DQ)):  # rel terms inside or not
        best[part] = _best(out[part], table)
        change.update(table[best[part]])
    rel_change: dict = {}
    for part, table in (("rel_fwd", REL_FWD), ("rel_dq", REL_DQ), ("rel_dtab", REL_DTAB)):
        best[part] = _best(out[part], table)
        rel_change.update(table[best[part]])
    best_cfg, best_rel = dataclasses.replace(base, **change), dataclasses.replace(rbase, **rel_change)
    out["best"] = dict(best, config=dataclasses.asdict(best_cfg), rel_config=dataclasses.asdict(best_rel))

    def fused(cfg):
        return lambda *a, **kw: ta.relpos_attention_triton(*a, rel_impl="triton", config=cfg, **kw)

    ends = [("triton+rel-triton (default)", fused(None), rbase),
            ("triton+rel-triton (best)", fused(best_cfg), best_rel),
            ("triton+rel-triton (best tiles, rel terms separate)", fused(separate_cfg), best_rel),
            ("triton+rel-triton (best tiles alone)", fused(separate_cfg), rbase),
            ("triton+rel-triton (rel inside, r168)", fused(ta.fused_rel_config(base)), rbase),
            ("triton+rel-triton (best, rel inside, r168)", fused(ta.fused_rel_config(best_cfg)), best_rel)]
    if ta.call_config(hd, kr, q.dtype, device, s.Nq, s.Nk, q.shape[0] * q.shape[1], True) != base:
        # "(default)" is call_config's choice, the rel terms inside at MViTv2-L stage 4 at B 32: the
        # default table with them separate is what "best tiles alone" changes
        ends.insert(1, ("triton+rel-triton (default table, rel terms separate)", fused(base), rbase))
    if device.type == "cuda":
        ends += [("sdpa-cudnn+rel-triton", _providers()["sdpa-cudnn+rel-triton"], rbase),
                 ("sdpa-cudnn+rel-triton (best rel)", _providers()["sdpa-cudnn+rel-triton"], best_rel)]
    out["fwdbwd"] = []
    config_of = rt._config
    try:
        for name, fn, rel_cfg in ends:
            rt._config = lambda device, dtype, _c=rel_cfg: _c  # the rel-term table under test
            call = make_call(fn, s, inputs, dout, "fwdbwd")
            out["fwdbwd"].append(dict(provider=name, ms=_time(call, device)))
            print(f"  fwd+bwd {name}: {out['fwdbwd'][-1]['ms']:.3f} ms", flush=True)
            if save is not None:
                save(out)
    finally:
        rt._config = config_of
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
        if sw:  # (possibly partial: a run cut short by its time limit)
            for part in ("fwd", "dq", "dkdv", "rel_fwd", "rel_dq", "rel_dtab", "fwd_rel", "dq_rel"):
                if part not in sw:
                    continue
                lines += [f"### {part}", "", "| variant | ms | err | ok |", "|---|---|---|---|"]
                for row in sw[part]:
                    ms = f"{row['ms']:.3f}" if row["ms"] is not None else row.get("error", "")
                    err = f"{row['err']:.1e}" if row["err"] is not None else ""
                    lines.append(f"| {row['variant']} | {ms} | {err} | {'yes' if row['ok'] else 'no'} |")
                lines.append("")
            if "best" in sw:
                lines += [f"best: {', '.join(f'{k} {v}' for k, v in sw['best'].items() if 'config' not in k)}", "",
                          "| fwd+bwd | ms |", "|---|---|"]
                lines += [f"| {row['provider']} | {row['ms']:.3f} |" for row in sw.get("fwdbwd", [])]
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
    require_interpreter_on_cpu(device, "bench.attention_tune")
    parts = set(args.part.split(","))
    if not parts <= {"profile", "sweep"}:
        raise SystemExit(f"--part takes profile and/or sweep, got {args.part!r}")
    try:  # (a typo ran nothing, printed "wrote" and exited 0: gpu_check reported the stage as done)
        wanted = {int(x) for x in args.stages.split(",") if x.strip()}
    except ValueError:
        raise SystemExit(f"--stages takes stage numbers 1-4, got {args.stages!r}") from None
    if not wanted or not wanted <= {1, 2, 3, 4}:
        raise SystemExit(f"--stages takes stage numbers 1-4, got {args.stages!r}")
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [s for s in stage_shapes(["L"], device, args.batch) if s.stage in wanted]
    else:  # the interpreter: a tiny shape that exercises every code path, no timing value
        dtype = torch.float32
        shapes = [Shape("L", 4, 1, 2, 72, (2, 4, 4), (2, 2, 2))]
    info = device_info_cache(device)
    stem = f"attention_tune_{results_slug(device, info['name'])}_{datetime.date.today():%Y%m%d}"
    meta = dict(date=f"{datetime.date.today():%Y%m%d}", device_info=info,
                command=command_line("bench.attention_tune", argv))
    stages = []
    for s in shapes:
        print(s.label, flush=True)
        inputs, dout = make_inputs(s, dtype, device)
        row: dict = dict(shape=s.label)

        def save(partial: Optional[dict] = None, _row=row) -> None:  # files after every part of the stage
            if partial is not None:
                _row["sweep"] = partial
            write(Path(args.out), stem, meta, stages + [_row])

        if "profile" in parts and device.type == "cuda":
            row["profile"] = profile(s, inputs, dout, device)
            save()
        if "sweep" in parts:
            row["sweep"] = sweep(s, inputs, dout, device, save)
        stages.append(row)
        write(Path(args.out), stem, meta, stages)
    if not stages:
        raise SystemExit("nothing to tune: no shape of the stages asked for")
    print(f"wrote {Path(args.out) / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
