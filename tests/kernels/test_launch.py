"""``kernels.launch``: the cached launch path hands Triton's C launcher exactly what the JIT does.

The fast path (a compiled kernel reused under a call key, launched through
``CompiledKernel.run`` directly) cannot run in the interpreter, and this machine has no GPU. So
the check runs in a subprocess without ``TRITON_INTERPRET``: a stand-in sm_90 driver
(``bench.attention_host --launcher offline``) lets Triton compile every kernel of a bf16 fwd+bwd
for real, and only the C launcher is replaced by a recorder. ``bench/triton_versions`` runs it
under triton 3.6 through 3.9, whose JIT this path imitates. On a GPU,
``test_gpu_fast_launch_matches_jit_launch`` compares the results bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _unaligned(a):
    """A tensor like ``a`` (shape, strides, dtype) whose address is not a multiple of 16."""
    import torch

    span = 1 + sum((n - 1) * s for n, s in zip(a.shape, a.stride()))
    return torch.empty(span + 1, dtype=a.dtype).as_strided(a.shape, a.stride(), 1)


def _describe(x):
    import torch

    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype), list(x.shape), list(x.stride())]
    return [type(x).__name__, repr(x)]


def _offline_check() -> dict:
    """Record every C launch of one fwd+bwd (after a warm-up) on the JIT path and on the fast path."""
    import torch
    import triton
    import triton.language as tl
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    import kernels.attention.rel_triton as rt
    import kernels.attention.triton_attn as ta
    from bench.attention_host import _stand_in_driver
    from kernels import launch as fast
    from kernels.attention.reference import rel_table_len

    recorded: list = []

    def run_property(self):
        def run(g0, g1, g2, stream, function, packed, _meta, _enter, _exit, *args):
            recorded.append(dict(name=self.name, grid=[g0, g1, g2], stream=stream, function=repr(function),
                                 packed=repr(packed), args=[_describe(a) for a in args]))
        return run

    CompiledKernel.run = property(run_property)
    CompiledKernel._init_handles = lambda self: None
    jit_runs = [0]
    jit_run = JITFunction.run

    def counted(self, *args, **kwargs):
        jit_runs[0] += 1
        return jit_run(self, *args, **kwargs)

    JITFunction.run = counted
    seen: list = []  # (kernel, grid, args, kwargs) as kernels.launch received them

    def spy(kernel, grid, *args, **kw):
        seen.append((kernel, grid, args, kw))
        fast.launch(kernel, grid, *args, **kw)

    ta.launch = rt.launch = spy
    q_thw, k_thw, nh, hd = (2, 4, 4), (2, 2, 2), 2, 72
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, nh, 33, hd, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, nh, 9, hd, generator=g).bfloat16().requires_grad_() for _ in range(2))
    tables = [torch.randn(rel_table_len(a, b), hd, generator=g).requires_grad_() for a, b in zip(q_thw, k_thw)]

    def fwd_bwd():
        ta.relpos_attention_triton(q, k, v, q_thw, k_thw, *tables, rel_impl="triton").float().sum().backward()

    out: dict = {}
    with _stand_in_driver():
        for path in ("jit", "fast"):
            fast.enabled = path == "fast"
            fwd_bwd()  # compiles (jit) / fills the cache (fast)
            recorded.clear()
            seen.clear()
            jit_runs[0] = 0
            fwd_bwd()
            out[path] = dict(launches=list(recorded), jit_runs=jit_runs[0])
        fast.enabled = True
        # the call key separates whatever Triton's specialisation separates
        checked = separated = 0
        for kernel, grid, args, kw in seen:
            binder = kernel.device_caches[0][-1]
            spec = binder(*args, **kw)[1]
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    variants = [_unaligned(a)]
                elif isinstance(a, bool):
                    variants = [not a]
                elif isinstance(a, int):
                    variants = [1, 16, 17, 2**31 + 16, True]
                else:
                    variants = [0.5, 1]
                for x in variants:
                    other = args[:i] + (x,) + args[i + 1:]
                    if binder(*other, **kw)[1] != spec:
                        separated += 1
                        assert fast.call_key(0, other, kw) != fast.call_key(0, args, kw), (kernel.fn.__name__, i, x)
                    checked += 1
        out["key"] = dict(checked=checked, separated=separated)

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

        x = torch.zeros(16)
        jit_runs[0] = 0
        for _ in range(2):
            fast.launch(add_one, (1,), x, n=5, BLOCK=16)  # a runtime argument by keyword: the JIT each time
        out["keyword_runtime_arg"] = dict(jit_runs=jit_runs[0], marked=fast._caches.get(id(add_one)) is fast._NO_FAST)
    return out


@pytest.fixture(scope="module")
def offline() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fast_launch_passes_what_the_jit_passes(offline):
    """Same kernels, grids, stream, function handle and argument list (types, values, tensor dtype,
    shape and strides; constexprs and defaults in signature order) for every launch of a fwd+bwd;
    and the fast path's second call never enters the JIT."""
    jit, fast = offline["jit"], offline["fast"]
    names = [r["name"] for r in jit["launches"]]
    assert names == ["_prepare_tables_kernel", "_rel_fwd_kernel", "_pack_k_kernel", "_fwd_kernel", "_dq_kernel",
                     "_dkdv_kernel", "_rel_dq_kernel", "_rel_dtab_kernel", "_rel_dtab_finish_kernel"]
    assert fast["launches"] == jit["launches"]
    assert jit["jit_runs"] == len(names) and fast["jit_runs"] == 0


