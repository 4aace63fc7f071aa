"""Offline compilation of our Triton kernels for a GPU this machine does not have.

Most sessions have no GPU (DESIGN §4). Triton can still lower a kernel for any NVIDIA target
(``GPUTarget("cuda", 90, 32)`` = H100) with the ``ptxas``/``cuobjdump`` it ships, so what the
interpreter cannot tell can be read from the real machine code:

- does the kernel lower at all for sm_90 / sm_80 (shared memory over the limit, an op with no
  lowering, a ``tl.dot`` shape the target refuses)?
- registers per thread, local-memory (spill) bytes, static shared memory;
- the SASS instruction mix: how many instructions of each kind one program issues, and for
  loop-free kernels (everything unrolled by ``tl.static_range``) how many per unit of work.

How a launch is captured: :func:`capture_launches` makes Triton's JIT believe an sm_XX device is
active (a stand-in driver that only answers target/device/stream) and installs a
``jit_cache_hook`` that records the exact specialisation a real launch would compile (signature,
divisibility attributes, constexprs, num_warps/num_stages) and then skips compiling and
launching. So the launchers run unchanged on CPU tensors (nothing is computed; outputs stay
uninitialised) and :func:`compile_launch` compiles each recorded specialisation for the target.

These are *static* facts about code, not timings: an instruction count is a work measure, and
``issue_floor_us`` (every warp instruction needs one issue slot of one of the 4 schedulers of an
SM) is a lower bound on time, never a prediction of it. Timings come from ``bench/gpu_check``.

    python -m bench.sass [--arch 90] [--out DIR]   # HOG and attention reports (.md/.json with --out)
    python -m bench.sass --check [--arch 90]       # exit 1 if a default kernel lowers badly

Known limits: needs the kernels imported *without* ``TRITON_INTERPRET`` (set in the environment
of this process, it turns the kernels into interpreter functions and nothing can be compiled);
the SASS text format is cuobjdump's, parsed by regular expressions.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver as _triton_driver
from triton.runtime.jit import JITFunction

_NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Instruction classes worth separating (sm_80 / sm_90 SASS opcodes, without modifiers).
SLOW_CLASSES = {
    "mufu": ("MUFU",),  # sqrt, rsqrt, exp2, rcp: quarter-rate special-function unit
    "convert": ("I2F", "F2I", "F2F", "I2FP", "F2FP", "I2I"),  # int <-> float conversions (16/clk/SM on sm_90)
    "shuffle": ("SHFL",),  # cross-lane exchange (reductions over lanes)
    "barrier": ("BAR",),  # block-wide barrier (layout conversions through shared memory)
    "shared": ("LDS", "STS", "LDSM", "ATOMS"),
    "global": ("LDG", "STG", "RED", "ATOMG", "LDGSTS", "UTMALDG"),
    "local": ("LDL", "STL"),  # register spills
    "tensor": ("HMMA", "HGMMA", "IMMA", "QGMMA"),
}


@dataclasses.dataclass
class Launch:
    """One kernel launch as Triton would compile it: the exact specialisation plus its grid."""

    name: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    grid: tuple = ()
    maxnreg: Optional[int] = None  # register cap per thread asked by the launch (ptx .maxnreg)

    @property
    def programs(self) -> int:
        return math.prod(int(g) for g in self.grid)

    def constexpr(self, name: str) -> Any:
        """The value of the kernel's constexpr parameter ``name`` in this specialisation."""
        return self.constexprs[(list(self.signature).index(name),)]


