"""Triton kernels of the MaskFeat engine (HOG targets, relative-position attention) and their references."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host code. ``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions
    whose call wrapper costs microseconds each; launch arithmetic runs on every call."""
    return -(-a // b)


def next_pow2(n: int, least: int = 1) -> int:
    """Smallest power of two ≥ n, and at least ``least`` (a block width floor), for host code
    (see :func:`cdiv`)."""
    return max(least, 1 if n <= 1 else 1 << (n - 1).bit_length())


def empty_buffer(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel-written buffer (uninitialised). Each kernel module binds it as its
    ``_empty``, which tests replace to poison the buffers with NaN."""
    return torch.empty(*shape, dtype=dtype, device=device)


def compiling_offline() -> bool:
    """True while ``bench.sass.capture_launches`` is active: Triton's JIT sees a stand-in driver for
    a GPU this machine lacks, launches are recorded and compiled for it, never run. Launchers then
    accept CPU tensors (only their shapes, strides and alignment matter)."""
    from triton.runtime.driver import driver

    # the private slot: ``driver.active`` would try to create a CUDA driver and raise on a CPU machine
    return getattr(driver._active, "offline", False) is True


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launchable_on(device) -> bool:
    """Whether a Triton kernel can take tensors on ``device``: CUDA, or CPU under the interpreter
    or while compiling offline (``bench.sass``)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (interpreting() or compiling_offline())


def require_launchable(t: torch.Tensor, what: str, instead: str, error: type = ValueError) -> None:
    """Raise ``error`` naming ``what`` (the Triton entry point) and ``instead`` (what to use without
    Triton) unless our kernels can launch on ``t``'s device (:func:`launchable_on`)."""
    if not launchable_on(t.device):
        raise error(f"{what} needs a CUDA tensor (got {t.device}); on CPU set TRITON_INTERPRET=1 "
                    f"before importing the kernels (tests do) or use {instead}")


def tensor_cache(maxsize: int):
    """``functools.lru_cache`` for functions that build constant tensors from their hashable
    arguments (index tables), bypassed while a ``FakeTensorMode`` is active: a fake tensor made by a
    tracer or a fake-mode estimate, once cached, failed every later real call of that geometry."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear, call.cache_info = cached.cache_clear, cached.cache_info
        return call

    return wrap


TUNED_CUDA_MAJOR = 9
"""Compute capability major of the GPUs our Triton kernels' tile tables were tuned and timed on
(sm_90: H100, H200)."""


def tuned_for(device: torch.device) -> bool:
    """Whether ``device`` is a GPU of the architecture the attention, rel-term and pooling kernels
    were tuned and timed on (:data:`TUNED_CUDA_MAJOR`, NVIDIA; not ROCm, whose MI200-MI350 also
    report 9.x): where their ``auto`` backends choose them.
    Elsewhere ``auto`` keeps PyTorch's kernels: the tables were never timed there, and they do not
    all fit, e.g. the attention dk/dv kernel's 109 KiB of shared memory at head dim 96 is over the
    99 KiB a block may use on sm_86/sm_89 (A10, A40, L4, L40S, RTX 30/40: Triton's OutOfResources
    at the first backward), found by compiling it offline (``bench.sass``)."""
    if device.type != "cuda" or torch.version.hip is not None:  # ROCm reports 9.x for MI200-MI350
        return False
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return _cuda_major(index) == TUNED_CUDA_MAJOR


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    """Compute capability major of CUDA device ``index``, once per index."""
    return torch.cuda.get_device_capability(index)[0]


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, enabled=False)``: code that must run in the dtypes it chose
    (the fp32 HOG and pixel targets) under an enclosing autocast; a no-op for device types without
    autocast (meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


_SAME_DEVICE = contextlib.nullcontext()  # reentrant; one instance for every call


def tensor_device(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device the current one while our kernels launch.

    Triton launches on the *current* device, with its current stream, whatever device the
    arguments live on (triton-lang/triton#2441): a tensor on ``cuda:1`` while ``cuda:0`` is current
    would run on the wrong GPU and stream, or fault. Training sets each rank's device, so this is a
    no-op there (two attribute reads, ~1 µs); a notebook or benchmark that uses ``cuda:1`` without
    ``torch.cuda.set_device`` gets the right device. Backward needs nothing: autograd runs the
    backward of CUDA tensors on a per-device thread whose current device is theirs."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


class _SecondDerivative(torch.autograd.Function):
    """The gradients a kernel's backward made, returned as they are (detached aliases: no copy, and
    no view of an input, which autograd would forbid to modify in place), on a node whose own
    backward raises. Its inputs are the backward's incoming gradients and saved tensors that
    require grad, so the node lies on every path from a gradient back to the forward's inputs."""

    @staticmethod
    def forward(ctx, name: str, n_in: int, *tensors: torch.Tensor):
        ctx.name = name
        out = tuple(t.detach() for t in tensors[n_in:])
        return out if len(out) != 1 else out[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name}: the Triton kernels have no second derivative (a gradient of a gradient, "
                           "e.g. a gradient penalty); use the reference backend for that")


def first_order_only(name: str):
    """Decorator of an ``autograd.Function.backward`` whose gradients come from kernels (no graph).
    Under ``create_graph=True`` the gradients it returns are tied to the incoming gradients' graph
    through a node that raises when differentiated. torch's ``once_differentiable`` ties them to
    fresh leaves instead, so ``torch.autograd.grad(g, inputs)`` never met its error node and
    returned a second derivative without this function's part, silently."""

    def wrap(fn):
        @functools.wraps(fn)
        def backward(ctx, *grad_outputs):
            with torch.no_grad():
                grads = fn(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # (create_graph=False: the usual backward)
                return grads
            # the incoming gradients (o.pow(2).sum()) and the saved inputs (o.sum(): the incoming
            # gradient is a constant, yet the gradients depend on q, k, v)
            incoming = [g for g in (*grad_outputs, *ctx.saved_tensors) if isinstance(g, torch.Tensor) and g.requires_grad]
            if not incoming:
                return grads
            single = not isinstance(grads, tuple)
            seq = list((grads,) if single else grads)
            at = [i for i, g in enumerate(seq) if isinstance(g, torch.Tensor)]
            if at:
                tied = _SecondDerivative.apply(name, len(incoming), *incoming, *(seq[i] for i in at))
                for i, t in zip(at, tied if len(at) > 1 else (tied,)):
                    seq[i] = t
            return seq[0] if single else tuple(seq)

        return backward

    return wrap
