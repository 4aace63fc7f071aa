"""The shell scripts of bench/ parse, and the GPU-machine ones refuse bad arguments clearly.

They only run for real on that machine (bench/NOTES.md has the plan), so CI checks what it can
here: bash syntax, the usage errors, and gpu_wheels' reassembly of split DALI parts.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench/gpu_check", "bench/gpu_wheels", "bench/triton_versions"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script,arg", [("bench/gpu_check", "everything"), ("bench/gpu_wheels", "upload")])
def test_usage_errors(script, arg):
    proc = subprocess.run([str(ROOT / script), arg], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_gpu_wheels_install_reassembles_and_verifies_parts(tmp_path):
    """A copy of the repo's script in a scratch tree: split 'wheels' are joined, checked against
    the manifest and handed to pip (a stand-in that records its arguments); a missing part is
    reported and nothing is installed from it."""
    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "gpu_wheels"
    script.write_text((ROOT / "bench" / "gpu_wheels").read_text())
    script.chmod(0o755)
    stage = tmp_path / "stage" / "wheels"
    stage.mkdir(parents=True)
    (stage / "a-1.0-py3-none-any.whl").write_bytes(os.urandom(3000))
    subprocess.run(["tar", "-C", str(tmp_path / "stage"), "-cf", str(tmp_path / "dali.tar"), "wheels"], check=True)
    parts = tmp_path / ".whl-dali"
    parts.mkdir()
    subprocess.run(["split", "-b", "1500", "-d", "-a", "2", str(tmp_path / "dali.tar"), str(parts / "part_")], check=True)
    names = sorted(p.name for p in parts.iterdir())
    manifest = "".join(f"{hashlib.sha256((parts / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    (parts / "MANIFEST").write_text(manifest)
    (parts / "TAR_SHA256").write_text(hashlib.sha256((tmp_path / "dali.tar").read_bytes()).hexdigest() + "\n")
    log = tmp_path / "pip.log"
    fake = tmp_path / "fakepy"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    env = dict(os.environ, PY_THERE=str(fake))

    proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("export PYTHONPATH=") and f"installed DALI from {len(names)} parts" in proc.stderr
    assert "a-1.0-py3-none-any.whl" in log.read_text()

    # installed once: the next call (a warm machine) does not reinstall ~240 MB within its deadline
    log.unlink()
    proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "DALI is installed already" in proc.stderr and not log.exists()
    (tmp_path / ".whl").mkdir()  # the engine's wheels likewise, until one of them changes
    (tmp_path / ".whl" / "b-1.0-py3-none-any.whl").write_bytes(b"b1")
    for want in ("installed 1 wheels from .whl", "the 1 wheels of .whl are installed already"):
        proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert proc.returncode == 0 and want in proc.stderr, proc.stderr
    (tmp_path / ".whl" / "b-1.0-py3-none-any.whl").write_bytes(b"b2")
    proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "installed 1 wheels from .whl" in proc.stderr
    shutil.rmtree(tmp_path / ".whl")
    log.unlink()
    # a stray part from an earlier fetch is not joined (it failed the tar check, and the script exited
    # before the export line, so the .whl packages were not importable either)
    shutil.rmtree(tmp_path / ".gpu-site")
    (parts / "part_99").write_text("stale")
    proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and f"installed DALI from {len(names)} parts" in proc.stderr, proc.stderr
    # parts that verify but do not reassemble: DALI is left out, the export line still comes
    shutil.rmtree(tmp_path / ".gpu-site")
    (parts / "TAR_SHA256").write_text("0" * 64 + "\n")
    proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("export PYTHONPATH=") and "DALI left out" in proc.stderr

    log.unlink()
    shutil.rmtree(tmp_path / ".gpu-site")
    (parts / names[-1]).unlink()
    proc = subprocess.run([str(script), "install"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "missing or damaged" in proc.stderr
    assert not log.exists()


def test_gpu_check_writes_a_step_to_out_as_it_runs(tmp_path):
    """A step's output went to /tmp and was copied into $OUT/steps.log when the step ended: a call the
    device tool stopped early (its limit below the deadline) came back with nothing of that step."""
    script, py = _gpu_check_copy(tmp_path, 'case "$*" in *pytest*) echo step-says-hello; sleep 30; exit 0 ;; esac')
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(py), T_TESTS="10")  # (its own timeout then
    proc = subprocess.run(["timeout", "8", str(script), "first"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=60)  # ends the step's sleep 2 s later: in its own process group)
    assert proc.returncode == 124
    log = (tmp_path / "out" / "steps.log").read_text()
    assert "=== gpu_tests: " in log and "step-says-hello" in log, log[-2000:]


@pytest.mark.parametrize("part,want", [
    ("first", {"gpu_tests", "bench_attention_b4", "engine_tests", "bench_pool_conv", "bench_model_step"}),
    ("kernels", {"gpu_tests", "bench_hog", "bench_attention", "bench_attention_b4", "bench_attention_host",
                 "bench_attention_tune"}),
    ("engine", {"engine_tests", "bench_data", "bench_pool_conv", "bench_model_step"}),
])
def test_gpu_check_parts_run_their_steps(tmp_path, part, want):
    """Each part of bench/gpu_check runs its own steps (every step's limit is 1 s here, so each is
    cut short at once; the summary still says which ran). In a scratch copy of the script, so no
    wheels folder of this tree is installed."""
    script, py = _gpu_check_copy(tmp_path, "")
    limits = {f"T_{n}": "1" for n in ("TESTS", "HOG", "ATTN", "ATTN_B4", "ATTN_HOST", "TUNE", "DATA", "ENGINE", "POOL", "MODEL")}
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(py), **limits)
    proc = subprocess.run([str(script), part], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    summary = proc.stdout.split("=== summary ===")[1].splitlines()
    ran = {line.split()[0] for line in summary if line.strip() and " rc=" in line}
    assert ran == want, proc.stdout[-3000:]


def _gpu_check_copy(tmp_path, python_body: str) -> tuple:
    """A scratch copy of bench/gpu_check and a PYTHON stand-in (a bash script: ``python_body``,
    then this interpreter for everything else)."""
    import sys

    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "gpu_check"
    script.write_bytes((ROOT / "bench" / "gpu_check").read_bytes())
    script.chmod(0o755)
    py = tmp_path / "py"
    py.write_text(f"#!/bin/bash\n{python_body}\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    return script, py


def test_gpu_check_first_runs_the_engine_tests_only_with_dali(tmp_path):
    """Every engine GPU test needs DALI, which takes four earlier calls to carry: without it the
    one-call selection leaves the step out instead of spending its time on skips."""
    script, py = _gpu_check_copy(tmp_path, 'case "$*" in *"import nvidia.dali"*) exit 1 ;; esac')
    limits = {f"T_{n}": "1" for n in ("TESTS", "ATTN_B4", "ENGINE", "POOL", "MODEL")}
    proc = subprocess.run([str(script), "first"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(py), **limits))
    summary = proc.stdout.split("=== summary ===")[1]
    assert "engine_tests     not run" in summary and "bench_model_step rc=" in summary, proc.stdout[-3000:]


@pytest.mark.parametrize("part", ["first", "tune"])
def test_gpu_check_exit_status_says_whether_a_step_failed(tmp_path, part):
    """The exit status was the last summary loop's test: 1 after a perfect `tune` (no model_step
    table), 0 after failed tests when a model_step table existed. Now 1 exactly when a step that ran
    failed. The wheels are installed only for the parts whose steps use them (not `tune`, nor
    `first` without DALI's parts): their install counted against the deadline for nothing."""
    script, py = _gpu_check_copy(tmp_path, 'case "$*" in *"import nvidia.dali"*) exit 1 ;; '
                                 '*"-m pytest"*) exit "${FAIL_TESTS:-0}" ;; *bench.*) exit 0 ;; esac')
    (tmp_path / ".whl").mkdir()  # an install would fail here (no bench/gpu_wheels in the copy): it must not run
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(py), TUNE_STAGES="1")
    ok = subprocess.run([str(script), part], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert ok.returncode == 0 and "gpu_wheels install failed" not in ok.stderr, (ok.stdout[-2000:], ok.stderr[-2000:])
    bad = subprocess.run([str(script), part], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=dict(env, FAIL_TESTS="1"))
    assert bad.returncode == 1 and "failed steps:" in bad.stdout, bad.stdout[-2000:]


def test_gpu_check_steps_stop_at_the_deadline(tmp_path):
    """Each step's limit is cut to what is left of DEADLINE from the start, and a step with less
    than 15 s left is skipped and said so (the device tool stops a call at 600 s, and the summary
    would be lost with it). GPU_CHECK_ELAPSED starts the script's clock late: no waiting."""
    import re

    script, py = _gpu_check_copy(tmp_path, 'case "$*" in *pytest*|*bench.*) exit 0 ;; esac')  # steps end at once

    def run(elapsed: int) -> str:
        proc = subprocess.run([str(script), "first"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env=dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(py), DEADLINE="600",
                                       GPU_CHECK_ELAPSED=str(elapsed)))
        return proc.stdout

    out = run(500)  # 100 s left less the start-up: first's 150 s for the tests is cut to that (a slow
    limit = re.search(r"=== gpu_tests \(limit (\d+)s\)", out)  # start-up on a busy machine: up to 85 s)
    assert limit and 15 <= int(limit.group(1)) <= 100, out[-3000:]
    assert "skipped" not in out.split("=== summary ===")[1], out[-3000:]
    summary = run(590).split("=== summary ===")[1]  # under 15 s left: every step is skipped
    for name in ("gpu_tests", "bench_attention_b4", "bench_pool_conv", "bench_model_step"):
        assert re.search(rf"{name} +skipped \(deadline\)", summary), summary