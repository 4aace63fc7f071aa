"""The benchmarks' own correctness checks: a wrong kernel must fail the run (exit 3), not pass as a
row marked NO in a table (``bench/gpu_check`` reads exit codes only); and the committed attention
tables are what ``--render`` makes of their JSON (the ratio columns are derived, not typed in)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import attention, hog

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_hog_bench_checks_every_provider_against_the_oracle(tmp_path, monkeypatch):
    from kernels.hog import hog_targets, hog_targets_reference

    monkeypatch.setattr(hog, "CRASHED", [])

    frames = hog.make_frames(2, 32, 48, torch.uint8, torch.device("cpu"))

    def wrong(x):  # a kernel off by one bin's worth somewhere
        out = hog_targets(x, hog.TOKEN_STRIDE, backend="triton").clone()
        out[0, 0, 0] += 0.01
        return out

    def broken(x):
        raise RuntimeError("no kernel image is available")

    providers = {"reference": lambda x: hog_targets_reference(x, hog.TOKEN_STRIDE),
                 "triton (interpreter)": lambda x: hog_targets(x, hog.TOKEN_STRIDE, backend="triton"),
                 "triton (wrong)": wrong, "triton (broken)": broken}
    notes: list[str] = []
    rows = hog.bench_shape("tiny", frames, providers, torch.device("cpu"), True, 1.0, notes)
    by = {r["provider"]: r for r in rows}
    assert by["triton (interpreter)"]["ok"] is True and by["triton (interpreter)"]["oracle_diff"] < hog.ORACLE_TOL
    assert by["triton (wrong)"]["ok"] is False
    assert hog.failed_checks(rows) == [f"tiny triton (wrong) (oracle diff {by['triton (wrong)']['oracle_diff']:.2e})",
                                       "tiny triton (broken) (RuntimeError): raised"]
    ours = by["triton (interpreter)"]
    assert ours["speedup_vs_best_other"] == pytest.approx(by["reference"]["ms"] / ours["ms"])
    assert by["reference"]["speedup_vs_best_other"] is None  # the ratio is ours against the others
    meta = {"device_info": hog.device_info(torch.device("cpu")), "date": "x", "command": "x", "copy_gbs": 1.0}
    _, md = hog.write_report(tmp_path, "hog_test", meta, rows, notes)
    table = md.read_text()
    assert "| × best other |" in table and "| NO |" in table and "| yes |" in table


def test_attention_bench_fails_when_one_of_ours_fails_its_check():
    rows = [dict(provider="triton", shape="s1", ok=True, **{"pass": "fwdbwd"}),
            dict(provider="sdpa", shape="s1", ok=False, **{"pass": "fwd"}),
            dict(provider="auto", shape="s2", ok=False, **{"pass": "fwdbwd"})]
    assert attention.failed_checks(rows) == ["auto fwdbwd s2"]  # exits 3
    assert attention.failed_checks(rows[:2]) == []  # an alternative's miss is a warning
    assert attention.failed_checks(rows, ours_only=False) == ["sdpa fwd s1", "auto fwdbwd s2"]
    # ours raising at a shape fails the run too; a provider not made on this device (no shape) does not
    skipped = [dict(provider="triton", shape="s3", reason="RuntimeError", **{"pass": "fwd"}),
               dict(provider="triton", shape=None, reason="CUDA only", **{"pass": "all"}),
               dict(provider="xformers", shape="s3", reason="ImportError", **{"pass": "fwd"})]
    assert attention.failed_checks(rows[:2], skipped=skipped) == ["triton fwd s3: raised"]


def _attention_runs() -> list[Path]:
    """The committed JSON files bench.attention wrote (not those of attention_host/_memory/_tune)."""
    return [p for p in sorted(RESULTS.glob("attention_*.json")) if {"results", "skipped"} <= set(json.loads(p.read_text()))]


@pytest.mark.parametrize("path", _attention_runs(), ids=lambda p: p.name)
def test_committed_attention_tables_are_their_json_rendered(path, tmp_path):
    """The committed Markdown of each attention run is what --render writes from its JSON (the
    derived columns included): a hand-edited number in a table would differ."""
    md = path.with_suffix(".md")
    if not md.exists():
        pytest.skip(f"{path.name} has no table")
    attention.main(["--render", str(_copy(path, tmp_path))])
    assert (tmp_path / md.name).read_text() == md.read_text()
    assert json.loads((tmp_path / path.name).read_text()) == json.loads(path.read_text())


def _copy(path: Path, to: Path) -> Path:
    dst = to / path.name
    dst.write_text(path.read_text())
    return dst


@pytest.mark.parametrize("bench", ["hog", "attention"])
def test_a_failed_check_makes_the_run_exit_3(bench, tmp_path, monkeypatch):
    """bench/gpu_check reads exit codes only: each benchmark's main exits 3 when a check of ours failed
    (deleting its sys.exit(3) passed every test). The measuring is stubbed: only main's ending runs."""
    mod = {"hog": hog, "attention": attention}[bench]
    monkeypatch.setattr(mod, "bench_shape", lambda *a, **k: [])
    monkeypatch.setattr(mod, "failed_checks", lambda *a, **k: ["ours wrong"])
    with pytest.raises(SystemExit) as e:
        mod.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert e.value.code == 3
