"""MViTv2 backbone (video and image) with the official SlowFast semantics (DESIGN §3.4).

Semantics follow facebookresearch/SlowFast ``slowfast/models/video_model_builder.py`` (class
``MViT``) and ``slowfast/models/attention.py`` (``MultiScaleBlock``, ``MultiScaleAttention``,
``attention_pool``, ``get_rel_pos``); this is an independent re-implementation:

- Patch embedding ``patch_embed.proj``: Conv3d(3, C, (3,7,7), (2,4,4), (1,3,3)) for video,
  Conv2d(3, C, 7, 4, 3) for images (``patch_2d``; tokens then live on a T=1 grid), or the ViT
  Conv2d(3, C, 16, 16) (see ``models/vit.py``, which configures this same class).
- cls token; optional absolute position embedding (ViT); decomposed relative positions
  ``rel_pos_{t,h,w}`` in every attention, tables sized per block exactly like the official code
  (``2·max(q, kv) − 1`` from the block's nominal input size) and linearly interpolated at run
  time when the actual grid differs (official ``get_rel_pos``).
- Pooling attention: one qkv Linear (bias), Q/K/V pooled with depthwise Conv3d(hd, hd, kernel,
  stride, kernel//2, groups=hd, bias=False) shared across heads, cls split off before and
  re-attached before LayerNorm(hd); residual pooling adds pooled q to the non-cls outputs.
  ``pool_backend`` picks who runs those convolutions, with the same ``nn.Conv3d`` weights (same
  state_dict keys): "auto" (default) ``kernels.pool``'s Triton kernels for the large ones on an sm_90 GPU
  (``kernels.pool.auto_backend``) and torch's for the rest, "triton" Triton's for all, "torch"
  torch's for all.
- Pooling schedule: per-block Q strides (official ``POOL_Q_STRIDE``), kernel ``POOL_KVQ_KERNEL``
  (else ``s+1 if s>1 else s``), KV strides adaptive from ``POOL_KV_STRIDE_ADAPTIVE`` divided by
  each Q stride; skip connection pooled by MaxPool3d(s+1 if s>1 else s, s, k//2) where the Q
  stride is > 1.
- Channel/head doubling (``DIM_MUL``/``HEAD_MUL`` with the official ``round_width``) in both
  ``dim_mul_in_att`` modes: True (supervised MViTv2: qkv projects to the new width, shortcut
  projection from the normed input before attention) and False (MaskFeat checkpoints: the MLP
  outputs the new width and the shortcut projection takes the normed input of the MLP).
- LayerNorm eps 1e-6, MLP ratio 4 with exact GELU, stochastic depth linearly increasing.
- Init (official ``_init_weights``): trunc_normal(0.02) for Linear/Conv weights, Linear biases
  0.02, LayerNorm weight 1 and bias 0.02; conv biases keep PyTorch's default init; cls token,
  absolute position embedding and relative tables trunc_normal(0.02).

Module attribute names equal the official ones, so ``state_dict()`` keys are the official keys
(``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight``, ``blocks.N.attn.rel_pos_h``, ...).

Every block is ``block(x, thw) -> (x, thw)``, a pure function of its inputs, held in
``self.blocks`` (an ``nn.ModuleList``): activation checkpointing is applied from outside by
wrapping or replacing ``blocks[i]``. Known limits: ``pool_first``, ``separate_qkv``, avg/max
pooling modes, layer scale and reversible MViT are not implemented (no MaskFeat recipe uses them).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import launchable_on
from kernels.attention import BACKENDS as ATTN_BACKENDS
from kernels.attention import relpos_attention
from kernels.pool import auto_backend, autocast_dtype, depthwise_conv3d

POOL_BACKENDS = ("auto", "torch", "triton")
PLAIN_ATTN_BACKENDS = ("auto", "reference", "sdpa")
"""The attention backends of a block without relative positions (a ViT): ``auto`` is SDPA."""

__all__ = [
    "MViT",
    "MultiScaleBlock",
    "MultiScaleAttention",
    "Mlp",
    "DropPath",
    "PatchEmbed",
    "attention_pool",
    "resize_rel_pos",
    "round_width",
    "pooling_schedule",
    "conv_out_size",
    "init_weights",
    "PLAIN_ATTN_BACKENDS",
    "POOL_BACKENDS",
]

Thw = tuple[int, int, int]


# ----------------------------------------------------------------------------- helpers


def round_width(width: float, multiplier: float, min_width: int = 1, divisor: int = 1) -> int:
    """The official MViT ``round_width``: scale ``width`` and round to a multiple of ``divisor``."""
    if not multiplier:
        return int(width)
    width = width * multiplier
    min_width = min_width or divisor
    width_out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if width_out < 0.9 * width:
        width_out += divisor
    return int(width_out)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution/pooling along one axis (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def resize_rel_pos(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Linearly interpolate a relative-position table (L, hd) to (new_len, hd).

    Same as the official ``get_rel_pos``: ``F.interpolate(mode="linear", align_corners=False)``
    along the table axis; returns ``table`` itself when the length already matches.
    """
    if table.dim() != 2:
        raise ValueError(f"relative-position table must be (L, hd); got {tuple(table.shape)}")
    if new_len < 1:
        raise ValueError(f"new_len must be >= 1, got {new_len}")
    old_len = table.shape[0]
    if old_len == new_len:
        return table
    out = F.interpolate(table.t()[None], size=new_len, mode="linear")  # (1, hd, new_len)
    return out[0].t()  # (new_len, hd)


