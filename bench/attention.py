"""Benchmark of the MViTv2 relative-position attention core (DESIGN §3.5, §6).

Providers, side by side in one process on one device, each checked against the reference before
it is timed (output and, for forward+backward, the six gradients):

- ``reference``: the official materialised computation (``kernels.attention.reference``);
- ``sdpa-<backend>``: the exact augmented-operand factorisation (``kernels.attention.sdpa``)
  through ``F.scaled_dot_product_attention`` restricted to one SDPA backend each (math, flash,
  efficient, cudnn); a backend that refuses the operands is reported as skipped;
- ``flex``: FlexAttention (``torch.compile``d) with a ``score_mod`` adding ``rel_t/rel_h/rel_w``
  gathered by the key's (t, h, w); on CPU forward only (FlexAttention has no CPU backward);
- ``xformers``: the augmented operands through ``memory_efficient_attention``, where it runs;
- ``triton``: the fused kernel (``kernels.attention.triton_attn``) when present, CUDA only
  (on CPU it would run through the interpreter, which is not a benchmark); ``triton+rel-triton``
  with the fused rel terms in their own kernels, ``triton+rel-inside`` with them inside the
  attention kernels (``auto`` runs the first, and the second for large calls where k' is not
  packed), and, only when named in ``--providers``, ``triton+rel-triton@jit``: the
  default path with every launch through Triton's JIT instead of ``kernels.launch``'s cached path.

Shapes: MViTv2-L 16×4 and MViTv2-S 16×4 stages at 16×224² input: q grids (8,56,56), (8,28,28),
(8,14,14), (8,7,7) (Nq 25089, 6273, 1569, 393 with cls), key grid (8,7,7) (Nk 393), hd 72 (L, heads
2/4/8/16) and 96 (S, heads 1/2/4/8), bf16, B=32 on CUDA (``--batch`` overrides it). On CPU only the
two smallest stages, B=1, fp32 (results labelled CPU).

FLOP count (written out; the bias additions and softmax are not counted):
    forward  = 4·B·nh·Nq·Nk·hd            (q·kᵀ and p·v, 2 FLOP per multiply-add)
             + 2·B·nh·(Nq−cls)·(Tk+Hk+Wk)·hd   (the rel_t/rel_h/rel_w terms)
    backward = 2.5 × forward              (dv, dp, dq, dk: 4 matmuls + recomputing q·kᵀ ≈ 5/2;
                                           FlashAttention's convention: without the recompute, and
                                           with the rel terms' 2×, fwd+bwd is ~3× forward, so TFLOP/s
                                           and % peak read ~17 % above a no-recompute count)
Timing: median of ``triton.testing.do_bench`` on CUDA (with the 20/80 % quantiles), median of
repeated ``time.perf_counter`` runs on CPU. Peak memory: ``torch.cuda.max_memory_allocated``
around one call, minus what was allocated before (inputs excluded); "n/a" on CPU.

    python -m bench.attention [--device cpu|cuda] [--out DIR] [--quick] [--model L|S|all]
                              [--pass fwd|fwdbwd|all] [--providers NAME,...]

writes ``attention_<device-slug>_<yyyymmdd>.{json,md}`` to --out (default bench/results), after
every shape, so a run cut short by a time limit still leaves its results.
"""
from __future__ import annotations

import argparse
import json
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from bench.common import command_line, do_bench_min, peak_mib, results_slug, write_files
from kernels.attention import relpos_attention
from kernels.attention.reference import check_inputs, rel_table_len, rel_terms, relpos_attention_reference
from kernels.attention.sdpa import relpos_attention_sdpa, relpos_attention_xformers, xformers_available

Grid = tuple[int, int, int]
Inputs = list[Optional[torch.Tensor]]  # q, k, v, rel_pos_t, rel_pos_h, rel_pos_w

# dense bf16 tensor-core rate, TFLOP/s (vendor data sheets); matched against the device name
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))

