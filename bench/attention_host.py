"""Host cost of one attention call: the CPU time a provider spends issuing its work, and what it issues.

At MViTv2-L stages 3 and 4 the GPU work of one call is small (≈ 0.1-0.3 ms of kernels at the
recipe's 4 clips per GPU, ≈ 1.3 ms at B 32 on an H100). The Python side of a call - argument
checks, launch arithmetic, torch ops, Triton's launcher - can then take longer than the kernels,
and the GPU waits for the CPU. The fourth session's H100 profile showed it at stage 4, B 32: 1.30 ms
of kernels in a 1.95 ms fwd+bwd (``attention_tune_…_2.md``), and the SDPA-cuDNN hybrid at 2.10 ms
at both stage 3 and stage 4 (``attention_…_final.md``). This benchmark measures that side alone.

- CUDA: the stream is first blocked by a long ``torch.cuda._sleep`` kernel, so every call below it
  only queues work; ``perf_counter`` around a batch of calls is then the host cost. A measurement
  counts only when the GPU is still busy after the batch (an event queried after it has not
  completed); otherwise the sleep is lengthened and the batch repeated (a call that synchronises
  would fail every time and is reported as such).
- CPU (no GPU here), two ways:
  - ``--launcher stub`` (default, ``TRITON_INTERPRET=1``): the Triton launches are no-ops, so the
    time is the Python side and the torch ops *without* Triton's own launcher;
  - ``--launcher offline`` (``TRITON_INTERPRET`` unset): a stand-in sm_90 driver (``bench.sass``)
    lets Triton compile every kernel for real, and only the C launcher is a no-op, so Triton's
    Python side of each launch is in the time: the JIT's binding, specialisation and cache lookup
    (``--launch jit``), or ``kernels.launch``'s cached path (``--launch fast``, the default).
  Two CPU artefacts are kept small: B defaults to 1 (the torch ops then compute little; their time
  is reported apart), and glibc is told to keep freed memory (``mallopt``), so that an
  uninitialised buffer of a few MB costs no ``mmap``/``munmap`` per call - as with the CUDA
  caching allocator.

Per provider and stage it also counts what one call issues: Triton launches, and torch ops that
launch device work (a ``TorchDispatchMode`` count that leaves out views and allocations).

Providers: ``triton+rel-triton`` (the default fused path: what ``auto`` runs on CUDA),
``triton+rel-inside`` (its opt-in variant), and on CUDA ``auto`` (``relpos_attention``'s dispatch on
top) and ``sdpa-cudnn+rel-triton`` (the hybrid the 1.2× target is measured against).

    python -m bench.attention_host [--device cpu|cuda] [--batch 4] [--stages 1,2,3,4] [--out DIR]
                                   [--calls 10] [--reps 15] [--tag TAG]
                                   [--launcher stub|offline] [--launch both|fast|jit]

On CUDA and with ``--launcher offline`` each provider is measured on both launch paths unless
``--launch`` says one.

writes ``attention_host_<device-slug>_<yyyymmdd>[_TAG].{json,md}`` to --out (default bench/results).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.attention import K_GRID, MODELS, Q_GRIDS, Shape, device_info, make_bench_fn, make_inputs, rel_inside
from bench.common import results_slug, write_files

# aten ops that launch no device work: views, metadata and allocations
_NO_WORK = {
    "view", "_unsafe_view", "expand", "select", "slice", "as_strided", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "reshape", "alias", "detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "set_", "split", "split_with_sizes", "unbind", "narrow", "chunk", "lift_fresh", "_reshape_alias", "resize_",
}


_IN_LAUNCH = [0]  # > 0 while a Triton launch runs (see triton_launches)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch device work (by name: see ``_NO_WORK``) and the time spent
    executing them (on CPU that is real compute, which a GPU would run asynchronously)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _NO_WORK or _IN_LAUNCH[0]:  # (inside a launch: the interpreter's own tensor work)
            return func(*args, **(kwargs or {}))
        self.ops.append(name)
        t0 = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.seconds += time.perf_counter() - t0


@contextlib.contextmanager
def triton_launches(stub: bool) -> Iterator[list]:
    """Within: every Triton launch appends its kernel's name to the yielded list, however it was
    made (the JIT, ``kernels.launch``'s cached path, the interpreter); ``stub`` turns the launch
    itself into a no-op: the interpreter's run, or a compiled kernel's C launcher (compiled for a
    stand-in driver, there is no GPU to launch on; Triton's Python side still runs)."""
    from triton.compiler.compiler import CompiledKernel

    from kernels.attention import triton_attn

    names: list[str] = []
    saved = {name: CompiledKernel.__dict__[name] for name in ("run", "_init_handles")}

    def compiled_run(self):  # the property every launch reads the C launcher from
        names.append(self.name)
        return _no_launch if stub else saved["run"].fget(self)

    CompiledKernel.run = property(compiled_run)
    if stub:
        CompiledKernel._init_handles = lambda self: None  # loads the binary on a GPU
    interp = None
    try:
        from triton.runtime.interpreter import InterpretedFunction

        interp = InterpretedFunction.__dict__.get("run")
    except ImportError:
        pass
    if interp is not None:
        def interpreted_run(self, *args, **kwargs):
            names.append(getattr(getattr(self, "fn", None), "__name__", "?"))
            if stub:
                return None
            _IN_LAUNCH[0] += 1
            try:
                return interp(self, *args, **kwargs)
            finally:
                _IN_LAUNCH[0] -= 1

        InterpretedFunction.run = interpreted_run
    refused = triton_attn.REFUSE_INTERPRETED_BF16
    triton_attn.REFUSE_INTERPRETED_BF16 = refused and not stub  # stubbed: nothing is computed, so bf16 may pass
    try:
        yield names
    finally:
        triton_attn.REFUSE_INTERPRETED_BF16 = refused
        for name, attr in saved.items():
            setattr(CompiledKernel, name, attr)
        if interp is not None:
            InterpretedFunction.run = interp


def _no_launch(*args) -> None:
    return None


def providers(device: torch.device) -> dict[str, Callable]:
    from kernels.attention import relpos_attention
    from kernels.attention.triton_attn import relpos_attention_triton

    out: dict[str, Callable] = {
        "triton+rel-triton": lambda *a, **kw: relpos_attention_triton(*a, rel_impl="triton", **kw),
        "triton+rel-inside": rel_inside,
    }
    if device.type == "cuda":
        from bench.attention import _sdpa_provider

        out["auto"] = lambda *a, **kw: relpos_attention(*a, backend="auto", **kw)
        out["sdpa-cudnn+rel-triton"] = _sdpa_provider("cudnn", rel_impl="triton")
    return out


def make_call(fn: Callable, s: Shape, inputs: list, dout: torch.Tensor, pass_: str) -> Callable[[], None]:
    """One call as the training step makes it (``bench.attention.make_bench_fn``): forward under
    no_grad, or forward and backward with the leaves' gradients reset first, inside the call (as
    ``triton.testing.do_bench(grad_to_none=...)`` does around it)."""
    call, leaves = make_bench_fn(fn, s, inputs, dout, pass_)
    if not leaves:
        return call

    def reset_then_call():
        for x in leaves:
            x.grad = None
        call()
    return reset_then_call


def count_issued(call: Callable[[], None], stub: bool, reps: int = 5) -> tuple[list[str], list[str], float]:
    """(Triton kernels launched, torch ops with device work, median µs spent executing those ops)
    of one call."""
    spent = []
    for _ in range(reps):
        with triton_launches(stub) as names, _OpCounter() as counter:
            call()
        spent.append(counter.seconds * 1e6)
    return names, counter.ops, statistics.median(spent)


def _sleep_cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU (measured with events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def host_us_cuda(call: Callable[[], None], calls: int, reps: int, cycles_per_ms: float,
                 sleep_ms: float = 20.0) -> tuple[list[float], int]:
    """Per-call host µs of ``reps`` batches of ``calls`` calls queued behind a sleep kernel (of
    ``sleep_ms`` at first, doubled whenever the GPU caught up), and how many batches were thrown
    away because the GPU had caught up (the host then waited on it).

    A call that synchronises waits for the whole sleep, so its batch takes as long as the sleep
    however long that is. When a thrown-away batch took about its sleep's length and twice as long
    as the one before (the sleep doubled, and so did the batch), or after 3·reps + 2 throw-aways in
    all, this raises RuntimeError instead of doubling the sleep again."""
    times: list[float] = []
    retries, last_waited = 0, None  # last_waited: s of the previous throw-away, if it lasted its sleep
    while len(times) < reps:
        if retries > 3 * reps + 1:
            raise RuntimeError("the GPU keeps catching up with the host: the call synchronises (e.g. .item())")
        torch.cuda.synchronize()
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        dt = time.perf_counter() - t0
        ev = torch.cuda.Event()
        ev.record()
        if ev.query():  # the sleep ended before the batch was queued: the GPU was idle for a while
            retries += 1
            lasted_sleep = dt * 1e3 >= 0.8 * sleep_ms
            if lasted_sleep and last_waited is not None and dt >= 1.6 * last_waited:
                raise RuntimeError("the call synchronises (e.g. .item()): its batch grows with the sleep queued ahead")
            last_waited = dt if lasted_sleep else None
            sleep_ms *= 2
            continue
        last_waited = None
        times.append(dt / calls * 1e6)
    torch.cuda.synchronize()
    return times, retries


def host_us_cpu(call: Callable[[], None], calls: int, reps: int) -> list[float]:
    """Per-call µs of ``reps`` batches of ``calls`` calls, Triton launches stubbed."""
    times: list[float] = []
    with triton_launches(stub=True):
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            times.append((time.perf_counter() - t0) / calls * 1e6)
    return times


def _keep_freed_memory() -> bool:
    """Ask glibc to serve allocations up to 32 MB from its heap and never return freed memory to the
    OS (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``); False where that is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):
        return False


def shapes(batch: int, stages: list[int]) -> list[Shape]:
    cfg = MODELS["L"]
    return [Shape("L", st, batch, cfg["heads"][st - 1], cfg["hd"], Q_GRIDS[st - 1], K_GRID) for st in stages]


def write_report(out_dir: Path, stem: str, meta: dict, rows: list[dict]) -> tuple[Path, Path]:
    dev = meta["device_info"]
    cpu = dev["device"] == "cpu"
    mode = meta.get("launcher", "stub" if cpu else "cuda")
    title = {"stub": " (CPU, Triton launches stubbed)", "offline": " (CPU, kernels compiled for sm_90, C launches stubbed)",
             "cuda": ""}[mode]
    how = {
        "stub": f"CPU, interpreter: Triton launches are no-ops, so Triton's own launcher is **not** included (count them "
                f"below); glibc keeps freed memory: {meta['keep_freed_memory']}.",
        "offline": f"CPU, offline: the kernels are compiled for sm_90 by a stand-in driver and Triton's Python launcher runs "
                   f"(JIT path: binding, specialisation, cache key; fast path: kernels.launch's cached one); only the C "
                   f"launcher (≈ 1-3 µs plus the driver call on a GPU) is a no-op; glibc keeps freed memory: "
                   f"{meta['keep_freed_memory']}.",
        "cuda": "CUDA: calls queued behind a sleep kernel; retries = batches discarded because the GPU caught up.",
    }[mode]
    lines = [
        f"# Attention host cost per call — {dev['name']}{title}",
        "",
        f"- date {meta['date']}; command `{meta['command']}`",
        f"- torch {dev['torch']}, triton {dev['triton']}, python {dev['python']}; 1-min load average at start "
        f"{dev.get('load_average_1min', 0):.1f}; dtype {meta['dtype']} (tables fp32)",
        f"- host µs: median over {meta['reps']} batches of {meta['calls']} calls (p20–p80 beside it); " + how,
        "- launch: how compiled kernels were launched (fast: kernels.launch's cached path, the default; jit: every launch "
        "through Triton's JIT; interpreter: neither applies).",
        "- issued per call: Triton launches / torch ops with device work (views and allocations left out); "
        "in torch ops µs: time inside those ops (median of 5 counted calls); rest µs = host µs − that: the Python side, "
        "allocations and views" + (
            ", Triton launches excluded. The torch ops' time here is their real compute on the CPU, which a GPU runs "
            "asynchronously; on a GPU machine each costs ≈ 5-10 µs of host, and each Triton launch its launcher's time."
            if mode == "stub" else ", and Triton's launcher for each launch" + (
                "; the torch ops' time is their dispatch and launch." if mode == "cuda" else
                " (without the C launch); the torch ops' time is their real compute on the CPU.")),
        "",
        "| shape | pass | provider | launch | host µs | p20–p80 | in torch ops µs | rest µs | Triton launches | torch ops "
        "| torch ops by name |" + ("" if cpu else " retries |"),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("" if cpu else "---|"),
    ]
    for r in rows:
        ops = ", ".join(f"{n}×{c}" if c > 1 else n for n, c in r["torch_ops_by_name"].items())
        lines.append(
            f"| {r['shape']} | {r['pass']} | {r['provider']} | {r.get('launch', 'interpreter')} | {r['host_us']:.0f} "
            f"| {r['host_us_p20']:.0f}–{r['host_us_p80']:.0f} | {r['torch_ops_us']:.0f} | {r['host_us'] - r['torch_ops_us']:.0f} "
            f"| {r['triton_launches']} | {r['torch_ops']} | {ops} |" + ("" if cpu else f" {r['retries']} |")
        )
    return write_files(out_dir, stem, {**meta, "results": rows}, lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="clips B (default 4 on CUDA, the recipe's clips per GPU; 1 on CPU)")
    ap.add_argument("--stages", default="1,2,3,4", help="MViTv2-L stages, e.g. 3,4")
    ap.add_argument("--pass", dest="pass_", choices=["fwd", "fwdbwd", "all"], default="all")
    ap.add_argument("--providers", default="", help="comma list (default: all that exist on the device)")
    ap.add_argument("--calls", type=int, default=10, help="calls per timed batch")
    ap.add_argument("--reps", type=int, default=15, help="timed batches")
    ap.add_argument("--out", default="bench/results", help="output folder")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. before)")
    ap.add_argument("--launcher", choices=["stub", "offline"], default="stub",
                    help="CPU only. stub: Triton launches are no-ops in the interpreter (TRITON_INTERPRET=1). offline: "
                         "the kernels are compiled for sm_90 by a stand-in driver and Triton's Python launcher runs; only "
                         "the C launch is a no-op (TRITON_INTERPRET unset)")
    ap.add_argument("--launch", choices=["both", "fast", "jit"], default="both",
                    help="compiled kernels: kernels.launch's cached path (fast), every launch through the JIT (jit), or both")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    batch = args.batch or (4 if device.type == "cuda" else 1)
    if args.calls < 1 or args.reps < 1 or batch < 1:
        raise SystemExit("--calls, --reps and --batch must be ≥ 1")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if device.type == "cpu":
        from kernels import interpreting

        if args.launcher == "stub" and not interpreting():
            raise SystemExit("--launcher stub: set TRITON_INTERPRET=1 (the Triton kernels take CPU tensors only in the interpreter)")
        if args.launcher == "offline" and interpreting():
            raise SystemExit("--launcher offline compiles the kernels: unset TRITON_INTERPRET")
    elif args.launcher != "stub":
        raise SystemExit("--launcher is a CPU option; on CUDA the real launcher runs")
    try:
        stages = sorted({int(x) for x in args.stages.split(",") if x})
    except ValueError:
        raise SystemExit(f"--stages: comma list of 1-4, got {args.stages!r}") from None
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise SystemExit(f"--stages: comma list of 1-4, got {args.stages!r}")
    provs = providers(device)
    wanted = [p for p in args.providers.split(",") if p]
    unknown = [p for p in wanted if p not in provs]
    if unknown:
        raise SystemExit(f"unknown providers {unknown} on {device.type}; known: {sorted(provs)}")
    if wanted:
        provs = {n: f for n, f in provs.items() if n in wanted}
    passes = ["fwd", "fwdbwd"] if args.pass_ == "all" else [args.pass_]

    info = device_info(device)
    today = datetime.date.today().strftime("%Y%m%d")
    stem = f"attention_host_{results_slug(device, info['name'])}_{today}" + (f"_{args.tag}" if args.tag else "")
    meta = dict(date=today, command="python -m bench.attention_host " + " ".join(sys.argv[1:] if argv is None else argv),
                device_info=info, dtype="bfloat16", calls=args.calls, reps=args.reps)
    cycles = _sleep_cycles_per_ms() if device.type == "cuda" else None
    meta["keep_freed_memory"] = _keep_freed_memory() if device.type == "cpu" else None
    meta["launcher"] = args.launcher if device.type == "cpu" else "cuda"
    interpreted = meta["launcher"] == "stub"
    launch_paths = ["interpreter"] if interpreted else (["fast", "jit"] if args.launch == "both" else [args.launch])
    rows: list[dict] = []
    with _stand_in_driver() if meta["launcher"] == "offline" else contextlib.nullcontext():
        for s in shapes(batch, stages):
            inputs, dout = make_inputs(s, torch.bfloat16, device)
            for pass_ in passes:
                for name, fn in provs.items():
                    for row in _measure(fn, s, inputs, dout, pass_, launch_paths, device, args, cycles):
                        rows.append(dict(row, provider=name))
                        print(f"{s.label} {pass_:6s} {name:22s} {row['launch']:11s} host {row['host_us']:7.0f} µs  "
                              f"triton {row['triton_launches']:2d}  torch ops {row['torch_ops']:2d}", flush=True)
            write_report(Path(args.out), stem, meta, rows)
    jpath, mpath = write_report(Path(args.out), stem, meta, rows)
    print(f"\nwrote {jpath} and {mpath}")


def _measure(fn: Callable, s: Shape, inputs: list, dout: torch.Tensor, pass_: str, paths: list[str],
             device: torch.device, args: argparse.Namespace, cycles: Optional[float]) -> list[dict]:
    """One row per launch path: host µs of ``fn``'s call and what the call issues. The paths' timed
    batches alternate, so that a drift of the machine (another process, the heap) hits them alike."""
    from kernels import launch

    call = make_call(fn, s, inputs, dout, pass_)
    stub = device.type == "cpu"
    issued, times, retries = {}, {p: [] for p in paths}, {p: 0 for p in paths}
    try:
        for path in paths:
            launch.enabled = path != "jit"
            with triton_launches(stub):
                for _ in range(3):  # warm-up: compile, caches
                    call()
            issued[path] = count_issued(call, stub)
        for _ in range(args.reps):
            for path in paths:
                launch.enabled = path != "jit"
                if device.type == "cuda":
                    t, r = host_us_cuda(call, args.calls, 1, cycles)
                    retries[path] += r
                else:
                    t = host_us_cpu(call, args.calls, 1)
                times[path] += t
    finally:
        launch.enabled = True
    rows = []
    for path in paths:
        launched, ops, ops_us = issued[path]
        ts = times[path]
        qs = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        by_name: dict[str, int] = {}
        for op in ops:
            by_name[op] = by_name.get(op, 0) + 1
        rows.append(dict(shape=s.label, launch=path, host_us=statistics.median(ts), host_us_p20=qs[1],
                         host_us_p80=qs[7], torch_ops_us=ops_us, triton_launches=len(launched), triton_kernels=launched,
                         torch_ops=len(ops), torch_ops_by_name=by_name, retries=retries[path], **{"pass": pass_}))
    return rows


@contextlib.contextmanager
def _stand_in_driver() -> Iterator[None]:
    """``--launcher offline``: Triton's JIT compiles for an sm_90 stand-in (``bench.sass``'s driver),
    and ``kernels.launch`` keeps its cached path on, as on a GPU machine. The JIT's own caches keep
    what was compiled for the stand-in: for a process of its own (the CLI; tests use a subprocess)."""
    from triton.runtime.driver import driver

    from bench.sass import _OfflineDriver
    from kernels import launch

    class _TimingDriver(_OfflineDriver):
        fast_launch = True

    old = driver._active
    driver.set_active(_TimingDriver(90))
    try:
        yield
    finally:
        driver._active = old
        launch.clear()  # compiled for the stand-in target


if __name__ == "__main__":
    main()
