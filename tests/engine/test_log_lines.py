"""What a run prints: the progress bar only on a terminal, plain progress lines otherwise
(engine/logging.py), and Python logging configured by the CLI (engine/cli.py ``setup_logging``)."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from engine.cli import setup_logging
from engine.logging import RunLogger, work_progress

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = {"loss": 0.51234, "lr": 3.2e-4, "grad_norm": 1.5, "clips_per_s": 85.27, "memory_gb": 12.34,
         "epoch": 1.2, "nonfinite_total": 0}
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 120/3000 epoch 1.20 loss 0.5123 lr 0.00032 "
                  r"clips/s 85.3 ETA \d+:\d\d:\d\d mem 12.3 GB$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _logger(tmp_path, **kw) -> RunLogger:
    kw.setdefault("enabled", True)
    return RunLogger(str(tmp_path), total_steps=3000, tensorboard=False, jsonl=False, **kw)


@pytest.mark.parametrize("progress_bar", [True, False])
def test_without_a_terminal_each_logged_step_is_one_plain_line(tmp_path, capsys, progress_bar):
    log = _logger(tmp_path, progress_bar=progress_bar)  # capsys: stderr is not a terminal
    assert log.bar is None
    for _ in range(3):
        log.step(1, loss=0.5, lr=3e-4, clips_s=80.0)  # between logged steps: nothing
    log.scalars(120, TRAIN)
    log.scalars(120, {"top1": 50.0, "top5": 80.0}, prefix="val")  # the caller prints val results
    log.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), err


def test_on_a_terminal_the_bar_is_kept(tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    log = _logger(tmp_path, progress_bar=True)
    assert log.bar is not None and not log.plain
    log.step(1, loss=0.5)
    log.scalars(1, TRAIN)
    log.close()
    assert "step 1/3000" not in term.getvalue()  # no plain line beside the bar
    # each redraw shows the values of the step it advances to (it drew the previous step's: the
    # bar's lr lagged the logged one by a log interval)
    log = _logger(tmp_path, progress_bar=True)
    log.bar.mininterval, log.bar.miniters, log.bar.dynamic_miniters = 0, 0, False  # redraw at every update
    for i in range(3):
        log.step(1, lr=float(i + 1))
        # (rstrip: tqdm pads a redraw shorter than the last one, e.g. when the rate has fewer digits)
        assert term.getvalue().split("\r")[-1].rstrip().endswith(f"lr={i + 1}]"), term.getvalue()[-300:]
    log.close()
    assert _logger(tmp_path, progress_bar=False).bar is None  # switched off: lines, even on a terminal


def test_a_terminal_of_no_width_gets_the_plain_lines(tmp_path, monkeypatch):
    """A terminal of 0 columns (``script``, ``docker run -t`` from CI, a Kubernetes tty): tqdm drew
    nothing there, and no plain line was written either: the run showed no progress at all."""
    class Sized(_Terminal):
        def fileno(self) -> int:
            return 2

    term = Sized()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=1: os.terminal_size((0, 0)))
    log = _logger(tmp_path, progress_bar=True)
    assert log.bar is None
    log.scalars(120, TRAIN)
    log.close()
    assert LINE.match(term.getvalue().splitlines()[0]), term.getvalue()
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=1: os.terminal_size((120, 40)))
    log = _logger(tmp_path, progress_bar=True)
    assert log.bar is not None  # a terminal of some width keeps the bar
    log.close()


def test_other_ranks_print_nothing(tmp_path, capsys):
    log = _logger(tmp_path, enabled=False)
    log.scalars(120, TRAIN)
    log.write("x")
    assert capsys.readouterr().err == ""


def test_eta_uses_the_rate_since_the_first_logged_step(tmp_path):
    log = _logger(tmp_path, progress_bar=False, initial_step=100)
    t0 = log._t_ref
    # first line: 20 steps in 40 s since the start -> 2 s/step x 2880 left = 1:36:00
    first = log.progress_line(120, TRAIN, now=t0 + 40)
    assert "ETA 1:36:00" in first
    # later lines: the rate since the first line (start-up left out): 10 steps in 5 s, 2870 left
    assert "ETA 0:23:55" in log.progress_line(130, TRAIN, now=t0 + 45)
    assert "skipped 2" in log.progress_line(140, dict(TRAIN, nonfinite_total=2), now=t0 + 50)
    bare = log.progress_line(150, {"loss": float("nan")}, now=t0 + 55)
    assert "loss nan" in bare and "mem" not in bare and "lr" not in bare


def test_long_work_prints_plain_lines_without_a_terminal(monkeypatch, capsys):
    """``data prepare``'s and the probe's progress away from a terminal: timed lines and one at the
    end (they printed nothing for the hours of a Kinetics prepare under SLURM)."""
    with work_progress(5, "prepare", "video", every_s=0.0) as bar:
        for _ in range(5):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5  # one per update (every_s 0); the last was the final count (not printed twice)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d prepare: 2/5 videos \(40\.0%\) \S+/s ETA \d+:\d\d:\d\d",
                        lines[1]), lines[1]
    assert "prepare: 5/5 videos (100.0%)" in lines[-1] and "ETA" not in lines[-1]

    with work_progress(5, "probe", "file") as bar:  # every 60 s, and a second's work: nothing at all
        bar.update(3)
    assert capsys.readouterr().err == ""
    clock = iter([0.0, 0.0, 12.0])  # start, the update, the end: 12 s without a line -> the final one
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    with work_progress(5, "probe", "file") as bar:
        bar.update(3)
    monkeypatch.undo()
    assert capsys.readouterr().err.count("probe: 3/5 files") == 1
    with work_progress(5, "probe", "file", enabled=False, every_s=0.0) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(sys, "stderr", _Terminal())
    with work_progress(5, "probe", "file") as bar:
        assert type(bar).__name__ == "tqdm"
        bar.update(5)


def test_setup_logging_leaves_a_configured_root_alone():
    root = logging.getLogger()
    before = list(root.handlers)
    assert before  # pytest's capture handlers
    assert setup_logging(rank=0) is False and root.handlers == before


def _run_cli(env_extra: dict) -> str:
    code = ("import logging, engine.cli as c; assert c.main(['pretrain', '--help-config']) == 0; "
            "g = logging.getLogger('engine.data.loader'); g.info('data demo/train: 4 videos'); "
            "g.warning('careful'); logging.getLogger('other.lib').info('noise')")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    env.update(env_extra, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_cli_logs_info_on_rank_0_and_warnings_elsewhere_with_rank_and_time():
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    err = _run_cli({})
    assert re.search(rf"^{stamp} \[rank0\] INFO engine.data.loader: data demo/train: 4 videos$", err, re.M), err
    assert re.search(rf"^{stamp} \[rank0\] WARNING engine.data.loader: careful$", err, re.M), err
    assert "noise" not in err  # other libraries: warnings only
    err = _run_cli({"SLURM_PROCID": "3"})
    assert "4 videos" not in err
    assert re.search(rf"^{stamp} \[rank3\] WARNING engine.data.loader: careful$", err, re.M), err
    assert "[rank1] WARNING" in _run_cli({"RANK": "1", "SLURM_PROCID": "3"})  # the launcher's RANK first


def test_a_full_disk_under_metrics_is_a_warning_not_a_crash_of_rank_0(tmp_path, capsys):
    """Only rank 0 writes metrics.jsonl: a full disk there raised on rank 0 alone (a traceback, exit 1)
    while the other ranks waited in the step's all-reduce. It is said once and the file left off; the
    next checkpoint save then fails on every rank, as designed."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    os.symlink("/dev/full", tmp_path / "metrics.jsonl")
    log = RunLogger(str(tmp_path), enabled=True, total_steps=10, tensorboard=False, jsonl=True, progress_bar=False)
    log.scalars(1, {"loss": 1.0})
    log.scalars(2, {"loss": 0.5})
    err = capsys.readouterr().err
    assert err.count("warning: writing metrics.jsonl") == 1 and "No space left on device" in err
    assert log.jsonl is None and "step 2/10" in err  # the plain progress lines go on


def test_a_full_disk_at_tensorboards_flush_is_a_warning_too(tmp_path, capsys, monkeypatch):
    """TensorBoard's writer thread keeps a write error until a flush: at the run's end RunLogger.close()
    raised it on rank 0 alone, after the final checkpoint."""
    import errno

    from torch.utils.tensorboard import SummaryWriter

    log = RunLogger(str(tmp_path), enabled=True, total_steps=10, tensorboard=True, jsonl=True, progress_bar=False)
    log.scalars(1, {"loss": 1.0})

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "flush", full)
    log.close()  # no raise
    err = capsys.readouterr().err
    assert "warning: writing TensorBoard (tb/)" in err and "No space left on device" in err
    assert log.tb is None and log.jsonl is None
