"""ViT-B/L (patch 16) for the image recipes, as the official MaskFeat code builds it.

The official SlowFast MaskFeat ViT (``configs/masked_ssl/in1k_VIT_{B,L}_MaskFeat_{PT,FT}.yaml``) is
the ``MViT`` class configured with ``PATCH_2D`` (Conv2d 16x16, stride 16, no padding), no pooling,
no relative positions, no residual pooling, and the default learned absolute position embedding
``pos_embed`` (1, 1 + 196, C) (trunc_normal 0.02, cls slot included; trilinearly interpolated
for other resolutions). This module therefore only *configures* :class:`models.mvit.MViT`; the
state-dict keys are the official ones (``patch_embed.proj``, ``pos_embed``, ``cls_token``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``).

Attention without relative positions runs through ``F.scaled_dot_product_attention`` (or the
explicit softmax with ``attn_backend="reference"``). Known limit: no fixed sin-cos embedding
(``USE_FIXED_SINCOS_POS`` is off in every MaskFeat recipe).
"""
from __future__ import annotations

from typing import Any

from .mvit import MViT

__all__ = ["vit_kwargs", "ViT"]


def vit_kwargs(
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    img_size: int = 224,
    patch_size: int = 16,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    attn_backend: str = "auto",
) -> dict[str, Any]:
    """:class:`models.mvit.MViT` keyword arguments of a plain ViT (official MaskFeat ViT config)."""
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    return dict(
        input_size=(1, img_size, img_size),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        dim_mul=(),
        head_mul=(),
        pool_q_stride=(),
        pool_kvq_kernel=None,
        pool_kv_stride_adaptive=None,
        patch_kernel=(patch_size, patch_size),
        patch_stride=(patch_size, patch_size),
        patch_padding=(0, 0),
        patch_2d=True,
        cls_embed=True,
        use_abs_pos=True,
        rel_pos_spatial=False,
        rel_pos_temporal=False,
        residual_pooling=False,
        dim_mul_in_att=False,
        drop_path_rate=drop_path_rate,
        attn_backend=attn_backend,
    )


class ViT(MViT):
    """Backbone-only ViT: ``ViT(embed_dim=768, depth=12, num_heads=12)`` is ViT-B/16."""

    def __init__(self, **kwargs: Any):
        super().__init__(**vit_kwargs(**kwargs))
