"""Stopping on a scheduler's signal: SIGTERM (preemption, ``scancel``, the time limit) and SIGUSR1
(SLURM's ``--signal=USR1@300``, a warning ahead of the limit).

Outside a training loop the first signal stops at once (:class:`Terminated`, exit ``128 + signal``),
as Ctrl-C does (its copy within ``REPEAT_S`` is ignored while the run unwinds: a second
``Terminated`` raised in the first one's handling ended the run with a traceback). Inside one
(:func:`save_on_signal`), the first asks for a checkpoint: the loop ends the step it is in, every
rank agrees through that step's all-reduce (a rank that got no signal follows the others; a signal
after that all-reduce, which follows the forward pass, counts at the next step's), the step is
saved, then the run stops with :class:`Terminated` naming the tag.
A second signal stops at once: a save that would outlast the scheduler's grace period (SLURM's
``KillWait``, 30 s by default) is cut short by its SIGKILL anyway, and the atomic save then leaves
the previous checkpoint as the latest complete one. (A repeat of the first within ``REPEAT_S`` is
the same request: SLURM signals every process of a step and torchrun forwards its own copy. torchrun
forwards SIGUSR1 only when asked: ``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``.)

No torch here: the CLI installs the handler before anything heavy is imported.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Iterator, Optional

__all__ = ["Terminated", "handle", "save_on_signal", "immediate", "requested", "reset", "SIGNALS"]

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
"""The signals :func:`handle` is installed for (SIGUSR1 where the platform has it)."""

_state = {"armed": False, "signum": 0, "at": 0.0, "raised": 0, "raised_at": 0.0}
REPEAT_S = 5.0
"""A repeat of the first signal within this many seconds is the same request: SLURM signals every
process of a step, and torchrun forwards what it gets to its workers, so each worker gets it twice."""


class Terminated(KeyboardInterrupt):
    """A scheduler's signal, raised where the main thread is, so that the run ends like Ctrl-C: the
    message says where the last complete checkpoint is. ``saved``: the tag saved on the signal."""

    def __init__(self, signum: int = signal.SIGTERM, saved: Optional[str] = None):
        super().__init__(signum, saved)
        self.signum, self.saved = int(signum), saved

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def handle(signum, frame) -> None:
    """The handler: a first signal inside a training loop asks it to save and stop (a repeat of it
    within :data:`REPEAT_S` is the same request); any other raises."""
    now = time.monotonic()
    if _state["armed"] and not _state["signum"]:
        _state["signum"], _state["at"] = int(signum), now
        if os.environ.get("RANK", "0") == "0":
            try:  # (a handler run inside a blocked write to stderr: "reentrant call", which must not end the step)
                print(f"{Terminated(signum).name}: saving a checkpoint after this step, then stopping (send it "
                      f"again after {REPEAT_S:.0f} s to stop at once)", file=sys.stderr, flush=True)
            except (RuntimeError, OSError):
                pass
        return
    if _state["armed"] and int(signum) == _state["signum"] and now - _state["at"] < REPEAT_S:
        return  # the launcher's copy of the same signal
    if int(signum) == _state["raised"] and now - _state["raised_at"] < REPEAT_S:
        return  # the copy of a signal that is already stopping the run (outside a loop: while it unwinds)
    _state["raised"], _state["raised_at"] = int(signum), now
    raise Terminated(signum)


def requested(default: int = 0) -> int:
    """The signal a training loop was asked to stop on, or ``default`` (another rank's request: a
    rank without one of its own stops on the all-reduced flag)."""
    return _state["signum"] or int(default)


def reset() -> None:
    """Forget earlier signals (a run starting: the CLI installs :func:`handle`)."""
    _state.update(armed=False, signum=0, at=0.0, raised=0, raised_at=0.0)


@contextlib.contextmanager
def save_on_signal() -> Iterator[None]:
    """While the body runs, a first signal is a request (:func:`requested`) rather than a stop; once it
    stops the loop, its copies within ``REPEAT_S`` are ignored while the run unwinds."""
    _state["armed"], _state["signum"], _state["raised"] = True, 0, 0
    try:
        yield
    finally:
        if _state["signum"]:
            _state["raised"], _state["raised_at"] = _state["signum"], _state["at"]
        _state["armed"], _state["signum"] = False, 0


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside :func:`save_on_signal`, a stretch where a signal stops at once (an evaluation between
    epochs: the epoch is already saved, and it has no step boundary to stop at)."""
    armed, _state["armed"] = _state["armed"], False
    try:
        yield
    finally:
        _state["armed"] = armed
