"""Triton kernels of the MaskFeat engine (HOG targets, relative-position attention) and their references."""
from __future__ import annotations

import os


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host code. ``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions
    whose call wrapper costs microseconds each; launch arithmetic runs on every call."""
    return -(-a // b)


def next_pow2(n: int, least: int = 1) -> int:
    """Smallest power of two ≥ n, and at least ``least`` (a block width floor), for host code
    (see :func:`cdiv`)."""
    return max(least, 1 if n <= 1 else 1 << (n - 1).bit_length())


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
