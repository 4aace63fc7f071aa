"""Reference of MViTv2's pooling convolution: a depthwise 3-D convolution without bias.

Semantics: exactly ``torch.nn.functional.conv3d(x, weight, None, stride, padding, 1, C)`` with
x (N, C, T, H, W) and weight (C, 1, kt, kh, kw) (official ``attention_pool``:
``nn.Conv3d(hd, hd, kernel, stride, kernel // 2, groups=hd, bias=False)``). Output
(N, C, To, Ho, Wo), ``To = (T + 2·pt − kt) // st + 1`` and likewise for H and W (floor mode).
On float64 copies it is the oracle of the tests.

:func:`check_inputs` is the argument check shared by every backend (ValueError with the reason).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["check_inputs", "depthwise_conv3d_reference", "out_size", "triple"]

IntOr3 = Union[int, Sequence[int]]


def _integer(v) -> Optional[int]:
    """``v`` as an int when it is an integer (numpy's and 0-d integer tensors too, as ``F.conv3d``
    takes them), else None; never a bool."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool:
        return int(v)
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):  # (numpy's bool is not Integral)
        return int(v)
    return None


def triple(v: IntOr3, name: str) -> tuple[int, int, int]:
    """``v`` as a (t, h, w) tuple of ints (an int stands for all three)."""
    one = _integer(v)
    if one is not None:
        return (one, one, one)
    try:
        out = tuple(_integer(e) for e in v)
    except TypeError:
        raise ValueError(f"{name} must be an int or 3 ints, got {v!r}") from None
    if len(out) != 3 or any(e is None for e in out):
        raise ValueError(f"{name} must be an int or 3 ints, got {v!r}")
    return out  # type: ignore[return-value]


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one axis (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def check_inputs(
    x: torch.Tensor, weight: torch.Tensor, stride: IntOr3, padding: IntOr3
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """Raise a ValueError for anything ``F.conv3d(x, weight, None, stride, padding, 1, C)`` would
    reject or that is not a depthwise pooling; return (kernel, stride, padding) as int triples."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"x must be a (N, C, T, H, W) tensor; got {getattr(x, 'shape', type(x))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        raise ValueError(f"weight must be a (C, 1, kt, kh, kw) tensor; got {getattr(weight, 'shape', type(weight))}")
    N, C, T, H, W = x.shape
    if C < 1:
        raise ValueError(f"x needs at least one channel; got shape {tuple(x.shape)}")
    if weight.shape[0] != C or weight.shape[1] != 1 or min(weight.shape[2:]) < 1:
        raise ValueError(f"weight must be (C={C}, 1, kt, kh, kw) for a depthwise convolution of x "
                         f"{tuple(x.shape)}; got {tuple(weight.shape)}")
    if not x.is_floating_point() or x.dtype != weight.dtype:
        raise ValueError(f"x and weight need the same floating dtype; got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on the same device; got {x.device} and {weight.device}")
    kernel = tuple(int(k) for k in weight.shape[2:])
    st, pad = triple(stride, "stride"), triple(padding, "padding")
    if min(st) < 1:
        raise ValueError(f"stride must be >= 1; got {st}")
    if min(pad) < 0:
        raise ValueError(f"padding must be >= 0; got {pad}")
    outs = [out_size(n, k, s, p) for n, k, s, p in zip((T, H, W), kernel, st, pad)]
    if min(outs) < 1:
        raise ValueError(f"input (T, H, W) {(T, H, W)} with padding {pad} is smaller than the kernel {kernel}")
    return kernel, st, pad  # type: ignore[return-value]


def depthwise_conv3d_reference(
    x: torch.Tensor, weight: torch.Tensor, stride: IntOr3 = 1, padding: IntOr3 = 0
) -> torch.Tensor:
    """``F.conv3d(x, weight, None, stride, padding, 1, C)`` (inputs checked first)."""
    _, st, pad = check_inputs(x, weight, stride, padding)
    return F.conv3d(x, weight, None, st, pad, 1, x.shape[1])
