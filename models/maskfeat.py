"""MaskFeat pre-training model (DESIGN §3.3): masked feature prediction on an MViTv2 or ViT.

Semantics follow facebookresearch/SlowFast ``slowfast/models/masked.py`` (``MaskMViT`` with
``MASK.PRED_HOG`` and the ``separate`` head of ``head_helper.MSSeparateHead``), re-implemented:

- ``MaskFeat`` *is* the backbone (it subclasses :class:`models.mvit.MViT`, like the official
  ``MaskMViT(MViT)``), so its state-dict keys are the official ones: backbone keys plus
  ``mask_token`` and ``pred_head.{transforms.0.0,projections.0}.{weight,bias}``.
- Blocks after ``pretrain_depth`` are deleted (official ``del self.blocks[PRETRAIN_DEPTH + 1:]``:
  block ``pretrain_depth`` is the last one kept; with the official S/L/ViT settings 15/47/11 that
  is every block). The final norm and classifier head do not exist. The last stage's query
  pooling is removed *by the variant* (``create_model(task="pretrain")`` gives that block Q
  stride (1, 1, 1), exactly like the official PT configs: the stride-1 3x3x3 pooling conv stays,
  so parameter shapes match fine-tuning), which makes the output stride 16.
- The mask token ((1, 1, embed_dim), trunc_normal 0.02) replaces masked tokens right after the
  patch embedding, ``x·(1−m) + mask_token·m``, with the output-grid mask nearest-upsampled to the
  patch-embedding grid, before the cls token and any absolute position embedding.
- Head: LayerNorm(eps 1e-6) over all tokens -> drop cls -> Linear(D, target dim) (official init:
  trunc_normal 0.02, zero biases, LayerNorm 1/0). Predictions are made for every token (for
  visualisation); the loss only scores masked ones.
- Targets: HOG (``kernels.hog``; 3 channels x 9 bins x 2x2 cells = 108 per 16-px token, video on
  frames 0, 2, 4, ... — the temporal stride of the patch embedding) or the pixel ablation
  (per-patch normalised RGB of the normalised input, ``(x − mean)/sqrt(var + 1e-6)`` with the
  unbiased variance, 768 = 16·16·3 values per token; video uses the same strided frames, values
  ordered (py, px, c), images ordered (c, py, px), as the official
  ``_get_pixel_label_3d``/``_get_pixel_label_2d``).
- Loss: MSE averaged over all elements of the masked tokens' targets (official ``multi_mse``).
  Computed as a masked sum over the mask count (no boolean indexing, so no host sync); with an
  empty mask the loss is 0 instead of the official NaN.

Known limits: one prediction depth (the official multi-depth list is not supported), no MAE mode.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import autocast_disabled

from .mvit import MViT, _unwrap

__all__ = ["MaskFeat", "MaskFeatOutput", "PredHead", "pixel_targets", "TARGETS"]

TARGETS = ("hog", "pixel")


class MaskFeatOutput(NamedTuple):
    """What one MaskFeat step returns (a NamedTuple, so DeepSpeed ZeRO-3 sees the tensors of the
    output and hooks their backward; a dataclass would hide them).

    loss: scalar MSE over the masked tokens' targets.
    pred: (B, N, D) predictions for every output token (cls excluded), D = target width.
    target: (B, N, D) targets (no gradient).
    mask: (B, N) bool, True = masked (scored), tokens in (t, h, w) raster order.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor


class PredHead(nn.Module):
    """Official ``MSSeparateHead`` with one depth: ``transforms.0`` = [LayerNorm], ``projections.0``."""

    def __init__(self, dim: int, num_targets: int):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim, eps=1e-6))])
        self.projections = nn.ModuleList([nn.Linear(dim, num_targets, bias=True)])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, has_cls: bool = True) -> torch.Tensor:
        """x (B, 1 + N, C) -> (B, N, num_targets)."""
        x = self.transforms[0](x)
        if has_cls:
            x = x[:, 1:]
        return self.projections[0](x)


