"""Checkpoints: atomic DeepSpeed saves, ``--resume auto``, and export of a consolidated backbone.

Layout under ``<output_dir>/checkpoints``::

    latest                      # text: the tag of the newest *complete* checkpoint
    step00000120/               # a DeepSpeed tag (model/optimizer shards of every rank)
        config.yaml             # the resolved config of the run
        engine_state_r00000.pt  # per rank: step, epoch, loader state, RNG states, counters
        mp_rank_00_model_states.pt, [bf16_]zero_pp_rank_*_optim_states.pt, ...
    best/                       # fine-tuning: the checkpoint with the best validation top-1

A save goes to a hidden temporary tag (``.tmp-step…``); only when every rank has written its
shards is it renamed to its final name and ``latest`` replaced (``os.replace``), so an
interrupted save never becomes ``latest`` and ``--resume auto`` never sees half a checkpoint.
``latest.next`` names the tag just before its rename and goes once ``latest`` names it: a stop
between the two leaves it naming a complete tag, which :func:`latest_tag` then takes.
With a non-shared filesystem (each node writes its own shards) the rename happens on the first
local rank of every node. Re-saving an existing tag (``best`` on every improvement) moves the old
one to ``<tag>.old`` first (a step tag, saved again after a resume with another global batch, then
goes to ``<tag>.superseded``); a kill between the two renames leaves ``<tag>.old`` alone, which
:func:`recover_checkpoint_dir` (called at the start of every run) puts back, and it removes stale
``.tmp-*`` folders and ``*.old`` ones whose tag is there (a step tag's: set aside as superseded).
``train.keep_checkpoints`` prunes only ``step*`` tags with a step *below* the one just saved (never
the new one, never newer ones).

Complete checkpoint: a tag folder with ``engine_state_r*.pt`` (ours) and ``*model_states.pt``
(DeepSpeed's). Folders set aside (``*.old``, ``*.superseded*``, hidden ``.tmp-*``) are never a tag:
:func:`find_latest`, :func:`latest_tag` and :func:`available_tags` skip them. :func:`latest_tag`
trusts ``latest`` when the tag it names is complete (:func:`is_complete`), else takes the newest
complete ``step*`` tag (steps compared as numbers); a complete tag ``latest.next`` names comes first.

``--resume`` (:func:`resolve_resume`): ``auto``, a tag name under ``train.output_dir``, or a path —
a run folder or its ``checkpoints/`` folder (the latest complete tag), the ``checkpoints/latest``
file (the tag it names), or a tag folder (:func:`locate_checkpoint`, shared with ``maskfeat eval``);
anything else is a ConfigError listing the available tags. Going back in time (resuming a tag
older than the newest step tag of the run's own folder) renames the newer tags, and a ``best``
saved after the resumed step, to ``<tag>.superseded`` (:func:`set_aside_newer`) instead of letting
pruning delete the new checkpoints later.

Config changes on resume (:func:`check_resume_config`, against the tag's ``config.yaml``): what
fixes parameter shapes — ``model.name``, ``model.overrides`` (other than the run-time options in
:data:`NON_SHAPE_OVERRIDES`), and the input geometry ``data.num_frames`` (video variants) and
``data.crop_size`` (relative-position tables and the positional grid depend on both) — is a
ConfigError listing ``key: saved -> now``; every other difference (optimiser, schedule, batch,
ZeRO stage, …) is returned as one warning line and the run continues with the new values (the
engine writes this run's AdamW settings and gradient clipping back over the ones DeepSpeed loads:
``engine.runner.reapply_optimizer_settings``). A change that alters the AdamW parameter groups
(``optim.layer_decay`` on or off, ``optim.weight_decay`` to or from 0: the optimiser state is stored
per group) is a ConfigError naming the key (:func:`check_param_groups`, against the group names
saved in the checkpoint).
``data.sampling_rate`` changes only which frames are read, not shapes. Keys that cannot matter to
the result (:data:`IGNORED_ON_RESUME`: ``log.*``, ``train.output_dir``, loader threads…) are ignored.
Limits: a run folder is assumed to be written by one run at a time.

Resume compatibility (checked before DeepSpeed is called, :func:`check_resume_compatible`): ZeRO-1/2/3
partition the optimiser state (stage 3 also the weights) over the data-parallel ranks, and
DeepSpeed cannot load such a checkpoint into another world size; stage 3 cannot load a stage 1/2
checkpoint nor the reverse, and stage 0 has no partitions at all. So a ZeRO-1/2/3 checkpoint
resumes with its own world size, a stage change is allowed only between 1 and 2 (one format),
and only a ZeRO-0 checkpoint resumes with another world size. ``deepspeed.precision`` must match:
the optimiser state is stored in another form per precision (bf16 ZeRO-1/2 shards have other
names, a ZeRO-0 bf16/fp16 state holds the loss scale and fp32 masters). Anything else is a
ConfigError naming saved and current values (not a DeepSpeed traceback).

Export (``maskfeat export``): the fp32 weights are consolidated with DeepSpeed's
``zero_to_fp32`` utilities (ZeRO-1/2/3; for stage 0 the full module state is read directly),
the ``backbone.`` sub-tree is kept (the pre-training head and mask token are dropped only when
asked), and the result is written as safetensors with the config in the metadata.
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import shutil
from typing import Any, Callable, Optional, TypeVar

import torch

from engine.config import ConfigError
from engine.distributed import barrier, gather_objects

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that exists but cannot be read (incomplete, damaged): exit 2 like a config error."""

__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "save_checkpoint",
    "find_latest",
    "latest_tag",
    "load_checkpoint",
    "available_tags",
    "stored_tags",
    "step_of",
    "is_complete",
    "locate_checkpoint",
    "resolve_resume",
    "check_resume_config",
    "recover_checkpoint_dir",
    "set_aside_newer",
    "on_first_local_ranks",
    "check_resume_compatible",
    "check_param_groups",
    "consolidated_state_dict",
    "export_backbone",
    "load_pretrained",
]

_STEP_RE = re.compile(r"^step(\d{8,})$")
T = TypeVar("T")


def checkpoint_dir(output_dir: str) -> str:
    """``<output_dir>/checkpoints``."""
    return os.path.join(output_dir, "checkpoints")


def step_of(tag: str) -> Optional[int]:
    """The step of a ``step00000120`` tag (None for other tags, e.g. ``best``)."""
    m = _STEP_RE.match(tag)
    return int(m.group(1)) if m else None


def _set_aside(name: str) -> bool:
    """A folder that is not a tag: temporary (``.tmp-*``), a replaced one (``*.old``) or superseded."""
    return name.startswith(".") or name.endswith(".old") or ".superseded" in name


