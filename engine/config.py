"""Typed configuration of a MaskFeat run: nested dataclasses, strict YAML, dotted overrides.

One :class:`Config` holds every setting of pre-training, fine-tuning and evaluation, in sections
``model``, ``data`` (:class:`engine.data.config.DataConfig`), ``mask``, ``optim``, ``schedule``,
``train``, ``finetune``, ``deepspeed`` and ``log``. Each field carries a docstring (the string
literal under it); :func:`describe` prints them, so ``maskfeat pretrain --help-config`` is the
reference of every knob.

Loading is strict (STYLE habit 5): an unknown key in a YAML file or an override is an error that
names the closest valid key when one is close (``difflib``; a key without a section is looked up
by field name: ``epochs`` -> ``schedule.epochs``), a key repeated in one YAML mapping is an error,
and every value is checked against the field's type (``int``, ``float``, ``bool``, ``str``,
``Optional``, ``Literal`` by exact type, tuples, lists, dicts, nested sections). Floats must be
finite; ints accept integral floats (``1e3``). Overrides are ``section.field=value`` with the
value parsed as YAML and then typed by the field (``optim.lr=8e-4``, ``data.root=/k400``,
``data.train_scale=[0.5,1.0]``). YAML files and overrides read numbers as YAML 1.2 does (``1e3``
is a float, not YAML 1.1's string). Path fields (``metadata={"path": True}``: ``train.output_dir``,
``data.root``, ``data.cache_dir``, ``finetune.pretrained``) expand a leading ``~``.

Derived quantities are computed in one place (:func:`derive`) and printed at start (STYLE habit
6): world size, global batch, the absolute LR from the per-256-clip LR of the recipes
(``lr = optim.lr × global_batch / optim.lr_reference_batch``; the official code multiplies by the
number of nodes in a hidden place, we print it instead), steps per epoch, warm-up and total steps.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from engine.data.config import DataConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "MaskConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "FinetuneConfig",
    "DeepSpeedConfig",
    "LogConfig",
    "Config",
    "Derived",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "derive",
    "validate",
    "describe",
    "field_docs",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Which network to build (``models.create_model``) and how the engine wraps it."""

    name: str = "mvitv2_tiny"
    """Architecture variant name from ``models/variants.py`` (``mvitv2_s_16x4``, ``mvitv2_l_16x4``,
    ``vit_b_16``, ``mvitv2_tiny`` for CPU demos; ``python -m models`` lists them all)."""
    drop_path: Optional[float] = None
    """Stochastic depth rate; null = the variant's recipe value (fine-tuning 0.1 for MViTv2-S,
    0.2 for L; pre-training 0)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra ``models.create_model`` overrides of the variant's fields (e.g. the pre-training
    target ``{target: pixel}``, ``{attn_backend: reference}``, ``{pool_backend: torch}``: MViT's
    pooling convolutions all through torch, where the default ``auto`` runs the large bf16/fp16 ones
    through ``kernels.pool``'s Triton kernels on an sm_90 GPU (H100/H200); ``triton`` runs all of them
    there). The input geometry
    (``num_frames``, ``img_size``) is taken from ``data`` unless given here."""
    activation_checkpointing: Union[bool, int] = False
    """Recompute transformer blocks in backward instead of keeping their activations
    (``torch.utils.checkpoint``, applied by the engine around each block from outside the model):
    ``true`` every block, an integer N the first N blocks, ``false`` or 0 none. Each recomputed
    block costs about the same (one more forward of it); the first ones save the most memory
    (MViTv2's first stage has the most tokens). ``python -m bench.model_step --count-only --model
    mvitv2_l_16x4 --batch 4 --backends auto,auto+ckpt8,auto+ckpt`` counts what each choice keeps
    (on a CPU with ``TRITON_INTERPRET=1`` in front)."""


@dataclass
class MaskConfig:
    """Masking of the input (DESIGN §3.2)."""

    kind: Literal["cube", "tube", "frame", "image_block"] = "cube"
    """Masking strategy: ``cube`` (video default), ``tube``, ``frame``, ``image_block`` (images)."""
    ratio: float = 0.4
    """Fraction of masked units (paper ablation 0.2–0.8; 0.4 in all recipes)."""


