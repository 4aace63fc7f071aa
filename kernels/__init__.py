"""Triton kernels of the MaskFeat engine (HOG targets, relative-position attention) and their references."""
from __future__ import annotations


def compiling_offline() -> bool:
    """True while ``bench.sass.capture_launches`` is active: Triton's JIT sees a stand-in driver for
    a GPU this machine lacks, launches are recorded and compiled for it, never run. Launchers then
    accept CPU tensors (only their shapes, strides and alignment matter)."""
    from triton.runtime.driver import driver

    # the private slot: ``driver.active`` would try to create a CUDA driver and raise on a CPU machine
    return getattr(driver._active, "offline", False) is True
