"""MViTv2 building blocks against the official SlowFast semantics (DESIGN §3.4).

Expected values are derived by hand from the official configs and code (pooling schedule, table
sizes, widths), not read back from our implementation.
"""

import pytest
import torch
import torch.nn as nn

from kernels.attention import relpos_attention
from models.mvit import (
    MultiScaleAttention,
    MultiScaleBlock,
    attention_pool,
    pooling_schedule,
    resize_rel_pos,
    round_width,
)
from models.variants import create_model


def test_round_width_official_examples():
    assert round_width(96, 2.0) == 192
    assert round_width(1, 2.0) == 2
    assert round_width(144, 2.0, divisor=4) == 288
    assert round_width(96, 1.0, divisor=2) == 96
    assert round_width(10, 1.5, divisor=4) == 16  # 15 -> int(17)//4*4 = 16


def test_pooling_schedule_s16x4_kv_adaptive():
    """KV stride starts at [1,8,8] and is divided by each Q stride (FT: stages at 1, 3, 14)."""
    q = [[i, 1, 1, 1] for i in range(16)]
    for b in (1, 3, 14):
        q[b] = [b, 1, 2, 2]
    kq, sq, kkv, skv = pooling_schedule(16, q, (3, 3, 3), (1, 8, 8))
    want_kv = [[1, 8, 8]] + [[1, 4, 4]] * 2 + [[1, 2, 2]] * 11 + [[1, 1, 1]] * 2
    assert skv == want_kv
    assert all(k == [3, 3, 3] for k in kq + kkv)
    assert sq[1] == [1, 2, 2] and sq[0] == [1, 1, 1]


def test_pooling_schedule_default_kernel_and_missing_entries():
    kq, sq, kkv, skv = pooling_schedule(3, [[1, 1, 2, 2]], None, None, [[0, 1, 4, 4], [1, 1, 2, 2]])
    assert kq == [[], [1, 3, 3], []] and sq == [[], [1, 2, 2], []]
    assert kkv == [[1, 5, 5], [1, 3, 3], []] and skv == [[1, 4, 4], [1, 2, 2], []]
    with pytest.raises(ValueError, match="block 5"):
        pooling_schedule(3, [[5, 1, 2, 2]], None, None)


def _table_lengths(model):
    return [(b.attn.rel_pos_t.shape[0], b.attn.rel_pos_h.shape[0], b.attn.rel_pos_w.shape[0]) for b in model.blocks]


def test_rel_pos_table_sizes_s16x4_finetune_and_pretrain():
    """Official sizing 2·max(size//stride_q, size//stride_kv) − 1 from each block's nominal input."""
    with torch.device("meta"):
        ft = create_model("mvitv2_s_16x4", "classify")
        pt = create_model("mvitv2_s_16x4", "pretrain")
    # input sizes: 56 (block 0,1), 28 (2,3), 14 (4..14), 7 (15, FT only)
    want_ft = [111, 55, 55] + [27] * 12 + [13]
    want_pt = [111, 55, 55] + [27] * 13
    assert [h for _, h, _ in _table_lengths(ft)] == want_ft
    assert [w for _, _, w in _table_lengths(ft)] == want_ft
    assert [h for _, h, _ in _table_lengths(pt)] == want_pt
    assert all(t == 15 for t, _, _ in _table_lengths(ft) + _table_lengths(pt))
    # head dim 96 in every block (heads double with the width)
    assert {b.attn.rel_pos_h.shape[1] for b in ft.blocks} == {96}


def test_widths_dim_mul_in_att_false_vs_true():
    """MaskFeat (False): block before a stage outputs the new width through its MLP and shortcut
    projection; supervised (True): the stage's first block's attention projects to it."""
    with torch.device("meta"):
        s = create_model("mvitv2_s_16x4", "classify")
        b = create_model("mvitv2_b_32x3", "classify")
    sd = {k: v.shape for k, v in s.state_dict().items()}
    assert sd["blocks.0.attn.qkv.weight"] == (288, 96)
    assert sd["blocks.0.mlp.fc1.weight"] == (384, 96)
    assert sd["blocks.0.mlp.fc2.weight"] == (192, 384)
    assert sd["blocks.0.proj.weight"] == (192, 96)
    assert sd["blocks.1.attn.qkv.weight"] == (576, 192)
    assert "blocks.1.proj.weight" not in sd
    assert sd["blocks.15.mlp.fc2.weight"] == (768, 3072)
    bd = {k: v.shape for k, v in b.state_dict().items()}
    assert bd["blocks.2.attn.qkv.weight"] == (576, 96)  # att_dim = dim_out = 192
    assert bd["blocks.2.proj.weight"] == (192, 96)
    assert bd["blocks.2.mlp.fc1.weight"] == (768, 192)
    assert "blocks.1.proj.weight" not in bd