@dataclass
class OptimConfig:
    """AdamW and its parameter groups (DESIGN §3.6)."""

    lr: float = 8e-4
    """Base LR per ``lr_reference_batch`` clips; the absolute LR is scaled by the global batch."""
    lr_reference_batch: int = 256
    """Global batch size at which ``lr`` and the schedule's LRs are given (256 in the pre-training
    recipes and the default; each fine-tuning recipe states its own: 32, 16, 512 or 256)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Weight decay of matrices and other ≥2-D parameters (cls/mask tokens and rel-pos tables
    included, as in the official code); biases, norms and other 1-D parameters get none."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: parameter LR × ``layer_decay^(depth+1−layer_id)``; 1.0 = off
    (fine-tuning: 0.75 for MViTv2-S, 0.875 for L)."""


@dataclass
class ScheduleConfig:
    """Per-iteration LR schedule: linear warm-up, then half-cosine (SlowFast ``lr_policy``)."""

    epochs: int = 300
    """Training length in epochs (the schedule's end)."""
    warmup_epochs: float = 10.0
    """Linear warm-up length in epochs (fractional allowed)."""
    warmup_start_lr: float = 8e-6
    """LR at step 0 of the warm-up, per ``optim.lr_reference_batch`` clips: scaled by the global
    batch like ``optim.lr`` (SlowFast scales WARMUP_START_LR with BASE_LR). The default is the K400
    pre-training value that goes with the default ``optim.lr`` (official 1e-6 per 32 clips)."""
    end_lr: float = 8e-6
    """LR at the end of the cosine, per ``optim.lr_reference_batch`` clips: scaled by the global
    batch like ``optim.lr`` (SlowFast scales COSINE_END_LR with BASE_LR); default as for
    ``warmup_start_lr`` (official 1e-6 per 32 clips: 1/100 of the peak)."""
    cosine_after_warmup: bool = True
    """The cosine starts at the end of warm-up (official ``COSINE_AFTER_WARMUP``); False = the
    cosine spans the whole run and warm-up blends into it."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0 = run all epochs). The LR schedule
    still follows ``epochs``; useful for smoke tests and benchmarks."""


@dataclass
class TrainConfig:
    """Loop control, checkpoints and robustness."""

    output_dir: str = field(default="runs/maskfeat", metadata={"path": True})
    """Directory for checkpoints, the metrics file, TensorBoard events and the saved config (a
    leading ``~`` is expanded, as in every path field)."""
    overwrite: bool = False
    """A run started without ``--resume`` in an ``output_dir`` that holds checkpoints stops with a
    config error (``--resume auto`` continues it); true: that folder's ``checkpoints/``,
    ``metrics.jsonl``, ``classes.json``, ``tb/``, ``eval.json``, ``evals.jsonl``,
    ``eval.predictions.npz``, ``backbone.safetensors`` and its ``backbone.eval*`` files are removed,
    once the new run's data has validated, its model has been built, DeepSpeed has accepted its config
    and a checkpoint it continues has loaded (a mistake found by then leaves them), and the run starts
    afresh."""
    seed: int = 0
    """Seed of model init, masks (one numpy Generator per rank, seeded by seed and rank) and
    drop path."""
    checkpoint_every_steps: int = 0
    """Save a checkpoint every this many optimiser steps (0 = only at epoch ends and the end)."""
    checkpoint_every_epochs: int = 1
    """Save a checkpoint every this many epochs (0 = never at epoch ends; the final one is always saved)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep: the one just saved and the newest below it (``best`` is
    kept apart); 0 = keep all."""
    max_nonfinite: int = 5
    """Stop with a diagnostic after this many steps in a row without an update: non-finite losses
    (no backward, no optimiser step) or non-finite gradients of a finite loss (no optimiser step);
    each is counted in the metrics (``nonfinite_total``)."""
    stop_after_steps: int = 0
    """Exit (code 3, no final checkpoint) right after this global step, as if killed; used to
    test ``--resume auto``. 0 = off."""
    eval_every_epochs: int = 1
    """Fine-tuning: evaluate on the validation split every this many epochs (0 = only at the end)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` = CUDA when available (NCCL), otherwise CPU (gloo)."""