Q_GRIDS: tuple[Grid, ...] = ((8, 56, 56), (8, 28, 28), (8, 14, 14), (8, 7, 7))
K_GRID: Grid = (8, 7, 7)
MODELS = {"L": dict(hd=72, heads=(2, 4, 8, 16)), "S": dict(hd=96, heads=(1, 2, 4, 8))}


@dataclass(frozen=True)
class Shape:
    """One attention call: q (B, nh, Nq, hd), k/v (B, nh, Nk, hd), cls token on."""

    model: str
    stage: int
    B: int
    nh: int
    hd: int
    q_thw: Grid
    k_thw: Grid

    @property
    def Nq(self) -> int:
        return math.prod(self.q_thw) + 1

    @property
    def Nk(self) -> int:
        return math.prod(self.k_thw) + 1

    @property
    def label(self) -> str:
        return f"MViTv2-{self.model} s{self.stage} B{self.B} nh{self.nh} Nq{self.Nq} Nk{self.Nk} hd{self.hd}"


def stage_shapes(models: list[str], device: torch.device, batch: Optional[int] = None) -> list[Shape]:
    """The MViTv2 16×4 stage shapes; on CPU only the two smallest stages with B=1 (``batch``
    overrides B)."""
    shapes = []
    for model in models:
        cfg = MODELS[model]
        for stage, (q_thw, nh) in enumerate(zip(Q_GRIDS, cfg["heads"]), start=1):
            if device.type == "cpu" and stage < 3:
                continue
            # B = 32 on CUDA: at B = 4 every provider is bound by launch overhead (measured on an
            # H100, bench/results/README.md), which hides the attention itself
            B = batch or (32 if device.type == "cuda" else 1)
            shapes.append(Shape(model, stage, B, nh, cfg["hd"], q_thw, K_GRID))
    return shapes


def flops(s: Shape, pass_: str) -> float:
    """FLOPs of one call (see the module docstring for the formula)."""
    fwd = 4 * s.B * s.nh * s.Nq * s.Nk * s.hd + 2 * s.B * s.nh * (s.Nq - 1) * sum(s.k_thw) * s.hd
    return fwd if pass_ == "fwd" else fwd * (1 + 2.5)


# ---------------------------------------------------------------- providers


def relpos_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_thw: Grid, k_thw: Grid,
    rel_pos_t: Optional[torch.Tensor], rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    *, flex_fn: Callable, has_cls: bool = True, scale: Optional[float] = None,
) -> torch.Tensor:
    """FlexAttention with a score_mod that adds rel_t[i, t(j)] + rel_h[i, h(j)] + rel_w[i, w(j)].

    The rel terms (B, nh, Nq', Tk/Hk/Wk) get a zero row for the cls query and a zero column that
    the cls key's coordinate points at, so cls gets no bias. Gradients reach the tables through
    the rel terms (FlexAttention differentiates captured tensors)."""
    check_inputs(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, has_cls)
    hd = q.shape[-1]
    scale = hd**-0.5 if scale is None else scale
    tables = [t.to(q.dtype) if t is not None else None for t in (rel_pos_t, rel_pos_h, rel_pos_w)]
    rels = rel_terms(q, q_thw, k_thw, *tables, has_cls)
    s = 1 if has_cls else 0
    Tk, Hk, Wk = k_thw
    rt, rh, rw = (F.pad(r, (0, 1, s, 0)) if r is not None else None for r in rels)  # (B, nh, Nq, K+1)

    def key_coords(ki):
        """(t, h, w) of key ki from its index; the cls key points at the zero column K."""
        j = ki - s
        t, h, w = j // (Hk * Wk), (j // Wk) % Hk, j % Wk
        if has_cls:
            t, h, w = (torch.where(ki == 0, n, x) for x, n in ((t, Tk), (h, Hk), (w, Wk)))
        return t, h, w

    if rt is None:
        def score_mod(score, b, hh, qi, ki):
            _, h, w = key_coords(ki)
            return score + rh[b, hh, qi, h] + rw[b, hh, qi, w]
    else:
        def score_mod(score, b, hh, qi, ki):
            t, h, w = key_coords(ki)
            return score + rt[b, hh, qi, t] + rh[b, hh, qi, h] + rw[b, hh, qi, w]

    return flex_fn(q, k, v, score_mod=score_mod, scale=scale)


_SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")
OPT_IN = "triton+rel-triton@jit"  # the default path with every launch through the JIT (JitLaunch): named only
PROVIDER_ORDER = ("reference", *(f"sdpa-{b}" for b in _SDPA_BACKENDS), "flex", "xformers", "triton",
                  "sdpa-cudnn+rel-triton", "sdpa-flash+rel-triton", "triton+rel-triton", OPT_IN, "triton+rel-inside",
                  "auto")


def _sdpa_provider(name: str, rel_impl: str = "reference") -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]

    def fn(*args, **kw):
        with sdpa_kernel(backend):
            return relpos_attention_sdpa(*args, rel_impl=rel_impl, **kw)

    return fn


@functools.lru_cache(maxsize=None)
def _separate_config(hd: int, kr: int, dtype: torch.dtype, device_type: str):
    from kernels.attention.triton_attn import default_config

    return default_config(hd, kr, dtype, torch.device(device_type))


def rel_separate(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, **kw):
    """The fused Triton kernel with the rel terms in their own Triton kernels at every shape (the
    default table, pinned: ``auto`` itself moves them inside for large calls where k' is not
    packed, ``triton_attn.call_config``), so that it and ``triton+rel-inside`` stay comparable."""
    from kernels.attention.reference import rel_width
    from kernels.attention.triton_attn import relpos_attention_triton

    cfg = _separate_config(q.shape[-1], rel_width(k_thw, rel_pos_t is not None), q.dtype, q.device.type)
    return relpos_attention_triton(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, rel_impl="triton",
                                   config=cfg, **kw)


def rel_inside(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, **kw):
    """The fused Triton kernel with the rel terms inside its forward and dq kernels
    (``triton_attn.fused_rel_config`` of the default table) at every shape: on an H200 faster only
    for large calls where k' is not packed, where ``auto`` uses it."""
    from kernels.attention.reference import rel_width
    from kernels.attention.triton_attn import relpos_attention_triton

    cfg = _inside_config(q.shape[-1], rel_width(k_thw, rel_pos_t is not None), q.dtype, q.device.type)
    return relpos_attention_triton(q, k, v, q_thw, k_thw, rel_pos_t, rel_pos_h, rel_pos_w, rel_impl="triton",
                                   config=cfg, **kw)


class JitLaunch:
    """``triton+rel-triton@jit``: the default path with every Triton launch through Triton's JIT
    (``kernels.launch.enabled`` off for the whole timed call, backward included; see
    :func:`make_bench_fn`), against which ``triton+rel-triton`` shows what the cached launch path
    saves where the host sets the time (B 4)."""

    jit_launch = True

    def __call__(self, *a, **kw):
        return rel_separate(*a, **kw)


@functools.lru_cache(maxsize=None)
def _inside_config(hd: int, kr: int, dtype: torch.dtype, device_type: str):
    """``fused_rel_config`` of the default table, built once (not on every timed call: its cost
    would count against the provider in ``bench.attention_host``)."""
    from kernels.attention.triton_attn import default_config, fused_rel_config

    return fused_rel_config(default_config(hd, kr, dtype, torch.device(device_type)))