def pixel_targets(x: torch.Tensor, patch: int, temporal_stride: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels, the official MaskFeat pixel target.

    Video x (B, C, T, H, W): frames ``::temporal_stride``, tokens (t, h, w) raster, values ordered
    (py, px, c) -> (B, T/ts·H/p·W/p, p·p·C). Image x (B, C, H, W): values ordered (c, py, px) ->
    (B, H/p·W/p, C·p·p). Each token is normalised by its mean and unbiased variance.
    """
    if x.dim() == 5:
        x = x[:, :, ::temporal_stride]
        B, C, T, H, W = x.shape
        if H % patch or W % patch:
            raise ValueError(f"pixel targets need H, W divisible by {patch}; got {H}x{W}")
        h, w = H // patch, W // patch
        x = x.reshape(B, C, T, h, patch, w, patch)
        x = torch.einsum("bcthpwq->bthwpqc", x).reshape(B, T * h * w, patch * patch * C)
    elif x.dim() == 4:
        B, C, H, W = x.shape
        if H % patch or W % patch:
            raise ValueError(f"pixel targets need H, W divisible by {patch}; got {H}x{W}")
        h, w = H // patch, W // patch
        x = x.reshape(B, C, h, patch, w, patch)
        x = torch.einsum("bchpwq->bhwcpq", x).reshape(B, h * w, C * patch * patch)
    else:
        raise ValueError(f"pixel targets need (B, C, T, H, W) or (B, C, H, W); got {tuple(x.shape)}")
    x = x.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps) ** 0.5


class MaskFeat(MViT):
    """MaskFeat pre-training model over an MViTv2/ViT backbone (this class *is* the backbone).

    Args:
        pretrain_depth: index of the last block kept (official ``MASK.PRETRAIN_DEPTH[-1]``).
        target: "hog" (108-d HOG of 16-px tokens) or "pixel" (768-d normalised pixels).
        hog_cell, hog_nbins: HOG cell size (8) and orientation bins (9).
        hog_norm: HOG normalisation, "cell_l2" (official), "none" (the paper's ablation) or
            "block_l2hys"; hog_signed / hog_gaussian_window: the HOG variants of ``kernels.hog``.
        **backbone_kwargs: the :class:`models.mvit.MViT` arguments.
    """

    def __init__(
        self,
        *,
        pretrain_depth: int,
        target: str = "hog",
        hog_cell: int = 8,
        hog_nbins: int = 9,
        hog_norm: str = "cell_l2",
        hog_signed: bool = False,
        hog_gaussian_window: int = 0,
        **backbone_kwargs,
    ):
        super().__init__(**backbone_kwargs)
        if target not in TARGETS:
            raise ValueError(f"unknown MaskFeat target {target!r}; choose one of {TARGETS}")
        depth = len(self.blocks)
        if not 0 <= pretrain_depth < depth:
            raise ValueError(f"pretrain_depth must be in [0, {depth - 1}]; got {pretrain_depth}")
        if pretrain_depth + 1 < depth:
            del self.blocks[pretrain_depth + 1 :]
        self.pretrain_depth = pretrain_depth
        self.target = target
        self.hog_cell = hog_cell
        self.hog_nbins = hog_nbins
        self.hog_options = dict(cell=hog_cell, nbins=hog_nbins, norm=hog_norm, signed=hog_signed,
                                gaussian_window=hog_gaussian_window)

        full_stride = ((1,) + tuple(self.patch_embed.proj.stride)) if self.patch_2d else tuple(self.patch_embed.proj.stride)
        st = list(full_stride)
        for blk in self.blocks:
            attn = _unwrap(blk).attn
            if attn.pool_q is not None:
                st = [a * b for a, b in zip(st, attn.pool_q.stride)]
        if st[1] != st[2]:
            raise ValueError(f"MaskFeat needs a square output stride; got {st[1:]}")
        self.feat_stride = tuple(st)  # (t, h, w) stride of the output tokens in frames/pixels
        self.temporal_stride = 1 if self.patch_2d else full_stride[0]  # frames per token (HOG on ::ts)
        p = st[1]
        if target == "hog":
            if p % hog_cell:
                raise ValueError(f"output stride {p} is not a multiple of the HOG cell {hog_cell}")
            num_targets = 3 * hog_nbins * (p // hog_cell) ** 2
        else:
            num_targets = p * p * 3
        self.num_targets = num_targets

        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pred_head = PredHead(self.out_dim, num_targets)

    # -- geometry --------------------------------------------------------------------------

    def mask_grid(self, *size: int) -> tuple[int, ...]:
        """Output-token grid the mask lives on: (T, H, W) -> (T', H', W') for video, (H, W) ->
        (H', W') for images (e.g. 16x224x224 -> 8x14x14 for MViTv2-S, 224x224 -> 14x14 for ViT)."""
        if self.patch_2d:
            if len(size) != 2:
                raise ValueError(f"image MaskFeat: mask_grid(H, W); got {size}")
            return tuple(self.token_grid((1,) + tuple(size))[1:])
        if len(size) != 3:
            raise ValueError(f"video MaskFeat: mask_grid(T, H, W); got {size}")
        return tuple(self.token_grid(size))

    # -- the paper's steps -----------------------------------------------------------------

    def mask_tokens(self, x: torch.Tensor, thw: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
        """Replace masked patch-embedding tokens by the mask token.

        x (B, N, C) on the patch-embedding grid ``thw``; mask (B, T', H', W') bool at the output
        grid, nearest-upsampled to ``thw`` (official ``F.interpolate`` nearest).
        """
        B = x.shape[0]
        m = mask.reshape(B, 1, *mask.shape[-3:]).to(x.dtype)  # (B, 1, T', H', W')
        m = F.interpolate(m, size=tuple(thw), mode="nearest").reshape(B, math.prod(thw), 1)  # (B, N, 1)
        return x * (1 - m) + self.mask_token.to(x.dtype) * m

    def compute_targets(self, video: torch.Tensor, frames: Optional[torch.Tensor]) -> torch.Tensor:
        """Targets (B, N, D) fp32 for every output token, without gradient, computed with autocast
        disabled (an enclosing ``torch.autocast`` does not lower their precision).

        The pixel target uses the normalised input (official ``_get_pixel_label``: its per-patch
        normalisation spans the three channels, so it is not invariant to per-channel mean/std):
        ``frames`` only when it is that input at a higher precision (``frames`` rounds exactly to
        ``video``, as the fp32 clip of a bf16 run does), else ``video``; raw frames never feed it."""
        p = self.feat_stride[1]
        with torch.no_grad(), autocast_disabled(video.device):
            if self.target == "pixel":
                x = video.detach().float()
                if frames is not None and frames.is_floating_point():
                    same = (frames.to(video.dtype) == video).all()  # a device-side flag: no host sync
                    x = torch.where(same, frames.float(), x)
                return pixel_targets(x, p, self.temporal_stride)
            src = frames if frames is not None else video.detach()  # HOG: uint8/fp16/bf16/fp32 accepted
            import kernels.hog as hog  # lazy: only the HOG target needs it

            if self.patch_2d:
                return hog.hog_targets(src, token_stride=p, **self.hog_options)
            return hog.video_hog_targets(src, temporal_stride=self.temporal_stride, token_stride=p, **self.hog_options)

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over all elements of the masked tokens: pred/target (B, N, D), mask (B, N) bool."""
        m = mask.to(torch.float32).unsqueeze(-1)  # (B, N, 1)
        sq = (pred.float() - target.float()).pow(2) * m
        return sq.sum() / (m.sum() * pred.shape[-1]).clamp_min(1.0)

    def forward(
        self, video: torch.Tensor, mask: torch.Tensor, frames: Optional[torch.Tensor] = None
    ) -> MaskFeatOutput:
        """video (B, C, T, H, W) normalised (images: (B, C, H, W)); mask (B, T', H', W') bool at the
        output grid (images: (B, H', W')); frames: optional frames of the same geometry for the
        targets: raw (uint8 allowed; HOG's per-cell norms ignore the per-channel affine
        normalisation, up to rounding; ``hog_norm="none"`` does not: its raw sums scale with it) or the
        normalised clip at a higher precision than ``video``. The pixel target uses ``frames`` only
        in the latter case (see :meth:`compute_targets`), else ``video``."""
        want = 4 if self.patch_2d else 5
        if video.dim() != want:
            raise ValueError(f"expected a {want}-D input for this model; got {tuple(video.shape)}")
        grid = self.mask_grid(*video.shape[2:])
        if mask.dtype != torch.bool or tuple(mask.shape) != (video.shape[0],) + tuple(grid):
            raise ValueError(
                f"mask must be bool of shape {(video.shape[0],) + tuple(grid)} (the output grid); "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if frames is not None and tuple(frames.shape) != tuple(video.shape):
            raise ValueError(f"frames {tuple(frames.shape)} must have the shape of video {tuple(video.shape)}")
        x, thw = self.patchify_embed(video)  # (B, N, C)
        vid_mask = mask if not self.patch_2d else mask.unsqueeze(1)  # (B, T', H', W')
        x = self.mask_tokens(x, thw, vid_mask)
        x = self.add_cls_and_pos(x, thw)
        x, out_thw = self.forward_blocks(x, thw)
        pred = self.pred_head(x, self.cls_embed)  # (B, N', D)
        target = self.compute_targets(video, frames)  # (B, N', D)
        if target.shape != pred.shape:
            raise ValueError(f"targets {tuple(target.shape)} do not match predictions {tuple(pred.shape)}")
        flat_mask = mask.reshape(mask.shape[0], math.prod(mask.shape[1:]))  # (B, N') (no -1: B may be 0)
        loss = self.forward_loss(pred, target, flat_mask)
        return MaskFeatOutput(loss=loss, pred=pred, target=target, mask=flat_mask)
