"""MViTv2's pooling convolutions, forward + backward, per input layout (DESIGN §3.4, §6).

Every q/k/v pooling of MViTv2 is a depthwise Conv3d over one head's channels, applied to
(B·nh, hd, T, H, W). The model builds that input from a strided (B, nh, L, hd) view, and its memory
layout decides which convolution code torch runs:

- ``channels_last``: ``reshape(B·nh, T, H, W, hd).permute(0, 4, 1, 2, 3)``, a channels-last view
  (the model until 2026-11-28). torch sends a channels-last depthwise convolution to cuDNN.
- ``contiguous``: ``transpose(2, 3).reshape(B·nh, hd, T, H, W).contiguous()``, an NCDHW tensor, as the
  official code's ``.contiguous()`` after its permute (the model since). torch sends a contiguous
  5-D depthwise convolution to its own depthwise-3D kernels (except where cuDNN takes it: the
  profile column names the kernels that ran).
- ``channels_last+bench``: the first with ``torch.backends.cudnn.benchmark`` on (cuDNN times its
  algorithms once per shape and keeps the fastest).
- ``triton``: the contiguous input of ``contiguous``, convolved by our Triton kernels
  (``kernels.pool.depthwise_conv3d(..., backend="triton")``: forward, input gradient and a
  deterministic weight gradient; what ``pool_backend="triton"`` runs in the model). On a CPU it
  needs ``TRITON_INTERPRET=1`` (the tests set it); without it the layout is left out, with a note.

Every layout costs one copy of the view. Timed per distinct convolution of the model (found with
forward hooks on the meta device), the copy included: the pooling from the (B, nh, L, hd) view to
the pooled (B·nh, hd, T', H', W') output, then its backward (the view's and the weight's
gradients); ``triton.testing.do_bench``'s median. ``host µs`` (CUDA): the CPU time of one such
call, from batches queued behind a sleep kernel (``bench.attention_host.host_us_cuda``): where it
is near ``ms``, the call's time is the host's. ``err``: max|Δ|/max|ref| of the output, the input's
and the weight's gradient against the same computation in fp32; a ``triton`` row beyond
:data:`ERR_TOL` (over twice torch's own worst bf16 error on an H200, 1.1e-2) fails the run, exit 3,
after the files are written (a wrong kernel passed with its timings). ``per step``: Σ count × ms over the
model's convolutions, what one training step spends in them; ``auto (derived)``: the same sum over
the layout ``kernels.pool.auto_backend`` picks for each convolution (``triton`` or ``contiguous``),
from those two layouts' rows, not timed as one.

    python -m bench.pool_conv [--model mvitv2_l_16x4] [--batch 4] [--out bench/results]

On a CPU (no timing that means anything for a GPU) it runs the tiny variant at B 1 so that the
script itself is tested (``tests/models/test_bench_pool_conv.py``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.attention import device_info
from bench.common import command_line, cuda_kernels, results_slug, write_files

LAYOUTS = ("channels_last", "contiguous", "channels_last+bench", "triton")


def pool_convs(model_name: str, batch: int) -> list[dict]:
    """The model's pooling convolutions, one entry per distinct (input shape, kernel, stride,
    padding), with how many of them one forward runs, in order of first use."""
    from bench.model_step import build

    model, video, mask = build(model_name, "sdpa", batch, torch.device("meta"), torch.bfloat16)
    found: dict = collections.OrderedDict()

    def hook(name):
        def record(conv, args, _out):
            (x,) = args
            key = (tuple(x.shape), tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding))
            found.setdefault(key, dict(shape=key[0], kernel=key[1], stride=key[2], padding=key[3], count=0,
                                       first=name))["count"] += 1
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Conv3d) and n.rsplit(".", 1)[-1] in ("pool_q", "pool_k", "pool_v")]
    try:
        with torch.no_grad():
            model(video, mask)
    finally:
        for h in handles:
            h.remove()
    return list(found.values())


def _heads(conv: dict, batch: int) -> int:
    return conv["shape"][0] // batch


def make_case(conv: dict, batch: int, layout: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(run, tensors): ``run()`` pools one (B, nh, L, hd) view — strided like the model's q, k or v,
    one of three interleaved heads' channels — in ``layout`` and returns the output; tensors: the
    leaf view's base, the weight."""
    N, C, T, H, W = conv["shape"]
    nh = _heads(conv, batch)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, T * H * W, 3, nh, C, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(C, 1, *conv["kernel"], generator=g) / 27 ** 0.5).to(device, dtype).requires_grad_()

    def run() -> torch.Tensor:
        x = qkv[:, :, 1].transpose(1, 2)  # (B, nh, L, hd), the k of an unbound qkv
        if layout.startswith("channels_last"):
            x = x.reshape(N, T, H, W, C).permute(0, 4, 1, 2, 3)
        else:
            x = x.transpose(2, 3).reshape(N, C, T, H, W).contiguous()
        if layout == "triton":
            from kernels.pool import depthwise_conv3d

            return depthwise_conv3d(x, weight, conv["stride"], conv["padding"], backend="triton")
        return torch.nn.functional.conv3d(x, weight, None, conv["stride"], conv["padding"], 1, C)
    return run, (qkv, weight)


