"""The ``maskfeat`` command: ``pretrain | finetune | eval | export | data prepare``.

Every training command takes ``--config FILE.yaml`` and any number of dotted overrides
(``data.root=/k400 optim.lr=8e-4``; also accepted as ``--data.root=/k400``). Examples::

    maskfeat pretrain --config configs/demo_pretrain.yaml train.overwrite=true   # as `make demo`
    maskfeat pretrain --config configs/pretrain_mvitv2_l_16x4_k400.yaml data.root=/k400 --resume auto
    maskfeat export runs/demo_pretrain --out runs/demo_pretrain/backbone.safetensors
    maskfeat finetune --config configs/demo_finetune.yaml finetune.pretrained=runs/demo_pretrain/backbone.safetensors
    maskfeat eval --config configs/demo_finetune.yaml --checkpoint runs/demo_finetune
    maskfeat eval --checkpoint runs/demo_finetune   # without --config: the config it was trained with
    maskfeat pretrain --help-config        # every config field with its documentation

Launch the same command under ``torchrun``, the ``deepspeed`` launcher (``--module engine``; the
``--local_rank`` it appends is accepted and ignored, ``LOCAL_RANK`` is read from the environment),
``srun`` or ``mpirun`` for more processes (``python -m engine`` is the module form).

Errors the user can fix end in one paragraph on stderr, ``maskfeat COMMAND: ...``, without a
traceback, and an exit code (also in ``--help``); :data:`EXIT_CODES` lists them. A data error is
:class:`engine.data.errors.DataError` (an empty root, a non-integer label, a label without a class
name, a val class that train lacks: ``datasets.ClassListError``), a BadDatasetError (bad files
under ``data.on_bad_file=error``) or a FileNotFoundError; any other exception is a programming
error and keeps its traceback.
``maskfeat data prepare`` has its own exit codes (``maskfeat data prepare --help``; 5 is a data
error there too).

Python logging (the engine's ``log.info`` / ``log.warning``) is configured by :func:`setup_logging`
at the start of :func:`main`: to stderr, ``2026-11-28 14:03:11 [rank0] WARNING engine.data.loader:
msg``, INFO and up on rank 0, WARNING and up on the other ranks (the rank from ``RANK`` or
``SLURM_PROCID``). A program that configured logging itself (root handlers present) keeps its own.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from engine import signals

__all__ = ["main", "build_parser", "is_data_error", "setup_logging", "EXIT_CODES"]

EXIT_CODES = {0: "done", 1: "data prepare: some files failed to encode or are bad", 2: "bad config or usage",
              3: "stopped on purpose by train.stop_after_steps", 4: "too many non-finite losses or gradients in a row",
              5: "data error (dataset root or list missing, empty or inconsistent; bad files under "
                 "data.on_bad_file=error)",
              6: "out of GPU memory (the message says what to change)",
              7: "a checkpoint could not be written (disk full, read-only folder); the message names the last "
                 "complete one",
              130: "interrupted (Ctrl-C); training: the message names the checkpoint --resume auto continues "
                   "from; data prepare: the videos written are kept, the same command finishes",
              138: "SIGUSR1 (e.g. SLURM's --signal=USR1@300 before the time limit); as 143",
              143: "terminated (SIGTERM, e.g. a scheduler's preemption); training saves a checkpoint at the end "
                   "of the step it is in first (a second signal stops at once); as 130"}
"""Exit status -> meaning, for every command (printed by ``maskfeat --help``)."""
EXIT_DATA_ERROR = 5


def is_data_error(error: BaseException) -> bool:
    """True when ``error`` is about the user's data (module docstring) rather than a bug."""
    from engine.data.errors import DataError
    from engine.data.probe import BadDatasetError

    return isinstance(error, (DataError, BadDatasetError, FileNotFoundError))


def _epilog() -> str:
    examples = __doc__.split("::")[1].split("Launch")[0].rstrip()
    codes = "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())
    return f"examples:{examples}\n\nexit status:\n{codes}\n"


def _split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    overrides, unknown = [], []
    for item in extra:
        if "=" in item and not item.startswith("-"):
            overrides.append(item)
        elif item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]:
            overrides.append(item[2:])
        else:
            unknown.append(item)
    return overrides, unknown


