"""Test-wide set-up.

Triton runs on CPU only through its interpreter, and TRITON_INTERPRET must be set before any
``@triton.jit`` decorator runs (DESIGN §4). This file is imported by pytest before any test module,
so kernels imported by tests are decorated in interpreter mode when no CUDA device is present.
"""
import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a set-up error reported elsewhere
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:  # forced: an exported TRITON_INTERPRET=0 made every kernel test fail on a CPU machine
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu_check)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # (keywords also hold parameter ids)
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    import torch

    return torch.device("cuda" if HAS_CUDA else "cpu")