def make_providers(device: torch.device, wanted: Optional[list[str]]) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> fn(q, k, v, q_thw, k_thw, t, h, w) for the providers that exist here, and
    name -> reason for those that do not."""
    providers: dict[str, Callable] = {"reference": relpos_attention_reference}
    missing: dict[str, str] = {}
    for b in _SDPA_BACKENDS:
        providers[f"sdpa-{b}"] = _sdpa_provider(b)
    if device.type == "cuda":  # the fused rel terms (kernels/attention/rel_triton.py)
        for b in ("cudnn", "flash"):
            providers[f"sdpa-{b}+rel-triton"] = _sdpa_provider(b, rel_impl="triton")
        # what models run: relpos_attention(backend="auto") (on an sm_90 GPU, fp16/bf16: the fused Triton kernel)
        providers["auto"] = lambda *a, **kw: relpos_attention(*a, backend="auto", **kw)
    else:
        for name in ("sdpa-cudnn+rel-triton", "sdpa-flash+rel-triton"):
            missing[name] = "CUDA only (the rel-terms kernel runs on CPU only in the Triton interpreter)"
        missing["auto"] = "CUDA only here (on CPU auto is the sdpa backend)"
    try:
        from torch.nn.attention.flex_attention import flex_attention

        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        flex_fn = torch.compile(flex_attention, dynamic=False)
        providers["flex"] = lambda *a, **kw: relpos_attention_flex(*a, flex_fn=flex_fn, **kw)
    except Exception as exc:
        missing["flex"] = f"FlexAttention unavailable: {type(exc).__name__}: {exc}"
    if xformers_available(device):
        providers["xformers"] = relpos_attention_xformers
    else:
        from kernels.attention.sdpa import _xformers_probe

        missing["xformers"] = _xformers_probe(device) or "unavailable"
    if device.type != "cuda":
        for name in ("triton", "triton+rel-triton", OPT_IN, "triton+rel-inside"):
            missing[name] = "CUDA only (on CPU Triton runs through the interpreter, not a benchmark)"
    else:
        try:
            from kernels.attention.triton_attn import relpos_attention_triton

            # the kernel's own config table, rel terms by PyTorch einsums (autograd-tracked)
            providers["triton"] = lambda *a, **kw: relpos_attention_triton(*a, rel_impl="reference", **kw)
            providers["triton+rel-triton"] = rel_separate
            providers[OPT_IN] = JitLaunch()
            providers["triton+rel-inside"] = rel_inside
        except Exception as exc:
            missing["triton"] = f"kernels.attention.triton_attn not importable: {type(exc).__name__}: {exc}"
    if wanted:
        unknown = [w for w in wanted if w not in providers and w not in missing]
        if unknown:
            raise SystemExit(f"unknown providers {unknown}; known: {sorted(set(providers) | set(missing))}")
        providers = {n: f for n, f in providers.items() if n in wanted or n == "reference"}
        missing = {n: r for n, r in missing.items() if n in wanted}
    else:  # a launch-path comparison, only when asked for (bench/gpu_check's B 4 table)
        providers.pop(OPT_IN, None)
        missing.pop(OPT_IN, None)
    return providers, missing


# ---------------------------------------------------------------- inputs, checks, timing


def make_inputs(s: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Inputs, torch.Tensor]:
    """q, k, v in ``dtype``; fp32 tables (mixed precision, as in training); an output grad in the
    layout training hands back: the gradient of the model's ``out.transpose(1, 2).reshape(B, Nq, C)``
    is token-major ((B, Nq, nh, hd) memory) whatever layout a provider's output had, so each
    provider's backward is timed on the dO it gets in training."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (std * torch.randn(*shape, generator=g)).to(device, dt)

    q = rnd(s.B, s.nh, s.Nq, s.hd)
    k = rnd(s.B, s.nh, s.Nk, s.hd)
    v = rnd(s.B, s.nh, s.Nk, s.hd)
    tables = [rnd(rel_table_len(a, b), s.hd, std=0.1, dt=torch.float32) for a, b in zip(s.q_thw, s.k_thw)]
    dout = rnd(s.B, s.Nq, s.nh, s.hd).transpose(1, 2)
    return [q, k, v, *tables], dout


def run_once(fn: Callable, s: Shape, inputs: Inputs, dout: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Output and (when dout is given) the six gradients, on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_(dout is not None) for x in inputs]
    with torch.set_grad_enabled(dout is not None):
        out = fn(*leaves[:3], s.q_thw, s.k_thw, *leaves[3:])
    if dout is None:
        return [out.detach()]
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


