"""Fused relative-position terms R (kernels/attention/rel_triton.py) against reference.rel_matrix.

Every case compares three things (STYLE habit 2): the kernel, the same-dtype reference
(``reference.rel_matrix``) and a float64 oracle (``rel_matrix`` on float64 copies of q and the
tables); the kernel's max error vs the oracle must be at most 2× the same-dtype reference's error
plus a small tolerance, for R and the gradients w.r.t. q and the three tables. On CPU the kernels
run in the Triton interpreter (tests/conftest.py) on small grids; the ``gpu`` tests run the
MViTv2-L stage-1 shape in bf16.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pytest
import torch

from kernels.attention import rel_triton
from kernels.attention.reference import rel_matrix, rel_pos_index, rel_table_len
from kernels.attention.rel_triton import RelTritonConfig, rel_matrix_triton

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(
    B: int,
    nh: int,
    q_thw: Sequence[int],
    k_thw: Sequence[int],
    hd: int,
    has_cls: bool,
    dtype: torch.dtype,
    device="cpu",
    table_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    with_t: Optional[bool] = None,
):
    """Fresh random leaves (q (B, nh, Nq, hd), rel_pos_t|None, rel_pos_h, rel_pos_w).

    ``with_t`` None: a temporal table unless both T are 1."""
    g = torch.Generator().manual_seed(seed)
    Nq = math.prod(q_thw) + int(has_cls)

    def leaf(*shape, dt, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_()

    q = leaf(B, nh, Nq, hd, dt=dtype)
    tables = [leaf(rel_table_len(q_thw[a], k_thw[a]), hd, dt=table_dtype or dtype, std=0.3) for a in range(3)]
    if with_t is False or (with_t is None and q_thw[0] == 1 and k_thw[0] == 1):
        tables[0] = None
    return [q, *tables]


def _run(fn, inputs, grad_out):
    out = fn(*inputs)
    leaves = [x for x in inputs if x is not None]
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_against_oracle(inputs, q_thw, k_thw, has_cls, atol_mult: float = 1.0):
    """Assert kernel error ≤ 2·(same-dtype reference error) + atol for R, dq and the table grads."""
    q = inputs[0]
    dtype = q.dtype
    B, nh = q.shape[:2]
    n_cols = (k_thw[0] if inputs[1] is not None else 0) + k_thw[1] + k_thw[2]
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(B, nh, math.prod(q_thw), n_cols, generator=g).to(device=q.device, dtype=dtype)

    def kern(*x):
        return rel_matrix_triton(x[0], q_thw, k_thw, *x[1:], has_cls)

    def ref(*x):
        return rel_matrix(x[0], q_thw, k_thw, *x[1:], has_cls)

    got, same = _run(kern, inputs, grad_out), _run(ref, inputs, grad_out)
    inputs64 = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    exact = _run(ref, inputs64, grad_out.double())
    names = ["R", "dq"] + [n for n, x in zip(["drel_t", "drel_h", "drel_w"], inputs[1:]) if x is not None]
    assert len(got) == len(names)
    for name, a, r, o in zip(names, got, same, exact):
        assert a.dtype == r.dtype and a.shape == r.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {r.dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err, ref_err = _err(a, o), _err(r, o)
        tol = 2 * ref_err + atol_mult * ATOL[dtype] * max(1.0, o.abs().max().item())
        assert err <= tol, f"{name}: kernel error {err:.3g} > 2×reference error {ref_err:.3g} + atol (tol {tol:.3g})"
    if has_cls:  # the cls row of dq is exactly zero (it gets no bias)
        assert torch.count_nonzero(got[1][:, :, 0]) == 0


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel-written buffer starts as NaN, so an unwritten element fails the finiteness check."""

    def empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(rel_triton, "_empty", empty)


# (q_thw, k_thw): both Q < K and Q > K on every axis, non-divisible ratios, images (T = 1)
GEOMETRIES = [
    ((2, 8, 8), (2, 2, 2)),  # MViTv2-like KV stride 4
    ((3, 5, 7), (3, 3, 4)),  # odd sizes, fractional ratios
    ((2, 3, 2), (4, 5, 6)),  # keys finer than queries on every axis
    ((4, 2, 6), (2, 5, 3)),  # mixed: Q > K on t and w, Q < K on h
    ((1, 7, 5), (1, 4, 3)),  # image, no temporal table
]


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("q_thw,k_thw", GEOMETRIES)
def test_fp32_matches_oracle(q_thw, k_thw, has_cls):
    inputs = make_inputs(2, 2, q_thw, k_thw, 24, has_cls, torch.float32)
    check_against_oracle(inputs, q_thw, k_thw, has_cls)


