"""Fine-tuning classifier: MViTv2/ViT backbone + pooling + norm + linear head (official ``MViT``).

Semantics follow facebookresearch/SlowFast ``video_model_builder.MViT.forward`` and
``head_helper.TransformerBasicHead`` as configured by the MaskFeat fine-tuning recipes
(``configs/masked_ssl/*_FT.yaml``: ``USE_MEAN_POOLING: True``, ``HEAD_INIT_SCALE: 0.001``,
``MODEL.DROPOUT_RATE: 0.0``):

- mean pooling: drop the cls token, average the patch tokens, then LayerNorm(eps 1e-6);
  otherwise (``use_mean_pooling=False``) LayerNorm then the cls token (official cls branch);
- ``head.dropout`` (only when the rate is > 0), ``head.projection`` Linear;
- init: the backbone's official init also covers ``norm`` (bias 0.02) and the projection (weight
  trunc_normal 0.02, bias 0.02); then the projection weight and bias are multiplied by
  ``head_init_scale``.

``Classifier`` *is* the backbone (subclass of :class:`models.mvit.MViT`, like the official
class), so its state-dict keys are the official fine-tuning keys (``norm.*``,
``head.projection.*``). The official head's softmax at eval time is not applied: ``forward``
returns logits. Known limit: no detection (RoI) head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .mvit import MViT, init_weights

__all__ = ["Classifier", "TransformerHead"]


class TransformerHead(nn.Module):
    """Official ``TransformerBasicHead`` without the eval-time softmax: dropout -> projection."""

    def __init__(self, dim_in: int, num_classes: int, dropout_rate: float = 0.0):
        super().__init__()
        if dropout_rate > 0.0:
            self.dropout = nn.Dropout(dropout_rate)
        self.projection = nn.Linear(dim_in, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dropout"):
            x = self.dropout(x)
        return self.projection(x)


class Classifier(MViT):
    """Backbone + pooled features + norm + linear head; ``forward(video) -> logits (B, num_classes)``.

    Args:
        num_classes: number of classes (400 for K400, 1000 for IN-1K).
        head_dropout: dropout before the projection (official ``MODEL.DROPOUT_RATE``).
        head_init_scale: multiplier of the projection's initial weight and bias (0.001).
        use_mean_pooling: mean of patch tokens then norm (True) or norm then cls token (False).
        **backbone_kwargs: the :class:`models.mvit.MViT` arguments.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        head_dropout: float = 0.0,
        head_init_scale: float = 0.001,
        use_mean_pooling: bool = True,
        **backbone_kwargs,
    ):
        super().__init__(**backbone_kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not use_mean_pooling and not self.cls_embed:
            raise ValueError("use_mean_pooling=False needs the cls token")
        self.num_classes = num_classes
        self.use_mean_pooling = use_mean_pooling
        self.norm = nn.LayerNorm(self.out_dim, eps=1e-6)
        self.head = TransformerHead(self.out_dim, num_classes, head_dropout)
        self.norm.apply(init_weights)
        self.head.apply(init_weights)
        with torch.no_grad():
            self.head.projection.weight.mul_(head_init_scale)
            self.head.projection.bias.mul_(head_init_scale)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens (B, 1 + N, D) -> normalised features (B, D)."""
        if self.use_mean_pooling:
            if self.cls_embed:
                x = x[:, 1:]
            return self.norm(x.mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) (images: (B, C, H, W)) -> logits (B, num_classes)."""
        x, _ = self.forward_features(video)
        return self.head(self.pool(x))