def max_rel_err(got: list[Optional[torch.Tensor]], want: list[Optional[torch.Tensor]]) -> list[float]:
    """max|a − o| / max|o| for each tensor pair."""
    return [
        ((a.double() - o.double()).abs().max() / o.double().abs().max().clamp_min(1e-30)).item()
        for a, o in zip(got, want)
    ]


def make_bench_fn(fn: Callable, s: Shape, inputs: Inputs, dout: torch.Tensor, pass_: str) -> tuple[Callable, list]:
    """A zero-argument callable for one timed call, and the leaves whose grads to reset. A provider
    with ``jit_launch`` (:class:`JitLaunch`) runs with ``kernels.launch`` off throughout."""
    if pass_ == "fwd":
        leaves = []

        def call():
            with torch.no_grad():
                fn(*inputs[:3], s.q_thw, s.k_thw, *inputs[3:])
    else:
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]

        def call():
            fn(*leaves[:3], s.q_thw, s.k_thw, *leaves[3:]).backward(dout)
    if not getattr(fn, "jit_launch", False):
        return call, leaves
    from kernels import launch

    def jit_call():
        launch.enabled = False
        try:
            call()
        finally:
            launch.enabled = True
    return jit_call, leaves


def time_ms(call: Callable, leaves: list, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, 20 % quantile, 80 % quantile) in milliseconds: on CUDA ``do_bench`` over at least
    ``common.MIN_SAMPLES`` calls (:func:`bench.common.do_bench_min`)."""
    if device.type == "cuda":
        q50, q20, q80 = do_bench_min(call, quick=quick, leaves=leaves)
        return q50, q20, q80
    call()  # warm-up
    times: list[float] = []
    budget = 0.3 if quick else 1.0
    t_start = time.perf_counter()
    min_reps = 3 if quick else 5
    while len(times) < min_reps or (time.perf_counter() - t_start < budget and len(times) < 50):
        for x in leaves:
            x.grad = None
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), qs[1], qs[7]


def call_peak_mib(call: Callable, leaves: list, device: torch.device) -> Optional[float]:
    """``bench.common.peak_mib`` of one call, with the leaves' gradients cleared before and after
    (so neither the previous nor this call's gradients count)."""
    for x in leaves:
        x.grad = None
    peak = peak_mib(call, device)
    for x in leaves:
        x.grad = None
    return peak


# ---------------------------------------------------------------- report


def device_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"absent ({type(exc).__name__})"
    try:
        import xformers

        info["xformers"] = xformers.__version__ + ("" if xformers_available(device) else " (does not run here)")
    except Exception as exc:
        info["xformers"] = f"absent ({type(exc).__name__})"
    return info


def peak_tflops(name: str, dtype: torch.dtype) -> Optional[float]:
    if dtype != torch.bfloat16:
        return None
    for key, rate in PEAK_BF16_TFLOPS:
        if key in name:
            return rate
    return None


OURS = ("triton", "triton+rel-triton", OPT_IN, "triton+rel-inside", "auto")
"""Providers that run our fused attention kernel: ×best compares them with the alternatives only."""


def add_ratios(results: list[dict]) -> None:
    """Speed-ups vs the reference and vs the fastest alternative: a correct (``ok``) row of another
    provider that is neither the reference nor one of :data:`OURS` (SDPA, its hybrids with our rel
    kernels, flex, xformers). Ours were compared with each other too, so ``auto`` read 1.00 against
    ``triton+rel-triton``, the same kernels."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["shape"], r["pass"]), []).append(r)
    for rows in groups.values():
        ref = next((r["ms"] for r in rows if r["provider"] == "reference"), None)
        for r in rows:
            r["x_vs_reference"] = ref / r["ms"] if ref else None
            others = [o["ms"] for o in rows if o["provider"] not in ("reference", r["provider"], *OURS)
                      and o.get("ok", True)]
            r["best_other"] = min(others) if others else None
            r["x_vs_best_other"] = min(others) / r["ms"] if others else None


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def write_report(out_dir: Path, stem: str, meta: dict, results: list[dict], skipped: list[dict]) -> tuple[Path, Path]:
    add_ratios(results)
    dev = meta["device_info"]
    lines = [
        f"# Attention benchmark — {dev['name']}{' (CPU)' if dev['device'] == 'cpu' else ''}",
        "",
        f"- date: {meta['date']}; command: `{meta['command']}`",
        f"- torch {dev['torch']}, triton {dev['triton']}, xformers {dev['xformers']}, cuda {dev['cuda']}, "
        f"python {dev['python']}, CPU threads {dev['cpu_threads']}, 1-min load average at start "
        f"{_fmt(dev.get('load_average_1min'), '.1f')} (a loaded CPU makes times noisy)",
        f"- dtype {meta['dtype']} (tables fp32), cls token on, k grid {K_GRID}; timing: {meta['timing']}",
        f"- FLOPs: {meta['flop_formula']}",
        "- ms: median (p20: 20 % quantile, less sensitive to a busy host); TFLOP/s from that count; peak: extra allocated memory of one call (MiB); "
        "×ref / ×best: speed-up vs reference / vs the fastest correct alternative (SDPA, its hybrids, flex, xformers: "
        "not the reference, not our fused kernel's rows); "
        "err: max|Δ|/max|oracle| of the output (and of the worst gradient for fwd+bwd).",
        "",
    ]
    shape_order = {lab: i for i, lab in enumerate(dict.fromkeys(r["shape"] for r in results))}
    prov_order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    for pass_ in ("fwd", "fwdbwd"):
        rows = [r for r in results if r["pass"] == pass_]
        rows.sort(key=lambda r: (shape_order[r["shape"]], prov_order.get(r["provider"], 99)))
        if not rows:
            continue
        lines += [f"## {'forward' if pass_ == 'fwd' else 'forward + backward'}", ""]
        lines += ["| shape | provider | ms | p20 ms | TFLOP/s | % peak | peak MiB | ×ref | ×best | err out | err grad | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['shape']} | {r['provider']} | {r['ms']:.3f} | {r['ms_p20']:.3f} | {r['tflops']:.3g} | {_fmt(r['pct_peak'], '.1f')} "
                f"| {_fmt(r['peak_mib'], '.0f')} | {_fmt(r['x_vs_reference'], '.2f')} | {_fmt(r['x_vs_best_other'], '.2f')} "
                f"| {r['err_out']:.1e} | {_fmt(r['err_grad'], '.1e')} | {'yes' if r['ok'] else 'NO'} |"
            )
        lines.append("")
    if skipped:
        lines += ["## Skipped", ""]
        grouped: dict[tuple, list] = {}
        for sk in skipped:
            grouped.setdefault((sk["provider"], sk["pass"], sk["reason"]), []).append(sk["shape"])
        for (prov, pass_, reason), where in grouped.items():
            shapes_txt = "all shapes" if None in where else (where[0] if len(where) == 1 else f"{len(where)} shapes")
            lines.append(f"- {prov} ({pass_}, {shapes_txt}): {reason}")
        lines.append("")
    return write_files(out_dir, stem, {**meta, "results": results, "skipped": skipped}, lines)


# ---------------------------------------------------------------- main


def bench_shape(
    s: Shape, providers: dict[str, Callable], passes: list[str], dtype: torch.dtype, device: torch.device,
    quick: bool, results: list[dict], skipped: list[dict], names: list[str],
) -> None:
    """Check then time ``names`` at one shape, appending to ``results`` / ``skipped``."""
    inputs, dout = make_inputs(s, dtype, device)
    # oracle: the reference in fp32 on the device (float64 when the inputs already are fp32)
    up = [x.float() for x in inputs]
    oracle_fn = lambda *a: relpos_attention_reference(*a, upcast=dtype == torch.float32)  # noqa: E731
    oracle = run_once(oracle_fn, s, up, dout.float() if "fwdbwd" in passes else None)
    tol_out, tol_grad = (3e-2, 6e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-3)
    peak = peak_tflops(device_info_cache(device)["name"], dtype)
    for name in names:
        fn = providers[name]
        for pass_ in passes:
            t0 = time.perf_counter()
            try:
                got = run_once(fn, s, inputs, dout if pass_ == "fwdbwd" else None)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                skipped.append(dict(provider=name, shape=s.label, reason=reason, **{"pass": pass_}))
                print(f"  {name:16s} {pass_:6s} skipped: {reason}", flush=True)
                continue
            errs = max_rel_err(got, oracle[: len(got)])
            err_out = errs[0]
            err_grad = max(errs[1:]) if len(errs) > 1 else None
            ok = err_out <= tol_out and (err_grad is None or err_grad <= tol_grad)
            del got
            call, leaves = make_bench_fn(fn, s, inputs, dout, pass_)
            ms, ms20, ms80 = time_ms(call, leaves, device, quick)
            mem = call_peak_mib(call, leaves, device)
            tfl = flops(s, pass_) / (ms * 1e-3) / 1e12
            results.append(dict(
                shape=s.label, shape_detail=asdict(s) | {"Nq": s.Nq, "Nk": s.Nk}, provider=name,
                ms=ms, ms_p20=ms20, ms_p80=ms80, flops=flops(s, pass_), tflops=tfl,
                pct_peak=100 * tfl / peak if peak else None, peak_mib=mem,
                err_out=err_out, err_grad=err_grad, ok=ok, wall_s=time.perf_counter() - t0, **{"pass": pass_},
            ))
            print(f"  {name:16s} {pass_:6s} {ms:9.3f} ms  {tfl:7.3g} TFLOP/s  peak {_fmt(mem, '.0f')} MiB  "
                  f"err {err_out:.1e}/{_fmt(err_grad, '.1e')} {'ok' if ok else 'MISMATCH'}", flush=True)


def failed_checks(results: list[dict], ours_only: bool = True, skipped: Sequence[dict] = ()) -> list[str]:
    """The timed rows (of our kernel's providers, :data:`OURS`, unless ``ours_only`` is False) whose
    output or gradients missed the oracle's tolerance ("MISMATCH"), and ours that raised at a shape
    (``skipped`` entries with a shape: a provider not made on this device has none)."""
    mine = lambda name: name in OURS or not ours_only  # noqa: E731
    return ([f"{r['provider']} {r['pass']} {r['shape']}" for r in results if r.get("ok") is False and mine(r["provider"])]
            + [f"{k['provider']} {k['pass']} {k['shape']}: raised" for k in skipped
               if k.get("shape") is not None and mine(k["provider"])])


_DEVICE_INFO: dict[str, dict] = {}


def device_info_cache(device: torch.device) -> dict:
    if str(device) not in _DEVICE_INFO:
        _DEVICE_INFO[str(device)] = device_info(device)
    return _DEVICE_INFO[str(device)]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results", help="output folder")
    ap.add_argument("--quick", action="store_true", help="shorter timing; flex only for MViTv2-L (compile time)")
    ap.add_argument("--model", choices=["L", "S", "all"], default="all")
    ap.add_argument("--pass", dest="pass_", choices=["fwd", "fwdbwd", "all"], default="all")
    ap.add_argument("--batch", type=int, default=None, help="batch B (default 32 on CUDA, 1 on CPU)")
    ap.add_argument("--providers", default="", help="comma list (reference always runs), e.g. sdpa-flash,triton")
    ap.add_argument("--flex-budget-s", type=float, default=None,
                    help="skip flex for shapes started after this many seconds (compile time); "
                         "default 100 with --quick on CUDA, else unlimited")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="rewrite the table (and JSON) of an earlier run from its JSON, with the derived columns "
                         "(×ref, ×best) computed afresh; the timings are kept; nothing is run")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.render)
        saved = json.loads(path.read_text())
        results, skipped = saved.pop("results"), saved.pop("skipped")
        for jpath in write_report(path.parent, path.stem, saved, results, skipped):
            print(f"rewrote {jpath}", flush=True)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = ["L", "S"] if args.model == "all" else [args.model]
    passes = ["fwd", "fwdbwd"] if args.pass_ == "all" else [args.pass_]
    wanted = [p for p in args.providers.split(",") if p] or None
    flex_budget = args.flex_budget_s
    if flex_budget is None and args.quick and device.type == "cuda":
        flex_budget = 100.0

    info = device_info_cache(device)
    slug = results_slug(device, info["name"])
    today = datetime.date.today().strftime("%Y%m%d")
    stem = f"attention_{slug}_{today}"
    meta = dict(
        date=today, command=command_line("bench.attention", argv),
        device_info=info, dtype=str(dtype).replace("torch.", ""), quick=args.quick,
        timing=("triton.testing.do_bench median (rep 30 ms quick / 50 ms, and at least 10 / 20 calls)"
                if device.type == "cuda"
                else "median of perf_counter repeats (≥3 and ~0.3 s with --quick, else ≥5 and ~1 s)"),
        flop_formula="fwd = 4·B·nh·Nq·Nk·hd + 2·B·nh·(Nq−1)·(Tk+Hk+Wk)·hd; fwd+bwd = 3.5·fwd",
    )
    providers, missing = make_providers(device, wanted)
    skipped = [dict(provider=n, shape=None, reason=r, **{"pass": "all"}) for n, r in missing.items()]
    for n, r in missing.items():
        print(f"provider {n} skipped: {r}", flush=True)
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    shapes = stage_shapes(models, device, args.batch)
    results: list[dict] = []
    t_start = time.perf_counter()
    non_flex = [n for n in providers if n != "flex"]
    print(f"{info['name']}  torch {info['torch']}  dtype {meta['dtype']}  providers {list(providers)}", flush=True)
    for s in shapes:  # everything but flex first: flex compiles per shape and is slow to start
        print(s.label, flush=True)
        bench_shape(s, providers, passes, dtype, device, args.quick, results, skipped, non_flex)
        write_report(Path(args.out), stem, meta, results, skipped)
    if "flex" in providers:
        flex_passes = passes if device.type == "cuda" else [p for p in passes if p == "fwd"]
        if device.type != "cuda" and "fwdbwd" in passes:
            skipped.append(dict(provider="flex", shape=None, reason="FlexAttention has no CPU backward", **{"pass": "fwdbwd"}))
        for s in shapes:
            if args.quick and s.model != "L":
                skipped.append(dict(provider="flex", shape=s.label, reason="--quick: flex only at MViTv2-L shapes", **{"pass": "all"}))
                continue
            if flex_budget is not None and time.perf_counter() - t_start > flex_budget:
                skipped.append(dict(provider="flex", shape=s.label, reason=f"time budget {flex_budget:.0f} s spent", **{"pass": "all"}))
                continue
            print(s.label, "(flex)", flush=True)
            bench_shape(s, providers, flex_passes, dtype, device, args.quick, results, skipped, ["flex"])
            write_report(Path(args.out), stem, meta, results, skipped)
    jpath, mpath = write_report(Path(args.out), stem, meta, results, skipped)
    print(f"\nwrote {jpath} and {mpath} in {time.perf_counter() - t_start:.0f} s\n")
    print("\n".join(line for line in mpath.read_text().splitlines() if line.startswith("|") or line.startswith("#")))
    ours = failed_checks(results, skipped=skipped)
    others = [r for r in failed_checks(results, ours_only=False) if r not in ours]
    if others:  # an alternative's wrong answer voids its comparison, not our run
        print(f"warning: alternatives that missed the oracle (their ratios compare with a wrong answer): "
              f"{'; '.join(others)}", file=sys.stderr)
    if ours:  # timed and written, but a wrong or failing kernel must not pass as a benchmark run
        print(f"MISMATCH against the oracle (or raised): {'; '.join(ours)}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
