"""Process-group set-up, the DeepSpeed config and ``deepspeed.initialize``, activation checkpointing.

Launchers (issue 6): ``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` themselves (both RANK and WORLD_SIZE, or
neither: one without the other is a stale export and a ConfigError). Under SLURM they are derived
only inside an ``srun`` job step, i.e. when ``SLURM_STEP_ID`` is a normal step id (Slurm's
``slurm.h``: ids from ``SLURM_MAX_NORMAL_STEP_ID`` = 0xfffffff0 up are the batch, extern and
interactive steps; srun exports ``SLURM_STEP_ID``, ``SLURM_STEP_NUM_TASKS`` and
``SLURM_STEP_NODELIST`` for its step): rank ``SLURM_PROCID``, world ``SLURM_STEP_NUM_TASKS`` (else
``SLURM_NTASKS``), local rank ``SLURM_LOCALID``, address the first host of ``SLURM_STEP_NODELIST``
(else ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``), port ``MASTER_PORT``, else
``12000 + 8 * (SLURM_JOB_ID % 2500) + SLURM_STEP_ID % 8`` (in 12000..31999, below Linux's ephemeral
ports; identical on every task of a step; jobs with nearby ids and the first 8 concurrent steps of one
job differ). A process of an
``sbatch`` script without ``srun`` (the batch step) runs alone, with a one-line note; a ``WORLD_SIZE``
the script exported before ``srun`` is taken when it equals the step's task count (the rank is then
``SLURM_PROCID``, and the address and port, unless exported too, those of the step). An MPI launch (``mpirun``; :data:`MPI_VARS`: Open MPI, MVAPICH, MPICH / Intel
MPI) gives the rank, world size and local rank (each process ran alone before, into the same
folder), also inside a SLURM allocation, where mpirun's daemons leave their srun step's variables
(``PMI_*`` equal to srun's own are srun's); the address is ``127.0.0.1`` when every process is on one
node, else the first host of the allocation, else ``MASTER_ADDR`` must be exported. A plain single
process gets ``127.0.0.1``, a free port and rank 0 of 1 (DESIGN §4: DeepSpeed needs these variables
even alone). RANK and WORLD_SIZE exported without LOCAL_RANK (an MPI wrapper) take it from
``OMPI_COMM_WORLD_LOCAL_RANK`` / ``MPI_LOCALRANKID`` (``SLURM_LOCALID`` in an srun step); without
any, ranks that each see several GPUs take GPU 0 with a warning (right for one process per node). ``0 <= RANK < WORLD_SIZE`` and
``LOCAL_RANK >= 0`` are checked before connecting, and that rank 0 is its node's local rank 0 (the
per-node checkpoint files are written there; one process on another GPU takes
``CUDA_VISIBLE_DEVICES``).

Devices: the backend is NCCL on CUDA and gloo on CPU. :func:`select_accelerator` sets
``DS_ACCELERATOR`` to the engine's choice and must run before ``deepspeed`` is first imported
(DeepSpeed picks and caches its accelerator on import). A rank uses CUDA device ``LOCAL_RANK`` when
that many devices are visible, device 0 when exactly one is (``srun --gpus-per-task=1``: each task
sees only its own GPU) and the launcher did not start several processes on the node
(``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE``); anything else is a ConfigError. ``LOCAL_RANK`` itself is
never changed (the first-local-rank logic of ``engine.checkpoint`` reads it); DeepSpeed is told the
device through ``deepspeed.initialize(args=deepspeed_args(dist, zero_stage))``. Known limit: ZeRO-3
reads ``LOCAL_RANK`` as a device index inside DeepSpeed (``partition_parameters.py``), so ZeRO-3
with one GPU per task and ``LOCAL_RANK`` > 0 is refused with a ConfigError.

Rendezvous: :func:`init_distributed` creates the default process group itself (so that the device
and the timeout are ours; DeepSpeed then wraps it). Every rank of a multi-process job prints one
line to stderr before connecting; a rendezvous that times out (``DEEPSPEED_TIMEOUT`` minutes,
default 10, as DeepSpeed) is a :class:`LaunchError` naming the expected world size, the address,
the port and where each came from.

DeepSpeed facts (DESIGN §4, measured with 0.19.8): on CPU a ``torch.optim.AdamW`` is passed to
``deepspeed.initialize`` (DeepSpeed's CPU Adam compiles an op for ~30 s); gradients are clipped by
DeepSpeed's ``gradient_clipping``; parameter groups are few (see ``engine/optim.py``). Keys of the
DeepSpeed config that the engine owns (batch sizes, accumulation, clipping, precision, ZeRO stage,
optimizer, scheduler) are refused in ``deepspeed.extra`` (:func:`check_deepspeed_extra`).

Activation checkpointing is applied here, from outside the model (STYLE habit 7): each block's
``forward`` is replaced on the instance by a ``torch.utils.checkpoint`` (non-reentrant) call of
the original, so parameter names and checkpoints are unchanged.
"""
from __future__ import annotations

