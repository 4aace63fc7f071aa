"""The Triton kernels lower for an H100 (sm_90) on this GPU-less machine (bench/sass.py).

The interpreter checks what the kernels compute; only the real compiler can say whether they fit
the target: shared memory within the limit, an op with no lowering, register spills. Triton and
its bundled ptxas compile for sm_90 without a device, so CI catches those before a GPU session.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.sass import count_nc_loads, parse_sass

ROOT = Path(__file__).resolve().parents[2]


def test_default_kernels_lower_for_sm90():
    """HOG cells and cells-ptx kernels (uint8, bf16; cells-ptx with 64-bit frame offsets too): no spills, shuffles or barriers; bf16 attention forward and
    backward (both dk/dv paths, and with the fused rel terms): no spills, shared memory within the
    sm_90 limit; the pooling convolution's kernels (kernels/pool): no spills. In a subprocess, because this session's kernels were imported for the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sass", "--check", "--arch", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton_attn._dkdv_kernel" in proc.stdout and "rel_triton._rel_dtab_kernel" in proc.stdout
    assert "hog cells torch.uint8" in proc.stdout and "hog cells-ptx torch.bfloat16" in proc.stdout
    assert "hog cells-ptx wide torch.uint8" in proc.stdout
    assert "attention (B·nh 1) triton_attn._dkdv_kernel" in proc.stdout
    assert "triton_pool._pool_wgrad_kernel" in proc.stdout and "triton_pool._pool_dgrad_kernel" in proc.stdout


def test_parse_sass_counts_and_loops():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/              @!P0 LDG.E.U8 R2, desc[UR4][R4.64+0x1] ;     /* 0x0000040404020981 */
        /*0020*/                   FADD R3, R2, R2 ;                      /* 0x0000000202037221 */
        /*0030*/               @P1 BRA 0x10 ;                             /* 0xfffffff000000947 */
        /*0040*/                   NOP ;                                  /* 0x0000000000007918 */
        /*0050*/                   EXIT ;                                 /* 0x000000000000794d */
        /*0060*/                   BRA 0x60;                              /* 0xfffffffc00fc7947 */
    """
    mix, loops = parse_sass(sass)
    assert mix == {"MOV": 1, "LDG": 1, "FADD": 1, "BRA": 2, "EXIT": 1}
    assert loops == [(0x10, 0x30, 3)]  # LDG, FADD, BRA
    _, loops = parse_sass(sass.replace("@P1 BRA 0x10", "@P1 BRA 0x50"))
    assert loops == []  # a forward branch and the self-loop padding


def test_non_coherent_loads_are_counted():
    """The check that keeps the fused kernels' store → barrier → load pattern off the read-only cache."""
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;        /* 0x0000000402047981 */
        /*0010*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ; /* 0x0000000402087981 */
        /*0020*/                   LDG.E.U16.CONSTANT R9, desc[UR4][R6.64] ; /* 0x0000000406097981 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ; /* 0x0000000002017fae */
    """
    assert count_nc_loads(sass) == 2