def _has_weights(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*model_states.pt")))


def _has_state(path: str) -> bool:
    return bool(_state_files(path))


def is_complete(path: str) -> bool:
    """A tag folder a run can resume from: our rank states and DeepSpeed's model states, and, for
    ZeRO 1-3, one optimiser shard per rank (a missing shard made ``--resume auto`` pick the tag
    and fail on one rank)."""
    return _has_state(path) and _has_weights(path) and not _missing_shards(path)


_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")


def _shard_ranks(path: str, kind: str) -> set[int]:
    """The ranks of the ZeRO ``kind`` (``optim`` or ``model``) shards in the tag folder ``path``."""
    found = (_SHARD_RE.search(os.path.basename(f)) for f in glob.glob(os.path.join(path, ZERO_SHARDS)))
    return {int(m.group(1)) for m in found if m and m.group(2) == kind}


def _missing_shards(path: str) -> bool:
    """A tag saved with ZeRO 1-3 (its config.yaml) lacking the optimiser shard of a rank whose state it
    holds, or (ZeRO-3) its model shard: every rank reads its own (a count of the shards passed a tag
    without rank 1's ZeRO-3 model file, whose resume then failed on rank 1 alone)."""
    stage = _saved_zero_stage(path) or 0
    if stage < 1:
        return False
    ranks = {_file_rank(f) for f in _state_files(path)} or {0}
    return not ranks <= _shard_ranks(path, "optim") or (stage == 3 and not ranks <= _shard_ranks(path, "model"))


def _step_tags(ckpt_dir: str, ok: Callable[[str], bool] = os.path.isdir) -> list[str]:
    """``step*`` tags under ``ckpt_dir`` for which ``ok(path)`` holds, oldest first (by step number)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if _STEP_RE.match(t) and ok(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(_STEP_RE.match(t).group(1)))


def stored_tags(ckpt_dir: str) -> list[str]:
    """Every tag folder under ``ckpt_dir`` holding any checkpoint file (ours or DeepSpeed's), set-aside
    folders excluded: what a new run in that folder would mix with."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if not _set_aside(t) and os.path.isdir(os.path.join(ckpt_dir, t))
            and (_has_state(os.path.join(ckpt_dir, t)) or _has_weights(os.path.join(ckpt_dir, t)))]
    steps = sorted((t for t in tags if _STEP_RE.match(t)), key=step_of)
    return steps + sorted(t for t in tags if not _STEP_RE.match(t))


def on_first_local_ranks(fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` on global rank 0, then (after a barrier) on the first local rank of every other node
    (a non-shared filesystem: each node holds its own copy), then a barrier; returns ``fn()``'s result
    where it ran, else None. Every rank must call this. An error of ``fn`` stops every rank: where it
    happened with that error, elsewhere with an OSError naming it another node's (it left the others
    waiting in the barrier)."""
    rank, _, local_rank = _dist()
    out = None
    for turn in (rank == 0, rank != 0 and local_rank == 0):
        failed: Optional[BaseException] = None
        if turn:
            try:
                out = fn()
            except Exception as e:  # agreed below (in place of a barrier)
                failed = e
        if _failed_anywhere(failed is not None):
            raise failed or OSError("another node failed to update the checkpoint folder (see its error)")
    return out


def _dist() -> tuple[int, int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _failed_anywhere(failed: bool) -> bool:
    """Whether any rank passes ``failed`` (every rank calls this; a no-op alone)."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([float(failed)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def write_problem(folder: str) -> Optional[OSError]:
    """Why a file cannot be made in the existing ``folder`` (its error), or None when one can: a file of
    a unique name (ranks, or jobs in two containers, may share a pid), made and removed at once."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".maskfeat-write-test-")
    except OSError as e:
        return e
    os.close(fd)
    try:
        os.remove(probe)
    except OSError:
        pass  # (made: the folder takes files; a leftover empty probe is harmless)
    return None


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of a unique name beside it, synced, then
    renamed over it. Unique, not pid-named: the first local rank of every node writes ``latest`` and
    the tag's ``config.yaml`` at once on a shared filesystem, and in containers the nodes' processes
    can have the same pid (one node's rename then found its temporary file gone: a failed save)."""
    import secrets

    while True:  # a random name, created exclusively, with the umask's mode (mkstemp's 0600 and a chmod
        # would fail on filesystems that refuse chmod, and the umask is process-wide)
        tmp = f"{path}.tmp{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _sync_tree(path: str) -> None:
    """fsync every file under ``path`` and the folders themselves, so that a tag renamed into place
    (and ``latest``, synced when written) never names files that a node crash left empty."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, _, _ in os.walk(path, topdown=False):
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _free_name(ckpt_dir: str, name: str) -> str:
    """``ckpt_dir/name``, or ``name-2``, ``name-3``, ... when taken."""
    dst, n = os.path.join(ckpt_dir, name), 1
    while os.path.exists(dst):
        n += 1
        dst = os.path.join(ckpt_dir, f"{name}-{n}")
    return dst


def _promote(ckpt_dir: str, tmp_tag: str, tag: str, before_rename: Optional[Callable[[], None]] = None) -> None:
    """Rename ``tmp_tag`` to ``tag`` on every node's first rank. An existing ``best`` (or other
    non-step tag) is replaced; an existing step tag, which a run saves again only after a resume with
    another global batch (the steps count in other units), is set aside as ``<tag>.superseded``.
    Replacing takes two renames (``tag`` -> ``tag.old``, then ``tmp_tag`` -> ``tag``), and the old one
    is then removed or, for a step tag, set aside; a kill in between is repaired by
    :func:`recover_checkpoint_dir` at the next start (it puts ``tag.old`` back while ``tag`` is
    missing: the step tag was set aside first, and a kill before the rename left ``latest`` naming a
    missing tag, so ``--resume auto`` started afresh). ``before_rename`` runs right before the final
    rename, once no earlier folder of that name is in the way (``latest.next``: it must never name the
    tag being replaced)."""
    src, dst = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)

    def move() -> None:
        if not os.path.isdir(src):
            return  # shared filesystem: already moved by global rank 0
        old = dst + ".old" if os.path.isdir(dst) else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        if before_rename is not None:
            before_rename()
        os.replace(src, dst)
        if old is not None:
            _retire_old(ckpt_dir, tag)

    on_first_local_ranks(move)


def _retire_old(ckpt_dir: str, tag: str) -> Optional[str]:
    """Once ``tag`` is in place: remove ``tag.old``, or set it aside as ``<tag>.superseded`` (``-2``, ...
    when taken) when it is a step tag (one of another step unit, after a resume with another global
    batch: never overwritten); returns the name it was set aside as."""
    old = os.path.join(ckpt_dir, tag + ".old")
    if _STEP_RE.match(tag):
        dst = _free_name(ckpt_dir, f"{tag}.superseded")
        os.replace(old, dst)
        return os.path.basename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return None


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
    ``keep`` > 0 then keeps ``keep`` ``step*`` tags: the one just saved and the newest ``keep - 1``
    with a smaller step (:func:`prune_candidates`); tags with a larger step are never touched.
    ``param_group_names`` (the parameter names of each optimiser group, in order) is stored with
    the DeepSpeed client state so that export can read the fp32 master weights of a ZeRO-0
    bf16/fp16 run, which DeepSpeed saves by group position only.
    """
    rank, _, local_rank = _dist()
    ckpt_dir = checkpoint_dir(output_dir)
    tmp_tag = f".tmp-{tag}"
    failed: Optional[Exception] = None
    if local_rank == 0:
        try:  # the tag's folder made here: DeepSpeed logs and swallows its own makedirs error (a full disk,
            # a read-only folder), and its torch.save then failed with "Parent directory ... does not exist"
            os.makedirs(ckpt_dir, exist_ok=True)
            shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)  # a dead earlier try
            os.makedirs(os.path.join(ckpt_dir, tmp_tag), exist_ok=True)  # (another node's, on a shared filesystem)
        except OSError as e:
            failed = e
    if _failed_anywhere(failed is not None):  # (all ranks: also the barrier before DeepSpeed's save)
        raise failed or OSError(f"another node could not make the folder of checkpoint {tag} (see its error)")
    barrier()
    try:  # a full node-local disk fails one rank: all must learn it, or the others wait in the barrier
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"tag": tag, "param_group_names": param_group_names},
                               save_latest=False)
    except (OSError, RuntimeError) as e:
        failed = e
        # DeepSpeed's save ends in a barrier, where the other ranks now wait; its collectives (tag
        # check, ZeRO-3 gathers) all come before its writes, so a failed write has only that one left
        barrier()
    tmp_path = os.path.join(ckpt_dir, tmp_tag)
    try:
        if failed is None:
            os.makedirs(tmp_path, exist_ok=True)
            torch.save(rank_state, os.path.join(tmp_path, f"engine_state_r{rank:05d}.pt"))
            if local_rank == 0:
                write_text_atomic(os.path.join(tmp_path, "config.yaml"), config_yaml)
    except (OSError, RuntimeError) as e:
        failed = e
    if _failed_anywhere(failed is not None):
        raise failed or OSError(f"another rank could not write its part of checkpoint {tag} (see its error)")
    try:  # every part is written: each node's first rank syncs them before the tag is renamed into place
        if local_rank == 0:
            _sync_tree(tmp_path)
    except OSError as e:
        failed = e
    if _failed_anywhere(failed is not None):
        raise failed or OSError(f"another node could not sync checkpoint {tag} to disk (see its error)")
    # named right before the rename: a stop between the rename and `latest` (two fsyncs, slow on a
    # parallel filesystem) left `latest` on the previous tag, and --resume auto went back to it and set
    # this complete one aside as newer (:func:`latest_tag` reads this name first). Not earlier: a step
    # tag saved again (another global batch) would be named while the old one still stood there
    mark = (lambda: write_text_atomic(os.path.join(ckpt_dir, LATEST_NEXT), tag)) if update_latest else None
    _promote(ckpt_dir, tmp_tag, tag, before_rename=mark)
    if local_rank == 0:
        _fsync_dir(ckpt_dir)  # the rename itself
    # the tag is complete now: what is left is bookkeeping, whose failure (a full disk, an old tag that
    # cannot be removed) stopped the run with exit 7 on this rank alone, the others left in the barrier
    if update_latest and local_rank == 0:
        try:
            write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)
        except OSError as e:  # `latest.next` names the tag, and latest_tag reads it first
            log.warning("checkpoint %s is saved, but `latest` could not be updated (%s: %s); %s names it, and "
                        "--resume auto reads that first", tag, type(e).__name__, e, LATEST_NEXT)
        else:
            try:
                _remove_file(os.path.join(ckpt_dir, LATEST_NEXT))
            except OSError as e:  # (it names the tag `latest` names: harmless)
                log.warning("checkpoint %s is saved, but %s could not be removed (%s: %s)", tag, LATEST_NEXT,
                            type(e).__name__, e)
    if keep > 0 and local_rank == 0:
        for old in prune_candidates(ckpt_dir, tag, keep):
            try:
                remove_tag(os.path.join(ckpt_dir, old))
            except OSError as e:
                log.warning("checkpoint %s is saved, but the older %s could not be removed (%s: %s); remove it "
                            "by hand", tag, old, type(e).__name__, e)
    barrier()
    return os.path.join(ckpt_dir, tag)


def remove_tag(path: str) -> None:
    """Delete a tag folder, its marker files first (our rank states, DeepSpeed's model states): a
    stop half-way leaves a folder no longer taken for a complete checkpoint. (``rmtree`` in
    directory order could delete ``config.yaml`` and the optimiser shards first; the tag then read
    as a complete ZeRO-0 one, and ``--resume auto`` could pick it.)"""
    for pattern in ("*model_states.pt", "engine_state_r*.pt"):  # (latest_tag checks the first)
        for f in glob.glob(os.path.join(path, pattern)):
            _remove_file(f)  # (gone already: another node's first rank, on a shared filesystem)
    shutil.rmtree(path, ignore_errors=True)


def prune_candidates(ckpt_dir: str, tag: str, keep: int) -> list[str]:
    """The ``step*`` tags :func:`save_checkpoint` deletes after saving ``tag`` with ``keep`` > 0: of
    the step tags with a step below ``tag``'s (all of them when ``tag`` is not a step tag, e.g.
    ``best``), all but the newest ``keep - 1`` (``keep`` for a non-step tag). ``tag`` itself and
    step tags above it are never candidates."""
    if keep <= 0:
        return []
    s = step_of(tag)
    older = [t for t in _step_tags(ckpt_dir) if t != tag and (s is None or step_of(t) < s)]
    n_keep = keep if s is None else keep - 1
    return older[:max(len(older) - n_keep, 0)]


def find_latest(output_dir: str, resumable: bool = False) -> Optional[str]:
    """Tag of the newest complete checkpoint under ``output_dir`` (``None`` when there is none).

    Reads ``latest``; when it is missing or names a tag that is gone (or holds no weights), the
    newest ``step*`` tag with weights is used (by step number; set-aside and temporary folders are
    never considered). ``resumable``: :func:`latest_tag`'s (what ``--resume auto`` takes)."""
    return latest_tag(checkpoint_dir(output_dir), resumable)


LATEST_NEXT = "latest.next"
"""The tag a save is about to rename into place, written before the rename and removed once
``latest`` names it: when it names a complete tag, that tag is the newest (a stop came between)."""


def latest_tag(ckpt_dir: str, resumable: bool = False) -> Optional[str]:
    """:func:`find_latest` for a ``checkpoints`` directory itself (a complete tag named by
    :data:`LATEST_NEXT` first: a save stopped after its rename, before ``latest`` was written).
    ``resumable``: tags a run can continue (:func:`is_complete`: ``--resume auto`` took the newest tag
    with weights but without its rank state, then refused it), else tags with weights (evaluation)."""
    ok = is_complete if resumable else _usable
    for name in (LATEST_NEXT, "latest"):
        tag = _read_pointer(ckpt_dir, name, ok)
        if tag is not None:
            return tag
    steps = _step_tags(ckpt_dir, ok)
    return steps[-1] if steps else None


def _read_pointer(ckpt_dir: str, name: str, ok: Callable[[str], bool]) -> Optional[str]:
    """The tag the file ``name`` names when that tag is there and ``ok(path)``, else None."""
    try:
        with open(os.path.join(ckpt_dir, name)) as f:
            tag = f.read().strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if tag and not _set_aside(tag) and os.sep not in tag and ok(os.path.join(ckpt_dir, tag)):
        return tag
    return None


def _remove_file(path: str) -> None:
    """``os.remove``, a file already gone being fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _usable(path: str) -> bool:
    """DeepSpeed's model states there, and no ZeRO optimiser shard missing (what evaluation and
    export need; a resume needs :func:`is_complete`)."""
    return _has_weights(path) and not _missing_shards(path)


def available_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoints under ``ckpt_dir`` (``step*`` by step, then the others, e.g. ``best``);
    set-aside folders (``*.old``, ``*.superseded``, ``.tmp-*``) are skipped. Complete is
    :func:`is_complete` (a tag a killed prune left without its weights was listed)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if not _set_aside(t) and is_complete(os.path.join(ckpt_dir, t))]
    steps = sorted((t for t in tags if _STEP_RE.match(t)), key=step_of)
    return steps + sorted(t for t in tags if not _STEP_RE.match(t))


# ----------------------------------------------------------------------------------------------
# Finding a checkpoint from a path (--resume PATH, maskfeat eval --checkpoint PATH)
# ----------------------------------------------------------------------------------------------
ZERO_SHARDS = "*zero_pp_rank_*"
"""DeepSpeed's ZeRO-1/2/3 shard files: ``zero_pp_rank_*`` (fp32), ``bf16_zero_pp_rank_*`` (bf16 ZeRO-1/2)."""


def _is_tag_dir(path: str) -> bool:
    return bool(_has_weights(path) or _has_state(path) or glob.glob(os.path.join(path, ZERO_SHARDS)))


def is_tag_of_a_run(path: str) -> bool:
    """Whether ``path`` is a checkpoint tag folder inside a run's ``checkpoints/`` folder."""
    return os.path.isdir(path) and _is_tag_dir(path) and _is_ckpt_dir(os.path.dirname(os.path.abspath(path)))


def _is_ckpt_dir(path: str) -> bool:
    return (os.path.basename(os.path.normpath(path)) == "checkpoints" or os.path.isfile(os.path.join(path, "latest"))
            or os.path.isdir(os.path.join(path, "best")) or latest_tag(path) is not None)


def locate_checkpoint(path: str, *, prefer_best: bool = False, resumable: bool = False) -> Optional[tuple[str, str]]:
    """``(checkpoints directory, tag)`` that ``path`` names: a run directory or its ``checkpoints/``
    directory (``best`` when ``prefer_best`` and present, else the latest complete tag), the
    ``checkpoints/latest`` file (the tag it names, :func:`latest_tag`), or a tag directory. Returns
    None for any other file (a weights file: the caller decides). Raises FileNotFoundError when
    ``path`` does not exist or names no checkpoint. ``resumable``: :func:`latest_tag`'s."""
    p = os.path.abspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"checkpoint {path} not found")
    if os.path.isfile(p):
        if os.path.basename(p) != "latest" or not _is_ckpt_dir(os.path.dirname(p)):
            return None
        ck = os.path.dirname(p)
        tag = latest_tag(ck, resumable)
        if tag is None:
            raise FileNotFoundError(f"checkpoint {path}: the tag it names is not a complete checkpoint under {ck}")
        return ck, tag
    if os.path.isdir(checkpoint_dir(p)) or _is_ckpt_dir(p) and not _is_tag_dir(p):
        ck = checkpoint_dir(p) if os.path.isdir(checkpoint_dir(p)) else p
        tag = "best" if prefer_best and os.path.isdir(os.path.join(ck, "best")) else latest_tag(ck, resumable)
        if tag is None:
            raise FileNotFoundError(f"checkpoint {path}: no complete checkpoint under {ck}")
        return ck, tag
    if _is_tag_dir(p):
        return os.path.dirname(p), os.path.basename(p)
    raise FileNotFoundError(f"checkpoint {path}: not a run directory (with checkpoints/), a "
                            "checkpoints/ directory, a checkpoints/<tag> directory or a weights file")


def _available(ckpt_dir: str) -> str:
    tags = available_tags(ckpt_dir)
    return (f"available under {ckpt_dir}: " + ", ".join(tags) + " (or --resume auto for the latest)" if tags
            else f"no complete checkpoint under {ckpt_dir}")


def resolve_resume(resume: str, output_dir: str) -> Optional[tuple[str, str]]:
    """``(checkpoints directory, tag)`` of ``--resume`` (module docstring); None for ``auto`` when the
    run has no checkpoint yet. Raises ConfigError, listing the available tags, when ``resume``
    names nothing or a checkpoint that is not complete (checked before DeepSpeed is called)."""
    ck = checkpoint_dir(output_dir)
    if resume == "auto":
        tag = latest_tag(ck, resumable=True)
        if tag is None:
            return None
        target = (ck, tag)
    elif os.sep not in resume and not _set_aside(resume) and os.path.isdir(os.path.join(ck, resume)):
        target = (ck, resume)  # a tag name (checked before paths relative to the working directory)
    elif os.path.exists(resume):
        try:
            found = locate_checkpoint(resume, resumable=True)
        except FileNotFoundError as e:
            # (eval's wording; resume takes no weights file)
            why = str(e).replace(", a checkpoints/<tag> directory or a weights file",
                                 " or a checkpoints/<tag> directory")
            raise ConfigError(f"--resume {resume}: {why}; {_available(ck)}") from None
        if found is None:
            raise ConfigError(f"--resume {resume}: a file, not a checkpoint (a run folder, its checkpoints/ folder, "
                              f"checkpoints/latest, a tag folder or a tag name); weights files start fine-tuning "
                              f"through finetune.pretrained; {_available(ck)}")
        target = found
    elif os.sep in resume:
        raise ConfigError(f"--resume {resume}: no such path; " + _available(ck))
    else:
        raise ConfigError(f"--resume {resume}: no checkpoint tag {resume!r} under {ck} (and no such path); "
                          + _available(ck))
    path = os.path.join(*target)
    if not is_complete(path):
        missing = " and ".join(w for w, ok in (("engine_state_r*.pt", _has_state(path)),
                                                ("*model_states.pt", _has_weights(path)),
                                                ("all ZeRO optimiser shards", not _missing_shards(path))) if not ok)
        raise ConfigError(f"--resume {resume}: {path} is not a complete checkpoint of this engine (no {missing}); "
                          + _available(target[0]))
    return target


# ----------------------------------------------------------------------------------------------
# Housekeeping at the start of a run
# ----------------------------------------------------------------------------------------------
def restorable_step_tags(ckpt_dir: str) -> list[str]:
    """The step tags :func:`recover_checkpoint_dir` will put back from ``<tag>.old`` (the tag missing: a
    re-save stopped between its renames), for a look before the run's set-up repairs the folder."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [n[:-len(".old")] for n in sorted(os.listdir(ckpt_dir))
            if n.endswith(".old") and _STEP_RE.match(n[:-len(".old")]) and os.path.isdir(os.path.join(ckpt_dir, n))
            and not os.path.exists(os.path.join(ckpt_dir, n[:-len(".old")]))]


def recover_checkpoint_dir(ckpt_dir: str) -> Optional[str]:
    """Repair what an interrupted save left under ``ckpt_dir`` (module docstring): a tag that is missing
    while ``<tag>.old`` exists (killed between the two renames of a re-save) is put back, and a
    :data:`LATEST_NEXT` naming it is dropped (it named the new save); ``latest`` is set to a complete
    tag ``LATEST_NEXT`` names otherwise (killed after the rename, before ``latest``); a step tag's
    ``.old`` beside its tag is set aside as ``<tag>.superseded`` (:func:`_promote`); stale ``.tmp-*``
    folders, other ``*.old`` folders whose tag exists and pointer temporary files are removed.
    Call before this run saves anything (nothing here is then in use). Returns one line saying what
    was done, or None."""
    if not os.path.isdir(ckpt_dir):
        return None
    restored, removed, aside = [], [], []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.endswith(".old") and os.path.isdir(path):
            tag = name[:-len(".old")]
            if not os.path.exists(os.path.join(ckpt_dir, tag)):
                os.replace(path, os.path.join(ckpt_dir, tag))
                restored.append(tag)
            elif _STEP_RE.match(tag):  # killed before the old step tag was set aside
                aside.append((tag, _retire_old(ckpt_dir, tag)))
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
        elif name.startswith(".tmp-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
        elif name.startswith(("latest.tmp", LATEST_NEXT + ".tmp")) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    parts = ([f"restored {', '.join(restored)} from {', '.join(t + '.old' for t in restored)} (a re-save was "
              "interrupted between its two renames)"] if restored else [])
    parts += [f"set aside the earlier {t} as {name} (its re-save was complete)" for t, name in aside]
    if os.path.isfile(os.path.join(ckpt_dir, LATEST_NEXT)):
        # (a tag just restored from .old is the earlier one: the save that named it never renamed its own)
        done = _read_pointer(ckpt_dir, LATEST_NEXT, _usable)
        if done is not None and done not in restored and done != _read_pointer(ckpt_dir, "latest", _usable):
            write_text_atomic(os.path.join(ckpt_dir, "latest"), done)
            parts.append(f"latest set to {done} (its save was complete, stopped before naming it latest)")
        _remove_file(os.path.join(ckpt_dir, LATEST_NEXT))
    if removed:
        parts.append(f"removed {len(removed)} stale folder(s)/file(s) of interrupted saves ({', '.join(removed)})")
    return f"checkpoints {ckpt_dir}: " + "; ".join(parts) if parts else None


def _saved_step_and_position(path: str) -> tuple[Optional[int], Optional[float]]:
    """``train_state.step`` of a tag's first rank state, and where the tag stands in epochs (that
    step over the batches per epoch it was saved with: comparable across a change of global batch,
    which step numbers are not); None for what is unreadable or, for the position, not recorded."""
    files = _state_files(path)
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=False)
        step = int(state["train_state"]["step"])
    except (*_UNREADABLE, IndexError, TypeError):
        return None, None
    try:
        batches = int(state["data_layout"]["num_batches"])
    except (KeyError, TypeError, ValueError):
        return step, None
    return step, (step / batches if batches > 0 else None)


def set_aside_newer(ckpt_dir: str, step: int, resumed_tag: Optional[str]) -> list[tuple[str, str]]:
    """Going back in time: rename the ``step*`` tags with a step above ``step`` — and ``best`` when it
    was saved after ``step`` — to ``<tag>.superseded`` (``.superseded-2``, … when taken), so that
    neither ``--resume auto`` nor pruning sees them; ``latest`` then names ``resumed_tag`` (when it
    is a tag of ``ckpt_dir``; else the file is removed when it named a renamed tag). Returns the
    renames (old name, new name). "Newer" compares positions in epochs where the tags record their
    layout: after a resume with another global batch the step numbers of the two units overlap, and
    by number alone the older tags of the old unit (``best`` among them) were set aside."""
    if not os.path.isdir(ckpt_dir):
        return []
    here = _saved_step_and_position(os.path.join(ckpt_dir, resumed_tag))[1] if resumed_tag else None

    def is_newer(tag: str) -> bool:  # one read of the tag's rank state
        tag_step, there = _saved_step_and_position(os.path.join(ckpt_dir, tag))
        if here is not None and there is not None:
            return there > here + 1e-9
        tag_step = step_of(tag) if step_of(tag) is not None else tag_step  # a step tag: its name
        return tag_step is not None and tag_step > step

    newer = [t for t in _step_tags(ckpt_dir) if t != resumed_tag and is_newer(t)]
    if resumed_tag != "best" and os.path.isdir(os.path.join(ckpt_dir, "best")) and is_newer("best"):
        newer.append("best")
    moved = []
    for t in newer:
        dst = _free_name(ckpt_dir, f"{t}.superseded")
        os.replace(os.path.join(ckpt_dir, t), dst)
        moved.append((t, os.path.basename(dst)))
    latest = os.path.join(ckpt_dir, "latest")
    if moved:
        if resumed_tag and os.path.isdir(os.path.join(ckpt_dir, resumed_tag)):
            write_text_atomic(latest, resumed_tag)
        elif os.path.isfile(latest):
            with open(latest) as f:
                named = f.read().strip()
            if named in {a for a, _ in moved}:
                os.remove(latest)
    return moved


# ----------------------------------------------------------------------------------------------
# Config changes on resume
# ----------------------------------------------------------------------------------------------
NON_SHAPE_OVERRIDES = frozenset({"attn_backend", "pool_backend", "drop_path_rate", "pretrain_drop_path_rate",
                                 "head_dropout", "head_init_scale", "hog_norm", "hog_signed", "hog_gaussian_window"})
"""``model.overrides`` keys that leave every parameter shape as it is (run-time options, regularisation,
initialisation, HOG variants with the same number of bins)."""
IGNORED_ON_RESUME = ("log.", "train.output_dir", "train.stop_after_steps", "train.overwrite", "data.num_threads",
                     "data.prefetch", "data.cache_dir", "data.validation_workers", "finetune.pretrained")
"""Config keys (or prefixes ending in ``.``) whose change on resume is not reported: they cannot
change what is trained (``finetune.pretrained`` is read at a fresh start only)."""
def _path_keys() -> tuple[str, ...]:
    """The path settings (``config.path_keys``) a resume compares: as absolute paths (the CLI makes
    them absolute; runs saved before kept them as given, relative to the folder they were started in)."""
    from engine.config import path_keys

    return tuple(k for k in path_keys() if not k.startswith(IGNORED_ON_RESUME))
_FREE_FORM = ("model.overrides.", "deepspeed.extra.")  # user dicts: a key on one side only is a change
_GEOMETRY_OVERRIDES = {"model.overrides.img_size": "data.crop_size", "model.overrides.num_frames": "data.num_frames"}
"""Overrides a run derives from its data settings when not given (``engine.pretrain.model_overrides``)."""
_UNSET = object()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _shape_keys(saved: dict[str, Any], now: dict[str, Any]) -> set[str]:
    """The flattened keys whose change alters parameter shapes (module docstring)."""
    keys = {"model.name"}
    for k in set(saved) | set(now):
        if k.startswith("model.overrides.") and k.split(".")[2] not in NON_SHAPE_OVERRIDES:
            keys.add(k)

    def both(name: str) -> bool:
        return f"model.overrides.{name}" in saved and f"model.overrides.{name}" in now

    if not both("img_size"):  # (given in model.overrides on both sides, data.crop_size does not reach the model)
        keys.add("data.crop_size")
    image = False
    try:
        from models.variants import get_variant

        image = bool(now.get("model.overrides.image", get_variant(str(now.get("model.name"))).image))
    except Exception:  # an unknown variant is reported when the model is built
        pass
    if not image and not both("num_frames"):
        keys.add("data.num_frames")
    return keys


def _fmt(v: Any) -> str:
    return "<unset>" if v is _UNSET else str(v)


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's config and this run's (nested dicts as in config.yaml):
    ``(shape changes, other changes)``, each item ``"key: saved -> now"``, in config order; ignored
    keys (:data:`IGNORED_ON_RESUME`) and keys on one side only (a field added or removed between
    versions; not so inside ``model.overrides``/``deepspeed.extra``) are skipped."""
    a, b = _flatten(saved), _flatten(now)
    shape, paths = _shape_keys(a, b), _path_keys()
    order = list(b) + [k for k in a if k not in b]
    fatal, other = [], []
    for k in order:
        if k.startswith(IGNORED_ON_RESUME):
            continue
        free = k.startswith(_FREE_FORM)
        if not free and (k not in a or k not in b):
            continue
        old, new = a.get(k, _UNSET), b.get(k, _UNSET)
        if (k in _GEOMETRY_OVERRIDES and (old is _UNSET) != (new is _UNSET)
                and (old if new is _UNSET else new) == (b if new is _UNSET else a).get(_GEOMETRY_OVERRIDES[k])):
            continue  # given on one side only, as the other side's data setting makes it (pretrain.model_overrides)
        if old == new or (k in paths and isinstance(old, str) and isinstance(new, str) and old and new
                          and os.path.abspath(old) == os.path.abspath(new)):
            continue
        (fatal if k in shape else other).append(f"{k}: {_fmt(old)} -> {_fmt(new)}")
    return fatal, other


def _saved_config(path: str) -> Optional[dict]:
    """The ``config.yaml`` a tag folder was saved with, as a dict (None when missing or unreadable),
    read as the config files are (``config._yaml_load``: its YAML 1.2 numbers)."""
    from engine.config import ConfigError, _yaml_load

    try:
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            saved = _yaml_load(f)
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    return saved if isinstance(saved, dict) else None


def check_resume_config(path: str, now: dict) -> Optional[str]:
    """Compare this run's config (``now``, ``config_to_dict``) with the ``config.yaml`` of the tag at
    ``path`` before anything is loaded. A change of parameter shapes raises ConfigError listing
    ``key: saved -> now``; other changes come back as one warning line (None when nothing changed or
    the checkpoint has no readable ``config.yaml``)."""
    saved = _saved_config(path)
    if saved is None:
        return None
    fatal, other = config_changes(saved, now)
    if fatal:
        raise ConfigError(
            f"checkpoint {path} holds another model than this config builds (its parameter shapes differ): "
            + ", ".join(fatal) + f". Resume with the saved values ({os.path.join(path, 'config.yaml')}), or start a "
            "new run in another train.output_dir (fine-tuning starts from a checkpoint's weights through `maskfeat "
            "export` and finetune.pretrained, which adapts the input geometry)")
    if other:
        seeds = " (train.seed seeds a fresh start only: the random streams continue from the checkpoint)" \
            if any(c.startswith("train.seed:") for c in other) else ""
        return (f"warning: resume: the config differs from the checkpoint's ({os.path.join(path, 'config.yaml')}): "
                + ", ".join(other) + "; continuing with the new values" + seeds)
    return None


def _saved_zero_stage(path: str) -> Optional[int]:
    """``deepspeed.zero_stage`` from the checkpoint's ``config.yaml`` (None when unreadable)."""
    try:
        return int(_saved_config(path)["deepspeed"]["zero_stage"])
    except (KeyError, TypeError, ValueError):
        return None


def _saved_precision(path: str) -> Optional[str]:
    """``deepspeed.precision`` from the checkpoint's ``config.yaml`` (None when unreadable)."""
    try:
        value = _saved_config(path)["deepspeed"]["precision"]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _restart_hint(path: str) -> str:
    # the tag folder itself: a checkpoint resumed from another run is not under this run's output_dir
    return (f"To continue on other settings, start a new run from its weights instead: `maskfeat export "
            f"{path} --out backbone.safetensors`, then fine-tune with "
            "finetune.pretrained=backbone.safetensors (the optimiser state and the schedule position are not "
            "carried over; pre-training has no option to start from exported weights).")


def check_resume_compatible(path: str, *, saved_world: int, saved_stage: Optional[int], world_size: int,
                            zero_stage: int, saved_precision: Optional[str] = None,
                            precision: Optional[str] = None) -> None:
    """Raise ConfigError when DeepSpeed cannot load the checkpoint at ``path`` (saved by
    ``saved_world`` ranks with ZeRO ``saved_stage`` in ``saved_precision``) into a run of
    ``world_size`` ranks with ``zero_stage`` in ``precision`` (module docstring); ``saved_stage``
    None skips the stage check, a ``saved_precision`` or ``precision`` of None the precision check."""
    restart = _restart_hint(path)
    if saved_precision is not None and precision is not None and saved_precision != precision:
        raise ConfigError(
            f"checkpoint {path} was saved with deepspeed.precision={saved_precision}, this run has "
            f"deepspeed.precision={precision}: DeepSpeed stores the optimiser state in another form per precision "
            f"and cannot load it into another one. Resume with deepspeed.precision={saved_precision}. " + restart)
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


GROUPING_KEYS = {"optim.weight_decay": lambda v: v == 0, "optim.layer_decay": lambda v: v >= 1}
"""The config keys that decide how parameters are split into AdamW groups (``engine.optim.param_groups``):
key -> the property of its value that does (weight decay 0 merges the decayed and the not decayed
parameters; a layer decay below 1 makes groups per layer)."""


def saved_param_group_names(path: str) -> Optional[list[list[str]]]:
    """The parameter names of each AdamW group the checkpoint at ``path`` was saved with (the client
    state of DeepSpeed's model states file, read memory-mapped: the weights are not read), or None
    when the checkpoint holds none or cannot be read."""
    files = sorted(glob.glob(os.path.join(path, "*model_states.pt")))
    if not files:
        return None
    try:
        names = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True).get("param_group_names")
    except Exception:  # unreadable here: DeepSpeed reports it when it loads the checkpoint
        return None
    return [list(g) for g in names] if isinstance(names, (list, tuple)) else None


