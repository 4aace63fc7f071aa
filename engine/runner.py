"""The training loop shared by pre-training and fine-tuning: set-up, step, checkpoints, resume.

One ordered set-up (torchtitan style): rendezvous → loader → seeds → model (plain, from
``models``) → activation checkpointing (from outside) → derived values printed → AdamW groups →
``deepspeed.initialize`` → resume. The loop is generic over a *step function* that turns a batch
into a scalar loss; everything else (LR per iteration, non-finite handling, DeepSpeed
backward/step, grad norm, logging, checkpoints) lives here once.

Determinism and resume (tested: losses after ``--resume auto`` equal an uninterrupted run
bit-for-bit on CPU fp32): the model/optimiser come from the DeepSpeed checkpoint; each rank also
saves its own state (step, epoch, batches consumed in the epoch, the data layout, the numpy
mask/mixup Generator, torch/CUDA/python RNG), and the loader restarts at the next batch of the
same seeded epoch plan.

Resume with another world size or per-rank batch (:func:`map_data_position`): the epoch order
does not depend on either (``sampler.epoch_order``; rank ``r`` of ``W`` takes positions
``r, r+W, ...`` in batches of ``b``), so ``k`` batches of ``(W, b)`` consumed the first ``k·W·b``
positions of the epoch. The run continues at batch ``⌊k·W·b / (W'·b')⌋`` of the same epoch
(at most ``W'·b' - 1`` clips are seen twice, none is skipped; one line says so), and the step
count is rescaled to ``epoch · steps_per_epoch' + batch`` so that the per-step LR schedule
continues at the same fraction of training (AdamW's own step count, used for bias correction,
stays the number of updates actually made). A layout that cannot be mapped (another seed,
dataset or ``data.clips_per_epoch``) restarts the epoch with a warning. The model and optimiser
state can only follow a world-size change with ZeRO-0 (``checkpoint.load_checkpoint``).

Logged loss: the mean of the ranks' losses (each the mean over its own batch), i.e. the mean over
the global batch; it shares the all-reduce of the non-finite flag, so it costs no extra host sync.

Output folder (:func:`prepare_output_dir`, before the loader and the model are built): interrupted
saves are repaired (``checkpoint.recover_checkpoint_dir``); ``--resume`` is resolved and checked
(``checkpoint.resolve_resume``, ``checkpoint.check_resume_config``: a changed model is a
ConfigError, other changes one warning line printed once the checkpoint has loaded; this config's
AdamW settings and gradient clipping replace the loaded ones, :func:`reapply_optimizer_settings`;
a changed AdamW grouping is a ConfigError, ``checkpoint.check_param_groups``). A start
without ``--resume`` (or from another run's checkpoint) in a ``train.output_dir`` that already holds
checkpoints is a ConfigError, unless ``train.overwrite=true``, which removes the previous run's
:data:`RUN_OUTPUTS` once the data has validated, the model is built, DeepSpeed is set up and a
checkpoint to continue is loaded (a mistake found by then leaves them). Resuming an older tag of the run's own folder sets the newer tags aside
(``checkpoint.set_aside_newer``). A resumed run that already reached its last step trains, saves and
evaluates nothing (:func:`train_loop` returns ``already_complete``). A fresh start drops a stale
``metrics.jsonl`` of a run that died before its first checkpoint.

Non-finite losses: the finite flag is summed over ranks so all ranks skip together (no
backward, no optimiser step; ZeRO collectives stay matched). Non-finite gradients of a finite
loss: the update is skipped too, by DeepSpeed where it checks for overflow (ZeRO, bf16;
``was_step_applied``), by :func:`_step` at stage-0 fp32, where DeepSpeed would apply them (the
gradient norm is then computed every step: one more host sync); fp16's overflows while its loss
scaler lowers the scale are routine and not counted, those at its minimum scale or under a static
one are (:func:`_scale_search`). Each skipped update is counted and
logged (``grad_norm`` NaN); after ``train.max_nonfinite`` in a row the run stops with a diagnostic
(:class:`NonFiniteLossError`).
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from engine.checkpoint import (
    available_tags,
    check_param_groups,
    check_resume_config,
    check_task,
    checkpoint_dir,
    find_latest,
    load_checkpoint,
    on_first_local_ranks,
    recover_checkpoint_dir,
    resolve_resume,
    save_checkpoint,
    set_aside_newer,
    stored_tags,
    write_problem,
)
from engine.config import Config, ConfigError, Derived, config_to_dict, config_to_yaml, derive
from engine.distributed import (
    DistInfo,
    all_reduce_sum,
    apply_activation_checkpointing,
    check_deepspeed_extra,
    deepspeed_args,
    deepspeed_config,
    init_distributed,
)
from engine import signals
from engine.logging import RunLogger, peak_memory_gb
from engine.optim import build_optimizer, lr_at_step, param_groups, set_lr

__all__ = ["NonFiniteLossError", "SaveError", "StopRequested", "TrainState", "Run", "setup_run", "train_loop", "print0",
           "DataLayout", "DataPosition", "data_layout", "map_data_position", "ResumePlan", "prepare_output_dir",
           "clear_run_outputs", "RUN_OUTPUTS", "on_rank0"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row without an update (non-finite losses or gradients)."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (the earlier ones and ``latest`` are intact)."""


_WRITE_FAILED = re.compile(r"PytorchStreamWriter|inline_container|file write failed|No space left|Disk quota|"
                           r"Parent directory .* does not exist")
"""How torch.save reports a failed write (a RuntimeError, e.g. on a full disk), besides OSError."""


class StopRequested(Exception):
    """``train.stop_after_steps`` was reached (a simulated kill; exit code 3 from the CLI)."""


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, **kwargs, flush=True)


