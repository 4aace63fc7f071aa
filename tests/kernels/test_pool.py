"""Triton depthwise 3-D convolution (kernels/pool) against torch's ``F.conv3d(..., groups=C)``.

Every accuracy case compares three things (STYLE habit 2): the kernels, the same-dtype torch
reference and a float64 oracle (torch on float64 copies); the kernels' max error against the
oracle must be at most 2× the reference's own error plus one ulp of the largest oracle value,
for the output and both gradients. On CPU the kernels run in the Triton interpreter
(tests/conftest.py), where fp32→bf16 conversion truncates instead of rounding to nearest: there
the bf16 floor is one more ulp (the GPU tests hold bf16 to the plain bound). The ``gpu`` tests run
MViTv2-L's real pooling shapes in bf16.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels.pool
from kernels import interpreting
from kernels.pool import depthwise_conv3d
from kernels.pool import triton_pool

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (x shape (N, C, T, H, W), kernel, stride, padding): MViTv2's strides on awkward sizes (odd T, H, W;
# H, W not multiples of the stride; N·C not a multiple of any tile), the image variants' 1×3×3
# pooling, and one geometry that is no pooling of the model (every axis different)
CASES = [
    ((2, 3, 5, 7, 9), (3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((2, 3, 5, 7, 9), (3, 3, 3), (1, 2, 2), (1, 1, 1)),
    ((1, 5, 3, 13, 11), (3, 3, 3), (1, 4, 4), (1, 1, 1)),
    ((3, 5, 4, 17, 19), (3, 3, 3), (1, 8, 8), (1, 1, 1)),
    ((2, 3, 1, 9, 10), (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ((2, 3, 6, 7, 8), (2, 3, 1), (2, 1, 3), (1, 0, 0)),
]
CASE_IDS = ["s111", "s122", "s144", "s188", "k133", "odd-geometry"]


def make_inputs(shape, kernel, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(*shape, generator=g)
    w = torch.randn(C, 1, *kernel, generator=g) / (kernel[0] * kernel[1] * kernel[2]) ** 0.5
    return x.to(device, dtype), w.to(device, dtype)


def _run(fn, x, w, grad_out):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), grad_out)
    return y.detach(), dx, dw


def _ulp_floor(dtype: torch.dtype, oracle: torch.Tensor) -> float:
    ulps = 2 if (dtype == torch.bfloat16 and interpreting()) else 1  # the interpreter truncates to bf16
    return ulps * torch.finfo(dtype).eps * oracle.abs().max().item()


def check_against_oracle(shape, kernel, stride, padding, dtype, device="cpu", seed=0):
    """Assert kernel error ≤ 2·(same-dtype torch error) + floor for y, dx and dw; returns the errors."""
    x, w = make_inputs(shape, kernel, dtype, device, seed)
    C = shape[1]
    with torch.no_grad():
        out_shape = F.conv3d(x[:1].float(), w.float(), None, stride, padding, 1, C).shape[1:]
    grad_out = torch.randn(shape[0], *out_shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    ref = _run(lambda a, b: F.conv3d(a, b, None, stride, padding, 1, C), x, w, grad_out)
    got = _run(lambda a, b: depthwise_conv3d(a, b, stride, padding, backend="triton"), x, w, grad_out)
    oracle = _run(lambda a, b: F.conv3d(a, b, None, stride, padding, 1, C), x.double(), w.double(), grad_out.double())
    errs = []
    for name, g, r, o in zip(("y", "dx", "dw"), got, ref, oracle):
        assert g.shape == o.shape and g.dtype == dtype, (name, g.shape, o.shape, g.dtype)
        err, ref_err = (g.double() - o).abs().max().item(), (r.double() - o).abs().max().item()
        assert err <= 2 * ref_err + _ulp_floor(dtype, o), f"{name}: error {err:.3g} vs torch's {ref_err:.3g}"
        errs.append(err)
    return errs


# ----------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fp32_against_oracle(case, device):
    check_against_oracle(*case, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=["s111", "s188", "k133"])
def test_half_precision_against_oracle(case, dtype, device):
    check_against_oracle(*case, dtype, device)


def test_gpu_tiling_in_the_interpreter(monkeypatch):
    """The launch plan a GPU gets (one plane per program, blocks of 64-1024 positions, 4 blocks per
    weight-gradient program, several chunks summed by the finish kernel), run in the interpreter;
    the finish kernel's block of chunks cut to 2 so that its loop takes several steps, as at
    MViTv2-L's shapes on a GPU (G_ITERS 4 at block 0, B 4)."""
    if not interpreting():
        pytest.skip("the interpreter's own plan is what differs from the GPU's")
    monkeypatch.setattr(triton_pool, "_gpu", lambda device: True)
    monkeypatch.setattr(triton_pool, "_FINISH_BLOCK", 2)
    triton_pool._plan.cache_clear()
    try:
        plan = triton_pool._plan((4, 9, 21), (4, 9, 21), 3, 2, 27, True)
        assert plan.wgrad[4] > 2 and plan.fwd[0] == 1  # several chunks; one plane per program
        assert plan.finish[2] > 1  # the finish kernel's loop runs more than once
        check_against_oracle((3, 2, 4, 9, 21), (3, 3, 3), (1, 1, 1), (1, 1, 1), torch.float32)
        check_against_oracle((2, 3, 3, 33, 17), (3, 3, 3), (1, 2, 2), (1, 1, 1), torch.float32)
        # half precision: the chunks' fp32 partials are summed in fp32, then rounded once (rounding each
        # partial to the input dtype first passed every other CPU test)
        check_against_oracle((3, 2, 4, 9, 21), (3, 3, 3), (1, 1, 1), (1, 1, 1), torch.float16)
    finally:
        triton_pool._plan.cache_clear()