def pooling_schedule(
    depth: int,
    pool_q_stride: Sequence[Sequence[int]],
    pool_kvq_kernel: Optional[Sequence[int]],
    pool_kv_stride_adaptive: Optional[Sequence[int]],
    pool_kv_stride: Sequence[Sequence[int]] = (),
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """Per-block ``(kernel_q, stride_q, kernel_kv, stride_kv)`` lists as the official MViT builds them.

    ``pool_q_stride`` entries are ``[block, s_t, s_h, s_w]`` (official ``POOL_Q_STRIDE``); a
    block without an entry gets empty lists (no pooling). ``pool_kv_stride_adaptive`` overrides
    ``pool_kv_stride``: the KV stride starts there and is divided (floor, min 1) by every Q stride.
    """
    stride_q: list[list[int]] = [[] for _ in range(depth)]
    kernel_q: list[list[int]] = [[] for _ in range(depth)]
    stride_kv: list[list[int]] = [[] for _ in range(depth)]
    kernel_kv: list[list[int]] = [[] for _ in range(depth)]
    for entry in pool_q_stride:
        i, st = int(entry[0]), [int(s) for s in entry[1:]]
        if not 0 <= i < depth:
            raise ValueError(f"pool_q_stride entry {list(entry)} names block {i} but depth is {depth}")
        stride_q[i] = st
        kernel_q[i] = list(pool_kvq_kernel) if pool_kvq_kernel is not None else [s + 1 if s > 1 else s for s in st]
    kv_entries: list[list[int]] = [list(e) for e in pool_kv_stride]
    if pool_kv_stride_adaptive is not None:
        cur = [int(s) for s in pool_kv_stride_adaptive]
        kv_entries = []
        for i in range(depth):
            if len(stride_q[i]) > 0:
                cur = [max(cur[d] // stride_q[i][d], 1) for d in range(len(cur))]
            kv_entries.append([i] + cur)
    for entry in kv_entries:
        i, st = int(entry[0]), [int(s) for s in entry[1:]]
        stride_kv[i] = st
        kernel_kv[i] = list(pool_kvq_kernel) if pool_kvq_kernel is not None else [s + 1 if s > 1 else s for s in st]
    return kernel_q, stride_q, kernel_kv, stride_kv


def same_dtype(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype. Under ``torch.autocast`` the pooled ones come out of their LayerNorm in
    fp32 (CUDA autocast runs layer_norm in fp32) while an unpooled one stays in the autocast dtype:
    the attention refused the mix (the official ``q @ k.T`` is autocast). Under autocast fp32 ones
    take its dtype, as its matmuls would; otherwise the widest dtype."""
    if all(t.dtype == ts[0].dtype for t in ts):
        return ts
    device = ts[0].device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        return tuple(t.to(low) if t.dtype == torch.float32 else t for t in ts)
    wide = ts[0].dtype
    for t in ts[1:]:
        wide = torch.promote_types(wide, t.dtype)
    return tuple(t.to(wide) for t in ts)


def attention_pool(
    x: torch.Tensor,
    pool: Optional[nn.Module],
    thw: Thw,
    has_cls: bool = True,
    norm: Optional[nn.Module] = None,
) -> tuple[torch.Tensor, Thw]:
    """Pool tokens on their (T, H, W) grid, cls split off before and re-attached before ``norm``.

    x (B, nh, N, hd) or (B, N, C); returns the pooled tensor of the same rank and its new grid.
    Matches the official ``attention_pool`` (the norm also sees the cls token).
    """
    if pool is None:
        return x, thw
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)  # (B, 1, N, C)
    elif x.dim() != 4:
        raise ValueError(f"attention_pool expects a 3-D or 4-D tensor, got {tuple(x.shape)}")
    if has_cls:
        # split, not two slices: its backward is one cat, where two slices' are two zero-filled
        # full-size tensors and an add (fewer ops for the host to issue, same values)
        cls_tok, x = x.split((1, x.shape[2] - 1), dim=2)
    B, nh, L, C = x.shape
    T, H, W = thw
    if L != T * H * W:
        raise ValueError(f"{L} tokens do not fit the grid {tuple(thw)}")
    # (B·nh, C, T, H, W) contiguous, as the official code's .contiguous() after its permute. Not a
    # channels-last view of (B·nh, T, H, W, C): torch sends a channels-last depthwise conv to cuDNN,
    # where these convolutions took 279 ms of a 416 ms MViTv2-L step on an H200, mostly its bf16 3-D
    # depthwise weight gradient (bench/results/pool_conv_nvidia-h200_20261128.md, model_step_…_before.md);
    # a contiguous 5-D depthwise conv
    # runs torch's own depthwise-3D kernels (bench/pool_conv.py). One copy either way (where the
    # reshape is a view, at B 1 or nh 1, .contiguous() makes it: torch takes a view whose channels
    # are its fastest axis for channels-last, dense or not).
    x = x.transpose(2, 3).reshape(B * nh, C, T, H, W).contiguous()
    x = pool(x)  # a module call either way: its hooks run (DeepSpeed ZeRO-3 gathers the weight in one)
    new_thw = (x.shape[2], x.shape[3], x.shape[4])
    x = x.reshape(B, nh, C, math.prod(new_thw)).transpose(2, 3)  # (B, nh, L', C) (no -1: B may be 0)
    if has_cls:
        x = torch.cat((cls_tok, x), dim=2)
    if norm is not None:
        x = norm(x)
    if squeeze:
        x = x.squeeze(1)
    return x, new_thw


class PoolConv3d(nn.Conv3d):
    """A q/k/v pooling: depthwise, bias-free ``nn.Conv3d`` (the same parameters and state_dict keys)
    whose forward runs torch's convolution, or the same convolution through ``kernels.pool``'s
    Triton kernels, the module's weight as the parameter: with ``backend == "triton"`` always,
    with "auto" where ``kernels.pool.auto_backend`` picks Triton (large bf16/fp16 inputs on an sm_90 GPU).
    It stays a module call either way, so module hooks run (DeepSpeed ZeRO-3 gathers the weight in
    one). Under autocast both are cast as ``F.conv3d`` would cast them."""

    backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend == "torch":
            return super().forward(x)
        if backend not in POOL_BACKENDS:
            raise ValueError(f"pool_backend must be one of {POOL_BACKENDS}, got {backend!r}")
        if backend == "auto":
            if auto_backend(x, autocast_dtype(x)) == "torch" or not self._triton_shape():
                return super().forward(x)
        elif not launchable_on(x.device):
            raise ValueError("pool_backend='triton' runs Triton kernels: on CUDA, or on a CPU only in Triton's "
                             "interpreter (TRITON_INTERPRET=1); set model.overrides.pool_backend=torch")
        elif not self._triton_shape():
            raise ValueError(f"pool_backend='triton' runs depthwise, bias-free, zero-padded, undilated Conv3d "
                             f"pooling only; got {self}")
        # (cast under autocast there, as F.conv3d casts: float64 is left alone)
        return depthwise_conv3d(x, self.weight, tuple(self.stride), tuple(self.padding), backend="triton")

    def _triton_shape(self) -> bool:
        """Whether this convolution is one ``kernels.pool`` computes (MViT's poolings all are)."""
        return (self.bias is None and self.padding_mode == "zeros" and tuple(self.dilation) == (1, 1, 1)
                and not isinstance(self.padding, str) and self.groups == self.in_channels == self.out_channels)


def _rows_after_first(like: torch.Tensor) -> torch.Tensor:
    """(Nq, 1) ones with a zero first row, ``like``'s device and dtype: the residual-pooling mask of
    the non-cls rows of ``like`` (B, nh, Nq, hd). Cached for plain tensors (and never handed out to
    be written to); made afresh for tensor subclasses (fake tensors of a tracer) and during CUDA graph
    capture, where a cached tensor would outlive what it belongs to."""
    n, device, dtype = like.shape[2], like.device, like.dtype
    if type(like) is not torch.Tensor or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return _make_rows_after_first(n, device, dtype)
    return _cached_rows_after_first(n, device, dtype)


def _make_rows_after_first(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even if the first call is under inference mode
        mask = torch.ones(n, 1, device=device, dtype=dtype)
        mask[0] = 0
    return mask


_cached_rows_after_first = functools.lru_cache(maxsize=64)(_make_rows_after_first)


def init_weights(m: nn.Module) -> None:
    """Official MViT ``_init_weights`` (applied with ``Module.apply``)."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0.02)
        nn.init.constant_(m.weight, 1.0)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


# ----------------------------------------------------------------------------- modules


class Mlp(nn.Module):
    """fc1 -> exact GELU -> (dropout) -> fc2 -> (dropout) (official ``common.Mlp``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, drop_rate: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (official ``common.DropPath``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Conv patch embedding ``proj``; returns tokens (B, N, C) and their grid (T, H, W)."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        conv_2d: bool = False,
    ):
        super().__init__()
        conv = nn.Conv2d if conv_2d else nn.Conv3d
        n = 2 if conv_2d else 3
        if not (len(kernel) == len(stride) == len(padding) == n):
            raise ValueError(f"patch kernel/stride/padding need {n} entries; got {kernel}, {stride}, {padding}")
        self.conv_2d = conv_2d
        self.proj = conv(dim_in, dim_out, kernel_size=tuple(kernel), stride=tuple(stride), padding=tuple(padding))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Thw]:
        want = 4 if self.conv_2d else 5
        if x.dim() != want:
            shape = "(B, C, H, W)" if self.conv_2d else "(B, C, T, H, W)"
            raise ValueError(f"patch embedding expects {shape}; got {tuple(x.shape)}")
        x = self.proj(x)  # (B, C, [T,] H, W)
        thw = (1, x.shape[-2], x.shape[-1]) if self.conv_2d else (x.shape[2], x.shape[3], x.shape[4])
        return x.flatten(2).transpose(1, 2), thw  # (B, N, C)


class MultiScaleAttention(nn.Module):
    """Pooling attention with decomposed relative positions and residual pooling.

    ``dim`` in, ``dim_out`` out (= ``dim`` unless ``dim_mul_in_att``), ``num_heads`` heads of
    hd = dim_out / num_heads. ``input_size`` is the block's nominal input grid (T, H, W), used
    only to size the relative-position tables like the official code.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        input_size: Sequence[int],
        num_heads: int,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        kernel_q: Sequence[int] = (),
        kernel_kv: Sequence[int] = (),
        stride_q: Sequence[int] = (),
        stride_kv: Sequence[int] = (),
        has_cls: bool = True,
        rel_pos_spatial: bool = True,
        rel_pos_temporal: bool = True,
        rel_pos_zero_init: bool = False,
        residual_pooling: bool = True,
        attn_backend: str = "auto",
        pool_backend: str = "auto",
    ):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.head_dim = head_dim = dim_out // num_heads
        self.scale = head_dim**-0.5
        self.has_cls = has_cls
        self.residual_pooling = residual_pooling
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim_out * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        # Official: skip pooling when both kernel and stride are all ones (or empty).
        if math.prod(kernel_q) == 1 and math.prod(stride_q) == 1:
            kernel_q = ()
        if math.prod(kernel_kv) == 1 and math.prod(stride_kv) == 1:
            kernel_kv = ()

        def pool(kernel: Sequence[int], stride: Sequence[int]) -> Optional[PoolConv3d]:
            if len(kernel) == 0:
                return None
            return PoolConv3d(
                head_dim, head_dim, tuple(kernel), stride=tuple(stride),
                padding=tuple(k // 2 for k in kernel), groups=head_dim, bias=False,
            )

        self.pool_q = pool(kernel_q, stride_q)
        self.norm_q = _layer_norm(head_dim) if self.pool_q is not None else None
        self.pool_k = pool(kernel_kv, stride_kv)
        self.norm_k = _layer_norm(head_dim) if self.pool_k is not None else None
        self.pool_v = pool(kernel_kv, stride_kv)
        self.norm_v = _layer_norm(head_dim) if self.pool_v is not None else None
        self.pool_backend = pool_backend  # who runs the q/k/v poolings (PoolConv3d)

        self.rel_pos_spatial = rel_pos_spatial
        self.rel_pos_temporal = rel_pos_temporal
        if rel_pos_spatial:
            # Official sizing: size // stride[1] from the nominal input size (square in the
            # official code; h and w are sized separately here, identical for square inputs).
            sq = stride_q if len(stride_q) > 0 else (1, 1, 1)
            skv = stride_kv if len(stride_kv) > 0 else (1, 1, 1)
            len_h = 2 * max(input_size[1] // sq[1], input_size[1] // skv[1]) - 1
            len_w = 2 * max(input_size[2] // sq[2], input_size[2] // skv[2]) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(len_h, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(len_w, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        if rel_pos_temporal:
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_t, std=0.02)

    def out_grid(self, thw: Sequence[int]) -> Thw:
        """Grid of the pooled queries (= the block's output grid) for an input grid ``thw``."""
        if self.pool_q is None:
            return tuple(thw)  # type: ignore[return-value]
        k, s, p = self.pool_q.kernel_size, self.pool_q.stride, self.pool_q.padding
        return tuple(conv_out_size(n, k[d], s[d], p[d]) for d, n in enumerate(thw))  # type: ignore[return-value]

    def _tables(self, q_thw: Thw, k_thw: Thw, like: torch.Tensor):
        """The three tables at the lengths the grids need (interpolated like ``get_rel_pos``).

        None when the block has no relative positions at all. An absent table (temporal-only or
        spatial-only configurations, which the official code also allows) is a zero table: it
        adds no bias, exactly like the official code skipping that term."""
        if not self.rel_pos_spatial and not self.rel_pos_temporal:
            return None
        lh, lw = 2 * max(q_thw[1], k_thw[1]) - 1, 2 * max(q_thw[2], k_thw[2]) - 1
        if self.rel_pos_spatial:
            rh = resize_rel_pos(self.rel_pos_h, lh)
            rw = resize_rel_pos(self.rel_pos_w, lw)
        else:
            rh, rw = like.new_zeros(lh, like.shape[-1]), like.new_zeros(lw, like.shape[-1])
        lt = 2 * max(q_thw[0], k_thw[0]) - 1
        if self.rel_pos_temporal:
            rt = resize_rel_pos(self.rel_pos_t, lt)
        elif q_thw[0] == 1 and k_thw[0] == 1:
            rt = None
        else:  # no temporal table: a zero table adds no bias
            rt = like.new_zeros(lt, like.shape[-1])
        return rt, rh, rw

    @property
    def pool_backend(self) -> str:
        """The q/k/v pooling convolutions' backend, "auto", "torch" or "triton" (:class:`PoolConv3d`)."""
        return self._pool_backend

    @pool_backend.setter
    def pool_backend(self, backend: str) -> None:
        if backend not in POOL_BACKENDS:
            raise ValueError(f"pool_backend must be one of {POOL_BACKENDS}, got {backend!r}")
        self._pool_backend = backend
        for pool in (self.pool_q, self.pool_k, self.pool_v):
            if pool is not None:
                pool.backend = backend

    def forward(self, x: torch.Tensor, thw: Thw) -> tuple[torch.Tensor, Thw]:
        B, N, _ = x.shape
        # unbind on the (B, N, 3, nh, hd) layout: its backward is one stack straight into the qkv
        # gradient's layout, where three selects cost three zero-filled copies, two adds and a clone
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2))
        # q, k, v: (B, nh, N, hd)
        q, q_thw = attention_pool(q, self.pool_q, thw, self.has_cls, self.norm_q)
        k, k_thw = attention_pool(k, self.pool_k, thw, self.has_cls, self.norm_k)
        v, _ = attention_pool(v, self.pool_v, thw, self.has_cls, self.norm_v)
        q, k, v = same_dtype(q, k, v)

        tables = self._tables(q_thw, k_thw, q)
        if tables is not None:
            rt, rh, rw = tables
            out = relpos_attention(
                q, k, v, q_thw, k_thw, rt, rh, rw, has_cls=self.has_cls, scale=self.scale, backend=self.attn_backend
            )  # (B, nh, Nq, hd)
        elif self.attn_backend == "reference":
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, nh, Nq, Nk)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)

        if self.residual_pooling:
            if self.has_cls:  # no residual on the cls row: one addcmul (backward: two muls, one
                # of them on the (Nq, 1) mask), where slicing out and re-concatenating cost an add, a
                # cat and three zero-filled tensors; out + q·1 and out + q·0 round exactly like the
                # add and the copy
                out = torch.addcmul(out, q, _rows_after_first(q))
            else:
                out = out + q
        out = out.transpose(1, 2).reshape(B, out.shape[2], self.dim_out)  # (B, Nq, C)
        return self.proj_drop(self.proj(out)), q_thw


class MultiScaleBlock(nn.Module):
    """One MViTv2 block: ``block(x, thw) -> (x, thw)``.

    x (B, 1 + T·H·W, dim) with cls first (when ``has_cls``) -> (B, 1 + T'·H'·W', dim_out).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_size: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path: float = 0.0,
        kernel_q: Sequence[int] = (),
        kernel_kv: Sequence[int] = (),
        stride_q: Sequence[int] = (),
        stride_kv: Sequence[int] = (),
        has_cls: bool = True,
        rel_pos_spatial: bool = True,
        rel_pos_temporal: bool = True,
        rel_pos_zero_init: bool = False,
        residual_pooling: bool = True,
        dim_mul_in_att: bool = False,
        attn_backend: str = "auto",
        pool_backend: str = "auto",
    ):
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.has_cls = has_cls
        self.dim_mul_in_att = dim_mul_in_att
        att_dim = dim_out if dim_mul_in_att else dim
        self.norm1 = _layer_norm(dim)
        self.attn = MultiScaleAttention(
            dim, att_dim, input_size, num_heads, qkv_bias=qkv_bias, drop_rate=drop_rate,
            kernel_q=kernel_q, kernel_kv=kernel_kv, stride_q=stride_q, stride_kv=stride_kv,
            has_cls=has_cls, rel_pos_spatial=rel_pos_spatial, rel_pos_temporal=rel_pos_temporal,
            rel_pos_zero_init=rel_pos_zero_init, residual_pooling=residual_pooling, attn_backend=attn_backend,
            pool_backend=pool_backend,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _layer_norm(att_dim)
        self.mlp = Mlp(att_dim, int(att_dim * mlp_ratio), dim_out, drop_rate)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        sq = list(stride_q)
        if len(sq) > 0 and math.prod(sq) > 1:
            kernel_skip = [s + 1 if s > 1 else s for s in sq]
            self.pool_skip: Optional[nn.MaxPool3d] = nn.MaxPool3d(
                kernel_skip, sq, [k // 2 for k in kernel_skip], ceil_mode=False
            )
        else:
            self.pool_skip = None

    def forward(self, x: torch.Tensor, thw: Thw) -> tuple[torch.Tensor, Thw]:
        x_norm = self.norm1(x)
        x_block, thw_new = self.attn(x_norm, thw)
        if self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)
        x_res, _ = attention_pool(x, self.pool_skip, thw, self.has_cls)
        x = x_res + self.drop_path(x_block)
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)
        if not self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)
        return x + self.drop_path(x_mlp), thw_new


# ----------------------------------------------------------------------------- backbone


class MViT(nn.Module):
    """MViTv2 backbone: patch embedding, cls token, (absolute positions), blocks. No norm/head.

    Args mirror the official ``cfg.MVIT`` fields:
        input_size: (T, H, W) of the input clip in frames/pixels (``(1, H, W)`` for images); sizes
            the relative-position tables and the absolute position embedding.
        embed_dim, depth, num_heads: width, number of blocks and heads of the first stage.
        dim_mul, head_mul: ``[(block, factor)]`` (official ``DIM_MUL``/``HEAD_MUL``).
        pool_q_stride: ``[(block, s_t, s_h, s_w)]`` (official ``POOL_Q_STRIDE``).
        pool_kvq_kernel, pool_kv_stride_adaptive, pool_kv_stride: official pooling fields.
        patch_kernel, patch_stride, patch_padding, patch_2d: the patch embedding.
        use_abs_pos: learned absolute position embedding ``pos_embed`` (1, 1 + N, C) (ViT).
        rel_pos_spatial, rel_pos_temporal, residual_pooling, dim_mul_in_att: MViTv2 options.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        attn_backend: ``kernels.attention`` backend ("auto", "reference", "sdpa", "triton").
        pool_backend: the q/k/v pooling convolutions: "auto" (``kernels.pool``'s Triton kernels
            for large bf16/fp16 inputs on an sm_90 GPU, torch's otherwise), "torch" (``nn.Conv3d``) or
            "triton" (``kernels.pool`` for all; same parameters either way).
    """

    def __init__(
        self,
        *,
        input_size: Sequence[int] = (16, 224, 224),
        in_chans: int = 3,
        embed_dim: int = 96,
        depth: int = 16,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dim_mul: Sequence[Sequence[float]] = (),
        head_mul: Sequence[Sequence[float]] = (),
        pool_q_stride: Sequence[Sequence[int]] = (),
        pool_kvq_kernel: Optional[Sequence[int]] = (3, 3, 3),
        pool_kv_stride_adaptive: Optional[Sequence[int]] = (1, 8, 8),
        pool_kv_stride: Sequence[Sequence[int]] = (),
        patch_kernel: Sequence[int] = (3, 7, 7),
        patch_stride: Sequence[int] = (2, 4, 4),
        patch_padding: Sequence[int] = (1, 3, 3),
        patch_2d: bool = False,
        cls_embed: bool = True,
        use_abs_pos: bool = False,
        rel_pos_spatial: bool = True,
        rel_pos_temporal: bool = True,
        rel_pos_zero_init: bool = False,
        residual_pooling: bool = True,
        dim_mul_in_att: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_backend: str = "auto",
        pool_backend: str = "auto",
    ):
        super().__init__()
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (T, H, W); got {input_size}")
        full_stride = (1,) + tuple(patch_stride) if patch_2d else tuple(patch_stride)
        if patch_2d and input_size[0] != 1:
            raise ValueError(f"a 2-D patch embedding needs input_size T = 1; got {input_size}")
        self.input_size = input_size
        self.patch_2d = patch_2d
        self.cls_embed = cls_embed
        self.use_abs_pos = use_abs_pos
        self.embed_dim = embed_dim
        self.patch_dims = tuple(s // st for s, st in zip(input_size, full_stride))  # official patch_dims
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_kernel, patch_stride, patch_padding, conv_2d=patch_2d)
        num_patches = math.prod(self.patch_dims)
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(cls_embed), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        dmul = [1.0] * (depth + 1)
        hmul = [1.0] * (depth + 1)
        for i, f in dim_mul:
            dmul[int(i)] = float(f)
        for i, f in head_mul:
            hmul[int(i)] = float(f)
        kernel_q, stride_q, kernel_kv, stride_kv = pooling_schedule(
            depth, pool_q_stride, pool_kvq_kernel, pool_kv_stride_adaptive, pool_kv_stride
        )
        # Official: [x.item() for x in torch.linspace(0, rate, depth)], i.e. default-dtype (float32) values (the
        # last block gets float32(0.1) = 0.10000000149..., not 0.1); the same floats make training-mode
        # outputs bit-identical under the same RNG stream. Explicit CPU device: works under a meta
        # device context too.
        dpr = torch.linspace(0.0, float(drop_path_rate), depth, device="cpu").tolist()

        self.blocks = nn.ModuleList()
        size = list(self.patch_dims)
        dim, heads = embed_dim, num_heads
        for i in range(depth):
            heads = round_width(heads, hmul[i])
            if dim_mul_in_att:
                dim_out = round_width(dim, dmul[i], divisor=round_width(heads, hmul[i]))
            else:
                dim_out = round_width(dim, dmul[i + 1], divisor=round_width(heads, hmul[i + 1]))
            self.blocks.append(
                MultiScaleBlock(
                    dim, dim_out, heads, tuple(size), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    drop_rate=drop_rate, drop_path=dpr[i], kernel_q=kernel_q[i], kernel_kv=kernel_kv[i],
                    stride_q=stride_q[i], stride_kv=stride_kv[i], has_cls=cls_embed,
                    rel_pos_spatial=rel_pos_spatial, rel_pos_temporal=rel_pos_temporal,
                    rel_pos_zero_init=rel_pos_zero_init, residual_pooling=residual_pooling,
                    dim_mul_in_att=dim_mul_in_att, attn_backend=attn_backend, pool_backend=pool_backend,
                )
            )
            if len(stride_q[i]) > 0:
                size = [s // st for s, st in zip(size, stride_q[i])]
            dim = dim_out
        self.num_features = dim

        if use_abs_pos:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if cls_embed:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    # -- structure -------------------------------------------------------------------------

    @property
    def backbone(self) -> "MViT":
        """The backbone (this module): the engine reaches ``model.backbone.blocks`` uniformly."""
        return self

    @property
    def out_dim(self) -> int:
        """Channels of the last kept block's output."""
        return self.blocks[-1].dim_out if len(self.blocks) else self.embed_dim

    def set_attn_backend(self, backend: str) -> None:
        """Switch the attention backend of every block (a ViT's blocks, without relative positions,
        take ``auto``, ``reference`` or ``sdpa``: the others ran SDPA, silently)."""
        plain = not any(_unwrap(b).attn.rel_pos_spatial or _unwrap(b).attn.rel_pos_temporal for b in self.blocks)
        valid = PLAIN_ATTN_BACKENDS if plain else ATTN_BACKENDS
        if backend not in valid:
            raise ValueError(f"attn_backend must be one of {valid}"
                             + (" (no relative positions here)" if plain and backend in ATTN_BACKENDS else "")
                             + f", got {backend!r}")
        for blk in self.blocks:
            _unwrap(blk).attn.attn_backend = backend

    def set_pool_backend(self, backend: str) -> None:
        """Switch the pooling-convolution backend ("auto", "torch" or "triton") of every block."""
        if backend not in POOL_BACKENDS:
            raise ValueError(f"pool_backend must be one of {POOL_BACKENDS}, got {backend!r}")
        for blk in self.blocks:
            _unwrap(blk).attn.pool_backend = backend

    def embed_grid(self, input_thw: Sequence[int]) -> Thw:
        """Patch-embedding token grid (T, H, W) for an input of (T, H, W) frames/pixels."""
        conv = self.patch_embed.proj
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        if self.patch_2d:
            return (1,) + tuple(conv_out_size(n, k[d], s[d], p[d]) for d, n in enumerate(input_thw[1:]))  # type: ignore[return-value]
        return tuple(conv_out_size(n, k[d], s[d], p[d]) for d, n in enumerate(input_thw))  # type: ignore[return-value]

    def token_grid(self, input_thw: Sequence[int]) -> Thw:
        """Output token grid (T', H', W') after the kept blocks for an input of (T, H, W)."""
        thw = self.embed_grid(input_thw)
        for blk in self.blocks:
            thw = _unwrap(blk).attn.out_grid(thw)
        return thw

    # -- forward steps ---------------------------------------------------------------------

    def patchify_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Thw]:
        """x (B, C, T, H, W) (or (B, C, H, W) for 2-D) -> tokens (B, N, D) and their grid."""
        return self.patch_embed(x)

    def add_cls_and_pos(self, x: torch.Tensor, thw: Thw) -> torch.Tensor:
        """Prepend the cls token and add the absolute position embedding (when used).

        x (B, N, D) -> (B, 1 + N, D). The position embedding is trilinearly interpolated when
        the grid differs from the nominal one (official ``_get_pos_embed``).
        """
        B = x.shape[0]
        if self.cls_embed:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if self.use_abs_pos:
            x = x + self._pos_embed_for(thw)
        return self.pos_drop(x)

    def _pos_embed_for(self, thw: Thw) -> torch.Tensor:
        pos = self.pos_embed
        if tuple(thw) == tuple(self.patch_dims):
            return pos
        s = int(self.cls_embed)
        cls_pos, grid_pos = pos[:, :s], pos[:, s:]
        t, h, w = self.patch_dims
        grid_pos = grid_pos.reshape(1, t, h, w, -1).permute(0, 4, 1, 2, 3)
        grid_pos = F.interpolate(grid_pos, size=tuple(thw), mode="trilinear")
        grid_pos = grid_pos.reshape(1, grid_pos.shape[1], -1).transpose(1, 2)
        return torch.cat((cls_pos, grid_pos), dim=1)

    def forward_blocks(self, x: torch.Tensor, thw: Thw) -> tuple[torch.Tensor, Thw]:
        """Run every block: x (B, 1 + N, D) on grid thw -> (B, 1 + N', D') on the new grid."""
        for blk in self.blocks:
            x, thw = blk(x, thw)
        return x, thw

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, Thw]:
        """Input clip -> final tokens (B, 1 + N', D') (cls first) and their grid (no norm)."""
        x, thw = self.patchify_embed(x)
        x = self.add_cls_and_pos(x, thw)
        return self.forward_blocks(x, thw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Thw]:
        return self.forward_features(x)


def _unwrap(block: nn.Module) -> nn.Module:
    """The MultiScaleBlock inside an engine wrapper (``.module`` / ``._checkpoint_wrapped_module``)."""
    for attr in ("_checkpoint_wrapped_module", "module"):
        inner = getattr(block, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return block