@dataclass
class TrainState:
    """Counters saved with every checkpoint (per rank)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    best_metric: float = -math.inf
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataLayout:
    """How a training loader cuts an epoch into batches (saved with every checkpoint)."""

    world_size: int
    """Data-parallel ranks."""
    batch_size: int
    """Epoch-order positions per rank per batch (``data.batch_size``; ``repeated_aug`` copies of a
    position travel in the same batch, so they do not count here)."""
    epoch_length: int
    """Positions in one epoch (``data.clips_per_epoch`` or the dataset size)."""
    dataset_len: int
    """Videos (or images) in the dataset the epoch order permutes."""
    seed: int
    """``data.seed`` of the epoch order."""
    num_batches: int
    """Batches per epoch on each rank (the loader's length)."""

    def same_order(self, other: "DataLayout") -> bool:
        """Whether both layouts cut the same epoch order (only then do positions map)."""
        return (self.epoch_length, self.dataset_len, self.seed) == (other.epoch_length, other.dataset_len, other.seed)


def data_layout(loader: Any) -> DataLayout:
    """The :class:`DataLayout` of a training loader (``VideoLoader`` or ``ImageLoader``)."""
    return DataLayout(world_size=int(loader.world_size), batch_size=int(loader.cfg.batch_size),
                      epoch_length=int(loader.epoch_length()), dataset_len=len(loader.dataset),
                      seed=int(loader.cfg.seed), num_batches=len(loader))


@dataclass(frozen=True)
class DataPosition:
    """Where a resumed run continues: ``batches`` batches of ``epoch`` count as consumed."""

    epoch: int
    batches: int
    mapped: bool
    """The layout changed and the position was converted (the step count must follow)."""
    message: Optional[str] = None
    """One line for the user, or None when nothing changed."""
    warning: bool = False
    """``message`` is a warning (the position could not be mapped: the epoch restarts)."""


def map_data_position(saved: DataLayout, epoch: int, consumed: int, now: DataLayout) -> DataPosition:
    """Convert "``consumed`` batches of ``epoch`` under ``saved``" to a position under ``now``
    (module docstring): the first ``consumed·W·b`` positions of the epoch order were handed out, so
    the run continues at batch ``⌊consumed·W·b / (W'·b')⌋`` (repeating fewer than ``W'·b'`` clips,
    skipping none); a complete epoch moves on to the next one. Different epoch orders (seed,
    dataset, epoch length) cannot be mapped: the epoch restarts at batch 0 with a warning."""
    if consumed < 0 or consumed > saved.num_batches:
        raise ValueError(f"batches consumed {consumed} outside [0, {saved.num_batches}]")
    if consumed >= saved.num_batches:  # the epoch was complete: the next one starts afresh
        return DataPosition(epoch + 1, 0, mapped=saved != now)
    if saved == now:
        return DataPosition(epoch, consumed, mapped=False)
    if not saved.same_order(now):
        def order(x: DataLayout) -> str:
            n = x.epoch_length if x.epoch_length >= 0 else "an unknown number of"
            return f"seed {x.seed}, {x.dataset_len} videos, {n} clips per epoch"

        return DataPosition(epoch, 0, mapped=True, warning=True, message=(
            f"resume: the checkpoint's epoch order ({order(saved)}) differs from this run's ({order(now)}): "
            f"restarting epoch {epoch} at batch 0"))
    clips = consumed * saved.world_size * saved.batch_size  # the first `clips` positions of the order
    per_batch = now.world_size * now.batch_size
    k = clips // per_batch
    if k >= now.num_batches:  # the rest of the epoch does not fill a batch of the new layout
        return DataPosition(epoch + 1, 0, mapped=True, message=(
            f"resume: {clips} of {saved.epoch_length} clips of epoch {epoch} consumed with {saved.world_size} "
            f"rank(s) x {saved.batch_size}; with {now.world_size} x {now.batch_size} the epoch is complete: "
            f"continuing with epoch {epoch + 1}"))
    return DataPosition(epoch, k, mapped=True, message=(
        f"resume: {clips} of {saved.epoch_length} clips of epoch {epoch} consumed with {saved.world_size} rank(s) x "
        f"{saved.batch_size} per batch ({consumed} batches); with {now.world_size} x {now.batch_size} continuing at "
        f"batch {k} of {now.num_batches} ({clips - k * per_batch} clips seen again)"))


def _saved_layout(saved: dict, now: DataLayout, drop_last: bool) -> DataLayout:
    """The layout a rank state was saved with. States written before layouts were saved hold only
    world size, seed and batch count: the rest is taken as unchanged when the batch count agrees
    (``shard_positions`` with ``drop_last``), else the layout is marked unknown (it maps to
    nothing, so the epoch restarts with a warning)."""
    if saved.get("data_layout"):
        return DataLayout(**saved["data_layout"])
    from engine.data.sampler import shard_positions

    ls = saved["loader"]
    world = int(ls.get("world_size", now.world_size))
    batches = int(ls.get("num_batches", now.num_batches))
    known = batches == len(shard_positions(now.epoch_length, 0, world, now.batch_size, drop_last))
    return DataLayout(world_size=world, batch_size=now.batch_size, epoch_length=now.epoch_length if known else -1,
                      dataset_len=now.dataset_len, seed=int(ls.get("seed", now.seed)), num_batches=batches)


@dataclass
class Run:
    """Everything a loop needs; built by :func:`setup_run`."""

    cfg: Config
    dist: DistInfo
    model: nn.Module  # the plain module (engine.module)
    engine: Any  # deepspeed.DeepSpeedEngine
    loader: Any  # engine.data.VideoLoader
    derived: Derived
    logger: RunLogger
    dtype: torch.dtype
    rng: np.random.Generator
    state: TrainState
    param_group_names: list = field(default_factory=list)
    resumed_from: Optional[str] = None
    resumed_step: Optional[int] = None
    """The step of the checkpoint resumed from, in its own unit (``metrics.jsonl``'s records up to it
    are kept), or None."""
    resumed_own: bool = False
    """Whether that checkpoint is this run's own (its ``metrics.jsonl`` is this run's)."""
    resumed_epoch: Optional[float] = None
    """That checkpoint's position in epochs (comparable across a step rescale, as ``metrics.jsonl``'s
    ``epoch``), or None."""

    @property
    def main(self) -> bool:
        return self.dist.rank == 0

    @property
    def _rank(self) -> int:
        return self.dist.rank if self.dist is not None else 0

    @property
    def _device(self) -> torch.device:
        """This rank's device (CPU for a Run assembled without a process group, as tests do)."""
        return self.dist.device if self.dist is not None else torch.device("cpu")

    def rank_state(self) -> dict:
        """This rank's resumable state (saved beside the DeepSpeed shards)."""
        loader_state = self.loader.state_dict()
        loader_state["epoch"] = self.state.epoch
        loader_state["batches_consumed"] = self.state.batch_in_epoch
        return {
            "rank": self._rank,
            "train_state": self.state.__dict__.copy(),
            "loader": loader_state,
            "data_layout": data_layout(self.loader).__dict__.copy(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            # this rank's own GPU only: a list of every visible GPU's state failed to restore on a node
            # that sees fewer GPUs, and restored another device's state where the layout changed
            "cuda_rng": torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None,
            "python_rng": random.getstate(),
        }

    def restore_rank_state(self, saved: dict) -> None:
        """Restore counters, RNGs and the data position from a rank state; a changed world size or
        per-rank batch is mapped by :func:`map_data_position` and the step count follows it."""
        self.state = TrainState(**saved["train_state"])
        self.rng.bit_generator.state = saved["numpy_rng"]
        torch.set_rng_state(saved["torch_rng"])
        cuda_rng, device = saved.get("cuda_rng"), self._device
        if isinstance(cuda_rng, (list, tuple)):  # older checkpoints: every visible GPU's state
            index = device.index or 0
            cuda_rng = cuda_rng[index] if index < len(cuda_rng) else None
        if cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, device)
        random.setstate(saved["python_rng"])
        if int(saved.get("rank", self._rank)) != self._rank:
            self._fork_rngs()
        now = data_layout(self.loader)
        before = _saved_layout(saved, now, bool(self.loader.cfg.drop_last))
        if before.num_batches > 0:  # the checkpoint's position in epochs (its own step unit)
            self.resumed_epoch = int(saved["train_state"]["step"]) / before.num_batches
        pos = map_data_position(before, int(saved["loader"]["epoch"]), int(saved["loader"]["batches_consumed"]), now)
        line = pos.message
        if pos.mapped:  # the same fraction of training, in steps of the new global batch
            old = self.state.step
            self.state.step = pos.epoch * now.num_batches + pos.batches
            if self.state.step != old:
                note = (f"step {old} -> {self.state.step} (global batch {before.world_size * before.batch_size} -> "
                        f"{now.world_size * now.batch_size}; the LR schedule continues at epoch "
                        f"{self.state.step / now.num_batches:.4g})")
                line = f"{line}; {note}" if line else f"resume: {note}"
        if line:
            print0(("warning: " if pos.warning else "") + line, file=sys.stderr if pos.warning else sys.stdout)
        self.state.epoch, self.state.batch_in_epoch = pos.epoch, pos.batches
        loader_state = self.loader.state_dict()  # this run's world size and seed: nothing to reset
        loader_state.update(epoch=pos.epoch, batches_consumed=pos.batches)
        self.loader.load_state_dict(loader_state)

    def _fork_rngs(self) -> None:
        """Give this rank streams of its own after it restored another rank's state (a ZeRO-0
        checkpoint resumed on more ranks: rank ``r`` reads saved rank ``r mod saved_world``). Each
        stream is seeded by a draw of the restored one and this rank, so that ranks sharing a saved
        state draw different masks, mixup and drop-path decisions, and a rerun draws the same."""
        base = int(self.rng.integers(2 ** 62))
        self.rng.bit_generator.state = np.random.default_rng([base, self._rank]).bit_generator.state
        torch.manual_seed(int(np.random.default_rng([base, self._rank, 1]).integers(2 ** 62)))
        random.seed(int(np.random.default_rng([base, self._rank, 2]).integers(2 ** 62)))

    def save(self, tag: Optional[str] = None, *, update_latest: bool = True, keep: Optional[int] = None) -> str:
        tag = tag or f"step{self.state.step:08d}"
        t0 = time.time()
        try:
            path = save_checkpoint(self.engine, self.cfg.train.output_dir, tag, rank_state=self.rank_state(),
                                   config_yaml=config_to_yaml(self.cfg), update_latest=update_latest,
                                   keep=self.cfg.train.keep_checkpoints if keep is None else keep,
                                   param_group_names=self.param_group_names)
        except (OSError, RuntimeError) as e:  # a full disk, a quota, a read-only or vanished folder
            if isinstance(e, RuntimeError) and not _WRITE_FAILED.search(str(e)):
                raise  # not a write failure: a bug, with its traceback
            raise SaveError(f"saving checkpoint {tag} in {self.cfg.train.output_dir} failed on rank {self.dist.rank} "
                            f"({type(e).__name__}: {e}); "
                            f"nothing was lost before it: the last complete checkpoint is "
                            f"{find_latest(self.cfg.train.output_dir, resumable=True) or 'none yet'} "
                            "(free space or fix the folder, "
                            "then --resume auto)") from e
        self.logger.write(f"saved checkpoint {path} ({time.time() - t0:.1f} s)")
        return path


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "classes.json", "tb", "eval.json", "evals.jsonl",
               "eval.predictions.npz", "backbone.safetensors", "backbone.eval.json", "backbone.evals.jsonl",
               "backbone.eval.predictions.npz")
