"""Checkpoints: atomic DeepSpeed saves, ``--resume auto``, and export of a consolidated backbone.

Layout under ``<output_dir>/checkpoints``::

    latest                      # text: the tag of the newest *complete* checkpoint
    step00000120/               # a DeepSpeed tag (model/optimizer shards of every rank)
        config.yaml             # the resolved config of the run
        engine_state_r00000.pt  # per rank: step, epoch, loader state, RNG states, counters
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...
    best/                       # fine-tuning: the checkpoint with the best validation top-1

A save goes to a hidden temporary tag (``.tmp-step…``); only when every rank has written its
shards is it renamed to its final name and ``latest`` replaced (``os.replace``), so an
interrupted save never becomes ``latest`` and ``--resume auto`` never sees half a checkpoint.
With a non-shared filesystem (each node writes its own shards) the rename happens on the first
local rank of every node.

Resume compatibility (checked before DeepSpeed is called, :func:`check_resume_compatible`): ZeRO-1/2/3
partition the optimiser state (stage 3 also the weights) over the data-parallel ranks, and
DeepSpeed cannot load such a checkpoint into another world size; stage 3 cannot load a stage 1/2
checkpoint nor the reverse, and stage 0 has no partitions at all. So a ZeRO-1/2/3 checkpoint
resumes with its own world size, a stage change is allowed only between 1 and 2 (one format),
and only a ZeRO-0 checkpoint resumes with another world size. Anything else is a ConfigError
naming saved and current values (not a DeepSpeed traceback).

Export (``maskfeat export``): the fp32 weights are consolidated with DeepSpeed's
``zero_to_fp32`` utilities (ZeRO-1/2/3; for stage 0 the full module state is read directly),
the ``backbone.`` sub-tree is kept (the pre-training head and mask token are dropped only when
asked), and the result is written as safetensors with the config in the metadata.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Any, Optional

import torch

from engine.config import ConfigError
from engine.distributed import barrier

__all__ = [
    "checkpoint_dir",
    "save_checkpoint",
    "find_latest",
    "latest_tag",
    "load_checkpoint",
    "available_tags",
    "check_resume_compatible",
    "consolidated_state_dict",
    "export_backbone",
    "load_pretrained",
]

_STEP_RE = re.compile(r"^step(\d{8,})$")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def _dist() -> tuple[int, int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _promote(ckpt_dir: str, tmp_tag: str, tag: str, rank: int, local_rank: int) -> None:
    """Rename ``tmp_tag`` to ``tag`` (replacing an older ``tag``) on every node's first rank."""
    src, dst = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)

    def move() -> None:
        if not os.path.isdir(src):
            return  # shared filesystem: already moved by global rank 0
        if os.path.isdir(dst):
            old = dst + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)

    if rank == 0:
        move()
    barrier()
    if rank != 0 and local_rank == 0:
        move()
    barrier()


def save_checkpoint(
    engine: Any,
    output_dir: str,
    tag: str,
    *,
    rank_state: dict,
    config_yaml: str,
    update_latest: bool = True,
    keep: int = 0,
    param_group_names: Optional[list[list[str]]] = None,
) -> str:
    """Save ``engine`` (a DeepSpeed engine) under ``tag`` atomically; returns the final path.

    ``rank_state`` is this rank's own state (step, loader, RNG…); every rank must call this.
    ``keep`` > 0 deletes all but the newest ``keep`` ``step*`` tags afterwards.
    ``param_group_names`` (the parameter names of each optimiser group, in order) is stored with
    the DeepSpeed client state so that export can read the fp32 master weights of a ZeRO-0
    bf16/fp16 run, which DeepSpeed saves by group position only.
    """
    rank, _, local_rank = _dist()
    ckpt_dir = checkpoint_dir(output_dir)
    tmp_tag = f".tmp-{tag}"
    if local_rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)  # a dead earlier try
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"tag": tag, "param_group_names": param_group_names}, save_latest=False)
    tmp_path = os.path.join(ckpt_dir, tmp_tag)
    os.makedirs(tmp_path, exist_ok=True)
    torch.save(rank_state, os.path.join(tmp_path, f"engine_state_r{rank:05d}.pt"))
    if local_rank == 0:
        _write_text_atomic(os.path.join(tmp_path, "config.yaml"), config_yaml)
    barrier()
    _promote(ckpt_dir, tmp_tag, tag, rank, local_rank)
    if update_latest and local_rank == 0:
        _write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)
    if keep > 0 and local_rank == 0:
        steps = sorted(t for t in os.listdir(ckpt_dir) if _STEP_RE.match(t))
        for old in steps[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return os.path.join(ckpt_dir, tag)


def find_latest(output_dir: str) -> Optional[str]:
    """Tag of the newest complete checkpoint under ``output_dir`` (``None`` when there is none).

    Reads ``latest``; when it is missing or points at a deleted tag, the newest ``step*``
    directory is used (temporary ``.tmp-*`` directories are never considered)."""
    return latest_tag(checkpoint_dir(output_dir))


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """:func:`find_latest` for a ``checkpoints`` directory itself."""
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        tag = open(latest).read().strip()
        if tag and os.path.isdir(os.path.join(ckpt_dir, tag)):
            return tag
    if not os.path.isdir(ckpt_dir):
        return None
    steps = sorted(t for t in os.listdir(ckpt_dir) if _STEP_RE.match(t))
    return steps[-1] if steps else None


def available_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoints under ``ckpt_dir`` (``step*`` in order, then the others, e.g. ``best``)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if not t.startswith(".") and not t.endswith(".old")
            and glob.glob(os.path.join(ckpt_dir, t, "engine_state_r*.pt"))]
    return sorted(t for t in tags if _STEP_RE.match(t)) + sorted(t for t in tags if not _STEP_RE.match(t))