EVAL_SPLITS = ("train", "val", "test")
"""The splits ``finetune.eval_split`` may name (those ``engine.data.build_loader`` reads)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning and evaluation specifics (DESIGN §3.6)."""

    pretrained: str = field(default="", metadata={"path": True})
    """Pre-trained backbone to start from (a leading ``~`` is expanded): a ``.safetensors`` file from
    ``maskfeat export`` or an official SlowFast ``.pyth`` (its ``model_state``); "" = from scratch."""
    num_classes: int = 0
    """Classifier width; 0 = take it from the dataset (``loader.num_classes``)."""
    mixup_alpha: float = 0.8
    """Mixup Beta(α, α) parameter; 0 = off."""
    cutmix_alpha: float = 1.0
    """CutMix Beta(α, α) parameter; 0 = off."""
    mixup_prob: float = 1.0
    """Probability that a batch gets mixup or cutmix at all."""
    switch_prob: float = 0.5
    """When both are on, probability of cutmix instead of mixup for a batch."""
    label_smoothing: float = 0.1
    """Label smoothing of the soft targets (soft-target cross-entropy)."""
    eval_split: str = "val"
    """Split used for evaluation during and after fine-tuning: train, val or test."""


@dataclass
class DeepSpeedConfig:
    """What the engine writes into the DeepSpeed config (DESIGN §4)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimiser states), 2 (+ gradients), 3 (+ parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (the official recipes run fp32; bf16 recommended on A100/H100). bf16 averages
    gradients over the ranks in fp32 (``extra: {communication_data_type: bf16}`` for half the traffic)."""
    gradient_clipping: float = 0.02
    """Global L2 gradient clip (0.02 in pre-training, 5.0 in the video fine-tuning recipes, off in the
    ImageNet ones as in the official configs); 0 = off."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw entries merged last into the generated DeepSpeed config (expert use, e.g.
    ``{zero_optimization: {overlap_comm: true}}``)."""


@dataclass
class LogConfig:
    """Progress bar, TensorBoard and JSON-lines metrics."""

    every_steps: int = 10
    """Write scalars (loss, LR, grad norm, clips/s, memory) every this many steps; without a
    progress bar, also one plain line on stderr (step, epoch, loss, LR, clips/s, ETA, memory)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0 with clips/s and ETA, drawn only when stderr is a terminal; when
    it is not (a log file, SLURM) or with false, one plain line every ``every_steps`` steps instead."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tb``."""
    jsonl: bool = True
    """Write one JSON object per logged step to ``<output_dir>/metrics.jsonl``."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data pipeline (``engine/data/config.py``)."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Masking (pre-training)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """LR schedule and length."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop control."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning and evaluation."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


# ----------------------------------------------------------------------------------------------
# Strict typed construction
# ----------------------------------------------------------------------------------------------
_HINT_CUTOFF = 0.6
"""``difflib`` similarity below which no "did you mean" is offered (a far-off guess misleads)."""


_SYNONYMS = {"gpu": "cuda", "validation": "val", "valid": "val", "training": "train", "testing": "test"}
"""Words meant as a choice that difflib does not find (``train.device=gpu`` was offered 'cpu')."""


def _closest(key: str, valid: list[str]) -> str:
    meant = _SYNONYMS.get(key.strip().lower())
    if meant in valid:
        return meant
    match = difflib.get_close_matches(key, valid, n=1, cutoff=_HINT_CUTOFF)
    return match[0] if match else ""


def _all_fields() -> dict[str, list[str]]:
    """Field name -> the ``section.field`` keys that have it (``seed`` is in ``data`` and ``train``)."""
    out: dict[str, list[str]] = {}
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append(f"{sec.name}.{f.name}")
    return out