"""What ``train.overwrite=true`` removes from ``train.output_dir`` before a new run starts there
(``maskfeat export``'s default file and its evaluations too: they stayed, and the next export's
evaluations were appended to the old model's history)."""


FINISHED_RUN_OUTPUTS = ("backbone.safetensors", "eval.json", "evals.jsonl")
"""What only a finished run leaves (its export, its evaluation): with them and no checkpoint, a folder
still holds a run (a run that died before its first checkpoint leaves metrics, config and TensorBoard
files only, and a fresh start there needs no train.overwrite)."""


def clear_run_outputs(output_dir: str) -> list[str]:
    """Remove the :data:`RUN_OUTPUTS` of a previous run from ``output_dir``; returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name + ("/" if name in ("checkpoints", "tb") else ""))
    return removed


@dataclass
class ResumePlan:
    """What :func:`prepare_output_dir` decided: where to resume from, and what to say once loaded."""

    ckpt_dir: Optional[str] = None
    """The ``checkpoints`` folder of the tag to resume from (None: a fresh start)."""
    tag: Optional[str] = None
    own: bool = True
    """The tag is in this run's own ``train.output_dir`` (else it continues another run's checkpoint)."""
    config_warning: Optional[str] = None
    """One line listing the config changes since the checkpoint (printed after it has loaded)."""
    clear: bool = False
    """``train.overwrite`` is to remove the previous run's outputs (:func:`clear_previous_run`)."""

    @property
    def path(self) -> Optional[str]:
        return None if self.tag is None else os.path.join(self.ckpt_dir, self.tag)


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on global rank 0 and broadcast to every rank; a ConfigError it raises is
    raised on every rank, another exception on rank 0 as itself and on the others as a RuntimeError
    naming it (so no rank waits in a collective the others left: an unreadable output folder held
    the other ranks until the timeout, where no launcher ends them)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return fn()
    box: list = [None]
    failed: Optional[Exception] = None
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as e:
            box[0] = ("error", str(e))
        except Exception as e:
            box[0], failed = ("failed", f"{type(e).__name__}: {e}"), e
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if failed is not None:
        raise failed
    if kind == "error":
        raise ConfigError(value)
    if kind == "failed":
        raise RuntimeError(f"rank 0 failed ({value}); its log has the traceback")
    return value