class _Once(argparse.Action):
    """An option that may be given once, and not empty: a second ``-c`` replaced the first silently
    (nothing of the first recipe was used), an empty one (``-c "$UNSET"``) started a default run."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, then {values!r}); one "
                         "recipe per run: put the changes of the second in section.field=value overrides")
        if values == "":
            parser.error(f"{option_string} is empty (an unset variable?)")
        setattr(namespace, self.dest, values)


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` (``parser`` itself when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskfeat", description="MaskFeat pre-training and fine-tuning engine",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("pretrain", "MaskFeat pre-training"), ("finetune", "fine-tune a classifier"),
                        ("eval", "multi-view evaluation of a fine-tuned model")):
        s = sub.add_parser(name, help=help_, description=f"{help_}; trailing section.field=value items override the config")
        s.add_argument("--config", "-c", default=None, action=_Once,
                       help="YAML recipe (configs/*.yaml)" + (" (default: the config the checkpoint was trained "
                                                              "with, when it has one)" if name == "eval" else ""))
        s.add_argument("--help-config", action="store_true", help="print every config field with its doc and exit")
        if name != "eval":
            s.add_argument("--resume", default=None, action=_Once,
                           help="'auto' (newest complete checkpoint in train.output_dir), a tag, a tag folder, "
                                "a run folder or its checkpoints/ (its newest), or checkpoints/latest")
        else:
            s.add_argument("--checkpoint", required=False, default=None,
                           help="run directory (uses best, else latest), checkpoints/<tag> directory, or weights file")
            s.add_argument("--save-predictions", action="store_true",
                           help="also write the view-averaged class probabilities per video to "
                                "<eval.json without .json>.predictions.npz")
    e = sub.add_parser("export", help="consolidated fp32 backbone (safetensors) from a DeepSpeed checkpoint")
    e.add_argument("run_dir", help="run output directory, its checkpoints/ directory, checkpoints/latest or a "
                                   "checkpoints/<tag> directory")
    e.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    e.add_argument("--out", default=None, help="output file (default: <run folder>/backbone.safetensors)")
    e.add_argument("--keep-head", action="store_true", help="keep mask_token and pred_head.* (pre-training only)")
    d = sub.add_parser("data", help="data tools: maskfeat data prepare SRC DST (re-encode; --check validates "
                                    "only; see maskfeat data prepare --help)")
    d.add_argument("data_args", nargs=argparse.REMAINDER)
    return p


def _drop_local_rank(argv: list[str]) -> list[str]:
    """Remove the ``--local_rank=N`` that the deepspeed launcher inserts (LOCAL_RANK is in the env)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(a)
    return out


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``, else an MPI launch's, else
    ``SLURM_PROCID``; 0)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


LOG_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
"""Format of the engine's log records (``{rank}`` is filled in once, at :func:`setup_logging`)."""