def _suggest(path: str, key: str, valid: list[str]) -> list[str]:
    """Full keys to suggest for the unknown ``key`` under ``path`` ("" = top level), best first:

    * at the top level, a field of that exact name in any section (``epochs`` ->
      ``schedule.epochs``, ``seed`` -> ``data.seed`` and ``train.seed``), else a close section
      name (``datta`` -> ``data``), else a close field name (``epoch`` -> ``schedule.epochs``);
    * in a section, a close name there (``optim.lrr`` -> ``optim.lr``), else a field of that exact
      name in another section (``train.lr`` -> ``optim.lr``);
    * nothing when nothing is close (a far-off guess misleads more than it helps)."""
    sections = [f.name for f in dataclasses.fields(Config)]
    by_name = _all_fields()
    if not path:
        if key in by_name:
            return by_name[key]
        near = _closest(key, valid)
        if near:
            return [near]
        names = difflib.get_close_matches(key, list(by_name), n=1, cutoff=_HINT_CUTOFF)
        return by_name[names[0]] if names else []
    near = _closest(key, valid)
    if near:
        return [f"{path}.{near}"]
    if path in sections and key in by_name:
        return by_name[key]
    return []


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    where = f"{path}.{key}" if path else key
    near = _suggest(path, key, valid)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return ConfigError(
        f"unknown config key {where!r}{hint} "
        f"(valid keys{' of ' + path if path else ''}: {', '.join(valid)})"
    )


# YAML: the 1.2 float spelling and no duplicate keys ------------------------------------------
_FLOAT_12 = re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
   |[-+]?\.[0-9_]+[eE][-+]?[0-9]+)$""", re.X)
"""Floats with an exponent that YAML 1.1 misses (it wants a dot and a signed exponent:
``1.0e+3``); YAML 1.1's own float resolver covers the rest (``0.5``, ``.inf``, ``.nan``)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e3``, ``5e8``, ``1e-1`` as floats (YAML 1.2; YAML 1.1 wants
    a dot, ``1.0e3``) and rejects a key repeated in one mapping (YAML 1.1 keeps the last silently,
    so a second ``optim:`` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {first}); "
                                  "YAML would keep only the last one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_INT_TAG, _TIMESTAMP_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$")
"""YAML 1.2 core integers (and ``1_000``): YAML 1.1 reads ``010`` as 8 (octal) and ``1:30`` as 90
(base 60)."""
# YAML 1.1's int and timestamp rules out (``output_dir: 2024-06-01`` is a name, not a date), 1.2's in
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in rules if tag not in (_INT_TAG, _TIMESTAMP_TAG)]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
_Loader.add_implicit_resolver(_INT_TAG, _INT_12, list("-+0123456789"))


def _construct_int_12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    try:
        return int(text.replace("_", ""), 10)  # leading zeros are decimal
    except ValueError:
        raise ConfigError(f"line {node.start_mark.line + 1}: {text!r} is not an integer") from None


_Loader.add_constructor(_INT_TAG, _construct_int_12)


class _Dumper(yaml.SafeDumper):
    """Writes what :class:`_Loader` reads back the same, and what a YAML 1.1 reader reads the same
    too: a string either would take for something else (``1e3``, ``0o17``; ``2024-06-01``, ``010``)
    is quoted (``root: 1e3`` was written bare and read back as 1000.0)."""


_Dumper.yaml_implicit_resolvers = {
    first: list(yaml.SafeDumper.yaml_implicit_resolvers.get(first, [])) + list(_Loader.yaml_implicit_resolvers.get(first, []))
    for first in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(_Loader.yaml_implicit_resolvers)}


