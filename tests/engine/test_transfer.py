"""Host/device transfers of the training loop that must not make the CPU wait for the GPU:
``engine.data.transfer.to_device`` (labels, indices, masks) and ``engine.runner._ReadBack`` (the
step's loss and grad norm). On CPU they are plain copies; the GPU tests check the CUDA paths'
values (that they do not wait is a property of pinned memory and events, not testable here)."""
from __future__ import annotations

import pytest
import torch

from engine.data.transfer import to_device
from engine.runner import _ReadBack


def test_to_device_on_cpu_converts_and_keeps_values():
    t = torch.tensor([3, 0, 7], dtype=torch.uint8)
    assert to_device(t, torch.device("cpu"), torch.bool).tolist() == [True, False, True]
    y = to_device(t, torch.device("cpu"), torch.int64)
    assert y.dtype == torch.int64 and y.tolist() == [3, 0, 7]
    assert to_device(t, torch.device("cpu")) is t  # nothing to do


def test_read_back_on_cpu():
    rb = _ReadBack(torch.tensor(1.5), torch.tensor(float("nan")))
    assert rb.ready()
    loss, gn = rb.value()
    assert loss == 1.5 and gn != gn
    assert _ReadBack(torch.tensor(2.5), 0.25).value() == (2.5, 0.25)  # a grad norm already on the host


@pytest.mark.gpu
def test_to_device_cuda_values_and_owned_source():
    dev = torch.device("cuda")
    t = torch.arange(1000, dtype=torch.int32)
    y = to_device(t, dev, torch.int64)
    assert y.device.type == "cuda" and y.dtype == torch.int64
    pinned = torch.arange(1000, dtype=torch.int64).pin_memory()
    z = to_device(pinned, dev)
    pinned.fill_(-1)  # a reused loader buffer: the copy must not see this
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), torch.arange(1000)) and torch.equal(z.cpu(), torch.arange(1000))


@pytest.mark.gpu
def test_read_back_cuda_waits_for_its_copy_only():
    x = torch.full((4096, 4096), 2.0, device="cuda")
    loss = (x @ x).mean()  # queued
    rb = _ReadBack(loss, loss * 0 + 3)
    assert rb.value() == (2.0 * 2.0 * 4096, 3.0)
    assert rb.ready()
    assert _ReadBack(loss, torch.tensor(0.5)).value() == (2.0 * 2.0 * 4096, 0.5)  # a CPU grad norm (offload)
