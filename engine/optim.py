"""AdamW parameter groups (weight decay, layer-wise LR decay) and the per-iteration LR schedule.

Semantics follow the official SlowFast code (DESIGN §3.6):

- Weight decay: every parameter with ≥ 2 dimensions is decayed — including the cls and mask
  tokens (shape (1, 1, C)) and the relative-position tables, as the MaskFeat configs do not set
  ``ZERO_DECAY_POS_CLS``; biases, norm weights and every other 1-D parameter get 0
  (``ZERO_WD_1D_PARAM``).
- Layer decay (``optim/optimizer.py`` ``get_param_groups`` with ``LAYER_DECAY``): layer id 0 for
  ``cls_token``, ``mask_token``, ``pos_embed*`` and ``patch_embed*``; ``blocks.i.*`` is id i+1;
  everything else (final norm, head) id depth+1. The LR of a parameter is scaled by
  ``layer_decay^(depth + 1 − id)``.
- Groups are merged by (LR scale, weight decay), so a 48-block model has ~100 groups at most,
  and 2 without layer decay (DESIGN §4: many groups make DeepSpeed slow).
- Schedule (``utils/lr_policy.py``): with the fractional epoch ``e = step / steps_per_epoch``,
  ``cos(e) = end + (peak − end)·(1 + cos(π·(e − w₀)/(E − w₀)))/2`` where ``w₀`` is the warm-up
  length when ``COSINE_AFTER_WARMUP`` (MaskFeat/MViTv2 recipes) and 0 otherwise; during warm-up
  (``e < W``) the LR rises linearly from ``warmup_start_lr`` to ``cos(W)``. The LR of a group is
  ``lr(step) × lr_scale``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["layer_id", "param_groups", "build_optimizer", "lr_at_step", "set_lr", "LAYER0_PREFIXES"]

LAYER0_PREFIXES = ("cls_token", "mask_token", "pos_embed", "patch_embed")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _strip(name: str) -> str:
    """Drop wrapper prefixes (``module.``, ``backbone.``) so ids match the bare backbone names."""
    for prefix in ("module.", "_orig_mod.", "backbone."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter name for layer decay (official rule, see module docstring)."""
    bare = _strip(name)
    if bare.startswith(LAYER0_PREFIXES):
        return 0
    m = _BLOCK_RE.match(bare) if bare.startswith("blocks.") else None
    if m:
        i = int(m.group(1))
        if i >= depth:
            raise ValueError(f"parameter {name!r} is in block {i} but the model depth is {depth}")
        return i + 1
    return depth + 1


def _decayed(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1 and not name.endswith(".bias")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    depth: Optional[int] = None,
) -> list[dict]:
    """AdamW groups merged by (lr_scale, weight_decay); each group carries ``lr_scale``.

    ``depth`` (number of blocks) is needed only when ``layer_decay < 1``; by default it is read
    from ``model.backbone.blocks`` or ``model.blocks``.
    """
    if layer_decay < 1.0 and depth is None:
        holder = getattr(model, "backbone", model)
        blocks = getattr(holder, "blocks", None)
        if blocks is None:
            raise ValueError("layer decay needs the model depth: the model has no .blocks / .backbone.blocks")
        depth = len(blocks)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = weight_decay if _decayed(name, p) else 0.0
        scale = 1.0 if layer_decay >= 1.0 else layer_decay ** (depth + 1 - layer_id(name, depth))
        key = (scale, wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # deterministic order: larger LR scale first, decayed before not decayed
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], -k[1]))]


def build_optimizer(groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    fused: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over the groups (names dropped; ``lr_scale`` kept on each group);
    ``fused`` selects torch's fused CUDA kernel."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    for g in clean:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), eps=eps, fused=True if fused else None)


def lr_at_step(
    step: int,
    steps_per_epoch: int,
    *,
    peak_lr: float,
    epochs: int,
    warmup_epochs: float,
    warmup_start_lr: float,
    end_lr: float,
    cosine_after_warmup: bool = True,
) -> float:
    """LR at optimiser step ``step`` (0-based), official SlowFast semantics (module docstring)."""
    e = step / steps_per_epoch

    def cosine(x: float) -> float:
        off = warmup_epochs if cosine_after_warmup else 0.0
        span = epochs - off
        if span <= 0:
            return peak_lr
        return end_lr + (peak_lr - end_lr) * (math.cos(math.pi * (x - off) / span) + 1.0) * 0.5

    if e < warmup_epochs:
        top = cosine(warmup_epochs)
        return warmup_start_lr + (top - warmup_start_lr) * e / warmup_epochs
    return cosine(e)


def set_lr(param_groups_: Iterable[dict], lr: float) -> None:
    """Write ``lr × lr_scale`` into every group (works on DeepSpeed's wrapped optimisers, whose
    ``param_groups`` are the base optimiser's groups)."""
    for g in param_groups_:
        g["lr"] = lr * g.get("lr_scale", 1.0)