def test_every_output_is_written(monkeypatch):
    """Buffers start as NaN: a position the kernels skip would show."""
    real = triton_pool._empty
    monkeypatch.setattr(triton_pool, "_empty", lambda *s, dtype, device: real(*s, dtype=dtype, device=device).fill_(float("nan")))
    x, w = make_inputs((2, 3, 5, 7, 9), (3, 3, 3), torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    y = depthwise_conv3d(x, w, (1, 4, 4), 1, backend="triton")
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    # input positions no window reaches (H, W not multiples of the stride) get a zero gradient
    ref = x.detach().clone().requires_grad_()
    F.conv3d(ref, w.detach(), None, (1, 4, 4), 1, 1, 3).backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, ref.grad == 0)


def test_strided_inputs_give_the_same_bits(device):
    """x as a channels-last view and dy as a transposed view: the same values, bit for bit."""
    x, w = make_inputs((2, 4, 3, 6, 10), (3, 3, 3), torch.float32, device)
    x_cl = x.to(memory_format=torch.channels_last_3d)
    assert not x_cl.is_contiguous()
    gy = torch.randn(2, 4, 3, 3, 5, device=device)
    gy_t = gy.transpose(3, 4).contiguous().transpose(3, 4)
    assert not gy_t.is_contiguous()
    fn = lambda a, b: depthwise_conv3d(a, b, (1, 2, 2), 1, backend="triton")  # noqa: E731
    a, b = _run(fn, x, w, gy), _run(fn, x_cl, w, gy_t)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_backward_is_deterministic(device):
    """Two backward passes give bitwise equal gradients (several weight-gradient chunks). In the
    interpreter the programs run one after another in a fixed order: on the CPU this checks
    repeatability only, the CUDA parametrisation order independence."""
    x, w = make_inputs((5, 3, 4, 9, 11), (3, 3, 3), torch.float32, device)
    gy = torch.randn(5, 3, 4, 5, 6, device=device)
    fn = lambda a, b: depthwise_conv3d(a, b, (1, 2, 2), 1, backend="triton")  # noqa: E731
    first, second = _run(fn, x, w, gy), _run(fn, x, w, gy)
    for u, v in zip(first, second):
        assert torch.equal(u, v)


def test_only_the_needed_gradients(device):
    x, w = make_inputs((2, 3, 3, 5, 5), (3, 3, 3), torch.float32, device)
    w.requires_grad_()
    y = depthwise_conv3d(x, w, 1, 1, backend="triton")
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    ref = w.detach().clone().requires_grad_()
    F.conv3d(x, ref, None, 1, 1, 1, 3).sum().backward()
    torch.testing.assert_close(dw, ref.grad, rtol=1e-5, atol=1e-5)


