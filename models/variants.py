"""Architecture variants and the model factory ``create_model``.

Each :class:`Variant` is one row of the official recipes (facebookresearch/SlowFast
``configs/masked_ssl/*.yaml`` and ``configs/Kinetics/MVITv2_*.yaml``), validated in
``__post_init__``. ``create_model(name, task)`` builds

- ``task="pretrain"``: :class:`models.maskfeat.MaskFeat` — MViTv2 with the last stage's query
  pooling stride set to 1 (kernel 3x3x3 kept, as in the official PT configs) so the output
  stride is 16, truncated after ``pretrain_depth``, drop path ``pretrain_drop_path_rate`` (0);
- ``task="classify"``: :class:`models.classifier.Classifier` — the full model with mean pooling,
  norm and head (``num_classes`` defaults to the variant's dataset), drop path
  ``drop_path_rate`` of the fine-tuning recipe.

MViTv2 rows list a Q-stride entry for *every* block (official configs do), so every block has
Q, K and V pooling convolutions (stride 1 where the stage does not change).

Exact parameter counts (``python -m models``; the issue's numbers, from the official
code): MaskFeat PT MViTv2-S 16x4 36,253,356, L 16x4 217,247,580; FT (K400) S 36,475,120,
L 217,578,064; ViT-B/16 PT 85,882,476, FT (IN-1K) 86,567,656.

Notes: ``mvitv2_b_32x3`` follows the supervised MViTv2-B config (``DIM_MUL_IN_ATT: True``, and its
classifier head: norm then cls token, not mean pooling; dropout 0.5; head init scale 1), so the
official supervised checkpoint gives the official outputs;
``mvitv2_l_40x3`` is the MaskFeat L architecture (``dim_mul_in_att=False``, so the 16x4 MaskFeat
checkpoint loads) at 40 frames and 352 px (the supervised test config uses 312 px).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from kernels.hog.reference import NORMS as HOG_NORMS

from .classifier import Classifier
from .maskfeat import TARGETS, MaskFeat
from .mvit import PLAIN_ATTN_BACKENDS, POOL_BACKENDS
from .vit import vit_kwargs

__all__ = ["Variant", "VARIANTS", "TASKS", "create_model", "backbone_kwargs", "count_parameters", "get_variant", "resolve_variant"]

TASKS = ("pretrain", "classify")
ARCHS = ("mvit", "vit")
_BACKENDS = ("auto", "reference", "sdpa", "xformers", "triton")


@dataclass(frozen=True)
class Variant:
    """One architecture + its recipe-level model options."""

    name: str
    arch: str  # "mvit" or "vit"
    embed_dim: int  # width of the first stage
    depth: int  # number of blocks
    num_heads: int  # heads of the first stage
    stage_blocks: tuple[int, ...] = ()  # MViT: first block of stages 2.. (dim, heads x2; Q stride 1x2x2)
    num_frames: int = 16  # clip length T (1 = images)
    img_size: int = 224  # H = W of the input
    patch_size: int = 16  # ViT patch size
    image: bool = False  # 2-D patch embedding (images)
    dim_mul_in_att: bool = False  # MaskFeat checkpoints: False; supervised MViTv2: True
    pretrain_depth: int = -1  # last block kept in pre-training (-1: depth - 1)
    num_classes: int = 400  # default classes of the fine-tuning dataset
    drop_path_rate: float = 0.0  # fine-tuning stochastic depth
    pretrain_drop_path_rate: float = 0.0  # pre-training stochastic depth (0 in every recipe)
    head_dropout: float = 0.0  # dropout before the classifier projection
    head_init_scale: float = 0.001  # classifier projection init multiplier
    use_mean_pooling: bool = True  # classifier: mean of patch tokens (else cls token)
    mlp_ratio: float = 4.0  # MLP hidden / width
    target: str = "hog"  # MaskFeat target: "hog" or "pixel"
    hog_norm: str = "cell_l2"  # HOG normalisation: "cell_l2" (official), "none" (ablation), "block_l2hys"
    hog_signed: bool = False  # signed orientations (0-360 deg) instead of the official unsigned
    hog_gaussian_window: int = 0  # Gaussian window on magnitudes (0 = off, official)
    attn_backend: str = "auto"  # kernels.attention backend
    pool_backend: Literal["auto", "torch", "triton"] = "auto"  # MViT q/k/v pooling convs (models.mvit.PoolConv3d)
    notes: str = field(default="", compare=False)  # provenance

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"{self.name}: arch must be one of {ARCHS}, got {self.arch!r}")
        for f in ("embed_dim", "depth", "num_heads", "num_frames", "img_size", "num_classes"):
            if getattr(self, f) < 1:
                raise ValueError(f"{self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if any(not 0 < b < self.depth for b in self.stage_blocks) or list(self.stage_blocks) != sorted(set(self.stage_blocks)):
            raise ValueError(f"{self.name}: stage_blocks must be increasing block indices in (0, depth); got {self.stage_blocks}")
        if self.arch == "vit" and (self.stage_blocks or not self.image):
            raise ValueError(f"{self.name}: a ViT has no stages and is an image model")
        if self.image and self.num_frames != 1:
            raise ValueError(f"{self.name}: image variants need num_frames = 1, got {self.num_frames}")
        if not self.image and self.num_frames % 2:
            raise ValueError(f"{self.name}: the (3,7,7)/(2,4,4) patch embedding needs an even num_frames")
        if self.arch == "vit" and self.img_size % self.patch_size:
            raise ValueError(f"{self.name}: img_size {self.img_size} not a multiple of patch_size {self.patch_size}")
        if not -1 <= self.pretrain_depth < self.depth:
            raise ValueError(f"{self.name}: pretrain_depth must be in [-1, {self.depth - 1}], got {self.pretrain_depth}")
        for f in ("drop_path_rate", "pretrain_drop_path_rate", "head_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ValueError(f"{self.name}: {f} must be in [0, 1), got {getattr(self, f)}")
        if self.target not in TARGETS:
            raise ValueError(f"{self.name}: target must be one of {TARGETS}, got {self.target!r}")
        if self.hog_norm not in HOG_NORMS:
            raise ValueError(f"{self.name}: hog_norm must be one of {HOG_NORMS}, got {self.hog_norm!r}")
        if not isinstance(self.hog_signed, bool):  # (1 or "yes" built, then the first step's targets refused it)
            raise ValueError(f"{self.name}: hog_signed must be true or false, got {self.hog_signed!r}")
        if self.hog_gaussian_window < 0 or self.hog_gaussian_window == 1:
            raise ValueError(f"{self.name}: hog_gaussian_window must be 0 (off) or >= 2, got {self.hog_gaussian_window}")
        if self.attn_backend not in _BACKENDS:
            raise ValueError(f"{self.name}: attn_backend must be one of {_BACKENDS}, got {self.attn_backend!r}")
        if self.pool_backend not in POOL_BACKENDS:
            raise ValueError(f"{self.name}: pool_backend must be one of {POOL_BACKENDS}, got {self.pool_backend!r}")
        if self.arch == "vit" and self.pool_backend == "triton":
            raise ValueError(f"{self.name}: pool_backend={self.pool_backend!r} does nothing: a ViT has no pooling")
        if self.arch == "vit" and self.attn_backend not in PLAIN_ATTN_BACKENDS:  # (it ran SDPA, silently)
            raise ValueError(f"{self.name}: attn_backend={self.attn_backend!r} does nothing: a ViT has no relative "
                             f"positions, its attention is {' or '.join(PLAIN_ATTN_BACKENDS[1:])}")

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(T, H, W) of one input clip (T = 1 for images)."""
        return (self.num_frames, self.img_size, self.img_size)

    @property
    def last_kept_block(self) -> int:
        return self.depth - 1 if self.pretrain_depth < 0 else self.pretrain_depth


