"""MaskFeat pre-training: clips → masks → model → masked MSE → DeepSpeed step (DESIGN §2, §3).

One step: the loader gives normalised clips (B, C, T, H, W) on the device; masks are drawn on
the model's output grid (``model.mask_grid(T, H, W)``, e.g. 8×14×14) by
``models.masking.make_masks`` from a numpy Generator seeded per rank (saved in checkpoints);
the model computes HOG targets itself and returns the MSE over the masked tokens; the loop in
``engine/runner.py`` does the rest (LR, non-finite skip, DeepSpeed backward/step, logs,
checkpoints). Image datasets (``"image"`` (B, C, H, W)) use the image grid and
``mask.kind=image_block``.

In bf16/fp16 the clips are cast to the engine's dtype before the forward (DeepSpeed keeps the
module in that dtype); the HOG target is computed by the model from the same input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engine.config import Config, ConfigError
from engine.distributed import DistInfo
from engine.runner import Run, report_paths, setup_run, train_loop

__all__ = ["create_model", "check_model_config", "model_overrides", "build_pretrain_model", "pretrain_step", "run_pretrain"]


def create_model(name: str, task: str, num_classes: Optional[int] = None, **overrides) -> nn.Module:
    """``models.create_model`` (imported late so the engine imports without the models package)."""
    try:
        from models import create_model as _create
    except ImportError:  # models/__init__.py not filled yet
        from models.variants import create_model as _create
    check_model_config(name, overrides)
    return _create(name, task=task, num_classes=num_classes, **overrides)


def check_model_config(name: str, overrides: dict, dataset: Optional[str] = None) -> None:
    """Raise ConfigError when ``model.name`` is unknown or ``model.overrides`` name an unknown field
    or give a value the variant rejects (``models.variants.Variant`` checks its fields), or, given
    ``data.dataset``, when an image model meets videos or a video model images."""
    from models.variants import resolve_variant

    try:
        v = resolve_variant(name, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    if dataset is not None and v.image != (dataset == "image_folder"):
        raise ConfigError(f"model.name={name} is {'an image' if v.image else 'a video'} model, but data.dataset="
                          f"{dataset} holds {'videos' if v.image else 'images'}: use "
                          + ("a video model (e.g. mvitv2_s_16x4)" if v.image else "an image model (e.g. vit_b_16)"))


def model_overrides(cfg: Config, task: str) -> dict:
    """``create_model`` overrides: ``model.overrides``, drop path, and the input geometry of
    ``data`` (clip length and crop size), so the relative-position tables fit the clips."""
    from models.variants import get_variant

    check_model_config(cfg.model.name, cfg.model.overrides)
    v = get_variant(cfg.model.name)
    kw = dict(cfg.model.overrides)
    if cfg.model.drop_path is not None:
        kw.setdefault("pretrain_drop_path_rate" if task == "pretrain" else "drop_path_rate", cfg.model.drop_path)
    if cfg.data.crop_size != v.img_size:
        kw.setdefault("img_size", cfg.data.crop_size)
    if not v.image and cfg.data.num_frames != v.num_frames:
        kw.setdefault("num_frames", cfg.data.num_frames)
    return kw


def build_pretrain_model(cfg: Config) -> nn.Module:
    """The MaskFeat pre-training module of ``cfg.model``."""
    return create_model(cfg.model.name, task="pretrain", **model_overrides(cfg, "pretrain"))


def _input(batch: dict) -> torch.Tensor:
    if "video" in batch:
        return batch["video"]  # (B, C, T, H, W)
    if "image" in batch:
        return batch["image"]  # (B, C, H, W)
    raise KeyError(f"a batch needs 'video' or 'image'; got keys {sorted(batch)}")


def pretrain_step(run: Run, batch: dict) -> torch.Tensor:
    """Loss of one batch: masks from the rank's Generator, forward through the DeepSpeed engine."""
    from engine.data.transfer import to_device
    from models.masking import make_masks

    raw = _input(batch)
    x = raw.to(run.dtype)
    # HOG targets from the clip as loaded (fp32), not from its bf16/fp16 copy: rounding the pixels
    # to 8 bits of mantissa first roughly doubles the targets' error (the official code runs fp32)
    frames = raw if raw.dtype != x.dtype else None
    B = x.shape[0]
    grid = run.model.mask_grid(*x.shape[2:])  # (T', H', W') or (H', W')
    mask = make_masks(run.cfg.mask.kind, B, tuple(grid), run.cfg.mask.ratio, run.rng)
    if not run.state.extra.get("empty_mask_warned") and not bool(mask.any()):
        run.state.extra["empty_mask_warned"] = True
        run.logger.write(f"warning: {run.cfg.mask.kind} masking at ratio {run.cfg.mask.ratio} masked nothing on the "
                         f"{tuple(grid)} token grid (the loss is 0); use a larger input or another mask.kind")
    mask = to_device(mask, x.device)  # (no host wait for the GPU)
    out = run.engine(x, mask, frames=frames)
    return out.loss