def _model_kind(groups: list[list[str]]) -> Optional[str]:
    """``"pre-training"`` or ``"fine-tuning"`` by a model's parameter names (the MaskFeat head, or a
    classification head), None for neither."""
    names = [n for g in groups for n in g]
    if any(n.startswith(PRETRAIN_HEAD_PREFIXES) for n in names):
        return "pre-training"
    return "fine-tuning" if any(n.startswith("head.") for n in names) else None


def check_task(path: str, builds: Optional[str], saved: Optional[list[list[str]]] = None) -> None:
    """Raise ConfigError when the checkpoint at ``path`` holds another kind of model (``"pre-training"``
    or ``"fine-tuning"``, by its saved parameter names; ``saved``: those, when read already) than the
    run ``builds``; called before anything is built too, so that a fine-tuning resume of a pre-training
    run says so first (it printed its resume lines and built the model)."""
    saved = saved_param_group_names(path) if saved is None else saved
    was = _model_kind(saved) if saved else None
    if was != builds and None not in (was, builds):
        hint = (f"Fine-tune from its weights instead: `maskfeat export {path} --out backbone.safetensors`, then "
                "finetune.pretrained=backbone.safetensors" if was == "pre-training" else
                "A fine-tuned classifier does not continue as a pre-training run; start one in a new train.output_dir")
        raise ConfigError(f"checkpoint {path} is a {was} checkpoint, and this run trains a {builds} model: "
                          f"it cannot be resumed here. {hint}")