import functools
import os
import re
import socket
import sys
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, MutableMapping, Optional, Union

import torch
from torch import nn

from engine.config import ConfigError

__all__ = [
    "DistInfo",
    "LaunchError",
    "launch_env",
    "select_accelerator",
    "cuda_device_index",
    "init_distributed",
    "deepspeed_args",
    "deepspeed_config",
    "check_deepspeed_extra",
    "check_local_rank_given",
    "apply_activation_checkpointing",
    "barrier",
    "gather_objects",
    "all_reduce_sum",
    "is_main",
]

SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
"""Slurm's ``slurm.h``: step ids from here up are special (batch 0xfffffffb, extern 0xfffffffc,
interactive 0xfffffffa; the batch step was 0xfffffffe before Slurm 20.11)."""
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ConfigError):
    """The launch itself is inconsistent (rendezvous variables, devices): exit 2 like a config error."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``device_index`` is the CUDA ordinal this rank uses (it
    differs from ``local_rank`` when each task sees only its own GPU); 0 on CPU."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    device_index: int = 0


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


def _srun_step_id(env: MutableMapping[str, str]) -> Optional[int]:
    """The id of the srun job step this process belongs to, or None outside one (no SLURM, or the
    batch / interactive / extern step of an allocation)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")).strip()
    if not step.isdigit() or int(step) >= SLURM_MAX_NORMAL_STEP_ID or "SLURM_PROCID" not in env:
        return None
    return int(step)


def _slurm_port(env: MutableMapping[str, str], step: int) -> tuple[int, str]:
    """Below Linux's ephemeral ports (32768 up), which outgoing connections take at random (it was
    29500..65499, three quarters of it inside them)."""
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "")).strip()
    j = int(job) if job.isdigit() else 0
    return SLURM_PORT_BASE + 8 * (j % SLURM_PORT_JOBS) + step % 8, "SLURM_JOB_ID and SLURM_STEP_ID"


SLURM_PORT_BASE, SLURM_PORT_JOBS = 12000, 2500
"""The derived port: ``12000 + 8 * (job % 2500) + step % 8``, in 12000..31999."""


def slurm_rendezvous(env: MutableMapping[str, str], step: int, put: Callable[[str, Any, str], None]) -> None:
    """Fill ``MASTER_ADDR`` (the first host of the step's nodes) and ``MASTER_PORT`` (:func:`_slurm_port`)
    of an srun step of more than one task, where the environment does not set them (``put`` keeps
    what is set); one task takes the loopback address and a free port (the defaults)."""
    if env["WORLD_SIZE"] == "1":
        return
    nl_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                   if env.get(k, "").strip()), None)
    if nl_key:
        put("MASTER_ADDR", _first_slurm_host(env[nl_key]), f"the first host of {nl_key}")
    port, why = _slurm_port(env, step)
    put("MASTER_PORT", port, why)


def _int_var(env: MutableMapping[str, str], key: str, origins: dict[str, str]) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{key}={raw!r} (from {origins[key]}) is not an integer") from None


MPI_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
            ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
"""(rank, world size, local rank, local size) variables of Open MPI, MVAPICH and MPICH / Intel MPI launches."""


