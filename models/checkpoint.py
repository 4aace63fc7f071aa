"""State-dict helpers for official SlowFast MaskFeat/MViTv2 checkpoints (DESIGN §3.4).

Our modules use the official attribute names, so ``state_dict()`` keys *are* the official keys
(``patch_embed.proj.weight``, ``cls_token``, ``pos_embed`` (ViT), ``mask_token``,
``blocks.N.{norm1,norm2,proj,mlp.fc1,mlp.fc2}.*``,
``blocks.N.attn.{qkv,proj,pool_q,pool_k,pool_v,norm_q,norm_k,norm_v}.*``,
``blocks.N.attn.rel_pos_{t,h,w}``, ``pred_head.transforms.0.0.*``, ``pred_head.projections.0.*``,
``norm.*``, ``head.projection.*``). What remains is:

- reading a ``.pyth`` file (``torch.save({"epoch", "model_state", "optimizer_state", "cfg"})``)
  and stripping a DDP ``module.`` prefix (:func:`extract_model_state`); both loaders drop the
  official MaskMViT's ``hogs.*`` HOG filter buffers;
- adapting tensors whose size depends on the resolution: relative-position tables are linearly
  interpolated (official ``get_rel_pos``; :func:`models.mvit.resize_rel_pos`) and a ViT's
  absolute position embedding trilinearly (official ``_get_pos_embed``) (:func:`adapt_state_dict`);
- loading a pre-training backbone into a classifier (:func:`load_backbone_into_classifier`):
  wrapper prefixes (``module.``, ``backbone.``, ``model.``) are stripped when that makes keys
  match, pre-training-only keys (``mask_token``, ``pred_head.*``, the official ``hogs.*`` HOG
  filter buffers) are dropped, tables resized (the last stage's, which pre-training computes on a
  grid twice as fine, first keep the rows of the classifier's offsets:
  :func:`strided_tables_to_classifier`), a head for another number of classes dropped (as
  SlowFast's fine-tuning start from a K400-fine-tuned checkpoint on another dataset), and the
  classifier's ``norm``/``head`` (and a stage transition's query-pooling conv absent from the checkpoint) keep
  their fresh initialisation, as the official fine-tuning start does. The official PT configs keep
  the 3x3x3 query-pooling conv of the last stage (stride 1), so it *is* in the checkpoint and loads.
  Anything else missing or left over is an error by default (a checkpoint of another model would
  otherwise leave blocks random and train from scratch silently); shape mismatches are reported
  in one line with a hint (embed dim / number of blocks).

Errors are plain ``ValueError``/``TypeError`` (models never import the engine; the engine turns
them into its ConfigError).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mvit import conv_out_size, resize_rel_pos

__all__ = [
    "LoadReport",
    "PRETRAIN_ONLY_PREFIXES",
    "extract_model_state",
    "adapt_state_dict",
    "resize_pos_embed",
    "load_state_dict_official",
    "load_backbone_into_classifier",
    "KNOWN_PREFIXES",
    "CLASSIFIER_NEW_PREFIXES",
    "strip_known_prefixes",
    "architecture_hint",
    "load_classifier_state",
]

# pre-training-only state: our MaskFeat's and the official MaskMViT's (whose HOGLayerC keeps its
# filters as persistent buffers, ``hogs.0.{weight_x,weight_y,gkern}``)
_OFFICIAL_HOG_PREFIX = "hogs."
PRETRAIN_ONLY_PREFIXES = ("mask_token", "pred_head.", _OFFICIAL_HOG_PREFIX)
# wrappers around a backbone's keys: DDP, a model holding the backbone as ``backbone``/``model``
KNOWN_PREFIXES = ("module.", "backbone.", "model.")
# what a classifier adds to the backbone by design: the final norm and the classification head
CLASSIFIER_NEW_PREFIXES = ("norm.", "head.")
# a query-pooling conv (and its norm) a pre-training model without that pooling lacks: fresh init,
# at the classifier's last stage transition only (_query_strided_blocks; pre-training keeps the
# stride at every other one, so their pooling is there; lacking it there is another architecture)
_FRESH_POOL_Q = re.compile(r"^blocks\.(\d+)\.attn\.(pool_q|norm_q)\.")
_LIST_KEYS = 5
_REL_POS_SUFFIXES = ("attn.rel_pos_t", "attn.rel_pos_h", "attn.rel_pos_w")


@dataclass
class LoadReport:
    """What a load did: keys the model has but the checkpoint lacked (left at their init), keys
    the checkpoint had but the model does not (ignored), tensors that were resized, and checkpoint
    tensors deliberately not loaded (a classification head for another number of classes)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    pretrain_only: list[str] = field(default_factory=list)
    """The checkpoint's pre-training-only tensors (mask token, prediction head, HOG filters), not
    loaded: a classifier has none."""

    def __str__(self) -> str:
        s = (
            f"loaded with {len(self.missing)} missing {self.missing}, {len(self.unexpected)} unexpected "
            f"{self.unexpected}, {len(self.resized)} resized tensors"
        )
        if self.pretrain_only:
            kinds = [name for prefix, name in (("pred_head.", "prediction head"), ("mask_token", "mask token"),
                                               (_OFFICIAL_HOG_PREFIX, "HOG filters"))
                     if any(k.startswith(prefix) for k in self.pretrain_only)]
            s += f"; left out the pre-training {', '.join(kinds)} ({len(self.pretrain_only)} tensors)"
        if self.dropped:
            s += f"; dropped the checkpoint's classification head {self.dropped} (another number of classes)"
        return s


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
    relative-position tables / position embedding to the model's resolution. The official
    MaskMViT's HOG filter buffers (``hogs.*``: fixed Sobel/Gaussian filters, which our HOG
    computes itself) are dropped."""
    sd = {k: v for k, v in extract_model_state(state).items() if not k.startswith(_OFFICIAL_HOG_PREFIX)}
    sd, resized = adapt_state_dict(model, sd)
    res = model.load_state_dict(sd, strict=strict)
    return LoadReport(list(res.missing_keys), list(res.unexpected_keys), resized)


def strip_known_prefixes(state: Mapping[str, torch.Tensor], own_keys: Iterable[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove a wrapper prefix (:data:`KNOWN_PREFIXES`: ``module.``, ``backbone.``, ``model.``)
    from the keys of ``state`` when that makes more of them match ``own_keys`` (a model's
    ``state_dict()`` keys); repeated for nested wrappers (``module.backbone.``). Keys without the
    prefix are kept as they are; a prefix whose removal would collide with an existing key is
    left alone. Returns the new dict and the prefixes removed, in order."""
    own = set(own_keys)
    out = dict(state)
    removed: list[str] = []
    changed = True
    while changed:
        changed = False
        for p in KNOWN_PREFIXES:
            if not any(k.startswith(p) for k in out):
                continue
            new = {(k[len(p):] if k.startswith(p) else k): v for k, v in out.items()}
            if len(new) < len(out):  # "x" and "p.x" both present: not a plain wrapper
                continue
            if sum(k in own for k in new) > sum(k in own for k in out):
                out, changed = new, True
                removed.append(p)
    return out, removed