def test_second_derivatives_are_refused(device):
    """A gradient of the kernel's gradient (a gradient penalty) is an error, also through
    torch.autograd.grad(..., inputs), where torch's once_differentiable returned one without the
    pooling's part, silently."""
    x, w = make_inputs((1, 3, 3, 5, 5), (3, 3, 3), torch.float32, device)
    x.requires_grad_()
    y = depthwise_conv3d(x, w, 1, 1, backend="triton")
    gx, = torch.autograd.grad(y.pow(2).sum() + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="depthwise_conv3d .* have no second derivative"):
        torch.autograd.grad(gx.sum(), x)
    w.requires_grad_()  # linear in y: the incoming gradient is a constant, dx still depends on w
    gx, = torch.autograd.grad(depthwise_conv3d(x, w, 1, 1, backend="triton").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="have no second derivative"):
        torch.autograd.grad(gx.sum(), w)
    gx.mul_(2)  # in place, as a gradient hook may (a view of an input returned as is could not be)


def test_empty_batch(device):
    x, w = make_inputs((1, 3, 3, 5, 5), (3, 3, 3), torch.float32, device)
    x = x[:0].requires_grad_()
    w.requires_grad_()
    y = depthwise_conv3d(x, w, 1, 1, backend="triton")
    assert y.shape == (0, 3, 3, 5, 5)
    y.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))


def test_auto_off_cuda_is_torch(monkeypatch):
    """``auto`` (and ``torch``) off CUDA is the torch call, bit for bit, and never reaches the kernels,
    whatever the size."""
    def boom(*a, **k):
        raise AssertionError("auto reached the Triton kernels")

    monkeypatch.setattr(triton_pool, "depthwise_conv3d_triton", boom)
    monkeypatch.setattr(kernels.pool, "AUTO_TRITON_MIN_NUMEL", 1)
    x, w = make_inputs((2, 3, 3, 6, 6), (3, 3, 3), torch.float32)
    for backend in ("auto", "torch"):
        assert torch.equal(depthwise_conv3d(x, w, (1, 2, 2), (1, 1, 1), backend=backend),
                           F.conv3d(x, w, None, (1, 2, 2), (1, 1, 1), 1, 3))
    for dtype in (torch.bfloat16, torch.float16):
        assert kernels.pool.auto_backend(x.to(dtype)) == "torch"