def test_call_key_is_finer_than_triton_specialisation(offline):
    """Every variant of a launch's arguments (an unaligned tensor, an int of another divisibility or
    width, a bool for an int, another float) that Triton compiles separately gets another call key."""
    assert offline["key"]["checked"] > 100
    assert offline["key"]["separated"] > 20  # the variants do reach Triton's specialisation


def test_runtime_argument_by_keyword_keeps_the_jit_path(offline):
    assert offline["keyword_runtime_arg"] == dict(jit_runs=2, marked=True)


def test_host_bench_offline_mode(offline):
    """``bench.attention_host --launcher offline`` (kernels compiled for sm_90, C launches stubbed)
    measures both launch paths and counts the launches on each."""
    rows = offline["bench"]
    assert {(r["provider"], r["launch"]) for r in rows} == {
        (p, path) for p in ("triton+rel-triton", "triton+rel-inside") for path in ("fast", "jit")}
    assert all(r["triton_launches"] == (8 if r["provider"] == "triton+rel-triton" else 6) for r in rows)
    assert all(r["host_us"] > 0 for r in rows)


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_bench_jit_provider_turns_the_cached_path_off(pass_):
    """``bench.attention``'s ``triton+rel-triton@jit`` times the whole call (backward included)
    with ``kernels.launch`` off, and leaves it on afterwards; the other providers leave it alone."""
    import torch

    from bench.attention import JitLaunch, Shape, make_bench_fn
    from kernels import launch

    seen = []

    class Probe(JitLaunch):
        def __call__(self, q, *rest):
            seen.append(launch.enabled)
            return _Record.apply(q)

    class _Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(launch.enabled)
            return g

    s = Shape("L", 4, 1, 1, 8, (1, 1, 1), (1, 1, 1))
    inputs = [torch.randn(1, 1, 2, 8) for _ in range(3)] + [torch.randn(1, 8) for _ in range(3)]
    def plain(q, *rest):
        seen.append(launch.enabled)
        return _Record.apply(q)

    for fn, want in ((Probe(), False), (plain, True)):
        seen.clear()
        call, _ = make_bench_fn(fn, s, inputs, torch.ones(1, 1, 2, 8), pass_)
        call()
        assert seen == [want] * (1 if pass_ == "fwd" else 2) and launch.enabled


def _bench_offline() -> list:
    import tempfile

    from bench import attention_host

    with tempfile.TemporaryDirectory() as tmp:
        attention_host.main(["--launcher", "offline", "--stages", "4", "--pass", "fwdbwd", "--reps", "2", "--calls", "1",
                             "--out", tmp])
        return json.loads(next(Path(tmp).glob("attention_host_cpu_*.json")).read_text())["results"]


if __name__ == "__main__":
    bench = _bench_offline()  # first: _offline_check patches Triton for the rest of the process
    print(json.dumps(dict(_offline_check(), bench=bench)))