@pytest.mark.parametrize("hd", [40, 64, 72, 96])
def test_head_dims(hd):
    q_thw, k_thw = (2, 5, 4), (2, 3, 2)
    inputs = make_inputs(1, 2, q_thw, k_thw, hd, True, torch.float32, seed=hd)
    check_against_oracle(inputs, q_thw, k_thw, True)


def test_odd_head_dim():
    """hd 37: unaligned rows, no vectorised loads, masked padding to 64."""
    q_thw, k_thw = (2, 3, 5), (2, 2, 3)
    inputs = make_inputs(1, 1, q_thw, k_thw, 37, False, torch.float32, seed=3)
    check_against_oracle(inputs, q_thw, k_thw, False)


@pytest.mark.parametrize("q_thw,k_thw,has_cls", [((3, 5, 7), (3, 3, 4), True), ((1, 6, 5), (1, 3, 3), False)])
def test_fp16_with_fp32_tables(q_thw, k_thw, has_cls):
    """Mixed precision as in training: fp16 activations, fp32 master tables (cast to fp16 first)."""
    inputs = make_inputs(2, 2, q_thw, k_thw, 72, has_cls, torch.float16, table_dtype=torch.float32)
    check_against_oracle(inputs, q_thw, k_thw, has_cls)
    assert all(t is None or t.dtype == torch.float32 for t in inputs[1:])


def test_fp16_tables():
    q_thw, k_thw = (2, 4, 6), (2, 2, 3)
    inputs = make_inputs(2, 1, q_thw, k_thw, 40, True, torch.float16)
    check_against_oracle(inputs, q_thw, k_thw, True)


def test_tables_rounded_to_q_dtype_first():
    """fp32 tables are cast to fp16 before use, as ``rel_matrix`` does (not used at full precision).

    Tables sit 0.45 fp16-ulp above fp16 values and q is positive, so the cast changes about half
    of the fp16-rounded results: the kernel must agree with the rounded-table float64 result."""
    q_thw, k_thw = (2, 3, 4), (2, 2, 2)
    g = torch.Generator().manual_seed(11)
    q = torch.rand(1, 2, 1 + math.prod(q_thw), 24, generator=g).to(torch.float16)
    tables = []
    for a in range(3):
        base = (torch.rand(rel_table_len(q_thw[a], k_thw[a]), 24, generator=g) + 0.5).to(torch.float16)
        ulp = torch.nextafter(base, torch.full_like(base, 2.0)).float() - base.float()
        tables.append(base.float() + 0.45 * ulp)  # fp32, rounds back to `base`
    q.requires_grad_(True)
    got = rel_matrix_triton(q, q_thw, k_thw, *tables, True)
    dr = torch.rand(got.shape, generator=g).to(torch.float16)  # positive: the table offsets add up in dq
    (dq,) = torch.autograd.grad(got, q, dr)

    def exact(tabs):
        q64 = q.detach().double().requires_grad_(True)
        r = rel_matrix(q64, q_thw, k_thw, *[t.double() for t in tabs], True)
        (dq64,) = torch.autograd.grad(r, q64, dr.double())
        return r.detach().to(torch.float16), dq64.to(torch.float16)

    rounded, unrounded = exact([t.to(torch.float16) for t in tables]), exact(tables)
    # dq too: its fp32 copy of the tables must hold them rounded (a mutation storing them unrounded
    # passed the fp16 gradient checks, whose tolerance is wider than one rounding)
    for i, what in enumerate(("R", "dq")):
        assert (rounded[i] != unrounded[i]).float().mean() > 0.2, what  # the test can tell the two apart
        assert (got.detach() if i == 0 else dq).eq(rounded[i]).float().mean() > 0.97, what


def test_temporal_table_with_single_frame():
    """T = 1 with a (1, hd) temporal table given: E includes Tk = 1 column, like the reference."""
    q_thw, k_thw = (1, 4, 5), (1, 2, 3)
    inputs = make_inputs(1, 2, q_thw, k_thw, 24, True, torch.float32, with_t=True)
    assert inputs[1] is not None and inputs[1].shape == (1, 24)
    check_against_oracle(inputs, q_thw, k_thw, True)