def check_param_groups(path: str, names: list[list[str]], now: dict) -> None:
    """Raise ConfigError when the AdamW groups this run builds (``names``: the parameter names of each
    group, in order) are not those the checkpoint at ``path`` was saved with: the optimiser state is
    stored per group (DeepSpeed would fail inside ``load_state_dict``, or with a ZeRO layout error).
    The message names the keys of :data:`GROUPING_KEYS` that changed (``now``: ``config_to_dict``).
    Nothing is checked when the checkpoint holds no group names."""
    saved = saved_param_group_names(path)
    if saved is None or saved == [list(g) for g in names]:
        return
    check_task(path, _model_kind(names), saved)
    a, b = _flatten(_saved_config(path) or {}), _flatten(now)

    def regroups(k: str) -> bool:
        try:
            return GROUPING_KEYS[k](a[k]) != GROUPING_KEYS[k](b[k])
        except (KeyError, TypeError):
            return False

    changed = [k for k in GROUPING_KEYS if regroups(k)]
    what = ", ".join(f"{k}: {_fmt(a[k])} -> {_fmt(b[k])}" for k in changed)
    keep = (", ".join(f"{k}={_fmt(a[k])}" for k in changed) if changed
            else f"the saved optim settings ({os.path.join(path, 'config.yaml')})")
    raise ConfigError(
        f"checkpoint {path} holds the optimiser state of {len(saved)} AdamW parameter groups, this config builds "
        f"{len(names)}" + (f" ({what})" if what else "") + ": the state cannot be carried over to "
        "another grouping (optim.weight_decay=0 merges the decayed and the not decayed parameters, "
        f"optim.layer_decay < 1 makes groups per layer). Resume with {keep}. " + _restart_hint(path))


