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


def test_model_step_counts_auto_as_issued_on_cuda(tmp_path):
    """``--count-only`` on a CPU counts ``auto`` on CUDA's path: per block the 8 attention launches of
    the default fused path, plus one HOG launch per step, with the launches stubbed."""
    from models import create_model
    from models.mvit import MultiScaleBlock

    model_step.main(["--device", "cpu", "--count-only", "--backends", "auto,sdpa", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("model_step_cpu_*_counts.json")).read_text())
    auto, sdpa = report["results"]
    blocks = sum(isinstance(m, MultiScaleBlock) for m in create_model("mvitv2_tiny", task="pretrain").modules())
    assert auto["triton_launches"] == 8 * blocks + 1 and sdpa["triton_launches"] == 0
    assert auto["path"].startswith("as on CUDA") and sdpa["path"] == "cpu"
    top = dict(map(tuple, auto["top_ops"]))
    assert not {"select_backward", "slice_backward"} & set(top) and top["mm"] > 0
    assert 0 < auto["torch_ops"] < sdpa["torch_ops"]  # the augmented operands cost ops of their own
    assert "| auto | as on CUDA" in next(tmp_path.glob("model_step_cpu_*_counts.md")).read_text()


def test_model_step_bench_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--backends"):
        model_step.main(["--device", "cpu", "--backends", "flash", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps"):
        model_step.main(["--device", "cpu", "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="mvitv2_l_16x4"):  # the close valid names
        model_step.main(["--device", "cpu", "--model", "mvitv2_l_16", "--out", str(tmp_path)])