def test_resize_rel_pos_matches_linear_interpolation():
    table = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 40.0]])
    out = resize_rel_pos(table, 5)
    # align_corners=False: src = (i + 0.5)·3/5 − 0.5, clamped to [0, 2]
    src = torch.tensor([0.0, 0.4, 1.0, 1.6, 2.0])
    lo = src.floor().long().clamp(max=1)
    frac = src - lo
    want = table[lo] * (1 - frac[:, None]) + table[lo + 1] * frac[:, None]
    torch.testing.assert_close(out, want)
    assert resize_rel_pos(table, 3) is table
    down = resize_rel_pos(torch.randn(27, 8), 13)
    assert down.shape == (13, 8)
    with pytest.raises(ValueError, match=r"must be \(L, hd\)"):
        resize_rel_pos(torch.randn(3), 5)


def test_attention_pool_norm_sees_cls_token():
    torch.manual_seed(0)
    B, nh, T, H, W, C = 2, 3, 2, 4, 4, 8
    x = torch.randn(B, nh, 1 + T * H * W, C)
    pool = nn.Conv3d(C, C, 3, stride=(1, 2, 2), padding=1, groups=C, bias=False)
    norm = nn.LayerNorm(C, eps=1e-6)
    with torch.no_grad():
        norm.bias.normal_()
    out, thw = attention_pool(x, pool, (T, H, W), True, norm)
    assert thw == (2, 2, 2)
    grid = x[:, :, 1:].reshape(B * nh, T, H, W, C).permute(0, 4, 1, 2, 3)
    pooled = pool(grid).reshape(B, nh, C, -1).transpose(2, 3)
    want = norm(torch.cat([x[:, :, :1], pooled], dim=2))
    torch.testing.assert_close(out, want)
    # cls row went through the norm too
    torch.testing.assert_close(out[:, :, 0], norm(x[:, :, 0]))


