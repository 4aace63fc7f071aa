"""State-dict helpers for official SlowFast MaskFeat/MViTv2 checkpoints (DESIGN §3.4).

Our modules use the official attribute names, so ``state_dict()`` keys *are* the official keys
(``patch_embed.proj.weight``, ``cls_token``, ``pos_embed`` (ViT), ``mask_token``,
``blocks.N.{norm1,norm2,proj,mlp.fc1,mlp.fc2}.*``,
``blocks.N.attn.{qkv,proj,pool_q,pool_k,pool_v,norm_q,norm_k,norm_v}.*``,
``blocks.N.attn.rel_pos_{t,h,w}``, ``pred_head.transforms.0.0.*``, ``pred_head.projections.0.*``,
``norm.*``, ``head.projection.*``). What remains is:

- reading a ``.pyth`` file (``torch.save({"epoch", "model_state", "optimizer_state", "cfg"})``)
  and stripping a DDP ``module.`` prefix (:func:`extract_model_state`);
- adapting tensors whose size depends on the resolution: relative-position tables are linearly
  interpolated (official ``get_rel_pos``; :func:`models.mvit.resize_rel_pos`) and a ViT's
  absolute position embedding trilinearly (official ``_get_pos_embed``) (:func:`adapt_state_dict`);
- loading a pre-training backbone into a classifier (:func:`load_backbone_into_classifier`):
  pre-training-only keys (``mask_token``, ``pred_head.*``) are dropped, tables resized, and the
  classifier's ``norm``/``head`` (and any query-pooling conv absent from the checkpoint) keep
  their fresh initialisation, as the official fine-tuning start does. The official PT configs keep
  the 3x3x3 query-pooling conv of the last stage (stride 1), so it *is* in the checkpoint and loads.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mvit import resize_rel_pos

__all__ = [
    "LoadReport",
    "PRETRAIN_ONLY_PREFIXES",
    "extract_model_state",
    "adapt_state_dict",
    "resize_pos_embed",
    "load_state_dict_official",
    "load_backbone_into_classifier",
]

PRETRAIN_ONLY_PREFIXES = ("mask_token", "pred_head.")
_REL_POS_SUFFIXES = ("attn.rel_pos_t", "attn.rel_pos_h", "attn.rel_pos_w")


@dataclass
class LoadReport:
    """What a load did: keys the model has but the checkpoint lacked (left at their init), keys
    the checkpoint had but the model does not (ignored), and tensors that were resized."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded with {len(self.missing)} missing {self.missing}, {len(self.unexpected)} unexpected "
            f"{self.unexpected}, {len(self.resized)} resized tensors"
        )


def extract_model_state(obj: Union[str, os.PathLike, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The model state dict of an official ``.pyth`` checkpoint (path or loaded dict) or of a
    plain state dict, with a leading ``module.`` (DDP) removed from every key."""
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(obj, map_location="cpu", weights_only=False)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a checkpoint dict or a path, got {type(obj).__name__}")
    state = obj.get("model_state", obj)
    if not isinstance(state, Mapping):
        raise TypeError("checkpoint 'model_state' is not a mapping")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state entry {k!r} is a {type(v).__name__}, not a tensor (is this a model state dict?)")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def resize_pos_embed(pos: torch.Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int], has_cls: bool = True) -> torch.Tensor:
    """Absolute position embedding (1, [1 +] T·H·W, C) from ``src_grid`` to ``dst_grid`` (trilinear,
    cls slot kept), as the official ``_get_pos_embed`` does at run time."""
    s = int(has_cls)
    if pos.shape[1] != math.prod(src_grid) + s:
        raise ValueError(f"pos_embed {tuple(pos.shape)} does not fit grid {src_grid} (cls={has_cls})")
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    cls_pos, grid = pos[:, :s], pos[:, s:]
    grid = grid.reshape(1, *src_grid, -1).permute(0, 4, 1, 2, 3)  # (1, C, T, H, W)
    grid = F.interpolate(grid.float(), size=tuple(dst_grid), mode="trilinear").to(pos.dtype)
    grid = grid.reshape(1, grid.shape[1], -1).transpose(1, 2)
    return torch.cat((cls_pos, grid), dim=1)


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resize the resolution-dependent tensors of ``state`` to ``model``'s shapes.

    Relative-position tables (``*.attn.rel_pos_{t,h,w}``) are linearly interpolated along their
    length; ``pos_embed`` is trilinearly interpolated between the square grids implied by the
    token counts (the model's ``patch_dims``). Other shape mismatches are left for
    ``load_state_dict`` to report. Returns the new dict and the resized keys.
    """
    own = model.state_dict()
    out = dict(state)
    resized: list[str] = []
    for k, v in state.items():
        if k not in own or own[k].shape == v.shape:
            continue
        if k.endswith(_REL_POS_SUFFIXES) and v.dim() == 2 and v.shape[1] == own[k].shape[1]:
            out[k] = resize_rel_pos(v.float(), own[k].shape[0]).to(v.dtype)
            resized.append(k)
        elif k == "pos_embed" and hasattr(model, "patch_dims"):
            s = int(getattr(model, "cls_embed", True))
            t = model.patch_dims[0]
            n = (v.shape[1] - s) // t
            side = int(round(math.sqrt(n)))
            if side * side * t + s != v.shape[1]:
                raise ValueError(f"cannot infer the grid of checkpoint pos_embed {tuple(v.shape)}")
            out[k] = resize_pos_embed(v, (t, side, side), tuple(model.patch_dims), bool(s))
            resized.append(k)
    return out, resized


def load_state_dict_official(model: nn.Module, state: Union[str, os.PathLike, Mapping[str, Any]], strict: bool = True) -> LoadReport:
    """Load an official-format state dict (or ``.pyth``) into a model of the same task, resizing
    relative-position tables / position embedding to the model's resolution."""
    sd, resized = adapt_state_dict(model, extract_model_state(state))
    res = model.load_state_dict(sd, strict=strict)
    return LoadReport(list(res.missing_keys), list(res.unexpected_keys), resized)


def load_backbone_into_classifier(classifier: nn.Module, state: Union[str, os.PathLike, Mapping[str, Any]]) -> LoadReport:
    """Initialise a :class:`models.classifier.Classifier` from a MaskFeat pre-training checkpoint.

    Drops ``mask_token`` and ``pred_head.*``, resizes relative-position tables (the pre-training
    model has no last-stage query stride, so its last-stage tables are longer) and ``pos_embed``,
    loads the rest non-strictly and returns the report. ``norm.*`` and ``head.*`` are expected to
    be missing; anything else missing (e.g. query-pooling convs a checkpoint lacks) keeps its
    fresh initialisation and is listed. Raises if a shared key has an incompatible shape.
    """
    sd = {k: v for k, v in extract_model_state(state).items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
    sd, resized = adapt_state_dict(classifier, sd)
    own = classifier.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError("incompatible tensors between checkpoint and classifier:\n  " + "\n  ".join(bad))
    res = classifier.load_state_dict(sd, strict=False)
    return LoadReport(list(res.missing_keys), list(res.unexpected_keys), resized)