def _saved_zero_stage(path: str) -> Optional[int]:
    """``deepspeed.zero_stage`` from the checkpoint's ``config.yaml`` (None when unreadable)."""
    import yaml

    try:
        with open(os.path.join(path, "config.yaml")) as f:
            return int(yaml.safe_load(f)["deepspeed"]["zero_stage"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def check_resume_compatible(path: str, *, saved_world: int, saved_stage: Optional[int], world_size: int,
                            zero_stage: int, output_dir: str = "<output_dir>") -> None:
    """Raise ConfigError when DeepSpeed cannot load the checkpoint at ``path`` (saved by
    ``saved_world`` ranks with ZeRO ``saved_stage``) into a run of ``world_size`` ranks with
    ``zero_stage`` (module docstring); ``saved_stage`` None skips the stage check."""
    tag = os.path.basename(os.path.normpath(path))
    restart = (f"To continue on other settings, start a new run from its weights instead: `maskfeat export "
               f"{output_dir} --tag {tag} --out backbone.safetensors`, then fine-tune with "
               "finetune.pretrained=backbone.safetensors (the optimiser state and the schedule position are not "
               "carried over; pre-training has no option to start from exported weights).")
    if saved_stage is not None and saved_stage != zero_stage and {saved_stage, zero_stage} != {1, 2}:
        raise ConfigError(
            f"checkpoint {path} was saved with deepspeed.zero_stage={saved_stage}, this run has "
            f"deepspeed.zero_stage={zero_stage}: DeepSpeed cannot convert the checkpoint between these stages. "
            f"Resume with deepspeed.zero_stage={saved_stage} (stages 1 and 2 load each other's checkpoints). "
            + restart)
    stage = zero_stage if saved_stage is None else saved_stage
    if saved_world != world_size and stage != 0:
        raise ConfigError(
            f"checkpoint {path} was saved by {saved_world} rank(s) with deepspeed.zero_stage={stage}, this run has "
            f"{world_size}: ZeRO-{stage} partitions the optimiser state over the ranks, and DeepSpeed loads it only "
            f"into the same number of ranks. Resume with {saved_world} rank(s) (e.g. torchrun --nproc_per_node "
            f"... with {saved_world} processes in total); only ZeRO-0 checkpoints resume with another world size. "
            + restart)


def load_checkpoint(engine: Any, output_dir: str, tag: str, *, load_optimizer: bool = True,
                    zero_stage: Optional[int] = None) -> dict:
    """Restore ``engine`` from ``tag`` and return this rank's saved state dict.

    Before DeepSpeed is called, a missing tag (the error lists the available ones) and a world size
    or ZeRO stage DeepSpeed cannot load (:func:`check_resume_compatible`) raise ConfigError.
    ``zero_stage`` is this run's stage (default: the engine's). A ZeRO-0 checkpoint loads into any
    world size: rank ``r`` then reads the state of saved rank ``r mod saved_world`` (its RNG
    streams repeat another rank's; the data position is mapped by ``engine.runner``).
    """
    rank, world, _ = _dist()
    ckpt_dir = checkpoint_dir(output_dir)
    path = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(path):
        tags = available_tags(ckpt_dir)
        raise ConfigError(f"--resume {tag}: no checkpoint {tag!r} under {ckpt_dir}; available: "
                          + (", ".join(tags) + " (or --resume auto for the latest)" if tags else "none"))
    files = sorted(glob.glob(os.path.join(path, "engine_state_r*.pt")))
    if not files:
        raise ConfigError(f"--resume {tag}: {path} has no engine_state_r*.pt: not a complete checkpoint of this "
                          f"engine; available: {', '.join(available_tags(ckpt_dir)) or 'none'}")
    mine = os.path.join(path, f"engine_state_r{rank:05d}.pt")
    if not os.path.isfile(mine):
        mine = files[rank % len(files)]
    state = torch.load(mine, map_location="cpu", weights_only=False)
    # the loader state holds the world size (each node of a non-shared filesystem sees only its files)
    saved_world = int(state.get("loader", {}).get("world_size", len(files)))
    stage = int(engine.zero_optimization_stage() if zero_stage is None else zero_stage)
    check_resume_compatible(path, saved_world=saved_world, saved_stage=_saved_zero_stage(path), world_size=world,
                            zero_stage=stage, output_dir=output_dir)
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=False, load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    return state


# ----------------------------------------------------------------------------------------------
# Consolidation and export
# ----------------------------------------------------------------------------------------------
def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 module state dict of a DeepSpeed checkpoint (any ZeRO stage), on CPU."""
    path = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint {tag!r} under {ckpt_dir}")
    if glob.glob(os.path.join(path, "*optim_states.pt")) and glob.glob(os.path.join(path, "zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:  # ZeRO stage 0: the module state is whole in the model file
        files = sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))
        if not files:
            raise FileNotFoundError(f"{path} has no mp_rank_*_model_states.pt")
        ck = torch.load(files[0], map_location="cpu", weights_only=False)
        sd = dict(ck["module"])
        opt = ck.get("optimizer")
        names = ck.get("param_group_names")
        if isinstance(opt, dict) and "fp32_groups" in opt:
            # bf16/fp16 without ZeRO: the module holds rounded weights; the fp32 masters are
            # stored per optimiser group, in the order of the group's parameters
            if names is None:
                raise ValueError(f"{path}: a bf16/fp16 ZeRO-0 checkpoint without parameter names; "
                                 "cannot map its fp32 master weights")
            for group_names, group in zip(names, opt["fp32_groups"]):
                if len(group_names) != len(group):
                    raise ValueError(f"{path}: optimiser group sizes do not match the saved names")
                for n, t in zip(group_names, group):
                    if tuple(t.shape) != tuple(sd[n].shape):
                        raise ValueError(f"{path}: fp32 master of {n} has shape {tuple(t.shape)}, "
                                         f"the module {tuple(sd[n].shape)}")
                    sd[n] = t
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


PRETRAIN_HEAD_PREFIXES = ("mask_token", "pred_head.")


def export_backbone(output_dir_or_ckpt: str, out_path: str, tag: Optional[str] = None,
                    keep_pretrain_head: bool = False) -> dict:
    """Write the consolidated fp32 backbone of a checkpoint as safetensors.

    ``output_dir_or_ckpt`` is a run's output directory (its ``checkpoints/`` is used) or a
    ``checkpoints`` directory itself; ``tag`` defaults to the latest complete one. The MaskFeat
    model *is* its backbone (official key names), so everything but the pre-training-only
    ``mask_token`` and ``pred_head.*`` is kept (all of it with ``keep_pretrain_head``); a
    wrapped ``backbone.*`` sub-tree is unwrapped. A fine-tuned classifier exports whole.
    Returns a summary (tag, number of tensors, parameters, path)."""
    from safetensors.torch import save_file

    root = output_dir_or_ckpt
    ckpt_dir = checkpoint_dir(root) if os.path.isdir(checkpoint_dir(root)) else root
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    sd = consolidated_state_dict(ckpt_dir, tag)
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not backbone:  # the module is the backbone (models.MaskFeat / Classifier)
        backbone = sd
    if not keep_pretrain_head:
        backbone = {k: v for k, v in backbone.items() if not k.startswith(PRETRAIN_HEAD_PREFIXES)}
    cfg_path = os.path.join(ckpt_dir, tag, "config.yaml")
    meta = {"format": "maskfeat-backbone", "source": os.path.join(ckpt_dir, tag)}
    if os.path.isfile(cfg_path):
        meta["config"] = open(cfg_path).read()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(backbone, out_path, metadata=meta)
    n = sum(v.numel() for v in backbone.values())
    return {"tag": tag, "tensors": len(backbone), "parameters": n, "path": out_path}


def load_pretrained(path: str) -> dict[str, torch.Tensor]:
    """Backbone weights from a ``.safetensors`` export or an official SlowFast ``.pyth``/``.pt``
    (``torch.load(...)["model_state"]``, or a plain state dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pre-trained weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "model_state" in obj:
        return obj["model_state"]
    if isinstance(obj, dict) and "module" in obj:
        return obj["module"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: expected safetensors, a SlowFast checkpoint with 'model_state', or a state dict")

