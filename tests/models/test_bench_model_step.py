"""``bench.model_step`` (a whole MaskFeat pre-training step per attention backend; on a GPU also
the CPU time to issue it) runs end to end on the CPU with the tiny variant."""
from __future__ import annotations

import json

import pytest

from bench import model_step


def test_model_step_bench_runs_on_cpu(tmp_path):
    model_step.main(["--device", "cpu", "--steps", "2", "--backends", "auto,sdpa", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("model_step_cpu_*.json")).read_text())
    assert report["model"] == "mvitv2_tiny" and report["batch"] == 2
    rows = report["results"]
    assert [r["backend"] for r in rows] == ["auto", "sdpa"]  # auto@jit: CUDA only
    for r in rows:
        assert r["step_ms"] > 0 and r["host_ms"] == r["step_ms"] and r["host_over_step"] == 1.0
        assert r["torch_ops"] > 100 and r["triton_launches"] == 0  # CPU: HOG and attention run in torch
    assert "| auto |" in next(tmp_path.glob("model_step_cpu_*.md")).read_text()


def test_model_step_bench_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--backends"):
        model_step.main(["--device", "cpu", "--backends", "flash", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps"):
        model_step.main(["--device", "cpu", "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="mvitv2_l_16x4"):  # the close valid names
        model_step.main(["--device", "cpu", "--model", "mvitv2_l_16", "--out", str(tmp_path)])
