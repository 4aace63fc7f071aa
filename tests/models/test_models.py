"""End-to-end model tests: exact official parameter counts, MaskFeat pre-training, the classifier,
official key names and checkpoint loading, backends, reproducibility (DESIGN §3.2–§3.5)."""
import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from models.checkpoint import load_backbone_into_classifier, load_state_dict_official
from models.maskfeat import MaskFeatOutput, pixel_targets
from models.mvit import resize_rel_pos
from models.variants import TASKS, VARIANTS, count_parameters, create_model

# Counted from the official SlowFast code (issue 3): K400 400 classes, IN-1K 1000 classes.
OFFICIAL_COUNTS = {
    ("mvitv2_s_16x4", "pretrain"): 36_253_356,
    ("mvitv2_l_16x4", "pretrain"): 217_247_580,
    ("mvitv2_s_16x4", "classify"): 36_475_120,
    ("mvitv2_l_16x4", "classify"): 217_578_064,
    ("vit_b_16", "pretrain"): 85_882_476,
    ("vit_b_16", "classify"): 86_567_656,
}
TINY = ("mvitv2_tiny", "mvitv2_tiny_image", "vit_tiny")


def _input(model, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if model.patch_2d:
        return torch.randn(batch, 3, model.input_size[1], model.input_size[2], generator=g, dtype=dtype)
    return torch.randn(batch, 3, *model.input_size, generator=g, dtype=dtype)


def _mask(model, x, ratio=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = model.mask_grid(*x.shape[2:])
    m = torch.rand(x.shape[0], *grid, generator=g) < ratio
    m.view(x.shape[0], -1)[:, 0] = True  # at least one masked token per sample
    return m


def _has_video_hog() -> bool:
    try:
        import kernels.hog as hog

        hog.video_hog_targets(torch.zeros(1, 3, 2, 16, 16))
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------- counts


def test_parameter_counts_match_official_and_print_all():
    counts = {}
    for name in VARIANTS:
        for task in TASKS:
            with torch.device("meta"):
                m = create_model(name, task)
            counts[(name, task)] = count_parameters(m)
            print(f"{name:20s} {task:9s} {counts[(name, task)]:>13,d}")
    for key, want in OFFICIAL_COUNTS.items():
        assert counts[key] == want, f"{key}: {counts[key]:,} != official {want:,}"


def test_python_m_models_prints_the_table_without_a_warning():
    """The README's listing command (``python -m models.variants`` warned that the module was
    imported by its package before it ran)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "models"], capture_output=True,
                          text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{OFFICIAL_COUNTS[('mvitv2_l_16x4', 'classify')]:,}" in proc.stdout and "Warning" not in proc.stderr


def test_big_variants_output_grids_and_meta_forward():
    """Big variants: geometry on the meta device (no memory, no compute)."""
    grids = {
        ("mvitv2_s_16x4", "pretrain"): (8, 14, 14),
        ("mvitv2_s_16x4", "classify"): (8, 7, 7),
        ("mvitv2_l_16x4", "pretrain"): (8, 14, 14),
        ("mvitv2_b_32x3", "classify"): (16, 7, 7),
        ("mvitv2_l_40x3", "pretrain"): (20, 22, 22),
        ("mvitv2_l_40x3", "classify"): (20, 11, 11),
        ("vit_l_16", "pretrain"): (1, 14, 14),
    }
    for (name, task), grid in grids.items():
        with torch.device("meta"):
            m = create_model(name, task)
        assert m.token_grid(VARIANTS[name].input_size) == grid
    with torch.device("meta"):
        pt = create_model("mvitv2_s_16x4", "pretrain", attn_backend="reference")
        x = torch.empty(1, 3, 16, 224, 224)
        tokens, thw = pt.forward_features(x)
        assert thw == (8, 14, 14) and tokens.shape == (1, 1 + 8 * 14 * 14, 768)
        assert pt.pred_head(tokens).shape == (1, 8 * 14 * 14, 108)
        assert pt.mask_grid(16, 224, 224) == (8, 14, 14)
        vit = create_model("vit_b_16", "pretrain")
        assert vit.mask_grid(224, 224) == (14, 14)


# ----------------------------------------------------------------------------- tiny forward/backward


@pytest.mark.parametrize("name", TINY)
def test_tiny_classify_forward_backward(name):
    torch.manual_seed(0)
    m = create_model(name, "classify", attn_backend="reference", drop_path_rate=0.1)
    x = _input(m)
    logits = m(x)
    assert logits.shape == (2, VARIANTS[name].num_classes)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name,size", [("mvitv2_tiny", (16, 64, 96)), ("vit_tiny", (64, 96)),
                                       ("mvitv2_tiny_image", (64, 96))])
def test_predictions_targets_and_mask_line_up(name, size):
    """The official ``_maskfeat_forward`` restated from the model's parts with the official tensor
    operations, on a non-square clip and an asymmetric mask: the mask ``F.interpolate``d to the
    embedding grid, the mask-token mix before cls and the position embedding, the head's LayerNorm,
    cls dropped, the masked rows selected, then the Linear; HOG labels unfolded per token as
    ``_get_hog_label_2d/3d`` do (cells of ``hog_reference`` on the frames ``::2``). The model's
    loss, masked predictions and masked targets must be these: a transposed loss mask, a head that
    drops the wrong token, or the mask token after the position embedding all passed every other
    test."""
    from kernels.hog.reference import hog_reference

    torch.manual_seed(0)
    m = create_model(name, "pretrain", attn_backend="reference").eval()
    B = 2
    x = torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(5))
    grid = m.mask_grid(*size)
    mask = torch.rand(B, *grid, generator=torch.Generator().manual_seed(3)) < 0.4
    with torch.no_grad():
        out = m(x, mask)
        fm = mask.float() if not m.patch_2d else mask.float().unsqueeze(1)  # (B, T', H', W')
        hw = grid[-2:]
        sel = F.interpolate(fm, size=hw).flatten(1).bool()  # the official label mask (B, N')
        frames = x if m.patch_2d else x[:, :, ::2].transpose(1, 2).flatten(0, 1)  # (B·T', 3, H, W)
        cells = hog_reference(frames).flatten(1, 2)  # (B·T', 27, Hc, Wc)
        u = cells.shape[-1] // hw[1]
        labels = cells.permute(0, 2, 3, 1).unfold(1, u, u).unfold(2, u, u).flatten(3)
        labels = labels.reshape(B, -1, labels.shape[-1])[sel]
        xe, thw = m.patch_embed(x)
        f = F.interpolate(fm, size=tuple(thw)[-2:]).flatten(1).unsqueeze(-1)  # T' is the embedding's T
        xe = xe * (1 - f) + m.mask_token.expand(B, xe.shape[1], -1) * f
        xe = torch.cat((m.cls_token.expand(B, -1, -1), xe), 1)
        if m.use_abs_pos:  # the official _get_pos_embed: the grid part trilinearly resized to thw
            s = int(m.cls_embed)
            grid = m.pos_embed[:, s:].reshape(1, *m.patch_dims, -1).permute(0, 4, 1, 2, 3)
            grid = F.interpolate(grid, size=tuple(thw), mode="trilinear").flatten(2).transpose(1, 2)
            xe = xe + torch.cat((m.pos_embed[:, :s], grid), 1)
        for blk in m.blocks:
            xe, thw = blk(xe, thw)
        pred = m.pred_head.projections[0](m.pred_head.transforms[0](xe)[:, 1:][sel])
    assert torch.equal(out.mask, mask.flatten(1)) and torch.equal(sel, out.mask)
    torch.testing.assert_close(out.pred[out.mask], pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.target[out.mask], labels, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, F.mse_loss(pred, labels), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("target", ["pixel", "hog"])
def test_tiny_pretrain_forward_backward_and_mask_token_grad(name, target):
    if target == "hog" and not VARIANTS[name].image and not _has_video_hog():
        pytest.fail("kernels.hog.video_hog_targets does not run (needed for the video HOG target)")
    torch.manual_seed(0)
    m = create_model(name, "pretrain", attn_backend="reference", target=target)
    x = _input(m)
    mask = _mask(m, x)
    out = m(x, mask)
    assert isinstance(out, MaskFeatOutput)
    N = math.prod(m.mask_grid(*x.shape[2:]))
    D = 108 if target == "hog" else 768
    assert out.pred.shape == out.target.shape == (2, N, D)
    assert out.mask.shape == (2, N) and out.mask.dtype == torch.bool
    assert not out.target.requires_grad
    # loss = mean over all elements of the masked tokens
    want = (out.pred[out.mask] - out.target[out.mask]).pow(2).mean()
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_bad_mask_and_input_shapes_raise():
    m = create_model("mvitv2_tiny", "pretrain", attn_backend="reference", target="pixel")
    x = _input(m)
    with pytest.raises(ValueError, match="output grid"):
        m(x, torch.zeros(2, 8, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="output grid"):
        m(x, torch.zeros(2, 8, 4, 4))  # not bool
    with pytest.raises(ValueError, match="expected a 5-D input"):
        m(x[:, :, 0], torch.zeros(2, 4, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- masking semantics


def test_vit_masked_pixels_do_not_reach_predictions():
    torch.manual_seed(0)
    m = create_model("vit_tiny", "pretrain", attn_backend="reference", target="pixel").eval()
    x = _input(m, batch=1)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 3, 0] = True
    y = x.clone()
    y[..., 16:32, 32:48] = torch.randn(1, 3, 16, 16)  # patch (1, 2): masked
    y[..., 48:64, 0:16] += 5.0  # patch (3, 0): masked
    with torch.no_grad():
        a, b = m(x, mask).pred, m(y, mask).pred
    assert torch.equal(a, b)
    z = x.clone()
    z[..., 0:16, 0:16] += 1.0  # visible patch (0, 0): changes predictions
    with torch.no_grad():
        assert not torch.allclose(a, m(z, mask).pred)


def test_mvit_masked_pixels_beyond_patch_kernel_reach_do_not_reach_predictions():
    """Patch conv (3,7,7)/(2,4,4)/(1,3,3): embed token (t,h,w) sees frames 2t−1..2t+1 and rows
    4h−3..4h+3. Masking output tokens t'∈{1,2}, h',w'∈{1,2} masks embed tokens t∈{1,2},
    h,w∈4..11; pixels only those tokens see are frames 2..4, rows/cols 16..44."""
    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "pretrain", attn_backend="reference", target="pixel").eval()
    x = _input(m, batch=1)
    mask = torch.zeros(1, 8, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3, 1:3] = True
    y = x.clone()
    y[:, :, 2:5, 16:45, 16:45] = torch.randn(1, 3, 3, 29, 29)
    with torch.no_grad():
        a, b = m(x, mask).pred, m(y, mask).pred
    assert torch.equal(a, b)
    # one step outside the region reaches a visible token: predictions change
    for sl in ((slice(5, 6), slice(16, 45), slice(16, 45)), (slice(2, 5), slice(45, 46), slice(16, 45)),
               (slice(1, 2), slice(16, 45), slice(16, 45))):
        z = x.clone()
        z[:, :, sl[0], sl[1], sl[2]] += 3.0
        with torch.no_grad():
            assert not torch.allclose(a, m(z, mask).pred)


def test_pixel_target_layout_matches_official():
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 32, 48)
    t = pixel_targets(video, 16, temporal_stride=2)  # tokens (t, h, w) = (2, 2, 3)
    assert t.shape == (2, 12, 768)
    tok = 1 * 6 + 1 * 3 + 2  # t=1, h=1, w=2
    patch = video[1, :, 2, 16:32, 32:48].permute(1, 2, 0).reshape(-1)  # (py, px, c)
    want = (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5
    torch.testing.assert_close(t[1, tok], want)
    img = torch.randn(2, 3, 32, 32)
    ti = pixel_targets(img, 16)
    patch = img[0, :, 16:32, 0:16].reshape(-1)  # (c, py, px)
    torch.testing.assert_close(ti[0, 2], (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5)


def test_hog_target_uses_strided_frames_and_raw_frames_path():
    if not _has_video_hog():
        pytest.fail("kernels.hog.video_hog_targets does not run (needed for the video HOG target)")
    import kernels.hog as hog

    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "pretrain", attn_backend="reference")
    frames = torch.randint(0, 256, (2, 3, 16, 64, 64), dtype=torch.uint8)
    mean = torch.tensor([0.45, 0.45, 0.45]).view(1, 3, 1, 1, 1) * 255
    video = (frames.float() - mean) / (0.225 * 255)
    mask = _mask(m, video)
    out = m(video, mask, frames=frames)
    per_frame = hog.hog_targets(frames[:, :, ::2].transpose(1, 2).reshape(16, 3, 64, 64), token_stride=16)
    torch.testing.assert_close(out.target, per_frame.reshape(2, 8 * 16, 108))
    # HOG of the normalised video equals HOG of raw frames up to eps/rounding
    out_norm = m(video, mask)
    assert (out_norm.target - out.target).abs().mean() < 1e-3


@pytest.mark.parametrize("opts", [dict(hog_norm="none"), dict(hog_signed=True, hog_gaussian_window=16)])
def test_hog_ablation_options_reach_the_targets(opts):
    """The HOG ablations (normalisation off, signed, Gaussian window) are model options whose
    targets equal kernels.hog with the same options, and differ from the official default."""
    import kernels.hog as hog

    m = create_model("mvitv2_tiny", "pretrain", attn_backend="reference", **opts)
    frames = torch.randint(0, 256, (1, 3, 16, 64, 64), dtype=torch.uint8)
    mask = _mask(m, frames.float())
    target = m(frames.float(), mask, frames=frames).target
    kw = dict(norm=opts.get("hog_norm", "cell_l2"), signed=opts.get("hog_signed", False),
              gaussian_window=opts.get("hog_gaussian_window", 0))
    torch.testing.assert_close(target, hog.video_hog_targets(frames, token_stride=16, **kw))
    assert not torch.allclose(target, hog.video_hog_targets(frames, token_stride=16))
    with pytest.raises(ValueError, match="hog_norm"):
        create_model("mvitv2_tiny", "pretrain", hog_norm="l1")


@pytest.mark.parametrize("name", ["mvitv2_tiny", "vit_tiny"])
@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_targets_under_cpu_autocast_are_fp32_and_unchanged(name, target):
    """Regression: under torch.autocast the reference HOG's Sobel conv ran in bf16 and its
    scatter_add_ into the fp32 histogram raised a dtype error on every MaskFeat forward. Targets
    are computed in fp32 with autocast off, so they equal the targets without autocast."""
    torch.manual_seed(0)
    m = create_model(name, "pretrain", attn_backend="reference", target=target)
    x = _input(m, batch=1)
    mask = _mask(m, x)
    want = m(x, mask).target
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, mask)
    assert out.target.dtype == torch.float32
    torch.testing.assert_close(out.target, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mvitv2_tiny", "vit_tiny"])
def test_pixel_target_uses_normalised_video_not_raw_frames(name):
    """Regression: ``frames`` (raw pixels for the HOG target) also fed the pixel target, whose
    per-patch normalisation spans the three channels and so is not invariant to per-channel
    mean/std; the official pixel label uses the normalised input, whatever ``frames`` holds."""
    torch.manual_seed(0)
    m = create_model(name, "pretrain", attn_backend="reference", target="pixel")
    shape = (1, 3, *m.input_size) if not m.patch_2d else (1, 3, *m.input_size[1:])
    frames = torch.randint(0, 256, shape, dtype=torch.uint8)
    ch = (1, 3) + (1,) * (len(shape) - 2)
    video = (frames.float() - torch.tensor([0.485, 0.456, 0.406]).view(ch) * 255) / (
        torch.tensor([0.229, 0.224, 0.225]).view(ch) * 255
    )
    mask = _mask(m, video)
    want = m(video, mask).target
    for raw in (frames, frames.float(), frames.float() / 255):
        torch.testing.assert_close(m(video, mask, frames=raw).target, want, rtol=0, atol=0)
    torch.testing.assert_close(want, pixel_targets(video, 16, m.temporal_stride))
    # the normalised clip at a higher precision than the (bf16) model input is used as it is
    exact = m.compute_targets(video.to(torch.bfloat16), video)
    torch.testing.assert_close(exact, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- backends, reproducibility


@contextlib.contextmanager
def _attention_backends(monkeypatch):
    """The ``backend=`` of every ``relpos_attention`` call the model makes inside the block (so a
    backend switch that did not reach the blocks cannot pass as agreement)."""
    import models.mvit

    seen, real = [], models.mvit.relpos_attention

    def spy(*args, backend, **kw):
        seen.append(backend)
        return real(*args, backend=backend, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(models.mvit, "relpos_attention", spy)
        yield seen


@pytest.mark.parametrize("task", TASKS)
def test_reference_and_sdpa_backends_agree(task, monkeypatch):
    import kernels.attention.sdpa  # noqa: F401 - a product module: its import failing is a failure, not a skip

    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", task, attn_backend="reference", target="pixel").double()
    x = _input(m, dtype=torch.float64)
    mask = _mask(m, x) if task == "pretrain" else None

    def run():
        m.zero_grad()
        out = m(x, mask).loss if task == "pretrain" else m(x).square().sum()
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    with _attention_backends(monkeypatch) as seen:
        ref, gref = run()
        m.set_attn_backend("sdpa")
        got, ggot = run()
    assert seen and set(seen[: len(seen) // 2]) == {"reference"} and set(seen[len(seen) // 2:]) == {"sdpa"}, seen
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for n in gref:
        torch.testing.assert_close(ggot[n], gref[n], rtol=1e-9, atol=1e-12, msg=n)


def test_seeded_construction_and_forward_are_reproducible():
    def build():
        torch.manual_seed(123)
        return create_model("mvitv2_tiny", "pretrain", attn_backend="reference", target="pixel")

    a, b = build(), build()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = _input(a)
    mask = _mask(a, x)
    oa, ob = a(x, mask), b(x, mask)
    assert torch.equal(oa.pred, ob.pred) and torch.equal(oa.loss, ob.loss)
    torch.manual_seed(124)
    c = create_model("mvitv2_tiny", "pretrain", attn_backend="reference", target="pixel")
    assert not torch.equal(c.state_dict()["blocks.0.attn.qkv.weight"], sa["blocks.0.attn.qkv.weight"])


def test_blocks_can_be_checkpointed_from_outside(monkeypatch):
    """The engine wraps ``blocks[i]``; ``block(x, thw) -> (x, thw)`` is a pure function."""

    class Ckpt(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, thw):
            return torch.utils.checkpoint.checkpoint(self.module, x, thw, use_reentrant=False)

    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "classify", attn_backend="reference")
    x = _input(m)
    ref = m(x)
    ref.square().sum().backward()
    gref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for i in range(len(m.backbone.blocks)):
        m.backbone.blocks[i] = Ckpt(m.backbone.blocks[i])
    out = m(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, gref[n.replace(".module.", ".")], msg=n)
    m.set_attn_backend("sdpa")  # reaches through the wrappers
    with _attention_backends(monkeypatch) as seen, torch.no_grad():
        m(x)
    assert seen and set(seen) == {"sdpa"}, seen
    assert m.token_grid(m.input_size) == (8, 2, 2)


# ----------------------------------------------------------------------------- official keys, loading


def _official_tiny_keys(task: str) -> set:
    """Official MaskMViT/MViT key names for mvitv2_tiny (4 blocks, width x2 at blocks 1, 2, 3,
    DIM_MUL_IN_ATT False so blocks 0, 1, 2 carry the shortcut ``proj``; every block pools Q/K/V)."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token"}
    for i in range(4):
        b = f"blocks.{i}."
        keys |= {b + f"{n}.{p}" for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2", "attn.qkv", "attn.proj") for p in ("weight", "bias")}
        keys |= {b + f"attn.pool_{n}.weight" for n in "qkv"}
        keys |= {b + f"attn.norm_{n}.{p}" for n in "qkv" for p in ("weight", "bias")}
        keys |= {b + f"attn.rel_pos_{n}" for n in "thw"}
        if i < 3:
            keys |= {b + "proj.weight", b + "proj.bias"}
    if task == "pretrain":
        keys |= {"mask_token", "pred_head.transforms.0.0.weight", "pred_head.transforms.0.0.bias",
                 "pred_head.projections.0.weight", "pred_head.projections.0.bias"}
    else:
        keys |= {"norm.weight", "norm.bias", "head.projection.weight", "head.projection.bias"}
    return keys


@pytest.mark.parametrize("task", TASKS)
def test_state_dict_keys_are_official_and_load_strictly(task):
    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", task, attn_backend="reference")
    assert set(m.state_dict()) == _official_tiny_keys(task)
    torch.manual_seed(1)
    src = create_model("mvitv2_tiny", task, attn_backend="reference")
    ckpt = {"epoch": 1, "model_state": {"module." + k: v for k, v in src.state_dict().items()}, "cfg": ""}
    rep = load_state_dict_official(m, ckpt, strict=True)
    assert rep.missing == [] and rep.unexpected == [] and rep.resized == []
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    bad = dict(src.state_dict())
    bad["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected"):
        load_state_dict_official(m, bad, strict=True)


def test_load_state_dict_official_accepts_official_pretrain_pyth_with_hog_buffers(tmp_path):
    """Regression: the official MaskMViT keeps its HOGLayerC filters as persistent buffers
    (``hogs.0.weight_x``, ``hogs.0.weight_y``); strict loading of its .pyth raised "Unexpected
    key(s)". They hold fixed Sobel filters our HOG computes itself, so they are dropped."""
    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "pretrain", attn_backend="reference")
    torch.manual_seed(1)
    src = create_model("mvitv2_tiny", "pretrain", attn_backend="reference")
    wx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    state = dict(src.state_dict(), **{"hogs.0.weight_x": wx, "hogs.0.weight_y": wx.transpose(2, 3)})
    path = tmp_path / "checkpoint_epoch_00300.pyth"
    torch.save({"epoch": 300, "model_state": state, "optimizer_state": {}, "cfg": ""}, path)
    rep = load_state_dict_official(m, path, strict=True)
    assert rep.missing == [] and rep.unexpected == [] and rep.resized == []
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_official_shapes_of_s16x4_pretrain_keys():
    with torch.device("meta"):
        m = create_model("mvitv2_s_16x4", "pretrain")
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert sd["patch_embed.proj.weight"] == (96, 3, 3, 7, 7)
    assert sd["cls_token"] == (1, 1, 96) and sd["mask_token"] == (1, 1, 96)
    assert sd["blocks.1.attn.pool_q.weight"] == (96, 1, 3, 3, 3)
    assert sd["blocks.14.attn.pool_q.weight"] == (96, 1, 3, 3, 3)  # stride 1 in PT, kept
    assert sd["blocks.0.attn.rel_pos_h"] == (111, 96) and sd["blocks.0.attn.rel_pos_t"] == (15, 96)
    assert sd["pred_head.transforms.0.0.weight"] == (768,)
    assert sd["pred_head.projections.0.weight"] == (108, 768)
    assert "norm.weight" not in sd and "head.projection.weight" not in sd
    assert len(m.blocks) == 16  # PRETRAIN_DEPTH 15 keeps blocks 0..15


def test_pretrain_depth_truncates_blocks():
    m = create_model("mvitv2_tiny", "pretrain", attn_backend="reference", pretrain_depth=2, target="pixel")
    assert len(m.blocks) == 3
    x = _input(m)
    assert m(x, _mask(m, x)).pred.shape == (2, 8 * 4 * 4, 768)


def _offset_rows(q_len: int, k_len: int) -> torch.Tensor:
    """Each row of a table for a (q_len, k_len) axis: its offset ``i − j`` in units of the finer grid
    (the table index of DESIGN §3.5, through the reference's ``rel_pos_index``; unused rows NaN)."""
    from kernels.attention.reference import rel_pos_index

    fine = max(q_len, k_len)
    idx = rel_pos_index(q_len, k_len)
    out = torch.full((2 * fine - 1,), float("nan"))
    for i in range(q_len):
        for j in range(k_len):  # positions in fine units: q i·(fine/Q), k j·(fine/K)
            out[idx[i, j]] = i * (fine // q_len) - j * (fine // k_len)
    return out


@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_tiny_image"])
def test_classifier_loads_pretrain_backbone_with_the_offsets_of_its_grid(name):
    """depth 5: block 4 follows the last stage, so its tables differ between PT (q 4x4, kv 2x2: 7 rows)
    and FT (q 2x2, kv 2x2: 3 rows). A linear resize of the table (what an earlier version of this test
    compared with: the loader against itself) put PT's +1 offset at FT's offset 0. Each PT row now
    holds its offset, and each FT row must hold its own, counted in PT's finer units."""
    torch.manual_seed(0)
    pt = create_model(name, "pretrain", attn_backend="reference", depth=5)
    ft = create_model(name, "classify", attn_backend="reference", depth=5)
    axes = ["h", "w"] + ([] if "image" in name else ["t"])
    with torch.no_grad():
        for a in axes:
            table = getattr(pt.blocks[4].attn, f"rel_pos_{a}")
            q = 4 if a != "t" else table.shape[0] // 2 + 1  # (t: the same length on both sides)
            rows = _offset_rows(q, 2) if a != "t" else torch.arange(table.shape[0], dtype=torch.float32)
            table.copy_(rows.nan_to_num(99.0)[:, None].expand_as(table))
    head_before = ft.head.projection.weight.clone()
    rep = load_backbone_into_classifier(ft, {"model_state": pt.state_dict()})
    assert sorted(rep.missing) == ["head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]
    assert rep.unexpected == []
    assert sorted(rep.resized) == ["blocks.4.attn.rel_pos_h", "blocks.4.attn.rel_pos_w"]
    assert pt.blocks[4].attn.rel_pos_h.shape[0] == 7 and ft.blocks[4].attn.rel_pos_h.shape[0] == 3
    for a in ("h", "w"):
        got = getattr(ft.blocks[4].attn, f"rel_pos_{a}")
        assert torch.equal(got, got[:, :1].expand_as(got))
        assert got[:, 0].tolist() == (2 * _offset_rows(2, 2)).tolist() == [-2.0, 0.0, 2.0]
    # an export of the backbone has no mask_token or pred_head: still a pre-training checkpoint
    ft2 = create_model(name, "classify", attn_backend="reference", depth=5)
    export = {k: v for k, v in pt.state_dict().items() if not k.startswith(("mask_token", "pred_head."))}
    load_backbone_into_classifier(ft2, export)
    assert torch.equal(ft2.blocks[4].attn.rel_pos_h, ft.blocks[4].attn.rel_pos_h)
    # another resolution on top: the grid's rows first, then the linear resize of the rest; also at twice
    # the resolution, where the classifier's table is as long as pre-training's (it was loaded as it was)
    for size in (96, 128):
        ft3 = create_model(name, "classify", attn_backend="reference", depth=5, img_size=size)  # 5, 7 rows
        load_backbone_into_classifier(ft3, export)
        torch.testing.assert_close(ft3.blocks[4].attn.rel_pos_h,
                                   resize_rel_pos(ft.blocks[4].attn.rel_pos_h, ft3.blocks[4].attn.rel_pos_h.shape[0]))
    # a classifier's checkpoint without its head (its geometry, not its keys, says it is no pre-training's)
    big = create_model(name, "classify", attn_backend="reference", depth=5, img_size=128)
    headless = {k: v for k, v in big.state_dict().items() if not k.startswith("head.")}
    ft4 = create_model(name, "classify", attn_backend="reference", depth=5)
    load_backbone_into_classifier(ft4, headless)
    torch.testing.assert_close(ft4.blocks[4].attn.rel_pos_h, resize_rel_pos(big.blocks[4].attn.rel_pos_h, 3))
    psd, fsd = pt.state_dict(), ft.state_dict()
    for k in fsd:
        if k in psd and k not in rep.resized:
            assert torch.equal(fsd[k], psd[k]), k
    assert torch.equal(ft.head.projection.weight, head_before)
    assert ft(_input(ft)).shape == (2, 10)


def test_vit_classifier_loads_pos_embed_at_new_resolution():
    torch.manual_seed(0)
    pt = create_model("vit_tiny", "pretrain", attn_backend="reference")
    ft = create_model("vit_tiny", "classify", attn_backend="reference", img_size=96)
    with torch.no_grad():  # rows and columns told apart: channel 0 the row, channel 1 the column
        grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
        pt.pos_embed[0, 1:, :2] = grid
    rep = load_backbone_into_classifier(ft, pt.state_dict())
    assert rep.resized == ["pos_embed"] and ft.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(ft.pos_embed[:, 0], pt.pos_embed[:, 0])
    want = F.interpolate(pt.pos_embed[:, 1:].reshape(1, 1, 4, 4, 64).permute(0, 4, 1, 2, 3), size=(1, 6, 6),
                         mode="trilinear").flatten(2).transpose(1, 2)
    torch.testing.assert_close(ft.pos_embed[:, 1:], want)
    rows, cols = ft.pos_embed[0, 1:, 0].reshape(6, 6), ft.pos_embed[0, 1:, 1].reshape(6, 6)
    assert (rows.diff(dim=0) > 0).all() and rows.diff(dim=1).abs().max() < 1e-5  # rows stay rows
    torch.testing.assert_close(cols, rows.t())
    assert ft(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_create_model_errors_name_closest_choices():
    with pytest.raises(ValueError, match="mvitv2_s_16x4"):
        create_model("mvitv2_s16x4")
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("mvitv2_tiny", "classify", drop_path=0.1)
    with pytest.raises(ValueError, match="task"):
        create_model("mvitv2_tiny", "finetune")
    with pytest.raises(ValueError, match="target"):
        create_model("mvitv2_tiny", "pretrain", target="depth")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mvitv2_tiny", "pretrain", num_classes=10)
    m = create_model("mvitv2_tiny", "classify", num_classes=7, attn_backend="reference")
    assert m.head.projection.out_features == 7


@pytest.mark.parametrize("overrides", [{"dim_mul_in_att": True}, {"img_size": 112}], ids=["dim_mul_in_att", "112px"])
def test_tiny_mvit_other_modes_forward_backward(overrides):
    """Supervised-style width change in attention; a resolution whose pooled grids differ from the
    nominal table sizes (tables interpolated at run time like the official ``get_rel_pos``)."""
    torch.manual_seed(0)
    m = create_model("mvitv2_tiny", "classify", attn_backend="reference", **overrides)
    x = _input(m, batch=1)
    logits = m(x)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    if overrides.get("dim_mul_in_att"):
        assert m.blocks[1].attn.qkv.weight.shape == (3 * 64, 32) and m.blocks[1].proj.weight.shape == (64, 32)
    else:
        assert m.token_grid(m.input_size) == (8, 4, 4)


# ----------------------------------------------------------------------------- found by the
# comparison against the official SlowFast code (outputs agree to ~1e-14 in float64 otherwise)


def test_drop_path_rates_are_the_official_float32_linspace():
    """Bug: the rates were computed in float64 (``rate·i/(depth−1)``) while the official code takes
    ``[x.item() for x in torch.linspace(0, rate, depth)]`` (float32 values). The last S block got 0.1
    instead of float32(0.1) = 0.10000000149011612, and training-mode outputs under the same RNG
    stream differed from the official ones by ~1e-8 (float64)."""
    with torch.device("meta"):  # the rates must also be computed under a meta device context
        m = create_model("mvitv2_s_16x4", "classify")
    assert isinstance(m.blocks[0].drop_path, nn.Identity)  # rate 0 -> no DropPath, like the official
    rates = [b.drop_path.drop_prob for b in m.blocks[1:]]
    assert rates[-1] == 0.10000000149011612
    for i, r in enumerate(rates, start=1):
        assert r == float(torch.tensor(r, dtype=torch.float32))  # a float32 value
        assert abs(r - 0.1 * i / 15) < 1e-8


def test_mvitv2_b_classifier_head_is_the_supervised_official_one():
    """Bug: ``mvitv2_b_32x3`` (the supervised ``Kinetics/MVITv2_B_32x3.yaml``) used the MaskFeat
    fine-tuning head (mean pooling, init scale 0.001, no dropout); the official config has
    ``USE_MEAN_POOLING`` False (norm, then the cls token), ``HEAD_INIT_SCALE`` 1.0 and
    ``DROPOUT_RATE`` 0.5, so the official checkpoint gave different outputs."""
    torch.manual_seed(0)
    m = create_model("mvitv2_b_32x3", "classify", num_frames=4, img_size=32, attn_backend="reference").eval()
    assert not m.use_mean_pooling and m.head.dropout.p == 0.5
    assert torch.all(m.head.projection.bias == 0.02)  # official Linear bias init 0.02, times scale 1.0
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        feats, _ = m.forward_features(x)
        logits = m(x)
        torch.testing.assert_close(logits, m.head.projection(m.norm(feats)[:, 0]), rtol=0, atol=0)
        feats2 = feats.clone()
        feats2[:, 1:] = torch.randn_like(feats2[:, 1:])  # patch tokens do not reach the logits
        torch.testing.assert_close(m.head.projection(m.norm(feats2)[:, 0]), logits, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_temporal_only_relative_positions_are_applied(backend):
    """Bug: with ``rel_pos_spatial=False, rel_pos_temporal=True`` (allowed by the official code, no
    recipe uses it) the temporal table was created but ignored (no bias, no gradient); the official
    ``MultiScaleAttention`` adds ``cal_rel_pos_temporal`` on its own. Expected: the same outputs as
    a model with all three tables whose spatial tables are zero."""
    from models.classifier import Classifier
    from models.variants import backbone_kwargs, get_variant

    kw = backbone_kwargs(get_variant("mvitv2_tiny"), "classify")
    kw.update(attn_backend=backend, drop_path_rate=0.0)
    torch.manual_seed(0)
    t_only = Classifier(num_classes=10, **dict(kw, rel_pos_spatial=False, rel_pos_temporal=True))
    both = Classifier(num_classes=10, **kw)
    state = dict(t_only.state_dict())
    for k, v in both.state_dict().items():
        if k.endswith(("rel_pos_h", "rel_pos_w")):
            state[k] = torch.zeros_like(v)
    both.load_state_dict(state, strict=True)
    x = _input(t_only, batch=1)
    out, _ = t_only.forward_features(x)  # (B, 1 + N, D) final tokens
    torch.testing.assert_close(out, both.forward_features(x)[0], rtol=1e-5, atol=1e-5)
    out.sum().backward()
    grad = t_only.blocks[0].attn.rel_pos_t.grad
    assert grad is not None and grad.abs().sum() > 0



def _loss_and_grads(m, x, mask, task):
    m.zero_grad()
    out = m(x, mask).loss if task == "pretrain" else m(x).square().mean()
    out.backward()
    return out.detach().double(), {n: p.grad.double().clone() for n, p in m.named_parameters() if p.grad is not None}


def _check_triton_backend_in_the_model(task, device, monkeypatch):
    """The fused attention kernel inside MViTv2 (pooled, non-contiguous q/k/v, cls token, every
    block's geometry): the loss and every parameter gradient are no further from a
    higher-precision oracle than 2x the reference attention's own error in the same dtype, plus
    1e-6 of the largest gradient; where the oracle's gradient itself is below that (it cancels to ~0:
    norm_k's bias shifts every key alike, which no softmax sees), both errors are rounding noise and
    the floor is eps/100 of the largest gradient, eps that of the dtype (in bf16 on an H200 the
    kernel's noise there was 2.1e-5 of the largest gradient, the reference's 3.7e-6). fp32 in the
    interpreter (float64 oracle); bf16 with ``auto``, which picks the kernel on an sm_90 GPU, and
    with ``triton`` on another GPU (fp32 oracle).
    A 0.1 % error in the kernel's softmax temperature fails it (checked by hand)."""
    import copy

    torch.manual_seed(0)
    base = create_model("mvitv2_tiny", task, attn_backend="reference", target="pixel", drop_path_rate=0.0).to(device)
    low, high = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32, torch.float64)
    m = copy.deepcopy(base).to(low)
    oracle_model = copy.deepcopy(m).to(high)  # the same (rounded) weights
    x = _input(m).to(device, low)
    mask = _mask(m, x.cpu()).to(device) if task == "pretrain" else None
    oracle, g_oracle = _loss_and_grads(oracle_model, x.to(high), mask, task)
    ref, g_ref = _loss_and_grads(m, x, mask, task)
    from kernels import tuned_for

    backend = "auto" if device.type == "cuda" and tuned_for(device) else "triton"
    m.set_attn_backend(backend)
    with _attention_backends(monkeypatch) as seen:
        got, g_got = _loss_and_grads(m, x, mask, task)
    assert seen and set(seen) == {backend}, seen  # the switch reached every block
    assert (got - oracle).abs() <= 2 * (ref - oracle).abs() + 1e-6 * oracle.abs(), (got, ref, oracle)
    scale = max(g.abs().max() for g in g_oracle.values())
    for n, g in g_oracle.items():
        err, ref_err = (g_got[n] - g).abs().max(), (g_ref[n] - g).abs().max()
        floor = 1e-6 * scale if g.abs().max() > 1e-6 * scale else max(1e-6, torch.finfo(low).eps / 100) * scale
        assert err <= 2 * ref_err + floor, f"{n}: error {err:.3g} vs the reference's {ref_err:.3g}"


@pytest.mark.parametrize("task", TASKS)
def test_triton_backend_agrees_with_reference_in_the_model(task, device, monkeypatch):
    if device.type == "cuda":
        pytest.skip("on a CUDA machine the kernels are compiled, not interpreted: see the GPU test below")
    _check_triton_backend_in_the_model(task, device, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("task", TASKS)
def test_gpu_auto_backend_agrees_with_reference_in_the_model_bf16(task, monkeypatch):
    _check_triton_backend_in_the_model(task, torch.device("cuda"), monkeypatch)


def test_a_checkpoint_of_the_other_dim_mul_in_att_says_so():
    """A supervised MViTv2 checkpoint (DIM_MUL_IN_ATT) into the MaskFeat layout listed 15 tensors of other
    shapes, with no hint (the hint compared the embed dim and the block count only)."""
    with torch.device("meta"):
        states = {att: create_model("mvitv2_tiny", "classify", num_classes=5, dim_mul_in_att=att).state_dict()
                  for att in (False, True)}
    for att, want in ((False, "set model.overrides.dim_mul_in_att=true"), (True, "dim_mul_in_att=false")):
        model = create_model("mvitv2_tiny", "classify", num_classes=5, dim_mul_in_att=att)
        with pytest.raises(ValueError, match=want) as e:
            load_backbone_into_classifier(model, {k: torch.zeros(v.shape) for k, v in states[not att].items()})
        assert "another model size" not in str(e.value)


def test_a_vit_refuses_attention_backends_it_cannot_use():
    """A ViT has no relative positions: its attention is SDPA or the reference. ``triton`` or
    ``xformers`` (or a misspelt name through ``set_attn_backend``) ran SDPA silently, so a backend
    comparison on a ViT gave the same numbers; MViT refused the same request."""
    with pytest.raises(ValueError, match=r"vit_tiny: attn_backend='triton' does nothing: a ViT has no relative"):
        create_model("vit_tiny", "classify", num_classes=3, attn_backend="triton")
    vit = create_model("vit_tiny", "classify", num_classes=3)
    with pytest.raises(ValueError, match=r"\('auto', 'reference', 'sdpa'\) \(no relative positions here\), got 'xformers'"):
        vit.set_attn_backend("xformers")
    vit.set_attn_backend("reference")
    mvit = create_model("mvitv2_tiny", "classify", num_classes=3)
    with pytest.raises(ValueError, match=r"attn_backend must be one of .*'triton'\), got 'trition'"):
        mvit.set_attn_backend("trition")


@pytest.mark.parametrize("name,shape", [("mvitv2_tiny", (0, 3, 8, 64, 64)), ("vit_tiny", (0, 3, 64, 64)),
                                        ("mvitv2_tiny_image", (0, 3, 64, 64))])
def test_an_empty_batch_goes_through(name, shape):
    """B = 0 (the kernels take it): the model's reshapes inferred a -1 from 0 elements and failed."""
    clf = create_model(name, "classify", num_classes=4)
    assert clf(torch.zeros(shape)).shape == (0, 4)
    pre = create_model(name, "pretrain")
    grid = pre.mask_grid(*shape[2:])
    assert pre(torch.zeros(shape), torch.zeros((0, *grid), dtype=torch.bool)).loss.item() == 0.0


def test_q_k_v_of_mixed_dtypes_are_brought_to_one():
    """CUDA autocast runs the pooled q/k/v's LayerNorm in fp32 while an unpooled one stays bf16: the
    attention refused the mix. Under autocast fp32 ones take its dtype; otherwise the widest."""
    from models.mvit import same_dtype

    a, b = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    assert [t.dtype for t in same_dtype(a, b, b)] == [torch.float32] * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in same_dtype(a, b, a)] == [torch.bfloat16] * 3
    same = same_dtype(a, a, a)
    assert all(t is a for t in same)  # nothing to do: no copy


def test_hog_signed_must_be_a_bool():
    """``model.overrides.hog_signed=1`` (or ``yes``, a string in YAML 1.2) built, and the first
    training step's targets refused it (a traceback on every rank after the set-up)."""
    for bad in (1, "yes"):
        with pytest.raises(ValueError, match=r"mvitv2_tiny: hog_signed must be true or false"):
            create_model("mvitv2_tiny", "pretrain", hog_signed=bad)