def _uncreatable(out: str) -> Optional[str]:
    """Why the folder ``out`` cannot be used or made, or None."""
    path = os.path.abspath(out)
    if os.path.lexists(path) and not os.path.isdir(path):
        return "it exists and is not a folder"
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    if not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    e = write_problem(path) if path != os.path.abspath(out) else None  # (what the run's makedirs will need)
    return f"a folder cannot be made in {path} ({type(e).__name__}: {e.strerror or e})" if e else None


def check_writable(out: str) -> None:
    """A ConfigError when ``out`` or its ``checkpoints/`` exists and a file cannot be made there (a
    read-only folder): the run stopped with a traceback at its first write (config.yaml), after the
    data had validated and the model was built. A missing ``out`` needs its nearest existing parent to
    be a folder it can be made in (a file in the way, or a read-only parent, was a traceback there)."""
    why = _uncreatable(out)
    if why:
        raise ConfigError(f"train.output_dir={out}: {why}; a run writes its checkpoints, config and logs there: "
                          "choose another train.output_dir")
    for folder in (out, checkpoint_dir(out)):
        e = write_problem(folder) if os.path.isdir(folder) else None
        if e:
            raise ConfigError(f"train.output_dir={out}: cannot write in {folder} ({type(e).__name__}: {e}); a run "
                              "writes its checkpoints, config and logs there: make it writable or choose another "
                              "train.output_dir") from None