def test_block_residual_pooling_and_skip_pool():
    """Residual pooling adds pooled q to non-cls outputs only; skip path is max-pooled (3,3)/2."""
    torch.manual_seed(0)
    kw = dict(dim=16, dim_out=16, num_heads=2, input_size=(2, 8, 8), kernel_q=(3, 3, 3), kernel_kv=(3, 3, 3),
              stride_q=(1, 2, 2), stride_kv=(1, 2, 2), attn_backend="reference")
    blk = MultiScaleBlock(**kw)
    assert isinstance(blk.pool_skip, nn.MaxPool3d) and blk.pool_skip.kernel_size == [1, 3, 3]
    x = torch.randn(2, 1 + 2 * 64, 16)
    y, thw = blk(x, (2, 8, 8))
    assert thw == (2, 4, 4) and y.shape == (2, 1 + 32, 16)
    # residual pooling on/off differ by proj(pooled q) on non-cls tokens only
    blk_nr = MultiScaleBlock(**kw, residual_pooling=False)
    blk_nr.load_state_dict(blk.state_dict())
    a, _ = blk.attn(blk.norm1(x), (2, 8, 8))
    b, _ = blk_nr.attn(blk.norm1(x), (2, 8, 8))
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def _official_attention(attn, x, thw):
    """``MultiScaleAttention.forward`` written as the official code writes it: q, k, v indexed out
    of one permuted qkv, the cls token sliced off and concatenated back around each pooling, the
    residual added to the sliced non-cls rows. The model computes the same values with fewer ops."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]

    def pool(t, conv, norm):
        cls_tok, t = t[:, :, :1], t[:, :, 1:]
        nh, C = t.shape[1], t.shape[3]
        t = conv(t.reshape(B * nh, *thw, C).permute(0, 4, 1, 2, 3).contiguous())
        grid = tuple(t.shape[2:])
        t = t.reshape(B, nh, C, -1).transpose(2, 3)
        return norm(torch.cat((cls_tok, t), dim=2)), grid

    q, q_thw = pool(q, attn.pool_q, attn.norm_q)
    k, k_thw = pool(k, attn.pool_k, attn.norm_k)
    v, _ = pool(v, attn.pool_v, attn.norm_v)
    # the tables as the official cal_rel_pos_spatial/_temporal take them: get_rel_pos(rel_pos_h) for the
    # h axis, rel_pos_w for w, rel_pos_t for t (the model's own _tables, used here before, let a swap pass)
    tables = [resize_rel_pos(table, 2 * max(a, b) - 1)
              for table, a, b in zip((attn.rel_pos_t, attn.rel_pos_h, attn.rel_pos_w), q_thw, k_thw)]
    out = relpos_attention(q, k, v, q_thw, k_thw, *tables, scale=attn.scale, backend=attn.attn_backend)
    out = torch.cat((out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]), dim=2)
    return attn.proj(out.transpose(1, 2).reshape(B, -1, attn.dim_out))


@pytest.mark.parametrize("thw", [(2, 8, 8), (2, 8, 6), (1, 8, 8)], ids=["square", "wide", "one_frame"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_the_official_formulation_bitwise(dtype, thw):
    """Output and every gradient equal the official formulation's bit for bit (the model avoids its
    zero-filled slice/select gradients, which the host pays for at every block); at the nominal
    grid, at a narrower one, whose tables are interpolated at run time, and at one frame (the official
    code still adds q·Rt[0] to the non-cls keys: dropping that term passed the model tests)."""
    torch.manual_seed(0)
    attn = MultiScaleAttention(16, 32, (2, 8, 8), 2, kernel_q=(3, 3, 3), kernel_kv=(3, 3, 3), stride_q=(1, 2, 2),
                               stride_kv=(1, 2, 2), attn_backend="sdpa").to(dtype)
    n = thw[0] * thw[1] * thw[2]
    x = torch.randn(2, 1 + n, 16).to(dtype)
    g = torch.randn(2, 1 + n // 4, 32).to(dtype)
    grads = []
    for fn in (lambda t: attn(t, thw)[0], lambda t: _official_attention(attn, t, thw)):
        xi = x.clone().requires_grad_()
        attn.zero_grad(set_to_none=True)
        out = fn(xi)
        out.backward(g)
        grads.append([out, xi.grad] + [(n, p.grad) for n, p in attn.named_parameters()])
    mine, official = grads
    assert torch.equal(mine[0], official[0]) and torch.equal(mine[1], official[1])
    for (name, a), (_, b) in zip(mine[2:], official[2:]):
        assert torch.equal(a, b), name


def test_block_issues_no_zero_filled_gradients(monkeypatch):
    """One block's forward+backward has no select/slice backward (each a zero-filled full-size
    tensor plus a copy, and an add to merge it): q, k, v come from one unbind, the cls token is split
    off, and the residual is one addcmul. Fewer ops per block is less host time per step. (The
    attention core is plain SDPA here: only the block's own ops are counted.)"""
    import models.mvit
    from bench.attention_host import _OpCounter

    monkeypatch.setattr(models.mvit, "relpos_attention", lambda q, k, v, *a, scale, **kw:
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
    torch.manual_seed(0)
    blk = MultiScaleBlock(16, 16, 2, (2, 8, 8), kernel_q=(3, 3, 3), kernel_kv=(3, 3, 3), stride_q=(1, 2, 2),
                          stride_kv=(1, 2, 2), attn_backend="sdpa")
    x = torch.randn(2, 1 + 2 * 64, 16, requires_grad=True)
    blk(x, (2, 8, 8))[0].sum().backward()  # first call: the cached residual mask is built
    with _OpCounter() as fwd:
        y, _ = blk(x, (2, 8, 8))
    with _OpCounter() as bwd:
        y.backward(torch.ones_like(y))
    assert not {"select_backward", "slice_backward", "clone"} & set(bwd.ops), bwd.ops
    assert bwd.ops.count("stack") == 1 and bwd.ops.count("cat") == 4, bwd.ops  # qkv; 3 cls splits, skip pool
    assert fwd.ops.count("addcmul") == 1 and "ones" not in fwd.ops, fwd.ops


def test_residual_mask_cached_under_inference_mode_still_trains():
    """The cached residual-pooling mask may first be made under ``torch.inference_mode`` (evaluation
    before training): it must still be a normal tensor that backward can save."""
    from models.mvit import _cached_rows_after_first

    _cached_rows_after_first.cache_clear()
    blk = MultiScaleBlock(16, 16, 2, (2, 8, 8), kernel_q=(3, 3, 3), kernel_kv=(3, 3, 3), stride_q=(1, 2, 2),
                          stride_kv=(1, 2, 2), attn_backend="sdpa")
    x = torch.randn(2, 1 + 2 * 64, 16)
    with torch.inference_mode():
        blk(x, (2, 8, 8))
    assert _cached_rows_after_first.cache_info().currsize == 1
    y, _ = blk(x.requires_grad_(), (2, 8, 8))
    y.sum().backward()
    assert x.grad is not None and _cached_rows_after_first.cache_info().hits >= 1


def test_official_init_values():
    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "classify", attn_backend="reference")
    blk = m.blocks[0]
    assert torch.all(blk.attn.qkv.bias == 0.02) and torch.all(blk.mlp.fc1.bias == 0.02)
    assert torch.all(blk.norm1.bias == 0.02) and torch.all(blk.norm1.weight == 1.0)
    assert torch.all(blk.attn.norm_q.bias == 0.02)
    assert blk.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    # nn.init.trunc_normal_(std=0.02) truncates at ±2 in absolute units (official call): i.e. a
    # plain normal at this std, values beyond 2σ do occur
    assert blk.attn.qkv.weight.abs().max().item() > 0.04
    assert torch.allclose(m.head.projection.bias, torch.full_like(m.head.projection.bias, 0.02 * 0.001))
    assert m.head.projection.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.3)
    assert torch.all(m.norm.bias == 0.02)
    # drop path increases linearly to the recipe value (tiny: 0 -> 0.0 here); S FT: 0 .. 0.1
    with torch.device("meta"):
        s = create_model("mvitv2_s_16x4", "classify")
    probs = [getattr(b.drop_path, "drop_prob", 0.0) for b in s.blocks]
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.1)
    assert probs == pytest.approx([0.1 * i / 15 for i in range(16)])


