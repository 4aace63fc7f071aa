"""One pre-training step's inputs: the model runs in the run's dtype, the HOG target sees fp32.

The official code runs fp32 throughout. In a bf16 run the model input is rounded to bf16, but the
HOG targets must come from the clip as loaded: rounding the pixels to 8 bits of mantissa first
roughly doubles the targets' error against a float64 oracle (measured on ``bikes.mp4`` frames).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from engine.pretrain import pretrain_step
from models import create_model


class _Recorder(torch.nn.Module):
    """Stands in for the DeepSpeed engine: calls the model and keeps what it was given."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, mask, **kw):
        out = self.model(x, mask, **kw)
        self.calls.append((x, kw, out))
        return out


def _run(dtype: torch.dtype, ratio: float = 0.4, rng=None) -> SimpleNamespace:
    model = create_model("mvitv2_tiny", task="pretrain").to(dtype)
    return SimpleNamespace(dtype=dtype, model=model, engine=_Recorder(model),
                           cfg=SimpleNamespace(mask=SimpleNamespace(kind="cube", ratio=ratio)),
                           rng=np.random.default_rng(0) if rng is None else rng, state=SimpleNamespace(extra={}),
                           logger=SimpleNamespace(write=print))


def test_the_step_masks_at_mask_ratio_with_the_ranks_own_draws():
    """mask.ratio reaches the step's masks, and ranks draw different masks from ``runner.rank_rng``
    (the Generator setup_run seeds with train.seed and the rank); nothing tested either."""
    from engine.runner import rank_rng

    clip = torch.randn(4, 3, 16, 64, 64, generator=torch.Generator().manual_seed(4))
    masks = {}
    for ratio in (0.4, 0.8):
        for rank in (0, 1):
            run = _run(torch.float32, ratio, rank_rng(7, rank))
            pretrain_step(run, {"video": clip})
            masks[ratio, rank] = run.engine.calls[0][2].mask
    for rank in (0, 1):
        assert 0.3 < masks[0.4, rank].float().mean() < 0.45 and 0.7 < masks[0.8, rank].float().mean() < 0.85
    assert not torch.equal(masks[0.4, 0], masks[0.4, 1])  # ranks draw different masks
    run = _run(torch.float32, 0.4, rank_rng(7, 1))
    pretrain_step(run, {"video": clip})
    assert torch.equal(run.engine.calls[0][2].mask, masks[0.4, 1])  # and the same ones again from the same seed


def test_bf16_step_takes_hog_targets_from_the_fp32_clip():
    g = torch.Generator().manual_seed(1)
    clip = (torch.rand(2, 3, 16, 64, 64, generator=g) - 0.45) / 0.225  # (B, C, T, H, W) normalised fp32
    run = _run(torch.bfloat16)
    loss = pretrain_step(run, {"video": clip})
    (x, kw, out), = run.engine.calls
    assert x.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert kw["frames"] is clip  # the loader's fp32 tensor itself, not a rounded copy
    exact = run.model.compute_targets(clip, None)
    rounded = run.model.compute_targets(clip.to(torch.bfloat16), None)
    assert torch.equal(out.target, exact)
    assert not torch.equal(out.target, rounded)  # the rounding is visible in the targets


def test_bf16_pixel_targets_come_from_the_fp32_clip_too():
    clip = torch.randn(2, 3, 16, 64, 64, generator=torch.Generator().manual_seed(3))
    model = create_model("mvitv2_tiny", task="pretrain", target="pixel").to(torch.bfloat16)
    exact = model.compute_targets(clip.to(torch.bfloat16), clip)
    assert exact.dtype == torch.float32
    assert torch.equal(exact, model.compute_targets(clip, None).float())
    assert not torch.equal(exact, model.compute_targets(clip.to(torch.bfloat16), None))


def test_fp32_step_passes_no_separate_frames():
    clip = torch.randn(1, 3, 16, 64, 64, generator=torch.Generator().manual_seed(2))
    run = _run(torch.float32)
    pretrain_step(run, {"video": clip})
    (x, kw, _), = run.engine.calls
    assert x is clip and kw["frames"] is None


