"""Process-group set-up, the DeepSpeed config and ``deepspeed.initialize``, activation checkpointing.

Launchers (issue 6): ``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` themselves; under SLURM (``srun``) they are
derived from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of
``SLURM_JOB_NODELIST`` (port ``MASTER_PORT``, else ``29500 + SLURM_JOB_ID % 10000`` so that two
jobs sharing a node do not collide, and a free port for a one-task job); a plain single process gets
``127.0.0.1``, a free port and rank 0 of 1 (DESIGN §4: DeepSpeed needs these variables even
alone). The backend is NCCL on CUDA and gloo on CPU.

DeepSpeed facts (DESIGN §4, measured with 0.19.8): on CPU a ``torch.optim.AdamW`` is passed to
``deepspeed.initialize`` (DeepSpeed's CPU Adam compiles an op for ~30 s); gradients are clipped by
DeepSpeed's ``gradient_clipping``; parameter groups are few (see ``engine/optim.py``).

Activation checkpointing is applied here, from outside the model (STYLE habit 7): each block's
``forward`` is replaced on the instance by a ``torch.utils.checkpoint`` (non-reentrant) call of
the original, so parameter names and checkpoints are unchanged.
"""
from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "DistInfo",
    "launch_env",
    "init_distributed",
    "deepspeed_config",
    "apply_activation_checkpointing",
    "barrier",
    "all_reduce_sum",
    "is_main",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[003-005,9],gpu1`` -> ``node003``,
    ``node[1-2]-ib`` -> ``node1-ib``."""
    nodelist = nodelist.strip()
    m = re.match(r"^([^\[,]+)(?:\[([^\]]+)\]([^,\[]*))?", nodelist)
    if not m:
        return nodelist
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def launch_env(environ: Optional[dict] = None) -> dict[str, str]:
    """Fill the rendezvous variables in ``environ`` (default ``os.environ``) and return what was
    set. Variables already present (torchrun, the deepspeed launcher) are never changed."""
    env = os.environ if environ is None else environ
    set_: dict[str, str] = {}

    def put(key: str, value: Any) -> None:
        if key not in env:
            env[key] = str(value)
            set_[key] = str(value)

    if "RANK" not in env and "SLURM_PROCID" in env:
        put("RANK", env["SLURM_PROCID"])
        put("WORLD_SIZE", env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
        put("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        host = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if host:
            put("MASTER_ADDR", host)
        if env["WORLD_SIZE"] != "1":  # one task: a free port below, like a plain process
            job = env.get("SLURM_JOB_ID", "")
            put("MASTER_PORT", 29500 + int(job) % 10000 if job.isdigit() else 29500)
    put("RANK", 0)
    put("WORLD_SIZE", 1)
    put("LOCAL_RANK", 0)
    put("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        put("MASTER_PORT", _free_port() if env["WORLD_SIZE"] == "1" else 29500)
    return set_


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group through DeepSpeed (NCCL on CUDA, gloo on CPU)."""
    launch_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if not use_cuda:
        # DeepSpeed picks its accelerator from the environment; force CPU when asked.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if use_cuda else "gloo"
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if backend == "gloo":
        # DeepSpeed builds its shared-memory comm op (~20 s of C++ compile on first use) for
        # every CPU process group, but only uses it in ``inference_all_reduce``; training never
        # does, so the build is skipped (measured: identical losses, no compile).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        if world > 1 and rank == 0:  # a wrong WORLD_SIZE (e.g. srun forgotten) waits here, so say where
            print(f"rank 0 of {world}: waiting for the other ranks at {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']} ({backend})", flush=True)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def deepspeed_config(
    *,
    micro_batch: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    gradient_clipping: float,
    extra: Optional[dict] = None,
) -> dict:
    """The DeepSpeed JSON config the engine uses (the optimiser is passed as an object)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(micro_batch) * int(world_size),
        "gradient_clipping": float(gradient_clipping),
        "zero_optimization": {"stage": int(zero_stage)},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if zero_stage == 3:
        # consolidated fp32 weights are produced by `maskfeat export` from the shards instead
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    return _merge(cfg, extra or {})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _checkpointed_forward(block: nn.Module, original, *args, **kwargs):
    if not (torch.is_grad_enabled() and block.training):
        return original(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, which: Union[bool, int] = True) -> int:
    """Recompute transformer blocks in backward, as ``model.activation_checkpointing`` says: true
    every block, an integer N the first N, false or 0 none; returns the number of blocks wrapped.

    Looks for ``model.backbone.blocks`` or ``model.blocks`` (an ``nn.ModuleList``). An N beyond the
    model's depth is an error, not a silent "all".
    """
    holder = getattr(model, "backbone", model)
    blocks = getattr(holder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError("activation checkpointing needs model.backbone.blocks or model.blocks (nn.ModuleList)")
    if which is not True:
        if not 0 <= which <= len(blocks):
            raise ValueError(f"activation checkpointing of the first {which} blocks: the model has {len(blocks)}")
        blocks = blocks[:int(which)]
    for block in blocks:
        if getattr(block, "_maskfeat_checkpointed", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)
        block._maskfeat_checkpointed = True
    return len(blocks)


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op alone)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x
