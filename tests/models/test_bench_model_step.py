"""``bench.model_step`` (a whole MaskFeat pre-training step per attention backend; on a GPU also
the CPU time to issue it) runs end to end on the CPU with the tiny variant."""
from __future__ import annotations

import json

import pytest
import torch

from bench import model_step


def test_model_step_bench_runs_on_cpu(tmp_path):
    model_step.main(["--device", "cpu", "--steps", "2", "--backends", "auto,sdpa,sdpa+ckpt", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("model_step_cpu_*.json")).read_text())
    assert report["model"] == "mvitv2_tiny" and report["batch"] == 2
    rows = report["results"]
    assert [r["backend"] for r in rows] == ["auto", "sdpa", "sdpa+ckpt"]  # auto@jit: CUDA only
    # recomputed blocks: the forward's ops again in backward
    assert rows[2]["torch_ops"] > rows[1]["torch_ops"] + 50
    for r in rows:
        assert r["step_ms"] > 0 and r["host_ms"] == r["step_ms"] and r["host_over_step"] == 1.0
        assert r["torch_ops"] > 100 and r["triton_launches"] == 0  # CPU: HOG and attention run in torch
    assert "| auto |" in next(tmp_path.glob("model_step_cpu_*.md")).read_text()


def test_model_step_counts_auto_as_issued_on_cuda(tmp_path, monkeypatch):
    """``--count-only`` on a CPU counts ``auto`` on CUDA's path: per block the 9 attention launches of
    the default fused path, the packed k' rows included (6 where Nq < 2·Nk: k' assembled in the
    kernels and the rel terms inside them, as
    ``call_config`` chooses on CUDA for calls of at least ``FUSE_REL_MIN_ROWS`` query rows, here
    lowered to 0 so that the tiny variant has both kinds), plus one HOG launch per step, with the
    launches stubbed."""
    import models.mvit
    from kernels.attention import triton_attn

    monkeypatch.setattr(triton_attn, "FUSE_REL_MIN_ROWS", 0)

    model_step.main(["--device", "cpu", "--count-only", "--backends", "auto,sdpa,auto+ckpt,auto+ckpt1,auto+tpool",
                     "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("model_step_cpu_*_counts.json")).read_text())
    auto, sdpa, ckpt, ckpt1, tpool = report["results"]
    sizes = []  # (Nq, Nk) per block, in order
    real = models.mvit.relpos_attention

    def spy(q, k, *args, **kw):
        sizes.append((q.shape[2], k.shape[2]))
        return real(q, k, *args, **kw)

    models.mvit.relpos_attention = spy
    try:
        with torch.no_grad():
            model, video, mask = model_step.build("mvitv2_tiny", "sdpa", 1, torch.device("cpu"), torch.float32)
            model(video, mask)
    finally:
        models.mvit.relpos_attention = real
    blocks, fused = len(sizes), sum(nq < 2 * nk for nq, nk in sizes)
    assert 0 < fused < blocks  # the tiny variant has both kinds
    first_fwd = 2 if sizes[0][0] < 2 * sizes[0][1] else 4  # tables, (rel terms, packed k' rows,) attention
    # 9 launches per block (6 with the rel terms inside, where k' is not packed), one HOG launch
    assert auto["triton_launches"] == 9 * blocks - 3 * fused + 1 and sdpa["triton_launches"] == 0
    assert auto["path"].startswith("as on CUDA") and sdpa["path"] == "cpu"
    top = dict(map(tuple, auto["top_ops"]))
    assert not {"select_backward", "slice_backward"} & set(top) and top["mm"] > 0
    assert 0 < auto["torch_ops"] < sdpa["torch_ops"]  # the augmented operands cost ops of their own
    # recomputed blocks: each block's attention forward (tables, rel terms, packed k' rows,
    # attention: 4 launches; 2 with the rel terms inside) runs again in backward, the HOG targets do not
    assert ckpt["triton_launches"] == auto["triton_launches"] + 4 * blocks - 2 * fused
    assert ckpt["torch_ops"] > auto["torch_ops"]
    # what backward needs: the fused attention saves no (Nq, Nk) matrix; recomputed blocks keep their inputs only
    assert 0 < ckpt["saved_gib"] < auto["saved_gib"] < sdpa["saved_gib"]
    # only the first block recomputed: its forward launches again, and its activations no longer kept
    assert ckpt1["triton_launches"] == auto["triton_launches"] + first_fwd
    assert ckpt["saved_gib"] < ckpt1["saved_gib"] < auto["saved_gib"]
    assert "| auto | as on CUDA" in next(tmp_path.glob("model_step_cpu_*_counts.md")).read_text()
    # Triton poolings: each q/k/v pooling convolution is Triton launches instead of torch ops
    assert tpool["triton_launches"] > auto["triton_launches"] and tpool["torch_ops"] < auto["torch_ops"]


def test_pool_rule_at_a_smaller_size():
    """A step at 64 px (the host column's, ``--count-only --img-size 64``) sends to Triton exactly the
    poolings the 224 px step sends: the threshold scales with the area, rounded up."""
    import models.mvit
    from kernels import pool

    def pooled(numel, dtype=torch.bfloat16):
        return models.mvit.auto_backend(torch.empty(numel // 8, 8, 1, 1, 1, dtype=dtype, device="meta"))

    small = -(-pool.AUTO_TRITON_MIN_NUMEL * 64 * 64 // (224 * 224))
    real = models.mvit.auto_backend
    with model_step.pool_rule_at(64, 224, as_cuda=True):
        assert pooled(small + 7 & ~7) == "triton" and pooled(small - 8) == "torch"
        assert pooled(small + 8, torch.float32) == "torch"
    assert models.mvit.auto_backend is real and pooled(pool.AUTO_TRITON_MIN_NUMEL) == "torch"  # meta, not CUDA
    # the full-size block 0 of MViTv2-L at B 4 (8·72·8·56·56 elements) and its 64 px image
    assert 8 * 72 * 8 * 56 * 56 >= pool.AUTO_TRITON_MIN_NUMEL and 8 * 72 * 8 * 16 * 16 >= small
    assert 4 * 72 * 8 * 56 * 56 < pool.AUTO_TRITON_MIN_NUMEL and 4 * 72 * 8 * 16 * 16 < small


def test_backend_suffixes():
    parse, Spec = model_step.parse_spec, model_step.StepSpec
    assert parse("auto") == Spec("auto", False, "auto", False)
    assert parse("auto+ckpt8+tpool") == Spec("auto", 8, "triton", False)
    assert parse("sdpa+torchpool+ckpt+graph") == Spec("sdpa", True, "torch", True)  # any order
    assert parse("auto+graph+tpool") == Spec("auto", False, "triton", True)
    for bad, match in (("auto+tpool+torchpool", "more than one pool"), ("auto+ckpt+ckpt2", "more than one ckpt"),
                       ("auto+ckptx", "block count"), ("auto+fast", "unknown suffix")):
        with pytest.raises(ValueError, match=match):
            parse(bad)


def test_model_step_bench_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--backends"):
        model_step.main(["--device", "cpu", "--backends", "flash", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--backends"):
        model_step.main(["--device", "cpu", "--backends", "sdpa+ckp", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --device cuda"):
        model_step.main(["--device", "cpu", "--backends", "auto+graph", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="takes a block count"):
        model_step.main(["--device", "cpu", "--backends", "sdpa+ckptx", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps"):
        model_step.main(["--device", "cpu", "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="mvitv2_l_16x4"):  # the close valid names
        model_step.main(["--device", "cpu", "--model", "mvitv2_l_16", "--out", str(tmp_path)])


def test_kernel_categories_and_the_report_table(tmp_path):
    """Profiler kernel names fall in the categories a step's GPU time is split by: ours by function
    name, library kernels by fragments (SDPA's cuDNN kernels are attention, not convolution; a
    direct copy is a copy, not elementwise); the report shows the table per backend."""
    from bench.common import by_category, kernel_category

    names = {
        "_dkdv_kernel": "attention (ours)",
        "_rel_dtab_finish_kernel": "attention (ours)",
        "_hog_cells_kernel": "HOG (ours)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128": "attention (SDPA)",
        "sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_ndhwc_kernel": "convolution",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "GEMM",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "layer norm",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda": "copy / cat",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl": "elementwise",
        "Memset (Device)": "fill",
        "some_new_kernel": "other",
    }
    assert {n: kernel_category(n) for n in names} == names
    for name in ("_pool_fwd_kernel", "_pool_dgrad_kernel", "_pool_wgrad_kernel", "_pool_wgrad_finish_kernel"):
        assert kernel_category(name) == "pooling (ours)"  # not "other" (no library fragment) nor "convolution"
    kernels = [dict(kernel=n[:90], category=c, us_per_call=100.0 * (i + 1), launches_per_call=2.0)
               for i, (n, c) in enumerate(names.items())]
    cats = by_category(kernels)
    assert cats[0] == dict(category="other", us_per_call=1100.0, launches_per_call=2.0)
    assert {c["category"]: c["us_per_call"] for c in cats}["attention (ours)"] == 300.0
    assert sum(c["us_per_call"] for c in cats) == sum(k["us_per_call"] for k in kernels)

    total_ms = sum(k["us_per_call"] for k in kernels) / 1e3
    row = dict(backend="auto", step_ms=10.0, step_ms_min=9.0, host_ms=4.0, host_over_step=0.4, host_note="",
               kernels_ms=total_ms, top_kernels=kernels[:2], by_category=cats, torch_ops=1, triton_launches=1,
               peak_mib=1.0)
    meta = dict(date="20261128", command="x", model="mvitv2_l_16x4", batch=4, input="16x224x224", steps=2,
                tflop_per_step=1.0, device_info=dict(name="GPU", torch="t", triton="t", python="p"))
    _, md = model_step.write_report(tmp_path, "model_step_x", meta, rows=[row])
    text = md.read_text()
    assert "| attention (ours) | 0.30 | 5% | 4 |" in text and "| other | 1.10 | 17% | 2 |" in text


def test_model_step_tag_names_the_files(tmp_path):
    model_step.main(["--device", "cpu", "--count-only", "--backends", "sdpa", "--tag", "before", "--out", str(tmp_path)])
    assert [p.name.endswith("_counts_before.json") for p in tmp_path.glob("*.json")] == [True]


def test_host_row_times_the_small_step_and_says_where_counts_differ():
    """The host column (CUDA) is the wall time of the same step at a small input; where that step
    issues other counts than the full one, the note says so (here on the CPU, where the GPU part
    is skipped)."""
    model, video, mask = model_step.build("mvitv2_tiny", "sdpa", 1, torch.device("cpu"), torch.float32, 64)
    small = model_step.make_step(model, video, mask)
    small()  # the first step fills the model's caches (index tables, masks)
    ops, launched = model_step.count_work(small)
    same = model_step.host_row(small, torch.device("cpu"), 2, 64, len(ops), len(launched))
    assert same["host_ms"] > 0 and same["host_px"] == 64 and same["host_note"] == ""
    other = model_step.host_row(small, torch.device("cpu"), 2, 64, len(ops) + 1, len(launched))
    assert other["host_note"] == f"at 64 px: {len(ops)} torch ops, {len(launched)} Triton launches"


def test_step_flops_count_grouped_convolution_gradients_once():
    """torch's flop counter ignores groups in the convolution backward: a depthwise pooling's weight
    gradient counted 72 times over at 72 channels, 1.29 of the 12.5 TFLOP quoted for an MViTv2-L
    step (10.8 now). Each gradient costs what the forward does."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.model_step import conv_backward_flop

    x = torch.randn(2, 8, 4, 6, 6, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, 3, requires_grad=True)
    fwd = 2 * (2 * 8 * 4 * 6 * 6) * 27  # 2 · |output| · (C_in / groups) · |kernel|
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as c:
        torch.nn.functional.conv3d(x, w, None, 1, 1, 1, 8).sum().backward()
    counts = {str(k): v for k, v in c.get_flop_counts()["Global"].items()}
    assert counts["aten.convolution"] == fwd and counts["aten.convolution_backward"] == 2 * fwd
    x.grad = w.grad = None
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as c:
        torch.nn.functional.conv3d(x.detach(), w, None, 1, 1, 1, 8).sum().backward()  # weight gradient only
    assert {str(k): v for k, v in c.get_flop_counts()["Global"].items()}["aten.convolution_backward"] == fwd
