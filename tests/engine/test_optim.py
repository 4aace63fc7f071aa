"""AdamW groups (weight decay, layer decay), the LR schedule, mixup/cutmix, soft-target CE,
multi-view evaluation and engine-side activation checkpointing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.distributed import apply_activation_checkpointing
from engine.finetune import evaluate, mix_batch, one_hot_smoothed, soft_target_cross_entropy
from engine.optim import build_optimizer, layer_id, lr_at_step, param_groups, set_lr
from models.variants import create_model


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return create_model("mvitv2_tiny", task="classify", num_classes=5, num_frames=4, img_size=32)


@pytest.fixture(scope="module")
def pretrainer():
    torch.manual_seed(0)
    return create_model("mvitv2_tiny", task="pretrain", num_frames=4, img_size=32)


def _where(groups, name):
    for g in groups:
        if name in g["names"]:
            return g
    raise KeyError(name)


def test_weight_decay_rules_follow_the_official_code(pretrainer):
    groups = param_groups(pretrainer, 0.05)
    assert len(groups) == 2  # merged by (lr scale, weight decay)
    names = dict(pretrainer.named_parameters())
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    for n, p in names.items():
        if n.endswith(".bias") or p.ndim == 1:
            assert n not in decayed, n  # biases, norms and other 1-D parameters
        else:
            assert n in decayed, n
    # the tokens and relative-position tables ARE decayed (ZERO_DECAY_POS_CLS is off in MaskFeat)
    assert {"cls_token", "mask_token"} <= decayed
    assert any(n.endswith("attn.rel_pos_h") for n in decayed) and any(n.endswith("attn.rel_pos_t") for n in decayed)
    assert not any("norm" in n and n.endswith("weight") for n in decayed)
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_layer_ids():
    assert layer_id("cls_token", 16) == 0
    assert layer_id("mask_token", 16) == 0
    assert layer_id("patch_embed.proj.weight", 16) == 0
    assert layer_id("pos_embed_spatial", 16) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 16) == 1
    assert layer_id("module.backbone.blocks.15.mlp.fc2.bias", 16) == 16
    assert layer_id("norm.weight", 16) == 17 and layer_id("head.projection.weight", 16) == 17
    with pytest.raises(ValueError, match="depth"):
        layer_id("blocks.16.norm1.weight", 16)


def test_layer_decay_scales_and_merging(classifier):
    ld, depth = 0.75, len(classifier.blocks)
    groups = param_groups(classifier, 0.05, layer_decay=ld)
    assert len(groups) <= 2 * (depth + 2)
    assert _where(groups, "cls_token")["lr_scale"] == pytest.approx(ld ** (depth + 1))
    assert _where(groups, "patch_embed.proj.weight")["lr_scale"] == pytest.approx(ld ** (depth + 1))
    for i in range(depth):
        g = _where(groups, f"blocks.{i}.mlp.fc1.weight")
        assert g["lr_scale"] == pytest.approx(ld ** (depth - i)) and g["weight_decay"] == 0.05
        assert _where(groups, f"blocks.{i}.mlp.fc1.bias")["weight_decay"] == 0.0
    assert _where(groups, "head.projection.weight")["lr_scale"] == 1.0
    opt = build_optimizer(groups, lr=1e-3)
    set_lr(opt.param_groups, 2e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"])
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def _official(e, base, end, start, warm, epochs, after=True):
    """SlowFast lr_policy written independently: cosine + linear warm-up on fractional epochs."""
    def cos(x):
        off = warm if after else 0.0
        return end + (base - end) * (math.cos(math.pi * (x - off) / (epochs - off)) + 1.0) * 0.5
    if e < warm:
        return start + (cos(warm) - start) / warm * e
    return cos(e)


@pytest.mark.parametrize("after", [True, False])
def test_lr_schedule_matches_the_official_policy(after):
    spe, base, kw = 10, 1e-3, dict(epochs=30, warmup_epochs=3, warmup_start_lr=1e-6, end_lr=1e-5)
    lrs = [lr_at_step(s, spe, peak_lr=base, cosine_after_warmup=after, **kw) for s in range(300)]
    for s in (0, 1, 15, 29, 30, 31, 150, 299):
        assert lrs[s] == pytest.approx(_official(s / spe, base, 1e-5, 1e-6, 3, 30, after), rel=1e-12)
    assert lrs[0] == pytest.approx(1e-6)
    assert max(lrs) == pytest.approx(lrs[30])  # the peak is reached at the end of warm-up
    if after:
        assert lrs[30] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:30], lrs[1:31]))  # linear rise, per iteration
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:]))  # cosine decay
    assert lr_at_step(300, spe, peak_lr=base, cosine_after_warmup=after, **kw) == pytest.approx(1e-5)


def test_label_smoothing_and_soft_target_ce():
    y = torch.tensor([0, 3, 1])
    t = one_hot_smoothed(y, 4, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[1, 3].item() == pytest.approx(0.9 + 0.025) and t[1, 0].item() == pytest.approx(0.025)
    logits = torch.randn(3, 4)
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, t).item() == pytest.approx(ref.item(), rel=1e-6)


def test_mixup_and_cutmix():
    """Every draw replayed as timm's ``Mixup`` makes it (``_params_per_batch``: the mix_prob draw, the
    switch draw, then Beta(cutmix_alpha) for CutMix or Beta(mixup_alpha) for Mixup; ``rand_bbox`` and
    the area-corrected lam): the checks used the lam mix_batch returned, so a lam of 1 (nothing mixed)
    or the two alphas swapped passed."""
    rng, replay = np.random.default_rng(0), np.random.default_rng(0)
    x = torch.randn(4, 3, 2, 16, 24)  # H != W: a box drawn with the two swapped is another box
    y = torch.tensor([0, 1, 2, 3])
    seen = set()
    for _ in range(20):
        xm, t, info = mix_batch(x, y, 5, rng, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1)
        lam = info["lam"]
        assert replay.random() < 1.0  # mix_prob 1
        use_cutmix = bool(replay.random() < 0.5)
        drawn = replay.beta(1.0, 1.0) if use_cutmix else replay.beta(0.8, 0.8)
        assert info["cutmix"] == use_cutmix
        if use_cutmix:
            ch, cw = int(16 * np.sqrt(1 - drawn)), int(24 * np.sqrt(1 - drawn))
            cy, cx = int(replay.integers(0, 16)), int(replay.integers(0, 24))
            y0, y1 = max(0, cy - ch // 2), min(16, cy + ch // 2)
            x0, x1 = max(0, cx - cw // 2), min(24, cx + cw // 2)
            assert lam == 1 - (y1 - y0) * (x1 - x0) / (16 * 24)
            box = torch.zeros(16, 24, dtype=torch.bool)
            box[y0:y1, x0:x1] = True
            assert torch.equal((xm[0, 0, 0] != x[0, 0, 0]), box & (x.flip(0)[0, 0, 0] != x[0, 0, 0]))
        else:
            assert lam == drawn and 0 < lam < 1
        seen.add(info["cutmix"])
        assert torch.allclose(t.sum(1), torch.ones(4), atol=1e-6)
        exp = one_hot_smoothed(y, 5, 0.1) * lam + one_hot_smoothed(y.flip(0), 5, 0.1) * (1 - lam)
        assert torch.allclose(t, exp, atol=1e-6)
        if info["cutmix"]:
            from_partner = (xm == x.flip(0)) & (xm != x)
            frac = from_partner[0, 0, 0].float().mean().item()  # the box is the same on every frame
            assert frac == pytest.approx(1 - lam, abs=1e-6)
            assert torch.equal(from_partner[:, :, 0], from_partner[:, :, 1])
        else:
            assert torch.allclose(xm, x * lam + x.flip(0) * (1 - lam), atol=1e-6)
    assert seen == {True, False}
    xm, t, info = mix_batch(x, y, 5, rng, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.0)
    assert info["lam"] == 1.0 and torch.equal(xm, x) and torch.equal(t, F.one_hot(y, 5).float())


def test_multi_view_evaluation_averages_softmax_per_video():
    """3 videos x 2 views, the views of a video in separate batches and out of order, plus a padding
    repeat (valid False): each video's probabilities are the mean of its views' softmaxes. Video 1
    is right only through the mean (each view alone, first or last, picks another class), so a
    "last view wins" or "first view wins" evaluation fails it."""
    logits = {  # (video_id, view) -> logits
        (0, 0): [5, 0, 0, 0, 0, 0], (0, 1): [4, 0, 0, 0, 0, 0],
        (1, 0): [0, 2, 2.5, 0, 0, 0], (1, 1): [0, 2, 0, 2.5, 0, 0],  # alone: class 2, class 3; mean: class 1
        (2, 0): [0, 0, 0, 1, 2, 3], (2, 1): [0, 0, 0, 1, 2, 3],  # label 3: top-1 wrong, top-5 right
    }
    labels = {0: 0, 1: 1, 2: 3}
    order = [(1, 1), (0, 0), (2, 0), (1, 0), (0, 1), (2, 1), (2, 1)]  # last one is a padding repeat
    batches = []
    for i in range(0, len(order), 2):
        chunk = order[i:i + 2]
        batches.append({
            "video": torch.tensor([logits[c] for c in chunk], dtype=torch.float32),
            "label": torch.tensor([labels[c[0]] for c in chunk]),
            "video_id": torch.tensor([c[0] for c in chunk]),
            "index": torch.tensor([c[0] for c in chunk]),
            "valid": torch.tensor([i + j < 6 for j in range(len(chunk))]),
        })
    for (v, _), x in logits.items():  # the fixture: video 1 needs the mean
        assert (torch.tensor(x).argmax().item() == labels[v]) == (v != 1 and v != 2)
    res = evaluate(lambda v: v, batches, predictions=True)
    assert res["videos"] == 3 and res["views"] == 6
    assert res["top1"] == pytest.approx(200 / 3) and res["top5"] == pytest.approx(100.0)
    def softmax(view):
        return torch.tensor(logits[view], dtype=torch.float32).softmax(0)

    want = torch.stack([(softmax((v, 0)) + softmax((v, 1))) / 2 for v in range(3)])
    pred = res["predictions"]
    assert list(pred["video"]) == [0, 1, 2] and list(pred["label"]) == [0, 1, 3]
    torch.testing.assert_close(torch.as_tensor(pred["probs"]), want)


def test_activation_checkpointing_keeps_values_gradients_and_names(pretrainer):
    import copy

    torch.manual_seed(1)
    a = copy.deepcopy(pretrainer)
    b = copy.deepcopy(pretrainer)
    assert apply_activation_checkpointing(b) == len(b.blocks)
    assert list(a.state_dict()) == list(b.state_dict())
    from models.masking import make_masks

    x = torch.randn(2, 3, 4, 32, 32)
    mask = make_masks("frame", 2, a.mask_grid(4, 32, 32), 0.5, np.random.default_rng(0))  # 2x2 grid: frame masks
    calls = {"a": 0, "b": 0}
    a.blocks[0].mlp.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    b.blocks[0].mlp.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    la, lb = a(x, mask).loss, b(x, mask).loss
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    assert calls == {"a": 1, "b": 2}  # the checkpointed block ran again in backward
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7, rtol=1e-5), n


def test_activation_checkpointing_of_the_first_blocks_only(pretrainer):
    import copy

    b = copy.deepcopy(pretrainer)
    assert apply_activation_checkpointing(b, 1) == 1
    assert [getattr(blk, "_maskfeat_checkpointed", False) for blk in b.blocks] == [True] + [False] * (len(b.blocks) - 1)
    assert apply_activation_checkpointing(b, 0) == 0
    with pytest.raises(ValueError, match=f"the model has {len(b.blocks)}"):
        apply_activation_checkpointing(b, len(b.blocks) + 1)
    from models.masking import make_masks

    calls = []
    for i, blk in enumerate(b.blocks):
        blk.mlp.register_forward_hook(lambda *_, i=i: calls.append(i))
    x = torch.randn(2, 3, 4, 32, 32)
    mask = make_masks("frame", 2, b.mask_grid(4, 32, 32), 0.5, np.random.default_rng(0))
    b(x, mask).loss.backward()
    assert sorted(calls) == sorted(list(range(len(b.blocks))) + [0])  # only block 0 ran again in backward


_FIRST_STEP = r"""
import json, os, sys, socket
import torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from engine.distributed import deepspeed_config
from engine.optim import build_optimizer, param_groups
from engine.runner import forget_initial_step
out = {}
for stage, prec in ((0, "bf16"), (1, "bf16"), (0, "fp32")):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(param_groups(m, 0.05, 1.0), 1e-3)
    eng, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=deepspeed_config(
        micro_batch=2, world_size=1, zero_stage=stage, precision=prec, gradient_clipping=0.0))
    if sys.argv[1] == "fixed":
        forget_initial_step(eng.optimizer, opt)
    eng.backward(eng(torch.ones(2, 8, dtype=next(eng.parameters()).dtype)).float().sum())
    eng.step()
    out[f"{stage}-{prec}"] = sorted({int(st["step"]) for st in opt.state.values() if "step" in st})
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["fixed", "as_deepspeed_leaves_it"])
def test_adamw_starts_at_step_1_on_every_zero_stage(mode):
    """DeepSpeed's ZeRO-0 bf16 wrapper takes a zero-gradient optimizer step at initialize: without
    ``forget_initial_step`` AdamW's first real update is its step 2 (0.74 x the LR)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", _FIRST_STEP, "fixed" if mode == "fixed" else "raw"], cwd=repo,
                       env=dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    steps = json.loads(p.stdout.strip().splitlines()[-1])
    want = [1] if mode == "fixed" else [2]
    assert steps == {"0-bf16": want, "1-bf16": [1], "0-fp32": [1]}
