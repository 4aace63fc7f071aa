"""Fine-tuning and evaluation of a MaskFeat backbone as a video classifier (DESIGN §3.6).

- Start: ``models.create_model(name, task="classify")``; a pre-trained backbone
  (``finetune.pretrained``: our ``.safetensors`` export or an official ``.pyth``) is loaded by
  ``models.checkpoint.load_backbone_into_classifier`` (relative-position tables resized: the last
  stage's to the rows of the classifier's offsets, then interpolated to another resolution;
  the last stage's query pooling fresh, a head of another class count dropped; any other missing
  or unexpected key, a shape of another model size or an unreadable file is a ConfigError naming
  the file and the first keys).
- Mixup / CutMix (timm ``Mixup`` batch mode): with probability ``mixup_prob`` a batch is mixed;
  when both are on, CutMix is chosen with ``switch_prob``; λ ~ Beta(α, α); the CutMix box is
  the same on every frame and λ is corrected to the box's true area; the partner of clip i is
  clip B−1−i (the batch flipped). Targets are label-smoothed one-hots (off = ε/K,
  on = 1 − ε + ε/K) mixed with the same λ; the loss is soft-target cross-entropy
  ``mean_b Σ_k −t_bk log softmax(z_b)_k``. Randomness comes from the rank's numpy Generator
  (saved in checkpoints). Recipe: mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1.
- Drop path and layer decay come from the config (``model.drop_path``, ``optim.layer_decay``).
- Evaluation: every view's softmax is summed per ``video_id`` over all ranks (views marked
  ``valid=False`` are padding repeats and are skipped), divided by the number of views, and
  top-1/top-5 are computed over videos (top-k with k capped at the number of classes). During
  fine-tuning the best top-1 is kept as the ``best`` checkpoint. An epoch's evaluation runs after
  the epoch's checkpoint (SlowFast's order), so a failing evaluation loses no training; a resume
  of this run from that checkpoint evaluates first when ``metrics.jsonl`` has no validation at its
  epoch (also after ``train.stop_after_steps`` at an epoch's end, which stops before evaluating).
- Classes: the TRAIN split defines them (``engine/data/datasets.py``). Fine-tuning writes
  ``<train.output_dir>/classes.json`` (names and classifier width K; rank 0, atomic) at start; on
  resume an existing file must match the train split (else :class:`ClassListError`). The eval
  split is listed through that list, by name. ``finetune.num_classes`` (0 = the number of
  training classes) must exceed every label, checked when the loaders are built (ConfigError).
- ``--resume`` of a run that already reached its last step trains and saves nothing
  (``engine.runner.train_loop`` returns ``already_complete``); it evaluates the final weights only
  when ``metrics.jsonl`` has no validation at that point (matched by epoch, which a change of
  global batch keeps comparable; an evaluation after the final save that failed); the best top-1
  is printed. A resumed run keeps the best top-1 of its ``best`` tag; one
  continued from another run's checkpoint starts its own.
- ``maskfeat eval`` (:func:`run_eval`): the checkpoint is resolved by :func:`resolve_checkpoint`;
  K comes from the checkpoint (its head's weight), the class names from the evaluated run's
  ``classes.json`` (a weights file: a ``classes.json`` beside it, if any; without one the eval
  split's own classes are used, with a warning); a ``finetune.num_classes`` that disagrees with
  the checkpoint is a ConfigError. The result goes to ``<run>/eval.json`` (a weights file:
  ``<file without extension>.eval.json``), whose path is printed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import Config, ConfigError, config_to_dict
from engine.data.datasets import ClassListError, class_index_from, class_key, read_class_index, write_class_index
from engine.distributed import DistInfo, gather_objects, init_distributed, is_main
from engine.pretrain import create_model, model_overrides
from engine.runner import Run, on_rank0, print0, report_paths, setup_run, train_loop

__all__ = [
    "one_hot_smoothed",
    "mix_batch",
    "soft_target_cross_entropy",
    "evaluate",
    "build_classifier",
    "run_finetune",
    "run_eval",
    "check_labels",
    "sync_class_index",
    "EvalTarget",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)
CLASS_INDEX = "classes.json"
HEAD_WEIGHT = "head.projection.weight"  # models.classifier.TransformerHead: (K, D)


def one_hot_smoothed(label: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int labels -> (B, K) soft targets: ``1 − ε + ε/K`` on the label, ``ε/K`` elsewhere."""
    off = smoothing / num_classes
    t = torch.full((label.shape[0], num_classes), off, device=label.device, dtype=torch.float32)
    return t.scatter_(1, label.long().view(-1, 1), 1.0 - smoothing + off)