def _yaml_load(text: Any) -> Any:
    """Parse YAML text or a stream with :class:`_Loader`; a syntax error is a one-line ConfigError
    (``line L, column C: problem``), an alias that contains itself one too."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"not valid YAML: {where}{e.problem or e.context or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:  # (PyYAML builds such aliases; deep nesting ends here)
        raise ConfigError("not valid YAML: nested too deeply") from None


_NULLS = ("null", "Null", "NULL", "~", "None", "none")
"""Override spellings of null (``None``/``none`` too: ``--help-config`` used to print ``None``)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where YAML is lossy (lists for
    tuples, ints for floats, ``'1e-4'`` strings for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section whose fields are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)} ({'; '.join(errors)})")
    if origin is Literal:  # the exact type: 2.0 and True are not the choice 2 or 1
        if any(type(value) is type(a) and value == a for a in args):
            return value
        choices = ", ".join(repr(a) for a in args)
        same = next((a for a in args if str(a) == str(value)), None)  # '2' for 2, 'True' for True
        if same is not None:
            how = "quoted" if isinstance(same, str) else "unquoted"
            raise ConfigError(f"{path}: {value!r} is not one of {choices}; write it {how}: {same!r}")
        hint = _closest(str(value), [str(a) for a in args])
        raise ConfigError(f"{path}: {value!r} is not one of {choices}" + (f"; did you mean {hint!r}?" if hint else ""))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3 -> 1000; 2.5, nan, inf stay errors
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number: Optional[float] = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # a quoted number, or a mapping built in Python
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {number!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            raise ConfigError(f"{path}: expected a string, got null ('' is the empty string)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML read a number: its text is lost
            raise ConfigError(f"{path}: expected a string, got the number {value!r} (YAML reads 1.10 as 1.1, 007 as 7, "
                              "1e3 as 1000.0): quote the value as you wrote it")
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _is_path(f: dataclasses.Field) -> bool:
    """A field whose value is a file or folder (``metadata={"path": True}``): ``~`` is expanded."""
    return bool(f.metadata.get("path"))


def path_keys(cls: type = None, prefix: str = "") -> list[str]:
    """The dotted keys of every path field (``metadata={"path": True}``) of the config, e.g. ``data.root``."""
    hints = typing.get_type_hints(Config if cls is None else cls)
    keys = []
    for f in dataclasses.fields(Config if cls is None else cls):
        tp = hints[f.name]
        if _is_path(f):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(tp):
            keys += path_keys(tp, f"{prefix}{f.name}.")
    return keys


def absolute_paths(obj: Any) -> Any:
    """``obj`` (a config or a section) with its relative path fields made absolute against the
    current folder: a run records where its data and weights are, so that ``maskfeat eval
    --checkpoint RUN`` (which reads the run's saved config) works from any folder."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_path(f) and isinstance(value, str) and value and not os.path.isabs(value):
            changes[f.name] = os.path.abspath(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            new = absolute_paths(value)
            if new is not value:
                changes[f.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj


def _build(cls: type, data: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(path, str(key), names)
        value = _coerce(value, hints[key], f"{path}.{key}" if path else key)
        if _is_path(fields[key]) and isinstance(value, str):
            value = os.path.expanduser(value)  # train.output_dir=~/runs, data.root: ~/k400
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own __post_init__ validation
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def config_from_dict(data: dict) -> Config:
    """Build a :class:`Config` from a nested mapping (missing keys take their defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict (tuples as lists) that :func:`config_from_dict` reads back."""
    return _plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (printed at start and saved in every checkpoint)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None)


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), raw


def _override_value(item: str, key: str, tp: Any, raw: str) -> Any:
    """The value of the override ``item`` (``key=raw``) for a field of type ``tp``."""
    union = typing.get_origin(tp) in (Union, types.UnionType)
    optional = union and type(None) in typing.get_args(tp)
    stringy = tp is str or (union and str in typing.get_args(tp))
    text = raw.strip()
    if tp is Any and text == "None":  # a free-form mapping's value (model.overrides.x=None): null too ('none'
        return None                   # stays a word: hog_norm=none, an offload device none)
    if tp is not Any and text in _NULLS and not (text == "~" and stringy):  # on a str field ~ is home
        if optional:
            return None
        if tp is str:
            raise ConfigError(f"override {item!r}: {key} is a string and cannot be null (write {key}= for an "
                              f"empty one, {key}='{text}' for the word)")
    if stringy:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a quoted string: '', "null"
            try:
                quoted = _yaml_load(text)
            except ConfigError:
                quoted = None
            if isinstance(quoted, str):
                return quoted
        return raw
    if raw == "":
        return ""
    try:
        return _yaml_load(raw)
    except ConfigError as e:
        raise ConfigError(f"override {item!r}: {e}") from None


def _merged(old: dict, new: dict) -> dict:
    """``new`` merged into a copy of ``old``, non-empty mappings key by key (other values, and an empty
    mapping, which clears, replaced)."""
    out = dict(old)
    for k, v in new.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested mapping (checked later by the typed build).

    Values are parsed as YAML with YAML 1.2 numbers (``1e3`` is a float): ``true``, ``3``,
    ``[0.5, 1.0]``, ``{target: pixel}``. A mapping given to a section or a mapping field merges
    into what the recipe set (``optim={lr: 1e-3}`` is ``optim.lr=1e-3``: it replaced the whole
    section, silently resetting the recipe's other fields to the defaults); an empty one
    (``model.overrides={}``) clears a mapping field. A field of type ``str`` keeps the raw text, so
    ``data.root=007`` stays ``"007"``, unless it is quoted (``finetune.pretrained=''`` is empty,
    ``data.root='null'`` the word); an unquoted ``null``/``None`` there is an error. ``null``,
    ``None`` and ``none`` set an ``Optional`` field to null.
    """
    data = _plain(dict(data or {}))
    for item in overrides:
        keys, raw = _parse_override(item)
        cls: Any = Config
        node = data
        for depth, k in enumerate(keys):
            path = ".".join(keys[:depth])
            is_last = depth == len(keys) - 1
            if cls is not None and dataclasses.is_dataclass(cls):
                hints = typing.get_type_hints(cls)
                names = [f.name for f in dataclasses.fields(cls)]
                if k not in names:
                    raise _unknown_key(path, k, names)
                tp = hints[k]
            else:  # inside a free-form dict field (e.g. model.overrides.target=pixel)
                tp = Any
            if is_last:
                value = _override_value(item, ".".join(keys), tp, raw)
                if isinstance(value, dict) and value and isinstance(node.get(k), dict):
                    value = _merged(node[k], value)  # section={...}: the fields it names (it reset the others)
                node[k] = value
            else:
                if not (dataclasses.is_dataclass(tp) or tp is Any or typing.get_origin(tp) is dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is a value, not a section")
                child = node.get(k)
                if child is None:
                    child = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is not a section")
                node[k] = child
                node = child
                cls = tp if dataclasses.is_dataclass(tp) else None
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, *,
                base: Optional[dict] = None) -> Config:
    """Read a YAML recipe (optional), apply dotted overrides, build and check the :class:`Config`.
    ``base``: the sections to start from without a ``path`` (a checkpoint's saved config)."""
    data: dict = dict(base or {})
    if path:
        path = os.path.expanduser(path)  # --config=~/x.yaml: no shell expands it
        try:
            with open(path, encoding="utf-8") as f:  # not the locale's: a C locale refused UTF-8 paths
                data = _yaml_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except ConfigError as e:  # a duplicate key, a syntax error
            raise ConfigError(f"{path}: {e}") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, a binary file
            why = "not UTF-8 text (a binary file?)" if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
            raise ConfigError(f"cannot read config file {path}: {why} (--config takes a YAML file)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        merged = apply_overrides(data, list(overrides or []))
    except RecursionError:  # a YAML alias inside its own anchor (&x {self: *x})
        raise ConfigError(f"{path}: not valid here: an alias (*name) that contains itself") from None
    try:
        return config_from_dict(merged)
    except ConfigError as e:
        if path and overrides:  # blame the file only when the file alone fails too
            try:
                config_from_dict(data)
            except ConfigError:
                pass
            else:
                raise ConfigError(f"{path} with the command-line overrides: {e}") from None
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


# ----------------------------------------------------------------------------------------------
# Derived values
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Derived:
    """Quantities computed from the config and the launch (printed at start, logged)."""

    world_size: int
    """Number of data-parallel ranks."""
    batch_per_rank: int
    """Clips per rank per step (``data.batch_size``, times ``repeated_aug`` in fine-tuning)."""
    global_batch: int
    """Clips per optimiser step over all ranks."""
    lr: float
    """Absolute peak LR = ``optim.lr × global_batch / optim.lr_reference_batch``."""
    warmup_start_lr: float
    """Absolute LR at step 0 = ``schedule.warmup_start_lr`` scaled like ``lr``."""
    end_lr: float
    """Absolute LR at the end of the cosine = ``schedule.end_lr`` scaled like ``lr``."""
    steps_per_epoch: int
    """Optimiser steps per epoch (loader length)."""
    total_steps: int
    """Steps of the whole schedule (``epochs × steps_per_epoch``)."""
    run_steps: int
    """Steps this run will take in total (``schedule.max_steps`` if set, else ``total_steps``)."""
    warmup_steps: int
    """Warm-up steps (``warmup_epochs × steps_per_epoch``, rounded)."""

    def describe(self, cfg: Config) -> str:
        return "\n".join([
            f"world size          {self.world_size}",
            f"batch per rank      {self.batch_per_rank}",
            f"global batch        {self.global_batch}",
            f"LR scaling          {cfg.optim.lr:g} per {cfg.optim.lr_reference_batch} clips x "
            f"{self.global_batch}/{cfg.optim.lr_reference_batch} = {self.lr:.6g} (absolute peak LR; "
            f"warm-up start {self.warmup_start_lr:.3g}, end {self.end_lr:.3g}, scaled alike)",
            f"steps per epoch     {self.steps_per_epoch}",
            f"warm-up steps       {self.warmup_steps}",
            f"schedule steps      {self.total_steps} ({cfg.schedule.epochs} epochs)",
            f"last step           {self.run_steps}" + ("" if self.run_steps == self.total_steps else
                                                        " (schedule.max_steps)"),
        ])


def derive(cfg: Config, world_size: int, steps_per_epoch: int, clips_per_rank: Optional[int] = None) -> Derived:
    """Compute the derived quantities; ``clips_per_rank`` defaults to ``data.batch_size``."""
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the loader yields {steps_per_epoch} batches per epoch on each of {world_size} ranks; "
            f"lower data.batch_size ({cfg.data.batch_size}) or add data (data.clips_per_epoch)"
        )
    b = int(clips_per_rank if clips_per_rank is not None else cfg.data.batch_size)
    gb = b * world_size
    total = cfg.schedule.epochs * steps_per_epoch
    run = min(total, cfg.schedule.max_steps) if cfg.schedule.max_steps > 0 else total
    scale = gb / cfg.optim.lr_reference_batch  # SlowFast: BASE_LR, WARMUP_START_LR, COSINE_END_LR x NUM_SHARDS
    return Derived(
        world_size=world_size,
        batch_per_rank=b,
        global_batch=gb,
        lr=cfg.optim.lr * scale,
        warmup_start_lr=cfg.schedule.warmup_start_lr * scale,
        end_lr=cfg.schedule.end_lr * scale,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        run_steps=run,
        warmup_steps=int(round(cfg.schedule.warmup_epochs * steps_per_epoch)),
    )


def _check_finite(cfg: Config) -> None:
    """Every float of every section (tuples too) is finite: the typed build rejects nan/inf
    already, this catches a :class:`Config` built or changed in Python. Free-form mappings
    (``model.overrides``, ``deepspeed.extra``) are checked by what reads them."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            items = value if isinstance(value, (tuple, list)) else (value,)
            for v in items:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{sec.name}.{f.name} must be finite, got {value!r}")


MAX_SEED = (2**64 - 2**20) // 1000
"""The largest ``train.seed``: the rank's torch seed ``seed * 1000 + rank + 1`` fits 64 bits for a
million ranks."""


def validate(cfg: Config) -> None:
    """Cross-field checks the typed build cannot express. Comparisons are written so that NaN
    fails them (``not x > 0`` rather than ``x <= 0``)."""
    _check_finite(cfg)
    s, o = cfg.schedule, cfg.optim
    if s.epochs < 1:
        raise ConfigError(f"schedule.epochs must be >= 1, got {s.epochs}")
    if not 0 <= s.warmup_epochs <= s.epochs:
        raise ConfigError(f"schedule.warmup_epochs must be in [0, epochs={s.epochs}], got {s.warmup_epochs}")
    if not o.lr > 0 or o.lr_reference_batch < 1:
        raise ConfigError(f"optim.lr must be > 0 and optim.lr_reference_batch >= 1, got {o.lr}, {o.lr_reference_batch}")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
    if not 0 < cfg.mask.ratio < 1:
        raise ConfigError(f"mask.ratio must be in (0, 1), got {cfg.mask.ratio}")
    ac = cfg.model.activation_checkpointing
    if not isinstance(ac, bool) and ac < 0:
        raise ConfigError(f"model.activation_checkpointing must be true, false or a number of blocks >= 0, got {ac}")
    dp = cfg.model.drop_path
    if dp is not None and not 0 <= dp < 1:
        raise ConfigError(f"model.drop_path must be in [0, 1) or null, got {dp}")
    if cfg.train.max_nonfinite < 1:
        raise ConfigError(f"train.max_nonfinite must be >= 1, got {cfg.train.max_nonfinite}")
    if not cfg.train.output_dir.strip():
        raise ConfigError("train.output_dir must not be empty (checkpoints, metrics and the config are written there)")
    b1, b2 = o.betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1) or not o.eps > 0 or not o.weight_decay >= 0:
        raise ConfigError(f"optim.betas must be in [0, 1), optim.eps > 0 and optim.weight_decay >= 0; got "
                          f"{o.betas}, {o.eps}, {o.weight_decay}")
    if not s.warmup_start_lr >= 0 or not s.end_lr >= 0 or s.max_steps < 0:
        raise ConfigError(f"schedule.warmup_start_lr and end_lr must be >= 0 and max_steps >= 0; got "
                          f"{s.warmup_start_lr}, {s.end_lr}, {s.max_steps}")
    if not s.end_lr < o.lr:  # SlowFast's lr_func_cosine asserts COSINE_END_LR < BASE_LR
        raise ConfigError(f"schedule.end_lr={s.end_lr} must be below optim.lr={o.lr} (the cosine decays to it; "
                          "both are per optim.lr_reference_batch clips)")
    if cfg.log.every_steps < 1:
        raise ConfigError(f"log.every_steps must be >= 1, got {cfg.log.every_steps}")
    for name in ("checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints", "stop_after_steps",
                 "eval_every_epochs", "seed"):
        if getattr(cfg.train, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(cfg.train, name)}")
    if cfg.train.seed > MAX_SEED:  # torch.manual_seed(seed * 1000 + rank + 1) overflowed 2**64, after the data checks
        raise ConfigError(f"train.seed must be at most {MAX_SEED}, got {cfg.train.seed}")
    if not cfg.deepspeed.gradient_clipping >= 0:
        raise ConfigError(f"deepspeed.gradient_clipping must be >= 0 (0: off), got {cfg.deepspeed.gradient_clipping}")
    ft = cfg.finetune
    if ft.num_classes < 0:
        raise ConfigError(f"finetune.num_classes must be >= 0 (0: the training classes), got {ft.num_classes}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        if not getattr(ft, name) >= 0:
            raise ConfigError(f"finetune.{name} must be >= 0, got {getattr(ft, name)}")
    for name in ("mixup_prob", "switch_prob", "label_smoothing"):
        if not 0 <= getattr(ft, name) <= 1:
            raise ConfigError(f"finetune.{name} must be in [0, 1], got {getattr(ft, name)}")
    if ft.eval_split not in EVAL_SPLITS:
        hint = _closest(ft.eval_split, list(EVAL_SPLITS))
        raise ConfigError(f"finetune.eval_split must be one of {', '.join(EVAL_SPLITS)}, got {ft.eval_split!r}"
                          + (f"; did you mean {hint!r}?" if hint else ""))


# ----------------------------------------------------------------------------------------------
# Field documentation
# ----------------------------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings, read with ``ast``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # pragma: no cover - source not available
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _yaml_value(value: Any) -> str:
    """``value`` spelled as it is typed in YAML and in an override (``null``, ``true``, ``[0.5, 1.0]``,
    ``''`` for the empty string)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.strip().removesuffix("\n...").removesuffix("...").strip()


def describe(cfg: Optional[Config] = None) -> str:
    """Every field with its current value (as YAML: ``null``, ``true``) and docstring, section by
    section."""
    cfg = cfg or Config()
    lines = []
    for sec in dataclasses.fields(Config):
        obj = getattr(cfg, sec.name)
        lines.append(f"[{sec.name}]")
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            lines.append(f"  {sec.name}.{f.name} = {_yaml_value(getattr(obj, f.name))}")
            if docs.get(f.name):
                lines.append(textwrap.fill(docs[f.name], 100, initial_indent="      ",
                                           subsequent_indent="      "))
    return "\n".join(lines)