def test_auto_backend_rule():
    """Triton for 5-D CUDA inputs of ≥ 2²³ elements convolved in bf16/fp16 (under autocast: the
    autocast dtype) whose planes fit int32 offsets, torch for everything else. Meta tensors stand
    in for CUDA ones (``device_type``), which need a GPU."""
    auto, big = kernels.pool.auto_backend, kernels.pool.AUTO_TRITON_MIN_NUMEL
    assert big == 1 << 23

    def like(numel, dtype=torch.bfloat16, shape=None):
        return torch.empty(shape or (numel // 8, 8, 1, 1, 1), dtype=dtype, device="meta")

    cuda = dict(device_type="cuda")
    assert auto(like(big), **cuda) == "triton"
    assert auto(like(big, torch.float16), **cuda) == "triton"
    assert auto(like(big - 8), **cuda) == "torch"
    assert auto(like(big, torch.float32), **cuda) == "torch"
    assert auto(like(big, torch.float32), torch.bfloat16, **cuda) == "triton"  # fp32 input under bf16 autocast
    assert auto(like(big), torch.float32, **cuda) == "torch"
    assert auto(like(big)) == "torch"  # the meta device itself, like the CPU: torch
    assert auto(like(1000), min_numel=1000, **cuda) == "triton"  # bench.model_step's scaled threshold
    assert auto(like(big, shape=(big // 1024, 1024)), **cuda) == "torch"  # not 5-D: torch (which raises)
    assert auto(like(2**31, shape=(1, 1, 1, 2**16, 2**15)), **cuda) == "torch"  # one plane of 2³¹: int32 offsets overflow


def test_auto_backend_keeps_torch_on_untimed_gpus(monkeypatch):
    """A real CUDA input on a GPU other than sm_90 (where the rule was timed) stays on torch."""
    import kernels

    from kernels.pool import triton_pool

    monkeypatch.setattr(triton_pool, "plane_fits", lambda x: True)
    x = type("X", (), {"device": torch.device("cuda", 0), "dtype": torch.bfloat16, "numel": lambda self: 1 << 30,
                       "dim": lambda self: 5})()
    monkeypatch.setattr(kernels, "_cuda_major", lambda index: 8)
    assert kernels.pool.auto_backend(x) == "torch"
    assert not kernels.tuned_for(torch.device("cuda", 0)) and not kernels.tuned_for(torch.device("cpu"))
    monkeypatch.setattr(kernels, "_cuda_major", lambda index: 9)
    assert kernels.pool.auto_backend(x) == "triton"  # the same input on an sm_90 GPU
    assert kernels.tuned_for(torch.device("cuda", 0)) and not kernels.tuned_for(torch.device("meta"))
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm's MI300 reports 9.4
    assert not kernels.tuned_for(torch.device("cuda", 0))


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.zeros(2, 4, 3, 5, 5)
    w = torch.zeros(4, 1, 3, 3, 3)
    return [
        (dict(x=x, weight=torch.zeros(3, 1, 3, 3, 3)), "weight must be (C=4, 1"),
        (dict(x=x, weight=torch.zeros(4, 2, 3, 3, 3)), "weight must be (C=4, 1"),
        (dict(x=x, weight=torch.zeros(4, 3, 3, 3)), "weight must be a (C, 1, kt, kh, kw)"),
        (dict(x=x[0], weight=w), "x must be a (N, C, T, H, W)"),
        (dict(x=x, weight=w.half()), "same floating dtype"),
        (dict(x=x.long(), weight=w.long()), "same floating dtype"),
        (dict(x=x.double(), weight=w.double()), "float16, bfloat16 and float32"),
        (dict(x=x, weight=w.to("meta")), "same device"),
        (dict(x=x, weight=w, stride=0), "stride must be >= 1"),
        (dict(x=x, weight=w, stride=(1, 2)), "stride must be an int or 3 ints"),
        (dict(x=x, weight=w, padding=-1), "padding must be >= 0"),
        (dict(x=x, weight=w, padding=0, stride=1, _x=torch.zeros(2, 4, 3, 2, 5)), "smaller than the kernel"),
        (dict(x=x, weight=w, backend="cudnn"), "backend must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_value_error(case):
    kw, msg = _bad_cases()[case]
    kw = dict(kw)
    if "_x" in kw:
        kw["x"] = kw.pop("_x")
    kw.setdefault("backend", "triton")
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        depthwise_conv3d(**kw)


def test_numpy_and_tensor_integers_are_strides_as_in_conv3d():
    """``F.conv3d`` takes numpy and 0-d tensor integers as strides/padding; so do our backends (they
    were refused as "not an int")."""
    x, w = torch.randn(1, 4, 3, 6, 6), torch.randn(4, 1, 3, 3, 3)
    want = F.conv3d(x, w, None, (1, 2, 2), 1, 1, 4)
    for backend in ("torch", "triton"):
        for stride, pad in ((torch.tensor([1, 2, 2]), np.int64(1)), ((1, np.int64(2), 2), torch.tensor(1))):
            torch.testing.assert_close(depthwise_conv3d(x, w, stride, pad, backend=backend), want)
    for bad in (True, np.bool_(True), 2.0):
        with pytest.raises(ValueError, match="stride must be an int or 3 ints"):
            depthwise_conv3d(x, w, bad, 1, backend="torch")


def test_torch_backend_checks_too():
    with pytest.raises(ValueError, match="weight must be"):
        depthwise_conv3d(torch.zeros(1, 4, 3, 5, 5), torch.zeros(3, 1, 3, 3, 3), backend="torch")


def test_auto_backend_checks_before_it_picks():
    """``auto`` with an x that is not a tensor says what is wrong (it raised AttributeError)."""
    with pytest.raises(ValueError, match="x must be a"):
        depthwise_conv3d([1.0], torch.zeros(4, 1, 3, 3, 3))


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def _loss_and_grads(m, x, mask):
    m.zero_grad()
    loss = m(x, mask).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double().clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,geometry", [("mvitv2_tiny", dict(num_frames=8, img_size=48)),
                                           ("mvitv2_tiny_image", dict(img_size=48))])
def test_model_pool_backend_triton_matches_torch(name, geometry, device, monkeypatch):
    """MaskFeat pre-training loss and every parameter gradient with ``pool_backend="triton"`` are no
    further from a float64 oracle than 2× the torch pooling's own fp32 error (plus 1e-6 of the
    largest gradient); the state_dict keys are the same; every pooling of the Triton model really
    went through ``depthwise_conv3d(backend="triton")`` (a silent fallback to torch would pass the
    error bound)."""
    import models.mvit
    from models import create_model

    if device.type == "cuda":
        pytest.skip("on a CUDA machine see test_gpu_mvit_l_bf16 (this test is the interpreter's)")
    torch.manual_seed(0)
    ref_model = create_model(name, "pretrain", target="pixel", **geometry)
    tri_model = create_model(name, "pretrain", target="pixel", pool_backend="triton", **geometry)
    assert list(tri_model.state_dict()) == list(ref_model.state_dict())
    tri_model.load_state_dict(ref_model.state_dict())
    oracle_model = copy.deepcopy(ref_model).double()
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, *ref_model.input_size[1:]) if ref_model.patch_2d else (2, 3, *ref_model.input_size)
    x = torch.randn(*shape, generator=g)
    mask = torch.rand(2, *ref_model.mask_grid(*x.shape[2:]), generator=g) < 0.4
    mask.view(2, -1)[:, 0] = True
    oracle, g_oracle = _loss_and_grads(oracle_model, x.double(), mask)
    ref, g_ref = _loss_and_grads(ref_model, x, mask)
    backends, real = [], models.mvit.depthwise_conv3d

    def spy(*args, backend, **kw):
        backends.append(backend)
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(models.mvit, "depthwise_conv3d", spy)
    got, g_got = _loss_and_grads(tri_model, x, mask)
    monkeypatch.undo()
    assert (got - oracle).abs() <= 2 * (ref - oracle).abs() + 1e-6 * oracle.abs(), (got, ref, oracle)
    floor = 1e-6 * max(t.abs().max() for t in g_oracle.values())
    pools = [n for n in g_oracle if ".pool_" in n]
    assert backends == ["triton"] * len(pools), backends  # one call per pooling convolution, each on Triton
    assert pools and set(g_got) == set(g_oracle)
    for n, t in g_oracle.items():
        err, ref_err = (g_got[n] - t).abs().max(), (g_ref[n] - t).abs().max()
        assert err <= 2 * ref_err + floor, f"{n}: error {err:.3g} vs torch's {ref_err:.3g}"


def test_model_pool_backend_is_validated():
    from models import create_model
    from models.mvit import MultiScaleAttention

    with pytest.raises(ValueError, match="pool_backend"):
        create_model("mvitv2_tiny", "pretrain", pool_backend="cudnn")
    with pytest.raises(ValueError, match="no pooling"):
        create_model("vit_tiny", "pretrain", pool_backend="triton")
    with pytest.raises(ValueError, match="pool_backend"):
        MultiScaleAttention(32, 32, (2, 4, 4), 1, kernel_q=(3, 3, 3), stride_q=(1, 2, 2), pool_backend="cuda")
    with torch.device("meta"):
        m = create_model("mvitv2_tiny", "pretrain", pool_backend="triton")
    attns = [mod for mod in m.modules() if isinstance(mod, MultiScaleAttention)]
    assert attns and all(a.pool_backend == "triton" for a in attns)
    m.backbone.set_pool_backend("torch")
    assert all(a.pool_backend == "torch" for a in attns)
    with pytest.raises(ValueError, match="pool_backend"):
        m.backbone.set_pool_backend("cudnn")
    with torch.device("meta"):
        assert create_model("mvitv2_tiny", "pretrain").backbone.blocks[0].attn.pool_backend == "auto"  # the default
        create_model("vit_tiny", "pretrain")  # auto on a ViT: nothing to pool, no error


def test_model_pool_auto_follows_auto_backend(monkeypatch):
    """With ``pool_backend="auto"`` each pooling runs where ``auto_backend`` says (here: Triton from
    500 input elements, in the interpreter), the module's weight as the parameter, and gives the
    torch convolution's values and gradients."""
    import models.mvit
    from models.mvit import PoolConv3d

    calls = []
    real = models.mvit.depthwise_conv3d

    def spy(x, weight, stride, padding, backend):
        calls.append((x.numel(), backend))
        return real(x, weight, stride, padding, backend=backend)

    asked = []

    def rule(x, dtype=None):
        asked.append(dtype)
        return "triton" if x.numel() >= 500 else "torch"

    monkeypatch.setattr(models.mvit, "depthwise_conv3d", spy)
    monkeypatch.setattr(models.mvit, "auto_backend", rule)
    conv = PoolConv3d(4, 4, 3, stride=(1, 2, 2), padding=1, groups=4, bias=False)
    assert conv.backend == "auto"
    for shape, want in (((1, 4, 2, 8, 8), [(512, "triton")]), ((1, 4, 2, 4, 4), [])):
        calls.clear()
        x = torch.randn(shape, requires_grad=True)
        y = conv(x)
        gy = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, conv.weight), gy)
        x2 = x.detach().requires_grad_()
        y2 = F.conv3d(x2, conv.weight, None, (1, 2, 2), 1, 1, 4)
        dx2, dw2 = torch.autograd.grad(y2, (x2, conv.weight), gy)
        assert calls == want
        for got, ref in ((y, y2), (dx, dx2), (dw, dw2)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert asked == [None, None]
    # under autocast the rule is asked about the autocast dtype, and Triton gets the cast tensors:
    # the values and gradients of torch's convolution under the same autocast
    x = torch.randn(1, 4, 2, 8, 8, requires_grad=True)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        y2 = F.conv3d(x, conv.weight, None, (1, 2, 2), 1, 1, 4)
    assert asked[-1] == torch.bfloat16 and y.dtype == y2.dtype == torch.bfloat16 and calls == [(512, "triton")]
    gy = torch.randn_like(y)
    got, ref = torch.autograd.grad(y, (x, conv.weight), gy), torch.autograd.grad(y2, (x, conv.weight), gy)
    torch.testing.assert_close(y.float(), y2.float(), rtol=2e-2, atol=2e-2)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
    # float64 is left alone by autocast (F.conv3d returns float64): the Triton path cast it to bf16
    from kernels.pool import autocast_dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(torch.ones(1, dtype=torch.float64)) is None
        assert autocast_dtype(torch.ones(1)) == torch.bfloat16 and autocast_dtype(torch.ones(1, dtype=torch.int64)) is None
    assert autocast_dtype(torch.ones(1)) is None


def test_public_triton_conv_casts_under_autocast_as_torch():
    """``depthwise_conv3d(backend="triton")`` under autocast returned fp32 for fp32 inputs where the
    torch backend (F.conv3d) returns the autocast dtype: one function, two dtypes."""
    x, w = make_inputs((2, 3, 4, 9, 9), (3, 3, 3), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = depthwise_conv3d(x, w, (1, 2, 2), 1, backend="triton")
        ref = depthwise_conv3d(x, w, (1, 2, 2), 1, backend="torch")
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kw", [dict(groups=2, bias=False), dict(groups=4, bias=True), dict(groups=4, bias=False, dilation=2)])
def test_model_pool_triton_refuses_what_it_does_not_compute(kw):
    """A grouped (not depthwise), biased or dilated conv would be computed wrongly (the kernels have
    no bias and no dilation): refused, not approximated."""
    from models.mvit import PoolConv3d, attention_pool

    conv = PoolConv3d(4, 4, 3, padding=1, **kw)
    conv.backend = "triton"
    with pytest.raises(ValueError, match="depthwise"):
        attention_pool(torch.zeros(1, 1, 1 + 8, 4), conv, (2, 2, 2), True, None)


def test_model_pool_triton_keeps_module_hooks():
    """With pool_backend='triton' the poolings are still module calls, so forward pre-hooks run on
    them: DeepSpeed ZeRO-3 gathers a module's partitioned weight in one (a direct read of the
    weight would see its empty placeholder)."""
    from models import create_model
    from models.mvit import PoolConv3d
    from models.variants import get_variant

    m = create_model("mvitv2_tiny", "classify", attn_backend="sdpa", pool_backend="triton")
    pools = [mod for mod in m.modules() if isinstance(mod, PoolConv3d)]
    fired = []
    for p in pools:
        p.register_forward_pre_hook(lambda mod, args: fired.append(mod))
    with torch.no_grad():
        m(torch.randn(1, 3, *get_variant("mvitv2_tiny").input_size))
    assert pools and len(fired) == len(pools)


def test_model_pool_triton_off_the_interpreter_names_the_setting(monkeypatch):
    from models.mvit import PoolConv3d

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import kernels

    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    conv = PoolConv3d(4, 4, 3, padding=1, groups=4, bias=False)
    conv.backend = "triton"
    with pytest.raises(ValueError, match="model.overrides.pool_backend=torch"):
        conv(torch.zeros(1, 4, 2, 4, 4))


# ----------------------------------------------------------------------------------------------
# GPU: MViTv2-L 16×4 pooling shapes at B 4, bf16 (bench/results/pool_conv_nvidia-h200_20261128.md)
# ----------------------------------------------------------------------------------------------
L_SHAPES = [
    ((8, 72, 8, 56, 56), (1, 1, 1)),
    ((8, 72, 8, 56, 56), (1, 8, 8)),
    ((16, 72, 8, 56, 56), (1, 2, 2)),
    ((16, 72, 8, 56, 56), (1, 4, 4)),
    ((16, 72, 8, 28, 28), (1, 1, 1)),
    ((32, 72, 8, 14, 14), (1, 2, 2)),
    ((64, 72, 8, 14, 14), (1, 1, 1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,stride", L_SHAPES)
def test_gpu_mvit_l_bf16(shape, stride):
    check_against_oracle(shape, (3, 3, 3), stride, (1, 1, 1), torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_model_pool_auto_picks_by_size():
    """On an sm_90 GPU in bf16 a pooling of ≥ 2²³ input elements runs the Triton kernels, a smaller
    one torch's (elsewhere auto keeps torch's: kernels.tuned_for)."""
    import models.mvit
    from kernels import tuned_for
    from models.mvit import PoolConv3d

    if not tuned_for(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("auto picks the Triton poolings on sm_90 GPUs only")

    seen = []
    real = models.mvit.depthwise_conv3d
    models.mvit.depthwise_conv3d = lambda *a, **k: seen.append(k["backend"]) or real(*a, **k)
    try:
        conv = PoolConv3d(72, 72, 3, stride=(1, 2, 2), padding=1, groups=72, bias=False).cuda().bfloat16()
        for n, want in ((8, ["triton"]), (2, [])):  # 14.4 M and 3.6 M elements
            seen.clear()
            x = torch.randn(n, 72, 8, 56, 56, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            y = conv(x)
            gy = torch.randn_like(y)
            dx, dw = torch.autograd.grad(y, (x, conv.weight), gy)
            assert seen == want
            x2 = x.detach().requires_grad_()
            y2 = F.conv3d(x2, conv.weight, None, (1, 2, 2), 1, 1, 72)
            dx2, dw2 = torch.autograd.grad(y2, (x2, conv.weight), gy)
            for got, ref in ((y, y2), (dx, dx2)):
                torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
            # dw sums 8·8·28·28 products per tap: compare relative to its size
            assert (dw.float() - dw2.float()).abs().max() <= 2e-2 * dw2.float().abs().max()
    finally:
        models.mvit.depthwise_conv3d = real


@pytest.mark.gpu
def test_gpu_deterministic_bf16():
    x, w = make_inputs((16, 72, 8, 56, 56), (3, 3, 3), torch.bfloat16, "cuda")
    gy = torch.randn(16, 72, 8, 28, 28, device="cuda", dtype=torch.bfloat16)
    fn = lambda a, b: depthwise_conv3d(a, b, (1, 2, 2), 1, backend="triton")  # noqa: E731
    first, second = _run(fn, x, w, gy), _run(fn, x, w, gy)
    for u, v in zip(first, second):
        assert torch.equal(u, v)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    """N·C·T·H·W > 2³¹ (4.3 GB of bf16): the last planes are addressed with int64 offsets."""
    N, C, T, H, W = 1200, 72, 8, 56, 56
    assert N * C * T * H * W > 2**31
    x = torch.randn(N, C, T, H, W, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(C, 1, 3, 3, 3, device="cuda") / 27**0.5).to(torch.bfloat16)
    y = depthwise_conv3d(x, w, (1, 2, 2), 1, backend="triton")
    gy = torch.randn_like(y)
    y.backward(gy)
    tail = x.detach()[-1:].clone().requires_grad_()
    ref = F.conv3d(tail, w, None, (1, 2, 2), 1, 1, C)
    ref.backward(gy[-1:])
    torch.testing.assert_close(y[-1:], ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(x.grad[-1:], tail.grad, rtol=1.6e-2, atol=1e-2)
