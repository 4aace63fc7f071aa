"""Plain PyTorch reference of the MaskFeat HOG target (the official ``HOGLayerC`` semantics).

Semantics (DESIGN §3.1; facebookresearch/SlowFast ``projects/maskfeat``, ``HOGLayerC``): each RGB
channel separately, reflect padding by 1, Sobel cross-correlation ``wx = [[1,0,-1],[2,0,-2],[1,0,-1]]``
and ``wy = wx.T`` (gx = left - right, gy = top - bottom), magnitude ``‖(gx, gy)‖``, orientation
``atan2(gx, gy) * nbins / pi`` (gx first), ``bin = floor(.) mod nbins`` (non-negative modulo, so the
orientation is unsigned), hard voting of magnitudes into non-overlapping ``cell x cell`` cells and
an L2 normalisation over the bins of each (channel, cell): ``x / max(‖x‖, 1e-12)``.

Options beyond the official target (not used by the official MaskFeat recipes):

- ``gaussian_window = g > 0`` (mmpretrain's ``HOGGenerator``): a g x g Gaussian with std g/2,
  normalised to sum 1, tiled over the frame in g-px patches starting at (0, 0) and multiplied into
  the magnitudes. H and W must be multiples of g.
- ``signed=True``: ``bin = floor(atan2(gx, gy) * nbins / (2 pi)) mod nbins`` (full circle).
- ``norm``: ``"none"`` (raw cell sums), ``"cell_l2"`` (official), ``"block_l2hys"``: blocks of 2x2
  cells with a stride of one cell, per channel; each block vector (4 * nbins values) is
  L2-normalised (``x / max(‖x‖, 1e-12)``), clipped at 0.2 and L2-normalised again (Dalal-Triggs
  L2-Hys). Each cell's output is the mean, over the blocks that contain it (1, 2 or 4 of them),
  of that cell's part of the normalised block vector; so the output keeps the cell layout and
  the per-token layout below. Needs at least 2 x 2 cells.

Per-token targets (SlowFast ``_get_hog_label_2d/3d``): for tokens of ``token_stride`` pixels, the
s x s cells under a token (s = token_stride / cell) are flattened with index
``((c * nbins + bin) * s + cy) * s + cx``: D = 3 * nbins * s^2 (108 for the defaults), tokens in
raster order.

The Sobel sums are formed as ``(left column) - (right column)`` (``top - bottom`` for gy), as the
tile kernel forms them, where the official code calls ``F.conv2d`` (the default cells kernel sums
row differences instead, ``(l0 - r0) + 2 (l1 - r1) + (l2 - r2)``: another float32 rounding,
closer to the float64 oracle (mean error 6e-5 against the reference's 1.5e-3 on three mean/std
normalised natural-image crops), so reference and cells targets differ by rounding there, up to a
bin flip, as DESIGN §3.1 allows). In exact arithmetic all are the
same; in float32 they differ by rounding, except on flat regions: there the convolution
leaves a rounding residue for many grey levels of a mean/std-normalised frame (144 of 256 levels
on the CPU), which the per-cell L2 turns into a unit vector in an arbitrary bin, where this form
gives exactly 0, as the kernels do. A letterboxed or flat background is thus a zero target here
on every backend, not rounding noise the model is asked to predict.

``dtype=torch.float64`` turns the reference into the oracle used by the tests: on integer-valued
inputs the gradients are exact and float64 ``atan2`` bins every integer gradient pair exactly
(checked exhaustively for |gx|, |gy| <= 1020 and many ``nbins``). In float32 (the official dtype)
vectors whose angle is close to a bin edge can land in the neighbouring bin, and an exactly
horizontal gradient whose gx is a rounding residue instead of 0 wraps from bin 0 to bin nbins-1.

Known limits: this is the slow, memory-hungry official formulation (it materialises an
(N, 3, nbins, H, W) tensor); it is the correctness oracle and the speed baseline, not a fast path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import autocast_disabled

NORMS = ("none", "cell_l2", "block_l2hys")
L2_EPS = 1e-12  # F.normalize's eps, as in the official code
L2HYS_CLIP = 0.2


def is_int(v) -> bool:
    """A Python int that is not a bool (``cell=True`` passed the checks and failed inside the kernels)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_hog_args(
    shape: tuple[int, ...],
    token_stride: int | None,
    cell: int,
    nbins: int,
    gaussian_window: int,
    norm: str,
    signed: bool = False,
) -> None:
    """Raise a clear ValueError for unsupported (N, 3, H, W) shapes or options."""
    if len(shape) != 4:
        raise ValueError(f"HOG expects frames of shape (N, 3, H, W), got a {len(shape)}-d tensor {tuple(shape)}")
    n, c, h, w = shape
    if c != 3:
        raise ValueError(f"HOG expects 3 (RGB) channels in dim 1, got {c} (shape {tuple(shape)})")
    if not is_int(cell) or cell < 1:
        raise ValueError(f"cell must be a positive int, got {cell!r}")
    if not is_int(nbins) or nbins < 2:
        raise ValueError(f"nbins must be an int >= 2, got {nbins!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(signed, bool):  # ("no" is truthy: it computed signed HOG)
        raise ValueError(f"signed must be True or False, got {signed!r}")
    if h % cell or w % cell or h == 0 or w == 0:
        raise ValueError(f"H and W must be positive multiples of cell={cell}, got H={h}, W={w}")
    if h < 2 or w < 2:  # (cell 1: the reference failed inside torch's padding)
        raise ValueError(f"HOG's reflect padding needs H, W >= 2, got H={h}, W={w}")
    if token_stride is not None:
        if not is_int(token_stride) or token_stride < cell or token_stride % cell:
            raise ValueError(f"token_stride must be a positive multiple of cell={cell}, got {token_stride!r}")
        if h % token_stride or w % token_stride:
            raise ValueError(f"H and W must be multiples of token_stride={token_stride}, got H={h}, W={w}")
    if not is_int(gaussian_window) or gaussian_window < 0 or gaussian_window == 1:
        raise ValueError(f"gaussian_window must be 0 (off) or an int >= 2, got {gaussian_window!r}")
    if gaussian_window and (h % gaussian_window or w % gaussian_window):
        raise ValueError(f"H and W must be multiples of gaussian_window={gaussian_window}, got H={h}, W={w}")
    if norm == "block_l2hys" and (h // cell < 2 or w // cell < 2):
        raise ValueError(f"norm='block_l2hys' needs at least 2x2 cells, got {h // cell}x{w // cell}")


def gaussian_window_1d(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-d factor of mmpretrain's window: w / sum(w), w = exp(-((i - mean) / (size/2))^2 / 2).

    The 2-d window is ``outer(w, w)`` (it sums to 1). Shape (size,).
    """
    n = torch.arange(size, dtype=torch.float64)
    n = (n - n.mean()) / (size // 2)
    w = torch.exp(-0.5 * n**2)
    return (w / w.sum()).to(dtype)


def gaussian_window_2d(size: int, dtype: torch.dtype) -> torch.Tensor:
    """mmpretrain's ``get_gaussian_kernel(size, size // 2)`` computed in ``dtype``. Shape (size, size)."""
    n = torch.arange(size, dtype=dtype)
    n = (n - n.mean()) / (size // 2)
    w = torch.exp(-0.5 * n**2)
    k = w[:, None] * w[None, :]
    return k / k.sum()


def block_l2hys(hist: torch.Tensor) -> torch.Tensor:
    """Cell-centred block L2-Hys normalisation (see the module docstring).

    hist: (N, 3, nbins, Hc, Wc) raw cell sums -> (N, 3, nbins, Hc, Wc) in hist's dtype.
    """
    n, c, nb, hc, wc = hist.shape
    # blocks[..., i, j, dy, dx] = hist[..., i + dy, j + dx]: (N, 3, nbins, Hc-1, Wc-1, 2, 2)
    blocks = hist.unfold(3, 2, 1).unfold(4, 2, 1)
    blk = blocks.permute(0, 1, 3, 4, 2, 5, 6)  # (N, 3, Hc-1, Wc-1, nbins, 2, 2)
    flat = blk.reshape(n, c, hc - 1, wc - 1, nb * 4)
    flat = F.normalize(flat, p=2, dim=-1, eps=L2_EPS).clamp(max=L2HYS_CLIP)
    flat = F.normalize(flat, p=2, dim=-1, eps=L2_EPS)
    normed = flat.reshape(n, c, hc - 1, wc - 1, nb, 2, 2).permute(0, 1, 4, 2, 3, 5, 6)  # (N,3,nb,Hc-1,Wc-1,2,2)
    out = torch.zeros_like(hist)
    count = torch.zeros((hc, wc), dtype=hist.dtype, device=hist.device)
    for dy in range(2):
        for dx in range(2):
            out[:, :, :, dy : dy + hc - 1, dx : dx + wc - 1] += normed[..., dy, dx]
            count[dy : dy + hc - 1, dx : dx + wc - 1] += 1
    return out / count


def hog_reference(
    frames: torch.Tensor,
    *,
    cell: int = 8,
    nbins: int = 9,
    gaussian_window: int = 0,
    signed: bool = False,
    norm: str = "cell_l2",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Official HOGLayerC cell histograms. frames (N, 3, H, W) any dtype -> (N, 3, nbins, H/cell, W/cell) in dtype.

    ``dtype=torch.float32`` is the official computation; ``torch.float64`` is the test oracle.
    Runs with autocast disabled, so an enclosing ``torch.autocast`` does not turn the Sobel
    convolution into bf16/fp16 (the target is computed in ``dtype`` regardless).
    """
    check_hog_args(tuple(frames.shape), None, cell, nbins, gaussian_window, norm, signed)
    with autocast_disabled(frames.device):
        return _hog_reference(frames, cell, nbins, gaussian_window, signed, norm, dtype)


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of the reflect-padded frames ``x`` (N, 3, H + 2, W + 2): the official cross-correlation
    with ``wx = [[1,0,-1],[2,0,-2],[1,0,-1]]`` and ``wy = wx.T``, summed as the kernels sum it,
    ``(left column) - (right column)`` and ``(top row) - (bottom row)``: on a flat region both sides
    are the same sum, so the gradient is exactly 0 (see the module docstring)."""
    h, w = x.shape[-2] - 2, x.shape[-1] - 2

    def at(dy: int, dx: int) -> torch.Tensor:
        return x[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, -1) + 2.0 * at(0, -1) + at(1, -1)) - (at(-1, 1) + 2.0 * at(0, 1) + at(1, 1))
    gy = (at(-1, -1) + 2.0 * at(-1, 0) + at(-1, 1)) - (at(1, -1) + 2.0 * at(1, 0) + at(1, 1))
    return gx, gy


def _hog_reference(
    frames: torch.Tensor, cell: int, nbins: int, gaussian_window: int, signed: bool, norm: str, dtype: torch.dtype
) -> torch.Tensor:
    """Body of :func:`hog_reference` (arguments already checked; called with autocast off)."""
    x = F.pad(frames.to(dtype), pad=(1, 1, 1, 1), mode="reflect")
    gx, gy = sobel(x)  # (N, 3, H, W)
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1)
    period = 2 * math.pi if signed else math.pi
    phase = torch.atan2(gx, gy) / period * nbins

    n, c, h, w = mag.shape
    if gaussian_window:
        g = gaussian_window_2d(gaussian_window, dtype).to(x.device)
        mag = mag * g.repeat(h // gaussian_window, w // gaussian_window)
    out = torch.zeros((n, c, nbins, h, w), dtype=dtype, device=x.device)
    out.scatter_add_(2, (phase.floor().long() % nbins).view(n, c, 1, h, w), mag.view(n, c, 1, h, w))
    out = out.unfold(3, cell, cell).unfold(4, cell, cell).sum(dim=(-1, -2))  # (N, 3, nbins, Hc, Wc)
    if norm == "cell_l2":
        out = F.normalize(out, p=2, dim=2, eps=L2_EPS)
    elif norm == "block_l2hys":
        out = block_l2hys(out)
    return out


def cells_to_tokens(hist: torch.Tensor, token_stride: int, cell: int) -> torch.Tensor:
    """(N, 3, nbins, Hc, Wc) -> (N, L, D): the s x s cells under each token, index ((c*nbins+bin)*s+cy)*s+cx."""
    s = token_stride // cell
    n, c, nb, hc, wc = hist.shape
    t = hist.flatten(1, 2).permute(0, 2, 3, 1)  # (N, Hc, Wc, 3*nbins)
    t = t.unfold(1, s, s).unfold(2, s, s)  # (N, Hc/s, Wc/s, 3*nbins, s, s)
    return t.flatten(1, 2).flatten(2)  # (N, L, D)


def tokens_to_cells(tokens: torch.Tensor, hw_tokens: tuple[int, int], nbins: int, s: int) -> torch.Tensor:
    """Inverse of :func:`cells_to_tokens`: (N, L, D) -> (N, 3, nbins, Hc, Wc)."""
    n = tokens.shape[0]
    ht, wt = hw_tokens
    t = tokens.view(n, ht, wt, 3, nbins, s, s)
    return t.permute(0, 3, 4, 1, 5, 2, 6).reshape(n, 3, nbins, ht * s, wt * s)


def hog_targets_reference(
    frames: torch.Tensor,
    token_stride: int = 16,
    *,
    cell: int = 8,
    nbins: int = 9,
    gaussian_window: int = 0,
    signed: bool = False,
    norm: str = "cell_l2",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token targets of the reference: frames (N, 3, H, W) -> (N, L, D) in dtype, without gradient
    (targets, like the Triton kernel's)."""
    check_hog_args(tuple(frames.shape), token_stride, cell, nbins, gaussian_window, norm, signed)
    with torch.no_grad():
        hist = hog_reference(
            frames, cell=cell, nbins=nbins, gaussian_window=gaussian_window, signed=signed, norm=norm, dtype=dtype
        )
        return cells_to_tokens(hist, token_stride, cell)