def test_pooling_convolutions_get_contiguous_ncdhw_inputs():
    """Every q/k/v pooling conv receives a contiguous (B·nh, hd, T, H, W) tensor, as the official
    code's ``.contiguous()`` gives it, never a channels-last view: torch sends a channels-last
    depthwise conv to cuDNN, where these convolutions took 279 ms of a 416 ms MViTv2-L step on an
    H200 (bench/results/pool_conv_nvidia-h200_20261128.md), against 75 ms contiguous."""
    from models import create_model
    from models.variants import get_variant

    model = create_model("mvitv2_tiny", task="pretrain", attn_backend="sdpa")
    seen = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv3d) and name.rsplit(".", 1)[-1] in ("pool_q", "pool_k", "pool_v"):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(2, 3, *get_variant("mvitv2_tiny").input_size)
    mask = torch.zeros(2, *model.mask_grid(*x.shape[2:]), dtype=torch.bool)
    model(x, mask)
    assert seen and all(seen), seen


def _plain_block(blk, x, thw):
    """The official ``MultiScaleBlock.forward`` in plain ops (the block's own attention module, which
    ``test_attention_matches_the_official_formulation_bitwise`` covers): LayerNorm eps 1e-6, exact
    GELU, DropPath ``x / keep · floor(keep + U)`` drawn once before the attention branch's add and once
    before the MLP's, the max-pooled skip on the non-cls tokens, ``proj`` on norm1 or norm2."""
    import torch.nn.functional as F

    def drop(t):
        if not blk.training or not isinstance(blk.drop_path, nn.Module) or not hasattr(blk.drop_path, "drop_prob"):
            return t
        keep = 1.0 - blk.drop_path.drop_prob
        return t / keep * torch.floor(keep + torch.rand((t.shape[0], 1, 1), dtype=t.dtype))

    dim, dim_out = blk.dim, blk.dim_out
    n1 = F.layer_norm(x, (dim,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    xb, thw_new = blk.attn(n1, thw)
    res = F.linear(n1, blk.proj.weight, blk.proj.bias) if blk.dim_mul_in_att and dim != dim_out else x
    if blk.pool_skip is not None:
        cls, tok = res[:, :1], res[:, 1:]
        B, C = tok.shape[0], tok.shape[-1]
        grid = tok.reshape(B, *thw, C).permute(0, 4, 1, 2, 3)
        p = blk.pool_skip
        pooled = F.max_pool3d(grid, p.kernel_size, p.stride, p.padding)
        res = torch.cat([cls, pooled.flatten(2).transpose(1, 2)], dim=1)
    x = res + drop(xb)
    n2 = F.layer_norm(x, (x.shape[-1],), blk.norm2.weight, blk.norm2.bias, 1e-6)
    m = F.linear(F.gelu(F.linear(n2, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    if not blk.dim_mul_in_att and dim != dim_out:
        x = F.linear(n2, blk.proj.weight, blk.proj.bias)
    return x + drop(m), thw_new


@pytest.mark.parametrize("dim_mul_in_att", [False, True], ids=["maskfeat", "dim_mul_in_att"])
@pytest.mark.parametrize("train", [False, True])
def test_blocks_and_the_mean_pooling_head_against_plain_ops(train, dim_mul_in_att):
    """Every block of a classifier (skip pooling, width changes, drop path 0.5 in training) and the
    MaskFeat fine-tuning head (mean of the non-cls tokens, then LayerNorm, then the projection)
    against the official forward written in plain ops: a LayerNorm eps of 1e-5, a tanh GELU, DropPath
    without its 1/keep, or the norm before the mean passed every other test. Also the supervised
    layout (``dim_mul_in_att``: the shortcut projected from norm1; projecting x passed every test)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "classify", num_classes=5, attn_backend="reference", drop_path_rate=0.5,
                     dim_mul_in_att=dim_mul_in_att)
    assert any(b.dim_mul_in_att for b in m.blocks) == dim_mul_in_att
    m.train(train)
    x0 = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, thw = m.patch_embed(x0)
        x = torch.cat([m.cls_token.expand(2, -1, -1), x], dim=1)
        assert any(b.pool_skip is not None for b in m.blocks) and any(b.dim != b.dim_out for b in m.blocks)
        for blk in m.blocks:
            state = torch.get_rng_state()
            want, want_thw = _plain_block(blk, x, thw)
            torch.set_rng_state(state)  # the block draws its drop-path masks from the same stream
            got, got_thw = blk(x, thw)
            assert got_thw == want_thw
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            x, thw = got, got_thw
        feats, _ = m.forward_features(x0) if not train else (x, None)
        pooled = F.layer_norm(feats[:, 1:].mean(1), (feats.shape[-1],), m.norm.weight, m.norm.bias, 1e-6)
        want = F.linear(pooled, m.head.projection.weight, m.head.projection.bias)
        torch.testing.assert_close(m.head(m.pool(feats)), want, rtol=1e-5, atol=1e-6)
        if not train:
            torch.testing.assert_close(m(x0), want, rtol=1e-5, atol=1e-6)


def test_attention_takes_q_k_v_of_mixed_dtypes(monkeypatch):
    """CUDA autocast runs the pooled k/v's LayerNorm in fp32 while an unpooled q stays bf16: the
    attention refused the mix ("dtypes differ"). The block brings them to one dtype first (here the
    norms are made to return fp32 on the CPU, where autocast keeps them in bf16)."""
    torch.manual_seed(0)
    attn = MultiScaleAttention(16, 16, (2, 8, 8), 2, kernel_q=(1, 1, 1), kernel_kv=(3, 3, 3), stride_q=(1, 1, 1),
                               stride_kv=(1, 2, 2), attn_backend="reference").to(torch.bfloat16)
    assert attn.pool_q is None and attn.norm_k is not None  # q unpooled, k and v pooled and normed
    for norm in (attn.norm_k, attn.norm_v):
        real = norm.forward
        monkeypatch.setattr(norm, "forward", lambda t, real=real: real(t).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, thw = attn(torch.randn(2, 1 + 128, 16).to(torch.bfloat16), (2, 8, 8))
    assert thw == (2, 8, 8) and out.shape == (2, 129, 16) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