def test_several_chunks_per_coordinate(monkeypatch):
    """Table-gradient programs split a coordinate's rows into several chunks (the t axis has
    H·W = 48 rows, ROWS = 16): the fixed-order chunk sum must match the oracle."""
    cfg = RelTritonConfig(16, 4, 16, 4, 16, 16, 4)
    monkeypatch.setattr(rel_triton, "_config", lambda device, dtype: cfg)
    q_thw, k_thw = (3, 6, 8), (3, 2, 2)
    assert rel_triton._dtab_rows(rel_triton._Geom(q_thw, k_thw, True, True), cfg) == 16
    inputs = make_inputs(1, 2, q_thw, k_thw, 24, True, torch.float32)
    check_against_oracle(inputs, q_thw, k_thw, True)


def test_table_gradient_programs_sum_several_batch_heads(monkeypatch):
    """Each table-gradient program sums up to ``dtab_bh`` batch·heads in order (fewer partials for
    torch to reduce): 4 per program over B·nh = 6, so the second group is half masked; the result
    must match the oracle, with several row chunks per coordinate too (ROWS = 16 < H·W = 48)."""
    cfg = RelTritonConfig(16, 4, 16, 4, 16, 16, 4, dtab_bh=4, dtab_min_programs=1)
    monkeypatch.setattr(rel_triton, "_config", lambda device, dtype: cfg)
    q_thw, k_thw = (3, 6, 8), (3, 2, 2)
    n_items = 3 * 3 + 6 + 8  # t: 3 coordinates × 3 chunks of 16 rows; h, w: one chunk each
    assert rel_triton._dtab_bh(cfg, n_items, 6) == 4
    inputs = make_inputs(3, 2, q_thw, k_thw, 24, True, torch.float32)
    check_against_oracle(inputs, q_thw, k_thw, True)


def test_batch_heads_per_table_gradient_program():
    """8 batch·heads per program at every MViTv2-L stage at B = 32 (the partials torch reduces: 8×
    smaller), fewer where the launch would drop under 1024 programs; a function of the shape only."""
    cfg = RelTritonConfig()
    # (items per group of batch·heads, B·nh): MViTv2-L stages 1–4 at B 32 (rows per program 448 / 256 / 128 / 64)
    assert [rel_triton._dtab_bh(cfg, items, n_bh) for items, n_bh in ((168, 64), (88, 128), (44, 256), (22, 512))] == [8] * 4
    assert rel_triton._dtab_bh(cfg, 168, 32) == 4  # MViTv2-S stage 1 at B 32 (one head)
    assert rel_triton._dtab_bh(cfg, 22, 2) == 1  # too few programs to share out
    assert rel_triton._dtab_bh(RelTritonConfig(dtab_bh=1), 22, 512) == 1


def test_strided_q():
    """q as a non-contiguous view (heads split from a packed qkv projection, as in the model)."""
    q_thw, k_thw = (2, 4, 3), (2, 2, 2)
    B, nh, hd = 2, 2, 24
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, 1 + math.prod(q_thw), 3, nh, hd, generator=g, requires_grad=True)
    q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, Nq, hd), strided
    assert not q.is_contiguous()
    tables = make_inputs(1, 1, q_thw, k_thw, hd, True, torch.float32)[1:]
    r = rel_matrix_triton(q, q_thw, k_thw, *tables, True)
    r_ref = rel_matrix(q, q_thw, k_thw, *tables, True)
    assert _err(r, r_ref) < 1e-5
    gr = torch.randn(r.shape, generator=g)
    got = torch.autograd.grad(r, [qkv, *tables], gr)
    want = torch.autograd.grad(r_ref, [qkv, *tables], gr)
    for a, b in zip(got, want):
        assert _err(a, b) < 1e-4


@pytest.mark.parametrize("q_thw,k_thw", GEOMETRIES + [((8, 56, 56), (8, 7, 7)), ((8, 7, 7), (8, 7, 7)),
                                               ((16, 14, 14), (8, 7, 7)), ((5, 9, 13), (3, 11, 4))])