def _cutmix_box(H: int, W: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
    y0, y1 = int(np.clip(cy - ch // 2, 0, H)), int(np.clip(cy + ch // 2, 0, H))
    x0, x1 = int(np.clip(cx - cw // 2, 0, W)), int(np.clip(cx + cw // 2, 0, W))
    return y0, y1, x0, x1


def mix_batch(
    x: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    rng: np.random.Generator,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    mixup_prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mixup/CutMix a batch (module docstring). x (B, C, T, H, W) or (B, C, H, W); returns the
    mixed input (new tensor), soft targets (B, K) and ``{"lam", "cutmix"}``."""
    lam, cutmix = 1.0, False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < mixup_prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            cutmix = bool(rng.random() < switch_prob)
            lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if cutmix else rng.beta(mixup_alpha, mixup_alpha))
        elif mixup_alpha > 0:
            lam = float(rng.beta(mixup_alpha, mixup_alpha))
        else:
            cutmix, lam = True, float(rng.beta(cutmix_alpha, cutmix_alpha))
    x = x.clone()
    if lam < 1.0:
        partner = x.flip(0)
        if cutmix:
            H, W = x.shape[-2:]
            y0, y1, x0, x1 = _cutmix_box(H, W, lam, rng)
            x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
        else:
            x = x * lam + partner * (1.0 - lam)
    t = one_hot_smoothed(label, num_classes, smoothing)
    target = t * lam + t.flip(0) * (1.0 - lam)
    return x, target, {"lam": lam, "cutmix": cutmix}


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_k −target_bk · log_softmax(logits)_bk`` (in fp32)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader, dtype: torch.dtype = torch.float32,
             predictions: bool = False) -> dict:
    """Multi-view accuracy: average softmax over the views of each video, top-1/top-5 (%).

    ``nonfinite_views`` counts views whose logits were not finite, ``nonfinite_videos`` their videos,
    which count as wrong (a warning is logged; ``topk`` of a NaN row is arbitrary and scored some of
    them right). ``predictions``: the result also holds ``"predictions"``, a dict of numpy
    arrays ``video`` (V,) dataset indices, ``label`` (V,) and ``probs`` (V, K) view-averaged."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    labels: dict[int, int] = {}
    nonfinite = 0
    for batch in loader:
        x = batch["video"] if "video" in batch else batch["image"]
        probs = F.softmax(forward(x.to(dtype)).float(), dim=-1).cpu()  # (B, K)
        vids = batch.get("video_id", batch["index"]).cpu().tolist()
        valid = batch.get("valid")
        valid = valid.cpu().tolist() if valid is not None else [True] * len(vids)
        finite = torch.isfinite(probs).all(dim=1).tolist()
        for i, (v, ok) in enumerate(zip(vids, valid)):
            if not ok:
                continue
            nonfinite += not finite[i]
            sums[v] = sums[v] + probs[i] if v in sums else probs[i].clone()
            counts[v] = counts.get(v, 0) + 1
            labels[v] = int(batch["label"][i])
    parts = gather_objects((sums, counts, labels, nonfinite))
    S: dict[int, torch.Tensor] = {}
    N: dict[int, int] = {}
    Y: dict[int, int] = {}
    bad = sum(p[3] for p in parts)
    for s, c, y, _ in parts:
        for v in s:
            S[v] = S[v] + s[v] if v in S else s[v]
            N[v] = N.get(v, 0) + c[v]
            Y[v] = y[v]
    if not S:
        raise RuntimeError("evaluation saw no valid views")
    ids = sorted(S)
    avg = torch.stack([S[v] / N[v] for v in ids])  # (V, K)
    y = torch.tensor([Y[v] for v in ids])
    k5 = min(5, avg.shape[1])
    top = avg.topk(k5, dim=1).indices  # (V, k5)
    finite = torch.isfinite(avg).all(dim=1)  # a video with a non-finite view is wrong (topk of NaN is arbitrary)
    top1 = round(((top[:, 0] == y) & finite).double().mean().item() * 100, 4)
    top5 = round(((top == y[:, None]).any(dim=1) & finite).double().mean().item() * 100, 4)
    bad_videos = int((~finite).sum())
    if bad and is_main():  # (every rank has the gathered numbers: said once)
        log.warning("evaluation: %d of %d views had non-finite logits (NaN/inf); their %d videos count as wrong "
                    "(a diverged model, or fp16 overflow: evaluate in fp32)", bad, int(sum(N.values())), bad_videos)
    res = {"top1": top1, "top5": top5, "videos": len(ids), "views": int(sum(N.values())), "nonfinite_views": bad,
           "nonfinite_videos": bad_videos}
    if predictions:
        res["predictions"] = {"video": np.asarray(ids), "label": y.numpy(), "probs": avg.numpy()}
    return res


def build_classifier(cfg: Config, num_classes: int, pretrained: bool = True,
                     classes: Optional[Sequence[str]] = None) -> nn.Module:
    """Classifier of ``cfg.model``, initialised from ``finetune.pretrained`` when given and
    ``pretrained`` (False: a resume, whose checkpoint holds every weight). ``classes``: this run's
    class names; an exported classifier whose own list differs keeps its backbone, not its head
    (a head of the same width loaded as it was: its class i's row initialised another class i)."""
    model = create_model(cfg.model.name, task="classify", num_classes=num_classes, **model_overrides(cfg, "classify"))
    if cfg.finetune.pretrained and pretrained:
        from engine.checkpoint import load_pretrained

        _check_pretrained(cfg)
        from models.checkpoint import load_backbone_into_classifier

        try:
            sd = load_pretrained(cfg.finetune.pretrained)
            note = _drop_head_of_other_classes(cfg.finetune.pretrained, sd, classes)
            report = load_backbone_into_classifier(model, sd)
        except (OSError, ValueError, TypeError) as e:  # unreadable file / weights of another model: exit 2
            raise ConfigError(f"finetune.pretrained={cfg.finetune.pretrained} (model.name={cfg.model.name}): "
                              f"{e}") from e
        print0(f"pre-trained backbone {cfg.finetune.pretrained}: {report}" + (f" ({note})" if note else ""))
    return model


def _drop_head_of_other_classes(path: str, sd: dict, classes: Optional[Sequence[str]]) -> Optional[str]:
    """Remove the ``head.*`` tensors of an exported classifier whose class list (its metadata) is not
    ``classes``; the note to print, or None when nothing was removed."""
    carried = _export_metadata(path).get("classes")
    head = [k for k in sd if k.startswith("head.")]
    if classes is None or not carried or not head:
        return None
    try:
        names, _ = class_index_from(json.loads(carried), f"the classes {path} carries")
    except (ValueError, ClassListError):  # unreadable: as a file without a list (SlowFast keeps such a head)
        return None
    if [class_key(n) for n in names] == [class_key(c) for c in classes]:
        return None  # (the same names, one list spelt in another Unicode form: a macOS copy of the folders)
    for k in head:
        del sd[k]
    return (f"its head was fine-tuned on other classes ({len(names)}: {', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}): the head starts fresh")


def check_labels(loader, num_classes: int, what: str, *, error: type[Exception] = ConfigError,
                 hint: str = "Set finetune.num_classes=0 (= the training classes) or a larger value") -> None:
    """Every label of ``loader.dataset`` must be below the classifier width ``num_classes``;
    ``what`` says where K came from (for the message). Raises ``error`` (with ``hint``) otherwise."""
    ds = loader.dataset
    if not len(ds):
        return
    top = max(ds.labels)
    if top >= num_classes:
        name = ds.class_names[top] if top < len(ds.class_names) else str(top)
        raise error(
            f"{what} is {num_classes}, but {ds.source} has label {top} (class {name!r}; "
            f"{max(len(ds.class_names), top + 1)} classes): the classifier needs at least {top + 1} outputs. {hint}")


def _check_pretrained(cfg: Config) -> None:
    path = cfg.finetune.pretrained
    if path and not os.path.exists(path):
        raise ConfigError(f"finetune.pretrained={path} not found (a .safetensors/.pt/.pyth "
                          "file; `maskfeat export RUN` writes RUN/backbone.safetensors)")
    from engine.checkpoint import not_weights

    why = not_weights(path) if path else None
    if why:
        raise ConfigError(f"finetune.pretrained={path}: {why}")


def _num_classes(cfg: Config, loader) -> int:
    """K: ``finetune.num_classes`` or the number of training classes; checked against the labels."""
    k = cfg.finetune.num_classes or int(getattr(loader, "num_classes", 0))
    names = list(getattr(loader, "class_names", ()) or ())
    if k < 1:
        raise ConfigError("the number of classes is unknown: set finetune.num_classes")
    # (before the labels: a class folder without videos has no label, and the labels' minimum was the
    # first said, then this one)
    if k < len(names):  # classes.json holds an output per name (it raised a bare ValueError)
        raise ConfigError(f"finetune.num_classes={k} is smaller than the {len(names)} classes the training split names "
                          f"(its classes.json or class folders, with or without videos): the head needs an "
                          f"output per class; set finetune.num_classes >= {len(names)}, or 0 for exactly {len(names)}")
    if k == 1:  # a softmax over one output is 1 whatever the input: nothing to learn
        raise ConfigError(
            f"the training split has one class ({names[0] if names else '?'}): a classifier needs at least 2. Check "
            f"data.dataset={cfg.data.dataset} and data.root={cfg.data.root} (a folder dataset takes each sub-folder of "
            "ROOT/train, or of ROOT when it has no split folders, as a class; a kinetics one reads ROOT/train.csv)")
    check_labels(loader, k, "finetune.num_classes" if cfg.finetune.num_classes else "the number of training classes")
    return k


def _diff(old: Sequence[str], new: Sequence[str]) -> str:
    gone = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    parts = ([f"missing now: {gone[:10]}"] if gone else []) + ([f"new: {added[:10]}"] if added else [])
    return "; ".join(parts) or ("same names in another order" if list(old) != list(new) else "the same names")


def sync_class_index(output_dir: str, class_names: Sequence[str], num_classes: int, *, resuming: bool,
                     write: bool) -> str:
    """Record the run's classes in ``<output_dir>/classes.json`` (module docstring).

    When ``resuming`` and the file exists, the training classes and K must equal the stored
    ones (ClassListError otherwise: the head's outputs would change meaning). ``write``: this
    process writes the file (global rank 0). Returns the path."""
    path = os.path.join(output_dir, CLASS_INDEX)
    names = [str(n) for n in class_names]
    if resuming and os.path.isfile(path):
        old, old_k = read_class_index(path)
        if old != names:
            raise ClassListError(
                f"resuming a run whose classes changed: {path} lists {len(old)} classes (K={old_k}), the "
                f"train split now has {len(names)} (K={num_classes}) ({_diff(old, names)}). Restore the "
                "dataset, or fine-tune into a new train.output_dir")
        if old_k != num_classes:  # the same classes: finetune.num_classes changed
            raise ClassListError(
                f"resuming a run whose head had K={old_k} outputs ({path}; the same {len(names)} classes) with "
                f"K={num_classes}: set finetune.num_classes={old_k} as the run was "
                "started, or fine-tune into a new train.output_dir")
        return path
    if write:
        write_class_index(path, names, num_classes)
    return path


def _train_folder_classes(cfg: Config, num_classes: int) -> Optional[list[str]]:
    """The class names of a folder dataset's train split, as fine-tuning numbers them (its class
    folders), when there are at most ``num_classes``; None for list datasets (their labels are numbers
    already), for the train split itself, or when the train split cannot be listed. Weights without
    a class list (an official .pyth) had the eval split numbered on its own: a val split lacking a
    class shifted every later label (top-1 0 where the same weights with their list gave 50)."""
    from engine.data.datasets import split_folder, subfolders

    if cfg.data.dataset not in ("folder", "image_folder") or cfg.finetune.eval_split == "train":
        return None
    try:  # the class folders only (scan_class_folders' names), not ImageNet's 1.3 M files
        root = (split_folder(cfg.data.root, "train") if cfg.data.dataset == "folder"
                else os.path.join(cfg.data.root, "train"))
        names = subfolders(root)
    except (OSError, ValueError):  # no train split here: the eval split's own numbering, with its warning
        return None
    return list(names) if 0 < len(names) <= num_classes else None  # (a run may have set num_classes above them)


def _eval_loader(cfg: Config, dist: DistInfo, classes: Optional[Sequence[str]]):
    from engine.data import build_loader

    return build_loader(cfg.data, cfg.finetune.eval_split, rank=dist.rank, world_size=dist.world_size,
                        device=dist.device, mode="test", classes=classes)


def run_finetune(cfg: Config, resume: Optional[str] = None) -> dict:
    """Fine-tune according to ``cfg``; evaluates every ``train.eval_every_epochs`` and at the end."""
    from engine.data import build_loader

    def loader(dist: DistInfo):
        train = build_loader(cfg.data, "train", rank=dist.rank, world_size=dist.world_size,
                             device=dist.device, mode="finetune")
        # the evaluation split too validates before train.overwrite clears the folder (setup_run)
        state["eval_loader"] = _eval_loader(cfg, dist, list(train.class_names))
        return train

    from engine.checkpoint import checkpoint_dir, resolve_resume, restorable_step_tags
    from engine.pretrain import check_model_config

    # what needs no data is checked first (train.overwrite may clear the folder before the build)
    check_model_config(cfg.model.name, cfg.model.overrides, cfg.data.dataset)
    ft = cfg.finetune
    state: dict = {}
    source = resolve_resume(resume, cfg.train.output_dir) if resume else None  # (checkpoints dir, tag)
    # --resume auto of a step tag that a stopped re-save left as <tag>.old: setup_run puts it back and resumes it
    repairing = resume == "auto" and source is None and bool(restorable_step_tags(checkpoint_dir(cfg.train.output_dir)))
    resuming = source is not None or repairing
    if not resuming:
        _check_pretrained(cfg)
        if not cfg.finetune.pretrained:  # (a real recipe ships with it empty: say so, once)
            print0("finetune.pretrained is empty: the classifier starts from random weights (set it to a "
                   "`maskfeat export` .safetensors or an official .pyth to fine-tune a pre-trained backbone)")
    source_run = os.path.dirname(source[0]) if source else None
    # continuing another run's checkpoint in this train.output_dir (its classes and best are not here)
    other_run = bool(source_run) and os.path.realpath(source_run) != os.path.realpath(cfg.train.output_dir)

    def build(train_loader) -> nn.Module:
        # checks only: train.overwrite clears the folder after the build (setup_run), so classes.json
        # is written after setup_run returns
        if resuming and cfg.finetune.pretrained:  # as SlowFast's auto-resume: the checkpoint holds every weight
            # (said here, once setup_run has refused a checkpoint of the other kind: checkpoint.check_task)
            print0(f"resuming {source[1] if source else 'the latest checkpoint'}: finetune.pretrained="
                   f"{cfg.finetune.pretrained} is not read (the checkpoint holds the weights)")
        state["K"] = _num_classes(cfg, train_loader)
        state["classes"] = list(train_loader.class_names)
        state["write"] = getattr(train_loader, "rank", 0) == 0
        mixing = ft.mixup_prob > 0 and (ft.mixup_alpha > 0 or ft.cutmix_alpha > 0)
        b = cfg.data.batch_size
        if state["write"] and b % 2 and mixing:  # (once: rank 0)
            what = ("(one video per GPU) a clip is mixed with itself or its own repeat, so nothing is mixed" if b == 1
                    else f"the middle video of each batch is mixed with itself or its own repeat: 1 in {b} is never "
                         "mixed")
            log.warning(f"mixup/cutmix pair each clip with the batch flipped: with data.batch_size={b} {what} (as in "
                        f"SlowFast); use an even data.batch_size{'' if b > 1 else ' or set finetune.mixup_prob=0'}")
        if other_run:  # its classes must be these (the head's outputs)
            sync_class_index(source_run, state["classes"], state["K"], resuming=True, write=False)
        else:
            sync_class_index(cfg.train.output_dir, state["classes"], state["K"], resuming=resuming, write=False)
        check_labels(state["eval_loader"], state["K"],
                     "finetune.num_classes" if cfg.finetune.num_classes else "the number of training classes")
        return build_classifier(cfg, state["K"], pretrained=not resuming, classes=state["classes"])

    run = setup_run(cfg, build_model=build, build_loader=loader,
                    clips_per_rank=lambda l: cfg.data.batch_size * getattr(l, "repeats", 1),  # images: none
                    resume=resume, desc="finetune")
    K = state["K"]
    sync_class_index(cfg.train.output_dir, state["classes"], K, resuming=run.resumed_own, write=state["write"])
    # a resumed run keeps the best top-1 of its `best` tag, which may be newer than the checkpoint it
    # resumed from (an evaluation after the final save, or a crash between the two saves); a run
    # continued from another run's checkpoint starts its own `best` (the other run's is not here).
    # Read on rank 0: `best` is saved by every rank, so all must agree on the comparison
    if other_run:
        run.state.best_metric = -math.inf
    run.state.best_metric = max(run.state.best_metric, on_rank0(lambda: saved_best_metric(cfg.train.output_dir)))
    best_split = on_rank0(lambda: _split_of(os.path.join(cfg.train.output_dir, "checkpoints", "best")))
    if best_split not in (None, cfg.finetune.eval_split):  # a top-1 of another split is no bar to pass
        print0(f"resume: `best` was selected on split {best_split!r}, this run evaluates "
               f"{cfg.finetune.eval_split!r} (finetune.eval_split): its next evaluation replaces `best`")
        run.state.best_metric = -math.inf
    eval_loader = state["eval_loader"]

    def step(batch: dict) -> torch.Tensor:
        state["trained"] = True
        x = batch["video"] if "video" in batch else batch["image"]
        x, target, _ = mix_batch(x, batch["label"], K, run.rng, mixup_alpha=ft.mixup_alpha,
                                 cutmix_alpha=ft.cutmix_alpha, mixup_prob=ft.mixup_prob,
                                 switch_prob=ft.switch_prob, smoothing=ft.label_smoothing)
        logits = run.engine(x.to(run.dtype))  # (B, K)
        return soft_target_cross_entropy(logits, target)

    def do_eval(r: Run) -> dict:
        r.engine.eval()
        res = evaluate(lambda x: r.engine(x), eval_loader, r.dtype)
        r.engine.train()
        state["eval_step"] = r.state.step
        # `best` is saved before the record is written: a resume evaluates again when metrics.jsonl lacks
        # it, so a save that fails (disk full) or is killed cannot leave a recorded score that no `best` holds
        if res["nonfinite_views"]:  # a diverging model's score is not one to keep as `best`
            r.logger.write(f"step {r.state.step}: not a candidate for `best` ({res['nonfinite_views']} views with "
                           "non-finite logits)")
        elif res["top1"] > r.state.best_metric:
            r.state.best_metric = res["top1"]
            r.save("best", update_latest=False, keep=0)
        # (recorded as validation, "split": "val", whichever data split finetune.eval_split names)
        r.logger.scalars(r.state.step, {**res, "epoch": r.state.step / r.derived.steps_per_epoch,
                                        "data_split": cfg.finetune.eval_split}, prefix="val")
        r.logger.write(f"epoch {r.state.epoch} step {r.state.step}: {cfg.finetune.eval_split} top-1 {res['top1']:.2f} "
                       f"top-5 {res['top5']:.2f} ({res['videos']} {'images' if 'image' in cfg.data.dataset else 'videos'}, "
                       f"{res['views']} views)")
        return res

    def on_epoch_end(r: Run) -> None:
        every = cfg.train.eval_every_epochs
        last = r.state.step >= r.derived.run_steps  # evaluated by on_finish, after the final checkpoint
        if every > 0 and r.state.epoch % every == 0 and not last:
            state["last_eval"] = do_eval(r)

    def on_finish(r: Run) -> None:
        # the final weights, after the final checkpoint (an error here loses no training); also on
        # an already-complete resume whose final evaluation did not happen (it failed after the final
        # save). A better score saves `best`, whose state a resume reads back
        if state.get("eval_step") == r.state.step:
            return
        # metrics.jsonl is consulted only when this run trained nothing (its records before a step
        # rescale count in other units); every rank takes the same branch
        if state.get("trained") or not on_rank0(
                lambda: evaluated_at(cfg, r.state.step, r.state.step / r.derived.steps_per_epoch)):
            state["last_eval"] = do_eval(r)

    st, every = run.state, cfg.train.eval_every_epochs
    # the checkpoint itself at that epoch's end: another global batch can map a position inside the epoch
    # back to its start (map_data_position), and those weights trained past the evaluation point
    at_epoch_end = run.resumed_epoch is None or abs(run.resumed_epoch - st.epoch) < 1e-9
    if (run.resumed_own and every > 0 and st.epoch > 0 and st.batch_in_epoch == 0 and st.epoch % every == 0
            and at_epoch_end and st.step < run.derived.run_steps
            and not on_rank0(lambda: evaluated_at(cfg, run.resumed_step, run.resumed_epoch))):
        # the epoch-end evaluation runs after the epoch's checkpoint: it failed, or the run stopped,
        # after that save. Done now, before training on (every rank takes the same branch)
        print0(f"resume: the evaluation due at the end of epoch {st.epoch} is not in metrics.jsonl; evaluating first")
        state["last_eval"] = do_eval(run)
    summary = train_loop(run, step, on_epoch_end=on_epoch_end, on_finish=on_finish)
    summary["eval"] = state.get("last_eval")
    summary["best_top1"] = run.state.best_metric
    report_paths(run, summary)
    if run.main and summary.get("already_complete") and math.isfinite(run.state.best_metric):
        print(f"best top-1 {run.state.best_metric:.2f} (checkpoint "
              f"{os.path.join(os.path.abspath(cfg.train.output_dir), 'checkpoints', 'best')})", flush=True)
    if run.main and summary["eval"] is not None:
        best = os.path.join(os.path.abspath(cfg.train.output_dir), "checkpoints", "best")
        # (no evaluation qualified for `best` when each had non-finite logits: -inf, and no such folder)
        kept = (f"best top-1 {run.state.best_metric:.2f} (checkpoint {best})"
                if math.isfinite(run.state.best_metric) and os.path.isdir(best) else "no `best` checkpoint")
        print(f"final {cfg.finetune.eval_split} top-1 {summary['eval']['top1']:.2f}  top-5 {summary['eval']['top5']:.2f}; "
              f"{kept}", flush=True)
    return summary


@dataclass
class EvalTarget:
    """What ``maskfeat eval --checkpoint PATH`` evaluates (:func:`resolve_checkpoint`)."""

    where: str
    """The checkpoint tag directory or the weights file (for messages and eval.json)."""
    weights: Optional[str]
    """A weights file (.safetensors/.pt/.pyth), or None for a DeepSpeed checkpoint."""
    ckpt_dir: Optional[str]
    tag: Optional[str]
    run_dir: Optional[str]
    """The run directory of a DeepSpeed checkpoint (parent of ``checkpoints/``); None for a file."""
    class_index: Optional[str]
    """``classes.json`` of the run (or beside the weights file) when it exists."""
    eval_json: str
    """Where the result is written."""
    classes: Optional[str] = None
    """The class index a ``maskfeat export`` classifier carries (its metadata's ``classes``, the JSON of
    its run's ``classes.json`` when exported); it comes before ``class_index``."""


def resolve_checkpoint(path: str) -> EvalTarget:
    """Resolve ``--checkpoint``: a run directory or its ``checkpoints/`` directory (``best``, else the
    latest complete checkpoint), the ``checkpoints/latest`` file (the tag it names), a
    ``checkpoints/<tag>`` directory (``engine.checkpoint.locate_checkpoint``, shared with
    ``--resume PATH``), or a weights file. A missing or unrecognised path raises ConfigError (exit 2,
    as a missing ``--resume``: the path is a command-line argument, not the dataset)."""
    from engine.checkpoint import is_tag_of_a_run, locate_checkpoint

    p = os.path.abspath(path)
    try:
        found = locate_checkpoint(path, prefer_best=True)
    except FileNotFoundError as e:
        raise ConfigError(f"--{e}") from None  # "--checkpoint PATH not found", "--checkpoint PATH: not a run ..."
    tag_dir = os.path.dirname(p)
    if found is None and os.path.basename(p).endswith("model_states.pt") and is_tag_of_a_run(tag_dir):
        found = (os.path.dirname(tag_dir), os.path.basename(tag_dir))  # one file of a DeepSpeed tag: the tag
    if found is None:  # a file other than checkpoints/latest: weights
        stem = os.path.splitext(p)[0]
        # the classes an export carries, else those of the run it names: a classes.json beside the file can be
        # another run's
        classes = _export_metadata(p).get("classes")
        ci = None if classes else _export_class_index(p)
        if not classes and ci is None and os.path.isfile(os.path.join(os.path.dirname(p), CLASS_INDEX)):
            ci = os.path.join(os.path.dirname(p), CLASS_INDEX)
        return EvalTarget(where=p, weights=p, ckpt_dir=None, tag=None, run_dir=None, class_index=ci,
                          eval_json=stem + ".eval.json", classes=classes)
    ck, tag = found
    real_ck = os.path.dirname(os.path.realpath(os.path.join(ck, tag)))  # (a link to a run's tag: that run)
    if os.path.basename(real_ck) != "checkpoints":  # a tag folder copied out of its run: no run around it
        # (a classes.json two folders up would be someone else's); results beside the tag
        return EvalTarget(where=os.path.join(ck, tag), weights=None, ckpt_dir=ck, tag=tag, run_dir=None,
                          class_index=None, eval_json=os.path.join(ck, f"{tag}.eval.json"))
    run_dir = os.path.dirname(real_ck)
    ci = os.path.join(run_dir, CLASS_INDEX)
    return EvalTarget(where=os.path.join(ck, tag), weights=None, ckpt_dir=ck, tag=tag, run_dir=run_dir,
                      class_index=ci if os.path.isfile(ci) else None, eval_json=os.path.join(run_dir, "eval.json"))


def _export_metadata(path: str) -> dict:
    """The metadata of a ``maskfeat export`` safetensors file (``source``, ``config``); empty for
    another file (a .pyth, a .pt) or one without."""
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file: nothing to read
        return {}


def trained_config(target: EvalTarget) -> Optional[dict]:
    """The config the evaluated model was trained with: its tag's ``config.yaml``, or the one a
    ``maskfeat export`` file carries; None without one (an official .pyth, a plain .pt)."""
    from engine.checkpoint import _saved_config

    if target.ckpt_dir is not None:
        return _saved_config(os.path.join(target.ckpt_dir, target.tag))
    text = _export_metadata(target.weights).get("config") if target.weights else None
    if not text:
        return None
    from engine.config import _yaml_load

    try:
        saved = _yaml_load(text)
    except ConfigError:
        return None
    return saved if isinstance(saved, dict) else None


def check_eval_model(target: EvalTarget, cfg: Config) -> None:
    """ConfigError when this config builds the evaluated model otherwise than it was trained: another
    ``model.name`` or a ``model.overrides`` entry that changes what the model computes (the
    run-time and training-only ones of ``checkpoint.NON_SHAPE_OVERRIDES`` may differ). One that
    leaves the shapes as they are (``use_mean_pooling``: the same weights, pooled otherwise) loaded
    cleanly and was evaluated as another model."""
    from engine.checkpoint import config_changes

    saved = trained_config(target)
    if saved is None or not isinstance(saved.get("model"), dict):
        return
    # the resume check's rule (checkpoint.config_changes): model.name, and the model.overrides entries
    # outside checkpoint.NON_SHAPE_OVERRIDES (a free-form dict: an entry on one side only is a change)
    diff, _ = config_changes({"model": saved["model"]}, {"model": config_to_dict(cfg)["model"]})
    if diff:
        raise ConfigError(f"--checkpoint {target.where} was trained with another model than this config builds: "
                          + ", ".join(diff) + " (trained -> now). Evaluate with the model settings it was trained "
                          "with (its run's config.yaml)")


def _export_class_index(path: str) -> Optional[str]:
    """``classes.json`` of the run a ``maskfeat export`` file came from (its metadata's ``source``
    tag folder), when that run is still there: an export written elsewhere (``--out``) has none
    beside it, and its eval split was numbered on its own (a split lacking a training class
    shifted the labels: top-1 0 for a model right half of the time)."""
    source = _export_metadata(path).get("source")
    if not source:
        return None
    ci = os.path.join(os.path.dirname(os.path.dirname(source)), CLASS_INDEX)
    return ci if os.path.isfile(ci) else None


def evaluated_at(cfg: Config, step: int, epoch: Optional[float] = None) -> bool:
    """Whether ``metrics.jsonl`` of the run records a validation at ``step`` (False without one, or
    with ``log.jsonl`` off: then the caller evaluates again). With ``epoch``, a record that has an
    ``epoch`` matches by it: step numbers change unit when a resume changes the global batch, and an
    old-unit validation at the same step number is another point of training."""
    path = os.path.join(cfg.train.output_dir, "metrics.jsonl")
    if not cfg.log.jsonl or not os.path.isfile(path):
        return False
    with open(path) as f:
        for line in f:
            if '"val"' in line:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("split") != "val":
                    continue
                if epoch is not None and isinstance(rec.get("epoch"), (int, float)):
                    if abs(float(rec["epoch"]) - epoch) < 1e-9:
                        return True
                elif rec.get("step") == step:
                    return True
    return False


def saved_best_metric(output_dir: str) -> float:
    """The best top-1 recorded in ``<output_dir>/checkpoints/best`` (rank 0's engine state), or -inf
    without a readable one."""
    path = os.path.join(output_dir, "checkpoints", "best", "engine_state_r00000.pt")
    if not os.path.isfile(path):
        return -math.inf
    try:
        return float(torch.load(path, map_location="cpu", weights_only=False)["train_state"]["best_metric"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError):
        return -math.inf  # a damaged `best` is replaced by the next evaluation


def _gathered(items: list) -> list:
    """``items`` of every rank, in rank order, without repeats (every rank calls this)."""
    return list(dict.fromkeys(x for part in gather_objects(list(items)) for x in part))


def _selected_on(target: EvalTarget) -> Optional[str]:
    """The split whose top-1 picked the ``best`` checkpoint being evaluated (None for other tags)."""
    if target.tag != "best" or target.ckpt_dir is None:
        return None
    return _split_of(os.path.join(target.ckpt_dir, target.tag)) or "val"


def _split_of(tag_path: str) -> Optional[str]:
    """``finetune.eval_split`` of the config a tag was saved with (None without a readable one)."""
    from engine.checkpoint import _saved_config

    saved = _saved_config(tag_path)
    return None if saved is None else (saved.get("finetune") or {}).get("eval_split", "val")


def run_eval(cfg: Config, checkpoint: str, save_predictions: bool = False) -> dict:
    """Evaluate a fine-tuned model (module docstring): ``checkpoint`` is anything
    :func:`resolve_checkpoint` takes. K comes from the checkpoint, the class names from the run's
    ``classes.json``; the result, with what was evaluated (split, views, files left out), is written
    to the evaluated run's ``eval.json`` and appended to ``evals.jsonl`` beside it (a weights file's:
    ``<file>.eval.json``, ``<file>.evals.jsonl``) (earlier
    evaluations are kept there). ``save_predictions``: the view-averaged probabilities per video go
    to ``<eval.json without .json>.predictions.npz`` (``video``, ``path``, ``label``, ``probs``)."""
    from engine.checkpoint import consolidated_state_dict, load_pretrained, write_text_atomic

    from engine.pretrain import check_model_config

    check_model_config(cfg.model.name, cfg.model.overrides, cfg.data.dataset)
    target = resolve_checkpoint(checkpoint)
    check_eval_model(target, cfg)
    dist = init_distributed(cfg.train.device)
    if target.weights:
        try:
            sd = load_pretrained(target.weights)
        except (OSError, ValueError, TypeError) as e:  # an unreadable weights file: exit 2, one line
            raise ConfigError(f"--checkpoint {e}") from e
    else:
        from engine.checkpoint import _UNREADABLE, CheckpointError, _unreadable, available_tags

        try:
            sd = consolidated_state_dict(target.ckpt_dir, target.tag)
        except FileNotFoundError as e:  # a tag folder without DeepSpeed's model states
            raise CheckpointError(f"--checkpoint {target.where}: {e} (an incomplete or damaged checkpoint)") from e
        except _UNREADABLE as e:  # cut short or zero-filled (a traceback, exit 1): what resume and export say
            if not _unreadable(e):
                raise
            others = [t for t in available_tags(target.ckpt_dir) if t != target.tag]
            hint = (f"the run's other complete checkpoints: {', '.join(others)} (--checkpoint "
                    f"{os.path.join(target.ckpt_dir, others[-1])})" if others else "no other complete checkpoint")
            path = os.path.join(target.ckpt_dir, target.tag)
            raise CheckpointError(f"--checkpoint {target.where}: checkpoint {path} is damaged "
                                  f"({type(e).__name__}: {str(e)[:200]}); {hint}") from e
    from models.checkpoint import KNOWN_PREFIXES

    # the head under a wrapper prefix too (an official .pyth saved from DDP: module.head...)
    head = next((k for k in (HEAD_WEIGHT, *(p + HEAD_WEIGHT for p in KNOWN_PREFIXES),
                             *(p + q + HEAD_WEIGHT for p in KNOWN_PREFIXES for q in KNOWN_PREFIXES)) if k in sd), None)
    if head is None:
        raise ConfigError(f"--checkpoint {target.where}: no {HEAD_WEIGHT} (not a fine-tuned classifier; a "
                          "pre-trained backbone is fine-tuned with maskfeat finetune first)")
    K = int(sd[head].shape[0])
    names: Optional[list[str]] = None
    if target.classes or target.class_index:
        if target.classes:
            source = f"the classes {target.where} carries"
            try:
                data = json.loads(target.classes)
            except ValueError as e:
                raise ClassListError(f"{source} are not valid JSON ({e})") from None
            names, k_json = class_index_from(data, source)
        else:
            source = target.class_index
            names, k_json = read_class_index(target.class_index)
        if k_json != K:
            raise ClassListError(f"{source} says the classifier has {k_json} classes, but the head of "
                                 f"{target.where} has {K} outputs: they are not from the same run")
    if cfg.finetune.num_classes and cfg.finetune.num_classes != K:
        raise ConfigError(f"finetune.num_classes={cfg.finetune.num_classes}, but the checkpoint {target.where} "
                          f"has {K} classes; leave finetune.num_classes=0 for eval (K is read from the checkpoint)")
    if names is None:
        names = _train_folder_classes(cfg, K)
        if names is not None:
            print0(f"{target.where} carries no class list: classes numbered as fine-tuning numbers them, by the "
                   f"train split's {len(names)} class folders")
    if names is None:
        msg = (f"{target.where}: no {CLASS_INDEX} of its run; the classes of split {cfg.finetune.eval_split!r} are "
               f"numbered on their own (class folders sorted by name, list labels as written), which matches "
               f"training only when both splits hold the same classes")
        if dist.rank == 0:
            log.warning(msg)
    try:
        loader = _eval_loader(cfg, dist, names)
    except ClassListError as e:  # another dataset than the model's (a --config without the run's data settings)
        saved = (trained_config(target) or {}).get("data") or {}
        now = config_to_dict(cfg)["data"]
        other = [f"data.{k}={saved[k]}" for k in ("dataset", "root") if saved.get(k) not in (None, now.get(k))]
        if not other:
            raise
        raise ClassListError(f"{e}. {target.where} was trained with {', '.join(other)}: this evaluation reads other "
                             "data (without --config maskfeat eval takes the run's own config; or set them)") from None
    check_labels(loader, K, f"the number of classes of {target.where}", error=ClassListError,
                 hint=f"Split {cfg.finetune.eval_split!r} holds classes the model was not trained on")
    model = create_model(cfg.model.name, task="classify", num_classes=K, **model_overrides(cfg, "classify"))
    from models.checkpoint import load_classifier_state

    try:
        load_classifier_state(model, sd)
    except (ValueError, TypeError) as e:
        size = ""
        if "rel_pos" in str(e) or "pos_embed" in str(e):  # tables sized by the input: say which settings
            size = (f" (position tables follow the input: data.crop_size={cfg.data.crop_size} and "
                    f"data.num_frames={cfg.data.num_frames} here; give the values the model was trained with)")
        raise ConfigError(f"--checkpoint {target.where} (model.name={cfg.model.name}): {e}{size}") from e
    model.to(dist.device).eval()
    image = cfg.data.dataset == "image_folder"
    clips, crops = (1, 1) if image else (cfg.data.num_clips, cfg.data.num_crops)  # an image: one centre view
    print0(f"evaluating {target.where} on {cfg.data.dataset}/{cfg.finetune.eval_split} ("
           + ("one centre crop per image" if image else f"{clips} clip{'s' * (clips != 1)} x {crops} "
                                                         f"crop{'s' * (crops != 1)} per video") + f", {K} classes)")
    selected_on = _selected_on(target)
    if selected_on == cfg.finetune.eval_split and dist.rank == 0:
        log.warning("%s was selected by its top-1 on split %r, the split evaluated now: an optimistic number "
                    "(SlowFast reports the final checkpoint: --checkpoint %s)", target.where, selected_on,
                    os.path.join(target.ckpt_dir, "latest"))
    res = evaluate(model, loader, predictions=save_predictions)
    preds = res.pop("predictions", None)
    res.update(checkpoint=target.where, selected_on=selected_on, split=cfg.finetune.eval_split,
               dataset=cfg.data.dataset, root=cfg.data.root, clips=clips, crops=crops,
               precision="fp32", time=time.strftime("%Y-%m-%dT%H:%M:%S"),
               left_out=loader.report.records(), decode_failures=_gathered(getattr(loader, "decode_failures", [])))
    if dist.rank == 0 and (res["left_out"] or res["decode_failures"]):
        log.warning("%d files of split %r were left out by data.on_bad_file=skip, %d more failed to decode: their "
                    "views are not scored, and a video with none left is not counted (%d videos scored; all listed "
                    "in eval.json)", len(res["left_out"]), cfg.finetune.eval_split, len(res["decode_failures"]),
                    res["videos"])
    if dist.rank == 0:
        print(json.dumps({k: v for k, v in res.items() if k != "left_out"}), flush=True)
        # the run's evals.jsonl; a weights file's own <file>.evals.jsonl (not one shared by its folder)
        history = target.eval_json[:-len("eval.json")] + "evals.jsonl"
        path = os.path.splitext(target.eval_json)[0] + ".predictions.npz"
        try:
            os.makedirs(os.path.dirname(target.eval_json), exist_ok=True)
            write_text_atomic(target.eval_json, json.dumps(res, indent=1))
            with open(history, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"eval results written to {target.eval_json} (and appended to {history})", flush=True)
            if preds is None and os.path.exists(path):  # an earlier evaluation's: it would not match eval.json
                os.remove(path)
            if preds is not None:
                paths = np.asarray([loader.dataset.paths[i] for i in preds["video"]])
                tmp = path + ".tmp.npz"
                np.savez_compressed(tmp, path=paths, **preds)
                os.replace(tmp, path)
                res["predictions"] = path
                print(f"per-video predictions written to {path}", flush=True)
        except OSError as e:  # a read-only model zoo or someone else's run: the result above is the record
            print(f"warning: eval results not all written beside {target.where} ({type(e).__name__}: {e}); the "
                  "JSON line above is the result", file=sys.stderr, flush=True)
    res["eval_json"] = target.eval_json
    return res