def _first(keys: Sequence[str], n: int = _LIST_KEYS) -> str:
    """``a, b, c`` (the first ``n``) and ``(+K more)`` when there are more."""
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _num_blocks(keys: Iterable[str]) -> int:
    """1 + the largest ``N`` of the ``blocks.N.*`` keys (0 without blocks)."""
    ids = [int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()]
    return max(ids) + 1 if ids else 0


def architecture_hint(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """Why a checkpoint may not fit a model: a different embedding width (``patch_embed.proj``'s
    output channels) or number of blocks, as a phrase (empty when neither differs)."""
    hints = []
    k = "patch_embed.proj.weight"
    if k in state and k in own and state[k].shape[0] != own[k].shape[0]:
        hints.append(f"checkpoint embed dim {state[k].shape[0]}, the model expects {own[k].shape[0]}")
    nb_ck, nb_own = _num_blocks(state), _num_blocks(own)
    if nb_ck and nb_own and nb_ck != nb_own:
        hints.append(f"checkpoint has {nb_ck} blocks, the model {nb_own}")
    # MViTv2's channel doubling in the attention of the stage's first block (DIM_MUL_IN_ATT, the supervised
    # configs) or in the MLP of the block before (MaskFeat's): the residual projections sit one block apart
    proj_ck, proj_own = _residual_projections(state), _residual_projections(own)
    if proj_ck and proj_own and proj_ck != proj_own and len(proj_ck) == len(proj_own):
        if [b - 1 for b in proj_ck] == proj_own:
            hints.append("the checkpoint doubles channels in attention (DIM_MUL_IN_ATT, as the supervised MViTv2 "
                         "configs): set model.overrides.dim_mul_in_att=true")
        elif [b + 1 for b in proj_ck] == proj_own:
            hints.append("the checkpoint doubles channels in the MLP (MaskFeat's MViTv2): set "
                         "model.overrides.dim_mul_in_att=false")
    return "; ".join(hints)


def _residual_projections(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Indices of the blocks with a residual projection (``blocks.<i>.proj``: the channel doublings)."""
    found = (re.fullmatch(r"blocks\.(\d+)\.proj\.weight", k) for k in state)
    return sorted(int(m.group(1)) for m in found if m)


def _with_hint(msg: str, hint: str) -> str:
    if "dim_mul_in_att" in hint:
        return f"{msg} ({hint})"
    return f"{msg} ({hint}: weights of another model size?)" if hint else msg


def _drop_other_head(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> list[str]:
    """Remove ``head.*`` tensors whose shapes differ from the model's only in the number of
    classes (first dimension): a classifier fine-tuned on another dataset. Returns the keys."""
    head = [k for k in sd if k.startswith("head.")]
    if not head or not all(k in own for k in head):
        return []
    differ = [k for k in head if sd[k].shape != own[k].shape]
    if not differ or not all(sd[k].dim() == own[k].dim() and sd[k].shape[1:] == own[k].shape[1:] for k in differ):
        return []
    for k in head:
        del sd[k]
    return sorted(head)


def _check_fit(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], what: str, strict: bool,
               may_miss: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """Raise a one-line ``ValueError`` (with :func:`architecture_hint`) when a shared tensor of
    ``sd`` has another shape than ``own``'s, or — with ``strict`` — when a key of ``own`` not
    allowed by ``may_miss`` is absent or ``sd`` holds keys ``own`` lacks. Returns (missing,
    unexpected)."""
    hint = architecture_hint(sd, own)
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        first = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(bad)[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(_with_hint(f"{len(bad)} tensors of the checkpoint do not fit the {what} "
                                    f"(checkpoint vs model): {first}{more}", hint))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict:
        lost = [k for k in missing if not may_miss(k)]
        problems = []
        if lost:
            problems.append(f"{len(lost)} {what} tensors missing from the checkpoint (they would stay "
                            f"random): {_first(lost)}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint tensors the {what} does not have: {_first(unexpected)}")
        if problems:
            matched = len(sd) - len(unexpected)
            raise ValueError(_with_hint(f"the checkpoint does not fit the {what} ({matched} of {len(own)} "
                                        f"tensors match): " + "; ".join(problems), hint))
    return missing, unexpected


def load_classifier_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load a fine-tuned classifier's full state (``maskfeat eval`` of a weights file) strictly:
    wrapper prefixes stripped, every key present with the model's shape; otherwise a one-line
    ``ValueError`` (see :func:`load_backbone_into_classifier`) instead of torch's per-key list."""
    own = model.state_dict()
    sd, _ = strip_known_prefixes(extract_model_state(state), own)
    _check_fit(sd, own, "classifier", True, lambda k: False)
    model.load_state_dict(sd, strict=True)
    return LoadReport()


def _pool_axes(pool: Optional[nn.Module], what: str) -> tuple[int, ...]:
    """A pooling module's ``kernel_size``/``stride``/``padding`` per (t, h, w) axis (1/1/0 without one)."""
    if pool is None:
        return (0,) * 3 if what == "padding" else (1,) * 3
    v = getattr(pool, what)
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * 3
    return (((0,) if what == "padding" else (1,)) * 3 + v)[-3:]


def strided_tables_to_classifier(classifier: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """In place: when ``sd`` has MaskFeat pre-training's geometry, the relative-position tables of the
    blocks after the classifier's last stage transition are mapped offset by offset onto the
    classifier's grid. Returns the keys changed.

    Pre-training keeps the last stage at the previous stage's resolution (no query stride at its
    transition, :func:`models.variants.mvit_kwargs`, and the key stride not divided by it). So in
    MViTv2 its last-stage queries are twice as fine as the keys (14 against 7): a table of 27 rows
    indexed ``i − 2j + 12`` (offset 0 at row 12, the last row never read), where the classifier's 13
    rows are indexed ``i − j + 6`` on a grid twice as coarse: its row ``r`` is pre-training's row
    ``2r``. A linear resize of the whole table put the +1 offset at offset 0 and blended the unused
    row into the last: that is what later SlowFast loaders and mmaction2's MaskFeat loader do to every
    ``attn.rel_pos`` table of another length; SlowFast's ``load_checkpoint`` as stored here (058922e)
    loads only tensors of the same shape, leaving such tables at their fresh initialisation. In general each classifier row takes the pre-training row of the
    same offset (in the pre-training grid's units; linear between rows where it falls between), at
    the checkpoint's resolution; another resolution is then left to :func:`adapt_state_dict`.

    The geometry is read from the checkpoint, not from its keys (an export has no pre-training
    head; a headless classifier has no ``head.*``): pre-training's table after the transition is as
    long as the transition block's (both on the unstrided grid), a classifier's is shorter. The
    transition block itself has the same table length on both sides and loads as it is, as in the
    official code (one row off: its offset 0 is pre-training's row 12 and the classifier's row 13
    at MViTv2-S 224, its queries being the finer grid on one side and the keys on the other)."""
    blocks = list(getattr(classifier, "blocks", ()))
    strided = sorted(_query_strided_blocks(classifier))
    if not strided or strided[-1] + 1 >= len(blocks):
        return []
    last = strided[-1]
    own = classifier.state_dict()
    q_kernel, f_axes, q_pad = (_pool_axes(blocks[last].attn.pool_q, w) for w in ("kernel_size", "stride", "padding"))
    kv_before = _pool_axes(blocks[last - 1].attn.pool_k, "stride") if last > 0 else (1, 1, 1)
    changed: list[str] = []
    for axis, (suffix, f) in enumerate(zip(_REL_POS_SUFFIXES, f_axes)):
        at = sd.get(f"blocks.{last}.{suffix}")
        if f <= 1 or at is None or at.dim() != 2 or at.shape[0] % 2 == 0:
            continue
        n = (at.shape[0] + 1) // 2  # the unstrided grid of the transition's input, at the checkpoint's size
        for b in range(last + 1, len(blocks)):
            k = f"blocks.{b}.{suffix}"
            table = sd.get(k)
            if table is None or k not in own or table.dim() != 2 or table.shape[0] != at.shape[0]:
                continue  # a classifier's geometry (a shorter table): left to the resize
            pool_k = blocks[b].attn.pool_k
            kk, kvf, kp = (_pool_axes(pool_k, w)[axis] for w in ("kernel_size", "stride", "padding"))
            q_s, k_s = n, conv_out_size(n, kk, kv_before[axis], kp)  # pre-training: keys by the undivided stride
            q_d = conv_out_size(n, q_kernel[axis], f, q_pad[axis])
            k_d = conv_out_size(q_d, kk, kvf, kp)
            c_s = (k_s - 1) * max(q_s / k_s, 1.0)  # the row of offset 0 (DESIGN §3.5's index at i = j = 0)
            c_d = (k_d - 1) * max(q_d / k_d, 1.0)
            unit = max(q_s, k_s) / max(q_d, k_d)  # the classifier's step in pre-training rows
            pos = (c_s + (torch.arange(2 * max(q_d, k_d) - 1, dtype=torch.float64) - c_d) * unit)
            pos = pos.clamp(0, table.shape[0] - 1)
            lo = pos.floor().long()
            hi = (lo + 1).clamp(max=table.shape[0] - 1)
            w = (pos - lo.double()).to(torch.float32)[:, None]
            t = table.float()
            sd[k] = (t[lo] * (1 - w) + t[hi] * w).to(table.dtype)
            changed.append(k)
    return changed


def load_backbone_into_classifier(
    classifier: nn.Module, state: Union[str, os.PathLike, Mapping[str, Any]], strict: bool = True
) -> LoadReport:
    """Initialise a :class:`models.classifier.Classifier` from a MaskFeat pre-training checkpoint
    (or a fine-tuned one).

    Strips wrapper prefixes (:func:`strip_known_prefixes`), drops pre-training-only keys
    (:data:`PRETRAIN_ONLY_PREFIXES`), drops a classification head whose number of classes differs
    from the classifier's (a checkpoint fine-tuned on another dataset; listed in ``dropped``, as
    the official fine-tuning start does), resizes relative-position tables (the pre-training
    model has no last-stage query stride, so its last-stage tables are longer: the rows of the
    classifier's offsets are taken, :func:`strided_tables_to_classifier`; a resolution change is
    interpolated) and ``pos_embed``, and loads the rest. ``norm.*`` and ``head.*`` (:data:`CLASSIFIER_NEW_PREFIXES`) and a
    query-pooling conv of a stage transition (``blocks.N.attn.{pool_q,norm_q}.*`` where the classifier
    pools q with a stride) may be missing and keep their fresh
    initialisation.

    Raises ``ValueError`` (one line, before the classifier is touched) when a shared tensor has
    an incompatible shape, and — with ``strict`` (default) — when any other key is missing (its
    weights would stay random) or the checkpoint holds keys the classifier does not have; with
    ``strict=False`` those are only listed in the report.
    """
    own = classifier.state_dict()
    sd, _ = strip_known_prefixes(extract_model_state(state), own)
    pretrain_only = sorted(k for k in sd if k.startswith(PRETRAIN_ONLY_PREFIXES))
    sd = {k: v for k, v in sd.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
    dropped = _drop_other_head(sd, own)
    regridded = strided_tables_to_classifier(classifier, sd)
    sd, resized = adapt_state_dict(classifier, sd)
    resized = list(dict.fromkeys(regridded + resized))
    strided = _query_strided_blocks(classifier)
    last = max(strided, default=None)  # pre-training drops the stride of the last transition only

    def may_miss(k: str) -> bool:
        m = _FRESH_POOL_Q.match(k)
        return k.startswith(CLASSIFIER_NEW_PREFIXES) or (m is not None and int(m.group(1)) == last)

    missing, unexpected = _check_fit(sd, own, "classifier", strict, may_miss)
    res = classifier.load_state_dict(sd, strict=False)
    return LoadReport(list(res.missing_keys), list(res.unexpected_keys), resized, dropped, pretrain_only)


def _query_strided_blocks(model: nn.Module) -> set[int]:
    """Indices of the blocks whose query pooling has a stride (the stage transitions): the only
    ones whose ``pool_q``/``norm_q`` a pre-training model may lack (its last transition without the
    stride, and then without the pooling); a block pooling q at stride 1 in the classifier pooled it
    in pre-training too."""
    out = set()
    for i, blk in enumerate(getattr(model, "blocks", ())):
        pool = getattr(getattr(blk, "attn", None), "pool_q", None)
        stride = getattr(pool, "stride", None)
        if stride is not None and math.prod(stride if isinstance(stride, tuple) else (stride,)) > 1:
            out.add(i)
    return out