ERR_TOL = {torch.bfloat16: 2.5e-2, torch.float32: 1e-4}
"""The largest ``err`` of our kernels' rows, by dtype (torch's layouts on an H200 in bf16: at most 1.1e-2)."""


def failed_checks(convs: list[dict], dtype: torch.dtype) -> list[str]:
    """Our (``triton``) rows whose output or gradients are off by more than :data:`ERR_TOL`."""
    tol = ERR_TOL[dtype]
    return [f"{c['first']} {r['layout']}: {k} {r[k]:.1e} > {tol:g}" for c in convs for r in c["results"]
            if r["layout"] == "triton" for k in ("err_out", "err_dx", "err_dw") if not r[k] <= tol]


def _backend_flags(layout: str):
    if layout.endswith("+bench"):
        return torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False)
    return contextlib.nullcontext()


def fwd_bwd(run: Callable[[], torch.Tensor], leaves, grad_out: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        for t in leaves:
            t.grad = None
        run().backward(grad_out)
    return call


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference(conv: dict, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One convolution's fp32 output and gradients (contiguous layout), and the output gradient in
    ``dtype`` that every layout's backward gets: computed once, shared by the layouts."""
    run, (qkv, weight) = make_case(conv, batch, "contiguous", device, torch.float32)
    out = run()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad_out.float())
    return dict(grad_out=grad_out, out=out.detach(), dx=qkv.grad, dw=weight.grad)


def measure(conv: dict, batch: int, layout: str, device: torch.device, dtype: torch.dtype, quick: bool,
            ref: dict) -> dict:
    run, leaves = make_case(conv, batch, layout, device, dtype)
    grad_out = ref["grad_out"]
    with _backend_flags(layout):
        call = fwd_bwd(run, leaves, grad_out)
        out = run()
        out.backward(grad_out)
        errs = dict(err_out=rel_err(out, ref["out"]), err_dx=rel_err(leaves[0].grad, ref["dx"]),
                    err_dw=rel_err(leaves[1].grad, ref["dw"]))
        del out
        if device.type == "cuda":
            from bench.attention_host import host_us_cuda
            from bench.common import do_bench_min

            ms = do_bench_min(call, quick=quick, base_rep_ms=40 if quick else 100, quantiles=(0.5,))[0]
            kernels = [f"{k['kernel'][:60]} ({k['us_per_call']:.0f} µs ×{k['launches_per_call']:.0f})"
                       for k in cuda_kernels(call, reps=2)[:3]]
            try:
                host_us = statistics.median(host_us_cuda(call, calls=5, reps=5, cycles_per_ms=_sleep_cycles())[0])
            except RuntimeError as exc:  # the call synchronises: no host time to separate
                print(f"note: {layout}: no host time ({exc})", flush=True)
                host_us = None
        else:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            ms, kernels, host_us = statistics.median(times), [], None
    return dict(layout=layout, ms=ms, host_us=host_us, kernels=kernels, **errs)


@functools.lru_cache(maxsize=None)
def _sleep_cycles() -> float:
    from bench.attention_host import _sleep_cycles_per_ms

    return _sleep_cycles_per_ms()


def auto_layout(conv: dict, device: torch.device, dtype: torch.dtype) -> str:
    """The layout ``kernels.pool``'s ``auto`` amounts to for this convolution: ``triton`` where
    :func:`kernels.pool.auto_backend` picks the Triton kernels, else ``contiguous`` (torch's)."""
    from kernels import tuned_for
    from kernels.pool import auto_backend

    x = torch.empty(conv["shape"], dtype=dtype, device="meta")
    if device.type == "cuda" and torch.cuda.is_available() and not tuned_for(device):  # (the meta stand-in
        # cannot ask the real GPU; counting CUDA's path on a CPU assumes the GPU it was tuned on)
        return "contiguous"
    return "triton" if auto_backend(x, device_type=device.type) == "triton" else "contiguous"


def write_report(out_dir: Path, stem: str, meta: dict, convs: list[dict]) -> tuple[Path, Path]:
    dev = meta["device_info"]
    lines = [
        f"# MViTv2 pooling convolutions, forward + backward, per input layout — {dev['name']}",
        "",
        f"- date {meta['date']}; command `{meta['command']}`",
        f"- torch {dev['torch']}, triton {dev['triton']}, python {dev['python']}; model {meta['model']}, B {meta['batch']}, "
        f"{meta['dtype']}; layouts and columns: `bench/pool_conv.py`'s docstring; convolutions measured: "
        f"{meta.get('convolutions_measured', 'all')} (per-step sums cover those)",
        "",
        "| first use | input (B·nh, hd, T, H, W) | kernel / stride | count | layout | ms | host µs | err out / dx / dw "
        "| kernels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in convs:
        for r in c["results"]:
            host = "-" if r.get("host_us") is None else f"{r['host_us']:.0f}"
            lines.append(f"| {c['first']} | {tuple(c['shape'])} | {tuple(c['kernel'])} / {tuple(c['stride'])} | {c['count']} "
                         f"| {r['layout']} | {r['ms']:.3f} | {host} "
                         f"| {r['err_out']:.1e} / {r['err_dx']:.1e} / {r['err_dw']:.1e} | {'; '.join(r['kernels'])} |")
    lines += ["", "| layout | per step ms (Σ count × ms) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in meta["per_step_ms"].items()]
    return write_files(out_dir, stem, {**meta, "convs": convs}, lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="variant (default mvitv2_l_16x4 on CUDA, mvitv2_tiny on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="clips (default 4 on CUDA, 1 on CPU)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    ap.add_argument("--quick", action="store_true", help="shorter timing")
    ap.add_argument("--out", default="bench/results", help="output folder")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = args.model or ("mvitv2_l_16x4" if cuda else "mvitv2_tiny")
    batch = args.batch or (4 if cuda else 1)
    layouts = [x for x in args.layouts.split(",") if x]
    if unknown := sorted(set(layouts) - set(LAYOUTS)):
        ap.error(f"unknown layouts {unknown}; choose from {', '.join(LAYOUTS)}")
    from kernels import launchable_on

    if "triton" in layouts and not launchable_on(device):
        print("note: layout 'triton' left out: the kernels need CUDA, or TRITON_INTERPRET=1 on a CPU", flush=True)
        layouts.remove("triton")
    if not layouts:
        ap.error("no layout left to time")
    dtype = torch.bfloat16 if cuda else torch.float32
    convs = pool_convs(model, batch)
    derive = {"contiguous", "triton"} <= set(layouts)  # the size rule's choice per convolution
    per_step = {k: 0.0 for k in layouts + (["auto (derived)"] if derive else [])}
    meta = dict(date=datetime.date.today().strftime("%Y%m%d"), command=command_line("bench.pool_conv", argv),
                device_info=device_info(device), model=model, batch=batch, dtype=str(dtype).replace("torch.", ""),
                per_step_ms=per_step)
    stem = f"pool_conv_{results_slug(device, meta['device_info']['name'])}_{meta['date']}" + (f"_{args.tag}" if args.tag else "")
    for i, c in enumerate(convs):
        c["results"] = []
        ref = reference(c, batch, device, dtype)
        for layout in layouts:
            r = measure(c, batch, layout, device, dtype, args.quick, ref)
            c["results"].append(r)
            per_step[layout] += c["count"] * r["ms"]
            host = "" if r["host_us"] is None else f"  host {r['host_us']:.0f} µs"
            print(f"{c['first']:<24} {str(tuple(c['shape'])):<28} s{tuple(c['stride'])} ×{c['count']:<3} {layout:<20} "
                  f"{r['ms']:8.3f} ms{host}  err {r['err_out']:.1e}/{r['err_dx']:.1e}/{r['err_dw']:.1e}  "
                  f"{r['kernels'][0] if r['kernels'] else ''}", flush=True)
        if derive:
            c["auto"] = auto_layout(c, device, dtype)
            per_step["auto (derived)"] += c["count"] * next(r["ms"] for r in c["results"] if r["layout"] == c["auto"])
        # written after every convolution: a run cut by its time limit (bench/gpu_check) keeps what it measured
        meta["convolutions_measured"] = f"{i + 1} of {len(convs)}"
        paths = write_report(Path(args.out), stem, meta, convs[: i + 1])
    for k, v in per_step.items():
        print(f"per step  {k:<20} {v:8.2f} ms")
    print("wrote", *paths)
    failed = failed_checks(convs, dtype)
    if failed:  # timed and written, but a wrong kernel must not pass as a benchmark run (bench/gpu_check reads rc)
        print(f"MISMATCH against fp32: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(3)

if __name__ == "__main__":
    main()