@pytest.mark.parametrize("block", [16, 64])
def test_forward_windows_cover_every_index(q_thw, k_thw, block):
    """The forward kernel gathers dist[pos_i, j] − start from a (block, LP) tile, start = the block's
    smallest index: every such offset must lie in [0, LP) for each block (GPU block size included,
    which the interpreter tests do not run)."""
    g = rel_triton._Geom(q_thw, k_thw, True, True)
    lps = rel_triton._windows(g, block)
    Tq, Hq, Wq = q_thw
    rows = torch.arange(math.prod(q_thw))
    coords = (rows // (Hq * Wq), (rows // Wq) % Hq, rows % Wq)
    for a, lp in enumerate(lps):
        assert lp >= 16 and lp & (lp - 1) == 0
        loc = rel_pos_index(q_thw[a], k_thw[a])[coords[a]]  # (Nq', K) table rows
        for b0 in range(0, len(rows), block):
            blk = loc[b0:b0 + block]
            assert int(blk.max() - blk.min()) < lp, (a, b0)


def test_q_vec_alignment_hint():
    """The alignment told to the compiler divides every q stride (a wrong hint = misaligned loads)."""
    assert rel_triton._q_vec(torch.zeros(2, 2, 25, 72)) == 8  # strides 3600, 1800, 72
    assert rel_triton._q_vec(torch.zeros(2, 2, 25, 64)) == 16
    assert rel_triton._q_vec(torch.zeros(2, 2, 25, 37)) == 1
    assert rel_triton._q_vec(torch.zeros(2, 25, 3, 2, 72)[:, :, 0].transpose(1, 2)) == 8  # qkv view
    assert rel_triton._q_vec(torch.zeros(2, 2, 72, 25).transpose(2, 3)) == 1  # hd strided


def test_only_tables_or_only_q_require_grad():
    q_thw, k_thw = (2, 3, 4), (2, 2, 2)
    q, *tables = make_inputs(1, 2, q_thw, k_thw, 24, True, torch.float32)
    gr = torch.randn(1, 2, 24, 6)
    # q frozen: table gradients only
    (d_h,) = torch.autograd.grad(rel_matrix_triton(q.detach(), q_thw, k_thw, *tables, True), [tables[1]], gr)
    (d_h_ref,) = torch.autograd.grad(rel_matrix(q.detach(), q_thw, k_thw, *tables, True), [tables[1]], gr)
    assert _err(d_h, d_h_ref) < 1e-4
    # tables frozen: dq only
    frozen = [t.detach() for t in tables]
    (dq,) = torch.autograd.grad(rel_matrix_triton(q, q_thw, k_thw, *frozen, True), [q], gr)
    (dq_ref,) = torch.autograd.grad(rel_matrix(q, q_thw, k_thw, *frozen, True), [q], gr)
    assert _err(dq, dq_ref) < 1e-5


def test_backward_deterministic():
    """Two backward passes give bitwise equal gradients. In the interpreter the programs run one
    after another in a fixed order, so on the CPU this checks repeatability only; whether the
    result is independent of the programs' order is what test_gpu_backward_deterministic checks."""
    q_thw, k_thw = (3, 5, 7), (3, 3, 4)
    inputs = make_inputs(2, 2, q_thw, k_thw, 40, True, torch.float32, seed=7)
    grad_out = torch.randn(2, 2, math.prod(q_thw), 10, generator=torch.Generator().manual_seed(8))

    def fn(*x):
        return rel_matrix_triton(x[0], q_thw, k_thw, *x[1:], True)

    first, second = _run(fn, inputs, grad_out), _run(fn, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_batch_split_at_the_grid_limit(monkeypatch):
    """B·nh over CUDA's grid limit (lowered to 5 here: B = 3, nh = 2 runs as 2 + 1 items): the same
    R and gradients, and no launch over the limit (``launch`` refuses one)."""
    from kernels import launch

    q_thw, k_thw = (2, 3, 4), (2, 2, 2)
    inputs = make_inputs(3, 2, q_thw, k_thw, 16, True, torch.float32, seed=3)
    grad_out = torch.randn(3, 2, math.prod(q_thw), 6, generator=torch.Generator().manual_seed(4))  # E = 2 + 2 + 2

    def fn(*x):
        return rel_matrix_triton(x[0], q_thw, k_thw, *x[1:], True)

    whole = _run(fn, inputs, grad_out)
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 5)
    parts = _run(fn, inputs, grad_out)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])  # R and dq: per item
    assert all(_err(a, b) < 1e-5 for a, b in zip(whole[2:], parts[2:]))  # the tables' gradients: summed in parts


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def _args(**over):
    q_thw, k_thw = (2, 3, 4), (2, 2, 2)
    q, t, h, w = make_inputs(1, 2, q_thw, k_thw, 24, True, torch.float32)
    args = dict(q=q, q_thw=q_thw, k_thw=k_thw, rel_pos_t=t, rel_pos_h=h, rel_pos_w=w, has_cls=True)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(q=torch.zeros(2, 25, 24)), r"\(B, nh, N, hd\)"),
    (dict(q_thw=(3, 4)), "must be \\(T, H, W\\)"),
    (dict(q_thw=(2, 3, 5)), "tokens"),  # token count does not match the grid
    (dict(has_cls=False), "tokens"),
    (dict(rel_pos_h=torch.zeros(4, 24)), "rel_pos_h must be"),  # wrong table length
    (dict(rel_pos_w=torch.zeros(7, 23)), "rel_pos_w must be"),  # wrong head dim
    (dict(rel_pos_t=None), "rel_pos_t is required"),
    (dict(q=torch.zeros(1, 2, 25, 24, dtype=torch.float64)), "float16, bfloat16 and float32"),
    (dict(q=torch.zeros(1, 2, 25, 24, dtype=torch.int32)), "must be floating point"),
    (dict(rel_pos_h=torch.zeros(5, 24, dtype=torch.int64)), "floating-point"),
    (dict(q=torch.zeros(1, 2, 25, 24, dtype=torch.float32), k_thw=(2, 2, 0)), "positive"),
])
def test_bad_inputs_raise(over, match):
    with pytest.raises(ValueError, match=match):
        rel_matrix_triton(**_args(**over))


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # launchable_on() reads it at call time
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        rel_matrix_triton(**_args())