def load_checkpoint(engine: Any, output_dir: str, tag: str, *, load_optimizer: bool = True,
                    zero_stage: Optional[int] = None, ckpt_dir: Optional[str] = None,
                    precision: Optional[str] = None) -> dict:
    """Restore ``engine`` from ``tag`` and return this rank's saved state dict.

    Before DeepSpeed is called, a missing tag (the error lists the available ones) and a world size,
    ZeRO stage or precision DeepSpeed cannot load (:func:`check_resume_compatible`) raise ConfigError.
    ``zero_stage`` is this run's stage (default: the engine's); ``precision`` this run's
    ``deepspeed.precision`` (None: not checked). A ZeRO-0 checkpoint loads into any
    world size: rank ``r`` then reads the state of saved rank ``r mod saved_world`` (the returned
    state's ``rank`` says whose: ``engine.runner`` forks the RNG streams of a rank that read another's
    and maps the data position).
    ``ckpt_dir`` (default ``<output_dir>/checkpoints``) loads a tag of another run's folder.
    """
    rank, world, _ = _dist()
    ckpt_dir = checkpoint_dir(output_dir) if ckpt_dir is None else ckpt_dir
    path = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(path):
        tags = available_tags(ckpt_dir)
        raise ConfigError(f"--resume {tag}: no checkpoint {tag!r} under {ckpt_dir}; available: "
                          + (", ".join(tags) + " (or --resume auto for the latest)" if tags else "none"))
    files = _state_files(path)
    if not files:
        raise ConfigError(f"--resume {tag}: {path} has no engine_state_r*.pt: not a complete checkpoint of this "
                          f"engine; available: {', '.join(available_tags(ckpt_dir)) or 'none'}")
    mine = os.path.join(path, f"engine_state_r{rank:05d}.pt")
    if not os.path.isfile(mine):
        mine = files[rank % len(files)]
    state, error = None, None
    try:
        state = torch.load(mine, map_location="cpu", weights_only=False)
    except Exception as e:  # agreed below, so that every rank stops, not only the one that failed
        error = e
    if _failed_anywhere(error is not None):
        if error is not None and not _unreadable(error):
            raise error
        raise _damaged(ckpt_dir, tag, mine if error is not None else None, error)
    state["rank"] = _file_rank(mine)  # whose state this is (another rank's after a world size change)
    # every rank must hold the same save: with node-local filesystems a re-save stopped between two nodes'
    # renames leaves the new tag on one node and the earlier one, put back at the start, on another
    marks = gather_objects((state.get("train_state", {}).get("step"),
                            (state.get("data_layout") or {}).get("num_batches")))
    if len(set(marks)) > 1:
        raise CheckpointError(f"checkpoint {path} differs between ranks ((step, batches per epoch) by rank: {marks}): "
                              "copies on node-local filesystems out of step after an interrupted save; resume a tag "
                              "every node holds whole (--resume TAG; available here: "
                              f"{', '.join(available_tags(ckpt_dir)) or 'none'})")
    # the loader state holds the world size (each node of a non-shared filesystem sees only its files)
    saved_world = int(state.get("loader", {}).get("world_size", len(files)))
    stage = int(engine.zero_optimization_stage() if zero_stage is None else zero_stage)
    check_resume_compatible(path, saved_world=saved_world, saved_stage=_saved_zero_stage(path), world_size=world,
                            zero_stage=stage, saved_precision=_saved_precision(path),
                            precision=precision)
    # each rank's own files before DeepSpeed reads them: one rank failing inside its loader left the others
    # in a collective (ZeRO-3's gather), where they waited for the timeout
    lost = _own_files_problem(path, rank, own=mine.endswith(f"engine_state_r{rank:05d}.pt"),
                              same_world=saved_world == world, stage=_saved_zero_stage(path) or 0,
                              optimizer=load_optimizer)
    if _failed_anywhere(lost is not None):
        raise _damaged(ckpt_dir, tag, lost[0] if lost else None, lost[1] if lost else None)
    try:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=False, load_module_strict=True)
    except _UNREADABLE as e:  # a damaged DeepSpeed file (the other ranks stop at their next collective)
        if not _unreadable(e):
            raise
        raise _damaged(ckpt_dir, tag, None, e) from e
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    return state