@dataclasses.dataclass
class SassStats:
    """Static facts of one compiled kernel (per program = per CTA)."""

    name: str
    arch: int
    num_warps: int
    registers: int  # per thread
    local_bytes: int  # per thread; > 0 means spills
    shared_bytes: int  # static shared memory per program
    instructions: int  # SASS instructions of one thread (= warp instructions of one warp)
    mix: dict  # opcode -> count
    loops: list  # backward branches (first address, branch address, instructions in the body)
    loop_local: int = 0  # spill loads/stores (LDL/STL) inside a loop body: the ones that cost per trip
    nc_loads: int = 0  # global loads through the non-coherent read-only path (LDG…CONSTANT, PTX ld.global.nc)

    def count(self, cls: str) -> int:
        return sum(self.mix.get(op, 0) for op in SLOW_CLASSES[cls])

    @property
    def has_loops(self) -> bool:
        return bool(self.loops)

    def warp_instructions(self, trips: int = 1) -> int:
        """Warp instructions one program issues: exact for loop-free kernels, and for kernels with
        one loop when its trip count ``trips`` is given (the body counted ``trips`` times)."""
        if len(self.loops) > 1 or (self.loops and trips < 1):
            raise ValueError(f"{self.name}: {len(self.loops)} loops; a dynamic count needs exactly one and its trip count")
        extra = (trips - 1) * self.loops[0][2] if self.loops else 0
        return (self.instructions + extra) * self.num_warps

    def summary(self) -> dict:
        out = {k: getattr(self, k) for k in ("name", "arch", "num_warps", "registers", "local_bytes", "shared_bytes",
                                              "instructions", "has_loops")}  # fmt: skip
        out["loop_bodies"] = [n for _, _, n in self.loops]
        out["loop_local"] = self.loop_local
        out.update({cls: self.count(cls) for cls in SLOW_CLASSES})
        out["top"] = dict(collections.Counter(self.mix).most_common(12))
        return out


