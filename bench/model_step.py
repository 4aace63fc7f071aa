"""One MaskFeat pre-training step of a whole model, per attention backend: its time, the CPU time
to issue it, and which of the two sets the pace.

``bench/attention.py`` times the attention alone. A training step also issues every linear layer,
norm, pooling and the HOG targets, and each costs host time. At the MaskFeat recipe's 4 clips per
GPU (MViTv2-L 16×4), whether a faster kernel reaches the step depends on one question: does the GPU
wait for the CPU?

Per attention backend (``auto`` = the fused Triton kernels on CUDA; ``sdpa``; others on request)
the step is the model's forward with HOG targets and loss, then backward, as ``engine/pretrain.py``
computes it. DeepSpeed and the optimiser are left out. Parameters and input are bf16, as under
DeepSpeed's bf16 mode, and cube masks are at ratio 0.4.

- step ms: wall time of one step, synchronised, median over ``--steps``.
- host ms (CUDA): the wall time of the same step at ``--host-img-size`` px (default 64): the same
  ops and launches (the table says where the counts differ) on ~1/12 of the GPU work, so the CPU
  sets that step's pace. The poolings' ``auto`` rule, which depends on the input's size, decides
  there as in the full-size step (:func:`pool_rule_at`). (Queuing the step behind a sleep kernel,
  ``bench.attention_host``'s method for one attention call, fails for a whole step: its ~3000
  launches overflow the launch queue, and on an H200 it read 421 ms for a 209 ms step.) Where even the small step's GPU kernels
  take over half its time, the host is at most that, and the note says so.
- host / step: near 1 (or above), the CPU sets the pace, and faster kernels cannot show.
- GPU kernels ms: the CUDA kernels of one step (``torch.profiler``, 2 steps); kernels / step well
  under 1 means the GPU idles for part of the step. The longest kernels are listed, and the GPU time
  per category of kernel (our attention and HOG kernels, GEMMs, convolutions, layer norms, copies
  and cats, ...): what a kernel of our own would have to replace to pay off.
- ``auto`` on CUDA runs twice: with ``kernels.launch`` (the default) and with every Triton launch
  through Triton's JIT (``auto@jit``).
- ``BACKEND+ckpt`` (on CUDA by default ``auto+ckpt``): the same step with every block recomputed in
  backward (``engine.distributed.apply_activation_checkpointing``; ``+ckptN``: the first N blocks,
  ``model.activation_checkpointing=N``). Against the plain row it says what the recompute costs in
  time and saves in peak memory, i.e. whether a batch needs it on this GPU.
- ``BACKEND+tpool`` / ``BACKEND+torchpool``: every q/k/v pooling convolution through
  ``kernels.pool``'s Triton kernels (``pool_backend="triton"``) / through torch's (``"torch"``),
  instead of the default ``auto`` (Triton for the large ones on CUDA).
- ``BACKEND+graph`` (CUDA): the step captured once in a CUDA graph and timed as replays, so the
  host issues nothing per step: how fast the step would be if the host never set the pace (no host
  column; a capture that fails says why in the note). Suffixes combine in any order, e.g.
  ``auto+ckpt8+tpool+graph``.
- peak MiB: ``torch.cuda.max_memory_allocated`` over the steps, parameters and input included.

- torch ops / Triton launches: what one step issues (counted in one extra step); with a few µs of
  host per op on a GPU machine, the op count alone says how much host time a step needs.

On CPU a tiny variant runs by default (``mvitv2_tiny``), and host = step: there is no asynchronous
device; its times check the code path. The op and launch counts do not depend on the input size
(the poolings' size rule is applied as at the variant's own size, :func:`pool_rule_at`), so
``--model mvitv2_l_16x4 --img-size 64`` on a CPU gives MViTv2-L's.

``--count-only`` counts what one step issues and times nothing; on a CPU it counts ``auto`` on
CUDA's path (the Triton backend with Triton rel terms and HOG, the launches stubbed). It also counts
the activations one forward saves for backward at the variant's full input size (meta device):
what activation checkpointing (``+ckpt``, ``+ckptN``) would save.

    python -m bench.model_step [--device cuda|cpu] [--model mvitv2_l_16x4] [--batch 4]
                               [--backends auto,auto+ckpt,sdpa,auto+torchpool,auto+graph]
                               [--steps 10] [--img-size PX]
                               [--host-img-size PX] [--count-only]
                               [--out DIR]

writes ``model_step_<device-slug>_<yyyymmdd>[_counts][_TAG].{json,md}`` to --out (default bench/results).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from bench.attention import device_info
from bench.common import by_category, command_line, cuda_kernels, require_interpreter_on_cpu, results_slug, write_files


def build(model_name: str, backend: str, batch: int, device: torch.device, dtype: torch.dtype,
          img_size: Optional[int] = None, checkpointing: Union[bool, int] = False,
          pool_backend: str = "auto") -> tuple:
    """(model, video, mask) for one step of ``model_name`` with attention ``backend`` and pooling
    convolutions ``pool_backend`` (at ``img_size`` px instead of the variant's, when given), its
    blocks recomputed in backward when ``checkpointing`` (true: all of them; N: the first N). On the
    meta device nothing is allocated or initialised (:func:`step_tflop`)."""
    from models import create_model
    from models.masking import make_masks

    extra = {} if img_size is None else dict(img_size=img_size)
    if pool_backend != "auto":
        extra["pool_backend"] = pool_backend
    T, H, W = _input_size(model_name, img_size)
    meta = device.type == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = create_model(model_name, task="pretrain", attn_backend=backend, **extra)
        shape = (batch, 3, T, H, W)
        video = torch.empty(shape) if meta else torch.randn(shape, generator=torch.Generator().manual_seed(0))
    model = model.to(device=device, dtype=dtype).train()
    if checkpointing:
        from engine.distributed import apply_activation_checkpointing

        apply_activation_checkpointing(model, checkpointing)
    video = video.to(device=device, dtype=dtype)
    mask = make_masks("cube", batch, tuple(model.mask_grid(T, H, W)), 0.4, np.random.default_rng(0)).to(device)
    return model, video, mask


class StepSpec(NamedTuple):
    """One --backends entry: ``ATTN[+ckpt|+ckptN][+tpool|+torchpool][+graph]`` (suffixes in any order)."""

    attn: str  # the models' attention backend
    ckpt: Union[bool, int] = False  # blocks recomputed in backward: all (True), the first N, or none
    pool: str = "auto"  # the models' pool_backend: +tpool "triton", +torchpool "torch"
    graph: bool = False  # +graph: the step captured once in a CUDA graph and replayed


CKPT = "+ckpt"  # the model's blocks (+ckptN: the first N) recomputed in backward
POOL_SUFFIXES = {"+tpool": "triton", "+torchpool": "torch"}  # who runs the q/k/v poolings
GRAPH = "+graph"
SUFFIXES = f"{CKPT}, {CKPT}N, {', '.join(POOL_SUFFIXES)}, {GRAPH}"


def parse_spec(spec: str) -> StepSpec:
    """``auto+ckpt8+tpool`` -> StepSpec("auto", 8, "triton"); each kind of suffix at most once;
    ValueError otherwise (the attention backend's name is checked by the caller)."""
    attn, *suffixes = spec.split("+")
    out, seen = StepSpec(attn), set()
    for token in suffixes:
        suffix = "+" + token
        if suffix in POOL_SUFFIXES:
            kind, out = "pool", out._replace(pool=POOL_SUFFIXES[suffix])
        elif suffix == GRAPH:
            kind, out = "graph", out._replace(graph=True)
        elif suffix.startswith(CKPT):
            n = suffix[len(CKPT):]
            if n and not n.isdigit():
                raise ValueError(f"{spec!r}: {CKPT} takes a block count, e.g. {attn}{CKPT}8")
            kind, out = "ckpt", out._replace(ckpt=int(n) if n else True)
        else:
            raise ValueError(f"{spec!r}: unknown suffix {suffix!r} (suffixes: {SUFFIXES})")
        if kind in seen:
            raise ValueError(f"{spec!r}: more than one {kind} suffix")
        seen.add(kind)
    return out


def _input_size(model_name: str, img_size: Optional[int] = None) -> tuple[int, int, int]:
    from models.variants import get_variant

    T, H, W = get_variant(model_name).input_size
    return (T, H, W) if img_size is None else (T, img_size, img_size)


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward`` with groups: each gradient (input, weight) costs what
    the forward does, 2 · |output| · (C_in / groups) · |kernel|, i.e. ``2 · prod(grad_out) ·
    prod(w[1:])``. torch's own formula ignores ``groups`` for the weight gradient, which counts a
    depthwise pooling's C times over (3.56 GFLOP for a 0.05 GFLOP gradient at 72 channels)."""
    if transposed:  # (no model has one): torch's own formula
        from torch.utils.flop_counter import conv_backward_flop as torch_formula

        return torch_formula(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                             _output_padding, _groups, output_mask, out_shape, **kwargs)
    fwd = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def step_tflop(model_name: str, batch: int, img_size: Optional[int]) -> float:
    """TFLOP of one forward+backward step (``torch.utils.flop_counter`` on the meta device, the
    convolutions' backward by :func:`conv_backward_flop`), with the reference attention backend:
    the products every backend computes (the sdpa backend's augmented head dims add 0.46 TFLOP of
    their own at MViTv2-L B 4)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, video, mask = build(model_name, "reference", batch, torch.device("meta"), torch.bfloat16, img_size)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
    with counter:
        model(video, mask).loss.backward()
    return counter.get_total_flops() / 1e12


@contextlib.contextmanager
def pool_rule_at(px: int, full_px: int, as_cuda: bool = False) -> Iterator[None]:
    """Within: the models' ``auto`` poolings decide as they would in the same step at ``full_px``
    (``kernels.pool.auto_backend`` with its threshold scaled by (px / full_px)², exact: every token
    grid of the model scales with the input's area), on CUDA's rule if ``as_cuda`` (counting on a
    CPU). A step at a small size then issues what the full-size step issues."""
    import models.mvit
    from kernels import pool

    real = models.mvit.auto_backend
    least = -(-pool.AUTO_TRITON_MIN_NUMEL * px * px // (full_px * full_px))  # ceil
    kind = "cuda" if as_cuda else None
    models.mvit.auto_backend = lambda x, dtype=None: real(x, dtype, min_numel=least, device_type=kind)
    try:
        yield
    finally:
        models.mvit.auto_backend = real


def _with(ctx: Callable[[], contextlib.AbstractContextManager], step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run inside a fresh ``ctx()`` each call."""
    def run() -> None:
        with ctx():
            step()
    return run


def count_work(step: Callable[[], None], stub: bool = False) -> tuple[list[str], list[str]]:
    """(torch ops with device work, Triton kernels launched) of one step, by name, in order: what the
    host issues. ``stub``: the Triton launches do nothing (see ``bench.attention_host.triton_launches``)."""
    from bench.attention_host import _OpCounter, triton_launches

    with triton_launches(stub=stub) as names, _OpCounter() as counter:
        step()
    return counter.ops, names


@contextlib.contextmanager
def _cuda_issue_path() -> Iterator[None]:
    """Within, on a CPU: the attention's relative-position terms and the HOG targets take the Triton
    kernels, as they do on CUDA (their ``"auto"`` resolves to ``"triton"``), the rel terms inside the
    attention kernels where CUDA runs them so (``triton_attn.call_config``). With the model's backend
    ``triton`` and the launches stubbed, one step then issues what ``auto`` issues on CUDA, though it
    computes nothing meaningful: for counting only. One launch per attention call is missing: the
    interpreter's dk/dv pass takes one query chunk, so the launch summing a GPU's chunk partials
    never comes (385 counted where the H200 issued 433 at 224 px; a GPU's chunk count depends on the
    grid, so pinning its SM count at the counting's 64 px gave 480, which matches nothing)."""
    import kernels.hog as hog
    from kernels.attention import triton_attn

    rel, hog_backend, fuse = triton_attn.resolve_rel_impl, hog._resolve_backend, triton_attn.fuse_rel_on
    triton_attn.resolve_rel_impl = lambda impl, device: "triton" if impl == "auto" else rel(impl, device)
    hog._resolve_backend = (lambda backend, x, cell: "triton" if backend == "auto" and not cell & (cell - 1)
                            else hog_backend(backend, x, cell))
    triton_attn.fuse_rel_on = lambda device: True  # the rel terms inside the kernels where CUDA has them
    try:
        yield
    finally:
        triton_attn.resolve_rel_impl, hog._resolve_backend, triton_attn.fuse_rel_on = rel, hog_backend, fuse


def saved_gib(model_name: str, backend: str, batch: int) -> Optional[float]:
    """GiB of activations one forward keeps for its backward, at the variant's full input size: every
    tensor autograd saves, once per storage (a view counts as its base), parameters left out. On the
    meta device, so nothing is allocated or computed; ``auto`` takes CUDA's path (the Triton
    attention saves what its kernels' backward reads, not an (Nq, Nk) matrix), the launches stubbed
    (needs ``TRITON_INTERPRET=1``, as ``--count-only`` does). With ``+ckpt`` the blocks keep only
    their inputs until backward recomputes them. This is the memory that activation checkpointing
    trades for a second forward; a GPU's peak adds the parameters, the optimiser state and
    backward's transients (``bench.model_step`` on CUDA: peak MiB). None for a Triton path outside
    the interpreter, whose launches cannot be stubbed for meta tensors."""
    import kernels
    from bench.attention_host import triton_launches
    from kernels import interpreting

    spec = parse_spec(backend)
    attn, emulate = spec.attn, spec.attn == "auto"
    if attn in ("auto", "triton") and not interpreting():
        return None
    model, video, mask = build(model_name, "triton" if emulate else attn, batch, torch.device("meta"),
                               torch.bfloat16, checkpointing=spec.ckpt)
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}  # id -> base, held so that no id is reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in params:
            kept.setdefault(id(base), base)
        return t

    check = kernels.launchable_on  # what kernels.require_launchable asks: the stubbed launches take meta tensors
    kernels.launchable_on = lambda device: True
    try:
        with _cuda_issue_path() if emulate else contextlib.nullcontext(), triton_launches(stub=True):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(video, mask)
    finally:
        kernels.launchable_on = check
    return sum(t.numel() * t.element_size() for t in kept.values()) / 2**30


def count_row(model_name: str, backend: str, batch: int, device: torch.device, img_size: Optional[int]) -> dict:
    """What one step issues, without timing it (``--count-only``). On a CPU, ``auto`` is counted on
    CUDA's path: the Triton backend with its Triton rel terms, the launches stubbed. Also the
    activations it saves at the variant's full input size (:func:`saved_gib`)."""
    spec = parse_spec(backend)
    emulate = device.type == "cpu" and spec.attn == "auto"
    model, video, mask = build(model_name, "triton" if emulate else spec.attn, batch, device, torch.bfloat16,
                               img_size, checkpointing=spec.ckpt, pool_backend=spec.pool)
    full_px, px = _input_size(model_name)[1], _input_size(model_name, img_size)[1]
    step = _with(lambda: pool_rule_at(px, full_px, as_cuda=emulate), make_step(model, video, mask))
    with _cuda_issue_path() if emulate else contextlib.nullcontext():
        count_work(step, stub=emulate)  # first step: cached index tables, compiles
        ops, names = count_work(step, stub=emulate)
    top = collections.Counter(ops).most_common(12)
    return dict(backend=backend, path="as on CUDA, launches stubbed" if emulate else device.type,
                torch_ops=len(ops), triton_launches=len(names), top_ops=top,
                saved_gib=saved_gib(model_name, backend, batch))


def make_step(model: torch.nn.Module, video: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        model(video, mask).loss.backward()
    return step


def capture(step: Callable[[], None], model: torch.nn.Module) -> Callable[[], None]:
    """``step`` (one forward+backward, gradients set to None first) captured once in a CUDA graph,
    after three warm-up steps on a side stream (Triton compiles, cached index tables, the caching
    allocator); returns the graph's ``replay``. The gradients then live in the graph's memory pool,
    rewritten by every replay (PyTorch's whole-network capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in model.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graph_row(name: str, step: Callable[[], None], model: torch.nn.Module, device: torch.device, reps: int) -> dict:
    """One ``+graph`` row: the eager step's op counts, then the step captured in a CUDA graph
    (:func:`capture`) and timed as replays: what the step takes with no host cost per step. A
    capture that fails (an op that synchronises or copies from the host inside the step) is
    reported in the note, not raised."""
    ops, launched = count_work(step)
    row = dict(backend=name, step_ms=float("nan"), step_ms_min=float("nan"), host_ms=None, kernels_ms=None,
               top_kernels=[], torch_ops=len(ops), triton_launches=len(launched), peak_mib=None,
               host_note="CUDA graph: one replay per step, the host issues nothing else")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        replay = capture(step, model)
    except RuntimeError as exc:
        row["host_note"] = f"capture failed: {str(exc).splitlines()[0][:160]}"
        torch.cuda.synchronize()
        return row
    replay()
    walls = step_ms(replay, device, reps)
    row.update(step_ms=statistics.median(walls), step_ms_min=min(walls),
               peak_mib=torch.cuda.max_memory_allocated(device) / 2**20)
    kernels = cuda_kernels(replay, reps=2)
    row["kernels_ms"] = sum(k["us_per_call"] for k in kernels) / 1e3
    row["top_kernels"] = kernels[:8]
    row["by_category"] = by_category(kernels)
    return row


def host_row(small_step: Callable[[], None], device: torch.device, reps: int, px: int, ops: int,
             launches: int) -> dict:
    """host_ms and host_note from the same step at ``px`` px (see the module docstring)."""
    small_step()  # warm-up: compiles for the small shapes, cuDNN plans
    small_step()
    walls = step_ms(small_step, device, reps)
    host = statistics.median(walls)
    small_ops, small_launched = count_work(small_step)
    kernels_ms = sum(k["us_per_call"] for k in cuda_kernels(small_step, reps=2)) / 1e3 if device.type == "cuda" else 0.0
    notes = []
    if kernels_ms > 0.5 * host:
        notes.append(f"at {px} px the GPU kernels took {kernels_ms:.0f} of {host:.0f} ms: host ≤ this")
    if (len(small_ops), len(small_launched)) != (ops, launches):
        notes.append(f"at {px} px: {len(small_ops)} torch ops, {len(small_launched)} Triton launches")
    return dict(host_ms=host, host_px=px, host_kernels_ms=kernels_ms, host_note="; ".join(notes))


def step_ms(step: Callable[[], None], device: torch.device, reps: int) -> list[float]:
    """Wall ms of ``reps`` synchronised steps."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(name: str, step: Callable[[], None], device: torch.device, reps: int,
            make_small_step: Optional[Callable[[], Callable[[], None]]] = None, small_px: Optional[int] = None) -> dict:
    """One row: step ms, peak memory, host ms (CUDA: the wall time of the same step at ``small_px``
    px, where the CPU sets the pace, built by ``make_small_step`` once the peak has been read: a
    small-step model alive during the timed steps added its parameters and gradients to the peak,
    +0.4–0.9 GB at MViTv2-L) and their ratio."""
    step()  # warm-up: Triton compiles, cuDNN plans, the caching allocator fills
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    walls = step_ms(step, device, reps)
    ops, launched = count_work(step)
    row = dict(backend=name, step_ms=statistics.median(walls), step_ms_min=min(walls), host_ms=None, host_note="",
               kernels_ms=None, top_kernels=[], torch_ops=len(ops), triton_launches=len(launched))
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if make_small_step is not None:
            row.update(host_row(make_small_step(), device, reps, small_px, len(ops), len(launched)))
        kernels = cuda_kernels(step, reps=2)  # last: the profiler's hooks touch nothing timed above
        row["kernels_ms"] = sum(k["us_per_call"] for k in kernels) / 1e3
        row["top_kernels"] = kernels[:8]
        row["by_category"] = by_category(kernels)
    else:
        row["host_ms"] = row["step_ms"]
        row["peak_mib"] = None
    if row["host_ms"] is not None:
        row["host_over_step"] = row["host_ms"] / row["step_ms"]
    return row


def write_report(out_dir: Path, stem: str, meta: dict, rows: list[dict]) -> tuple[Path, Path]:
    dev = meta["device_info"]
    lines = [
        f"# One MaskFeat pre-training step (forward + backward) — {dev['name']}",
        "",
        f"- date {meta['date']}; command `{meta['command']}`",
        f"- torch {dev['torch']}, triton {dev['triton']}, python {dev['python']}; 1-min load average at start "
        f"{dev.get('load_average_1min', 0):.1f}",
        f"- model {meta['model']} (pre-training), B {meta['batch']}, input {meta['input']}, bf16 parameters and input, "
        "cube masks at 0.4, HOG targets; no DeepSpeed, no optimiser step",
    ]
    if meta.get("count_only"):
        lines += _count_lines(rows)
        return write_files(out_dir, stem, {**meta, "results": rows}, lines)
    lines += [
        f"- {meta['tflop_per_step']:.3g} TFLOP per forward+backward step (torch.utils.flop_counter on the meta device); "
        "TFLOP/s = that / step ms",
        f"- step ms: median of {meta['steps']} synchronised steps (min beside it); host ms: wall time of the same "
        f"step at {meta.get('host_img_size', 64)} px, the same ops on a fraction of the GPU work (CUDA; on CPU = step); "
        "host/step near 1: the CPU sets the pace",
        "- torch ops: aten ops with device work in one step (views and allocations left out); Triton launches: the "
        "same for our kernels (HOG, attention, pooling). Each costs the host a few µs on a GPU machine.",
        "",
        "| backend | step ms | min | TFLOP/s | host ms | host / step | GPU kernels ms | kernels / step | torch ops "
        "| Triton launches | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        host = "" if r["host_ms"] is None else f"{r['host_ms']:.1f}"
        ratio = "" if r.get("host_over_step") is None else f"{r['host_over_step']:.2f}"
        kern = "n/a" if r.get("kernels_ms") is None else f"{r['kernels_ms']:.1f}"
        busy = "" if r.get("kernels_ms") is None else f"{r['kernels_ms'] / r['step_ms']:.2f}"
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        rate = meta["tflop_per_step"] / r["step_ms"] * 1e3
        lines.append(f"| {r['backend']} | {r['step_ms']:.1f} | {r['step_ms_min']:.1f} | {rate:.3g} | {host} | {ratio} | {kern} | {busy} "
                     f"| {r.get('torch_ops', '')} | {r.get('triton_launches', '')} | {peak} | {r['host_note']} |")
    for r in rows:
        if r.get("by_category"):
            lines += ["", f"{r['backend']}: GPU time per step by what the kernels do (`bench.common.kernel_category`)", "",
                      "| category | ms | share | launches |", "|---|---|---|---|"]
            lines += [f"| {c['category']} | {c['us_per_call'] / 1e3:.2f} | {c['us_per_call'] / 1e3 / r['kernels_ms']:.0%} "
                      f"| {c['launches_per_call']:.0f} |" for c in r["by_category"]]
        if r.get("top_kernels"):
            lines += ["", f"{r['backend']}: longest kernels per step (µs, launches)", ""]
            lines += [f"- {k['us_per_call']:.0f} µs ×{k['launches_per_call']:.0f} `{k['kernel']}`" for k in r["top_kernels"]]
    return write_files(out_dir, stem, {**meta, "results": rows}, lines)


def _count_lines(rows: list[dict]) -> list[str]:
    lines = [
        "- counts only (`--count-only`), nothing timed: torch ops are aten ops with device work in one step (views and "
        "allocations left out), Triton launches our kernels' (HOG, attention, pooling); each costs the host a few µs on a GPU "
        "machine. Neither depends on the input size.",
        "- saved GiB: the activations one forward keeps for backward at the variant's full input size and this batch "
        "(`saved_gib`: every tensor autograd saves, once per storage, parameters left out; meta device, nothing "
        "computed; `+ckpt`: blocks recomputed in backward keep only their inputs)",
        "",
        "| backend | issued as | torch ops | Triton launches | saved GiB | most issued |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        top = ", ".join(f"{name} {n}" for name, n in r["top_ops"])
        saved = "n/a" if r["saved_gib"] is None else f"{r['saved_gib']:.2f}"
        lines.append(f"| {r['backend']} | {r['path']} | {r['torch_ops']} | {r['triton_launches']} | {saved} | {top} |")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="variant (default mvitv2_l_16x4 on CUDA, mvitv2_tiny on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="clips (default 4 on CUDA, the recipe's clips per GPU; 2 on CPU)")
    ap.add_argument("--backends", default=None, help="comma list of attention backends (models: auto, reference, "
                    "sdpa, xformers, triton), each optionally with +ckpt (every block recomputed in backward) or "
                    "+ckptN (the first N), +tpool / +torchpool (all pooling convolutions through Triton / torch), "
                    "+graph (CUDA: the step replayed from a CUDA graph); default auto,auto+ckpt,sdpa on CUDA, "
                    "auto,sdpa on CPU")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per backend")
    ap.add_argument("--img-size", type=int, default=None, help="input side in px instead of the variant's (e.g. 64: "
                    "MViTv2-L's op and launch counts on a CPU, which do not depend on the size)")
    ap.add_argument("--host-img-size", type=int, default=64, help="CUDA: the input side of the step whose wall time "
                    "is the host ms (the same ops on a fraction of the GPU work)")
    ap.add_argument("--count-only", action="store_true", help="only count what one step issues (no timing); on a "
                    "CPU, auto is counted as on CUDA: Triton backend and rel terms, the launches stubbed")
    ap.add_argument("--out", default="bench/results", help="output folder")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. before)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if args.count_only:
        require_interpreter_on_cpu(device, "--count-only")
    model_name = args.model or ("mvitv2_l_16x4" if device.type == "cuda" else "mvitv2_tiny")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    batch = args.batch or (4 if device.type == "cuda" else 2)
    spec = args.backends or ("auto,auto+ckpt,sdpa" if device.type == "cuda" else "auto,sdpa")
    backends = [b for b in spec.split(",") if b]
    from kernels.attention import BACKENDS

    try:
        specs = {b: parse_spec(b) for b in backends}
    except ValueError as exc:
        raise SystemExit(f"--backends: {exc}") from None
    if not backends or any(p.attn not in BACKENDS for p in specs.values()):
        raise SystemExit(f"--backends: comma list of {BACKENDS}, each optionally with suffixes ({SUFFIXES}), "
                         f"got {spec!r}")
    if device.type != "cuda" and any(p.graph for p in specs.values()):
        raise SystemExit(f"--backends: {GRAPH} captures the step in a CUDA graph: it needs --device cuda")
    if args.count_only and any(p.graph for p in specs.values()):
        raise SystemExit(f"--backends: {GRAPH} has nothing to count: a replay issues no op")
    if args.steps < 1 or batch < 1 or (args.img_size is not None and args.img_size < 1) or args.host_img_size < 1:
        raise SystemExit("--steps, --batch, --img-size and --host-img-size must be ≥ 1")
    try:
        input_size = _input_size(model_name, args.img_size)
    except ValueError as exc:  # an unknown variant: the message names the close ones
        raise SystemExit(f"--model: {exc}") from None
    from kernels import launch

    info = device_info(device)
    today = datetime.date.today().strftime("%Y%m%d")
    stem = f"model_step_{results_slug(device, info['name'])}_{today}"
    tag = f"_{args.tag}" if args.tag else ""
    meta = dict(date=today, command=command_line("bench.model_step", argv),
                device_info=info, model=model_name, batch=batch, steps=args.steps, host_img_size=args.host_img_size,
                input="x".join(map(str, input_size)))
    if args.count_only:
        meta["count_only"] = True
        rows = []
        for b in backends:  # minutes per backend for MViTv2-L on a CPU: say what is going on
            print(f"{b:12s} counting one step of {model_name} at B {batch} ...", flush=True)
            r = count_row(model_name, b, batch, device, args.img_size)
            rows.append(r)
            saved = "n/a" if r["saved_gib"] is None else f"{r['saved_gib']:.2f}"
            print(f"{r['backend']:12s} {r['torch_ops']} torch ops, {r['triton_launches']} Triton launches ({r['path']}), "
                  f"{saved} GiB of saved activations at {'x'.join(map(str, _input_size(model_name)))}", flush=True)
        jpath, mpath = write_report(Path(args.out), stem + "_counts" + tag, meta, rows)
        print(f"\nwrote {jpath} and {mpath}")
        return
    meta["tflop_per_step"] = step_tflop(model_name, batch, args.img_size)
    rows: list[dict] = []
    for backend in backends:
        p = specs[backend]
        jit = backend == "auto" and device.type == "cuda"  # auto also with every Triton launch through the JIT
        try:
            model, video, mask = build(model_name, p.attn, batch, device, torch.bfloat16, args.img_size,
                                       checkpointing=p.ckpt, pool_backend=p.pool)
            step = make_step(model, video, mask)
            make_small = None
            if device.type == "cuda" and not p.graph:
                full_px = _input_size(model_name, args.img_size)[1]

                def make_small(p=p, full_px=full_px):  # built per row after its peak is read, freed with the row
                    return _with(lambda: pool_rule_at(args.host_img_size, full_px),  # the big step's poolings
                                 make_step(*build(model_name, p.attn, batch, device, torch.bfloat16,
                                                  args.host_img_size, checkpointing=p.ckpt, pool_backend=p.pool)))
            for name, fast in [(backend, True)] + ([(f"{backend}@jit", False)] if jit else []):
                launch.enabled = fast
                try:
                    if p.graph:
                        rows.append(graph_row(name, step, model, device, args.steps))
                    else:
                        rows.append(measure(name, step, device, args.steps, make_small, args.host_img_size))
                finally:
                    launch.enabled = True
                r = rows[-1]
                host = "-" if r["host_ms"] is None else f"{r['host_ms']:.1f}"
                print(f"{name:12s} step {r['step_ms']:8.1f} ms  host {host} ms  {r['host_note']}", flush=True)
                write_report(Path(args.out), stem + tag, meta, rows)
        except torch.cuda.OutOfMemoryError as exc:  # one backend too big at this batch: report it, go on
            rows.append(dict(backend=backend, step_ms=float("nan"), step_ms_min=float("nan"), host_ms=None,
                             peak_mib=None, host_note=f"out of memory: {str(exc).splitlines()[0][:120]}"))
            print(f"{backend:12s} {rows[-1]['host_note']}", flush=True)
        model = video = mask = step = make_small = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    jpath, mpath = write_report(Path(args.out), stem + tag, meta, rows)
    print(f"\nwrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
