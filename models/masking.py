"""MaskFeat mask generators: cube, tube and frame masking for video, block masking for images.

Semantics (DESIGN §3.2; the official code is authoritative for details):

- **cube** (video default) follows SlowFast ``MaskingGenerator3D`` as called by
  ``Kinetics._gen_mask``: it works on the *unit grid* (T', H'/2, W'/2), where one unit is one
  temporal token x 2x2 output tokens (32x32 px for MViTv2 16x224x224). It masks
  ``round(ratio·T'·Hu·Wu)`` units (0.4·8·49 -> 157). Each round makes up to 100 block attempts:
  area ~ U(min, max) with max = Hu·Wu and min = max // 5 (49 -> U(9, 49); the bound is *not*
  reduced to the remaining count, as in the official 3-D generator), aspect ratio log-uniform in
  [0.3, 1/0.3], h = round(√(area·ar)), w = round(√(area/ar)), temporal length t ~ randint(1, T')
  (both ends inclusive), position uniform over all placements that fit; a block is considered
  only when h < Hu and w < Wu (strict) and is accepted when it adds > 0 and <= remaining units.
  A round ends at the first accepted block; masking stops when the target is reached or a round
  accepts nothing. The unit mask is then repeated x2 along H and W to the output-token grid.
- **tube** follows the ``MASK_TUBE`` branch: the 2-D BEiT/SlowFast ``MaskingGenerator`` on the
  spatial unit grid (Hu, Wu) with target ``round(ratio·Hu·Wu)``, min block = target // 5, max
  block = target, 10 attempts per round and the area bound reduced to the remaining count
  (the 2-D generator does this), then repeated over all T' and x2 spatially.
- **frame** follows the ``MASK_FRAMES`` branch: ``round(ratio·T')`` whole temporal slices drawn
  without replacement.
- **image_block** is BEiT's block-wise ``MaskingGenerator`` on the ViT grid (14x14): 78 patches
  (= round(0.4·196)), min block = the mask count // 5 (15; DESIGN §3.2, and SlowFast's
  ``ImageNet._prepare_im_masked``: ``min_mask = num_mask // 5``, where BEiT's own recipe uses 16),
  max block = the mask count, aspect 0.3-3.33, 10 attempts per round with the area bound reduced
  to the remaining count.

Python's ``round`` (half to even) is used for targets and block sides, like the official code.

Faithfulness and known limits:

- Like the official generators, none of these tops a mask up: when a round accepts nothing the
  mask keeps fewer than the target. This is frequent for cubes (min block 9 units, at most 100
  tries to add <= the few remaining units). Measured over 10,000 masks each (``python -m
  models.masking``), share of masks short of the target (mean / max shortfall in units):
  cube (8,14,14) ratio 0.2: 70.0 % (2.64 / 30), 0.4: 65.3 % (1.38 / 15, i.e. mean 155.6 of 157
  units), 0.6: 38.0 % (0.54 / 7), 0.8: 14.5 % (0.18 / 11); tube ratio 0.2: 0.3 %, 0.4: 2.9 %,
  0.6: 6.0 %, 0.8: 14.6 % (max 39 = an empty mask, 8 in 20,000 at 0.8: all 10 first-round tries
  had h or w >= 7); image 14x14 / 78: 29.2 % (0.43 / 9). The tests check these rates against a
  literal Python-``random`` restatement of the official loop. Frame masks are always exact.
- Randomness comes from a ``numpy.random.Generator`` instead of Python's ``random`` module, so
  masks are not bit-identical to the official ones for any seed; the distribution is the same.
  Within a round all candidate blocks are drawn at once and checked against a summed-area table
  of the current mask; the first acceptable candidate in draw order is taken, which is exactly
  the sequential rule (the round's mask does not change before its first acceptance).
- Tube: the official branch tiles over a hard-coded 8 frames and needs a 2-D mask window
  ((7, 7) -> 20 units at 0.4); here the 2-D mask is repeated over the given T'.
- Speed (``python -m bench.masking``, one thread, CPU time, 2-core CI box under load):
  about 2,700 cube masks/s for (8,14,14) in batches of 32 (``make_masks("cube", 32,
  (8, 14, 14))``; ~1,100/s wall-clock while the box ran other jobs at load 7), ~3,700/s for
  image blocks, ~14,000/s for frames.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = [
    "MASK_KINDS",
    "BlockMaskResult",
    "sample_block_mask",
    "cube_unit_mask",
    "tube_unit_mask",
    "cube_mask",
    "tube_mask",
    "frame_mask",
    "image_block_mask",
    "make_masks",
    "upsample_mask",
]

MASK_KINDS = ("cube", "tube", "frame", "image_block")

# Official constants (SlowFast MaskingGenerator / MaskingGenerator3D, BEiT MaskingGenerator).
_ASPECT = (0.3, 1 / 0.3)
_ATTEMPTS_3D = 100  # MaskingGenerator3D._mask: `for _ in range(100)`
_ATTEMPTS_2D = 10  # MaskingGenerator._mask (SlowFast and BEiT): `for _ in range(10)`
_UNIT = 2  # one cube/tube unit = 2x2 output tokens


@dataclass
class BlockMaskResult:
    """Result of :func:`sample_block_mask`.

    ``mask`` is the (T, H, W) boolean unit mask; ``blocks`` lists every accepted block as
    ``(front, top, left, t, h, w)`` in acceptance order; ``target`` is the requested count.
    """

    mask: np.ndarray
    blocks: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    target: int = 0

    @property
    def count(self) -> int:
        return int(self.mask.sum())


def _check_rng(rng: Optional[np.random.Generator]) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}; "
            "use numpy.random.default_rng(seed)"
        )
    return rng


def _check_ratio(ratio: float) -> float:
    """A real number in (0, 1): Python's, numpy's (np.float32 too) or a one-element tensor's."""
    if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, (numbers.Real, np.generic, torch.Tensor)):
        raise ValueError(f"mask ratio must be a number in (0, 1), got {ratio!r}")
    try:
        value = float(ratio)
    except (TypeError, ValueError, RuntimeError):  # (a tensor of several elements)
        raise ValueError(f"mask ratio must be a number in (0, 1), got {ratio!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"mask ratio must be a number in (0, 1), got {ratio!r}")
    return value


def _check_grid(grid: Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    grid = tuple(grid)
    if len(grid) != ndim or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid):
        raise ValueError(f"{name} must be {ndim} positive integers, got {grid!r}")
    return tuple(int(g) for g in grid)


def _unit_grid(grid_thw: Sequence[int]) -> tuple[int, int, int]:
    """(T', H', W') output-token grid -> (T', Hu, Wu) unit grid, checking divisibility."""
    T, H, W = _check_grid(grid_thw, 3, "grid_thw")
    if H % _UNIT or W % _UNIT:
        raise ValueError(
            f"cube/tube masking needs H' and W' divisible by {_UNIT} (one unit = {_UNIT}x{_UNIT} "
            f"output tokens), got grid {(T, H, W)}"
        )
    Hu, Wu = H // _UNIT, W // _UNIT
    if Hu < 2 or Wu < 2:
        raise ValueError(
            f"cube/tube masking needs a unit grid of at least 2x2 (blocks must satisfy h < Hu and "
            f"w < Wu), got unit grid {(Hu, Wu)} from {(T, H, W)}"
        )
    return T, Hu, Wu


def _target(ratio: float, n: int, what: str) -> int:
    k = round(ratio * n)
    if k < 1:
        raise ValueError(f"ratio {ratio} masks nothing on {what} ({n} positions)")
    return k


def sample_block_mask(
    shape_thw: tuple[int, int, int],
    target: int,
    min_area: float,
    max_area: float,
    attempts: int,
    cap_area_by_remaining: bool,
    rng: np.random.Generator,
    aspect: tuple[float, float] = _ASPECT,
) -> BlockMaskResult:
    """The BEiT/SlowFast block-masking procedure on a (T, H, W) grid (T = 1 for 2-D masks).

    Each round draws ``attempts`` candidate blocks: area ~ U(min_area, bound) where bound is
    ``min(remaining, max_area)`` when ``cap_area_by_remaining`` (2-D generator) else
    ``max_area`` (3-D generator); log-uniform aspect in ``aspect``; h = round(√(area·ar)),
    w = round(√(area/ar)); t ~ randint(1, T) inclusive; a uniformly placed block that fits.
    Candidates with h >= H or w >= W are skipped; the first candidate that adds > 0 and
    <= bound cells (2-D; 3-D: <= remaining, as the official generators) is accepted and ends the
    round. Stops at the target or after a round
    with no acceptance (no top-up, like the official code).
    """
    T, H, W = shape_thw
    mask = np.zeros((T, H, W), dtype=np.int32)
    # Summed-area table: S[i, j, k] = mask[:i, :j, :k].sum()   # (T+1, H+1, W+1)
    S = np.zeros((T + 1, H + 1, W + 1), dtype=np.int32)
    lo_ar, hi_ar = math.log(aspect[0]), math.log(aspect[1])
    blocks: list[tuple[int, int, int, int, int, int]] = []
    count = 0
    while count < target:
        remaining = target - count
        hi_area = min(remaining, max_area) if cap_area_by_remaining else max_area
        n = attempts
        # random.uniform(a, b) == a + (b - a) * random(), also when b < a (2-D generator when
        # the remaining count is below the minimum block).
        area = min_area + (hi_area - min_area) * rng.random(n)
        ar = np.exp(lo_ar + (hi_ar - lo_ar) * rng.random(n))
        h = np.round(np.sqrt(area * ar)).astype(np.int64)
        w = np.round(np.sqrt(area / ar)).astype(np.int64)
        t = rng.integers(1, T + 1, size=n)  # randint(1, T), inclusive
        u = rng.random((3, n))
        ok = (h < H) & (w < W)
        # Uniform placement: randint(0, X - x) inclusive == floor(u * (X - x + 1)).
        top = np.floor(u[0] * np.maximum(H - h + 1, 1)).astype(np.int64)
        left = np.floor(u[1] * np.maximum(W - w + 1, 1)).astype(np.int64)
        front = np.floor(u[2] * (T - t + 1)).astype(np.int64)
        # Cells already masked inside each candidate (8-corner inclusion-exclusion).
        f0, f1 = front, front + t
        t0, t1 = top, np.minimum(top + h, H)
        l0, l1 = left, np.minimum(left + w, W)
        inside = (
            S[f1, t1, l1] - S[f0, t1, l1] - S[f1, t0, l1] - S[f1, t1, l0]
            + S[f0, t0, l1] + S[f0, t1, l0] + S[f1, t0, l0] - S[f0, t0, l0]
        )
        new = t * h * w - inside
        accept = ok & (new > 0) & (new <= (hi_area if cap_area_by_remaining else remaining))
        idx = np.flatnonzero(accept)
        if idx.size == 0:
            break
        i = int(idx[0])
        fi, ti, li, tt, hh, ww = int(f0[i]), int(t0[i]), int(l0[i]), int(t[i]), int(h[i]), int(w[i])
        mask[fi:fi + tt, ti:ti + hh, li:li + ww] = 1
        blocks.append((fi, ti, li, tt, hh, ww))
        count += int(new[i])
        S[1:, 1:, 1:] = mask.cumsum(0).cumsum(1).cumsum(2)
    return BlockMaskResult(mask=mask.astype(bool), blocks=blocks, target=target)


def cube_unit_mask(
    grid_thw: tuple[int, int, int], ratio: float = 0.4, rng: Optional[np.random.Generator] = None
) -> BlockMaskResult:
    """Cube masking on the unit grid (T', H'/2, W'/2) with the accepted blocks (for checks)."""
    ratio = _check_ratio(ratio)
    rng = _check_rng(rng)
    T, Hu, Wu = _unit_grid(grid_thw)
    target = _target(ratio, T * Hu * Wu, f"unit grid {(T, Hu, Wu)}")
    max_area = Hu * Wu  # official: prod(MASK_WINDOW_SIZE[1:])
    min_area = max_area // 5  # official: max_mask // 5
    return sample_block_mask(
        (T, Hu, Wu), target, min_area, max_area, _ATTEMPTS_3D, False, rng
    )


def tube_unit_mask(
    grid_thw: tuple[int, int, int], ratio: float = 0.4, rng: Optional[np.random.Generator] = None
) -> BlockMaskResult:
    """The 2-D block mask of tube masking on the spatial unit grid, as a (1, Hu, Wu) result."""
    ratio = _check_ratio(ratio)
    rng = _check_rng(rng)
    _, Hu, Wu = _unit_grid(grid_thw)
    target = _target(ratio, Hu * Wu, f"spatial unit grid {(Hu, Wu)}")
    # official MASK_TUBE: min_num_patches = num_masking_patches // 5, max_num_patches = None
    return sample_block_mask((1, Hu, Wu), target, target // 5, target, _ATTEMPTS_2D, True, rng)


def _units_to_tokens(unit_mask: np.ndarray) -> torch.Tensor:
    """(T, Hu, Wu) -> (T, 2·Hu, 2·Wu) nearest repeat, as a bool tensor."""
    m = unit_mask.repeat(_UNIT, axis=1).repeat(_UNIT, axis=2)  # (T, H, W)
    return torch.from_numpy(np.ascontiguousarray(m))


def cube_mask(
    grid_thw: tuple[int, int, int], ratio: float = 0.4, rng: Optional[np.random.Generator] = None
) -> torch.Tensor:
    """Cube mask at the output-token grid, bool (T', H', W'); True = masked.

    ``grid_thw`` is the output-token grid, e.g. (8, 14, 14); masking runs on (T', H'/2, W'/2)
    units and each unit covers 2x2 output tokens.
    """
    return _units_to_tokens(cube_unit_mask(grid_thw, ratio, rng).mask)


def tube_mask(
    grid_thw: tuple[int, int, int], ratio: float = 0.4, rng: Optional[np.random.Generator] = None
) -> torch.Tensor:
    """Tube mask at the output-token grid, bool (T', H', W'): one 2-D block mask for all T'."""
    T = _check_grid(grid_thw, 3, "grid_thw")[0]
    unit = tube_unit_mask(grid_thw, ratio, rng).mask  # (1, Hu, Wu)
    return _units_to_tokens(np.repeat(unit, T, axis=0))


def frame_mask(
    grid_thw: tuple[int, int, int], ratio: float = 0.4, rng: Optional[np.random.Generator] = None
) -> torch.Tensor:
    """Frame mask, bool (T', H', W'): ``round(ratio·T')`` whole temporal slices chosen at random."""
    ratio = _check_ratio(ratio)
    rng = _check_rng(rng)
    T, H, W = _check_grid(grid_thw, 3, "grid_thw")
    n = _target(ratio, T, f"{T} temporal slices")
    mask = torch.zeros(T, H, W, dtype=torch.bool)
    mask[torch.from_numpy(rng.choice(T, size=n, replace=False))] = True
    return mask


def image_block_mask(
    grid_hw: tuple[int, int] = (14, 14),
    num_masked: int = 78,
    rng: Optional[np.random.Generator] = None,
    *,
    min_block: Optional[int] = None,
    aspect: tuple[float, float] = _ASPECT,
) -> torch.Tensor:
    """BEiT block-wise mask, bool (H', W'), aiming at ``num_masked`` patches.

    The BEiT/SlowFast ``MaskingGenerator`` with ``min_num_patches=min_block`` and
    ``max_num_patches=None`` (i.e. the mask count). ``min_block=None`` is the official MaskFeat
    image rule, ``num_masked // 5`` (15 of 78 on 14x14; BEiT's own recipe passes 16).
    """
    rng = _check_rng(rng)
    H, W = _check_grid(grid_hw, 2, "grid_hw")
    if H < 2 or W < 2:
        raise ValueError(f"image block masking needs a grid of at least 2x2, got {(H, W)}")
    if isinstance(num_masked, bool) or not isinstance(num_masked, (int, np.integer)) or not (
        0 < num_masked < H * W
    ):
        raise ValueError(f"num_masked must be an integer in [1, {H * W - 1}], got {num_masked!r}")
    if not (0 < aspect[0] <= aspect[1]):
        raise ValueError(f"aspect must be (min, max) with 0 < min <= max, got {aspect!r}")
    if min_block is None:
        min_block = int(num_masked) // 5
    res = sample_block_mask(
        (1, H, W), int(num_masked), min_block, int(num_masked), _ATTEMPTS_2D, True, rng, aspect
    )
    return torch.from_numpy(res.mask[0])


def make_masks(
    kind: str,
    batch: int,
    grid: tuple[int, ...],
    ratio: float = 0.4,
    rng: Optional[np.random.Generator] = None,
) -> torch.Tensor:
    """``batch`` independent masks of one kind, bool (B, *grid); True = masked.

    ``grid`` is (T', H', W') for "cube", "tube", "frame" and (H', W') for "image_block", whose
    mask count is ``round(ratio·H'·W')`` (0.4 on 14x14 -> 78).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    ratio = _check_ratio(ratio)
    rng = _check_rng(rng)
    if kind == "image_block":
        H, W = _check_grid(grid, 2, "grid for image_block")
        n = _target(ratio, H * W, f"grid {(H, W)}")
        masks = [image_block_mask((H, W), n, rng) for _ in range(batch)]
    else:
        fn = {"cube": cube_mask, "tube": tube_mask, "frame": frame_mask}[kind]
        masks = [fn(tuple(grid), ratio, rng) for _ in range(batch)]
    return torch.stack(masks)  # (B, *grid)


def upsample_mask(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest upsampling of a (B, *grid) mask to (B, *size) by integer factors per dimension.

    E.g. (B, 8, 14, 14) -> (B, 8, 56, 56) repeats each token 1x4x4 (the patch-embedding grid).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    grid = tuple(mask.shape[1:])
    size = tuple(int(s) for s in size)
    if mask.dim() < 2 or len(size) != len(grid):
        raise ValueError(
            f"mask must be (B, *grid) and size must have len(grid) entries; got mask "
            f"{tuple(mask.shape)} and size {size}"
        )
    out = mask.bool()
    for d, (g, s) in enumerate(zip(grid, size)):
        if g < 1 or s < g or s % g:
            raise ValueError(
                f"upsample_mask needs integer factors >= 1: dim {d} goes {g} -> {s} "
                f"(mask {tuple(mask.shape)}, size {size})"
            )
        if s != g:
            out = out.repeat_interleave(s // g, dim=d + 1)
    return out