def setup_logging(rank: Optional[int] = None, stream=None) -> bool:
    """Send Python logging to ``stream`` (stderr) as ``LOG_FORMAT``: INFO and up from the engine on
    rank 0, WARNING and up elsewhere (other libraries: WARNING and up). ``rank`` defaults to
    :func:`_launch_rank`. Does nothing and returns False when the root logger has handlers already
    (the engine used as a library, or under pytest)."""
    root = logging.getLogger()
    if root.handlers:
        return False
    rank = _launch_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in ("engine", "models"):
        logging.getLogger(name).setLevel(level)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    argv = _drop_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["data"]:
        rest = argv[1:]
        usage = "usage: maskfeat data prepare SRC [DST] [...]  (see maskfeat data prepare --help)"
        if rest[:1] in (["-h"], ["--help"]):
            print(usage)
            return 0
        if rest[:1] != ["prepare"]:
            import difflib

            what = (f"unknown data command {rest[0]!r}" + (" (did you mean 'prepare'?)" if difflib.get_close_matches(
                rest[0], ["prepare"], cutoff=0.6) else "") if rest else "no data command given")
            print(f"{usage}\nmaskfeat data: error: {what}; the one data command is 'prepare'", file=sys.stderr)
            return 2
        from engine.data.prepare import prepare_main

        try:
            return int(prepare_main(rest[1:]) or 0)
        except (FileNotFoundError, ValueError) as e:  # prepare_main reports its DataErrors itself
            if not is_data_error(e):
                raise
            print(f"maskfeat data prepare: data error: {e}", file=sys.stderr)
            return EXIT_DATA_ERROR
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    parser = _command_parser(parser, args.command)  # a usage error shows the command's usage, not the list
    overrides, unknown = _split_overrides(extra)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (overrides look like section.field=value)")
    for name in ("config", "resume", "checkpoint", "run_dir", "out"):  # --resume=~/run: no shell expands it
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.expanduser(getattr(args, name)))

    if args.command == "export":
        from engine.checkpoint import export_backbone, export_source
        from engine.config import ConfigError

        if overrides:  # (they were accepted and ignored)
            parser.error(f"export takes no section.field=value overrides (got {' '.join(overrides)})")

        out = args.out
        try:
            ckpt_dir, _ = export_source(args.run_dir, args.tag)
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "backbone.safetensors")
            res = export_backbone(args.run_dir, out, tag=args.tag, keep_pretrain_head=args.keep_head)
        except (FileNotFoundError, ConfigError) as e:  # missing, or incomplete/damaged (CheckpointError)
            print(f"maskfeat export: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # writing the export: a full disk, a read-only folder, a file in the way
            print(f"maskfeat export: cannot write {out}: {e}", file=sys.stderr)
            return 2
        notes = (["a fine-tuned classifier: exported whole, its head included"
                  + ("; --keep-head concerns pre-training checkpoints only" if args.keep_head else "")]
                 if res["classifier"] else []) + (["replaced the earlier file"] if res["replaced"] else [])
        print(f"exported {res['tensors']} tensors ({res['parameters'] / 1e6:.2f} M parameters) "
              f"from {res['tag']} to {os.path.abspath(res['path'])}" + (f" ({'; '.join(notes)})" if notes else ""))
        return 0

    from engine.config import ConfigError, absolute_paths, describe, load_config

    if args.command == "eval" and not args.checkpoint and not args.help_config:  # (before a notice about it)
        parser.error("--checkpoint is required (a run folder, a checkpoint tag folder or a weights file)")
    base, unresolved = None, False
    if args.command == "eval" and args.config is None and getattr(args, "checkpoint", None):
        # no recipe given: the one the checkpoint was trained with (the defaults are the demo's data
        # and model, which evaluated another dataset than the run's, or refused it)
        from engine.finetune import resolve_checkpoint, trained_config

        try:
            base = trained_config(resolve_checkpoint(args.checkpoint))
        except (ConfigError, OSError, ValueError):  # reported by run_eval, with its own message
            base, unresolved = None, True
        if base is not None and _launch_rank() == 0:
            print(f"maskfeat eval: no --config: using the config {args.checkpoint} was trained with", flush=True)
    try:
        cfg = absolute_paths(load_config(args.config, overrides, base=base))
    except ConfigError as e:
        if base is not None:  # (a field since removed from the engine, say)
            e = ConfigError(f"the config {args.checkpoint} was trained with does not load here ({e}); give the "
                            "recipe with --config")
        print(f"maskfeat {args.command}: config error: {e}", file=sys.stderr)
        return 2
    if args.help_config:
        try:
            print(describe(cfg), flush=True)
        except BrokenPipeError:  # `--help-config | head`: the reader is gone; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # (a --checkpoint that does not resolve, a mistyped path, is run_eval's error: not a missing config)
    if args.command == "eval" and args.config is None and base is None and not unresolved and _launch_rank() == 0:
        print(f"maskfeat eval: no --config, and {args.checkpoint} carries no config (an official .pyth, a plain "
              f".pt): the built-in defaults ({cfg.model.name} on the {cfg.data.dataset} clips); give the recipe with "
              "--config", flush=True)
    if args.config is None and args.command in ("pretrain", "finetune") and _launch_rank() == 0:
        print(f"maskfeat {args.command}: no --config: the built-in defaults ({cfg.model.name} on the "
              f"{cfg.data.dataset} clips, {cfg.schedule.epochs} epochs, into {cfg.train.output_dir}); the recipes are "
              "in configs/ (`--help-config` lists every setting)", flush=True)

    from engine.data.probe import BadDatasetError
    from engine.runner import NonFiniteLossError, SaveError, StopRequested

    on_main = threading.current_thread() is threading.main_thread()
    signals.reset()
    previous = {s: signal.signal(s, signals.handle) for s in signals.SIGNALS} if on_main else {}
    try:
        if args.command == "pretrain":
            from engine.pretrain import run_pretrain

            run_pretrain(cfg, resume=args.resume)
        elif args.command == "finetune":
            from engine.finetune import run_finetune

            run_finetune(cfg, resume=args.resume)
        else:
            from engine.finetune import run_eval

            run_eval(cfg, args.checkpoint, save_predictions=args.save_predictions)
    except ConfigError as e:  # (a damaged checkpoint too: engine.checkpoint.CheckpointError, not the config)
        what = "checkpoint error" if type(e).__name__ == "CheckpointError" else "config error"
        print(f"maskfeat {args.command}: {what}: {e}", file=sys.stderr)
        return 2
    except (BadDatasetError, FileNotFoundError, ValueError) as e:
        # a dataset that is missing, empty, inconsistent or holds bad files: a user error, reported
        # without a traceback; any other ValueError is a bug and keeps its traceback
        if not is_data_error(e):
            raise
        print(f"maskfeat {args.command}: data error: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except StopRequested as e:
        print0(f"maskfeat {args.command}: {e}")
        return 3
    except NonFiniteLossError as e:
        print(f"maskfeat {args.command}: {e}", file=sys.stderr)
        return 4
    except SaveError as e:
        print(f"maskfeat {args.command}: {e}", file=sys.stderr)
        return 7
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        print(f"maskfeat {args.command}: {out_of_memory_hint(cfg, args.command, e)}", file=sys.stderr)
        return 6
    except KeyboardInterrupt as e:  # Ctrl-C, or a scheduler's signal turned into one (engine.signals)
        print0(f"maskfeat {args.command}: {interrupted_hint(cfg, args.command, e)}")
        return e.exit_code if isinstance(e, signals.Terminated) else 130
    finally:
        for s in previous:  # a signal while shutting down (the run is over) is not an error
            signal.signal(s, signal.SIG_IGN)
        _shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def print0(message: str) -> None:
    """A message every rank would print alike (a stop, an interruption): on the first rank only."""
    if _launch_rank() == 0:
        print(message, file=sys.stderr)


def interrupted_hint(cfg, command: str, error: BaseException) -> str:
    """One line for an interrupted run: why, and the checkpoint ``--resume auto`` continues from."""
    from engine.checkpoint import find_latest

    why = f"terminated ({error.name})" if isinstance(error, signals.Terminated) else "interrupted"
    if isinstance(error, signals.Terminated) and error.saved:
        why += f" after saving {error.saved}, the step it came in (or the next, after that step's forward pass)"
    if command == "eval":
        return why
    latest = find_latest(cfg.train.output_dir, resumable=True)
    return (f"{why}; the last complete checkpoint is {latest} (rerun with --resume auto to continue from it)"
            if latest else f"{why} before the first checkpoint of {cfg.train.output_dir}")


def out_of_memory_hint(cfg, command: str, error: BaseException) -> str:
    """One paragraph for a run that ran out of GPU memory: torch's first line, what to change in the
    config, and where the last complete checkpoint is."""
    from engine.checkpoint import find_latest

    first = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
    batch = cfg.data.batch_size
    ev = ("data.eval_batch_size", cfg.data.eval_batch_size) if cfg.data.eval_batch_size else ("data.batch_size", batch)
    if command == "eval":  # (evaluation batches hold data.eval_batch_size views when it is set)
        fix = f"lower {ev[0]} (now {ev[1]})"
    else:
        ac = cfg.model.activation_checkpointing
        fix = (f"lower data.batch_size (now {batch} per GPU; the LR follows the global batch)"
               + ("" if ac is True else
                  f", or recompute {'more ' if ac else ''}blocks in backward instead of keeping their activations: "
                  f"model.activation_checkpointing=N for the first N blocks (now {int(ac)}), =true for all "
                  f"(`python -m bench.model_step --count-only --model {cfg.model.name} --batch {batch} --backends "
                  "auto,auto+ckpt` counts what each keeps)")
               + (f"; if it ran out in an evaluation, lower {ev[0]} (now {ev[1]})"
                  if command == "finetune" and cfg.data.eval_batch_size else ""))
    latest = find_latest(cfg.train.output_dir, resumable=True) if command != "eval" else None
    return (f"out of GPU memory: {first}. To fit, {fix}."
            + (f" The last complete checkpoint is {latest} (--resume auto continues from it)." if latest else ""))


def _shutdown() -> None:
    try:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