class _OfflineDriver:
    """Answers the three questions Triton's JIT asks before compiling; nothing can be launched."""

    offline = True  # read by kernels.compiling_offline(): launchers accept CPU tensors
    fast_launch = False  # read by kernels.launch: every launch must reach the JIT (and the hook below)

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[list]:
    """Within the block, Triton launches are recorded as :class:`Launch` (in call order), not run.

    JIT caches made inside the block are dropped on exit, so a later real launch recompiles for the
    real device.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("capture_launches needs compiled kernels: unset TRITON_INTERPRET before importing them")
    launches: list[Launch] = []
    touched: list[JITFunction] = []
    grids: dict[int, tuple] = {}
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001 - Triton's signature
        grids[id(self)] = tuple(grid) if not callable(grid) else ()
        touched.append(self)
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002, ANN001
        jit = fn.jit_function
        module = str(getattr(fn.module, "__name__", fn.module))  # e.g. kernels.attention.rel_triton
        launches.append(
            Launch(
                name=f"{module.rsplit('.', 1)[-1]}.{fn.name}",  # rel_triton._rel_dq_kernel
                fn=jit,
                signature=dict(compile["signature"]),
                constexprs=dict(compile["constants"]),
                attrs=dict(compile["configs"][0]),
                num_warps=compile["num_warps"],
                num_stages=compile["num_stages"],
                grid=grids.get(id(jit), ()),
                maxnreg=json.loads(compile["specialization_data"])["options"].get("maxnreg"),
            )
        )
        return True  # skip compile and launch

    old_hook = triton.knobs.runtime.jit_cache_hook
    old_driver = _triton_driver._active  # None on a machine without GPU: DriverConfig has no public getter for it
    _triton_driver.set_active(_OfflineDriver(arch))
    triton.knobs.runtime.jit_cache_hook = hook
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = orig_run
        triton.knobs.runtime.jit_cache_hook = old_hook
        _triton_driver._active = old_driver
        for jit in touched:  # binders/caches built for the stand-in target
            jit.device_caches.clear()


def _tool(name: str, *args: str) -> str:
    exe = _NV_BIN / name
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found: this triton wheel ships no {name}")
    return subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout


_OP_RE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)
_NC_RE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?LDG(?:\.\w+)*\.CONSTANT\b", re.M)
_BRA_RE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?BRA\s+(?:\w+\s+)?0x([0-9a-f]+)", re.M)


def parse_sass(sass: str) -> tuple[dict, list]:
    """(opcode -> count without NOPs, loops) of the ``cuobjdump -sass`` text of one kernel.

    A loop is a branch to an earlier address, given as (first address, branch address, number of
    instructions in between, both included, without NOPs); the ``BRA`` to itself that pads every
    kernel's end is not one.
    """
    ops = [(int(m.group(1), 16), m.group(2)) for m in _OP_RE.finditer(sass)]
    mix = collections.Counter(op for _, op in ops if op != "NOP")
    loops = []
    for m in _BRA_RE.finditer(sass):
        here, dest = int(m.group(1), 16), int(m.group(2), 16)
        if dest < here:
            loops.append((dest, here, sum(1 for a, op in ops if dest <= a <= here and op != "NOP")))
    return dict(mix), loops


def count_nc_loads(sass: str) -> int:
    """Global loads of the ``cuobjdump -sass`` text that go through the non-coherent read-only
    cache (``LDG.E….CONSTANT``): a program must not read back through it what it stored itself."""
    return len(_NC_RE.findall(sass))


def compile_launch(launch: Launch, arch: int = 90) -> SassStats:
    """Compile one captured launch for ``sm_<arch>`` and read its resources and SASS."""
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    if launch.maxnreg is not None:
        options["maxnreg"] = launch.maxnreg
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        res = _tool("cuobjdump", "-res-usage", path)
        sass = _tool("cuobjdump", "-sass", path)
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if usage is None:
        raise RuntimeError(f"could not read the resource usage of {launch.name}:\n{res}")
    mix, loops = parse_sass(sass)
    shared = max(int(usage.group(3)), int(ck.metadata.shared))
    return SassStats(
        name=launch.name,
        arch=arch,
        num_warps=launch.num_warps,
        registers=int(usage.group(1)),
        local_bytes=int(usage.group(4)) + int(usage.group(2)),
        shared_bytes=shared,
        instructions=sum(mix.values()),
        mix=mix,
        loops=loops,
        loop_local=_in_loops(sass, loops, SLOW_CLASSES["local"]),
        nc_loads=count_nc_loads(sass),
    )


def _in_loops(sass: str, loops: list, opcodes: tuple) -> int:
    """How many instructions with one of ``opcodes`` lie inside a loop body of ``parse_sass``."""
    return sum(1 for m in _OP_RE.finditer(sass) if m.group(2) in opcodes
               and any(lo <= int(m.group(1), 16) <= hi for lo, hi, _ in loops))


# H100 SXM: 132 SMs, 4 schedulers each issuing at most one warp instruction per clock.
H100_SMS, H100_CLOCK_GHZ, SCHEDULERS_PER_SM = 132, 1.755, 4


def issue_floor_us(warp_instructions: float, sms: int = H100_SMS, clock_ghz: float = H100_CLOCK_GHZ) -> float:
    """Time below which the instructions cannot all be issued (one per scheduler per clock)."""
    return warp_instructions / (sms * SCHEDULERS_PER_SM * clock_ghz * 1e3)


# the issue-floor formula as the reports state it (issue_floor_us's defaults)
_FLOOR = f"Floor = warp instructions / ({H100_SMS} SMs · {SCHEDULERS_PER_SM} schedulers · {H100_CLOCK_GHZ} GHz)"


def _md_table(head: list[str], columns: list[str], cells: list[list]) -> str:
    """A markdown report: the header lines, then one table."""
    lines = [*head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# HOG report
# ---------------------------------------------------------------------------------------------
def hog_report(arch: int = 90, n: int = 64, h: int = 224, w: int = 224) -> list[dict]:
    """Compile every HOG launch configuration of SWEEP_CONFIGS at the DESIGN §6 shape (uint8 and bf16)."""
    import torch

    from kernels.hog import triton_hog

    rows = []
    for dtype in (torch.uint8, torch.bfloat16):
        frames = torch.zeros((n, 1, 3, h, w), dtype=dtype)
        for variant, block_px, max_ch, num_warps in triton_hog.SWEEP_CONFIGS:
            with capture_launches(arch) as launches:
                triton_hog.hog_targets_triton(
                    frames, 16, variant=variant, block_px=block_px, max_ch=max_ch, num_warps=num_warps
                )
            (launch,) = launches
            st = compile_launch(launch, arch)
            # the one loop a HOG kernel may have is the one over the 3 channels
            warp_instr = st.warp_instructions(trips=3) * launch.programs
            px = n * 3 * h * w  # channel-pixels
            row = dict(
                dtype=str(dtype).replace("torch.", ""),
                config=dict(variant=variant, block_px=block_px, max_ch=max_ch, num_warps=num_warps),
                programs=launch.programs,
                **st.summary(),
                warp_instr_per_channel_pixel=warp_instr * 32 / px,
                issue_floor_us=issue_floor_us(warp_instr),
            )
            rows.append(row)
    return rows


def _hog_markdown(rows: list[dict], arch: int) -> str:
    def per(r: dict) -> str:
        return f"{r['warp_instr_per_channel_pixel']:.1f}"

    def floor(r: dict) -> str:
        return f"{r['issue_floor_us']:.1f}"

    return _md_table(
        [
            f"# HOG kernels compiled offline for sm_{arch} (static SASS facts, not timings)",
            "",
            f"Command: `python -m bench.sass --arch {arch}`; triton {triton.__version__}; shape 64x3x224x224 -> (64, 196, 108).",
            "Instructions are static, per thread of one program (= per warp); 'per ch-px' = warp instructions issued (a",
            "channel loop counted 3 times) x 32 lanes / (N*3*H*W);",
            f"'issue floor' = all warp instructions / ({H100_SMS} SMs x {SCHEDULERS_PER_SM} schedulers x {H100_CLOCK_GHZ} GHz):",
            "a lower bound for an issue-bound kernel on an H100, not a prediction.",
        ],
        ["dtype", "variant", "block_px", "max_ch", "warps", "programs", "regs", "spill B", "instr", "code KiB", "per ch-px",
         "issue floor µs", "MUFU", "convert", "SHFL", "BAR", "LDS+STS", "LDG"],
        [[r["dtype"], r["config"]["variant"], r["config"]["block_px"], r["config"]["max_ch"], r["num_warps"],
          r["programs"], r["registers"], r["local_bytes"], r["instructions"], r["instructions"] * 16 // 1024, per(r),
          floor(r), r["mufu"],
          r["convert"], r["shuffle"], r["barrier"], r["shared"], r["global"]] for r in rows],
    )


# ---------------------------------------------------------------------------------------------
# Attention report
# ---------------------------------------------------------------------------------------------
# static shared memory a program may use (opt-in maximum per block), bytes
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def attention_launches(
    arch: int = 90, model: str = "L", batch: int = 32, dtype: Any = None,
    rel_impl: str = "reference", stage: int = 1, **overrides: Any,
) -> list[Launch]:
    """Capture every launch of one (bf16 unless ``dtype``) forward + backward of kernels.attention's Triton backend at
    MViTv2 stage ``stage`` of ``model`` (bench/attention.py), with the H100 tile table and the
    query chunking and table-gradient grouping an H100 would get at ``batch`` clips (the capture
    itself runs B = 1). ``overrides``:
    RelPosAttnConfig fields to change; ``rel_impl="triton"`` adds the fused rel-terms kernels,
    ``fused=True`` (with it) moves them into the attention kernels (``fused_rel_config``), and
    ``dtab_bh`` forces the batch·heads per table-gradient program."""
    import torch

    from bench.attention import K_GRID, MODELS, Q_GRIDS
    from kernels.attention.reference import rel_table_len
    from kernels.attention.triton_attn import (
        RelPosAttnConfig, default_config, dkdv_split, fused_rel_config, relpos_attention_triton,
    )

    fused = overrides.pop("fused", False)  # the rel terms inside the attention kernels (fused_rel_config)
    forced_bh = overrides.pop("dtab_bh", None)  # batch·heads per table-gradient program (None: what B = batch gets)
    dtype = dtype or torch.bfloat16
    hd, nh = MODELS[model]["hd"], MODELS[model]["heads"][stage - 1]
    q_thw, k_thw = Q_GRIDS[stage - 1], K_GRID
    nq, nk = math.prod(q_thw) + 1, math.prod(k_thw) + 1
    q = torch.zeros(1, nh, nq, hd, dtype=dtype, requires_grad=True)
    k = torch.zeros(1, nh, nk, hd, dtype=dtype, requires_grad=True)
    v = torch.zeros(1, nh, nk, hd, dtype=dtype, requires_grad=True)
    tables = [torch.zeros(rel_table_len(a, b), hd, requires_grad=True) for a, b in zip(q_thw, k_thw)]
    cfg: RelPosAttnConfig = default_config(hd, sum(k_thw), dtype, torch.device("cuda"))
    chunks, _ = dkdv_split(cfg, nq, nk, batch * nh, H100_SMS)
    cfg = dataclasses.replace(fused_rel_config(cfg) if fused else cfg, dkdv_chunks=chunks, **overrides)
    from kernels.attention import rel_triton

    dtab_bh = rel_triton._dtab_bh
    rel_triton._dtab_bh = lambda rcfg, n_items, n_bh: forced_bh or dtab_bh(rcfg, n_items, n_bh * batch)
    rel_triton._dtab_plan.cache_clear()  # launch plans are cached per shape: made again with the grouping above
    try:
        with capture_launches(arch) as launches:
            out = relpos_attention_triton(q, k, v, q_thw, k_thw, *tables, config=cfg, rel_impl=rel_impl)
            out.float().sum().backward()
    finally:
        rel_triton._dtab_bh = dtab_bh
        rel_triton._dtab_plan.cache_clear()
    return launches


ATTENTION_PATHS = {  # path label -> attention_launches keyword arguments
    "default (split rows)": {},
    "rows padded to one power of two": dict(split=False),
    "k' assembled in the kernels": dict(pack_k=False),  # the default where Nq < 2·Nk (stage 4)
    "k' assembled, forward and dq capped at 168 registers": dict(pack_k=False, fwd_maxnreg=168, dq_maxnreg=168),
    "fused rel terms": dict(rel_impl="triton"),
    "rel terms inside the attention kernels": dict(rel_impl="triton", fused=True),
    # opt-in: the forward's and dq's last keys in one narrower tile after the loop (_key_tiles)
    "narrower last key tile": dict(rel_impl="triton", fwd_tail=True, dq_tail=True),
    "rel terms inside, narrower last key tile": dict(rel_impl="triton", fused=True, fwd_tail=True, dq_tail=True),
}


def attention_report(arch: int = 90) -> list[dict]:
    """Compile the forward and backward kernels of every path in ATTENTION_PATHS for both models."""
    rows, seen = [], set()
    for model in ("L", "S"):
        for path, overrides in ATTENTION_PATHS.items():
            for launch in attention_launches(arch, model, **overrides):
                key = (launch.name, tuple(sorted(launch.constexprs.items())), launch.num_warps, launch.num_stages,
                       launch.maxnreg)
                if key in seen:
                    continue
                seen.add(key)
                st = compile_launch(launch, arch)
                row = dict(model=model, path=path, **st.summary(), num_stages=launch.num_stages)
                row["shared_limit"] = SHARED_LIMIT.get(arch)
                rows.append(row)
    return rows


REL_PATHS = {"separate": "fused rel terms", "inside": "rel terms inside the attention kernels",
             "separate, key tail": "narrower last key tile", "inside, key tail": "rel terms inside, narrower last key tile"}


def rel_inside_report(arch: int = 90, batch: int = 32) -> list[dict]:
    """Issue floors of the rel terms separate from or inside the attention's forward and dq kernels,
    MViTv2-L stages 1–4 at ``batch`` clips: per kernel, warp instructions of one program (its loop
    body counted N_KT times) × programs, and the time below which an H100 cannot issue them. A lower
    bound to compare the two layouts by, not a timing (the fourth session measured the separate
    kernels at 1.5–3× their floors)."""
    rows = []
    for stage in (1, 2, 3, 4):
        for layout, path in REL_PATHS.items():
            for launch in attention_launches(arch, "L", batch=batch, stage=stage, **ATTENTION_PATHS[path]):
                if not launch.name.endswith(("._fwd_kernel", "._dq_kernel", "_rel_fwd_kernel", "_rel_dq_kernel")):
                    continue
                st = compile_launch(launch, arch)
                trips = launch.constexpr("N_KT") if st.loops else 1  # the key loop of the attention kernels
                programs = launch.programs * batch  # captured at one clip: grid axis 1 is B·nh
                warp_instr = st.warp_instructions(trips) * programs
                rows.append(dict(stage=stage, layout=layout, kernel=launch.name, registers=st.registers,
                                 programs=programs, trips=trips, warp_instructions=warp_instr,
                                 floor_us=issue_floor_us(warp_instr)))
    return rows


def dtab_report(arch: int = 90, batch: int = 32) -> list[dict]:
    """The table-gradient kernel (stage 1 of the rel tables' backward) with one batch·head per
    program, as before the seventh session, or with the default grouping (``rel_triton._dtab_bh``),
    MViTv2-L stages 1–4 at ``batch`` clips: issue floor (loop body counted per trip) and the bytes
    of fp32 partials that torch then reduces."""
    from bench.attention import MODELS

    rows = []
    for stage in (1, 2, 3, 4):
        n_bh = batch * MODELS["L"]["heads"][stage - 1]
        for layout, forced in (("one batch·head per program", 1), ("grouped (default)", None)):
            for launch in attention_launches(arch, "L", batch=batch, stage=stage, rel_impl="triton", dtab_bh=forced):
                if not launch.name.endswith("_rel_dtab_kernel"):
                    continue
                st = compile_launch(launch, arch)
                c = {n: launch.constexpr(n) for n in ("BH_PER", "ROWS", "BLOCK_R", "TQ", "HQ", "WQ", "KT", "KH", "KW",
                                                     "CT", "CH", "CW", "HD")}  # fmt: skip
                trips = c["BH_PER"] * (c["ROWS"] // c["BLOCK_R"])
                groups = math.ceil(n_bh / c["BH_PER"])
                programs = int(launch.grid[0]) * groups
                # a program runs one of the three axis branches (each with its own copy of the row loop):
                # about a third of the static code, plus its loop body for every further trip
                body = sum(n for _, _, n in st.loops) / len(st.loops) if st.loops else 0
                warp_instr = (st.instructions / 3 + (trips - 1) * body) * st.num_warps * programs
                per_group = c["TQ"] * c["CT"] * c["KT"] + c["HQ"] * c["CH"] * c["KH"] + c["WQ"] * c["CW"] * c["KW"]
                rows.append(dict(stage=stage, layout=layout, bh_per_program=c["BH_PER"], registers=st.registers,
                                 programs=programs, trips=trips, warp_instructions=warp_instr,
                                 floor_us=issue_floor_us(warp_instr), partial_mb=groups * per_group * c["HD"] * 4 / 1e6))
    return rows


def _dtab_markdown(rows: list[dict], arch: int) -> str:
    return _md_table(
        [
            f"# Rel-table gradients, stage 1 kernel: issue floors on sm_{arch} (not timings)",
            "",
            f"Command: `python -m bench.sass --arch {arch}`; triton {triton.__version__}; bf16, MViTv2-L stages 1–4 at B 32.",
            "Each program sums its batch·heads in order; the fp32 partials are then reduced per table row by",
            "`_rel_dtab_finish_kernel` (by torch until the eighth session: on an H100 that took ~0.16 ms at stage 4",
            "with one batch·head per program, `attention_tune_…_2.md`).",
            f"{_FLOOR}; a program runs one of the kernel's three",
            "axis branches, counted as a third of the static code plus its loop body (mean of the three) per further trip.",
        ],
        ["stage", "layout", "batch·heads per program", "regs", "programs", "loop trips", "warp instr (M)", "floor µs",
         "partials MB"],
        [[r["stage"], r["layout"], r["bh_per_program"], r["registers"], r["programs"], r["trips"],
          f"{r['warp_instructions'] / 1e6:.0f}", f"{r['floor_us']:.0f}", f"{r['partial_mb']:.1f}"] for r in rows],
    )


def _rel_inside_markdown(rows: list[dict], arch: int) -> str:
    sums = collections.defaultdict(float)
    for r in rows:
        sums[(r["stage"], r["layout"], "bwd" if "dq" in r["kernel"] else "fwd")] += r["floor_us"]
    table = _md_table(
        [
            f"# Rel terms separate or inside the attention kernels: issue floors on sm_{arch} (not timings)",
            "",
            f"Command: `python -m bench.sass --arch {arch}`; triton {triton.__version__}; bf16, H100 tile table,",
            "MViTv2-L stages 1–4 at B 32 (Nk 393). separate = the rel-term forward and dq kernels beside the",
            "attention's forward and dq kernels (the default table; `auto` moves them inside for large calls where k' is not packed); inside = `fused_rel_config` (RelPosAttnConfig.fuse_rel_fwd/_dq",
            "with 168-register caps); key tail = `fwd_tail`/`dq_tail` (the last keys in one 16-key tile after the loop).",
            f"{_FLOOR}.",
        ],
        ["stage", "layout", "kernel", "regs", "programs", "loop trips", "warp instr (M)", "floor µs"],
        [[r["stage"], r["layout"], r["kernel"], r["registers"], r["programs"], r["trips"],
          f"{r['warp_instructions'] / 1e6:.0f}", f"{r['floor_us']:.0f}"] for r in rows],
    )
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    lines = ["", "Forward side / dq side (attention kernel plus the rel-term kernel where separate), µs:", "",
             "| stage | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
    for stage in sorted({r["stage"] for r in rows}):
        cells = [f"{sums[(stage, lay, 'fwd')]:.0f} / {sums[(stage, lay, 'bwd')]:.0f}" for lay in layouts]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return table + "\n".join(lines) + "\n"


def _attention_markdown(rows: list[dict], arch: int) -> str:
    return _md_table(
        [
            f"# Attention kernels compiled offline for sm_{arch} (static SASS facts, not timings)",
            "",
            f"Command: `python -m bench.sass --arch {arch}`; triton {triton.__version__}; bf16, H100 tile table, first",
            "MViTv2 stage (L: hd 72, 2 heads; S: hd 96, 1 head; Nq 25089, Nk 393), forward + backward.",
            "Instructions are static per thread (loop bodies counted once); spill = local memory bytes per thread.",
            f"Shared memory limit per program on sm_{arch}: {SHARED_LIMIT.get(arch)} bytes.",
        ],
        ["model", "path", "kernel", "warps", "stages", "regs", "spill B", "spill ops in loops", "shared B", "instr",
         "MMA", "SHFL", "BAR"],
        [[r["model"], r["path"], r["name"], r["num_warps"], r["num_stages"], r["registers"], r["local_bytes"],
          r["loop_local"], r["shared_bytes"], r["instructions"], r["tensor"], r["shuffle"], r["barrier"]] for r in rows],
    )


def check(arch: int = 90) -> list[str]:
    """Problems of our default kernels on sm_<arch>: a failed lowering (an exception; the attention
    kernels at B·nh = 1 too), shared memory over the limit,
    register spills (HOG cells and cells-ptx kernels, and cells-ptx with 64-bit frame offsets; bf16 attention forward and backward, with
    the fused rel terms too; the pooling convolution's four kernels; kernels launched with a register cap may spill outside their loops
    only), cross-lane traffic in the HOG kernels, or a non-coherent global load in the kernels with
    the rel terms inside (they read back rows they stored). Empty when all is well."""
    import torch

    from kernels.hog import triton_hog

    problems = []
    limit = SHARED_LIMIT.get(arch, 0)
    # a frame whose offsets pass 2**31 (64-bit offsets, triton_hog.wide_offsets): a 2 GiB buffer, never touched
    sxc = 2**30 + 256
    wide = torch.empty(2 * sxc + 224 * 224, dtype=torch.uint8).as_strided((1, 1, 3, 224, 224), (3 * sxc, 3 * sxc, sxc, 224, 1))
    cases = [(v, d, torch.zeros((2, 1, 3, 224, 224), dtype=d)) for v in ("cells", "cells-ptx")
             for d in (torch.uint8, torch.bfloat16)] + [("cells-ptx wide", torch.uint8, wide)]
    for name, dtype, frames in cases:
        with capture_launches(arch) as launches:
            triton_hog.hog_targets_triton(frames, 16, variant=name.split()[0])
        st = compile_launch(launches[0], arch)
        print(f"hog {name} {dtype}: {st.summary()}", flush=True)
        for what, value in (("spill bytes", st.local_bytes), ("shuffles", st.count("shuffle")),
                            ("barriers", st.count("barrier"))):  # fmt: skip
            if value:
                problems.append(f"HOG {name} kernel ({dtype}) has {value} {what} on sm_{arch}")
    for path in ("default (split rows)", "k' assembled in the kernels", "fused rel terms",
                 "rel terms inside the attention kernels", "narrower last key tile"):
        for launch in attention_launches(arch, "L", **ATTENTION_PATHS[path]):
            st = compile_launch(launch, arch)
            print(f"attention ({path}) {launch.name}: regs {st.registers} spill {st.local_bytes} "
                  f"(in loops: {st.loop_local} ops) shared {st.shared_bytes} nc loads {st.nc_loads}", flush=True)  # fmt: skip
            if limit and st.shared_bytes > limit:
                problems.append(f"{launch.name} ({path}) needs {st.shared_bytes} B shared > {limit} on sm_{arch}")
            if launch.maxnreg is not None and st.registers > launch.maxnreg:
                problems.append(f"{launch.name} ({path}) uses {st.registers} registers over its cap {launch.maxnreg}")
            if path == "rel terms inside the attention kernels" and st.nc_loads:
                # these kernels store rows (R; dq and dR), then a barrier, then read them back: the
                # read-only cache is not coherent with the program's own stores
                problems.append(f"{launch.name} ({path}) has {st.nc_loads} non-coherent global loads on sm_{arch}")
            # a capped kernel may spill outside its loops (once per program); anything else is a problem
            if st.loop_local if launch.maxnreg is not None else st.local_bytes:
                problems.append(f"{launch.name} ({path}, bf16) spills {st.local_bytes} B per thread "
                                f"({st.loop_local} spill ops in loops) on sm_{arch}")
    # B·nh = 1 (MViTv2-S stage 1, one clip): Triton makes the count a constexpr, which once broke the
    # dk/dv kernel's chunk sum (an int has no .to); the interpreter passes it as a tensor
    for launch in attention_launches(arch, "S", batch=1, stage=1):
        st = compile_launch(launch, arch)
        print(f"attention (B·nh 1) {launch.name}: regs {st.registers} spill {st.local_bytes}", flush=True)
    from kernels.pool.triton_pool import depthwise_conv3d_triton

    for stride in ((1, 1, 1), (1, 2, 2)):  # MViTv2-L block 0 / 2 pooling, B 4, bf16: fwd, dgrad, wgrad, finish
        x = torch.zeros((8, 72, 8, 56, 56), dtype=torch.bfloat16, requires_grad=True)
        w = torch.zeros((72, 1, 3, 3, 3), dtype=torch.bfloat16, requires_grad=True)
        with capture_launches(arch) as launches:
            y = depthwise_conv3d_triton(x, w, stride, 1)
            y.backward(torch.zeros_like(y))
        for launch in launches:
            st = compile_launch(launch, arch)
            print(f"pool {stride} {launch.name}: regs {st.registers} spill {st.local_bytes} shared {st.shared_bytes}",
                  flush=True)
            if st.local_bytes:
                problems.append(f"{launch.name} (pool stride {stride}, bf16) spills {st.local_bytes} B per thread on sm_{arch}")
    return problems


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    ap.add_argument("--out", default=None, help="write {hog,attention}_sass_sm<arch>_<date>.{json,md} here")
    ap.add_argument("--check", action="store_true", help="only check that the default kernels lower cleanly (exit 1 if not)")
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.arch)
        for p in problems:
            print("PROBLEM:", p)
        return 1 if problems else 0
    meta = dict(command=" ".join(["python -m bench.sass", *sys.argv[1:]]), triton=triton.__version__, arch=args.arch)
    for what, report, render in (("hog", hog_report, _hog_markdown), ("attention", attention_report, _attention_markdown),
                                 ("attention_rel_inside", rel_inside_report, _rel_inside_markdown),
                                 ("attention_rel_dtab", dtab_report, _dtab_markdown)):
        rows = report(args.arch)
        md = render(rows, args.arch)
        print(md, flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{what}_sass_sm{args.arch}_{datetime.date.today():%Y%m%d}"
            (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            (out / f"{stem}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
