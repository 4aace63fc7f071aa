"""Run output: a tqdm progress bar (clips/s, ETA) or plain progress lines, TensorBoard scalars and
a JSON-lines file.

Only rank 0 writes. The tqdm bar is drawn only when stderr is a terminal: to a file (a redirect,
SLURM's log) its ``\\r`` updates would pile up into one line of megabytes. Otherwise, and with
``log.progress_bar=false``, each logged training step (every ``log.every_steps``, the
:meth:`RunLogger.scalars` calls with ``prefix="train"``) prints one line to stderr::

    2026-11-28 14:03:11 step 120/3000 epoch 1.20 loss 0.5123 lr 0.00032 clips/s 85.3 ETA 1:02:03 mem 12.3 GB

ETA = remaining steps at the mean rate since the first logged step of this process (start-up and
compilation are left out once a step has been logged; the first line counts from the start).

TensorBoard goes through ``torch.utils.tensorboard`` into ``<output_dir>/tb``; metrics go to
``<output_dir>/metrics.jsonl``, one object per logged step (``{"step": …, "split": "train"|"val",
"time": …, "loss": …, …}``), appended so a resumed run continues the same file. Memory is the
peak CUDA allocation on GPU and the process's peak RSS on CPU.

Training scalars (``engine.runner.train_loop``): ``loss`` is the mean over the global batch (the
ranks' batch-mean losses averaged over ranks, by the same all-reduce that checks for non-finite
losses; ``"nan"`` for a skipped step); ``lr`` the peak-group LR; ``grad_norm`` the global gradient
norm before clipping; ``clips_per_s`` over all ranks; ``memory_gb`` rank 0's peak; ``epoch`` the
fraction of training in epochs (``step / steps_per_epoch``); ``nonfinite_total`` skipped steps.

Resume (``resume_step``, ``resume_epoch``): records logged after the checkpoint come from the
stretch between it and the interruption, which is trained again; they are dropped from
``metrics.jsonl`` (the file is rewritten atomically at start; a torn last line is dropped too):
those whose ``epoch`` exceeds the checkpoint's (training and validation records carry it), and
records without one by ``step`` > ``resume_step``. TensorBoard is opened with ``purge_step =
resume_step + 1``, which makes TensorBoard hide the older events from that step on (they stay in
the old event files). A fresh start passes ``resume_step=0`` (``engine.runner``): what a run that
died before its first checkpoint logged is dropped, so that the file holds one run. A resume with
another world size or per-rank batch rescales the step count (``engine.runner``): the records up
to the checkpoint are kept (by epoch: old-unit step numbers above the new checkpoint's were
trained before it), the steps before and after are in different units (the numbers may even
repeat), while ``epoch`` stays comparable across the change. TensorBoard's purge stays by step
(it has no other), so it may hide old-unit events there.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Optional

import torch

__all__ = ["RunLogger", "peak_memory_gb", "truncate_metrics", "work_progress"]


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


def truncate_metrics(path: str, after_step: int, after_epoch: Optional[float] = None) -> int:
    """Drop the records of ``path`` (JSON lines) logged after the checkpoint a run resumes from:
    with ``after_epoch`` (the checkpoint's position in epochs), those whose ``epoch`` exceeds it;
    records without an ``epoch``, or without ``after_epoch``, by ``step`` > ``after_step``. Epochs
    stay comparable across a step rescale (another global batch), step numbers do not: by step, a
    second resume dropped records of the old unit that were trained before its checkpoint. Lines
    that do not parse (a write cut short by a kill) go too. The file is replaced atomically; returns
    the number of lines dropped (0 and no rewrite when there is nothing to drop or no file)."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                if after_epoch is not None and isinstance(rec.get("epoch"), (int, float)):
                    ok = float(rec["epoch"]) <= after_epoch + 1e-9
                else:
                    ok = int(rec["step"]) <= after_step
                ok = ok and line.endswith("\n")
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
    if dropped:
        from engine.checkpoint import write_text_atomic

        write_text_atomic(path, "".join(keep))
    return dropped


def _is_terminal(stream) -> bool:
    """True when ``stream`` is an interactive terminal of some width (a progress bar can redraw in
    place); a terminal of 0 columns (``script``, ``docker run -t`` from CI, a Kubernetes tty) gets the
    plain lines: tqdm drew nothing in it, and no line was written either."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # a terminal without a file descriptor or size: as it says
        return True


def _hms(seconds: float) -> str:
    """``H:MM:SS`` (days folded into hours)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _ProgressLines:
    """:func:`work_progress` away from a terminal: a line at most every ``every_s`` seconds and one
    at the end (not after a few seconds' work), ``<desc>: 1200/240000 videos (0.5%) 12.3/s ETA 5:24:00``."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float, stream) -> None:
        self.total, self.desc, self.unit, self.every_s, self.stream = total, desc, unit, every_s, stream
        self.n = self.shown = 0
        self.t0 = self.t_last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self.t_last >= self.every_s:
            self.t_last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.shown = self.n
        rate = self.n / (now - self.t0) if now > self.t0 else 0.0
        pct = f" ({100 * self.n / self.total:.1f}%)" if self.total else ""
        eta = f" ETA {_hms((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.desc}: {self.n}/{self.total} {self.unit}s{pct} "
              f"{rate:.3g}/s{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        """The final line, unless the work was short (under ``min(10 s, every_s)``) and said nothing before."""
        now = time.monotonic()
        said = self.t_last != self.t0
        if (self.n and self.stream is not None and self.t_last != -1.0 and self.shown != self.n
                and (said or now - self.t0 >= min(10.0, self.every_s))):
            self._line(now)
        self.t_last = -1.0  # closed: one final line only

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def work_progress(total: int, desc: str, unit: str, enabled: bool = True, every_s: float = 60.0):
    """Progress of a long job of ``total`` items (``update(n)``, ``close()``, a context manager):
    a tqdm bar on stderr when it is a terminal, else a plain line at most every ``every_s`` seconds
    and one at the end when the work took 10 s or more (SLURM logs and redirects: a bar's ``\\r`` updates pile up into one line
    there, and nothing at all for hours of ``data prepare`` tells nobody anything). ``enabled``
    False: nothing is printed."""
    if enabled and _is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    return _ProgressLines(total, desc, unit, every_s, sys.stderr if enabled else None)


class RunLogger:
    """Progress bar + TensorBoard + JSON lines for one run (no-op on ranks other than 0)."""

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        progress_bar: bool = True,
        tensorboard: bool = True,
        jsonl: bool = True,
        desc: str = "train",
        resume_step: Optional[int] = None,
        resume_epoch: Optional[float] = None,
    ) -> None:
        """``resume_step``: the step a resumed run continues after (module docstring); None for a
        fresh run (nothing is dropped). ``resume_epoch``: that checkpoint's position in epochs
        (:func:`truncate_metrics`)."""
        self.enabled = enabled
        self.output_dir = output_dir
        self.tb = None
        self.jsonl = None
        self.bar = None
        self.tb_dir = os.path.join(output_dir, "tb")
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self._t_ref, self._step_ref, self._first_logged = time.time(), initial_step, False
        self.plain = not (progress_bar and _is_terminal(sys.stderr))
        """One line per logged step instead of the bar (module docstring)."""
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.tb_dir, purge_step=None if resume_step is None else resume_step + 1)
        if jsonl:
            if resume_step is not None:
                n = truncate_metrics(self.jsonl_path, resume_step, resume_epoch)
                if n:
                    at = f"step {resume_step}" + ("" if resume_epoch is None else f", epoch {resume_epoch:.4g}")
                    print(f"metrics.jsonl: dropped {n} records after {at} (logged past the checkpoint resumed "
                          "from; those steps run again)", file=sys.stderr, flush=True)
            self.jsonl = open(self.jsonl_path, "a", buffering=1)
        if not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def step(self, n: int = 1, **postfix) -> None:
        """Advance the bar by ``n`` steps and show ``postfix`` (e.g. loss, clips/s)."""
        if self.bar is not None:
            if postfix:  # before the update, whose refresh draws it (after it, the bar showed the last step's)
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                      for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        """Write scalars to TensorBoard (``prefix/name``) and one JSON line."""
        if not self.enabled:
            return
        if self.tb is not None:
            try:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        self.tb.add_scalar(f"{prefix}/{k}", v, step)
            except OSError as e:
                self._stop_writing("tb", e)
        if self.jsonl is not None:
            rec = {"step": step, "split": prefix, "time": time.time()}
            rec.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                        for k, v in values.items()})
            try:
                self.jsonl.write(json.dumps(rec) + "\n")
            except OSError as e:
                self._stop_writing("jsonl", e)
        if self.plain and prefix == "train":
            print(self.progress_line(step, values), file=sys.stderr, flush=True)

    def _stop_writing(self, which: str, error: OSError) -> None:
        """A metrics file that cannot be written (a full disk, a quota): said once, then left off. Only
        rank 0 writes, so raising here stopped it alone, with a traceback, while the other ranks waited
        in the step's collective; the next checkpoint save then fails on every rank (exit 7, naming the
        last complete checkpoint)."""
        name = "TensorBoard (tb/)" if which == "tb" else "metrics.jsonl"
        print(f"warning: writing {name} in {self.output_dir} failed ({type(error).__name__}: {error}); it is "
              "not written from here on (free space, then --resume auto from the last checkpoint)",
              file=sys.stderr, flush=True)
        handle = getattr(self, which)
        setattr(self, which, None)
        try:
            handle.close()
        except OSError:  # its buffer cannot be written either (the handle goes with the process)
            pass

    def progress_line(self, step: int, values: dict, now: Optional[float] = None) -> str:
        """The plain progress line of training step ``step`` (module docstring) from the scalars
        ``values`` (``loss``, ``lr``, ``clips_per_s``, ``memory_gb``, ``epoch``, ``nonfinite_total``;
        absent ones are left out). Advances the ETA's reference point after the first call."""
        now = time.time() if now is None else now
        parts = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), f"step {step}/{self.total_steps}"]
        fmt = {"epoch": ("epoch", "{:.2f}"), "loss": ("loss", "{:.4g}"), "lr": ("lr", "{:.3g}"),
               "clips_per_s": ("clips/s", "{:.1f}")}
        for key, (label, spec) in fmt.items():
            v = values.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{label} {spec.format(v)}")
        done, left = step - self._step_ref, self.total_steps - step
        if done > 0 and now > self._t_ref and left >= 0:
            parts.append(f"ETA {_hms(left * (now - self._t_ref) / done)}")
        mem = values.get("memory_gb")
        if isinstance(mem, (int, float)) and not isinstance(mem, bool):
            parts.append(f"mem {mem:.1f} GB")
        if values.get("nonfinite_total"):
            parts.append(f"skipped {values['nonfinite_total']}")
        if not self._first_logged:  # rate from here on: start-up and compilation left out
            self._t_ref, self._step_ref, self._first_logged = now, step, True
        return " ".join(parts)

    def write(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            try:  # TensorBoard's writer thread raises a full disk here, at its flush
                self.tb.flush()
                self.tb.close()
                self.tb = None
            except OSError as e:
                self._stop_writing("tb", e)
        if self.jsonl is not None:
            try:
                self.jsonl.close()
                self.jsonl = None
            except OSError as e:
                self._stop_writing("jsonl", e)