def _own_files_problem(path: str, rank: int, *, own: bool, same_world: bool, stage: int,
                       optimizer: bool) -> Optional[tuple[str, Exception]]:
    """``(file, error)`` for the first file this rank will read from the tag folder ``path`` that is
    missing or not a whole archive (its end cut off, zero-filled), else None. Its own rank state is
    needed when the world size is the saved one (another rank's was read in its place, silently)."""
    import zipfile

    if same_world and not own:
        missing = os.path.join(path, f"engine_state_r{rank:05d}.pt")
        return missing, FileNotFoundError("this rank's state is missing")
    if stage == 3:
        wanted = [f"*zero_pp_rank_{rank}_mp_rank_*_model_states.pt"]
    else:
        wanted = ["mp_rank_00_model_states.pt"]
    if optimizer and stage >= 1 and same_world:
        wanted.append(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt")
    for pattern in wanted:
        files = glob.glob(os.path.join(path, pattern))
        if not files:
            return os.path.join(path, pattern), FileNotFoundError("no such file")
        try:
            with zipfile.ZipFile(files[0]):  # (torch.save's format: its directory sits at the end)
                pass
        except (OSError, zipfile.BadZipFile) as e:
            return files[0], e
    return None


_STATE_RE = re.compile(r"engine_state_r(\d+)\.pt$")


def _file_rank(file: str) -> int:
    """The rank that saved ``engine_state_r<rank>.pt``."""
    return int(_STATE_RE.search(file).group(1))


def _state_files(path: str) -> list[str]:
    """The rank-state files of the tag folder ``path``, sorted (a stray ``engine_state_r0 copy.pt``, a
    desktop's duplicate, is none: it crashed every listing of the tags)."""
    return sorted(f for f in glob.glob(os.path.join(path, "engine_state_r*.pt")) if _STATE_RE.search(f))


_UNREADABLE = (EOFError, pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError)
"""What ``torch.load`` raises for an empty, cut-short, zero-filled or corrupt file (:func:`_unreadable`)."""


def _unreadable(e: Exception) -> bool:
    """Whether ``e`` says a file does not read, not that its contents do not fit (a RuntimeError of
    ``load_state_dict`` is a model mismatch, reported as such). A zero-filled file (its size on
    disk, its blocks lost in a crash) raises KeyError "filename 'storages' not found"."""
    if isinstance(e, (EOFError, pickle.UnpicklingError, OSError)):
        return True
    if not isinstance(e, _UNREADABLE):
        return False
    text = str(e)
    return any(m in text for m in ("PytorchStreamReader", "zip archive", "Ran out of input", "unexpected EOF",
                                   "failed reading", "invalid load key", "truncated", "filename '"))


def _damaged(ckpt_dir: str, tag: str, file: Optional[str], error: Optional[Exception]) -> CheckpointError:
    """The error for a checkpoint whose files do not load (a node crash before they reached the
    disk, a full disk, a copy cut short): it names the other complete checkpoints to resume instead."""
    what = f"{os.path.basename(file)}: {type(error).__name__}: {error}" if file else (
        f"{type(error).__name__}: {error}" if error is not None else "a file of another rank does not load")
    s = step_of(tag)
    others = [t for t in available_tags(ckpt_dir) if step_of(t) is not None and t != tag]
    older = [t for t in others if s is None or step_of(t) < s]
    hint = (f"resume an older one, e.g. --resume {older[-1]} (newer tags are then set aside); " if older else "") + (
        f"complete checkpoints: {', '.join(others)}" if others else "no other complete checkpoint to resume from")
    return CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged ({what[:300]}); {hint}")


# ----------------------------------------------------------------------------------------------
# Consolidation and export
# ----------------------------------------------------------------------------------------------
def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 module state dict of a DeepSpeed checkpoint (any ZeRO stage), on CPU."""
    path = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint {tag!r} under {ckpt_dir}")
    if glob.glob(os.path.join(path, "*optim_states.pt")) and glob.glob(os.path.join(path, ZERO_SHARDS)):
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


def export_source(output_dir_or_ckpt: str, tag: Optional[str] = None) -> tuple[str, str]:
    """``(checkpoints directory, tag)`` of what :func:`export_backbone` reads: a run's output
    directory, its ``checkpoints/`` directory, ``checkpoints/latest`` or a ``checkpoints/<tag>``
    directory (:func:`locate_checkpoint`, as ``--resume`` and ``eval --checkpoint``); ``tag``, when
    given, is looked up in the checkpoints directory of the first two. FileNotFoundError otherwise."""
    root = output_dir_or_ckpt
    if tag is None:
        try:
            found = locate_checkpoint(root)
        except FileNotFoundError as e:
            raise FileNotFoundError(str(e)[len("checkpoint "):] if str(e).startswith("checkpoint ") else str(e)) from None
        if found is None:
            raise FileNotFoundError(f"{root}: a file, not a checkpoint (a run folder, its checkpoints/ directory, "
                                    "checkpoints/latest or a checkpoints/<tag> directory)")
        return found
    ckpt_dir = checkpoint_dir(root) if os.path.isdir(checkpoint_dir(root)) else root
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{output_dir_or_ckpt}: not found (a run folder or its checkpoints/ directory)")
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise FileNotFoundError(f"no checkpoint {tag!r} under {ckpt_dir}; available: "
                                f"{', '.join(stored_tags(ckpt_dir)) or 'none'}")
    return ckpt_dir, tag


def export_backbone(output_dir_or_ckpt: str, out_path: Optional[str] = None, tag: Optional[str] = None,
                    keep_pretrain_head: bool = False) -> dict:
    """Write the consolidated fp32 backbone of a checkpoint as safetensors.

    ``output_dir_or_ckpt`` names the checkpoint as for :func:`export_source`; ``tag`` defaults to
    the latest complete one. ``out_path`` (a file, or a folder to hold ``backbone.safetensors``)
    defaults to ``<run folder>/backbone.safetensors``. The MaskFeat
    model *is* its backbone (official key names), so everything but the pre-training-only
    ``mask_token`` and ``pred_head.*`` is kept (all of it with ``keep_pretrain_head``); a
    wrapped ``backbone.*`` sub-tree is unwrapped. A fine-tuned classifier exports whole.
    Returns a summary (tag, number of tensors, parameters, path)."""
    from safetensors.torch import save_file

    ckpt_dir, tag = export_source(output_dir_or_ckpt, tag)
    if out_path is None:
        out_path = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "backbone.safetensors")
    others = lambda: [t for t in stored_tags(ckpt_dir) if t != tag and is_complete(os.path.join(ckpt_dir, t))]  # noqa: E731
    if _missing_shards(os.path.join(ckpt_dir, tag)):
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} lacks ZeRO optimiser shards: incomplete "
                              f"or damaged; complete tags: {', '.join(others()) or 'none'} (--tag)")
    try:
        sd = consolidated_state_dict(ckpt_dir, tag)
    except _UNREADABLE as e:
        if isinstance(e, FileNotFoundError) and not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} cannot be read ({type(e).__name__}: {cause}): "
                              f"incomplete or damaged; complete tags: {', '.join(others()) or 'none'} (--tag)") from e
    if os.path.isdir(out_path) or out_path.endswith(("/", os.sep)):  # a folder, maybe still to make
        out_path = os.path.join(out_path, "backbone.safetensors")
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not backbone:  # the module is the backbone (models.MaskFeat / Classifier)
        backbone = sd
    if not keep_pretrain_head:
        backbone = {k: v for k, v in backbone.items() if not k.startswith(PRETRAIN_HEAD_PREFIXES)}
    cfg_path = os.path.join(ckpt_dir, tag, "config.yaml")
    meta = {"format": "maskfeat-backbone", "source": os.path.abspath(os.path.join(ckpt_dir, tag))}  # (eval finds
    # the run's classes.json through it, from any working directory)
    if os.path.isfile(cfg_path):
        meta["config"] = open(cfg_path, encoding="utf-8").read()
    classes = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "classes.json")  # (finetune.CLASS_INDEX)
    if any(k.startswith("head.") for k in backbone) and os.path.isfile(classes):
        # a classifier carries its classes: the run's classes.json, found through `source`, can be another
        # run's by the time the export is evaluated (the folder reused with train.overwrite)
        meta["classes"] = open(classes, encoding="utf-8").read()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    replaced = os.path.exists(out_path)
    tmp = f"{out_path}.tmp{os.getpid()}"
    try:
        try:
            save_file(backbone, tmp, metadata=meta)
        except Exception as e:  # safetensors' own error for a full disk or a missing folder: an OSError
            if type(e).__name__ != "SafetensorError":
                raise
            raise OSError(str(e)) from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a backbone is shared like the run's other files
        os.replace(tmp, out_path)  # never a half-written export under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n = sum(v.numel() for v in backbone.values())
    return {"tag": tag, "tensors": len(backbone), "parameters": n, "path": out_path, "replaced": replaced,
            "classifier": any(k.startswith("head.") for k in backbone)}


FOLDER_AS_WEIGHTS = ("a folder, not a weights file; for a run or checkpoint folder, export its backbone first "
                     "(maskfeat export {path}) and use the backbone.safetensors it writes")
"""What a folder given as weights is told (``load_pretrained`` and fine-tuning's early check)."""


def not_weights(path: str) -> Optional[str]:
    """Why ``path``, given as weights, is none though it names a checkpoint: a folder
    (:data:`FOLDER_AS_WEIGHTS`) or a run's ``checkpoints/latest`` file (it failed to unpickle its
    12 bytes of tag name, "is it truncated?"); None for anything else."""
    if os.path.isdir(path):
        return FOLDER_AS_WEIGHTS.format(path=path)
    if os.path.basename(path) == "latest" and os.path.isfile(path) and _is_ckpt_dir(os.path.dirname(path) or "."):
        return (f"a run's checkpoints/latest file (the name of its newest tag), not a weights file; export that "
                f"checkpoint's backbone first (maskfeat export {path}) and use the backbone.safetensors it writes")
    return None


def _check_deepspeed_module(path: str, state: dict) -> None:
    """A DeepSpeed ``*model_states.pt`` passed as weights: usable only when it holds the exact fp32
    weights (ZeRO-0/1/2 fp32); a ZeRO-3 file holds this rank's empty placeholders, a bf16/fp16 run's
    the module's rounded copy (the fp32 masters are in the optimizer shards). ValueError naming
    the export that gives the real weights."""
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    if any(v.numel() == 0 for v in tensors):
        what = "of a ZeRO-3 checkpoint: its tensors are one rank's empty placeholders"
    else:
        low = {v.dtype for v in tensors if v.dtype in (torch.bfloat16, torch.float16)}
        if not low:
            return
        what = (f"holding the module's {'/'.join(sorted(str(d)[6:] for d in low))} copy: the fp32 master weights are "
                "in the optimizer's shards")
    raise ValueError(f"{path}: a DeepSpeed model-states file {what}; export the checkpoint's fp32 weights and use "
                     f"that file: maskfeat export {os.path.dirname(os.path.abspath(path))}")


def load_pretrained(path: str) -> dict[str, torch.Tensor]:
    """Backbone weights from a ``.safetensors`` export or an official SlowFast ``.pyth``/``.pt``
    (``torch.load(...)["model_state"]``, a DeepSpeed ``{"module": ...}`` file, an mmaction2-style
    ``{"state_dict": ...}`` or MAE-style ``{"model": ...}`` container, or a plain state dict).

    Raises FileNotFoundError for a missing file and ``ValueError`` naming the file and the cause
    (one line) for one that cannot be read (empty, truncated, not a checkpoint), that holds no
    state dict of tensors, or that is a DeepSpeed model-states file without the real fp32 weights
    (ZeRO-3's placeholders, a bf16/fp16 run's rounded copy: ``maskfeat export`` gives them); the
    callers turn these into ConfigError."""
    why = not_weights(path)
    if why:
        raise ValueError(f"{path}: {why}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pre-trained weights not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), not a weights file")
    with open(path, "rb") as f:  # by content, not by name: an export may be named anything
        head = f.read(9)
    safetensors = path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{")  # u64 header size, JSON
    kind = "safetensors" if safetensors else "torch.save (.pyth/.pt)"
    try:
        if safetensors:
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError as e:
        if size >= 2**30:  # a large file: the machine's memory may be what is short
            raise
        # a small file asking for more memory than there is: a length read from garbage (random bytes
        # did so 1 time in 100, and the error escaped as a traceback)
        raise ValueError(f"{path}: cannot be read as a {kind} file ({size} bytes; MemoryError: it asks for more "
                         "memory than there is); is it damaged, or not a weights file?") from e
    except Exception as e:  # unpickling/zip/safetensors errors of every kind: the file is the problem
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot be read as a {kind} file ({size} bytes; {type(e).__name__}: {cause}); "
                         f"is it truncated, or not a weights file?") from e
    state = obj
    if isinstance(obj, dict) and "model_state" in obj:
        state = obj["model_state"]
    elif isinstance(obj, dict) and "module" in obj:
        state = obj["module"]
        if "ds_version" in obj and isinstance(state, dict):  # one file of a DeepSpeed checkpoint tag
            _check_deepspeed_module(path, state)
    elif isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("state_dict", "model")):
        # mmaction2/mmpretrain ({"meta", "state_dict"}), MAE/VideoMAE ({"model": ...}): the key names
        # inside are then compared with ours (and named when they differ)
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict (expected safetensors, a "
                         "SlowFast checkpoint with 'model_state', or a state dict)")
    if not state:
        raise ValueError(f"{path}: the state dict is empty")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor (expected safetensors, "
                             "a SlowFast checkpoint with 'model_state', or a state dict of tensors)")
    return state