def check_input_geometry(cfg: Config) -> None:
    """ConfigError, before any set-up, for a clip geometry the model accepts but its targets or
    masks do not: a crop that is not a multiple of the output-token stride (the HOG/pixel targets
    are per stride x stride patch), a frame count that is not a multiple of the temporal stride, or
    a token grid ``mask.kind`` cannot mask (cube/tube need an even H' and W' of at least 4;
    image_block at least 2x2 and one masked patch at ``mask.ratio``), or HOG options the frame does
    not fit (``hog_gaussian_window`` must divide the crop). The
    model is built on the meta device (no memory, no init cost)."""
    import numpy as np

    from models.masking import make_masks

    with torch.device("meta"):
        try:
            model = build_pretrain_model(cfg)
        except ConfigError:  # (check_model_config's: they name their own setting)
            raise
        except (ValueError, RuntimeError) as e:  # MaskFeat's own checks (a pretrain_depth whose output stride
            # misses the HOG cell), or a crop too small for the patch embedding (a negative size)
            given = f" with model.overrides={cfg.model.overrides}" if cfg.model.overrides else ""
            raise ConfigError(f"model.name={cfg.model.name} does not build for data.crop_size={cfg.data.crop_size}, "
                              f"data.num_frames={cfg.data.num_frames}{given}: {e}") from None
    crop, frames = cfg.data.crop_size, cfg.data.num_frames
    image = cfg.data.dataset == "image_folder"
    p, ts = model.feat_stride[1], model.temporal_stride
    o = model.hog_options

    def hog_error(c: int) -> Optional[str]:  # the HOG window must tile the frame (a ValueError at the first step)
        if model.target != "hog":
            return None
        from kernels.hog.reference import check_hog_args

        try:
            check_hog_args((1, 3, c, c), p, o["cell"], o["nbins"], o["gaussian_window"], o["norm"])
        except ValueError as e:
            return str(e)
        return None

    def mask_error(c: int) -> Optional[str]:
        grid = model.mask_grid(*((c, c) if image else (frames, c, c)))
        try:
            make_masks(cfg.mask.kind, 1, tuple(grid), cfg.mask.ratio, np.random.default_rng(0))
        except ValueError as e:
            return str(e)
        return None

    def fix(ratio_too: bool = False) -> str:
        # the crop nearest to this one (a multiple of the stride, never this one; the smaller of two) whose
        # targets and token grid work; a ratio that masks nothing can also be raised, and is the only fix
        # when no crop the targets fit masks anything (frame masking: too few temporal slices for the ratio)
        ratio = f"raise mask.ratio{'' if image or cfg.mask.kind != 'frame' else ' or data.num_frames'}"
        sizes = range(p, max(4 * crop, 16 * p, 4 * o["gaussian_window"]) + 1, p)
        fits = [c for c in sizes if c != crop and hog_error(c) is None]
        ok = [c for c in fits if mask_error(c) is None]
        near = lambda cs: min(cs, key=lambda c: (abs(c - crop), c))  # noqa: E731
        if ok:
            recipes = "; the recipes use 224" if hog_error(224) is None and mask_error(224) is None else ""
            crop_fix = f"e.g. data.crop_size={near(ok)}{recipes}"
            return f"({ratio}, or {crop_fix})" if ratio_too else f"({crop_fix})"
        if ratio_too or not fits:
            return f"({ratio})" if ratio_too or mask_error(crop) else "(no crop near it fits these HOG options)"
        return f"(e.g. data.crop_size={near(fits)}, and {ratio}: no crop masks anything at this ratio)"

    if crop % p:
        raise ConfigError(f"data.crop_size={crop} is not a multiple of {cfg.model.name}'s output-token stride {p}: "
                          f"the {'HOG' if model.target == 'hog' else model.target} targets cover {p}x{p} patches {fix()}")
    if not image and frames % ts:
        raise ConfigError(f"data.num_frames={frames} is not a multiple of the temporal stride {ts} of "
                          f"{cfg.model.name}")
    err = hog_error(crop)
    if err:
        raise ConfigError(f"data.crop_size={crop} with the HOG options of model.overrides: {err} {fix()}")
    err = mask_error(crop)
    if err:
        where = f"data.crop_size={crop}" + ("" if image else f", data.num_frames={frames}")
        raise ConfigError(f"{where}: {err} {fix(ratio_too=err.startswith('ratio'))}")


def run_pretrain(cfg: Config, resume: Optional[str] = None) -> dict:
    """Pre-train according to ``cfg``; returns the loop summary (see ``train_loop``)."""
    from engine.data import build_loader

    # what needs no data is checked first (train.overwrite may clear the folder before the build)
    check_model_config(cfg.model.name, cfg.model.overrides, cfg.data.dataset)
    if (cfg.mask.kind == "image_block") != (cfg.data.dataset == "image_folder"):
        raise ConfigError(f"mask.kind={cfg.mask.kind} does not fit data.dataset={cfg.data.dataset}: images "
                          "(data.dataset=image_folder) are masked with mask.kind=image_block, videos with cube, "
                          "tube or frame")
    check_input_geometry(cfg)

    def loader(dist: DistInfo):
        return build_loader(cfg.data, "train", rank=dist.rank, world_size=dist.world_size,
                            device=dist.device, mode="pretrain")

    run = setup_run(cfg, build_model=lambda _: build_pretrain_model(cfg), build_loader=loader,
                    clips_per_rank=lambda _: cfg.data.batch_size, resume=resume, desc="pretrain")
    summary = train_loop(run, lambda batch: pretrain_step(run, batch))
    report_paths(run, summary)
    return summary