def prepare_output_dir(cfg: Config, resume: Optional[str], *, defer_clear: bool = False,
                       task: Optional[str] = None) -> ResumePlan:
    """Check and tidy ``train.output_dir`` before a run builds anything (module docstring); every rank
    calls this (file changes happen on the first local rank of each node). Raises ConfigError for a
    ``--resume`` that names no complete checkpoint, a model change since the checkpoint, and a new
    run in a folder that holds one already (without ``train.overwrite``). ``defer_clear``: leave
    ``train.overwrite``'s removal to :func:`clear_previous_run` (``plan.clear``), which the run calls
    once its data has validated, its model is built, DeepSpeed is set up and a checkpoint to continue
    is loaded: a mistyped ``data.root`` or ``deepspeed.extra`` must not cost the previous run.
    ``task``: ``"pre-training"`` | ``"fine-tuning"``, the model the run trains (``checkpoint.check_task``
    refuses a checkpoint of the other kind here, before the resume is announced)."""
    out = cfg.train.output_dir
    ckpt = checkpoint_dir(out)
    on_rank0(lambda: check_writable(out))
    note = on_first_local_ranks(lambda: recover_checkpoint_dir(ckpt))
    if note:
        print0(note)

    def decide() -> tuple[ResumePlan, bool]:
        plan = ResumePlan()
        if resume:
            target = resolve_resume(resume, out)
            if target is not None:
                plan.ckpt_dir, plan.tag = target
                plan.own = os.path.realpath(plan.ckpt_dir) == os.path.realpath(ckpt)
                plan.config_warning = check_resume_config(plan.path, config_to_dict(cfg))
                check_task(plan.path, task)
        there = stored_tags(ckpt) if not plan.own or plan.tag is None else []
        if there and not cfg.train.overwrite:
            what, latest = "", find_latest(out, resumable=True)
            if plan.tag is None and latest and resume != "auto":  # (--resume auto would have taken it)
                what = "continue it with --resume auto, "
            elif plan.tag is None and resume == "auto" and not available_tags(ckpt):
                what = ("none of them is a complete checkpoint to continue (rank states, model states and ZeRO "
                        "shards; a copy cut short?): ")
            elif plan.tag is None and available_tags(ckpt):
                # --resume auto takes the newest step tag only: a fine-tuning run stopped before its first
                # step checkpoint holds nothing but `best`, continued by naming it
                what = (f"continue it with {' or '.join('--resume ' + t for t in available_tags(ckpt))} "
                        "(--resume auto takes the newest step checkpoint only, and there is none), ")
            raise ConfigError(
                f"train.output_dir={out} already holds a run (checkpoints {', '.join(there)}"
                f"{f'; latest {latest}' if latest else ''}): {what}choose another train.output_dir, or set "
                f"train.overwrite=true to delete its {', '.join(RUN_OUTPUTS)} and start afresh there")
        # a finished run whose checkpoints were deleted (to save space, once exported): a new run there
        # dropped its metrics and hid its TensorBoard curves, silently
        finished = ([n for n in FINISHED_RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
                    if plan.tag is None or not plan.own else [])  # (not when it continues its own checkpoint)
        if finished and not there and not cfg.train.overwrite:
            raise ConfigError(
                f"train.output_dir={out} holds a finished run's outputs ({', '.join(finished)}; no checkpoint to "
                f"continue): choose another train.output_dir, or set train.overwrite=true to delete its "
                f"{', '.join(RUN_OUTPUTS)} and start afresh there")
        if resume and plan.tag is None:
            print(f"--resume auto: no step checkpoint under {ckpt}; starting fresh", flush=True)
        return plan, bool(there or finished)

    # rank 0 decides and every rank follows: on a node-local filesystem the other nodes' views of
    # the folder differ (DeepSpeed writes the module states on rank 0 only)
    plan, plan.clear = on_rank0(decide)
    if not defer_clear:
        clear_previous_run(cfg, plan)
    if plan.tag is not None and not plan.own:
        print0(f"resume: continuing checkpoint {plan.path} of another run in train.output_dir={out} (new "
               "checkpoints and logs go there; the source folder is not changed)")
    return plan


def clear_previous_run(cfg: Config, plan: ResumePlan) -> None:
    """``train.overwrite=true``: remove the previous run's :data:`RUN_OUTPUTS` when
    :func:`prepare_output_dir` decided so (every rank calls this)."""
    if plan.clear:
        out = cfg.train.output_dir
        removed = on_first_local_ranks(lambda: clear_run_outputs(out))
        print0(f"train.overwrite=true: removed the previous run's {', '.join(removed or [])} from {out}")
        plan.clear = False


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_run(
    cfg: Config,
    *,
    build_model: Callable[[Any], nn.Module],
    build_loader: Callable[[DistInfo], Any],
    clips_per_rank: Callable[[Any], int],
    resume: Optional[str],
    desc: str,
) -> Run:
    """Ordered set-up of a run (module docstring). ``resume`` is ``None``, ``"auto"``, a tag or a path
    (``checkpoint.resolve_resume``); ``build_model(loader)`` may read the dataset (e.g. its number
    of classes), and must not write into ``train.output_dir``: ``train.overwrite`` clears it after
    the build."""
    check_deepspeed_extra(cfg.deepspeed.extra)  # a key the engine owns: ConfigError before any work
    if cfg.deepspeed.precision == "fp16" and (cfg.train.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("deepspeed.precision=fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16); "
                          "use bf16 or fp32 on the CPU")
    dist = init_distributed(cfg.train.device)  # sets DS_ACCELERATOR before deepspeed is first imported
    import deepspeed

    plan = prepare_output_dir(cfg, resume, defer_clear=True, task={"pretrain": "pre-training",
                                                                    "finetune": "fine-tuning"}.get(desc))
    if dist.rank == 0:
        print("config:\n" + config_to_yaml(cfg), flush=True)
    loader = build_loader(dist)
    _seed_all(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(loader)
    ac = cfg.model.activation_checkpointing
    if ac:  # true: every block; N: the first N
        try:
            n = apply_activation_checkpointing(model, ac)
        except ValueError as e:
            raise ConfigError(f"model.activation_checkpointing={ac}: {e}") from None
        print0(f"activation checkpointing: {n} blocks")
    model.to(dist.device)
    derived = derive(cfg, dist.world_size, len(loader), clips_per_rank(loader))
    print0("derived:\n" + derived.describe(cfg) + f"\ndevice              {dist.device} ({dist.backend}), "
           f"data reader {loader.reader}")

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"model {cfg.model.name}: {n_params / 1e6:.2f} M parameters, {len(groups)} AdamW groups "
           f"(lr scale, weight decay): " + ", ".join(f"({g['lr_scale']:.3g}, {g['weight_decay']:g})"
                                                   for g in groups[:8]) + (" ..." if len(groups) > 8 else ""))
    lr0 = lr_at_step(0, derived.steps_per_epoch, peak_lr=derived.lr, epochs=cfg.schedule.epochs,
                     warmup_epochs=cfg.schedule.warmup_epochs, warmup_start_lr=derived.warmup_start_lr,
                     end_lr=derived.end_lr, cosine_after_warmup=cfg.schedule.cosine_after_warmup)
    # torch's AdamW (fused on CUDA) for every ZeRO stage: DeepSpeed's own Adam ops compile C++/CUDA
    # on first use (~30 s on CPU, DESIGN §4) and bring nothing the fused torch kernel lacks here.
    optimizer = build_optimizer(groups, lr0, cfg.optim.betas, cfg.optim.eps, fused=dist.device.type == "cuda")
    ds_cfg = deepspeed_config(micro_batch=derived.batch_per_rank, world_size=dist.world_size,
                              zero_stage=cfg.deepspeed.zero_stage, precision=cfg.deepspeed.precision,
                              gradient_clipping=cfg.deepspeed.gradient_clipping, extra=cfg.deepspeed.extra)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                               args=deepspeed_args(dist, cfg.deepspeed.zero_stage))
    except ValueError as e:  # pydantic's ValidationError: a key or value of deepspeed.extra DeepSpeed refuses
        if type(e).__name__ != "ValidationError":
            raise
        raise ConfigError("deepspeed.extra: DeepSpeed refuses the config it makes: "
                          + "; ".join(line.strip() for line in str(e).splitlines()[:3])) from None
    forget_initial_step(engine.optimizer, optimizer)
    rng = rank_rng(cfg.train.seed, dist.rank)
    torch.manual_seed(cfg.train.seed * 1000 + dist.rank + 1)  # drop path etc. differ per rank
    run = Run(cfg=cfg, dist=dist, model=engine.module, engine=engine, loader=loader, derived=derived,
              logger=RunLogger(cfg.train.output_dir, enabled=False, total_steps=0), dtype=DTYPES[cfg.deepspeed.precision],
              rng=rng, state=TrainState(), param_group_names=[g["names"] for g in groups])
    if plan.tag is not None:
        # rank 0 reads DeepSpeed's model states (on a node-local filesystem only its node holds them)
        on_rank0(lambda: check_param_groups(plan.path, run.param_group_names, config_to_dict(cfg)))
        saved = load_checkpoint(engine, cfg.train.output_dir, plan.tag, zero_stage=cfg.deepspeed.zero_stage,
                                ckpt_dir=plan.ckpt_dir, precision=cfg.deepspeed.precision)
        reapply_optimizer_settings(engine.optimizer, groups, cfg.optim.betas, cfg.optim.eps,
                                   cfg.deepspeed.gradient_clipping)
        run.restore_rank_state(saved)
        if plan.config_warning:
            print0(plan.config_warning, file=sys.stderr)
        saved_step = int(saved["train_state"]["step"])
        if plan.own:  # going back in time: newer tags would be picked by --resume auto or pruned later
            # (after a step rescale, another global batch, this run's saves may reach the numbers of older
            # tags in the old unit: each is set aside when that happens, not before, so that a crash
            # before the first save still resumes from the tag it resumed from)
            moved = on_first_local_ranks(lambda: set_aside_newer(plan.ckpt_dir, saved_step, plan.tag))
            if moved:
                print0(f"resume: {plan.tag} is older than {', '.join(a for a, _ in moved)}; set aside as "
                       f"{', '.join(b for _, b in moved)} in {plan.ckpt_dir} (delete them once not needed)")
        run.resumed_from, run.resumed_step, run.resumed_own = plan.path, saved_step, bool(plan.own)
        print0(f"resumed from {run.resumed_from} at step {run.state.step} (epoch {run.state.epoch}, "
               f"batch {run.state.batch_in_epoch})")
    # the data validated, the model built (its checks: the classes, the pretrained weights), DeepSpeed
    # set up (its config, the launch) and a checkpoint of another run loaded, and nothing written to the
    # folder yet: a mistake found before here costs no previous run
    clear_previous_run(cfg, plan)
    if dist.rank == 0:
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_to_yaml(cfg))
    # logs after the checkpoint are dropped (by epoch, which a step rescale keeps comparable): on
    # resume, those of the interrupted stretch; on a fresh start (step 0), or continuing another run's
    # checkpoint (the folder's records are not of that run), a stale metrics.jsonl of a run that died
    # before its first checkpoint
    own = run.resumed_own
    run.logger = RunLogger(cfg.train.output_dir, enabled=dist.rank == 0, total_steps=derived.run_steps,
                           initial_step=run.state.step, progress_bar=cfg.log.progress_bar,
                           tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl, desc=desc,
                           resume_step=(run.resumed_step or 0) if own else 0,
                           resume_epoch=run.resumed_epoch if own else None)
    return run