def test_input_geometry_the_targets_or_masks_cannot_take_is_a_config_error_before_set_up(tmp_path):
    """A crop that is not a multiple of the output stride (HOG per 16x16 patch), or whose token grid
    cube masking cannot cut into 2x2 units, stops before the loader, the model and DeepSpeed are set
    up (it failed with a traceback at the first step)."""
    import os

    import pytest

    from engine.config import ConfigError, load_config
    from engine.pretrain import check_input_geometry, run_pretrain

    demo = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo_pretrain.yaml")
    for crop in (64, 96):
        check_input_geometry(load_config(demo, [f"data.crop_size={crop}"]))
    with pytest.raises(ConfigError, match=r"crop_size=72 is not a multiple of .* output-token stride 16"):
        check_input_geometry(load_config(demo, ["data.crop_size=72"]))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"crop_size=80.*divisible by 2.*grid \(4, 5, 5\).*crop_size=64"):
        run_pretrain(load_config(demo, ["data.crop_size=80", f"train.output_dir={out}"]))
    # the hint names a crop that works (it named the failing 32, and 64 for a ratio the crop cannot fix)
    with pytest.raises(ConfigError, match=r"crop_size=32, .*unit grid \(1, 1\).*\(e\.g\. data\.crop_size=64;"):
        check_input_geometry(load_config(demo, ["data.crop_size=32"]))
    with pytest.raises(ConfigError, match=r"masks nothing on 4 temporal slices .*\(raise mask.ratio or data.num_frames\)$"):
        check_input_geometry(load_config(demo, ["mask.kind=frame", "mask.ratio=0.1"]))
    with pytest.raises(ConfigError, match=r"ratio 0.1 masks nothing .*\(raise mask.ratio, or e\.g\. data\.crop_size=96;"):
        check_input_geometry(load_config(demo, ["mask.kind=tube", "mask.ratio=0.1"]))
    # the hint's crop fits the HOG window too (it named 64 for a window of 48)
    with pytest.raises(ConfigError, match=r"crop_size=48, .*grid \(4, 3, 3\) \(e\.g\. data\.crop_size=96\)$"):
        check_input_geometry(load_config(demo, ["model.overrides={hog_gaussian_window: 48}", "data.crop_size=48"]))
    # never the failing crop itself: a window no nearby crop fits names one that does (it named 64 again)
    with pytest.raises(ConfigError, match=r"multiples of gaussian_window=512, .*\(e\.g\. data\.crop_size=512\)$"):
        check_input_geometry(load_config(demo, ["model.overrides={hog_gaussian_window: 512}"]))
    # MaskFeat's own refusal is a config error too (it was a ValueError traceback, exit 1), and so is a crop
    # too small for the patch embedding (a RuntimeError traceback); the model's own checks keep their words
    with pytest.raises(ConfigError, match=r"does not build for data.crop_size=64, data.num_frames=8 with "
                                          r"model.overrides=\{'pretrain_depth': 0\}: output stride 4 is not a mul"):
        run_pretrain(load_config(demo, ["model.overrides={pretrain_depth: 0}", f"train.output_dir={out}"]))
    with pytest.raises(ConfigError, match=r"mvitv2_tiny does not build for data.crop_size=8, data.num_frames=8: "):
        check_input_geometry(load_config(demo, ["data.crop_size=8"]))
    with pytest.raises(ConfigError, match=r"^model: mvitv2_tiny: the .* patch embedding needs an even num_frames"):
        check_input_geometry(load_config(demo, ["data.num_frames=7"]))
    # a HOG window that does not tile the crop (raised in the first step's targets, after
    # train.overwrite had cleared the previous run), and a window of 1 (no Gaussian at all)
    with pytest.raises(ConfigError, match=r"crop_size=64 .*multiples of gaussian_window=48"):
        run_pretrain(load_config(demo, ["model.overrides.hog_gaussian_window=48", f"train.output_dir={out}"]))
    check_input_geometry(load_config(demo, ["model.overrides.hog_gaussian_window=16"]))
    with pytest.raises(ConfigError, match=r"hog_gaussian_window must be 0 \(off\) or >= 2, got 1"):
        run_pretrain(load_config(demo, ["model.overrides.hog_gaussian_window=1", f"train.output_dir={out}"]))
    assert not out.exists()  # nothing was set up


def test_model_kind_must_fit_the_data_and_image_masks_need_a_block(tmp_path):
    """An image model on videos (or a video model on images) is a config error before set-up (it was
    a traceback at the first step); image_block masking on a grid with nothing to mask is one too.
    A small grid is accepted: the official minimum block is the mask count // 5 (it was a fixed 16,
    which left a 6x6 grid's masks empty)."""
    import os

    import pytest

    from engine.config import ConfigError, load_config
    from engine.finetune import run_eval, run_finetune
    from engine.pretrain import check_input_geometry, run_pretrain

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    demo, vit = os.path.join(configs, "demo_pretrain.yaml"), os.path.join(configs, "pretrain_vit_b_in1k.yaml")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"model.name=vit_tiny is an image model, but data.dataset=demo holds videos"):
        run_pretrain(load_config(demo, ["model.name=vit_tiny", f"train.output_dir={out}"]))
    img = ["model.name=mvitv2_tiny", "data.root=/nowhere", f"train.output_dir={out}"]
    with pytest.raises(ConfigError, match=r"mvitv2_tiny is a video model, but data.dataset=image_folder holds images"):
        run_finetune(load_config(vit, img))
    with pytest.raises(ConfigError, match=r"is a video model"):
        run_eval(load_config(vit, img), str(tmp_path / "nowhere"))
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"^data.crop_size=16: ratio 0.4 masks nothing on grid \(1, 1\)"):
        check_input_geometry(load_config(vit, ["model.name=vit_tiny", "data.crop_size=16"]))
    check_input_geometry(load_config(vit, ["model.name=vit_tiny", "data.crop_size=96"]))  # 6x6: 14 of 36


def test_fp16_on_the_cpu_is_a_config_error(tmp_path):
    """DeepSpeed's CPU accelerator has no fp16: a config error before set-up (a ValueError traceback)."""
    import os

    import pytest

    from engine.config import ConfigError, load_config
    from engine.pretrain import run_pretrain

    demo = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo_pretrain.yaml")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        run_pretrain(load_config(demo, ["deepspeed.precision=fp16", "train.device=cpu",
                                        f"train.output_dir={tmp_path / 'run'}"]))