def _mvit(name: str, embed_dim: int, depth: int, num_heads: int, stage_blocks: tuple[int, ...], **kw: Any) -> Variant:
    return Variant(name=name, arch="mvit", embed_dim=embed_dim, depth=depth, num_heads=num_heads, stage_blocks=stage_blocks, **kw)


def _vit(name: str, embed_dim: int, depth: int, num_heads: int, **kw: Any) -> Variant:
    kw.setdefault("num_classes", 1000)
    return Variant(name=name, arch="vit", embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_frames=1, image=True, **kw)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _mvit("mvitv2_s_16x4", 96, 16, 1, (1, 3, 14), pretrain_depth=15, drop_path_rate=0.1,
              notes="k400_MVITv2_S_16x4_{MaskFeat_PT,FT}.yaml"),
        _mvit("mvitv2_b_32x3", 96, 24, 1, (2, 5, 21), num_frames=32, dim_mul_in_att=True, drop_path_rate=0.3,
              use_mean_pooling=False, head_dropout=0.5, head_init_scale=1.0,
              notes="Kinetics/MVITv2_B_32x3.yaml (supervised: DIM_MUL_IN_ATT True, cls-token head, "
                    "DROPOUT_RATE 0.5, HEAD_INIT_SCALE 1.0)"),
        _mvit("mvitv2_l_16x4", 144, 48, 2, (2, 8, 44), pretrain_depth=47, drop_path_rate=0.2,
              notes="k400_MVITv2_L_16x4_{MaskFeat_PT,FT}.yaml"),
        _mvit("mvitv2_l_40x3", 144, 48, 2, (2, 8, 44), num_frames=40, img_size=352, pretrain_depth=47,
              drop_path_rate=0.2, notes="MaskFeat L at 40x3, 352 px"),
        _mvit("mvitv2_s_image", 96, 16, 1, (1, 3, 14), num_frames=1, image=True, num_classes=1000,
              pretrain_depth=15, drop_path_rate=0.1, notes="MaskFeat's MViTv2-S at T = 1 (Conv2d 7x7/4 stem, 1x3x3 pooling; KV stride 8, cls on, "
                    "dim_mul_in_att off): not the mvit repo's ImageNet MViTv2-S (KV stride 4, no cls, "
                    "dim_mul_in_att on), whose checkpoints do not load into it"),
        _vit("vit_b_16", 768, 12, 12, pretrain_depth=11, drop_path_rate=0.1, notes="in1k_VIT_B_MaskFeat_{PT,FT}.yaml"),
        _vit("vit_l_16", 1024, 24, 16, pretrain_depth=23, drop_path_rate=0.1, notes="in1k_VIT_L_MaskFeat_{PT,FT}.yaml"),
        # tiny CPU variants (same code paths, small sizes)
        _mvit("mvitv2_tiny", 32, 4, 1, (1, 2, 3), img_size=64, num_classes=10, notes="CPU tests"),
        _mvit("mvitv2_tiny_image", 32, 4, 1, (1, 2, 3), num_frames=1, image=True, img_size=64, num_classes=10,
              notes="CPU tests"),
        _vit("vit_tiny", 64, 2, 2, img_size=64, num_classes=10, notes="CPU tests"),
    )
}


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ValueError names the closest valid names."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model variant {name!r}{hint} (valid: {', '.join(VARIANTS)})")
    return VARIANTS[name]