def _fill_launch_env(env: MutableMapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """:func:`launch_env`, also returning where each of :data:`LAUNCH_VARS` came from."""
    set_: dict[str, str] = {}
    origins = {k: "the environment" for k in LAUNCH_VARS if k in env}

    def put(key: str, value: Any, origin: str) -> None:
        if key not in env:
            env[key] = str(value)
            set_[key] = str(value)
            origins[key] = origin

    step = _srun_step_id(env)
    world_key = next((k for k in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") if k in env), None)
    step_tasks = env[world_key] if world_key else None
    if "WORLD_SIZE" in env and "RANK" not in env and step is not None:
        # a SLURM script exporting WORLD_SIZE (and MASTER_*) before srun, as many DDP templates do: srun's
        # task id is the rank when the sizes agree
        if env["WORLD_SIZE"].strip() != (step_tasks or "1").strip():
            raise LaunchError(f"WORLD_SIZE={env['WORLD_SIZE']} is exported, but this srun step has {step_tasks or 1} "
                              "task(s): unset WORLD_SIZE (srun's variables give the ranks) or launch as many tasks")
        put("RANK", env["SLURM_PROCID"], "SLURM_PROCID")
        slurm_rendezvous(env, step, put)  # (only what the script left unset: it went to 127.0.0.1:29500)
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        have, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise LaunchError(f"{have}={env[have]} is set in the environment but {missing} is not (a stale export?): "
                          f"launchers set both; unset {have} for a single process, or start the job with "
                          "torchrun / srun / the deepspeed launcher")
    mpi = next((keys for keys in MPI_VARS if env.get(keys[0], "").strip() and env.get(keys[1], "").strip()), None)
    # inside an allocation mpirun starts its node daemons with srun, whose step variables the processes
    # inherit (SLURM_PROCID is the node's index): Open MPI's and MVAPICH's ranks win there; srun itself
    # sets PMI_* (--mpi=pmi2) equal to its own, so those count only where they differ
    if mpi is not None and step is not None and mpi[0] == "PMI_RANK" and env[mpi[1]].strip() == (step_tasks or ""):
        mpi = None
    if "RANK" not in env and mpi is not None:
        # mpirun (or the deepspeed launcher's openmpi/mvapich modes): each process a single run
        # otherwise, writing into the same folder (DeepSpeed's own MPI discovery comes after our group)
        put("RANK", env[mpi[0]], mpi[0])
        put("WORLD_SIZE", env[mpi[1]], mpi[1])
        if env.get(mpi[2], "").strip():
            put("LOCAL_RANK", env[mpi[2]], mpi[2])
        if env["WORLD_SIZE"] != "1" and "MASTER_ADDR" not in env:
            nl_key = next((k for k in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k, "").strip()), None)
            if env.get(mpi[3], "").strip() == env["WORLD_SIZE"]:  # every process on this node
                put("MASTER_ADDR", "127.0.0.1", f"{mpi[3]} = {mpi[1]}: one node")
            elif nl_key:
                put("MASTER_ADDR", _first_slurm_host(env[nl_key]), f"the first host of {nl_key}")
            else:
                raise LaunchError(f"an MPI launch over several nodes gives the ranks ({mpi[0]}, {mpi[1]}) but no "
                                  "rendezvous address: export MASTER_ADDR (the first node's address) and MASTER_PORT "
                                  "to every process (mpirun -x MASTER_ADDR=node001 -x MASTER_PORT=29500; the deepspeed "
                                  "launcher's MPI modes do not export it), or launch with torchrun / srun / the "
                                  "deepspeed launcher's default mode")
    if "RANK" not in env and step is not None:
        put("RANK", env["SLURM_PROCID"], "SLURM_PROCID")
        put("WORLD_SIZE", step_tasks or 1, world_key or "default (no SLURM_STEP_NUM_TASKS)")
        put("LOCAL_RANK", env.get("SLURM_LOCALID", "0"), "SLURM_LOCALID" if "SLURM_LOCALID" in env else "default")
        slurm_rendezvous(env, step, put)
    elif "RANK" not in env and "SLURM_JOB_ID" in env:
        n = env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))
        if n.isdigit() and int(n) > 1:
            print(f"note: SLURM job {env['SLURM_JOB_ID']} has {n} tasks but this process is not in an srun step "
                  f"(SLURM_STEP_ID={env.get('SLURM_STEP_ID', 'unset')}): it runs as a single process; start it "
                  "with srun to use every task", file=sys.stderr, flush=True)
    if "RANK" in env and "LOCAL_RANK" not in env:  # RANK/WORLD_SIZE exported by a wrapper: the launcher's local rank
        local = next((k for k in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
                      if env.get(k, "").strip()), None)
        if local is None and step is not None and env.get("SLURM_LOCALID", "").strip():
            local = "SLURM_LOCALID"
        if local is not None:
            put("LOCAL_RANK", env[local], local)
    put("RANK", 0, "default")
    put("WORLD_SIZE", 1, "default")
    put("LOCAL_RANK", 0, "default")
    put("MASTER_ADDR", "127.0.0.1", "default")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] == "1":
            put("MASTER_PORT", _free_port(), "a free local port")
        else:
            put("MASTER_PORT", 29500, "default")
    rank, world, local = (_int_var(env, k, origins) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    port = _int_var(env, "MASTER_PORT", origins)
    where = {k: f"{k}={env[k]} (from {origins[k]})" for k in LAUNCH_VARS}
    if world < 1:
        raise LaunchError(f"{where['WORLD_SIZE']} must be at least 1")
    if not 0 <= rank < world:
        raise LaunchError(f"{where['RANK']} must be in 0..WORLD_SIZE-1, but {where['WORLD_SIZE']}")
    if local < 0:
        raise LaunchError(f"{where['LOCAL_RANK']} must not be negative")
    if rank == 0 and local != 0:  # every launcher starts a node's processes at local rank 0
        raise LaunchError(f"{where['LOCAL_RANK']}, but {where['RANK']}: the first process is its node's LOCAL_RANK 0 "
                          "(the node's checkpoint files, `latest` and pruning are written there: with none, a run "
                          "kept every tag and no `latest`). To run one process on another GPU, set "
                          "CUDA_VISIBLE_DEVICES instead")
    if not 0 < port < 65536:
        raise LaunchError(f"{where['MASTER_PORT']} is not a TCP port (1..65535)")
    return set_, origins


def launch_env(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Fill the rendezvous variables in ``environ`` (default ``os.environ``) as the module docstring
    says and return what was set. Variables already present (torchrun, the deepspeed launcher) are
    never changed. Raises :class:`LaunchError` for inconsistent values."""
    return _fill_launch_env(os.environ if environ is None else environ)[0]


def select_accelerator(device: str = "auto") -> str:
    """Resolve ``train.device`` (``auto``, ``cpu`` or ``cuda``) to ``"cuda"`` or ``"cpu"`` and set
    ``DS_ACCELERATOR`` to it. Must run before ``deepspeed`` is first imported: a DeepSpeed that was
    imported earlier and cached another accelerator is a RuntimeError (a bug of the caller).
    ``cuda`` without a visible GPU is a :class:`LaunchError`."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={device!r} is not one of auto, cpu, cuda")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise LaunchError("train.device=cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): request GPUs from the scheduler "
                          "(e.g. srun --gpus / --gpus-per-task) or use train.device=cpu")
    kind = "cuda" if device == "cuda" or (device == "auto" and available) else "cpu"
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    cached = getattr(real, "ds_accelerator", None)
    if cached is not None and cached.device_name() != kind:
        raise RuntimeError(f"deepspeed was imported before select_accelerator({device!r}) and chose the "
                           f"{cached.device_name()} accelerator; call select_accelerator before importing deepspeed")
    os.environ["DS_ACCELERATOR"] = kind
    return kind


def cuda_device_index(local_rank: int, device_count: int,
                      environ: Optional[MutableMapping[str, str]] = None) -> int:
    """The CUDA ordinal of a rank: ``local_rank`` when that many devices are visible; 0 when exactly
    one is and the launcher did not start several processes on this node (each task sees only its
    own GPU); otherwise a :class:`LaunchError` naming LOCAL_RANK, the count and CUDA_VISIBLE_DEVICES."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES", "unset")
    per_node_key = next((k for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if env.get(k, "").strip().isdigit()), None)
    per_node = int(env[per_node_key]) if per_node_key else None
    if per_node is not None and per_node > device_count:
        raise LaunchError(f"{per_node_key}={per_node} processes on this node but {device_count} CUDA device(s) are "
                          f"visible (CUDA_VISIBLE_DEVICES={visible}, LOCAL_RANK={local_rank}): start at most one "
                          "process per GPU (torchrun --nproc_per_node / deepspeed --num_gpus)")
    if 0 <= local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise LaunchError(f"LOCAL_RANK={local_rank} but {device_count} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES="
                      f"{visible}): start at most one process per visible GPU, or let each task see exactly one GPU "
                      "(srun --gpus-per-task=1)")


def check_local_rank_given(origins: dict[str, str], world: int, device_count: int,
                           environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """The warning line (also printed, on stderr) when nothing set LOCAL_RANK although several ranks
    each see several GPUs: every rank takes GPU 0, which is right with one process per node but
    makes NCCL fail ("Duplicate GPU detected") when processes share a node. None when LOCAL_RANK
    was given, one GPU is visible, or the launcher started one process on this node
    (:func:`_tasks_per_node`)."""
    env = os.environ if environ is None else environ
    if world <= 1 or device_count <= 1 or _tasks_per_node(env) == 1 or \
            not origins.get("LOCAL_RANK", "the environment").startswith("default"):
        return None
    line = (f"warning: LOCAL_RANK is not set (WORLD_SIZE={world}) and {device_count} CUDA devices are visible: this "
            "rank takes GPU 0. With several processes per node set LOCAL_RANK (torchrun and the deepspeed launcher do; "
            "it is read from OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID or SLURM_LOCALID when set)")
    print(line, file=sys.stderr, flush=True)
    return line


def _rendezvous_timeout() -> timedelta:
    """DeepSpeed's process-group timeout: ``DEEPSPEED_TIMEOUT`` minutes, default 10."""
    raw = os.environ.get("DEEPSPEED_TIMEOUT", "10")
    try:
        return timedelta(minutes=int(raw))
    except ValueError:
        raise LaunchError(f"DEEPSPEED_TIMEOUT={raw!r} is not a whole number of minutes") from None


def _rendezvous(backend: str, rank: int, world: int, device: Optional[torch.device], origins: dict[str, str],
                timeout: timedelta) -> None:
    """``torch.distributed.init_process_group`` from the environment; a timeout or an unreachable
    address becomes one :class:`LaunchError` line."""
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    if world > 1:
        what = "waiting for the other ranks at" if rank == 0 else "connecting to"
        print(f"rank {rank} of {world}: {what} {addr}:{port} ({backend})", file=sys.stderr, flush=True)
    kwargs: dict[str, Any] = {"timeout": timeout}
    if device is not None and device.type == "cuda" and world > 1:
        kwargs["device_id"] = device  # as DeepSpeed does, but with our ordinal rather than LOCAL_RANK
    try:
        torch.distributed.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    except torch.distributed.DistError as e:
        first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
        raise LaunchError(
            f"rank {rank} of {world}: rendezvous at {addr}:{port} failed (timeout {timeout.total_seconds():g} s, "
            "which torch may try twice; "
            f"expected WORLD_SIZE={world} from {origins.get('WORLD_SIZE', 'the environment')}, MASTER_ADDR={addr} "
            f"from {origins.get('MASTER_ADDR', 'the environment')}, MASTER_PORT={port} from "
            f"{origins.get('MASTER_PORT', 'the environment')}): check that all {world} ranks were started and can "
            f"reach that address (DEEPSPEED_TIMEOUT minutes to wait longer); torch: {first}") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Fill and check the launch variables, pick the device and create the default process group
    (NCCL on CUDA, gloo on CPU) that DeepSpeed then uses. Imports ``deepspeed`` after
    :func:`select_accelerator`."""
    _, origins = _fill_launch_env(os.environ)
    kind = select_accelerator(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        check_local_rank_given(origins, world, torch.cuda.device_count())
        index = cuda_device_index(local, torch.cuda.device_count())
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        index, dev = 0, torch.device("cpu")
    backend = "nccl" if kind == "cuda" else "gloo"
    import deepspeed

    if backend == "gloo":
        # DeepSpeed builds its shared-memory comm op (~20 s of C++ compile on first use) for
        # every CPU process group, but only uses it in ``inference_all_reduce``; training never
        # does, so the build is skipped (measured: identical losses, no compile).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        _rendezvous(backend, rank, world, dev, origins, _rendezvous_timeout())
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # wraps the group created above
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, device_index=index)


def _slurm_tasks_on_node(spec: str, node: int) -> Optional[int]:
    """This node's entry of ``SLURM_TASKS_PER_NODE`` (e.g. ``"8(x3),4"``: 8 on nodes 0-2, 4 on node 3)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def _tasks_per_node(env: MutableMapping[str, str]) -> Optional[int]:
    """Processes the launcher started on this node (torchrun, the deepspeed launcher, an srun step), if
    it says; SLURM's counts only inside an srun step (a batch-script process runs alone)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").strip().isdigit():
            return int(env[key])
    if _srun_step_id(env) is None:
        return None
    if env.get("SLURM_NTASKS_PER_NODE", "").strip().isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    node = env.get("SLURM_NODEID", "0").strip()
    return _slurm_tasks_on_node(env.get("SLURM_TASKS_PER_NODE", ""), int(node) if node.isdigit() else 0)


def _one_gpu_per_task(device_count: int, environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Each of several tasks on this node sees its own single GPU (``srun --gpus-per-task=1``): a fact
    of the node, the same on every rank of it, so a refusal based on it is made by all of them."""
    n = _tasks_per_node(os.environ if environ is None else environ)
    return device_count == 1 and n is not None and n > 1


def deepspeed_args(dist: DistInfo, zero_stage: int) -> types.SimpleNamespace:
    """The ``args`` of ``deepspeed.initialize``: ``device_rank`` makes DeepSpeed use this rank's
    device (``DeepSpeedEngine._set_distributed_vars``) instead of ``LOCAL_RANK``. ZeRO-3 reads
    ``LOCAL_RANK`` as a device index itself, so it is refused when the two differ, or when the node
    runs one GPU per task (then on every rank, also those of LOCAL_RANK 0, which would otherwise go
    on and wait for the others in DeepSpeed's first collective until the timeout)."""
    if zero_stage == 3 and dist.device.type == "cuda" and (dist.device_index != dist.local_rank or (
            dist.world_size > 1 and _one_gpu_per_task(torch.cuda.device_count()))):
        raise LaunchError(f"deepspeed.zero_stage=3 needs CUDA device LOCAL_RANK={dist.local_rank} to be visible, but "
                          f"this task sees {torch.cuda.device_count()} device(s) (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): let every task see all GPUs of its "
                          "node (e.g. srun --gpus-per-node=N without --gpus-per-task / --gpu-bind=single:1), or use "
                          "ZeRO stage 0-2")
    return types.SimpleNamespace(device_rank=dist.device_index)


ENGINE_OWNED_KEYS = {
    "train_batch_size": "data.batch_size (per GPU; the global batch is data.batch_size x the number of GPUs)",
    "train_micro_batch_size_per_gpu": "data.batch_size (per GPU)",
    "gradient_accumulation_steps": "data.batch_size or more GPUs (the engine steps once per batch; its LR "
                                   "schedule and step counts assume no accumulation)",
    "gradient_clipping": "deepspeed.gradient_clipping",
    "amp": "deepspeed.precision",
    "optimizer": "optim.* (the engine passes its own AdamW)",
    "scheduler": "schedule.* (the engine sets the LR every step)",
}
"""Top-level DeepSpeed config keys that ``deepspeed.extra`` may not set -> the engine field to use."""


_OWNED_SUBKEYS = {"zero_optimization": ("stage", "deepspeed.zero_stage"),
                  "fp16": ("enabled", "deepspeed.precision"), "bf16": ("enabled", "deepspeed.precision")}
"""Sections ``deepspeed.extra`` may tune, except for the one sub-key the engine sets."""


DEEPSPEED_TOP_KEYS = frozenset((
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "communication_data_type", "seq_parallel_communication_data_type", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "aio", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "memory_breakdown", "flops_profiler", "activation_checkpointing", "sparse_attention",
    "data_efficiency", "curriculum_learning", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity",
    "compression_training", "checkpoint", "data_types", "autotuning", "comms_logger", "compile", "pipeline", "nebula",
    "hybrid_engine", "eigenvalue", "progressive_layer_drop", "quantize_training", "dataloader_drop_last",
    "disable_allgather", "use_data_before_expert_parallelism", "graph_harvesting", "timers", "weight_quantization"))
"""Top-level keys of DeepSpeed's JSON config (its documentation's list, DeepSpeed 0.16-0.19). DeepSpeed
ignores a top-level key it does not know, so a misspelt section would silently do nothing."""

NESTED_KEYS = {
    **dict.fromkeys(("use_node_local_storage", "load_universal", "tag_validation", "parallel_write"), "checkpoint"),
    **dict.fromkeys(("offload_optimizer", "offload_param", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
                     "allgather_bucket_size", "reduce_scatter", "allgather_partitions", "round_robin_gradients",
                     "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
                     "stage3_param_persistence_threshold", "stage3_gather_16bit_weights_on_model_save",
                     "sub_group_size", "zenflow"), "zero_optimization"),
    **dict.fromkeys(("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"), "fp16"),
}
"""Options of a DeepSpeed section that DeepSpeed ignores at the top level -> their section."""


_WARNED_EXTRA: set = set()


def check_deepspeed_extra(extra: Optional[dict]) -> None:
    """Refuse in ``deepspeed.extra`` the keys the engine sets or owns (:data:`ENGINE_OWNED_KEYS`,
    ``zero_optimization.stage``, ``fp16.enabled``, ``bf16.enabled``); the other sub-keys of those
    sections (ZeRO buckets, the fp16 loss scaler...) are allowed. A top-level key close to one of
    :data:`DEEPSPEED_TOP_KEYS` but not one (``zero_optimisation``) is a ConfigError naming it; another
    unknown key is passed on with a warning (a newer DeepSpeed's option). DeepSpeed itself checks the
    keys inside its sections, but ignores a section's option written at the top level
    (:data:`NESTED_KEYS`: a ConfigError naming the section). ZeRO-Offload needs
    ``zero_force_ds_cpu_optimizer: false`` beside it (a ConfigError saying so)."""
    import difflib
    import logging

    for key in extra or {}:
        if key in DEEPSPEED_TOP_KEYS:
            continue
        if key in NESTED_KEYS:
            raise ConfigError(f"deepspeed.extra.{key}: DeepSpeed reads it inside its {NESTED_KEYS[key]!r} section and "
                              f"ignores it here; write deepspeed.extra.{NESTED_KEYS[key]}.{key}")
        close = difflib.get_close_matches(key, sorted(DEEPSPEED_TOP_KEYS), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"deepspeed.extra.{key}: not a DeepSpeed option (DeepSpeed would ignore it); "
                              f"did you mean {close[0]!r}?")
        if key not in _WARNED_EXTRA:  # (checked before set-up, and again when the config is built)
            _WARNED_EXTRA.add(key)
            logging.getLogger(__name__).warning(
                "deepspeed.extra.%s is not a DeepSpeed option this engine knows; passed on as it is (DeepSpeed "
                "ignores top-level keys it does not know)", key)
    for key, value in (extra or {}).items():
        if key in ENGINE_OWNED_KEYS:
            raise ConfigError(f"deepspeed.extra.{key}: the engine sets this; use {ENGINE_OWNED_KEYS[key]} instead")
        owned = _OWNED_SUBKEYS.get(key)
        if owned is not None:
            sub, field_ = owned
            if not isinstance(value, dict):
                raise ConfigError(f"deepspeed.extra.{key} must be a mapping of options, got {value!r}")
            if sub in value:
                raise ConfigError(f"deepspeed.extra.{key}.{sub}: the engine sets this; use {field_} instead")
    zero = (extra or {}).get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    device = offload.get("device") if isinstance(offload, dict) else None
    if device in ("cpu", "nvme") and (extra or {}).get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ConfigError(  # (what DeepSpeed checks: zero_use_cpu_optimizer; offload_param alone is fine)
            f"deepspeed.extra.zero_optimization.offload_optimizer.device={device}: ZeRO-Offload with the engine's torch AdamW needs "
            "deepspeed.extra.zero_force_ds_cpu_optimizer=false (DeepSpeed refuses a client optimizer otherwise, "
            "and the engine owns the optimizer); torch's AdamW then steps on the CPU, slower than DeepSpeedCPUAdam")


def deepspeed_config(
    *,
    micro_batch: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    gradient_clipping: float,
    extra: Optional[dict] = None,
) -> dict:
    """The DeepSpeed JSON config the engine uses (the optimiser is passed as an object); ``extra`` is
    merged last, after :func:`check_deepspeed_extra`."""
    check_deepspeed_extra(extra)
    for section in ("fp16", "bf16"):
        if section in (extra or {}) and precision != section:
            raise ConfigError(f"deepspeed.extra.{section} tunes {section} training, but deepspeed.precision={precision}")
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
        # gradients averaged over the ranks in fp32, as the official fp32 DDP (and PyTorch DDP under
        # autocast) does: DeepSpeed's default for bf16 is bf16, a rounding at every add of the
        # reduction, growing with the number of ranks; `deepspeed.extra` may set bf16 for less traffic
        cfg["communication_data_type"] = "fp32"
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


def gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (every rank calls this; ``[obj]`` alone)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op alone)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x