def test_head_dim_too_large_raises():
    q_thw, k_thw = (1, 2, 2), (1, 1, 1)
    q, _, h, w = make_inputs(1, 1, q_thw, k_thw, 264, False, torch.float32)
    with pytest.raises(ValueError, match="head dim 264"):
        rel_matrix_triton(q, q_thw, k_thw, None, h, w, False)


# ---------------------------------------------------------------------------------------------
# GPU: MViTv2-L 16×4 stage 1 (DESIGN §6), bf16 q, fp32 master tables, fp64 oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,nh,q_thw", [
    (1, 2, (8, 56, 56)),
    (32, 2, (8, 56, 56)),  # table gradients: 8 batch·heads per program, 7 row tiles each
    (32, 16, (8, 7, 7)),  # MViTv2-L stage 4: 8 batch·heads per program, one row tile each
])
def test_gpu_mvit_l_bf16(B, nh, q_thw):
    k_thw = (8, 7, 7)
    inputs = make_inputs(B, nh, q_thw, k_thw, 72, True, torch.bfloat16, device="cuda", table_dtype=torch.float32)
    check_against_oracle(inputs, q_thw, k_thw, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,hd,q_thw,k_thw,has_cls", [
    (torch.float16, 96, (8, 28, 28), (8, 7, 7), True),  # MViTv2-S stage 2
    (torch.float32, 72, (8, 14, 14), (8, 7, 7), True),
    (torch.bfloat16, 64, (1, 56, 56), (1, 7, 7), False),  # image, no temporal table
    (torch.bfloat16, 40, (3, 13, 11), (4, 5, 6), True),  # odd sizes, keys finer
])
def test_gpu_other_shapes(dtype, hd, q_thw, k_thw, has_cls):
    inputs = make_inputs(2, 2, q_thw, k_thw, hd, has_cls, dtype, device="cuda", table_dtype=torch.float32)
    check_against_oracle(inputs, q_thw, k_thw, has_cls)


@pytest.mark.gpu
def test_gpu_backward_deterministic():
    q_thw, k_thw = (8, 56, 56), (8, 7, 7)
    inputs = make_inputs(4, 2, q_thw, k_thw, 72, True, torch.bfloat16, device="cuda", table_dtype=torch.float32)
    grad_out = torch.randn(4, 2, math.prod(q_thw), 22, device="cuda", dtype=torch.bfloat16)

    def fn(*x):
        return rel_matrix_triton(x[0], q_thw, k_thw, *x[1:], True)

    first, second = _run(fn, inputs, grad_out), _run(fn, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))



def test_bf16_in_the_interpreter_is_refused():
    """As relpos_attention_triton: the interpreter's bf16 rel terms were off by 4e10 (through
    ``relpos_attention(backend="sdpa", rel_impl="triton")`` too: outputs off by 4), with no error."""
    from kernels import interpreting
    from kernels.attention import relpos_attention

    if not interpreting():
        pytest.skip("on a GPU bf16 is computed (test_gpu_* check it)")
    q_thw, k_thw = (2, 4, 4), (2, 2, 2)
    q, *tables = make_inputs(1, 2, q_thw, k_thw, 32, True, torch.bfloat16)
    kv = torch.randn(1, 2, math.prod(k_thw) + 1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 runs on a GPU only"):
        rel_matrix_triton(q, q_thw, k_thw, *tables, True)
    with pytest.raises(ValueError, match="bfloat16 runs on a GPU only"):
        relpos_attention(q, kv, kv, q_thw, k_thw, *tables, backend="sdpa", rel_impl="triton")
    rel_matrix_triton(q.float(), q_thw, k_thw, *(t.float() for t in tables), True)  # fp32 is computed