def backbone_kwargs(v: Variant, task: str) -> dict[str, Any]:
    """:class:`models.mvit.MViT` keyword arguments of variant ``v`` for ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    pretrain = task == "pretrain"
    dpr = v.pretrain_drop_path_rate if pretrain else v.drop_path_rate
    if v.arch == "vit":
        return vit_kwargs(
            embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads, img_size=v.img_size,
            patch_size=v.patch_size, mlp_ratio=v.mlp_ratio, drop_path_rate=dpr, attn_backend=v.attn_backend,
        )
    stages = list(v.stage_blocks)
    if pretrain and stages:
        stages = stages[:-1]  # last stage keeps stride 16 in pre-training (official PT configs)
    pool_q_stride = [[i, 1, 2, 2] if i in stages else [i, 1, 1, 1] for i in range(v.depth)]
    mul = [(b, 2.0) for b in v.stage_blocks]
    kw: dict[str, Any] = dict(
        input_size=v.input_size, embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio, dim_mul=mul, head_mul=mul, pool_q_stride=pool_q_stride,
        pool_kvq_kernel=(3, 3, 3), pool_kv_stride_adaptive=(1, 8, 8),
        cls_embed=True, use_abs_pos=False, rel_pos_spatial=True, rel_pos_temporal=True,
        residual_pooling=True, dim_mul_in_att=v.dim_mul_in_att, drop_path_rate=dpr, attn_backend=v.attn_backend,
        pool_backend=v.pool_backend,
    )
    if v.image:
        kw.update(patch_kernel=(7, 7), patch_stride=(4, 4), patch_padding=(3, 3), patch_2d=True,
                  pool_kvq_kernel=(1, 3, 3), rel_pos_temporal=False)
    return kw


def resolve_variant(name: str, **overrides: Any) -> Variant:
    """Variant ``name`` with ``overrides`` applied; a ValueError names an unknown variant, an unknown
    field (with the closest valid ones) or a value the variant rejects."""
    v = get_variant(name)
    fields = [f.name for f in dataclasses.fields(Variant) if f.name not in ("name", "notes")]
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown override {key!r} for {name}{hint} (valid: {', '.join(fields)})")
    return dataclasses.replace(v, **overrides) if overrides else v


def create_model(name: str, task: str = "pretrain", num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
    """Build variant ``name`` for ``task`` ("pretrain" -> MaskFeat, "classify" -> Classifier).

    ``overrides`` replace :class:`Variant` fields (e.g. ``attn_backend="reference"``, ``pool_backend="triton"``,
    ``img_size=112``, ``drop_path_rate=0.0``, ``target="pixel"``); an unknown field is a
    ValueError naming the closest valid fields. ``num_classes`` defaults to the variant's.
    """
    v = resolve_variant(name, **overrides)
    kw = backbone_kwargs(v, task)
    if task == "pretrain":
        if num_classes is not None:
            raise ValueError("num_classes is only meaningful for task='classify'")
        return MaskFeat(pretrain_depth=v.last_kept_block, target=v.target, hog_norm=v.hog_norm,
                        hog_signed=v.hog_signed, hog_gaussian_window=v.hog_gaussian_window, **kw)
    return Classifier(
        num_classes=v.num_classes if num_classes is None else num_classes,
        head_dropout=v.head_dropout, head_init_scale=v.head_init_scale, use_mean_pooling=v.use_mean_pooling, **kw,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def print_variants() -> None:
    """The table of every variant's parameter count and output grid (``python -m models``)."""
    print(f"{'variant':20s} {'task':9s} {'classes':>7s} {'params':>13s}  output grid")
    for name, v in VARIANTS.items():
        for task in TASKS:
            with torch.device("meta"):
                m = create_model(name, task)
            grid = m.token_grid(v.input_size)
            classes = getattr(m, "num_classes", "-")
            print(f"{name:20s} {task:9s} {classes!s:>7s} {count_parameters(m):>13,d}  {grid}")