def _grad_norm_fallback(model: nn.Module) -> float:
    """Global L2 norm of the (already all-reduced) gradients; one host sync."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else float("nan")


_MIN_SCALE = "loss scale already at minimum"  # DeepSpeed's fp16 DynamicLossScaler gives up (a plain Exception)


def _step(engine, skip: bool, fp16: bool) -> bool:
    """``engine.step()``; returns whether it updated the parameters. ``skip``: the optimizer's own
    step is left out while DeepSpeed's bookkeeping runs as usual (clipping, zero_grad, its step
    counters), for a non-finite gradient that stage-0 fp32 would apply. Otherwise DeepSpeed's
    ``was_step_applied``: False where it skipped an update for an overflow (ZeRO, bf16: a
    non-finite gradient). With fp16 an overflow while the loss scaler lowers its scale is routine
    and counts as applied (:func:`_scale_search`); at its minimum it counts as skipped, and ZeRO's
    scaler giving up there is a NonFiniteLossError."""
    if skip:
        opt = engine.optimizer
        own = opt.__dict__.get("step")
        opt.step = lambda *a, **k: None
        try:
            engine.step()
        finally:
            if own is None:
                del opt.step
            else:
                opt.step = own
        return False
    try:
        engine.step()
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises a bare Exception
        if _MIN_SCALE in str(e):
            raise NonFiniteLossError(f"fp16: DeepSpeed's loss scale is at its minimum and the gradients still overflow "
                                     "(non-finite); use bf16 or fp32, or lower optim.lr") from e
        raise
    return engine.was_step_applied() or (fp16 and _scale_search(engine.optimizer))


def _scale_search(opt: Any) -> bool:
    """Whether an fp16 update skipped for an overflow is the dynamic loss scaler's search for its
    scale (routine), not non-finite gradients at its minimum scale or under a static one. ZeRO's
    scaler raises at its minimum; stage 0's ``FP16_UnfusedOptimizer`` clamps there and would skip
    every update for ever without a word."""
    cfg = getattr(opt, "loss_scale_config", None)  # FP16_UnfusedOptimizer (stage 0)
    if cfg is not None:
        return bool(cfg.dynamic_loss_scale) and cfg.cur_scale > cfg.min_loss_scale
    scaler = getattr(opt, "loss_scaler", None)  # ZeRO's (Dynamic)LossScaler
    if scaler is not None:
        return bool(getattr(scaler, "dynamic", False)) and scaler.cur_scale > getattr(scaler, "min_scale", 0)
    return True  # another optimizer: its skips are not ours to count


def _norm_scale(opt: Any) -> float:
    """The factor in the grad norm DeepSpeed records for ``opt``: stage 0's fp16 ``FP16_UnfusedOptimizer``
    records the norm of the loss-scaled gradients (its comment: "norm is in fact norm*scale"; 65536×
    the true norm at the initial scale), the fused fp16 optimizer and ZeRO the true norm. Read it
    before the step: an overflow lowers the scale."""
    if type(opt).__name__ == "FP16_UnfusedOptimizer":
        return float(opt.loss_scale_config.cur_scale)
    return 1.0


def _step_grad_norm(engine: Any, scale: float, fallback: Optional[float]) -> Any:
    """The step's global grad norm as DeepSpeed recorded it (a tensor or a float), divided by the loss
    scale it carries (:func:`_norm_scale`, read before the step); ``fallback`` (or NaN) where DeepSpeed
    records none (stage-0 fp32)."""
    gn = engine.get_global_grad_norm()
    if gn is None:
        return fallback if fallback is not None else float("nan")
    return gn / scale if scale != 1.0 else gn


class _ReadBack:
    """A step's loss and grad norm copied to the host without waiting for the GPU: the copy is
    queued on the stream after the step that made them. ``ready()`` says whether it has landed;
    ``value()`` waits for the copy alone, not for work queued after it. A plain ``float(t)`` would
    wait for the whole stream instead, so the CPU could not queue the next step while the GPU
    finishes this one. The grad norm comes either as a device tensor (copied with the loss) or as
    a float already on the host (``grad_norm``)."""

    def __init__(self, loss: torch.Tensor, grad_norm: Union[torch.Tensor, float]) -> None:
        on_device = isinstance(grad_norm, torch.Tensor) and grad_norm.device == loss.device
        values = torch.stack([loss.detach().float().reshape(())]
                             + ([grad_norm.detach().float().reshape(())] if on_device else []))
        self._grad_norm = None if on_device else float(grad_norm)
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event: Optional[torch.cuda.Event] = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = values, None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def value(self) -> tuple[float, float]:
        """(loss, grad norm)."""
        if not self.ready():  # (a landed copy needs no wait at all)
            self._event.synchronize()
        vals = self._host.tolist()
        return vals[0], (vals[1] if self._grad_norm is None else self._grad_norm)


def reapply_optimizer_settings(ds_optimizer: Any, groups: list[dict], betas: Any, eps: float,
                               gradient_clipping: float) -> None:
    """After a resume, put this run's AdamW settings back: torch's ``Optimizer.load_state_dict`` copies
    the saved groups' ``weight_decay``, ``betas``, ``eps`` and ``lr_scale`` (which ``set_lr`` reads),
    and ZeRO-1/2 (and DeepSpeed's bf16 optimiser) restore the saved gradient clipping, so a changed
    config would not take effect. ``groups`` are the groups this run built (``optim.param_groups``),
    in the optimiser's order; ``checkpoint.check_param_groups`` made sure the grouping is the saved
    one before loading."""
    loaded = ds_optimizer.param_groups
    if len(loaded) != len(groups):  # (not reached: checked before loading)
        raise RuntimeError(f"{len(loaded)} optimiser groups after loading the checkpoint, {len(groups)} built")
    for pg, g in zip(loaded, groups):
        pg.update(lr_scale=g["lr_scale"], weight_decay=g["weight_decay"], betas=tuple(betas), eps=eps)
    if hasattr(ds_optimizer, "clip_grad"):  # (stage 0 fp32 clips in the engine, from the config)
        ds_optimizer.clip_grad = float(gradient_clipping)


def rank_rng(seed: int, rank: int) -> np.random.Generator:
    """The rank's Generator of masks (pre-training) and mixup/cutmix draws (fine-tuning): seeded by
    ``train.seed`` and the rank, so that ranks draw different masks for their different clips."""
    return np.random.default_rng([seed, rank])


def forget_initial_step(ds_optimizer: Any, optimizer: torch.optim.Optimizer) -> None:
    """Undo the zero-gradient step DeepSpeed's ``FP16_UnfusedOptimizer`` (ZeRO stage 0 with bf16 or
    fp16) takes at ``initialize`` to create the optimizer's state: AdamW's step count would start at
    1, so the first real update would use step 2's bias correction (0.74 × the LR at β (0.9, 0.999)).
    The state is dropped and re-created by the first real step, as on every other path. (That step
    also decayed the weights once, by ``lr0 × weight_decay``: ~5e-8 at the recipes' warm-up start.)"""
    if type(ds_optimizer).__name__ == "FP16_UnfusedOptimizer":
        optimizer.state.clear()


def train_loop(
    run: Run,
    step_fn: Callable[[dict], torch.Tensor],
    *,
    on_epoch_end: Optional[Callable[[Run], None]] = None,
    on_finish: Optional[Callable[[Run], None]] = None,
) -> dict:
    """Run until ``derived.run_steps``; returns a summary (last loss, steps, skipped, time, final
    checkpoint). A scheduler's signal (SIGTERM, SIGUSR1; :mod:`engine.signals`) saves the step it
    comes in, on every rank together, then raises :class:`engine.signals.Terminated`.
    ``on_epoch_end`` runs after each complete epoch, after its checkpoint (as SlowFast's
    ``train_net`` saves, then evaluates); ``on_finish`` after the final checkpoint. What either
    changes in ``run.state`` is not in that checkpoint: fine-tuning's ``best`` tag keeps its own best
    metric. A resumed run already at its
    last step trains and saves nothing, runs ``on_finish`` (which decides whether anything is left to
    do) and returns with ``already_complete``."""
    with signals.save_on_signal():
        try:
            return _train_loop(run, step_fn, on_epoch_end=on_epoch_end, on_finish=on_finish)
        except BaseException:  # (exits 4, 6, 7, 130: the CLI's paragraph was glued to the bar's last line)
            try:
                run.logger.close()
            except Exception:  # noqa: BLE001 - the error being raised is the one to report
                pass
            raise


def _train_loop(run: Run, step_fn: Callable[[dict], torch.Tensor], *, on_epoch_end: Optional[Callable[[Run], None]],
                on_finish: Optional[Callable[[Run], None]]) -> dict:
    cfg, engine, st, d = run.cfg, run.engine, run.state, run.derived
    sched = cfg.schedule
    device = run.dist.device
    last_loss = float("nan")
    t_log, steps_since_log, clips_since_log = time.time(), 0, 0
    t_start, first_step = time.time(), st.step
    grad_norm = float("nan")
    pending: Optional[_ReadBack] = None  # the last step's loss and grad norm, on their way to the host
    pending_save = stop = False
    signalled, saved_at, saved_step = 0, None, -1  # a scheduler's signal to save and stop on (engine.signals)
    if run.resumed_from is not None and st.step >= d.run_steps:  # nothing left to train or save
        end = "" if st.step == d.run_steps else f"; this config ends at step {d.run_steps}"
        print0(f"already complete at step {st.step} (checkpoint {run.resumed_from}){end}; nothing to train "
               "(raise schedule.max_steps or schedule.epochs to train further)")
        if on_finish is not None:  # e.g. an evaluation of the final weights that failed last time
            with signals.immediate():
                on_finish(run)
        run.logger.close()
        return {"steps": st.step, "last_loss": float("nan"), "nonfinite_total": st.nonfinite_total,
                "seconds": 0.0, "checkpoint": run.resumed_from, "already_complete": True}
    plain_fp32 = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"

    def skipped(what: str) -> None:
        """Count a step without an update (a non-finite loss or gradient); stop after
        ``train.max_nonfinite`` in a row."""
        st.nonfinite_total += 1
        st.nonfinite_streak += 1
        run.logger.write(f"step {st.step + 1}: {what} ({st.nonfinite_streak} in a row, {st.nonfinite_total} in total)")
        if st.nonfinite_streak >= cfg.train.max_nonfinite:
            latest = find_latest(cfg.train.output_dir, resumable=True)
            clip = cfg.deepspeed.gradient_clipping
            fixes = ["Lower optim.lr", f"clip gradients harder (a smaller deepspeed.gradient_clipping, now {clip:g})"
                     if clip else "clip gradients (deepspeed.gradient_clipping, off now)"]
            if cfg.deepspeed.precision == "fp16":
                fixes.append("use bf16 or fp32 (fp16 overflows)")
            raise NonFiniteLossError(
                f"{st.nonfinite_streak} steps in a row without an update (non-finite losses or gradients) at "
                f"step {st.step + 1} (lr {lr:.3g}, precision {cfg.deepspeed.precision}); the last finite grad norm "
                f"was {last_finite_norm:.4g}. {', or '.join(fixes)}; " + (
                    f"the last complete checkpoint is {latest} (--resume auto continues from it)" if latest
                    else f"no checkpoint of {cfg.train.output_dir} yet"))

    def land(p: _ReadBack) -> None:
        """Take a step's loss (the global-batch mean) and grad norm from its read-back."""
        nonlocal last_loss, grad_norm, last_finite_norm
        last_loss, grad_norm = p.value()
        last_loss /= run.dist.world_size
        if math.isfinite(grad_norm):
            last_finite_norm = grad_norm

    last_finite_norm = float("nan")
    engine.train()
    while st.step < d.run_steps:
        run.loader.set_epoch(st.epoch)
        for batch in run.loader:
            lr = lr_at_step(st.step, d.steps_per_epoch, peak_lr=d.lr, epochs=sched.epochs,
                            warmup_epochs=sched.warmup_epochs, warmup_start_lr=d.warmup_start_lr,
                            end_lr=d.end_lr, cosine_after_warmup=sched.cosine_after_warmup)
            set_lr(engine.optimizer.param_groups, lr)
            loss = step_fn(batch)
            # computed where the loss is: one host sync (the .item()) instead of two, no host-to-device
            # copy; the same all-reduce sums the losses for the logged global-batch mean
            flat = loss.detach().float().reshape(())
            # (3,): non-finite flag, a scheduler's signal (engine.signals; a fill, no host-to-device copy), loss
            stats = torch.stack([(~torch.isfinite(flat)).to(torch.float32),
                                 torch.full_like(flat, float(bool(signals.requested()))), flat])
            all_reduce_sum(stats)  # every rank skips together, and saves and stops together
            n_bad, n_signalled = (int(x) for x in stats[:2].tolist())  # waits for this step's forward (and the last)
            loss_sum = stats[2]  # a view: stays on the device until _ReadBack copies it, divided on the host
            will_log = (st.step + 1) % cfg.log.every_steps == 0 or st.step + 1 == d.run_steps
            if pending is not None:  # the previous step's scalars have landed: no wait
                land(pending)
                pending = None
            if n_bad == 0:
                engine.backward(loss)
                fallback = None
                if plain_fp32:  # stage-0 fp32 neither records the norm nor checks it: DeepSpeed would apply a NaN
                    fallback = _grad_norm_fallback(engine.module)  # (all-reduced gradients: every rank agrees)
                scale = _norm_scale(engine.optimizer)
                applied = _step(engine, fallback is not None and not math.isfinite(fallback),
                                cfg.deepspeed.precision == "fp16")
                gn = _step_grad_norm(engine, scale, fallback)
                pending = _ReadBack(loss_sum, gn if applied else float("nan"))
                if applied:
                    st.nonfinite_streak = 0
                else:  # a finite loss whose gradient is not: DeepSpeed skipped the update (or we did, above)
                    skipped(f"non-finite gradient (norm {float(gn) if fallback is None else fallback:.4g}); "
                            "the update was skipped")
            else:
                last_loss = grad_norm = float("nan")
                skipped(f"non-finite loss on {n_bad} rank(s); skipped")
            st.step += 1
            st.batch_in_epoch += 1
            if pending is not None and (will_log or pending.ready()):
                # the bar shows the newest loss that has landed (a step behind while the GPU is busy);
                # the logged scalars and the summary wait for this step's
                land(pending)
                pending = None
            steps_since_log += 1
            clips_since_log += d.global_batch
            now = time.time()
            clips_s = clips_since_log / max(now - t_log, 1e-9)
            run.logger.step(1, loss=last_loss, lr=lr, clips_s=round(clips_s, 2))
            if will_log:
                run.logger.scalars(st.step, {
                    "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "clips_per_s": clips_s,
                    "memory_gb": peak_memory_gb(device), "epoch": st.step / d.steps_per_epoch,
                    "nonfinite_total": st.nonfinite_total})
                t_log, steps_since_log, clips_since_log = now, 0, 0
            end_of_epoch = st.batch_in_epoch >= d.steps_per_epoch
            ck = cfg.train.checkpoint_every_steps
            if ck > 0 and st.step % ck == 0 and st.step < d.run_steps:
                if end_of_epoch:
                    pending_save = True  # saved after the epoch bookkeeping below
                else:
                    saved_at, saved_step = run.save(), st.step
                    # a signal during the save (a large model's takes long): stop on it now, not after one
                    # more step and a second save, which SLURM's KillWait may not leave time for
                    n_signalled = n_signalled or int(bool(signalled_anywhere(device)))
                    t_log, clips_since_log = time.time(), 0  # (clips/s is training's: not the save's time)
            if n_signalled and st.step < d.run_steps:  # (at the last step the final save follows anyway)
                signalled = signals.requested(default=signal.SIGTERM)
                pending_save = pending_save or end_of_epoch
            stop = bool(signalled or (cfg.train.stop_after_steps and st.step >= cfg.train.stop_after_steps))
            if stop or st.step >= d.run_steps:
                break
        if st.batch_in_epoch >= d.steps_per_epoch:  # the epoch is complete
            st.epoch += 1
            st.batch_in_epoch = 0
            ce = cfg.train.checkpoint_every_epochs
            if (pending_save or (ce > 0 and st.epoch % ce == 0)) and st.step < d.run_steps:
                saved_at, saved_step = run.save(), st.step
            pending_save = False
            if on_epoch_end is not None and not stop:  # after the epoch's checkpoint: a failure in it loses no training
                # a signal that came during the epoch's save is taken before the evaluation (it would
                # wait for its end), on every rank alike; during it, a signal stops at once
                signalled = signalled_anywhere(device)
                stop = bool(signalled)
                if not stop:
                    with signals.immediate():
                        on_epoch_end(run)
            # clips/s after an evaluation or a save counted their time (a K400 evaluation: a 10x "drop")
            t_log, clips_since_log = time.time(), 0
        if signalled:  # this step saved (unless a scheduled save just did), then stop as the signal says
            if saved_step != st.step:
                saved_at = run.save()
            run.logger.close()
            raise signals.Terminated(signalled, saved=os.path.basename(saved_at))
        if stop:  # after the step's checkpoints, also one held for the end of its epoch (as a kill there)
            run.logger.close()
            latest = find_latest(cfg.train.output_dir, resumable=True)  # (as Ctrl-C's message says it)
            raise StopRequested(f"stopped after step {st.step} (train.stop_after_steps); " + (
                f"the last complete checkpoint is {latest} (rerun with --resume auto to continue from it)" if latest
                else f"no checkpoint of {cfg.train.output_dir} yet"))
    final = run.save()
    if on_finish is not None:  # after the save: a failure in it loses no training
        signalled = signalled_anywhere(device)
        if signalled:  # came during the final save: stop before the evaluation (a resume runs it)
            run.logger.close()
            raise signals.Terminated(signalled, saved=os.path.basename(final))
        with signals.immediate():
            on_finish(run)
    run.logger.close()
    return {"steps": st.step, "trained": st.step - first_step, "last_loss": last_loss,
            "nonfinite_total": st.nonfinite_total, "seconds": time.time() - t_start, "checkpoint": final}


def signalled_anywhere(device: torch.device) -> int:
    """The scheduler's signal (:mod:`engine.signals`) when any rank got one, else 0: one all-reduce,
    so that every rank takes the same branch."""
    flag = torch.full((1,), float(bool(signals.requested())), device=device)
    all_reduce_sum(flag)
    return signals.requested(default=signal.SIGTERM) if flag.item() > 0 else 0


def report_paths(run: Run, summary: dict, stream=sys.stdout) -> None:
    """Tell the user where the results are (rank 0)."""
    if not run.main:
        return
    out = os.path.abspath(run.cfg.train.output_dir)
    steps, trained = summary["steps"], summary.get("trained", summary["steps"])
    done = f"done: {steps} steps" if trained == steps else f"done: step {steps} ({trained} trained in this run)"
    lines = [] if summary.get("already_complete") else [  # (train_loop said so already)
        f"{done} in {summary['seconds']:.1f} s, last loss {summary['last_loss']:.4g}, "
        f"{summary['nonfinite_total']} steps skipped (non-finite loss or gradient)"]
    lines += [
        f"checkpoint   {os.path.abspath(summary['checkpoint'])}",
        f"config       {os.path.join(out, 'config.yaml')}",
    ]
    if run.cfg.log.jsonl:
        lines.append(f"metrics      {os.path.join(out, 'metrics.jsonl')}")
    if run.cfg.log.tensorboard:
        tb_exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")  # (the venv's: often not on PATH)
        tb_exe = tb_exe if os.path.isfile(tb_exe) else "tensorboard"
        lines.append(f"tensorboard  {os.path.join(out, 'tb')}   ({tb_exe} --logdir {os.path.join(out, 'tb')})")
    print("\n".join(lines), file=stream, flush=True)
